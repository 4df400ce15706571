"""Bench echo server on anyio streams (``create_tcp_listener``).

The portable high-level API, run on either backend: a task per client,
``receive`` then ``send``, as an anyio library would write it.

Usage: ``python bench/servers/anyio_echo.py PORT [--backend asyncio|trio]``
"""

from __future__ import annotations

from typing import cast

import anyio
from _common import (
    RECV_SIZE,
    parse_args,
    parse_requests,
    raise_nofile_limit,
    ready,
    zero_chunks,
)
from anyio.abc import SocketAttribute, SocketStream


async def handle(stream: SocketStream) -> None:
    rest = b""
    async with stream:
        try:
            while True:
                data = await stream.receive(RECV_SIZE)
                items, rest = parse_requests(rest + data if rest else data)
                for item in items:
                    if isinstance(item, int):
                        for chunk in zero_chunks(item):
                            # Both backends take any bytes-like object;
                            # bytes(chunk) would copy every bulk response.
                            await stream.send(cast(bytes, chunk))
                    else:
                        await stream.send(item)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            # EOF or a reset client: an uncaught error would take the
            # whole server down through the listener's task group.
            pass


async def serve(port: int) -> None:
    listener = await anyio.create_tcp_listener(
        local_host="127.0.0.1", local_port=port, backlog=1024
    )
    ready(listener.extra(SocketAttribute.local_port))
    async with listener:
        await listener.serve(handle)


def main() -> None:
    args = parse_args(__doc__ or "", backends=("asyncio", "trio"))
    raise_nofile_limit()
    anyio.run(serve, args.port, backend=args.backend)


if __name__ == "__main__":
    main()
