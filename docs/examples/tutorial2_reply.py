"""Tutorial step 2: replying with write(), flush_write() first."""

import socket

import anyio
from anyio.abc import SocketStream

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT

MAX_LINE = 1024


class Shout(DS):
    """Answers each line in capitals; QUIT says BYE and shuts down."""

    def __init__(self, sock):
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)

    def event_step(self):
        if not self.flush_write() or self.sock is None:
            return  # output still queued: its wake-up is arranged
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while not (end := rbuf.find(b"\n") + 1):  # no complete line yet
            if len(rbuf) > MAX_LINE:
                self.drop("line too long")
                return
            if not self.do_read(rbuf, 4096, len(rbuf)):
                return  # EAGAIN (re-armed, partial line kept) or EOF (closed)
        line = bytes(rbuf[:end]).rstrip(b"\r\n")
        del rbuf[:end]
        self.rbuf_idle(rbuf)  # what follows the line waits for the next step
        if self.reply(line):
            self.requeue()  # answered at once: the next line in the next round

    def reply(self, line):
        """Answer one line; False when output is queued (or we closed)."""
        if line == b"QUIT":
            self.write(b"BYE\n")
            self.write(DS.shutdn)  # called once BYE has been sent
            return False
        return self.write(line.upper() + b"\n")


# -- a client, with anyio streams (the tutorial's later steps use it too) --


async def ask(stream, line):
    """Send one line and return the reply line."""
    await stream.send(line)
    reply = b""
    while not reply.endswith(b"\n"):
        reply += await stream.receive()
    return reply


async def read_to_eof(stream):
    received = b""
    try:
        while True:
            received += await stream.receive()
    except anyio.EndOfStream:
        return received


async def main():
    a, b = socket.socketpair()
    async with ds_trio.loop(), await SocketStream.from_socket(b) as client:
        Shout(a)
        assert await ask(client, b"hello\n") == b"HELLO\n"
        await client.send(b"one\ntwo\nQUIT\n")  # pipelined: a line per step
        print(await read_to_eof(client))  # b'ONE\nTWO\nBYE\n'


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
