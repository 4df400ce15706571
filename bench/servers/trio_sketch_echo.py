"""Bench echo server: the floor of one task per connection on trio.

No DS, no streams: each connection's task waits with
``trio.lowlevel.wait_readable``, reads, answers with a non-blocking
``send`` and waits again.  What a task-per-object design cannot go below
on trio (one epoll_ctl and one task switch per request).

Usage: ``python bench/servers/trio_sketch_echo.py PORT``
"""

from __future__ import annotations

import socket

import trio
from _common import (
    RECV_SIZE,
    parse_args,
    parse_requests,
    raise_nofile_limit,
    ready,
    zero_chunks,
)


async def handle(sock: socket.socket) -> None:
    rest = b""
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    try:
        while True:
            await wait_readable(sock)
            data = sock.recv(RECV_SIZE)
            if not data:
                return
            items, rest = parse_requests(rest + data if rest else data)
            for item in items:
                chunks = (
                    zero_chunks(item) if isinstance(item, int) else (memoryview(item),)
                )
                for chunk in chunks:
                    while chunk:
                        try:
                            chunk = chunk[sock.send(chunk) :]
                        except BlockingIOError:
                            await wait_writable(sock)
    except OSError:
        pass
    finally:
        sock.close()


async def serve(port: int) -> None:
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    ready(lsock.getsockname()[1])
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(lsock)
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, conn)


def main() -> None:
    args = parse_args(__doc__ or "")
    raise_nofile_limit()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
