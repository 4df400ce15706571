"""The static-file HTTP server example against real clients.

The server runs in-process inside ``ds_trio.loop(errors="log")`` on both
backends; clients (``http.client``, ``urllib.request``, raw sockets, curl)
run in worker threads through ``anyio.to_thread.run_sync``, with timeouts
on every blocking socket call.  Cases follow public-inbox's
``t/httpd-corner.t`` where they apply to a static-file server.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio
import anyio.to_thread
import pytest
import trio
import trio.testing
import trustme

import ds_trio
import ds_trio.testing
from ds_trio.examples.httpd import (
    HTTPClient,
    _parse_range,
    _tls_context,
    make_post_accept,
)

from .helpers import wait_for

pytestmark = pytest.mark.anyio

T = TypeVar("T")
LOCALHOST = "127.0.0.1"
BIG = 3 * 1024 * 1024
SECRET = b"TOP-SECRET-outside-the-root"
Addr = tuple[str, int]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp_path/root`` with a small file, a 3 MB file and sub/index.html.

    ``tmp_path/secret.txt`` lies outside the root; symlinks inside the root
    point at it and at its directory.
    """
    (tmp_path / "secret.txt").write_bytes(SECRET)
    served = tmp_path / "root"
    (served / "sub").mkdir(parents=True)
    (served / "small.txt").write_bytes(b"hello, world\n")
    (served / "big.bin").write_bytes(bytes(range(256)) * (BIG // 256))
    (served / "sub" / "index.html").write_bytes(b"<h1>index</h1>\n")
    (served / "empty").mkdir()
    (served / "link-out").symlink_to(tmp_path / "secret.txt")
    (served / "linkdir").symlink_to(tmp_path)
    (served / "link-in").symlink_to(served / "sub" / "index.html")
    return served


@contextlib.asynccontextmanager
async def serving(root: Path, tls: ssl.SSLContext | None = None) -> AsyncIterator[Addr]:
    """Run the server on a free port for the duration of the block."""
    lsock = socket.create_server((LOCALHOST, 0))
    lsock.setblocking(False)
    async with ds_trio.loop(errors="log") as loop:
        ds_trio.Listener(lsock, make_post_accept(str(root), tls))
        yield LOCALHOST, lsock.getsockname()[1]
        loop.stop()


async def in_thread(fn: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(fn)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def connect(addr: Addr) -> socket.socket:
    sock = socket.create_connection(addr, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(
    f: BinaryIO, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response from a raw stream (1xx responses included)."""
    line = f.readline()
    if not line:
        raise EOFError("connection closed before a response")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_only or status < 200 else int(headers["content-length"])
    return status, headers, f.read(length)


def raw_exchange(addr: Addr, request: bytes) -> bytes:
    """Send one request and read until the server closes (or 10 s pass)."""
    with connect(addr) as sock:
        sock.sendall(request)
        data = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return bytes(data)


# ----------------------------------------------------------------------
# Real clients: http.client, urllib
# ----------------------------------------------------------------------


async def test_get_head_and_keep_alive_on_one_connection(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ds_trio.examples.httpd")
    big = (root / "big.bin").read_bytes()

    def client(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/small.txt")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"hello, world\n")
        assert resp.getheader("Content-Type") == "text/plain"
        sock = conn.sock
        conn.request("HEAD", "/big.bin")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(BIG)
        assert resp.read() == b""
        conn.request("GET", "/big.bin")
        resp = conn.getresponse()
        assert resp.read() == big
        conn.request("GET", "/sub/")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"<h1>index</h1>\n")
        for missing in ("/nope", "/empty/"):
            conn.request("GET", missing)
            resp = conn.getresponse()
            assert resp.status == 404
            resp.read()
        assert conn.sock is sock  # every request on the same connection
        conn.close()

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))
    no_errors_logged(caplog)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ds_trio.examples.httpd" and "HEAD" in r.getMessage()
    ]
    assert len(lines) == 1
    assert lines[0].endswith("HEAD /big.bin 200 0")
    assert lines[0].startswith("127.0.0.1:")


async def test_urllib_get_and_404(root: Path) -> None:
    def client(addr: Addr) -> None:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/sub/index.html") as r:
            assert r.read() == b"<h1>index</h1>\n"
            assert r.headers["Content-Type"] == "text/html"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/missing", timeout=10)
        assert info.value.code == 404
        info.value.close()

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_range_206_and_416(root: Path) -> None:
    big = (root / "big.bin").read_bytes()

    def get(conn: http.client.HTTPConnection, rng: str) -> http.client.HTTPResponse:
        conn.request("GET", "/big.bin", headers={"Range": rng})
        return conn.getresponse()

    def client(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        resp = get(conn, "bytes=0-9")
        assert (resp.status, resp.read()) == (206, big[:10])
        assert resp.getheader("Content-Range") == f"bytes 0-9/{BIG}"
        resp = get(conn, "bytes=-5")
        assert (resp.status, resp.read()) == (206, big[-5:])
        resp = get(conn, f"bytes={BIG - 3}-")
        assert (resp.status, resp.read()) == (206, big[-3:])
        resp = get(conn, f"bytes={BIG}-")
        assert resp.status == 416
        assert resp.getheader("Content-Range") == f"bytes */{BIG}"
        resp.read()
        resp = get(conn, "bytes=0-1,5-6")  # documented: whole file
        assert (resp.status, len(resp.read())) == (200, BIG)
        conn.close()

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_absurd_range_headers_on_one_connection(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = (root / "big.bin").read_bytes()
    huge = "9" * 5000  # int() of this raises ValueError on Python >= 3.11
    cases = [
        (f"bytes={huge}-", 416, b""),
        (f"bytes=0-{huge}", 206, big),
        (f"bytes=-{huge}", 206, big),
        (f"bytes=00000000000000000000000000{BIG - 2}-", 206, big[-2:]),
        ("bytes=5-1", 416, b""),
        ("bytes=-0", 416, b""),
        ("bytes=-", 416, b""),
        ("bytes=--1", 200, big),  # malformed: ignored
        ("bytes=\u00b2-", 200, big),  # not an ASCII digit: ignored
        ("items=0-1", 200, big),  # unknown unit: ignored
        ("bytes=0-0", 206, big[:1]),
        ("bytes=" + ",".join(["0-0"] * 1000), 200, big),  # many ranges: whole file
    ]

    def client(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        sock = None
        for rng, status, body in cases:
            conn.request("GET", "/big.bin", headers={"Range": rng})
            resp = conn.getresponse()
            got = resp.read()
            assert resp.status == status, rng[:40]
            if status != 416:
                assert got == body, rng[:40]
            sock = sock or conn.sock
            assert conn.sock is sock  # no answer closed the connection
        conn.close()

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))
        await wait_for(lambda: not live_clients())
        # Every file opened for a range answer was closed again.
        assert not open_files_named("big.bin")
    no_errors_logged(caplog)


def deleted_files() -> set[str]:
    """Unlinked files this process holds open (spill files show so)."""
    return {t for t in ds_trio.testing.open_fds().values() if "(deleted)" in t}


def open_files_named(name: str) -> list[str]:
    return [t for t in ds_trio.testing.open_fds().values() if t.endswith("/" + name)]


def test_parse_range() -> None:
    assert _parse_range("bytes=0-9", 100) == (0, 10)
    assert _parse_range("bytes=90-200", 100) == (90, 100)
    assert _parse_range("bytes=-10", 100) == (90, 100)
    assert _parse_range("bytes=-200", 100) == (0, 100)
    assert _parse_range("bytes=100-", 100) is None
    assert _parse_range("bytes=-0", 100) is None
    assert _parse_range("bytes=0-0", 0) is None
    assert _parse_range("bytes=" + "9" * 5000 + "-", 100) is None
    assert _parse_range("bytes=0-" + "9" * 5000, 100) == (0, 100)
    assert _parse_range("bytes=-" + "9" * 5000, 100) == (0, 100)
    assert _parse_range("bytes=0099-", 100) == (99, 100)


async def test_request_bodies_are_read_and_discarded(root: Path) -> None:
    def client(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/small.txt", body=b"x" * 200_000)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"hello, world\n")
        chunks = iter([b"abc", b"d" * 70_000, b"e"])
        conn.request("GET", "/small.txt", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"hello, world\n")
        conn.request("POST", "/small.txt", body=b"y" * 1000)
        resp = conn.getresponse()
        assert resp.status == 405
        assert resp.getheader("Allow") == "GET, HEAD"
        resp.read()
        conn.request("GET", "/sub/")  # framing survived all of the above
        assert conn.getresponse().read() == b"<h1>index</h1>\n"
        conn.close()

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_expect_100_continue(root: Path) -> None:
    def client(addr: Addr) -> None:
        with connect(addr) as sock, sock.makefile("rb") as f:
            sock.sendall(
                b"GET /small.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            assert read_response(f)[0] == 100  # before any body byte was sent
            sock.sendall(b"12345")
            assert read_response(f)[::2] == (200, b"hello, world\n")

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


# ----------------------------------------------------------------------
# Pipelining, trickling, backpressure, broken clients
# ----------------------------------------------------------------------


async def test_pipelined_requests_in_one_send_with_a_slow_reader(root: Path) -> None:
    big = (root / "big.bin").read_bytes()

    def client(addr: Addr) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(addr)
        sock.sendall(
            b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /sub/ HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /sub/index.html HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        time.sleep(0.2)  # the server fills the socket and must wait for us
        data = bytearray()
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        f = io.BytesIO(bytes(data))
        assert read_response(f)[::2] == (200, big)
        assert read_response(f)[::2] == (200, b"hello, world\n")
        status, headers, _ = read_response(f, head_only=True)
        assert (status, headers["content-length"]) == (200, "15")
        assert read_response(f)[0] == 404
        status, headers, body = read_response(f)
        assert (status, body, headers["connection"]) == (
            200,
            b"<h1>index</h1>\n",
            "close",
        )
        assert f.read() == b""

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_bodyless_responses_send_their_head_without_msg_more(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpd-corner.t's "no TCP_CORK on empty body", without timing.

    A head sent with MSG_MORE and nothing after it waits ~200 ms in the
    kernel, and a zero-length write does not push it out: a response
    without a body must send its head with ``write``.
    """
    (root / "zero.txt").write_bytes(b"")
    held: list[bytes] = []
    real_msg_more = HTTPClient.msg_more

    def spy(self: HTTPClient, data: bytes | bytearray | memoryview) -> bool:
        held.append(bytes(data).split(b"\r\n", 1)[0])
        return real_msg_more(self, data)

    monkeypatch.setattr(HTTPClient, "msg_more", spy)
    requests = [
        b"GET /zero.txt HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /small.txt HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /small.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=5-\r\n\r\n",
    ]

    def client(addr: Addr) -> None:
        with connect(addr) as sock, sock.makefile("rb") as f:
            sock.sendall(requests[0])
            assert read_response(f)[::2] == (200, b"")
            assert held == []
            sock.sendall(requests[1])
            status, headers, _ = read_response(f, head_only=True)
            assert (status, headers["content-length"]) == (200, "13")
            assert held == []
            # A body follows: the head goes with MSG_MORE (the spy works).
            sock.sendall(requests[2])
            assert read_response(f)[::2] == (206, b", world\n")
            assert held == [b"HTTP/1.1 206 Partial Content"]

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_trickled_request_one_byte_at_a_time(root: Path) -> None:
    request = (
        b"GET /small.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /sub/ HTTP/1.0\r\n\r\n"
    )

    def client(addr: Addr) -> None:
        with connect(addr) as sock, sock.makefile("rb") as f:
            for byte in request:
                sock.send(bytes([byte]))
                time.sleep(0.0005)
            assert read_response(f)[::2] == (200, b"hello, world\n")
            assert read_response(f)[::2] == (200, b"<h1>index</h1>\n")
            assert f.read() == b""  # HTTP/1.0 without keep-alive: closed

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


async def test_premature_disconnect_during_a_large_response(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def quitter(addr: Addr) -> None:
        for _ in range(3):
            with connect(addr) as sock:
                sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(1000).startswith(b"HTTP/1.1 200")
                sock.setsockopt(  # RST on close: the harshest disconnect
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"
                )

    def fine(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("GET", "/big.bin")
        assert len(conn.getresponse().read()) == BIG
        conn.close()

    async with serving(root) as addr:
        await in_thread(lambda: quitter(addr))
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(in_thread, lambda: fine(addr))
        # Every streamed file was closed with its connection.
        for _ in range(50):
            if not [c for c in live_clients() if c.stream is not None]:
                break
            await anyio.sleep(0.01)
        assert not [c for c in live_clients() if c.stream is not None]
    no_errors_logged(caplog)


async def test_client_that_never_reads_stops_being_read_and_served(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined downloads nobody reads: one response at a time, bounded.

    The server parses the next request only once the previous response
    drained, so it starts no second response and stops reading the socket
    (the client's sends hit EAGAIN); other clients are served meanwhile, and
    closing the never-reader releases its file and any spill file.
    """
    caplog.set_level(logging.INFO, logger="ds_trio.examples.httpd")
    request = b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
    deleted_before = deleted_files()

    def flood(sock: socket.socket) -> int:
        sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 64 * 1024 * 1024:
                sent += sock.send(request * 1000)
        return sent

    def fine(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(2):
            conn.request("GET", "/big.bin")
            assert len(conn.getresponse().read()) == BIG
        conn.close()

    def started_for(port: int) -> int:
        return sum(
            f"127.0.0.1:{port} GET /big.bin 200" in r.getMessage()
            for r in caplog.records
        )

    async with serving(root) as addr:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(addr)
        port = sock.getsockname()[1]
        try:
            # 64 MiB of requests would be ~1.7 million responses; a server
            # reading on regardless would take them all, and log more
            # started responses below.
            assert await in_thread(lambda: flood(sock)) < 64 * 1024 * 1024
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(in_thread, lambda: fine(addr))
            # The kernel's loopback buffers (the server's send buffer grows to
            # 4 MiB) may swallow a whole 3 MiB response, never a third one.
            assert 1 <= started_for(port) <= 2
            mine = [c for c in live_clients() if c.peer.endswith(f":{port}")]
            assert len(mine) == 1
            assert mine[0].stream is not None  # mid-response, waiting for us
            assert mine[0].wbuf
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
        await wait_for(lambda: not live_clients())
        assert not open_files_named("big.bin")
        assert deleted_files() <= deleted_before
    no_errors_logged(caplog)


async def test_chunked_body_and_pipelined_requests_across_writes(root: Path) -> None:
    """Bytes after a chunked body, and half a request, wait for their turn.

    httpd-corner.t: a chunked body whose end shares one write with the next
    request, and "a request, then the first bytes of the next" whose rest
    comes after the first response.
    """

    def client(addr: Addr) -> None:
        with connect(addr) as sock, sock.makefile("rb") as f:
            sock.sendall(
                b"GET /small.txt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\na\r\n"
            )
            sock.sendall(b"0123456789\r\n0\r\n\r\nGET /sub/ HTTP/1.1\r\n\r\nGE")
            assert read_response(f)[::2] == (200, b"hello, world\n")
            assert read_response(f)[::2] == (200, b"<h1>index</h1>\n")
            sock.sendall(b"T /small.txt HTTP/1.0\r\n\r\n")
            assert read_response(f)[::2] == (200, b"hello, world\n")
            assert f.read() == b""

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


@pytest.mark.parametrize(
    ("head", "endless"),
    [
        # httpd-corner.t's chunk-header DoS: a chunk-size line that never ends.
        (b"", b"ffffffff"),
        # ... and the chunk-trailer DoS: CRs where a chunk's CRLF belongs.
        (b"1\r\na", b"\r" * 8),
    ],
    ids=["chunk-size", "chunk-crlf"],
)
async def test_endless_chunk_lines_are_refused(
    root: Path, head: bytes, endless: bytes
) -> None:
    def client(addr: Addr) -> bytes:
        with connect(addr) as sock:
            sock.sendall(
                b"PUT /small.txt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + head
            )
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(1_000_000):  # 8 MB; the caps are 256 and 2 bytes
                    sock.sendall(endless)
                pytest.fail("the server kept reading an endless chunk line")
            with contextlib.suppress(ConnectionResetError):
                return sock.recv(100)
            return b""

    async with serving(root) as addr:
        answer = await in_thread(lambda: client(addr))
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer


async def test_file_shrinking_mid_response_closes_the_connection(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The promised Content-Length cannot be kept: close, do not hang."""
    victim = root / "shrinks.bin"
    size = 16 * 1024 * 1024  # more than the socket buffers hold
    victim.write_bytes(b"z" * size)

    def client(addr: Addr) -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        with sock:
            sock.connect(addr)
            sock.sendall(b"GET /shrinks.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            data = bytearray(sock.recv(4096))
            os.truncate(victim, 1000)
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
            return bytes(data)

    async with serving(root) as addr:
        answer = await in_thread(lambda: client(addr))
        await wait_for(lambda: not live_clients())
        assert not open_files_named("shrinks.bin")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {size}".encode() in head
    assert 0 < len(body) < size
    no_errors_logged(caplog)


def live_clients() -> list[HTTPClient]:
    loop = ds_trio.current_loop()
    return [o for o in loop.descriptor_map.values() if isinstance(o, HTTPClient)]


async def test_huge_request_line_and_endless_headers_while_others_are_served(
    root: Path,
) -> None:
    def huge_line(addr: Addr) -> None:
        with connect(addr) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"GET /" + b"a" * 1_000_000 + b" HTTP/1.1\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                answer = sock.recv(100)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 414"), answer

    def endless_headers(addr: Addr) -> None:
        with connect(addr) as sock:
            sock.sendall(b"GET /small.txt HTTP/1.1\r\n")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(100_000):  # ~2 MB; the cap is 16 KiB
                    sock.sendall(b"X-Junk: 0123456789\r\n")
                pytest.fail("the server kept reading an endless header")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                answer = sock.recv(100)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer

    def others(addr: Addr) -> None:
        conn = http.client.HTTPConnection(*addr, timeout=10)
        for _ in range(20):
            conn.request("GET", "/small.txt")
            assert conn.getresponse().read() == b"hello, world\n"
        conn.close()

    async with serving(root) as addr, anyio.create_task_group() as tg:
        tg.start_soon(in_thread, lambda: huge_line(addr))
        tg.start_soon(in_thread, lambda: endless_headers(addr))
        tg.start_soon(in_thread, lambda: others(addr))


CHUNKED = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\n\r\n", 400),
        (b"BREW /small.txt HTTP/1.0\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nContent-Length: 3.3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: bogus\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nSpaced-Out : 3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        # Numbers int() refuses (over 4300 digits) or that are no ASCII digits.
        (b"GET / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
        (CHUNKED + b"f" * 17 + b"\r\n", 400),
        (CHUNKED + b"-1\r\n", 400),
    ],
)
async def test_malformed_requests(
    root: Path, request_bytes: bytes, status: int
) -> None:
    async with serving(root) as addr:
        answer = await in_thread(lambda: raw_exchange(addr, request_bytes))
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer


# ----------------------------------------------------------------------
# Path safety: never a byte from outside the root
# ----------------------------------------------------------------------

ESCAPES = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/..%2fsecret.txt",
    "/sub/..%2f..%2fsecret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/%00",
    "/small.txt%00.html",
    "/link-out",
    "/linkdir/secret.txt",
    "/linkdir/root/small.txt/../../secret.txt",
    "//etc/passwd",
    "secret.txt",
]


async def test_path_traversal_never_leaks_a_byte(root: Path) -> None:
    def client(addr: Addr) -> list[bytes]:
        return [
            raw_exchange(addr, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            for path in ESCAPES
        ]

    async with serving(root) as addr:
        answers = await in_thread(lambda: client(addr))
        answer_inside = await in_thread(
            lambda: raw_exchange(addr, b"GET /link-in HTTP/1.0\r\n\r\n")
        )
    for path, answer in zip(ESCAPES, answers, strict=True):
        assert SECRET not in answer, path
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, (path, answer[:40])
    # A symlink that stays inside the root is followed; the refusals above are
    # about leaving the root, not about symlinks.
    assert answer_inside.endswith(b"\r\n\r\n<h1>index</h1>\n")


# ----------------------------------------------------------------------
# Idle expiry (virtual time)
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(
            ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
            id="trio-mockclock",
        )
    ],
)
async def test_idle_connection_is_closed_after_exptime(root: Path) -> None:
    def client(addr: Addr) -> bytes:
        with connect(addr) as sock:
            return sock.recv(100)  # blocks until the server closes

    async with serving(root) as addr:
        start = trio.current_time()
        assert await in_thread(lambda: client(addr)) == b""
        assert trio.current_time() - start >= HTTPClient.EXPTIME


# ----------------------------------------------------------------------
# curl
# ----------------------------------------------------------------------

needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed"
)


def curl(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--http1.1", "--max-time", "20", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        check=True,
    )


@needs_curl
async def test_curl_reuses_the_connection_ranges_and_head(root: Path) -> None:
    big = (root / "big.bin").read_bytes()

    def client(addr: Addr) -> None:
        base = f"http://{addr[0]}:{addr[1]}"
        out = curl("-v", f"{base}/small.txt", f"{base}/sub/")
        assert out.stdout == b"hello, world\n<h1>index</h1>\n"
        assert b"Re-using existing connection" in out.stderr
        out = curl("-w", "%{num_connects}", "-o", os.devnull, "-o", os.devnull,
                   f"{base}/big.bin", f"{base}/small.txt")  # fmt: skip
        assert out.stdout == b"10"  # one connect, then none (reused)
        assert curl("--range", "0-9", f"{base}/big.bin").stdout == big[:10]
        head = curl("-I", f"{base}/big.bin").stdout
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert f"Content-Length: {BIG}\r\n".encode() in head
        assert curl(f"{base}/big.bin").stdout == big
        # Upload of unknown length (chunked) with 100-continue: discarded.
        out = curl("-T-", "-X", "GET", "-H", "Expect: 100-continue",
                   f"{base}/small.txt", stdin=b"x" * 100_000)  # fmt: skip
        assert out.stdout == b"hello, world\n"

    async with serving(root) as addr:
        await in_thread(lambda: client(addr))


# ----------------------------------------------------------------------
# TLS, the command line, graceful shutdown, workers
# ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(cert chain, key, CA) PEM files for "localhost" from a throwaway CA."""
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    return str(where / "cert.pem"), str(where / "key.pem"), str(where / "ca.pem")


async def test_tls_keep_alive_and_big_file(
    root: Path, tls_files: tuple[str, str, str]
) -> None:
    cert, key, ca = tls_files
    client_ctx = ssl.create_default_context(cafile=ca)
    big = (root / "big.bin").read_bytes()

    def client(addr: Addr) -> None:
        conn = http.client.HTTPSConnection(
            "localhost", addr[1], timeout=10, context=client_ctx
        )
        conn.request("GET", "/small.txt")
        assert conn.getresponse().read() == b"hello, world\n"
        conn.request("GET", "/big.bin", headers={"Range": "bytes=1-"})
        assert conn.getresponse().read() == big[1:]
        conn.close()

    async with serving(root, _tls_context(cert, key)) as addr:
        await in_thread(lambda: client(addr))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_until_served(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Poll until the server answers (bounded); fail if it died."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("server did not start")


@pytest.mark.parametrize("workers", [0, 1])
def test_main_serves_and_finishes_a_download_on_sigterm(
    root: Path, workers: int
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ds_trio.examples.httpd",
            "--root",
            str(root),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_served(port, proc)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((LOCALHOST, port))
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        data = bytearray(sock.recv(4096))
        time.sleep(0.2)  # let the worker, too, see its client mid-response
        proc.send_signal(signal.SIGTERM)
        while chunk := sock.recv(65536):  # the busy client is let finish
            data += chunk
        sock.close()
        f = io.BytesIO(bytes(data))
        status, _, body = read_response(f)
        assert (status, len(body)) == (200, BIG)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
