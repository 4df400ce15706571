"""Tutorial step 3: a Listener, and the loop that runs it."""

import socket

import anyio
from tutorial2_reply import Shout, ask, read_to_eof

import ds_trio


def post_accept(sock, addr, listen_sock):
    """Called by the Listener for each new (non-blocking) connection."""
    Shout(sock)


def listen(port=0):
    listen_sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    listen_sock.setblocking(False)
    return listen_sock


async def main():
    listen_sock = listen()
    async with ds_trio.loop(errors="log") as loop:  # a broken client is logged
        ds_trio.Listener(listen_sock, post_accept)
        host, port = listen_sock.getsockname()
        async with await anyio.connect_tcp(host, port) as client:
            assert await ask(client, b"hello\n") == b"HELLO\n"
            await client.send(b"QUIT\n")
            print(await read_to_eof(client))  # b'BYE\n'
        loop.stop()  # the listener would keep the loop running forever


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
