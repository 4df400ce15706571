"""Ping-pong of two echo steps over a socketpair, for instruction counts.

    valgrind --tool=callgrind .venv/bin/python bench/cg_step.py \
        BACKEND TRIPS [--protocol]

BACKEND is trio, asyncio or uvloop.  Two DS objects (the bench echo
server's step: ``flush_write``, ``do_read`` until it returns 0, ``write``)
pass a line back and forth TRIPS times; ``--protocol`` runs the same with
two asyncio ``Protocol`` objects instead (asyncio or uvloop).  The marginal
cost per round trip is the difference of the "Collected" totals callgrind
prints for two TRIPS values (e.g. 1,000 and 4,000) divided by their
difference: user-space instructions, deterministic where CPU time on a
shared machine is not.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from collections.abc import Callable
from typing import Any

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class End(DS):
    """One end of the ping-pong: the bench echo server's step."""

    def __init__(
        self, sock: socket.socket, trips: int, done: Callable[[], object] | None
    ) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.trips = trips
        self.count = 0
        self.done = done

    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, 65536, len(rbuf)):
            data = bytes(rbuf)
            rbuf = bytearray()
            if self.done is not None:
                self.count += 1
                if self.count >= self.trips:
                    self.done()
                    return
            self.write(data)
            if self.wbuf:
                self.rbuf_idle(rbuf)
                return


async def _ds_pingpong(trips: int) -> None:
    a, b = socket.socketpair()
    async with ds_trio.loop() as loop:
        End(a, trips, loop.stop)
        End(b, trips, None)
        a.send(b"ping\n")


class _Echo(asyncio.Protocol):
    def __init__(self, trips: int, done: asyncio.Future[None] | None) -> None:
        self.trips = trips
        self.count = 0
        self.done = done
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done is not None:
            self.count += 1
            if self.count >= self.trips:
                self.done.set_result(None)
                return
        self.transport.write(data)


async def _protocol_pingpong(trips: int) -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    done = loop.create_future()
    await loop.create_connection(lambda: _Echo(trips, done), sock=a)
    await loop.create_connection(lambda: _Echo(trips, None), sock=b)
    a.send(b"ping\n")
    await done


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("backend", choices=("trio", "asyncio", "uvloop"))
    parser.add_argument("trips", type=int)
    parser.add_argument("--protocol", action="store_true")
    args = parser.parse_args()
    uvloop = args.backend == "uvloop"
    if args.protocol:
        if args.backend == "trio":
            parser.error("--protocol needs asyncio or uvloop")
        if uvloop:
            import uvloop as uv

            with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
                runner.run(_protocol_pingpong(args.trips))
        else:
            asyncio.run(_protocol_pingpong(args.trips))
        return
    backend = "asyncio" if uvloop else args.backend
    options = {"use_uvloop": True} if uvloop else {}
    anyio.run(_ds_pingpong, args.trips, backend=backend, backend_options=options)


if __name__ == "__main__":
    main()
