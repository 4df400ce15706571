"""Worker processes: public-inbox's ``-W N`` on ds_trio.

The master binds the listening sockets, starts N workers that each run
their own loop on the shared sockets, respawns a worker that dies, changes
N on SIGTTIN/SIGTTOU and forwards graceful shutdown (SIGQUIT, SIGTERM,
SIGINT) to all of them; a second such signal makes the workers stop at
once.  With N = 0 the master serves alone.

Unlike public-inbox the master does not ``fork()`` workers: forking a
process that runs trio or asyncio copies the poller, wake-up fds and threads
of a live event loop into the child.  Workers are fresh interpreters started
with ``subprocess`` that inherit the listening fds (as systemd socket
activation would) and a pipe whose EOF tells them the master died.  The
master's own loop reaps them through the reaper supervisor (``awaitpid``)
and handles its signals as loop callbacks.

With ``--reuseport`` each worker gets its own listening socket per TCP
address, all bound with ``SO_REUSEPORT``, so the kernel spreads new
connections evenly over the workers (a hash of the connection's addresses)
instead of the first worker to wake winning each one; see
``docs/design.rst`` for the measurement and the trade-offs.

Past one machine: run this daemon on N hosts behind an existing load
balancer (HAProxy or nginx ``stream``), each host's sockets bound by systemd
socket activation (``--systemd``); no home-made clustering.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ._accept import Listener, PostAccept, _bind, graceful_shutdown, listen_fds
from ._children import awaitpid
from ._ds import DS
from ._flags import EPOLLIN
from ._loop import Loop
from ._loop import loop as open_loop

__all__ = ["Daemon", "load_app", "main"]

log = logging.getLogger("ds_trio.daemon")

_QUIT_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)
# Daemon.pm's USR1 (reopen logs), USR2 (re-exec) and WINCH are not
# implemented; caught so that they do not kill the process.
_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
_ENV_FDS = "DS_TRIO_LISTEN_FDS"
# Every signal a worker handles.  The master blocks them while it starts a
# worker, the worker inherits that mask (as Daemon.pm's forked workers
# inherit its blocked signals) and unblocks them once its loop has installed
# the handlers: a signal sent meanwhile waits for the loop instead of
# killing a worker that is still starting.
_WORKER_SIGNALS = (
    *_QUIT_SIGNALS,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    *_IGNORED_SIGNALS,
)


def _ignore(signum: int) -> None:
    log.info("signal %d ignored", signum)


_ENV_PARENT = "DS_TRIO_PARENT_FD"


def load_app(spec: str) -> PostAccept:
    """Import ``"module:callable"`` and call it to get a ``post_accept``.

    The callable runs once per worker (per process), so it may open
    per-process resources.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"app must be 'module:callable', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    post_accept = factory()
    if not callable(post_accept):
        raise TypeError(
            f"{spec}() returned {post_accept!r}, not a post_accept callable"
        )
    return post_accept  # type: ignore[no-any-return]


class _ParentPipe(DS):
    """EOF on this pipe means the master is gone: shut down gracefully."""

    def __init__(self, fd: int, on_eof: Callable[[], object]) -> None:
        super().__init__(os.fdopen(fd, "rb", buffering=0), EPOLLIN)
        self.on_eof = on_eof

    def event_step(self) -> None:
        try:
            data = os.read(self._fd, 64)
        except BlockingIOError:
            return
        if not data:
            self.close()
            self.on_eof()


async def _serve_worker(
    post_accept: PostAccept,
    socks: Sequence[socket.socket],
    parent_fd: int | None,
    graceful_timeout: float,
    accepts_per_wake: int = 1,
) -> None:
    def quit(_signum: int = 0) -> None:
        graceful_shutdown(loop, timeout=graceful_timeout)

    handlers: dict[signal.Signals, Callable[[int], object]] = dict.fromkeys(
        _QUIT_SIGNALS, quit
    )
    # The master handles these; in a worker their default action would kill
    # it (or stop it: TTIN/TTOU, which Daemon.pm's workers ignore too).
    for ignored in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, *_IGNORED_SIGNALS):
        handlers[ignored] = _ignore
    async with open_loop(errors="log", signals=handlers) as loop:
        # The handlers are in: what the master blocked for our start-up
        # (see _spawn) may come now, and is handled by the loop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
        for sock in socks:
            Listener(sock, post_accept, accepts_per_wake=accepts_per_wake)
        if parent_fd is not None:
            _ParentPipe(parent_fd, quit)


