"""Bench echo server on ds_trio: DS objects, the DS write path, one loop.

Each client is a DS object with ``EPOLLIN|EPOLLONESHOT`` interest whose
``event_step`` follows public-inbox's pattern: flush queued output first,
read more only once it is gone (back-pressure, and responses stay in
request order).  ``bulk N`` is written through ``write()``: what the socket
does not take goes to a spill file and leaves with ``sendfile``.

Usage: ``python bench/servers/ds_trio_echo.py PORT [--backend trio|asyncio|uvloop]
[--tasks]`` (``--tasks``: ``ds_trio.loop(callbacks=False)``, each object
woken in its own task instead of from readiness callbacks).

Under the worker-process daemon (bench/workers.py), with bench/servers on
``PYTHONPATH``: ``python -m ds_trio._daemon ds_trio_echo:make_post_accept
-l 127.0.0.1:PORT -W N``; each process says ``READY <pid>`` on stdout once
its factory ran.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import anyio
from _common import (
    RECV_SIZE,
    parse_args,
    parse_requests,
    raise_nofile_limit,
    ready,
    zero_chunks,
)

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class Client(DS):
    """One connection speaking the bench protocol."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)

    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, RECV_SIZE, len(rbuf)):
            items, rest = parse_requests(bytes(rbuf))
            rbuf = bytearray(rest)
            for item in items:
                if isinstance(item, int):
                    for chunk in zero_chunks(item):
                        self.write(chunk)
                else:
                    self.write(item)
            if self.wbuf:
                # Output is queued and its wake-up arranged (requeue or
                # EPOLLOUT); read more only once it has drained.
                self.rbuf_idle(rbuf)
                return


def make_post_accept() -> Callable[[socket.socket, object, socket.socket], None]:
    """The daemon's app factory: one call per worker process."""
    raise_nofile_limit()
    # one write(): the workers share the master's stdout
    os.write(1, b"READY %d\n" % os.getpid())

    def post_accept(sock: socket.socket, _addr: object, _lsock: socket.socket) -> None:
        Client(sock)  # ds_trio.Listener set TCP_NODELAY already

    return post_accept


async def serve(port: int, callbacks: bool = True) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    async with ds_trio.loop(errors="log", callbacks=callbacks) as loop:
        # ds_trio's Listener: one accept per wake-up, level-triggered (as
        # upstream), TCP_NODELAY set on each connection.
        ds_trio.Listener(lsock, lambda conn, _addr, _lsock: Client(conn))
        ready(lsock.getsockname()[1])
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                loop.stop()
                break


def main() -> None:
    args = parse_args(
        "ds_trio bench echo server", backends=("trio", "asyncio", "uvloop"), tasks=True
    )
    raise_nofile_limit()
    options: dict[str, Any] = {}
    backend = args.backend
    if backend == "uvloop":
        backend, options = "asyncio", {"use_uvloop": True}
    anyio.run(
        serve, args.port, not args.tasks, backend=backend, backend_options=options
    )


if __name__ == "__main__":
    main()
