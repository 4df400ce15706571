"""Listeners, ``serve()`` and graceful shutdown.

A listener is a DS object like any other, as in public-inbox: it accepts in
its ``event_step`` and hands each new socket to ``post_accept``.  It is
level-triggered and accepts one connection per wake-up by default - "no loop
here, we want to fairly distribute clients between multiple processes"
(public-inbox's Listener) - which also lets every other ready object step
between two accepts under an accept storm.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import anyio
import anyio.abc

from ._ds import DS
from ._flags import EPOLLIN
from ._loop import Loop, _current, add_timer
from ._loop import loop as open_loop

__all__ = [
    "ACCEPT_BACKOFF",
    "Listener",
    "PostAccept",
    "graceful_shutdown",
    "listen_fds",
    "serve",
]

log = logging.getLogger("ds_trio.accept")

#: Seconds a listener pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM (trio's rule).
ACCEPT_BACKOFF: Final = 0.100

# Out of a resource the process or the system will get back: pause, don't
# spin on a listener that stays readable.
_CAPACITY_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)
# The client gave up before we accepted it, or a firewall said no: nothing to
# report.
_QUIET_ERRORS: Final = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})

PostAccept = Callable[[socket.socket, Any, socket.socket], object]


class Listener(DS):
    """Accepts connections and hands them to ``post_accept(sock, addr, listen_sock)``.

    ``post_accept`` typically constructs a DS subclass for the new socket
    (already non-blocking, with ``SO_KEEPALIVE`` and ``TCP_NODELAY`` set on
    TCP).  An exception from it is logged and closes only that connection.
    On EMFILE, ENFILE, ENOBUFS or ENOMEM the listener logs once per burst and
    stops accepting for ``ACCEPT_BACKOFF`` seconds instead of spinning, then
    recovers by itself.

    Raises:
        ValueError: ``sock`` is not a listening stream socket.
        TypeError: ``post_accept`` is not callable.
    """

    def __init__(
        self,
        sock: socket.socket,
        post_accept: PostAccept,
        *,
        accepts_per_wake: int = 1,
    ) -> None:
        if not callable(post_accept):
            raise TypeError(f"post_accept must be callable, got {post_accept!r}")
        if accepts_per_wake < 1:
            raise ValueError(f"accepts_per_wake must be >= 1, got {accepts_per_wake}")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"{sock!r} is not listening")
        if sock.getblocking():
            # An inherited blocking listener can hang accept() when several
            # processes share it (upstream 8472ccdd).
            log.warning("listener fd %d was blocking; made non-blocking", sock.fileno())
        self.post_accept = post_accept
        self.accepts_per_wake = accepts_per_wake
        self.backing_off = False
        self.accepted = 0
        super().__init__(sock, EPOLLIN)

    def event_step(self) -> None:
        for _ in range(self.accepts_per_wake):
            sock = self.sock
            if sock is None:
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _QUIET_ERRORS:
                    continue
                if exc.errno in _CAPACITY_ERRORS:
                    self._back_off(exc)
                else:
                    log.warning("BUG? accept() on fd %d: %s", self._fd, exc)
                return
            self.backing_off = False
            self.accepted += 1
            self._hand_over(conn, addr, sock)

    def _hand_over(self, conn: socket.socket, addr: Any, sock: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            self.post_accept(conn, addr, sock)
        except Exception:
            log.exception("post_accept failed for a connection from %r", addr)
            registered = self._ds_state.descriptor_map.get(conn.fileno())
            if registered is not None and registered.sock is conn:
                registered.close()
            else:
                conn.close()

    def _back_off(self, exc: OSError) -> None:
        if not self.backing_off:
            log.error(
                "accept() on fd %d: %s; pausing %.0f ms",
                self._fd,
                os.strerror(exc.errno or 0),
                ACCEPT_BACKOFF * 1000,
                exc_info=exc,
            )
        self.backing_off = True
        self.epwait(0)  # stay quiet: the pending connection keeps it readable
        add_timer(ACCEPT_BACKOFF, self._resume)

    def _resume(self) -> None:
        if self.sock is not None:
            self.epwait(EPOLLIN)


def graceful_shutdown(loop: Loop | None = None, *, timeout: float = 30.0) -> None:
    """Stop accepting, close idle clients, let busy ones finish, then end.

    The seed's ``worker_quit``: listeners are closed now; after every round
    each object with a ``busy()`` method is either counted (busy: a partial
    request, a response in progress, queued output) or closed (idle);
    objects without ``busy`` neither block nor get closed.  The loop
    finishes when no busy object is left, or after ``timeout`` seconds.  A
    second call ends the loop at once.

    Raises:
        NotInLoopError: no loop given and none is running.
    """
    if loop is None:
        from ._loop import current_loop

        loop = current_loop()
    if loop._quitting:
        loop.stop()
        return
    loop._quitting = True
    for obj in list(loop.descriptor_map.values()):
        if isinstance(obj, Listener):
            obj.close()
    give_up_at = loop.now() + timeout

    def busy_left(descriptor_map: dict[int, DS]) -> bool:
        busy = 0
        for obj in list(descriptor_map.values()):
            check = getattr(obj, "busy", None)
            if check is None or obj.sock is None:
                continue
            if check():
                busy += 1
            else:
                obj.close()  # close as much as possible, as early as possible
        if busy and loop.now() >= give_up_at:
            log.warning("graceful shutdown timed out with %d busy client(s)", busy)
            return False
        return busy > 0

    loop.post_loop_callback = busy_left
    # Wake for the deadline even if no client makes a sound (on this loop's
    # own heap: the caller may run outside its context).
    loop.timers.add(timeout, loop.kick, ())
    loop.kick()


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (``LISTEN_FDS``).

    Only honoured when ``LISTEN_PID`` is this process, as sd_listen_fds(3)
    says.  The sockets are made non-blocking.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    return [_inherit(fd) for fd in range(3, 3 + count)]


def _inherit(fd: int) -> socket.socket:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ValueError(f"inherited fd {fd} is not a socket")
    # Ask the fd, not a socket object made from it (which reports blocking).
    if os.get_blocking(fd):
        log.warning("inherited listener fd %d was blocking; made non-blocking", fd)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _bind(
    host: str | None,
    port: int | None,
    path: str | None,
    backlog: int,
    *,
    reuseport: bool = False,
) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        if port is not None:
            for family, type_, proto, _, addr in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuseport:
                    # before bind(): the daemon binds more sockets to this
                    # address later, one per worker (_daemon.py)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                if port == 0:
                    # Port 0: one socket, or each family would get its own port.
                    break
        if path is not None:
            _remove_stale_unix_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(path)
            sock.listen(backlog)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        sock.setblocking(False)
    return socks


def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens there
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another server")
    finally:
        probe.close()


async def serve(
    post_accept: PostAccept,
    port: int | None = None,
    *,
    host: str | None = "127.0.0.1",
    path: str | None = None,
    sockets: Iterable[socket.socket] = (),
    systemd: bool = False,
    backlog: int = 1024,
    accepts_per_wake: int = 1,
    errors: Any = "log",
    task_status: anyio.abc.TaskStatus[Sequence[Any]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections into ``post_accept`` until cancelled or shut down.

    In the style of ``trio.serve_tcp``: listens on TCP ``host:port`` (port 0:
    a free port), on the UNIX socket ``path``, on already-listening
    ``sockets`` (inherited fds) and, with ``systemd=True``, on the sockets of
    systemd socket activation; reports the bound addresses through
    ``task_status.started(...)``, then runs.  Inside a running ds_trio loop
    the listeners join it; otherwise ``serve`` runs its own loop with the
    ``errors`` policy (``"log"``: one broken client never stops the server).
    Returns when the loop finishes (e.g. after :func:`graceful_shutdown`);
    cancelling it closes the listeners (and its own loop's clients).

    Raises:
        ValueError: nothing to listen on.
        OSError: binding failed.
    """
    socks = _bind(host, port, path, backlog) + list(sockets)
    if systemd:
        socks += listen_fds()
    if not socks:
        raise ValueError("serve() needs a port, a path, sockets or systemd=True")
    addresses = [s.getsockname() for s in socks]
    running = _current.get()
    if running is not None:
        listeners = [
            Listener(s, post_accept, accepts_per_wake=accepts_per_wake) for s in socks
        ]
        task_status.started(addresses)
        try:
            await anyio.sleep_forever()
        finally:
            for listener in listeners:
                listener.close()
        return
    async with open_loop(errors=errors):
        for s in socks:
            Listener(s, post_accept, accepts_per_wake=accepts_per_wake)
        task_status.started(addresses)
