"""A ds_trio example server in a child process, with a control pipe.

Used by ``tests/test_load.py`` and ``bench/soak.py``: the server under load
runs alone in its own process, so its RSS, fds and tasks are its own, and
the load generator's file descriptors do not count against its limit.

    python bench/loadserver.py --app echo|httpd [--backend trio|asyncio|uvloop]
        [--exptime S] [--root DIR] [--port 0]

It prints one JSON line ``{"port": N, "pid": P}`` once listening, then reads
commands from stdin, one per line, each answered with one JSON line on
stdout:

``stats``
    ``{"fds", "spill", "tasks", "registered", "idle", "rss_kib", ...}``: open
    fds (spill files excluded), spill files held open, live tasks, objects in
    the descriptor map (the listener and the control pipe included), objects
    tracked for idle expiry and the current RSS.
``count``
    ``{"registered": N}`` only: cheap enough to poll while connecting.
``expire``
    Runs ``ds_trio.expire_old()`` now instead of at the next ``later`` batch
    (real-time runs cannot wait 60 s per check); answers ``stats``.
``quit``
    Stops the loop; the process exits once everything is closed.

The control pipe is itself a DS object (a pipe is pollable), so commands are
served by the loop under test and answered between client steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import sys
from typing import Any

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT
from ds_trio.testing import count_tasks, open_fds


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stats() -> dict[str, Any]:
    fds = open_fds()
    spill = sum(1 for target in fds.values() if target.endswith("(deleted)"))
    loop = ds_trio.current_loop()
    st = loop.statistics()
    return {
        "fds": len(fds) - spill,
        "spill": spill,
        "tasks": count_tasks(),
        "registered": st.registered,
        "idle": len(loop.idle),
        "rss_kib": rss_kib(),
        "bytes_spilled": st.bytes_spilled,
    }


class Control(DS):
    """Reads commands from the stdin pipe; answers on stdout."""

    def __init__(self, fd: int) -> None:
        super().__init__(os.fdopen(fd, "rb", buffering=0), EPOLLIN | EPOLLONESHOT)

    def event_step(self) -> None:
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, 4096, len(rbuf)):
            while (end := rbuf.find(b"\n") + 1) > 0:
                command = bytes(rbuf[: end - 1]).decode().strip()
                del rbuf[:end]
                try:
                    self.command(command)
                except OSError as exc:  # EMFILE while reading /proc, say
                    reply({"error": str(exc)})
                if self.sock is None:
                    return
        if self.sock is None:  # EOF: the parent is gone
            ds_trio.current_loop().stop()

    def command(self, command: str) -> None:
        if command == "quit":
            reply(stats())
            self.close()
            ds_trio.current_loop().stop()
            return
        if command == "count":  # cheap: no /proc scan, no task walk
            reply({"registered": ds_trio.current_loop().statistics().registered})
            return
        if command == "expire":
            tracked = len(ds_trio.current_loop().idle)
            ds_trio.expire_old()
            reply({**stats(), "expired": tracked - len(ds_trio.current_loop().idle)})
            return
        reply(stats())


def reply(obj: dict[str, Any]) -> None:
    # Small lines to a pipe the parent reads: a blocking write is fine.
    os.write(1, (json.dumps(obj) + "\n").encode())


def post_accept_for(args: argparse.Namespace) -> Any:
    if args.app == "httpd":
        from ds_trio.examples import httpd

        app = httpd.make_post_accept(args.root)
    else:
        from ds_trio.examples import echo

        app = echo.make_post_accept()
    if not args.sndbuf:
        return app

    def post_accept(sock: socket.socket, addr: object, listener: socket.socket) -> Any:
        # A fixed send buffer: output a slow reader leaves queued spills
        # after this much, not after the kernel's autotuned megabytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
        return app(sock, addr, listener)

    return post_accept


async def serve(args: argparse.Namespace) -> None:
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    async with ds_trio.loop(errors="log", exptime=args.exptime):
        ds_trio.Listener(listener, post_accept_for(args), accepts_per_wake=args.accepts)
        Control(os.dup(0))
        reply({"port": listener.getsockname()[1], "pid": os.getpid()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app", choices=["echo", "httpd"], default="echo")
    parser.add_argument(
        "--backend", choices=["trio", "asyncio", "uvloop"], default="trio"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--exptime", type=float, default=None)
    parser.add_argument("--root", default=".")
    parser.add_argument("--accepts", type=int, default=64)
    parser.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF per client")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOADSERVER_LOG", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    raise_nofile()
    backend = "asyncio" if args.backend == "uvloop" else args.backend
    options = {"use_uvloop": True} if args.backend == "uvloop" else {}
    anyio.run(serve, args, backend=backend, backend_options=options)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