class Daemon:
    """A master process with ``workers`` worker processes (see module doc).

    ``app`` is ``"module:callable"``; each process calls it once to get its
    ``post_accept(sock, addr, listen_sock)``.
    """

    def __init__(
        self,
        app: str,
        sockets: Sequence[socket.socket],
        *,
        workers: int = 1,
        backend: str = "trio",
        graceful_timeout: float = 30.0,
        reuseport: bool = False,
        accepts_per_wake: int = 1,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if isinstance(accepts_per_wake, bool) or not isinstance(accepts_per_wake, int):
            raise TypeError(
                f"accepts_per_wake must be an int, got {accepts_per_wake!r}"
            )
        if accepts_per_wake < 1:
            raise ValueError(f"accepts_per_wake must be >= 1, got {accepts_per_wake}")
        if not sockets:
            raise ValueError("a daemon needs at least one listening socket")
        self.app = app
        self.sockets = list(sockets)
        self.workers = workers
        self.backend = backend
        self.graceful_timeout = graceful_timeout
        self.accepts_per_wake = accepts_per_wake
        # --reuseport: the TCP sockets bound with SO_REUSEPORT are split,
        # one copy (a "group", one socket per address) per worker; the
        # others (UNIX, or without the option) stay shared by all.
        split = [s for s in self.sockets if reuseport and _is_reuseport(s)]
        self._shared = [s for s in self.sockets if s not in split]
        self._free_groups: list[list[socket.socket]] = [split] if split else []
        self._split_addrs = [(s.family, s.getsockname()) for s in split]
        self._groups: dict[int, list[socket.socket]] = {}
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.quitting = 0
        self._parent_pipes: dict[int, int] = {}
        self._retiring: set[int] = set()
        self._loop: Loop | None = None

    # -- the master ---------------------------------------------------------

    def run(self) -> None:
        """Run until shut down (blocking)."""
        backend, options = _backend_args(self.backend)
        anyio.run(self._main, backend=backend, backend_options=options)

    async def _main(self) -> None:
        if self.workers == 0:
            await _serve_worker(
                load_app(self.app),
                self.sockets,
                None,
                self.graceful_timeout,
                self.accepts_per_wake,
            )
            return
        handlers: dict[signal.Signals, Callable[[int], object]] = dict.fromkeys(
            _QUIT_SIGNALS, self._on_quit
        )
        handlers[signal.SIGTTIN] = self._on_ttin
        handlers[signal.SIGTTOU] = self._on_ttou
        handlers[signal.SIGHUP] = self._on_hup
        for ignored in _IGNORED_SIGNALS:
            handlers[ignored] = _ignore
        async with open_loop(errors="log", signals=handlers) as loop:
            self._loop = loop
            for _ in range(self.workers):
                self._spawn()

    def _spawn(self) -> None:
        group = self._take_group()
        read_end, write_end = os.pipe()
        fds = [s.fileno() for s in (*self._shared, *group)]
        env = dict(os.environ)
        env[_ENV_FDS] = ",".join(map(str, fds))
        env[_ENV_PARENT] = str(read_end)
        cmd = [
            sys.executable,
            "-m",
            "ds_trio._daemon",
            "--worker",
            self.app,
            "--backend",
            self.backend,
            "--graceful-timeout",
            str(self.graceful_timeout),
            "--accepts-per-wake",
            str(self.accepts_per_wake),
        ]
        # The worker starts with its signals blocked (see _WORKER_SIGNALS);
        # here they are blocked only for the Popen call.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            proc = subprocess.Popen(cmd, pass_fds=[*fds, read_end], env=env)
        except BaseException:
            if group:
                self._free_groups.append(group)
            os.close(write_end)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_end)
        self.children[proc.pid] = proc
        if group:
            self._groups[proc.pid] = group
        self._parent_pipes[proc.pid] = write_end
        awaitpid(proc.pid, self._on_exit)
        log.info(
            "worker %d started (%d of %d)", proc.pid, len(self.children), self.workers
        )

    def _on_exit(self, pid: int) -> None:
        proc = self.children.pop(pid, None)
        write_end = self._parent_pipes.pop(pid, None)
        if write_end is not None:
            os.close(write_end)
        if proc is not None:
            proc.returncode = proc.returncode if proc.returncode is not None else 0
        group = self._groups.pop(pid, None)
        if group is not None:
            # A worker that died keeps its sockets open here: connections
            # the kernel queued on them wait for its replacement, which
            # inherits them, instead of being reset.
            self._free_groups.append(group)
        if self.quitting:
            if not self.children and self._loop is not None:
                self._loop.stop()
            return
        if pid in self._retiring:
            self._retiring.discard(pid)
            log.info("worker %d retired", pid)
        else:
            log.warning("worker %d exited; respawning", pid)
        while len(self.children) - len(self._retiring) < self.workers:
            self._spawn()

    def _on_quit(self, signum: int) -> None:
        self.quitting += 1
        if self.quitting == 1:
            # Stop accepting here; the workers keep their own copies until
            # their graceful shutdown closes them.
            for sock in self.sockets:
                sock.close()
            for group in (*self._groups.values(), *self._free_groups):
                _close_all(group)
        for pid in list(self.children):
            os.kill(pid, signum)
        if not self.children and self._loop is not None:
            self._loop.stop()

    def _on_ttin(self, _signum: int) -> None:
        if self.quitting:
            return
        self.workers += 1
        self._spawn()

    def _on_ttou(self, _signum: int) -> None:
        # Down to one worker; serving in the master alone is -W 0's job.
        if self.quitting or self.workers <= 1:
            return
        self.workers -= 1
        serving = [pid for pid in self.children if pid not in self._retiring]
        if serving:
            self._retire(serving[-1])  # the newest (children keep spawn order)

    def _on_hup(self, _signum: int) -> None:
        # Replace every worker with a fresh interpreter (new code, new
        # configuration); the old ones finish their clients gracefully.
        if self.quitting:
            return
        old = [pid for pid in self.children if pid not in self._retiring]
        for _ in range(self.workers):
            self._spawn()
        for pid in old:
            self._retire(pid)

    def _retire(self, pid: int) -> None:
        self._retiring.add(pid)
        # Its own sockets close now (here, and in the worker as its graceful
        # shutdown starts) so that the kernel stops routing connections to
        # them; connections already queued there are reset (SO_REUSEPORT's
        # known cost, unless net.ipv4.tcp_migrate_req is set).
        _close_all(self._groups.pop(pid, []))
        os.kill(pid, signal.SIGQUIT)

    def _take_group(self) -> list[socket.socket]:
        """The per-worker sockets for a new worker ([] without --reuseport)."""
        if self._free_groups:
            return self._free_groups.pop()
        return [_rebind(family, addr) for family, addr in self._split_addrs]


