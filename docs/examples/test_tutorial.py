"""Tutorial step 7: the server's tests, on trio and asyncio.

Run them with ``.venv/bin/python -m pytest docs/examples/test_tutorial.py``.
"""

import ssl
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
import trio.testing
import trustme
from anyio.streams.tls import TLSStream
from tutorial2_reply import Shout, ask, read_to_eof
from tutorial3_listen import listen
from tutorial6_tls import TLSShout

import ds_trio
from ds_trio.testing import assert_no_leaks, drain_socket, fill_socket, socketpair

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _clean_ds_state():
    ds_trio.Reset()  # nothing left over from another test's pending state
    yield
    ds_trio.Reset()


@asynccontextmanager
async def shout_server():
    """A TLSShout server in a loop of its own; yields its address."""
    async with assert_no_leaks():  # fds, spill files, tasks, zombies
        listen_sock = listen()
        async with ds_trio.loop() as loop:  # errors="raise": a bug fails the test
            ds_trio.Listener(listen_sock, lambda sock, addr, ls: TLSShout(sock))
            yield listen_sock.getsockname()
            loop.stop()


async def wait_for(predicate):
    """Yield to the scheduler until ``predicate()`` holds (see the testing page)."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.lowlevel.checkpoint()


async def test_lines_are_answered_in_order():
    async with shout_server() as address, await anyio.connect_tcp(*address) as client:
        await client.send(b"a\nb\r\nc\nQUIT\n")
        assert await read_to_eof(client) == b"A\nB\nC\nBYE\n"


async def test_a_client_that_does_not_read_is_not_read_from():
    async with assert_no_leaks():
        a, b = socketpair()
        with b:
            async with ds_trio.loop():
                shout = Shout(a)
                fill_socket(a)  # as if the client had stopped reading
                b.send(b"hello\nworld\n")
                await wait_for(lambda: shout.wbuf)  # HELLO went to a spill file
                assert shout.rbuf == b"world\n"  # and world was left unread
                received = b""
                while not received.endswith(b"HELLO\nWORLD\n"):
                    await anyio.wait_readable(b)
                    received += drain_socket(b)  # reading lets it go on
                b.send(b"QUIT\n")
                await wait_for(lambda: shout.sock is None)


async def test_starttls_then_quit():
    ca = trustme.CA()
    TLSShout.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(TLSShout.context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with shout_server() as address:
        plain = await anyio.connect_tcp(*address)
        assert await ask(plain, b"STARTTLS\n") == b"OK begin TLS\n"
        async with await TLSStream.wrap(
            plain, hostname="localhost", ssl_context=client_context
        ) as client:
            assert await ask(client, b"STARTTLS\n") == b"ERR already TLS\n"
            await client.send(b"QUIT\n")
            assert await read_to_eof(client) == b"BYE\n"


@pytest.mark.parametrize(
    "anyio_backend",
    [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})],
    ids=["trio-mockclock"],
)
async def test_an_idle_client_expires_in_virtual_time():
    async with shout_server() as address, await anyio.connect_tcp(*address) as client:
        start = ds_trio.now()
        assert await ask(client, b"hi\n") == b"HI\n"
        assert await read_to_eof(client) == b""  # shut down by expire_old
        waited = ds_trio.now() - start  # virtual seconds
        assert TLSShout.EXPTIME <= waited <= TLSShout.EXPTIME + ds_trio.LATER_DELAY
