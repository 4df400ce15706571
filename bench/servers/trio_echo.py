"""Bench echo server on trio: ``serve_tcp`` with a ``SocketStream`` per client.

Idiomatic trio: one task per connection, ``receive_some`` then
``send_all``; ``send_all`` returns only once the kernel took every byte, so
back-pressure is implicit and no user-space output buffer exists.

Usage: ``python bench/servers/trio_echo.py PORT [--reuseport]``
(``--reuseport``: bind with ``SO_REUSEPORT``, so that several such processes
share the port, as bench/workers.py runs them).
"""

from __future__ import annotations

import trio
from _common import (
    RECV_SIZE,
    parse_args,
    parse_requests,
    raise_nofile_limit,
    ready,
    zero_chunks,
)


async def handle(stream: trio.SocketStream) -> None:
    rest = b""
    async with stream:
        try:
            while data := await stream.receive_some(RECV_SIZE):
                items, rest = parse_requests(rest + data if rest else data)
                for item in items:
                    if isinstance(item, int):
                        for chunk in zero_chunks(item):
                            await stream.send_all(chunk)
                    else:
                        await stream.send_all(item)
        except trio.BrokenResourceError:
            # The client reset the connection (the load generator does
            # that at the end of a run); an uncaught error here would take
            # the whole server down through serve_tcp's nursery.
            pass


async def serve(port: int, reuseport: bool = False) -> None:
    if reuseport:
        # open_tcp_listeners has no SO_REUSEPORT: bind by hand
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        listeners = [trio.SocketListener(sock)]
    else:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
    ready(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def main() -> None:
    args = parse_args(__doc__ or "", reuseport=True)
    raise_nofile_limit()
    trio.run(serve, args.port, args.reuseport)


if __name__ == "__main__":
    main()
