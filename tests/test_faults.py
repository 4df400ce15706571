"""The fault suite: faults hit some clients while others carry verified traffic.

Each scenario runs a real server in the loop (the echo example, the httpd
example over TLS, or bare DS objects) with 50-200 concurrent clients whose
every byte is checked, injects faults into other clients or into the
process (RST, half-close, aborted TLS handshakes, EMFILE, EFBIG/ENOSPC on
spill files, signal storms, exceptions from every kind of callback,
cancellation at random instants), and records one
:class:`tests.faultlib.FaultRow` per scenario and backend: bytes the good
clients lost, and fds, spill files, tasks and zombies left behind.  Every
row must be all zeros; pytest prints the table at the end of the session
(``DS_TRIO_FAULT_TABLE=path.md`` also writes it as Markdown).

Rules kept here: real sockets on loopback, real TLS, real child processes;
waits are bounded by ``fail_after`` and never sleep for time to pass; the
bound on how fast a cancelled loop ends is counted in scheduler passes, not
seconds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sniffio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds_trio
import ds_trio._later
import ds_trio.testing
from ds_trio import DS
from ds_trio._wbuf import Spill
from ds_trio.examples.echo import EchoClient
from ds_trio.examples.httpd import HTTPClient

from .faultlib import FaultRow, record
from .helpers import ReceiveMore, wait_for
from .test_tls import BioClient

pytestmark = pytest.mark.anyio

LOCALHOST = "127.0.0.1"
KiB = 1024
# Server-side send buffer of accepted sockets: small, so echoes and
# downloads spill and the spill files are sent while faults hit.
SMALL_SNDBUF = 16 * KiB


# ----------------------------------------------------------------------
# Clients: raw non-blocking sockets driven by the test's own tasks
# ----------------------------------------------------------------------


class Peer(ReceiveMore):
    """One client socket; every wait is on the running backend."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port = int(sock.getsockname()[1])  # kept for after close()

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        rcvbuf: int | None = None,
        before_connect: Callable[[int], None] | None = None,
    ) -> Peer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window starts small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        if before_connect is not None:
            sock.bind((LOCALHOST, 0))
            before_connect(int(sock.getsockname()[1]))
        with contextlib.suppress(BlockingIOError):
            sock.connect((LOCALHOST, port))
        await anyio.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            raise OSError(err, os.strerror(err))
        return cls(sock)

    async def send_all(self, data: bytes) -> bool:
        """False if the connection broke first."""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            except OSError:
                return False
            view = view[n:]
        return True

    async def recv(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; b"" at EOF or on a reset."""
        while True:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
            except OSError:
                return b""

    def rst(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, not FIN."""
        self.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def lines(rng: random.Random, total: int, *, max_line: int = 2000) -> bytes:
    """About ``total`` bytes of random lines (each ends in its only newline)."""
    out = bytearray()
    while len(out) < total:
        out += rng.randbytes(rng.randint(0, max_line)).replace(b"\n", b"-") + b"\n"
    return bytes(out)


def matching_prefix(got: bytes, want: bytes) -> int:
    """How many leading bytes of ``got`` are exactly ``want``'s."""
    if want.startswith(got):
        return len(got)
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return min(len(got), len(want))


@dataclass
class Tally:
    """Bytes good clients should have received, and received exactly."""

    expected: int = 0
    exact: int = 0
    received: int = 0
    clients_done: int = 0

    @property
    def lost(self) -> int:
        return self.expected - self.exact


async def echo_round(peer: Peer, data: bytes, tally: Tally) -> bool:
    """Send ``data`` while reading its echo; True if it came back exact."""
    tally.expected += len(data)
    async with anyio.create_task_group() as tg:
        tg.start_soon(peer.send_all, data)
        got = await peer.recv_exactly(len(data))
        tg.cancel_scope.cancel()  # a broken connection: the send may hang
    tally.exact += matching_prefix(got, data)
    tally.received += len(got)
    return got == data


async def good_echo_client(
    port: int,
    seed: int,
    tally: Tally,
    *,
    rounds: int,
    size: int,
    before_last: anyio.Event | None = None,
    rcvbuf: int | None = None,
) -> None:
    """Verified echo traffic; the last round waits for ``before_last``.

    A small ``rcvbuf`` makes the server spill the echo and send it from the
    spill file while the client reads.
    """
    rng = random.Random(seed)
    peer = await Peer.connect(port, rcvbuf=rcvbuf)
    try:
        for i in range(rounds):
            if i == rounds - 1 and before_last is not None:
                await before_last.wait()
            if not await echo_round(peer, lines(rng, rng.randint(1, size)), tally):
                return
        tally.clients_done += 1
    finally:
        peer.close()


async def checkpoints(n: int) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


# ----------------------------------------------------------------------
# Servers in the test's loop
# ----------------------------------------------------------------------


def _mutable(data: Any) -> Any:
    # Immutable bytes would be queued by reference (no spill file); a copy
    # goes to a spill file when WBUF_MEMORY_MAX is 0.
    return bytearray(data) if type(data) is bytes else data


class SpillingEchoClient(EchoClient):
    """The echo example with the seed's write path: every queued byte spills.

    The fault scenarios break connections while a spill file is being sent,
    so the output must take that path.
    """

    WBUF_MEMORY_MAX = 0

    def write(self, data: Any) -> bool:
        return super().write(_mutable(data))


class SpillingHTTPClient(HTTPClient):
    """The httpd example with every queued byte in a spill file (see above)."""

    WBUF_MEMORY_MAX = 0

    def write(self, data: Any) -> bool:
        return super().write(_mutable(data))


class EchoServer:
    """A Listener handing connections to the echo example (spilling).

    ``by_port`` maps a client's local port to its server-side object, so a
    test can see whether the object spilled, closed, or is still alive.
    ``classes`` picks a class per client port (default: ``SpillingEchoClient``).
    """

    def __init__(
        self,
        *,
        sndbuf: int | None = SMALL_SNDBUF,
        factory: Callable[[socket.socket], DS] = SpillingEchoClient,
    ) -> None:
        self.factory = factory
        self.lsock = socket.create_server((LOCALHOST, 0), backlog=1024)
        self.lsock.setblocking(False)
        self.port = int(self.lsock.getsockname()[1])
        self.sndbuf = sndbuf
        self.by_port: dict[int, DS] = {}
        self.classes: dict[int, Callable[[socket.socket], DS]] = {}
        self.listener = ds_trio.Listener(self.lsock, self.post_accept)

    def post_accept(
        self, sock: socket.socket, addr: Any, _lsock: socket.socket
    ) -> None:
        if self.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        factory = self.classes.get(addr[1], self.factory)
        self.by_port[addr[1]] = factory(sock)

    def obj(self, peer: Peer) -> DS | None:
        return self.by_port.get(peer.port)

    def spilled(self, peer: Peer) -> bool:
        obj = self.obj(peer)
        return obj is not None and any(type(e) is Spill for e in obj.wbuf or ())

    def closed(self, peer: Peer) -> bool:
        obj = self.obj(peer)
        return obj is not None and obj.sock is None

    def alive(self) -> int:
        return sum(1 for obj in self.by_port.values() if obj.sock is not None)


# ----------------------------------------------------------------------
# Leak accounting
# ----------------------------------------------------------------------


def backend_name() -> str:
    return sniffio.current_async_library()


@contextlib.asynccontextmanager
async def leaks_into(row: FaultRow) -> AsyncIterator[None]:
    """``assert_no_leaks`` that counts into ``row`` instead of raising.

    Children a cancelled loop left running are reaped by a background
    thread: give it a bounded while before zombies are counted.
    """
    zombies_before = ds_trio.testing.zombie_children()
    report: ds_trio.testing.LeakReport | None = None
    try:
        async with ds_trio.testing.assert_no_leaks() as report:
            yield
            with anyio.move_on_after(10):
                while ds_trio.testing.zombie_children() - zombies_before:
                    await anyio.sleep(0.01)
    except AssertionError:
        if not report:  # the body's own assertion, not the leak check
            raise
    assert report is not None
    row.add_leaks(report)


def finish(row: FaultRow) -> None:
    """Record the row, then require it clean."""
    record(row)
    assert row.clean, row


def ds_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("ds_trio")
    ]


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """Messages at WARNING or above that contain ``text``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


# ----------------------------------------------------------------------
# 1. Abrupt disconnects at random points, under echo load
# ----------------------------------------------------------------------

DISCONNECTS = (
    "rst-mid-line",
    "rst-mid-spill",
    "close-unread-mid-spill",
    "rst-idle",
    "half-close",
    "half-close-mid-line",
)


async def faulty_echo_client(
    server: EchoServer, kind: str, seed: int, tally: Tally, spills: list[int]
) -> None:
    """One client that breaks its connection the ``kind`` way."""
    mid_spill = kind.endswith("mid-spill")
    peer = await Peer.connect(server.port, rcvbuf=4 * KiB if mid_spill else None)
    try:
        await _break_echo_connection(server, peer, kind, seed, tally, spills)
    finally:
        peer.close()  # idempotent; for a client cancelled midway


async def _break_echo_connection(
    server: EchoServer,
    peer: Peer,
    kind: str,
    seed: int,
    tally: Tally,
    spills: list[int],
) -> None:
    rng = random.Random(seed)
    mid_spill = kind.endswith("mid-spill")
    if kind == "rst-mid-line":
        # Anything up to one byte short of the next newline.
        await peer.send_all(lines(rng, rng.randint(0, 60 * KiB)) + b"partial")
        await checkpoints(rng.randint(0, 20))
        peer.rst()
    elif mid_spill:
        # Never read: the echo fills both socket buffers, then the server's
        # spill file, which it is sending from when the connection breaks.
        while not (server.spilled(peer) or server.closed(peer)):
            try:
                peer.sock.send(lines(rng, 64 * KiB))
            except BlockingIOError:
                # Writable again, or the server stopped reading because it
                # spilled: poll the second case (bounded, no busy loop).
                with anyio.move_on_after(0.01):
                    await anyio.wait_writable(peer.sock)
        spills.append(int(server.spilled(peer)))
        await checkpoints(rng.randint(0, 30))
        if kind.startswith("rst"):
            peer.rst()
        else:
            peer.close()  # unread bytes in its queue: the kernel resets
    elif kind == "rst-idle":
        if await echo_round(peer, lines(rng, rng.randint(1, 8 * KiB)), tally):
            tally.clients_done += 1
        peer.rst()
    else:
        sent = lines(rng, rng.randint(1, 16 * KiB))
        if kind == "half-close-mid-line":
            sent += b"no newline"
        await peer.send_all(sent)
        peer.sock.shutdown(socket.SHUT_WR)
        got = await peer.recv_until_eof()
        # The server closes on EOF and drops what it had not sent: what
        # came back is a prefix of the complete lines, never other bytes.
        tally.expected += len(got)
        tally.exact += matching_prefix(got, sent)
        peer.close()
    # Its object goes by itself (a connection reset while still in the
    # backlog may never be accepted at all: the test counts survivors).
    if server.obj(peer) is not None:
        await wait_for(lambda: server.closed(peer))


async def test_abrupt_disconnects_at_random_points_under_echo_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, faulty = 100, 60
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tally, fault_tally, spills = Tally(), Tally(), [0]
    row = FaultRow(
        "abrupt disconnects (echo)",
        backend_name(),
        f"{good} echo clients x 3 rounds <= 96 KiB, spilling",
        f"{faulty} of RST/FIN/half-close mid-line, mid-spill, idle",
    )
    async with leaks_into(row):
        with anyio.fail_after(60):
            async with ds_trio.loop(errors="raise") as lp:
                server = EchoServer()
                faults_done = anyio.Event()
                async with anyio.create_task_group() as clients:
                    for i in range(good):
                        clients.start_soon(
                            functools.partial(
                                good_echo_client,
                                server.port,
                                seed + i,
                                tally,
                                rounds=3,
                                size=96 * KiB,
                                before_last=faults_done,
                                rcvbuf=8 * KiB,
                            )
                        )
                    async with anyio.create_task_group() as faults:
                        for i in range(faulty):
                            kind = DISCONNECTS[i % len(DISCONNECTS)]
                            faults.start_soon(
                                faulty_echo_client,
                                server,
                                kind,
                                rng.randrange(1 << 30),
                                fault_tally,
                                spills,
                            )
                    # Every faulted object is gone; every good one is alive.
                    await wait_for(lambda: server.alive() == good)
                    faults_done.set()
                lp.stop()
    row.bytes_lost = tally.lost + fault_tally.lost
    row.note = (
        f"seed {seed}; {sum(spills)} broken mid-spill; "
        f"{lp.statistics().bytes_spilled // KiB} KiB spilled"
    )
    assert tally.clients_done == good
    assert not ds_errors(caplog)
    finish(row)


# ----------------------------------------------------------------------
# 2. The httpd example over TLS: aborted handshakes, resets mid-download
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(server, client)


class PeerStream:
    """The two calls :class:`BioClient` makes, over a :class:`Peer`."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def send(self, data: bytes) -> None:
        if not await self.peer.send_all(data):
            raise anyio.BrokenResourceError

    async def receive(self) -> bytes:
        data = await self.peer.recv()
        if not data:
            raise anyio.EndOfStream
        return data


