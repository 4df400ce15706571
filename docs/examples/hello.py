"""The index page's example: one DS object echoing over a socketpair."""

import socket

import anyio
import trio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class Echo(DS):
    def event_step(self):
        if not self.flush_write():  # output still queued: finish it first
            return
        buf = bytearray()
        while self.do_read(buf, 65536):  # 0: EAGAIN (re-armed) or EOF (closed)
            if not self.write(buf):  # queued: EPOLLOUT armed, or requeued
                return


async def main():
    a, b = socket.socketpair()
    async with ds_trio.loop():  # a task group; Echo gets a task in it
        Echo(a, EPOLLIN | EPOLLONESHOT)
        b.send(b"ping")
        await anyio.wait_readable(b)
        print(b.recv(100))  # b'ping'
        b.close()  # EOF: Echo closes itself, nothing is left, the loop ends


trio.run(main)
anyio.run(main, backend="asyncio")
