"""TLS on DS objects: handshake and shutdown steps, the pending() trap, STARTTLS.

Servers are DS subclasses following the seed's protocol pattern: implicit TLS
starts the handshake in ``__init__`` (``starttls``), STARTTLS upgrades in
``event_step``, and every ``event_step`` begins with ``flush_write()``, which
drives the handshake step queued at the head of ``wbuf``.  Clients run in the
test's body on the same event loop: anyio TLS streams, or ``BioClient`` (an
``ssl.MemoryBIO`` client over a raw stream) where the test must see or forge
raw bytes.  Certificates come from trustme.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import socket
import ssl
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trio
import trio.testing
import trustme
from anyio.streams.tls import TLSStream

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio._wbuf import spill_entry_count
from ds_trio.testing import assert_no_leaks, socketpair

from .helpers import ReceiveMore, reserve_libuv_emfile_fd, wait_for

pytestmark = pytest.mark.anyio

MiB = 1 << 20
HOST = "127.0.0.1"
IN_ONESHOT = int(EPOLLIN | EPOLLONESHOT)
OUT_ONESHOT = int(EPOLLOUT | EPOLLONESHOT)

MOCK_TRIO = [
    pytest.param(
        ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
        id="trio-mockclock",
    ),
]


# ----------------------------------------------------------------------
# Certificates
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(server, client)


# ----------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------


class Echo(DS):
    """Implicit TLS echo: flush_write, then do_read until 0, then write.

    ``read_len`` is the size of each ``do_read``; with ``reads_per_step``
    the object reads at most that many times per step and waits for
    readability again (fairness), leaving decrypted bytes in OpenSSL's
    buffer: the ``pending()`` trap.  ``write_piece`` splits the echo into
    several writes of at most that size (None: one write per step).
    """

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        read_len: int = 65536,
        reads_per_step: int | None = None,
        write_piece: int | None = None,
        greeting: bytes = b"",
    ) -> None:
        super().__init__(sock, IN_ONESHOT)
        self.read_len = read_len
        self.reads_per_step = reads_per_step
        self.write_piece = write_piece
        self.max_pending = 0
        self.handshake_done = self.starttls(ctx)
        if greeting:
            # Server-first protocols queue their greeting behind the
            # handshake step (the seed's wbuf = [accept_tls_step, greet]).
            self.write(greeting)

    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        buf = bytearray()
        reads = 0
        limit = self.reads_per_step
        while self.do_read(buf, self.read_len, len(buf)):
            self.max_pending = max(self.max_pending, self.sock.pending())
            reads += 1
            if limit is not None and reads >= limit:
                break
        if buf and not write_pieces(self, buf, self.write_piece):
            return  # queued: write() arranged the wake-up
        if self.sock is not None and limit is not None and reads >= limit:
            self.epwait(IN_ONESHOT)  # more may be pending: wait (not spin)


def write_pieces(obj: DS, data: bytes | bytearray, piece: int | None) -> bool:
    """``obj.write(data)`` in pieces of at most ``piece`` bytes."""
    if piece is None:
        return obj.write(data)
    done = True
    for start in range(0, len(data), piece):
        done = obj.write(data[start : start + piece])
    return done


class LineServer(DS):
    """A line protocol: STARTTLS, QUIT, SEND; other lines echo back.

    ``SEND <n> [<piece>]`` answers ``payload(n)`` in one write, or in
    writes of ``piece`` bytes, then ``END``.  ``BURST <seed>`` writes
    random blocks of up to 64 KiB until one is queued (the socket is full),
    recording them in ``sent``.

    Plaintext pipelined after ``STARTTLS`` is discarded (recorded in
    ``discarded``), as RFC 3207 §4.2 asks of the protocol.

    Its payloads are mutable copies and none stays in memory, so whatever
    the socket does not take goes through a spill file (pread + SSL_write);
    :class:`HeldLineServer` queues immutable payloads by reference instead.
    """

    WBUF_MEMORY_MAX = 0
    held_payloads: ClassVar[bool] = False

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        implicit_tls: bool = False,
        read_len: int = 65536,
    ) -> None:
        super().__init__(sock, IN_ONESHOT)
        self.ctx = ctx
        self.read_len = read_len
        self.lines: list[bytes] = []
        self.discarded = bytearray()
        self.sent = bytearray()
        self.shutdn_results: list[bool | None] = []
        if implicit_tls:
            self.starttls(ctx)

    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        self.rbuf = None
        while self.sock is not None:
            end = rbuf.find(b"\n") + 1
            if not end:
                if not self.do_read(rbuf, self.read_len, len(rbuf)):
                    return  # EAGAIN (rbuf kept by do_read) or closed
                continue
            line = bytes(rbuf[:end])
            del rbuf[:end]
            self.lines.append(line)
            if not self.handle(line, rbuf):
                if rbuf and self.sock is not None:
                    self.rbuf = rbuf
                return

    def handle(self, line: bytes, rbuf: bytearray) -> bool:
        """Act on one line; False stops reading in this step."""
        if line == b"STARTTLS\n":
            try:
                self.starttls(self.ctx)
            except ValueError:
                return self.write(b"ERR already TLS\n")
            # Plaintext that came after the command is not TLS: drop it.
            self.discarded += rbuf
            rbuf.clear()
            return False
        if line == b"QUIT\n":
            self.write(b"BYE\n")
            self.shutdn_results.append(self.shutdn())
            return False
        if line.startswith(b"SEND "):
            n, *piece = map(int, line[5:].split())
            data = payload(n)
            body = data if self.held_payloads else bytearray(data)
            write_pieces(self, body, piece[0] if piece else None)
            return self.write(b"END\n")
        if line.startswith(b"BURST "):
            rng = random.Random(int(line[6:]))
            while True:
                block = rng.randbytes(rng.randint(1, 65536))
                self.sent += block
                if not self.write(block):
                    return False
        return self.write(line)


class StartTLSLineServer(LineServer):
    """Replies ``OK`` in plaintext before switching to TLS."""

    def handle(self, line: bytes, rbuf: bytearray) -> bool:
        if line == b"STARTTLS\n" and not _is_tls(self):
            self.write(b"OK\n")
        return super().handle(line, rbuf)


def _is_tls(obj: DS) -> bool:
    return isinstance(obj.sock, ssl.SSLSocket)


class Acceptor(DS):
    """Level-triggered listener; keeps every object it created."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[socket.socket], DS],
        sndbuf: int | None = None,
    ) -> None:
        super().__init__(sock, EPOLLIN)
        self.factory = factory
        self.sndbuf = sndbuf
        self.accepted: list[Any] = []

    def event_step(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            if self.sndbuf is not None:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.accepted.append(self.factory(conn))


@dataclass
class Server:
    loop: ds_trio.Loop
    acceptor: Acceptor
    port: int

    def obj(self, index: int) -> Any:
        return self.acceptor.accepted[index]


@asynccontextmanager
async def serving(
    factory: Callable[[socket.socket], DS],
    *,
    sndbuf: int | None = None,
) -> AsyncIterator[Server]:
    """A loop with a listener; stopped (everything closed) when the block ends."""
    listener = socket.create_server((HOST, 0), backlog=1024)
    async with ds_trio.loop() as loop:
        acceptor = Acceptor(listener, factory, sndbuf)
        yield Server(loop, acceptor, listener.getsockname()[1])
        loop.stop()


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def unread(sock: Any) -> int:
    """Bytes the kernel holds for ``sock`` that nobody has read yet."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def mid_handshake(obj: DS) -> bool:
    """The object is alive and its handshake step waits at the head of wbuf."""
    return obj.sock is not None and head_step(obj) == "accept_tls_step"


def head_step(obj: DS) -> str:
    """The name of the callable at the head of the object's wbuf, or ""."""
    queue = obj.wbuf
    if not queue:
        return ""
    return str(getattr(queue[0], "__name__", ""))


def settled_mid_handshake(obj: DS) -> Callable[[], bool]:
    """Predicate: all the client sent was consumed, the handshake waits."""
    return lambda: mid_handshake(obj) and unread(obj.sock) == 0


def tls_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ds_trio.tls"]


# ----------------------------------------------------------------------
# Clients
# ----------------------------------------------------------------------


async def tls_connect(port: int, ctx: ssl.SSLContext) -> TLSStream:
    return await anyio.connect_tcp(
        HOST,
        port,
        ssl_context=ctx,
        tls_hostname="localhost",
        tls_standard_compatible=False,
    )


async def receive_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await stream.receive(n - len(got))
    return bytes(got)


class BioClient(ReceiveMore):
    """A TLS client over ``ssl.MemoryBIO``: the test sees every raw byte.

    It can produce its ClientHello without sending it, send raw bytes
    (garbage) beside the TLS stream, and tells a clean close_notify from a
    bare EOF.
    """

    def __init__(self, stream: anyio.abc.SocketStream, ctx: ssl.SSLContext) -> None:
        self.stream = stream
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        #: "close_notify" or "eof" once the server's end was seen.
        self.eof: str | None = None

    @classmethod
    async def connect(
        cls, port: int, ctx: ssl.SSLContext, *, rcvbuf: int | None = None
    ) -> BioClient:
        stream = await anyio.connect_tcp(HOST, port)
        if rcvbuf is not None:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return cls(stream, ctx)

    @property
    def raw(self) -> socket.socket:
        return self.stream.extra(anyio.abc.SocketAttribute.raw_socket)

    def client_hello(self) -> bytes:
        """Start the handshake; return the ClientHello bytes, unsent."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def expect_plain(self, prefix: bytes) -> None:
        """Read plaintext ``prefix``; what follows it is fed to TLS."""
        got = bytearray()
        while len(got) < len(prefix):
            got += await self.stream.receive()
        assert bytes(got[: len(prefix)]) == prefix
        self.incoming.write(bytes(got[len(prefix) :]))

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.stream.send(data)

    async def _pull(self) -> None:
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            self.incoming.write_eof()
        else:
            self.incoming.write(data)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        while True:
            try:
                result = fn(*args)
            except ssl.SSLWantReadError:
                await self.flush()
                await self._pull()
            else:
                await self.flush()
                return result

    async def handshake(self) -> None:
        await self._call(self.tls.do_handshake)

    async def send(self, data: bytes) -> None:
        await self._call(self.tls.write, data)

    async def recv(self, n: int = 65536) -> bytes:
        """Up to ``n`` decrypted bytes; b"" at the end (see ``eof``)."""
        if self.eof is not None:
            return b""
        try:
            data: bytes = await self._call(self.tls.read, n)
        except ssl.SSLZeroReturnError:
            data = b""
        except (ssl.SSLEOFError, ssl.SSLSyscallError):
            self.eof = "eof"
            return b""
        if not data:
            self.eof = "close_notify"
        return data

    async def raw_eof(self) -> bool:
        """True once the raw stream ends (EOF or reset), after draining it."""
        try:
            while await self.stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
        return False  # pragma: no cover - receive() never returns b""

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> BioClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def plain_eof(stream: anyio.abc.ByteReceiveStream) -> bytes:
    """Read until the server closes (EOF or reset); return what came."""
    got = bytearray()
    try:
        while True:
            got += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return bytes(got)


# ----------------------------------------------------------------------
# 1. Echo: big writes through a slow reader, tiny reads (pending() trap)
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "write_piece",
    [
        # One write of up to megabytes per step: OpenSSL commits records
        # until the socket is full, and the failed SSL_write must be
        # retried with at least as many bytes (regression: BAD_LENGTH).
        pytest.param(None, id="one-write-per-step"),
        pytest.param(16384, id="16k-writes"),
    ],
)
async def test_echo_of_multi_megabyte_writes_through_a_slow_reader_is_byte_exact(
    certs: Certs, write_piece: int | None
) -> None:
    rng = random.Random(20250101)
    sizes = [1, 5, 4096, 16385, 65537, 300_001, 1 * MiB + 3, 3 * MiB + 1]
    sizes += [rng.randint(1, 2 * MiB) for _ in range(2)]
    rng.shuffle(sizes)
    chunks = [rng.randbytes(n) for n in sizes]
    sent = b"".join(chunks)
    received = bytearray()

    def factory(conn: socket.socket) -> DS:
        return Echo(conn, certs.server, write_piece=write_piece)

    async with (
        serving(factory) as srv,
        await tls_connect(srv.port, certs.client) as client,
    ):

        async def writer() -> None:
            for chunk in chunks:
                await client.send(chunk)

        async def slow_reader() -> None:
            while len(received) < len(sent):
                received.extend(await client.receive(rng.randint(1, 16384)))
                for _ in range(rng.randint(0, 3)):
                    await anyio.lowlevel.checkpoint()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                tg.start_soon(slow_reader)
        assert srv.obj(0).sock is not None  # the server never gave up
        # The reader was slow enough for output to wait in spill files.
        assert srv.loop.statistics().bytes_spilled > 0
    assert len(received) == len(sent)
    assert bytes(received) == sent


@pytest.mark.parametrize("read_len", [1, 5, 1000])
async def test_tiny_reads_with_decrypted_bytes_pending_do_not_stall(
    certs: Certs, read_len: int
) -> None:
    # One do_read per step: the rest of each TLS record stays decrypted in
    # OpenSSL's buffer, where it never makes the fd readable.  The client
    # waits for each echo before sending more, so a wait on the fd alone
    # would hang with the bytes still pending.
    sizes = [11, 1, 100, 3000] + ([16385] if read_len > 1 else [])
    messages = [payload(n, seed=n) for n in sizes]

    def factory(conn: socket.socket) -> DS:
        return Echo(conn, certs.server, read_len=read_len, reads_per_step=1)

    async with serving(factory) as srv:
        async with await tls_connect(srv.port, certs.client) as client:
            with anyio.fail_after(20):
                for message in messages:
                    await client.send(message)
                    assert await receive_exactly(client, len(message)) == message
        assert srv.obj(0).max_pending > 0  # the trap was really set


# ----------------------------------------------------------------------
# 2. A stalled handshake blocks nobody
# ----------------------------------------------------------------------


async def test_200_handshakes_complete_while_stalled_clients_hold_theirs(
    certs: Certs,
) -> None:
    async with (
        serving(lambda c: Echo(c, certs.server)) as srv,
        await anyio.connect_tcp(HOST, srv.port),  # connects, never speaks
        await BioClient.connect(srv.port, certs.client) as stalled,
    ):
        hello = stalled.client_hello()
        await stalled.stream.send(hello[: len(hello) // 2])
        await wait_for(lambda: len(srv.acceptor.accepted) == 2)
        silent, slow = srv.obj(0), srv.obj(1)
        # The half ClientHello is in OpenSSL's hands, the handshake waits.
        await wait_for(settled_mid_handshake(slow))
        assert mid_handshake(silent)
        assert slow.handshake_done is False  # starttls() could not finish
        assert slow.epbit(OUT_ONESHOT) == IN_ONESHOT  # TLS wants to read

        echoed: dict[int, bool] = {}

        async def client(i: int) -> None:
            message = f"client {i}\n".encode() * (i % 7 + 1)
            async with await tls_connect(srv.port, certs.client) as stream:
                await stream.send(message)
                echoed[i] = await receive_exactly(stream, len(message)) == message

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(client, i)
        assert len(echoed) == 200
        assert all(echoed.values())
        assert mid_handshake(slow)  # still waiting, untouched
        assert mid_handshake(silent)

        # Finally the slow client finishes (t/httpd-https.t) and is served.
        await stalled.stream.send(hello[len(hello) // 2 :])
        with anyio.fail_after(10):
            await stalled.handshake()
            await stalled.send(b"late\n")
            assert await stalled.recv_exactly(5) == b"late\n"


# ----------------------------------------------------------------------
# 3. STARTTLS
# ----------------------------------------------------------------------


async def start_tls(stream: anyio.abc.SocketStream, ctx: ssl.SSLContext) -> TLSStream:
    return await TLSStream.wrap(
        stream, hostname="localhost", ssl_context=ctx, standard_compatible=False
    )


async def test_starttls_upgrades_in_place_and_lines_echo_byte_exact(
    certs: Certs,
) -> None:
    lines = [b"one\n", b"\n", payload(100_000).replace(b"\n", b"") + b"\n", b"x\n"]
    async with (
        serving(lambda c: StartTLSLineServer(c, certs.server)) as srv,
        await anyio.connect_tcp(HOST, srv.port) as stream,
    ):
        await stream.send(b"plain\n")
        assert await receive_exactly(stream, 6) == b"plain\n"
        await stream.send(b"STARTTLS\n")
        assert await receive_exactly(stream, 3) == b"OK\n"
        obj = srv.obj(0)
        fd = obj.sock.fileno()
        async with await start_tls(stream, certs.client) as tls:
            # Same object, same fd, now TLS.
            assert isinstance(obj.sock, ssl.SSLSocket)
            assert obj.sock.fileno() == fd
            with anyio.fail_after(10):
                for line in lines:
                    await tls.send(line)
                    assert await receive_exactly(tls, len(line)) == line
                # A second STARTTLS over TLS is refused (RFC 4642: 502).
                await tls.send(b"STARTTLS\n")
                assert await receive_exactly(tls, 16) == b"ERR already TLS\n"
            assert obj.wbuf is None  # the handshake step is done and gone
        assert obj.discarded == b""


async def test_starttls_discards_pipelined_plaintext_and_tls_loses_nothing(
    certs: Certs,
) -> None:
    junk = b"EHLO pipelined\nMAIL FROM:<x>\npartial"
    lines = [b"after tls\n", payload(70_000, seed=3).replace(b"\n", b"") + b"\n"]
    async with (
        serving(lambda c: StartTLSLineServer(c, certs.server)) as srv,
        await anyio.connect_tcp(HOST, srv.port) as stream,
    ):
        await stream.send(b"STARTTLS\n" + junk)  # one send: one segment
        assert await receive_exactly(stream, 3) == b"OK\n"
        async with await start_tls(stream, certs.client) as tls:
            with anyio.fail_after(10):
                for line in lines:
                    await tls.send(line)
                    assert await receive_exactly(tls, len(line)) == line
        obj = srv.obj(0)
        # The protocol saw the pipelined plaintext exactly once and dropped
        # it; none of it was executed or fed to TLS.
        assert bytes(obj.discarded) == junk
        assert obj.lines == [b"STARTTLS\n", *lines]


async def test_starttls_with_client_hello_pipelined_hands_tls_exactly_the_rest(
    certs: Certs,
) -> None:
    # The server reads one byte at a time, so the ClientHello sent in the
    # same segment as the command is still in the kernel when the socket is
    # wrapped: the TLS layer must receive exactly those bytes - none lost,
    # none read twice - or the handshake fails.
    def factory(conn: socket.socket) -> DS:
        return StartTLSLineServer(conn, certs.server, read_len=1)

    lines = [b"hello over tls\n", payload(3000, 9).replace(b"\n", b"") + b"\n"]
    async with (
        serving(factory) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        await client.stream.send(b"STARTTLS\n" + client.client_hello())
        with anyio.fail_after(10):
            await client.expect_plain(b"OK\n")
            await client.handshake()
            for line in lines:
                await client.send(line)
                assert await client.recv_exactly(len(line)) == line
        obj = srv.obj(0)
        assert obj.discarded == b""
        assert obj.lines == [b"STARTTLS\n", *lines]


async def test_starttls_on_a_tls_object_raises_value_error(certs: Certs) -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = LineServer(a, certs.server, implicit_tls=True)
            assert mid_handshake(obj)
            with pytest.raises(ValueError, match="already"):
                obj.starttls(certs.server)
            obj.close()
    finally:
        b.close()


# ----------------------------------------------------------------------
# 4. Faults close only the faulty client
# ----------------------------------------------------------------------


@asynccontextmanager
async def bystander_checked(
    srv: Server, certs: Certs, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[None]:
    """A healthy TLS client before and after the fault; checks isolation.

    The faulty client must be the second connection (object index 1).
    """
    async with await tls_connect(srv.port, certs.client) as good:
        await good.send(b"before\n")
        assert await receive_exactly(good, 7) == b"before\n"
        caplog.clear()
        yield
        faulty = srv.obj(1)
        await wait_for(lambda: faulty.sock is None)
        assert len(tls_records(caplog)) <= 1
        assert not [
            r
            for r in caplog.records
            if r.name.startswith("ds_trio") and r.levelno >= logging.WARNING
        ]
        # The bystander and a newcomer are served as before.
        await good.send(b"after\n")
        assert await receive_exactly(good, 6) == b"after\n"
        assert srv.obj(0).sock is not None
    async with await tls_connect(srv.port, certs.client) as newcomer:
        await newcomer.send(b"new\n")
        assert await receive_exactly(newcomer, 4) == b"new\n"


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="plaintext-http"),
        pytest.param(b"STARTTLS\r\n", id="plaintext-line"),
        pytest.param(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff", id="bad-hello"),
        pytest.param(payload(3000, seed=7), id="random-bytes"),
    ],
)
async def test_plaintext_or_garbage_to_the_tls_port_closes_only_that_client(
    certs: Certs, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    async with (
        serving(lambda c: Echo(c, certs.server)) as srv,
        bystander_checked(srv, certs, caplog),
        await anyio.connect_tcp(HOST, srv.port) as stream,
    ):
        await stream.send(garbage)
        with anyio.fail_after(10):
            reply = await plain_eof(stream)
        # At most a TLS alert record, never an echo of the plaintext.
        assert garbage not in reply


async def test_garbage_mid_session_closes_only_that_client(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        serving(lambda c: Echo(c, certs.server)) as srv,
        bystander_checked(srv, certs, caplog),
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        with anyio.fail_after(10):
            await client.handshake()
            await client.send(b"fine\n")
            assert await client.recv_exactly(5) == b"fine\n"
            # Raw bytes beside the TLS stream: a record header with bytes
            # not encrypted under the session's keys.
            await client.stream.send(b"\x17\x03\x03\x00\x20" + b"x" * 32)
            assert await client.raw_eof()


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_client_vanishing_mid_handshake_closes_only_that_client(
    certs: Certs, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    async with (
        serving(lambda c: Echo(c, certs.server)) as srv,
        bystander_checked(srv, certs, caplog),
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        hello = client.client_hello()
        await client.stream.send(hello[: len(hello) // 2])
        await wait_for(lambda: len(srv.acceptor.accepted) == 2)
        half = srv.obj(1)
        await wait_for(settled_mid_handshake(half))
        if how == "rst":
            client.raw.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"
            )
        await client.aclose()  # vanishes; the bystander check follows


# ----------------------------------------------------------------------
# 5. Shutdown
# ----------------------------------------------------------------------


class PatientLineServer(LineServer):
    """No timeout can close it: only the fast shutdown itself."""

    TLS_SHUTDOWN_TIMEOUT = 1e6


class HeldLineServer(LineServer):
    """LineServer whose payloads are ``bytes``: queued by reference, no spill."""

    WBUF_MEMORY_MAX = DS.WBUF_MEMORY_MAX
    held_payloads = True


class BoundedLineServer(LineServer):
    TLS_SHUTDOWN_TIMEOUT = 7.0


async def test_shutdn_sends_close_notify_and_closes_without_waiting_for_the_peer(
    certs: Certs,
) -> None:
    def factory(conn: socket.socket) -> DS:
        return PatientLineServer(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        with anyio.fail_after(10):
            await client.handshake()
            await client.send(b"QUIT\n")
            obj = srv.obj(0)
            # Closed while the client has read nothing and will never send
            # its own close_notify.
            await wait_for(lambda: obj.sock is None)
            assert obj.shutdn_results == [False]  # what close() returns
            assert obj.shutdn() is None  # already closed
            assert await client.recv_until_eof() == b"BYE\n"
            assert client.eof == "close_notify"
            assert await client.raw_eof()  # and the fd is really closed


@pytest.mark.parametrize("anyio_backend", MOCK_TRIO)
async def test_loop_ends_at_once_after_the_last_tls_client_shut_down(
    certs: Certs,
) -> None:
    # With no post-loop callback a loop ends when nothing is left that could
    # ever run; a TLS shutdown that already closed its object is nothing.
    a, b = socketpair()
    stream = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with BioClient(stream, certs.client) as client:
        async with ds_trio.loop():
            obj = LineServer(a, certs.server, implicit_tls=True)
            with anyio.fail_after(10):
                await client.handshake()
                await client.send(b"QUIT\n")
                assert await client.recv_until_eof() == b"BYE\n"
            assert obj.sock is None
            closed_at = trio.current_time()
        assert trio.current_time() - closed_at < DS.TLS_SHUTDOWN_TIMEOUT


async def test_shutdn_mid_handshake_closes_at_once(certs: Certs) -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = LineServer(a, certs.server, implicit_tls=True)
            assert mid_handshake(obj)
            assert obj.shutdn() is False
            assert obj.sock is None
            assert obj.wbuf is None
            loop.stop()
    finally:
        b.close()


@pytest.mark.parametrize("anyio_backend", MOCK_TRIO)
async def test_tls_shutdown_to_a_peer_that_never_reads_ends_after_the_timeout(
    certs: Certs,
) -> None:
    timeout = BoundedLineServer.TLS_SHUTDOWN_TIMEOUT

    def factory(conn: socket.socket) -> DS:
        return BoundedLineServer(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory, sndbuf=4096) as srv,
        await BioClient.connect(srv.port, certs.client, rcvbuf=4096) as client,
    ):
        await client.handshake()
        await client.send(b"SEND 2000000\n")  # and never read again
        obj = srv.obj(0)
        await wait_for(lambda: spill_entry_count(obj.wbuf) > 0)
        await anyio.wait_all_tasks_blocked()
        # Stuck: the peer's buffers are full and TLS waits to write.
        assert spill_entry_count(obj.wbuf) > 0
        assert obj.epbit(IN_ONESHOT) == OUT_ONESHOT
        # close_notify cannot be sent: the step waits at the head of wbuf.
        assert obj.shutdn() is False
        assert obj.sock is not None
        assert head_step(obj) == "shutdn_tls_step"
        assert obj.epbit(IN_ONESHOT) == OUT_ONESHOT
        await anyio.sleep(timeout - 0.5)
        assert obj.sock is not None  # still trying, within the bound
        assert head_step(obj) == "shutdn_tls_step"
        await anyio.sleep(1)
        assert obj.sock is None  # closed by the bound


class QueuedQuitLineServer(PatientLineServer):
    """``SENDQUIT <n>``: ``payload(n)``, then ``shutdn`` queued behind it."""

    def handle(self, line: bytes, rbuf: bytearray) -> bool:
        if line.startswith(b"SENDQUIT "):
            self.write(bytearray(payload(int(line[9:]))))
            self.shutdn_results.append(self.write(DS.shutdn))
            return False
        return super().handle(line, rbuf)


async def test_shutdn_queued_behind_output_runs_after_it_then_sends_close_notify(
    certs: Certs,
) -> None:
    # Seed pattern (docs: "Queue the shutdown behind it"): the shutdown is
    # a callable in wbuf, run by flush_write once every byte queued before
    # it went out; its TLS step then sends close_notify and closes.
    n = 2 * MiB

    def factory(conn: socket.socket) -> DS:
        return QueuedQuitLineServer(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory, sndbuf=65536) as srv,
        await BioClient.connect(srv.port, certs.client, rcvbuf=65536) as client,
    ):
        with anyio.fail_after(20):
            await client.handshake()
            await client.send(b"SENDQUIT %d\n" % n)
            obj = srv.obj(0)
            await wait_for(lambda: obj.shutdn_results != [])
            assert obj.shutdn_results == [False]  # queued, not run
            assert obj.sock is not None
            assert obj.wbuf is not None
            assert obj.wbuf[-1] is DS.shutdn  # behind the output
            assert spill_entry_count(obj.wbuf) == 1
            assert await client.recv_until_eof() == payload(n)
            assert client.eof == "close_notify"
            await wait_for(lambda: obj.sock is None)
            assert obj.wbuf is None


class GreetingCallableEcho(Echo):
    """Implicit TLS whose greeting is a callable queued behind the handshake.

    The seed's NNTP/IMAP objects start with ``wbuf = [accept_tls_step,
    greet]``: ``greet`` must run only once the handshake is complete, and
    never if it fails.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        super().__init__(sock, ctx)
        self.greeted: list[bool] = []
        self.write(self.greet)

    @staticmethod
    def greet(obj: DS) -> None:
        assert isinstance(obj, GreetingCallableEcho)
        obj.greeted.append(obj.handshake_complete())
        obj.write(b"* OK ready\n")

    def handshake_complete(self) -> bool:
        sock = self.sock
        return isinstance(sock, ssl.SSLSocket) and sock.version() is not None