def _is_reuseport(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    )


def _rebind(family: int, addr: Any) -> socket.socket:
    """Another listening socket on ``addr`` (all bound with SO_REUSEPORT)."""
    new = socket.socket(family, socket.SOCK_STREAM)
    try:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            new.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        new.bind(addr)
        new.listen(1024)
    except OSError:
        new.close()
        raise
    new.setblocking(False)
    return new


def _close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _backend_args(name: str) -> tuple[str, dict[str, Any]]:
    if name == "uvloop":
        return "asyncio", {"use_uvloop": True}
    return name, {}


def _worker_entry(
    app: str, backend: str, graceful_timeout: float, accepts_per_wake: int
) -> None:
    fds = [int(fd) for fd in os.environ.pop(_ENV_FDS, "").split(",") if fd]
    parent = os.environ.pop(_ENV_PARENT, None)
    socks = [socket.socket(fileno=fd) for fd in fds]
    for sock in socks:
        sock.setblocking(False)
    post_accept = load_app(app)
    name, options = _backend_args(backend)
    anyio.run(
        _serve_worker,
        post_accept,
        socks,
        int(parent) if parent else None,
        graceful_timeout,
        accepts_per_wake,
        backend=name,
        backend_options=options,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ds_trio._daemon``: a generic daemon for an app."""
    parser = argparse.ArgumentParser(description="ds_trio daemon")
    parser.add_argument("app", nargs="?", help="module:callable returning post_accept")
    parser.add_argument("--worker", metavar="APP", help=argparse.SUPPRESS)
    parser.add_argument("-l", "--listen", action="append", default=[])
    parser.add_argument("-W", "--workers", type=int, default=1)
    parser.add_argument("--systemd", action="store_true")
    parser.add_argument(
        "--reuseport",
        action="store_true",
        help="one SO_REUSEPORT listening socket per worker (TCP only)",
    )
    parser.add_argument(
        "--backend", default="trio", choices=["trio", "asyncio", "uvloop"]
    )
    parser.add_argument("--graceful-timeout", type=float, default=30.0)
    parser.add_argument(
        "--accepts-per-wake",
        type=int,
        default=1,
        metavar="N",
        help="connections each worker accepts per wake-up (default 1, as "
        "public-inbox: fair between workers; raise it for connection bursts)",
    )
    args = parser.parse_args(argv)
    if args.accepts_per_wake < 1:
        parser.error("--accepts-per-wake must be >= 1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s"
    )
    if args.worker:
        _worker_entry(
            args.worker, args.backend, args.graceful_timeout, args.accepts_per_wake
        )
        return
    if not args.app:
        parser.error("an app (module:callable) is required")
    try:
        socks = bind_listen_args(args.listen, reuseport=args.reuseport) + (
            listen_fds() if args.systemd else []
        )
    except OSError as exc:
        log.error("no listeners bound: %s", exc)  # noqa: TRY400 - no traceback
        sys.exit(exc.errno or 1)
    if not socks:
        parser.error("no listeners: give -l HOST:PORT, -l unix:PATH or --systemd")
    Daemon(
        args.app,
        socks,
        workers=args.workers,
        backend=args.backend,
        graceful_timeout=args.graceful_timeout,
        reuseport=args.reuseport,
        accepts_per_wake=args.accepts_per_wake,
    ).run()


def bind_listen_args(
    listen: Sequence[str], *, reuseport: bool = False
) -> list[socket.socket]:
    """Bind ``-l`` arguments: ``HOST:PORT``, ``[V6]:PORT`` or ``unix:/path``."""
    socks: list[socket.socket] = []
    for spec in listen:
        if spec.startswith("unix:"):
            socks += _bind(None, None, spec[5:], 1024)
            continue
        host, _, port = spec.rpartition(":")
        socks += _bind(
            host.strip("[]") or None, int(port), None, 1024, reuseport=reuseport
        )
    return socks


if __name__ == "__main__":
    main()
