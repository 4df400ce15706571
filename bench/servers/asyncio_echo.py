"""Bench echo server on an asyncio ``Protocol`` (stdlib loop or uvloop).

The callback-style API asyncio offers for servers that care about speed:
no coroutine per connection, ``data_received`` answers inline, and the
transport buffers what the socket does not take.  Flow control is the
documented pattern: when the transport says its buffer is full
(``pause_writing``), stop reading until it drained (``resume_writing``).

Usage: ``python bench/servers/asyncio_echo.py PORT [--backend asyncio|uvloop]
[--reuseport]`` (``--reuseport``: bind with ``SO_REUSEPORT``, so that several
such processes share the port, as bench/workers.py runs them).
"""

from __future__ import annotations

import asyncio
from typing import cast

from _common import parse_args, parse_requests, raise_nofile_limit, ready, zero_chunks


class EchoProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.rest = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        items, self.rest = parse_requests(self.rest + data if self.rest else data)
        for item in items:
            if isinstance(item, int):
                for chunk in zero_chunks(item):
                    transport.write(chunk)
            else:
                transport.write(item)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, reuseport: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        EchoProtocol,
        "127.0.0.1",
        port,
        backlog=1024,
        reuse_address=True,
        reuse_port=reuseport or None,
    )
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main() -> None:
    args = parse_args(__doc__ or "", backends=("asyncio", "uvloop"), reuseport=True)
    raise_nofile_limit()
    if args.backend == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.port, args.reuseport))
    else:
        asyncio.run(serve(args.port, args.reuseport))


if __name__ == "__main__":
    main()