async def test_callable_queued_behind_a_stalled_handshake_runs_only_after_it(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        serving(lambda c: GreetingCallableEcho(c, certs.server)) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
        await anyio.connect_tcp(HOST, srv.port) as garbage,
    ):
        hello = client.client_hello()
        await client.stream.send(hello[: len(hello) // 2])
        await wait_for(lambda: len(srv.acceptor.accepted) == 2)
        slow, bad = srv.obj(0), srv.obj(1)
        await wait_for(settled_mid_handshake(slow))
        assert [head_step(slow), len(slow.wbuf or ())] == ["accept_tls_step", 2]
        assert slow.greeted == []
        # A failed handshake closes that client: its queued greeting never
        # runs (close discards the queue), and nothing is written.
        await garbage.send(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff")
        with anyio.fail_after(10):
            assert b"OK ready" not in await plain_eof(garbage)
        assert bad.sock is None
        assert bad.greeted == []
        assert mid_handshake(slow)  # untouched
        assert slow.greeted == []
        await client.stream.send(hello[len(hello) // 2 :])
        with anyio.fail_after(10):
            await client.handshake()
            assert await client.recv_exactly(11) == b"* OK ready\n"
        assert slow.greeted == [True]
        await client.send(b"echo\n")
        with anyio.fail_after(10):
            assert await client.recv_exactly(5) == b"echo\n"


class Idle(DS):
    def event_step(self) -> None:
        pass


async def test_epbit_on_a_plain_socket_returns_its_argument() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Idle(a, IN_ONESHOT)
            for mask in (EPOLLIN, EPOLLOUT, IN_ONESHOT, OUT_ONESHOT, 0):
                assert obj.epbit(int(mask)) == int(mask)
            loop.stop()
    finally:
        b.close()


def _want_read(*_args: object) -> int:
    raise ssl.SSLWantReadError("The operation did not complete (read)")


def _want_write(*_args: object) -> int:
    raise ssl.SSLWantWriteError("The operation did not complete (write)")


async def test_tls_write_and_read_wait_for_the_direction_openssl_asks_for(
    certs: Certs,
) -> None:
    # The seed's epbit(): a TLS write may have to read first (renegotiation,
    # a key update) and a TLS read to write first.  write, flush_write and
    # do_read arm the direction OpenSSL asked for, not their own; stock
    # OpenSSL cannot be made to ask on demand, so the SSLSocket's send and
    # recv report it here, once, on a live session.
    a, b = socketpair()
    stream = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with BioClient(stream, certs.client) as client, ds_trio.loop() as loop:
        obj = LineServer(a, certs.server, implicit_tls=True)
        with anyio.fail_after(10):
            await client.handshake()
            await client.send(b"ping\n")
            assert await client.recv_exactly(5) == b"ping\n"
            await wait_for(lambda: obj.wbuf is None)
            sock = obj.sock

            # A write that must read first: queued, EPOLLIN armed.
            sock.send = _want_read
            assert obj.write(b"pong\n") is False
            assert obj._ev == IN_ONESHOT
            assert obj.epbit(OUT_ONESHOT) == IN_ONESHOT
            assert obj.flush_write() is False  # still wants to read
            assert obj._ev == IN_ONESHOT
            del sock.send
            # Writable all along, yet it waits for readability.
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            assert queued_data(obj) == 1
            # The peer's bytes wake it: the queued reply goes first.
            await client.send(b"ping2\n")
            expected = b"pong\nping2\n"
            assert await client.recv_exactly(len(expected)) == expected
            await wait_for(lambda: obj.wbuf is None)

            # A read that must write first: EPOLLOUT armed, partial kept.
            sock.recv = _want_write
            partial = bytearray(b"pi")
            assert obj.do_read(partial, 65536, len(partial)) == 0
            assert obj.sock is sock
            assert obj._ev == OUT_ONESHOT
            assert obj.epbit(IN_ONESHOT) == OUT_ONESHOT
            assert obj.rbuf is partial
            del sock.recv
            # Writable at once: it steps, reads (EAGAIN), waits to read
            # again, and the kept bytes start the next line.
            await client.send(b"ng3\n")
            assert await client.recv_exactly(6) == b"ping3\n"
        assert obj.sock is sock
        loop.stop()


# ----------------------------------------------------------------------
# 6. Cancellation mid-handshake
# ----------------------------------------------------------------------


async def test_cancelling_the_loop_mid_handshake_leaks_nothing(certs: Certs) -> None:
    class SpillingEcho(Echo):
        WBUF_MEMORY_MAX = 0  # even a small greeting goes to a spill file

    def factory(conn: socket.socket) -> DS:
        # The greeting is spilled behind the handshake step: a spill file
        # that must be closed too.
        return SpillingEcho(conn, certs.server, greeting=b"* OK ready\n")

    await reserve_libuv_emfile_fd()
    async with assert_no_leaks(), contextlib.AsyncExitStack() as stack:
        objects: list[Any] = []
        with anyio.CancelScope() as scope:
            async with serving(factory) as srv:
                for i in range(6):
                    client = await BioClient.connect(srv.port, certs.client)
                    stack.push_async_callback(client.aclose)
                    hello = client.client_hello()
                    # Half of them sent half a hello, the others all of it
                    # (the server answered and waits for their Finished).
                    await client.stream.send(hello if i % 2 else hello[:50])
                await wait_for(lambda: len(srv.acceptor.accepted) == 6)
                objects = list(srv.acceptor.accepted)
                for obj in objects:
                    await wait_for(settled_mid_handshake(obj))
                    assert spill_entry_count(obj.wbuf) == 1
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert len(objects) == 6
        assert all(obj.sock is None for obj in objects)


# ----------------------------------------------------------------------
# 7. The write path over TLS
# ----------------------------------------------------------------------


async def test_tls_spill_files_are_sent_with_pread_and_send_never_sendfile(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    sendfile_calls: list[object] = []
    preads: list[int] = []
    real_pread = os.pread

    def no_sendfile(*args: object) -> int:
        sendfile_calls.append(args)
        raise AssertionError("os.sendfile used on a TLS socket")

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        preads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    monkeypatch.setattr(os, "pread", counting_pread)
    size = 3 * MiB

    def factory(conn: socket.socket) -> DS:
        return LineServer(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory, sndbuf=65536) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        with anyio.fail_after(20):
            await client.handshake()
            await client.send(b"SEND %d 16384\n" % size)
            obj = srv.obj(0)
            await wait_for(lambda: spill_entry_count(obj.wbuf) > 0)
            assert srv.loop.statistics().bytes_spilled > 0
            data = await client.recv_exactly(size + 4)
        assert data == payload(size) + b"END\n"
        assert obj.sock is not None
        await wait_for(lambda: obj.wbuf is None)
    assert preads  # the spill file was read back with pread
    assert max(preads) <= 65536
    assert sendfile_calls == []


@pytest.mark.parametrize("server", [LineServer, HeldLineServer])
async def test_one_large_write_that_blocks_midway_over_tls_arrives_byte_exact(
    certs: Certs, server: type[LineServer]
) -> None:
    # A single write() larger than what the socket takes now: OpenSSL
    # commits records until the socket is full (hundreds of KiB), then
    # SSL_write fails with WANT_WRITE and must be retried with the same
    # buffer - or at least one as long (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER).
    size = 2 * MiB

    def factory(conn: socket.socket) -> DS:
        return server(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory, sndbuf=262144) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        with anyio.fail_after(20):
            await client.handshake()
            await client.send(b"SEND %d\n" % size)
            obj = srv.obj(0)
            await wait_for(lambda: queued_data(obj) > 0)
            if server is HeldLineServer:
                assert spill_entry_count(obj.wbuf) == 0
            data = await client.recv_exactly(size + 4)
        assert len(data) == size + 4
        assert data == payload(size) + b"END\n"
        assert obj.sock is not None


def sent_beyond(obj: LineServer, start: int) -> Callable[[], bool]:
    return lambda: len(obj.sent) > start


async def test_large_writes_into_a_nearly_full_tls_socket_arrive_byte_exact(
    certs: Certs,
) -> None:
    # Each burst fills the socket with writes of random sizes; the last
    # one finds it nearly full, so SSL_write puts some records on the wire
    # and then fails: the retry from the spill file must resume it exactly.
    def factory(conn: socket.socket) -> DS:
        return LineServer(conn, certs.server, implicit_tls=True)

    async with (
        serving(factory, sndbuf=131072) as srv,
        await BioClient.connect(srv.port, certs.client) as client,
    ):
        with anyio.fail_after(20):
            await client.handshake()
            obj = srv.obj(0)
            for seed in range(10):
                start = len(obj.sent)
                await client.send(b"BURST %d\n" % seed)
                await wait_for(sent_beyond(obj, start))
                expected = bytes(obj.sent[start:])
                assert await client.recv_exactly(len(expected)) == expected
        assert obj.sock is not None


class SendRecorder:
    """Wraps an SSLSocket's send to record the flags of every call."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.real = sock.send
        self.flags: list[int] = []

    def __call__(self, data: Any, flags: int = 0) -> int:
        self.flags.append(flags)
        return self.real(data, flags)


def queued_data(obj: DS) -> int:
    """Queue entries holding bytes (spill files and in-memory buffers)."""
    return sum(1 for entry in obj.wbuf or () if not callable(entry))


@pytest.mark.parametrize("method", ["msg_more", "write"])
async def test_msg_more_over_tls_behaves_exactly_like_write(
    certs: Certs, method: str
) -> None:
    # Both rows must pass with the same expectations: on TLS msg_more is
    # write, and no send ever carries a flag (SSLSocket refuses MSG_MORE).
    a, b = socketpair()
    stream = await anyio.abc.UNIXSocketStream.from_socket(b)
    async with BioClient(stream, certs.client) as client, ds_trio.loop() as loop:
        obj = LineServer(a, certs.server, implicit_tls=True)
        recorder = SendRecorder(obj.sock)
        obj.sock.send = recorder
        emit: Callable[[bytes], bool] = getattr(obj, method)
        # During the handshake: queued behind the handshake step.
        assert emit(b"greeting;") is False
        assert mid_handshake(obj)
        assert queued_data(obj) == 1
        with anyio.fail_after(10):
            await client.handshake()
            assert await client.recv_exactly(9) == b"greeting;"
            await wait_for(lambda: obj.wbuf is None)
            # Nothing queued: out at once and not held back (no "more
            # follows"): the client gets it without any following write.
            assert emit(b"alone") is True
            assert await client.recv_exactly(5) == b"alone"
            # Behind queued output: appended after it, in order.
            chunk = payload(16384, seed=5)
            filled = 0
            while obj.write(chunk):
                filled += 1
            assert queued_data(obj) == 1
            assert emit(b"after") is False
            assert queued_data(obj) == 2  # behind it
            expected = chunk * (filled + 1) + b"after"
            assert await client.recv_exactly(len(expected)) == expected
        assert recorder.flags
        assert set(recorder.flags) == {0}
        loop.stop()