def tls_client(peer: Peer, ctx: ssl.SSLContext) -> BioClient:
    return BioClient(PeerStream(peer), ctx)  # type: ignore[arg-type]


def client_hello(ctx: ssl.SSLContext) -> bytes:
    tls = ctx.wrap_bio(
        ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


async def tls_get(client: BioClient, path: str) -> bytes:
    """One keep-alive GET; the body as far as it came."""
    await client.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = await client.recv()
        if not data:
            return b""
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return rest + await client.recv_exactly(length - len(rest))


HTTPD_FAULTS = (
    "hello-cut-rst",
    "hello-cut-fin",
    "hello-then-rst",
    "rst-mid-download",
    "half-close-after-request",
)


class HttpdServer(EchoServer):
    """The httpd example behind the same bookkeeping as :class:`EchoServer`."""

    def __init__(self, root: Path, tls: ssl.SSLContext) -> None:
        self.root, self.tls = root, tls
        super().__init__(sndbuf=SMALL_SNDBUF)

    def post_accept(
        self, sock: socket.socket, addr: Any, _lsock: socket.socket
    ) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
        self.by_port[addr[1]] = SpillingHTTPClient(sock, str(self.root), "-", self.tls)


async def faulty_https_client(
    server: HttpdServer,
    certs: Certs,
    kind: str,
    seed: int,
    body: bytes,
    tally: Tally,
    spills: list[int],
) -> None:
    rng = random.Random(seed)
    peer = await Peer.connect(server.port, rcvbuf=4 * KiB)
    if kind.startswith("hello-cut"):
        hello = client_hello(certs.client)
        await peer.send_all(hello[: rng.randrange(len(hello))])
        await checkpoints(rng.randint(0, 20))
        peer.rst() if kind.endswith("rst") else peer.close()
    elif kind == "hello-then-rst":
        await peer.send_all(client_hello(certs.client))
        await peer.recv(rng.randint(1, 2000))  # some of the server's flight
        peer.rst()
    elif kind == "half-close-after-request":
        # The whole response still comes.  Then the server reads EOF with
        # no close_notify, and OpenSSL 3 answers that with a fatal
        # decode_error alert, which the client sees after the body.
        client = tls_client(peer, certs.client)
        await client.handshake()
        await client.send(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        peer.sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        with contextlib.suppress(ssl.SSLError):
            while data := await client.recv():
                got += data
        tally.expected += len(body)
        tally.exact += matching_prefix(bytes(got).partition(b"\r\n\r\n")[2], body)
    else:  # rst-mid-download
        client = tls_client(peer, certs.client)
        await client.handshake()
        await client.send(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await client.recv_exactly(rng.randint(1, 256 * KiB))
        # A slow reader: the response waits in a spill file; reset while the
        # server sends from it.
        await wait_for(lambda: server.spilled(peer) or server.closed(peer))
        spills.append(server.spilled(peer))
        await checkpoints(rng.randint(0, 30))
        peer.rst()
    peer.close()  # idempotent: some ways above closed it already
    if server.obj(peer) is not None:
        await wait_for(lambda: server.closed(peer))


async def good_https_client(
    port: int, certs: Certs, body: bytes, tally: Tally, gets: int
) -> None:
    peer = await Peer.connect(port)
    try:
        client = tls_client(peer, certs.client)
        await client.handshake()
        for _ in range(gets):
            got = await tls_get(client, "/big.bin")
            tally.expected += len(body)
            tally.exact += matching_prefix(got, body)
        tally.clients_done += 1
    finally:
        peer.close()


async def test_tls_handshake_aborts_and_resets_mid_download_on_httpd(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, faulty = 30, 40
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    body = rng.randbytes(512 * KiB)
    (tmp_path / "big.bin").write_bytes(body)
    tally, fault_tally, spills = Tally(), Tally(), [0]
    row = FaultRow(
        "TLS aborts, RST mid-download (httpd)",
        backend_name(),
        f"{good} TLS clients x 2 GET 512 KiB, sndbuf {SMALL_SNDBUF // KiB} KiB",
        f"{faulty} of ClientHello cut+RST/FIN, RST after hello, RST mid-spill, "
        "half-close",
    )
    async with leaks_into(row):
        with anyio.fail_after(60):
            async with ds_trio.loop(errors="raise") as lp:
                server = HttpdServer(tmp_path, certs.server)
                async with anyio.create_task_group() as tg:
                    for _ in range(good):
                        tg.start_soon(
                            good_https_client, server.port, certs, body, tally, 2
                        )
                    for i in range(faulty):
                        tg.start_soon(
                            faulty_https_client,
                            server,
                            certs,
                            HTTPD_FAULTS[i % len(HTTPD_FAULTS)],
                            rng.randrange(1 << 30),
                            body,
                            fault_tally,
                            spills,
                        )
                await wait_for(lambda: server.alive() == 0)
                lp.stop()
    row.bytes_lost = tally.lost + fault_tally.lost
    handshake_logs = [r for r in caplog.records if r.name == "ds_trio.tls"]
    row.note = (
        f"seed {seed}; {sum(spills)} reset mid-spill; "
        f"{lp.statistics().bytes_spilled // KiB} KiB spilled; "
        f"{len(handshake_logs)} handshake log lines"
    )
    assert tally.clients_done == good
    assert sum(spills) >= 1
    # At most one line per aborted handshake, and nothing above INFO.
    assert 0 < len(handshake_logs) <= 3 * faulty // len(HTTPD_FAULTS)
    assert not ds_errors(caplog)
    finish(row)


async def test_starttls_on_a_connection_already_reset_closes_only_it(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: ``ssl`` raised out of ``starttls`` (and out of the
    constructor calling it) when the peer had reset before the switch, and
    took the fd along, leaving the object registered under a free number."""
    lsock = socket.create_server((LOCALHOST, 0))
    row = FaultRow(
        "starttls after RST (bare DS)",
        backend_name(),
        "1 listener",
        "RST with and without bytes queued",
    )
    async with leaks_into(row):
        with lsock:
            async with ds_trio.loop(errors="raise") as lp:
                for queued in (b"", client_hello(certs.client)[:50]):
                    client = socket.create_connection(lsock.getsockname())
                    conn, _ = lsock.accept()
                    client.sendall(queued)
                    Peer(client).rst()
                    await wait_for(functools.partial(_reset, conn))
                    obj = HTTPClient(conn, ".", "-", certs.server)
                    assert obj.sock is None
                lp.stop()
    lines_logged = [r.getMessage() for r in caplog.records if r.name == "ds_trio.tls"]
    assert len(lines_logged) == 2, lines_logged
    finish(row)


def _reset(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return True
    return False


# ----------------------------------------------------------------------
# 3. Resource faults: EMFILE at accept and on spill, EFBIG/ENOSPC on spill
# ----------------------------------------------------------------------


@contextlib.contextmanager
def no_free_fds() -> Iterator[None]:
    """Lower RLIMIT_NOFILE to the lowest free fd: every new fd is EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = set(ds_trio.testing.open_fds())
    lowest = min(set(range(len(used) + 1)) - used)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def spill_victim(server: EchoServer, *, sndbuf: int | None = None) -> Peer:
    """A client that never reads: its echo must go to a spill file."""
    peer = await Peer.connect(server.port, rcvbuf=4 * KiB)
    await wait_for(lambda: server.obj(peer) is not None)
    if sndbuf is not None:
        obj = server.obj(peer)
        assert obj is not None
        obj.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return peer


async def flood_until_closed(server: EchoServer, peer: Peer, seed: int) -> None:
    rng = random.Random(seed)
    data = lines(rng, 256 * KiB)
    while not server.closed(peer):
        try:
            peer.sock.send(data)
        except BlockingIOError:
            with anyio.move_on_after(0.01):  # bounded poll, see faulty_echo_client
                await anyio.wait_writable(peer.sock)
        except OSError:
            break


async def test_emfile_at_accept_and_on_spill_while_others_echo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, late = 50, 10
    seed = random.randrange(1 << 30)
    tally = Tally()
    row = FaultRow(
        "EMFILE at accept and on spill (echo)",
        backend_name(),
        f"{good} echo clients x 3 rounds",
        f"RLIMIT_NOFILE at the lowest free fd: {late} connects, 1 spill",
    )
    async with leaks_into(row):
        with anyio.fail_after(60):
            async with ds_trio.loop(errors="raise") as lp:
                server = EchoServer(sndbuf=None)
                round_done = [anyio.Event() for _ in range(3)]
                done = [0, 0, 0]

                async def client(i: int) -> None:
                    rng = random.Random(seed + i)
                    peer = await Peer.connect(server.port)
                    try:
                        for r in range(3):
                            if r:
                                await round_done[r - 1].wait()
                            data = lines(rng, rng.randint(1, 8 * KiB))
                            assert await echo_round(peer, data, tally)
                            done[r] += 1
                            if done[r] == good:
                                round_done[r].set()
                    finally:
                        peer.close()

                async with anyio.create_task_group() as tg:
                    for i in range(good):
                        tg.start_soon(client, i)
                    await round_done[0].wait()
                    victim = await spill_victim(server, sndbuf=4 * KiB)
                    sockets = [socket.socket() for _ in range(late)]
                    with no_free_fds():
                        for sock in sockets:
                            sock.setblocking(False)
                            with contextlib.suppress(BlockingIOError):
                                sock.connect((LOCALHOST, server.port))
                        await wait_for(lambda: bool(logged(caplog, "pausing")))
                        # Round 2 needs no fd; the victim's spill file does.
                        round_done[0] = anyio.Event()
                        round_done[0].set()
                        await flood_until_closed(server, victim, seed)
                        await round_done[1].wait()
                    victim.close()
                    # The fds are back: the pending connections are accepted
                    # (after the back-off) and served.
                    lates = [Peer(sock) for sock in sockets]
                    async with anyio.create_task_group() as late_tg:
                        for i, peer in enumerate(lates):
                            data = lines(random.Random(seed - i), 4 * KiB)
                            late_tg.start_soon(echo_round, peer, data, tally)
                    for peer in lates:
                        peer.close()
                lp.stop()
    row.bytes_lost = tally.lost
    drops = logged(caplog, "dropped: tmpfile")
    row.note = f"seed {seed}; {len(drops)} spill drop(s) logged"
    assert done == [good, good, good]
    assert len(logged(caplog, "pausing")) == 1  # once per burst
    assert len(drops) == 1, drops
    assert tally.expected == tally.exact > 0
    finish(row)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process; SIGXFSZ ignored so writes get EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path`` (root only; skips otherwise)."""
    path.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


SPILL_LIMIT = 16 * KiB


@pytest.mark.parametrize("fault", ["EFBIG", "ENOSPC"])
async def test_spill_write_failure_drops_only_that_client(
    fault: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, victims = 50, 5
    seed = random.randrange(1 << 30)
    tally = Tally()
    row = FaultRow(
        f"{fault} on spill (echo)",
        backend_name(),
        f"{good} echo clients x 3 rounds spilling <= 8 KiB",
        f"{victims} clients spilling > {SPILL_LIMIT // KiB} KiB"
        + (" (RLIMIT_FSIZE)" if fault == "EFBIG" else " (tiny tmpfs)"),
    )
    with contextlib.ExitStack() as stack:
        if fault == "EFBIG":
            spill_dir = str(tmp_path)
            stack.enter_context(file_size_limit(SPILL_LIMIT))
        else:
            spill_dir = str(
                stack.enter_context(tiny_tmpfs(tmp_path / "t", SPILL_LIMIT))
            )
        victim_class = type(
            "VictimEcho", (SpillingEchoClient,), {"spill_dir": spill_dir}
        )
        async with leaks_into(row):
            with anyio.fail_after(30):
                async with ds_trio.loop(errors="raise") as lp:
                    server = EchoServer()
                    async with anyio.create_task_group() as tg:
                        for i in range(good):
                            tg.start_soon(
                                functools.partial(
                                    good_echo_client,
                                    server.port,
                                    seed + i,
                                    tally,
                                    rounds=3,
                                    size=8 * KiB,
                                )
                            )
                        for i in range(victims):

                            def victim_port(port: int) -> None:
                                server.classes[port] = victim_class

                            peer = await Peer.connect(
                                server.port, rcvbuf=4 * KiB, before_connect=victim_port
                            )
                            tg.start_soon(flood_until_closed, server, peer, seed - i)
                            stack.callback(peer.close)
                    lp.stop()
                    stack.close()  # the victims' sockets, while fds are checked
    row.bytes_lost = tally.lost
    drops = logged(caplog, "tmpfile")
    row.note = f"seed {seed}; {len(drops)} drops logged"
    assert tally.clients_done == good
    assert len(drops) == victims, drops
    expected = errno.EFBIG if fault == "EFBIG" else errno.ENOSPC
    assert all(os.strerror(expected) in d for d in drops), drops
    finish(row)


# ----------------------------------------------------------------------
# 4. Signal (EINTR) storms while echo traffic flows
# ----------------------------------------------------------------------


@contextlib.contextmanager
def sigalrm_every_millisecond(counter: list[int]) -> Iterator[None]:
    """ITIMER_REAL at 1 ms with a Python handler; the old timer comes back."""

    def handler(_signum: int, _frame: object) -> None:
        counter[0] += 1

    previous = signal.signal(signal.SIGALRM, handler)
    # pytest-timeout may have its own ITIMER_REAL running: keep what is left.
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)


@contextlib.contextmanager
def counting_handler(signum: int, counter: list[int]) -> Iterator[None]:
    """A Python handler for ``signum`` around the loop.

    On trio, signals the loop received but had not dispatched when it ended
    are raised again once the previous handler is back (trio's
    ``open_signal_receiver`` redelivers them; asyncio drops them).  With
    ``SIG_DFL`` there, the last SIGUSR1 of the storm could kill pytest.
    """

    def handler(_signum: int, _frame: object) -> None:
        counter[0] += 1

    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextlib.contextmanager
def sigusr1_from_a_thread() -> Iterator[list[int]]:
    """Another thread sends SIGUSR1 to the main thread about every ms."""
    stop = threading.Event()
    sent = [0]
    main = threading.main_thread().ident
    assert main is not None

    def kill() -> None:
        while not stop.wait(0.001):  # pacing the sender, not the test
            signal.pthread_kill(main, signal.SIGUSR1)
            sent[0] += 1

    thread = threading.Thread(target=kill, name="SIGUSR1 storm")
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join()


async def test_signal_storm_while_echo_traffic_flows_and_clients_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGALRM (a Python handler outside the loop) and SIGUSR1 (the loop's
    ``signals=``) every millisecond: every syscall of the loop and the
    clients may be interrupted, and DS objects must neither see EINTR nor
    lose a byte."""
    good, faulty = 100, 20
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tally, fault_tally, spills = Tally(), Tally(), [0]
    alarms, handled, late = [0], [0], [0]
    row = FaultRow(
        "EINTR storm (echo)",
        backend_name(),
        f"{good} echo clients x 3 rounds <= 96 KiB, spilling",
        f"SIGALRM + SIGUSR1 every ms; {faulty} RST mid-spill",
    )

    def on_usr1(_signum: int) -> None:
        handled[0] += 1

    async with leaks_into(row):
        with (
            anyio.fail_after(60),
            sigalrm_every_millisecond(alarms),
            counting_handler(signal.SIGUSR1, late),
        ):
            async with ds_trio.loop(
                errors="raise", signals={signal.SIGUSR1: on_usr1}
            ) as lp:
                server = EchoServer()
                with sigusr1_from_a_thread() as sent:
                    async with anyio.create_task_group() as tg:
                        for i in range(good):
                            tg.start_soon(
                                functools.partial(
                                    good_echo_client,
                                    server.port,
                                    seed + i,
                                    tally,
                                    rounds=3,
                                    size=96 * KiB,
                                    rcvbuf=8 * KiB,
                                )
                            )
                        for _ in range(faulty):
                            tg.start_soon(
                                faulty_echo_client,
                                server,
                                "rst-mid-spill",
                                rng.randrange(1 << 30),
                                fault_tally,
                                spills,
                            )
                    # The loop's handler ran for signals sent while it ran.
                    await wait_for(lambda: handled[0] > 0)
                lp.stop()
    row.bytes_lost = tally.lost + fault_tally.lost
    row.note = (
        f"seed {seed}; {alarms[0]} SIGALRM, {sent[0]} SIGUSR1 sent, "
        f"{handled[0]} handled by the loop, {late[0]} after it; "
        f"{lp.statistics().bytes_spilled // KiB} KiB spilled"
    )
    assert tally.clients_done == good
    assert alarms[0] > 10
    assert sent[0] > 10
    assert not ds_errors(caplog)
    finish(row)


async def test_a_burst_of_signals_faster_than_the_loop_is_handled_quietly() -> None:
    """Regression: asyncio's wake-up fd warned ("Exception ignored when
    trying to write to the signal wakeup fd") once per signal once its
    buffer was full - thousands of unraisable errors under a storm."""
    handled = [0]

    def on_usr1(_signum: int) -> None:
        handled[0] += 1

    async with ds_trio.loop(signals={signal.SIGUSR1: on_usr1}) as lp:
        # No checkpoint in between: the loop cannot drain its wake-up fd.
        for _ in range(5000):
            os.kill(os.getpid(), signal.SIGUSR1)
        await wait_for(lambda: handled[0] > 0)
        lp.stop()


# ----------------------------------------------------------------------
# 5. Exceptions from every kind of callback, under both error policies
# ----------------------------------------------------------------------


class Boom(Exception):
    """What the faulted callbacks raise."""


def boom(*_args: object) -> None:
    raise Boom("injected")


class BombEcho(EchoClient):
    """The echo example, except that echoing a ``BOOM`` line raises."""

    def write(self, data: Any) -> bool:
        if isinstance(data, bytes) and b"BOOM\n" in data:
            raise Boom("injected")
        return super().write(data)


def spawn_true() -> int:
    return os.posix_spawn("/bin/true", ["true"], os.environ)


async def fire(source: str, server: EchoServer, n: int) -> list[Peer]:
    """Inject ``n`` exceptions from ``source``; bomb clients are returned."""
    bombs: list[Peer] = []
    for i in range(n):
        if source == "event_step":
            peer = await Peer.connect(server.port)
            bombs.append(peer)
            await peer.send_all(b"BOOM\n")
        elif source == "timer":
            ds_trio.add_timer(0, boom)
        elif source == "later":
            ds_trio.later(boom)
        elif i % 2:
            ds_trio.awaitpid(spawn_true(), boom)
        else:
            ds_trio.dwaitpid(spawn_true(), boom)
    return bombs


SOURCES = ["event_step", "timer", "later", "reaper"]


@pytest.mark.parametrize("source", SOURCES)
async def test_exceptions_with_errors_log_close_only_the_offender(
    source: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good, faults = 50, 4
    monkeypatch.setattr(ds_trio._later, "LATER_DELAY", 0.01)
    seed = random.randrange(1 << 30)
    tally = Tally()
    row = FaultRow(
        f"{source} raises, errors=log",
        backend_name(),
        f"{good} echo clients x 3 rounds",
        f"{faults} exceptions from {source} mid-traffic",
    )
    async with leaks_into(row):
        with anyio.fail_after(60):
            async with ds_trio.loop(errors="log") as lp:
                server = EchoServer(factory=BombEcho)
                started = anyio.Event()
                async with anyio.create_task_group() as tg:
                    for i in range(good):
                        tg.start_soon(
                            functools.partial(
                                good_echo_client,
                                server.port,
                                seed + i,
                                tally,
                                rounds=3,
                                size=16 * KiB,
                                before_last=started,
                            )
                        )
                    bombs = await fire(source, server, faults)
                    for peer in bombs:
                        # Closed before it could echo anything.
                        assert await peer.recv_until_eof() == b""
                        peer.close()
                    await wait_for(lambda: len(raised(caplog)) == faults)
                    # Only the bombs were closed: every good client is
                    # connected, then does its last round.
                    await wait_for(lambda: server.alive() == good)
                    assert all(server.closed(peer) for peer in bombs)
                    started.set()
                lp.stop()
    row.bytes_lost = tally.lost
    row.note = f"seed {seed}; {len(raised(caplog))} tracebacks logged"
    assert tally.clients_done == good
    assert len(raised(caplog)) == faults
    finish(row)


def raised(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "ds_trio.loop"
        and r.levelno == logging.ERROR
        and r.exc_info is not None
        and isinstance(r.exc_info[1], Boom)
    ]


@pytest.mark.parametrize("source", SOURCES)
async def test_exceptions_with_errors_raise_end_the_loop_cleanly(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = 50
    monkeypatch.setattr(ds_trio._later, "LATER_DELAY", 0.01)
    seed = random.randrange(1 << 30)
    tally = Tally()
    row = FaultRow(
        f"{source} raises, errors=raise",
        backend_name(),
        f"{good} echo clients connected",
        f"1 exception from {source}",
    )
    bombs: list[Peer] = []
    async with leaks_into(row):
        with anyio.fail_after(60):
            with pytest.raises(Boom):
                async with ds_trio.loop(errors="raise"):
                    server = EchoServer(factory=BombEcho)
                    async with anyio.create_task_group() as tg:
                        for i in range(good):
                            tg.start_soon(
                                functools.partial(
                                    good_echo_client,
                                    server.port,
                                    seed + i,
                                    tally,
                                    rounds=2,
                                    size=16 * KiB,
                                )
                            )
                    bombs = await fire(source, server, 1)
                    await anyio.sleep_forever()
            # Every connection was closed when the loop ended.
            for peer in bombs:
                assert await peer.recv_until_eof() == b""
                peer.close()
    row.bytes_lost = tally.lost
    assert tally.clients_done == good
    finish(row)


# ----------------------------------------------------------------------
# 6. Cancellation at random instants, with the loop under faults
# ----------------------------------------------------------------------

#: Scheduler passes a cancelled loop may take to end (counted, not timed).
CANCEL_BOUND = 10
CANCEL_ROWS: dict[str, FaultRow] = {}


async def quietly(fn: Callable[..., Awaitable[None]], *args: Any, **kw: Any) -> None:
    """Run a client that may find the server gone (refused, reset)."""
    with contextlib.suppress(OSError):
        await fn(*args, **kw)


def child_done(_arg: object, _pid: int) -> None:
    pass


async def cancel_world(passes: int, seed: int, row: FaultRow) -> None:
    """Echo traffic, resets mid-spill, children and a SIGALRM storm; the
    scope around the loop is cancelled after ``passes`` scheduler passes."""
    rng = random.Random(seed)
    ticks = 0
    cancelled_at = exited_at = -1
    tally, fault_tally = Tally(), Tally()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with leaks_into(row):
        with anyio.fail_after(30), sigalrm_every_millisecond([0]):
            async with anyio.create_task_group() as outer:
                outer.start_soon(ticker)
                with anyio.CancelScope() as scope:

                    async def canceller() -> None:
                        nonlocal cancelled_at
                        await checkpoints(passes)
                        cancelled_at = ticks
                        scope.cancel()

                    outer.start_soon(canceller)
                    async with ds_trio.loop(errors="raise"):
                        server = EchoServer()
                        for i in range(20):
                            outer.start_soon(
                                functools.partial(
                                    quietly,
                                    good_echo_client,
                                    server.port,
                                    seed + i,
                                    tally,
                                    rounds=1000,
                                    size=8 * KiB,
                                )
                            )
                        for _ in range(5):
                            outer.start_soon(
                                quietly,
                                faulty_echo_client,
                                server,
                                "rst-mid-spill",
                                rng.randrange(1 << 30),
                                fault_tally,
                                [0],
                            )
                        while True:
                            ds_trio.dwaitpid(spawn_true(), child_done)
                            await checkpoints(rng.randint(1, 20))
                exited_at = ticks
                outer.cancel_scope.cancel()
    # What came back before the end is exact (a prefix), never other bytes.
    row.bytes_lost += tally.received - tally.exact
    row.bytes_lost += fault_tally.received - fault_tally.exact
    taken = exited_at - cancelled_at
    worst = int(row.note.split()[-1]) if row.note else 0
    row.note = (
        "up to 8 examples, cancelled after 0..250 passes; "
        f"most passes to end {max(worst, taken)}"
    )
    assert cancelled_at >= 0
    assert taken <= CANCEL_BOUND, taken


@settings(
    max_examples=8,  # the row's note says so
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(passes=st.integers(0, 250), seed=st.integers(0, 1 << 30))
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancel_at_a_random_instant_under_faults_ends_promptly_and_leaks_nothing(
    backend: str, passes: int, seed: int
) -> None:
    row = CANCEL_ROWS.get(backend)
    if row is None:
        row = CANCEL_ROWS[backend] = record(
            FaultRow(
                "cancel at a random instant (echo)",
                backend,
                "20 echo clients, children reaped",
                "5 RST mid-spill, SIGALRM every ms, cancel",
            )
        )
    ds_trio.Reset()  # each example starts clean, as the autouse fixture does
    anyio.run(cancel_world, passes, seed, row, backend=backend)
    assert row.clean, row
