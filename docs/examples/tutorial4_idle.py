"""Tutorial step 4: idle clients expire."""

import anyio
from tutorial2_reply import Shout, ask, read_to_eof
from tutorial3_listen import listen

import ds_trio


class IdleShout(Shout):
    EXPTIME = 180  # seconds of silence before expire_old() shuts us down

    def __init__(self, sock):
        super().__init__(sock)
        self.update_idle_time()  # tracked from the start

    def event_step(self):
        self.update_idle_time()  # every wake-up is activity
        super().event_step()


async def main():
    listen_sock = listen()
    async with ds_trio.loop(errors="log", exptime=0.2) as loop:  # 0.2 s, to see it
        ds_trio.Listener(listen_sock, lambda sock, addr, ls: IdleShout(sock))
        async with await anyio.connect_tcp(*listen_sock.getsockname()) as client:
            assert await ask(client, b"hello\n") == b"HELLO\n"
            await anyio.sleep(0.3)  # silence, longer than exptime
            ds_trio.expire_old()  # a server leaves this to later(): <= 60 s
            print(await read_to_eof(client))  # b'': shut down
        loop.stop()


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
