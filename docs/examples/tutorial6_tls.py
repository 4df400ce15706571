"""Tutorial step 6: STARTTLS (needs trustme for a demo certificate)."""

import ssl

import anyio
import trustme
from anyio.streams.tls import TLSStream
from tutorial2_reply import ask, read_to_eof
from tutorial3_listen import listen
from tutorial5_shutdown import PoliteShout

import ds_trio


class TLSShout(PoliteShout):
    context = None  # the server's ssl.SSLContext

    def reply(self, line):
        if line != b"STARTTLS":
            return super().reply(line)
        if isinstance(self.sock, ssl.SSLSocket):
            return self.write(b"ERR already TLS\n")
        self.write(b"OK begin TLS\n")
        self.write(TLSShout.upgrade)  # runs once the OK went out in plaintext
        return False

    def upgrade(self):
        self.rbuf = None  # plaintext sent after STARTTLS is discarded
        if self.starttls(self.context):  # same object, same fd, now TLS
            self.requeue()  # the handshake completed at once: go on


async def main():
    ca = trustme.CA()
    TLSShout.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(TLSShout.context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    listen_sock = listen()
    async with ds_trio.loop(errors="log") as loop:
        ds_trio.Listener(listen_sock, lambda sock, addr, ls: TLSShout(sock))
        plain = await anyio.connect_tcp(*listen_sock.getsockname())
        assert await ask(plain, b"STARTTLS\n") == b"OK begin TLS\n"
        async with await TLSStream.wrap(
            plain, hostname="localhost", ssl_context=client_context
        ) as client:
            assert await ask(client, b"secret\n") == b"SECRET\n"
            await client.send(b"QUIT\n")
            print(await read_to_eof(client))  # b'BYE\n', then close_notify
        loop.stop()


if __name__ == "__main__":
    anyio.run(main, backend="trio")
    anyio.run(main, backend="asyncio")
