"""Tutorial step 1: a DS object that reads lines into rbuf."""

import socket

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT

MAX_LINE = 1024


class LineReader(DS):
    def __init__(self, sock):
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.lines = []

    def event_step(self):
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, 4096, len(rbuf)):  # append at the end
            while end := rbuf.find(b"\n") + 1:
                self.lines.append(bytes(rbuf[: end - 1]))
                del rbuf[:end]
            if len(rbuf) > MAX_LINE:
                self.drop("line too long")  # one WARNING, then close
                return
        # do_read returned 0: on EAGAIN it re-armed EPOLLIN|EPOLLONESHOT and
        # kept the partial line in self.rbuf; on EOF it closed the object.


async def main():
    a, b = socket.socketpair()
    async with ds_trio.loop():
        reader = LineReader(a)
        b.send(b"hello\nwor")
        await anyio.sleep(0.1)  # the reader keeps b"wor" in its rbuf
        assert reader.rbuf == b"wor"
        b.send(b"ld\n")
        b.close()  # EOF: the reader closes itself, and the loop finishes
    print(reader.lines)  # [b'hello', b'world']


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
