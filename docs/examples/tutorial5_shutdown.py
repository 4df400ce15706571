"""Tutorial step 5: graceful shutdown on SIGTERM, SIGQUIT or SIGINT."""

import os
import signal

import anyio
from tutorial2_reply import ask, read_to_eof
from tutorial3_listen import listen
from tutorial4_idle import IdleShout

import ds_trio


class PoliteShout(IdleShout):
    def busy(self):
        """Mid-line or with output unsent: graceful shutdown waits for us."""
        return bool(self.rbuf or self.wbuf)


async def run_server(listen_sock, *, task_status=anyio.TASK_STATUS_IGNORED):
    def on_signal(signum):
        ds_trio.graceful_shutdown(timeout=10)  # a second signal: stop at once

    signals = dict.fromkeys((signal.SIGTERM, signal.SIGQUIT, signal.SIGINT), on_signal)
    async with ds_trio.loop(errors="log", signals=signals):
        ds_trio.Listener(listen_sock, lambda sock, addr, ls: PoliteShout(sock))
        task_status.started()
    # The loop finished: no busy client was left.


async def main():
    listen_sock = listen()
    address = listen_sock.getsockname()
    async with anyio.create_task_group() as tg:
        await tg.start(run_server, listen_sock)
        idle = await anyio.connect_tcp(*address)
        busy = await anyio.connect_tcp(*address)
        assert await ask(idle, b"hi\n") == b"HI\n"
        assert await ask(busy, b"one\ntw") == b"ONE\n"  # b"tw" waits in rbuf
        os.kill(os.getpid(), signal.SIGTERM)
        print(await read_to_eof(idle))  # b'': idle, closed at once
        await busy.send(b"o\n")
        print(await read_to_eof(busy))  # b'TWO\n': finished, then closed
        await idle.aclose()
        await busy.aclose()


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
