"""Load and bad input: 10,000 connections, slowloris, fuzzed requests.

The fast tier of the fault suite's load half (``bench/soak.py`` is the long
one).  Every scenario records one :class:`~tests.faultlib.FaultRow` per
backend and asserts that no byte was lost and nothing leaked:

* 10,000 connections to the echo example, all idle, then all active; the
  server runs in a child process (``bench/loadserver.py``) so its fd limit
  and RSS are its own.
* slowloris: 1,000 clients trickling a byte a second beside 50 clients
  doing real work; the tricklers are expired, the work is byte-exact.  On
  trio the clock is a MockClock (real loopback sockets, virtual seconds);
  on asyncio the seconds are real and short, and the check runs as soon as
  the tricklers are past ``EXPTIME`` instead of at the next 60 s batch.
* fuzzing (hypothesis): the httpd example's request handling, random bytes
  at a TLS port, and random sequences of write-path calls on one DS object.

No speed is asserted here: throughput under load is measured by the soak.
``DS_TRIO_FUZZ_SCALE=N`` multiplies the fuzz tests' example counts for a
longer hunt than CI's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import random
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trio.testing
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio.examples import echo, httpd
from ds_trio.testing import assert_no_leaks

from .faultlib import FaultRow, record
from .helpers import wait_for
from .loadclients import REPO, Pool, ServerProcess, raise_nofile

HOST = "127.0.0.1"
GUARD = 60  # real-time bound against hangs, never an assertion on speed
SERVER_BACKENDS = ["asyncio", "trio"]

#: Multiplies every fuzz test's example count (a longer hunt than CI's).
FUZZ_SCALE = int(os.environ.get("DS_TRIO_FUZZ_SCALE", "1"))

FUZZ = settings(
    max_examples=50 * FUZZ_SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # every run explores afresh; failures print their example
)


@contextlib.asynccontextmanager
async def recorded(row: FaultRow) -> AsyncIterator[FaultRow]:
    """Record ``row`` with the leaks found around the block (then assert)."""
    try:
        async with assert_no_leaks() as report:
            yield row
    finally:
        row.add_leaks(report)
        record(row)


# ----------------------------------------------------------------------
# 10,000 connections, idle then active
# ----------------------------------------------------------------------

CONNS = 10_000


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_10k_connections_idle_then_active_none_dropped(backend: str) -> None:
    # The client side holds CONNS fds; the server, in its own process,
    # raises its own limit the same way.
    limit = raise_nofile(CONNS + 256)
    if limit < CONNS + 256:
        pytest.skip(f"RLIMIT_NOFILE hard limit {limit} < {CONNS + 256}")
    row = FaultRow(
        "10k conns idle+active",
        backend,
        f"{CONNS:,} conns held idle, then each echoes a line",
        "none",
    )
    server = ServerProcess("echo", backend)
    try:
        base = server.stats()
        with Pool(server.port) as pool:
            pool.connect(
                CONNS,
                accepted=lambda n: server.wait_registered(base["registered"] + n),
            )
            idle = server.stats()
            assert idle["registered"] == base["registered"] + CONNS
            per_conn = (idle["rss_kib"] - base["rss_kib"]) / CONNS
            row.note = f"server RSS {per_conn:.1f} KiB per idle conn"
            lost, dropped = pool.exchange(
                pool.socks, lambda i: b"client %d says hello\n" % i
            )
            row.bytes_lost = lost
            assert (lost, dropped) == (0, 0)
            # Every connection is still there after answering.
            assert server.stats()["registered"] == base["registered"] + CONNS
        server.wait_registered(base["registered"])
        after = server.wait_stats(
            lambda st: st["fds"] == base["fds"] and st["tasks"] == base["tasks"],
            timeout=GUARD,
        )
        row.fds = after["fds"] - base["fds"]
        row.spill = after["spill"] - base["spill"]  # fd 2 may be a deleted file
        row.tasks = after["tasks"] - base["tasks"]
        row.zombies = server.zombies()
        assert server.quit() == 0
    finally:
        server.kill()
        record(row)
    assert row.clean, row


# ----------------------------------------------------------------------
# Slowloris
# ----------------------------------------------------------------------

TRICKLERS = 1_000
WORKERS = 50
SLOWLORIS_BACKENDS = [
    # Virtual seconds: a byte per second, EXPTIME 30 s, the real 60 s
    # ``later`` batch that runs the check.
    pytest.param(
        ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
        id="trio-mockclock",
    ),
    # Real seconds, short: a byte every 0.25 s, EXPTIME 2 s, and the check
    # run directly once the tricklers are past EXPTIME.
    pytest.param(("asyncio", {}), id="asyncio"),
]


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", SLOWLORIS_BACKENDS)
async def test_slowloris_tricklers_expire_while_workers_are_served_exactly(
    anyio_backend: tuple[str, Any],
) -> None:
    raise_nofile(2 * (TRICKLERS + WORKERS) + 256)
    virtual = anyio_backend[0] == "trio"
    exptime, tick = (30.0, 1.0) if virtual else (2.0, 0.25)
    rng = random.Random(1)
    row = FaultRow(
        "slowloris",
        "trio" if virtual else "asyncio",
        f"{WORKERS} workers echoing lines",
        f"{TRICKLERS:,} clients trickling a byte/{'s' if virtual else '0.25 s'}",
    )
    lifetimes: list[float] = []
    unexpected: list[str] = []
    worker_lost = [0]
    last_echo: list[float] = [0.0] * WORKERS
    tricklers_done = anyio.Event()
    stop_workers = anyio.Event()
    workers_left = -1
    listener = socket.create_server((HOST, 0), backlog=4096)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def tricklers() -> None:
        # One task sends every trickler its byte, all at the same instants:
        # on the MockClock that is one clock jump per tick, not 1,000.
        # Blocking connects: the kernel completes them (backlog 4096)
        # before the server accepts.
        socks = {socket.create_connection((HOST, port)): ds_trio.now()}
        for _ in range(TRICKLERS - 1):
            socks[socket.create_connection((HOST, port))] = ds_trio.now()
        try:
            for sock in socks:
                sock.setblocking(False)
            while socks:
                await anyio.sleep(tick)
                for sock, start in list(socks.items()):
                    try:
                        sock.send(b"x")
                        data = sock.recv(1)
                    except BlockingIOError:
                        continue  # alive, nothing to read: as it should be
                    except OSError:  # EPIPE/ECONNRESET: closed by the server
                        data = b""
                    if data:
                        unexpected.append(f"trickler got {data!r}")  # no newline
                    lifetimes.append(ds_trio.now() - start)
                    del socks[sock]
                    sock.close()
        finally:
            for sock in socks:
                sock.close()
        tricklers_done.set()

    async def worker(index: int) -> None:
        stream = await anyio.connect_tcp(HOST, port)
        async with stream:
            while not stop_workers.is_set():
                line = rng.randbytes(rng.randint(0, 3000)).replace(b"\n", b" ") + b"\n"
                await stream.send(line)
                got = bytearray()
                while len(got) < len(line):
                    try:
                        got += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        unexpected.append(f"worker {index} was closed")
                        worker_lost[0] += len(line) - len(got)
                        return
                if got != line:
                    worker_lost[0] += len(line)
                last_echo[index] = ds_trio.now()
                await anyio.sleep(tick)

    async with recorded(row):
        with anyio.fail_after(10 * exptime + 120 if virtual else GUARD):
            async with ds_trio.loop(exptime=exptime) as lp:
                ds_trio.Listener(listener, echo.make_post_accept(), accepts_per_wake=64)
                async with anyio.create_task_group() as tg:
                    for i in range(WORKERS):
                        tg.start_soon(worker, i)
                    tg.start_soon(tricklers)
                    if not virtual:
                        # Past EXPTIME for every trickler (touched only when
                        # it connected); then a fresh echo from every worker,
                        # and the check at once instead of at the next 60 s
                        # batch.
                        await _wait(
                            lambda: (
                                lp.statistics().registered == TRICKLERS + WORKERS + 1
                            )
                        )
                        await anyio.sleep(exptime + 2 * tick)
                        mark = ds_trio.now()
                        await _wait(lambda: min(last_echo) > mark)
                        ds_trio.expire_old()
                    await tricklers_done.wait()
                    # Every worker is still connected: none was expired.
                    await wait_for(lambda: lp.statistics().pending_closes == 0)
                    workers_left = lp.statistics().registered - 1
                    stop_workers.set()
                lp.stop()
        row.bytes_lost = worker_lost[0]
        row.note = (
            f"tricklers expired after {min(lifetimes):.1f}-{max(lifetimes):.1f} s"
            f" (EXPTIME {exptime:g} s)"
        )
    assert unexpected == []
    assert workers_left == WORKERS
    assert len(lifetimes) == TRICKLERS
    if virtual:
        # Between EXPTIME and EXPTIME + one later batch (+ a tick to notice).
        assert exptime < min(lifetimes)
        assert max(lifetimes) <= exptime + ds_trio.LATER_DELAY + tick
    assert row.clean, row


HEADER_TRICKLERS = 100


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", SLOWLORIS_BACKENDS)
async def test_httpd_header_tricklers_expire_uploads_and_requests_do_not(
    anyio_backend: tuple[str, Any], http_root: Path
) -> None:
    """Header bytes trickling in are not activity; body bytes and requests are."""
    virtual = anyio_backend[0] == "trio"
    exptime, tick = (30.0, 1.0) if virtual else (2.0, 0.25)
    listener = socket.create_server((HOST, 0), backlog=1024)
    listener.setblocking(False)
    addr = listener.getsockname()
    small = (http_root / "small.txt").read_bytes()
    row = FaultRow(
        "httpd slowloris",
        "trio" if virtual else "asyncio",
        "1 chunked upload trickling + 1 client with a request per tick",
        f"{HEADER_TRICKLERS} clients trickling header bytes",
    )
    lifetimes: list[float] = []
    fetched = [0]
    header = b"GET /small.txt HTTP/1.1\r\nX-Slow: " + b"a" * 2000

    async def exchange(sock: socket.socket, data: bytes, want: int) -> bytes:
        sock.sendall(data)
        got = bytearray()
        while len(got) < want:
            await anyio.wait_readable(sock)
            chunk = sock.recv(65536)
            assert chunk, "closed"
            got += chunk
        return bytes(got)

    async with recorded(row):
        with anyio.fail_after(10 * exptime + 120 if virtual else GUARD):
            async with ds_trio.loop(exptime=exptime, errors="raise") as lp:
                ds_trio.Listener(listener, httpd.make_post_accept(str(http_root)))
                tricklers = {socket.create_connection(addr): ds_trio.now()}
                for _ in range(HEADER_TRICKLERS - 1):
                    tricklers[socket.create_connection(addr)] = ds_trio.now()
                uploader = socket.create_connection(addr)
                fetcher = socket.create_connection(addr)
                for sock in (*tricklers, uploader, fetcher):
                    sock.setblocking(False)
                uploader.sendall(
                    b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"7fffffff\r\n"
                )
                t0 = ds_trio.now()
                sent = 0
                while tricklers:
                    await anyio.sleep(tick)
                    uploader.send(b"u")  # one body byte per tick
                    response = await exchange(
                        fetcher, b"GET /small.txt HTTP/1.1\r\n\r\n", 1
                    )
                    while not response.endswith(small):
                        response += await exchange(fetcher, b"", 1)
                    fetched[0] += 1
                    for sock, start in list(tricklers.items()):
                        try:
                            sock.send(header[sent : sent + 1])
                            data = sock.recv(1)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        assert data == b"", data  # no response to half a head
                        lifetimes.append(ds_trio.now() - start)
                        del tricklers[sock]
                        sock.close()
                    sent += 1
                    if not virtual and ds_trio.now() - t0 > exptime + 2 * tick:
                        ds_trio.expire_old()
                # The upload and the fetching client were never expired.
                uploader.send(b"u")
                head = await exchange(fetcher, b"HEAD / HTTP/1.1\r\n\r\n", 9)
                assert head.startswith(b"HTTP/1.1 ")
                await wait_for(lambda: lp.statistics().pending_closes == 0)
                assert lp.statistics().registered == 3
                uploader.close()
                fetcher.close()
                lp.stop()
        row.note = (
            f"tricklers expired after {min(lifetimes):.1f}-{max(lifetimes):.1f} s,"
            f" {fetched[0]} requests served (EXPTIME {exptime:g} s)"
        )
    assert len(lifetimes) == HEADER_TRICKLERS
    if virtual:
        assert exptime < min(lifetimes)
        assert max(lifetimes) <= exptime + ds_trio.LATER_DELAY + tick
    assert row.clean, row


async def _wait(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():
            await anyio.sleep(0.01)


# ----------------------------------------------------------------------
# Fuzzing the httpd example
# ----------------------------------------------------------------------

SECRET = b"TOP-SECRET-outside-the-root"


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "secret.txt").write_bytes(SECRET)
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"hello, world\n")
    (root / "sub" / "index.html").write_bytes(b"<h1>index</h1>\n")
    (root / "big.bin").write_bytes(bytes(range(32, 127)) * 2000)
    (root / "link-out").symlink_to(base / "secret.txt")
    (root / "linkdir").symlink_to(base)
    return root


def served_files(root: Path) -> list[bytes]:
    return [
        p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(root)
    ]


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ([A-Za-z ]+)")


def check_http_output(out: bytes, files: list[bytes]) -> list[int]:
    """Assert ``out`` is a sequence of well-formed responses; their statuses.

    A response whose body would start with the next status line is a HEAD
    response (no body).  A 200/206 body must be (part of) a served file; an
    error body is the status line's text.
    """
    assert SECRET not in out
    statuses = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n\r\n", pos)
        assert end >= 0, f"truncated response head: {out[pos : pos + 300]!r}"
        status_line, *fields = out[pos:end].split(b"\r\n")
        m = _STATUS.fullmatch(status_line)
        assert m, status_line
        status = int(m[1])
        statuses.append(status)
        headers = {}
        for field in fields:
            name, colon, value = field.partition(b":")
            assert colon, field
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if status == 100:
            continue
        length = int(headers[b"content-length"])
        if out.startswith(b"HTTP/1.1 ", pos) or pos == len(out):
            continue  # HEAD
        body = out[pos : pos + length]
        assert len(body) == length, f"short body for {status}"
        if status in (200, 206):
            assert any(body in f for f in files), body[:100]
        else:
            assert body == b"%d %s\n" % (status, m[2])
        pos += length
    return statuses


async def http_session(root: Path, pieces: list[bytes]) -> bytes:
    """Feed ``pieces`` to one HTTPClient over a socketpair; all it answered.

    The client's write side is shut after the last piece, so the server
    always ends the session: by answering and closing, or on EOF.
    """
    server_sock, client = socket.socketpair()
    client.setblocking(False)
    out = bytearray()
    with client:
        async with ds_trio.loop(errors="raise") as lp, anyio.create_task_group() as tg:
            obj = httpd.HTTPClient(server_sock, str(root))

            async def send() -> None:
                try:
                    for piece in pieces:
                        view = memoryview(piece)
                        while view:
                            await anyio.wait_writable(client)
                            view = view[client.send(view) :]
                        await anyio.lowlevel.checkpoint()
                    client.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # answered and closed early (400 and the like)

            tg.start_soon(send)
            with anyio.fail_after(GUARD):
                while True:
                    await anyio.wait_readable(client)
                    try:
                        data = client.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    out += data
            await _wait(lambda: obj.sock is None)
            lp.stop()
    return bytes(out)


@pytest.mark.anyio
async def test_httpd_request_from_a_client_already_gone_leaks_no_file_fd(
    http_root: Path,
) -> None:
    """Found by the soak: a GET whose client reset before the server parsed it.

    The response head's write finds the connection broken and closes the
    object; the file opened for the body must be closed with it.
    """
    async with assert_no_leaks():
        server_sock, client = socket.socketpair()
        client.sendall(b"GET /big.bin HTTP/1.1\r\n\r\n")
        client.close()  # gone before the server reads the request
        async with ds_trio.loop(errors="raise") as lp:
            obj = httpd.HTTPClient(server_sock, str(http_root))
            await wait_for(lambda: obj.sock is None)
            lp.stop()  # not waiting for the idle check's 60 s batch
        assert obj.stream is None


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


EOL = st.sampled_from([b"\r\n", b"\n"])
METHODS = st.sampled_from(
    [b"GET", b"HEAD", b"POST", b"PUT", b"get", b"G\x00T", b"", b"GET /x", b"\xff"]
)
TARGETS = st.one_of(
    st.sampled_from(
        [
            b"/small.txt",
            b"/big.bin",
            b"/",
            b"/sub/",
            b"/sub",
            b"/../secret.txt",
            b"/%2e%2e/secret.txt",
            b"/sub/../../secret.txt",
            b"/%2E%2E%2Fsecret.txt",
            b"/..%2f..%2fsecret.txt",
            b"/link-out",
            b"/linkdir/secret.txt",
            b"/small.txt%00",
            b"/%ff%fe",
            b"*",
            b"http://x/small.txt",
            b"/small.txt?q=1#f",
            b"//secret.txt",
            b"",
        ]
    ),
    st.binary(max_size=40).map(lambda b: b"/" + b.replace(b" ", b"")),
)
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.", b""])
HEADER_NAMES = st.sampled_from(
    [
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Range",
        b"Expect",
        b"Connection",
        b"Bad Name",
        b"",
        b" Folded",
        b"X\x00",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            b"0",
            b"5",
            b"-1",
            b"99999999999999999999",
            b"1, 2",
            b"chunked",
            b"chunked, gzip",
            b"CHUNKED",
            b"bytes=0-4",
            b"bytes=-3",
            b"bytes=5-",
            b"bytes=9-1",
            b"bytes=0-1,3-4",
            b"bytes=999999-",
            b"100-continue",
            b"close",
            b"keep-alive",
            b"",
        ]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)
CHUNK_SIZES = st.sampled_from(
    [b"0", b"1", b"5", b"a", b"ff", b"-1", b"zz", b"1;ext=1", b"", b"1" * 300]
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One request, well-formed or broken in a structured way."""
    eol = draw(EOL)
    parts = [draw(METHODS), draw(TARGETS), draw(VERSIONS)]
    head = b" ".join(parts) + eol
    for name, value in draw(
        st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5)
    ):
        head += name + b": " + value + eol
    head += eol
    if draw(st.booleans()):  # a chunked body, possibly broken
        for size in draw(st.lists(CHUNK_SIZES, max_size=4)):
            head += size + eol + draw(st.binary(max_size=20)) + eol
    else:
        head += draw(st.binary(max_size=30))
    return head


def fuzz_httpd(root: Path, backend: str, data: bytes, cuts: list[int]) -> list[int]:
    out = anyio.run(http_session, root, _split(data, cuts), backend=backend)
    return check_http_output(out, served_files(root))


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_httpd_random_bytes_get_a_response_or_a_close(
    backend: str, http_root: Path
) -> None:
    row = FaultRow(
        "httpd fuzz: random bytes",
        backend,
        f"{FUZZ.max_examples} sessions",
        "random bytes, random split",
    )
    statuses: set[int] = set()

    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=20000),
            # A request line, random bytes as its header, a blank line.
            st.binary(max_size=3000).map(
                lambda b: b"GET /small.txt HTTP/1.1\r\n" + b + b"\r\n\r\n"
            ),
        ),
        st.lists(st.integers(0, 1 << 20), max_size=8),
    )
    def run(data: bytes, cuts: list[int]) -> None:
        statuses.update(fuzz_httpd(http_root, backend, data, cuts))

    try:
        run()
    except BaseException:
        # Not a byte count: marks the row unclean in the table.
        row.note = "failed: see the falsifying example"
        row.bytes_lost = -1
        raise
    finally:
        row.note = row.note or f"statuses seen: {sorted(statuses)}"
        record(row)


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_httpd_malformed_requests_get_valid_responses_never_outside_the_root(
    backend: str, http_root: Path
) -> None:
    row = FaultRow(
        "httpd fuzz: malformed requests",
        backend,
        f"{2 * FUZZ.max_examples} sessions of 1-3 pipelined requests",
        "broken methods/targets/versions/headers/chunks, traversal",
    )
    statuses: set[int] = set()

    @settings(FUZZ, max_examples=2 * FUZZ.max_examples)
    @given(
        st.lists(http_requests(), min_size=1, max_size=3),
        st.lists(st.integers(0, 1 << 16), max_size=6),
    )
    def run(requests: list[bytes], cuts: list[int]) -> None:
        statuses.update(fuzz_httpd(http_root, backend, b"".join(requests), cuts))

    try:
        run()
    except BaseException:
        # Not a byte count: marks the row unclean in the table.
        row.note = "failed: see the falsifying example"
        row.bytes_lost = -1
        raise
    finally:
        row.note = row.note or f"statuses seen: {sorted(statuses)}"
        record(row)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is optional (pip install atheris)",
)
def test_atheris_coverage_guided_httpd_sessions(tmp_path: Path) -> None:
    """A short run of bench/fuzz_httpd.py (trio only: libFuzzer owns the process)."""
    runs = 1000
    row = FaultRow("httpd fuzz: atheris", "trio", f"{runs} sessions", "libFuzzer")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "fuzz_httpd.py"),
                f"-runs={runs}",
                f"-artifact_prefix={tmp_path}/",
            ],
            capture_output=True,
            timeout=GUARD,
            check=False,
            env={**os.environ, "FUZZ_HTTPD_DIR": str(tmp_path / "fuzz")},
        )
        crashed = proc.returncode != 0
        row.bytes_lost = -1 if crashed else 0
        row.note = "crash: see the test's output" if crashed else ""
        assert not crashed, proc.stderr.decode(errors="replace")[-3000:]
    finally:
        record(row)


@given(st.binary(max_size=2000))
@settings(FUZZ, max_examples=500 * FUZZ_SCALE)
def test_parse_head_returns_a_request_or_raises_bad_request(head: bytes) -> None:
    try:
        req = httpd.parse_head(head)
    except httpd.BadRequest as exc:
        status = exc.status
    else:
        status = 0
        assert req.method
        assert req.target
        assert req.version.startswith("HTTP/1.")
    assert status in (0, 400)


@given(st.text(max_size=40), st.integers(0, 1 << 40))
@settings(FUZZ, max_examples=200 * FUZZ_SCALE)
def test_parse_range_is_within_the_file_or_none(spec: str, size: int) -> None:
    parsed = httpd._parse_range(spec, size)
    if parsed is not None:
        start, end = parsed
        assert 0 <= start < end <= size


# ----------------------------------------------------------------------
# Random bytes at a TLS port
# ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


class TLSEcho(DS):
    """Implicit TLS echo (``starttls`` at once); keeps what it served."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.starttls(ctx)

    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        buf = bytearray()
        while self.do_read(buf, 65536, len(buf)):
            pass
        if buf:
            self.write(bytes(buf))


TLS_RECORD = st.builds(
    lambda kind, version, body: (
        bytes([kind]) + version + len(body).to_bytes(2, "big") + body
    ),
    st.sampled_from([0x14, 0x15, 0x16, 0x17, 0x00, 0xFF]),
    st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x04", b"\x00\x00", b"\xff\xff"]),
    st.binary(max_size=600),
)
GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=8000),
    st.lists(TLS_RECORD, min_size=1, max_size=4).map(b"".join),
    # A record header promising more than is sent, then EOF.
    st.binary(max_size=100).map(lambda b: b"\x16\x03\x01\x40\x00" + b),
)


async def tls_offender_and_good_client(
    ctxs: tuple[ssl.SSLContext, ssl.SSLContext], garbage: bytes, payload: bytes
) -> tuple[bytes, bool]:
    """Garbage on one connection while a good client echoes ``payload``.

    Returns what the good client got back and whether the server closed
    the offender (EOF or reset after the offender shut its write side).
    """
    server_ctx, client_ctx = ctxs
    listener = socket.create_server((HOST, 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    objs: list[TLSEcho] = []
    echoed = bytearray()
    offender_closed = False

    def post_accept(sock: socket.socket, _addr: object, _l: socket.socket) -> None:
        objs.append(TLSEcho(sock, server_ctx))

    async def offender() -> None:
        nonlocal offender_closed
        with socket.create_connection((HOST, port)) as sock:
            sock.setblocking(False)
            view = memoryview(garbage)
            try:
                while view:
                    await anyio.wait_writable(sock)
                    view = view[sock.send(view) :]
                sock.shutdown(socket.SHUT_WR)
                while True:  # an alert perhaps, then EOF
                    await anyio.wait_readable(sock)
                    with contextlib.suppress(BlockingIOError):
                        if not sock.recv(65536):
                            break
            except (BrokenPipeError, ConnectionResetError):
                pass
            offender_closed = True

    async def good() -> None:
        stream = await anyio.connect_tcp(
            HOST,
            port,
            ssl_context=client_ctx,
            tls_hostname="localhost",
            tls_standard_compatible=False,
        )
        async with stream:
            await stream.send(payload)
            while len(echoed) < len(payload):
                echoed.extend(await stream.receive())

    with anyio.fail_after(GUARD):
        async with ds_trio.loop(errors="raise") as lp:
            ds_trio.Listener(listener, post_accept)
            async with anyio.create_task_group() as tg:
                tg.start_soon(offender)
                tg.start_soon(good)
            # Both clients are done: both server-side objects close.
            await _wait(lambda: len(objs) == 2 and all(o.sock is None for o in objs))
            lp.stop()
    return bytes(echoed), offender_closed


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_random_bytes_at_a_tls_port_close_the_offender_not_the_good_client(
    backend: str, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    row = FaultRow(
        "TLS port fuzz",
        backend,
        f"{FUZZ.max_examples} x (offender + a good client echoing 64 KiB)",
        "random bytes / bogus TLS records, then EOF",
    )
    payload = random.Random(7).randbytes(65536)

    @FUZZ
    @given(GARBAGE)
    def run(garbage: bytes) -> None:
        echoed, offender_closed = anyio.run(
            tls_offender_and_good_client,
            tls_contexts,
            garbage,
            payload,
            backend=backend,
        )
        if echoed != payload:
            row.bytes_lost += len(payload) - sum(
                a == b for a, b in zip(echoed, payload, strict=False)
            )
        assert echoed == payload
        assert offender_closed

    try:
        run()
    finally:
        record(row)
    assert row.clean, row


# ----------------------------------------------------------------------
# Random write-path call sequences on one DS object
# ----------------------------------------------------------------------


WRITE_PATH_EXAMPLES = 80 * FUZZ_SCALE


class Sink(DS):
    """Flushes its queue when stepped; never reads."""

    def event_step(self) -> None:
        self.flush_write()


ENDINGS = st.one_of(
    st.tuples(st.just("callable_close"), st.just(0)),
    st.tuples(st.just("close"), st.just(0)),
)
SIZES = st.one_of(
    st.sampled_from([0, 1, 4096, 65536, 100_000, 300_000]), st.integers(0, 300_000)
)
CALLS = st.one_of(
    st.tuples(st.just("write"), SIZES),
    st.tuples(st.just("write"), st.integers(0, 3000)),
    st.tuples(st.just("msg_more"), SIZES),
    st.tuples(st.just("callable"), SIZES),
    st.tuples(st.just("flush_write"), st.just(0)),
    st.tuples(st.just("requeue"), st.just(0)),
    st.tuples(
        st.just("epwait"),
        st.sampled_from(
            [
                0,
                EPOLLIN | EPOLLONESHOT,
                EPOLLOUT | EPOLLONESHOT,
                EPOLLIN | EPOLLOUT | EPOLLONESHOT,
                EPOLLIN,
            ]
        ),
    ),
    st.tuples(st.just("run"), st.integers(1, 20)),
    st.tuples(st.just("peer_read"), st.integers(1, 200_000)),
)


@st.composite
def op_sequences(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Up to 30 calls; in half of the sequences one of them closes."""
    ops = draw(st.lists(CALLS, max_size=30))
    if draw(st.booleans()):
        ops.insert(draw(st.integers(0, len(ops))), draw(ENDINGS))
    return ops


def pattern(start: int, n: int) -> bytes:
    """``n`` bytes of a stream where byte i is a function of i (any offset)."""
    base = bytes(range(251)) * ((n + 2 * 251) // 251)
    off = start % 251
    return base[off : off + n]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server((HOST, 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
    # Small fixed buffers, so a few hundred KiB of unread writes spill;
    # not so small that the receive window falls below one segment (the
    # sender would then crawl on its persist timer).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    peer.setblocking(False)
    return conn, peer


async def run_ops(ops: list[tuple[str, int]]) -> tuple[bytes, bytes, bool, int]:
    """Apply ``ops`` to a Sink: (written, received, drained_at_close, spilled).

    ``written`` is every byte accepted by a write or msg_more on the open
    object, in call order; ``received`` is what the peer read until EOF.
    """
    written = bytearray()
    received = bytearray()
    drained_at_close = False

    def read_peer(limit: int) -> None:
        while limit > 0:
            try:
                data = peer.recv(min(limit, 65536))
            except BlockingIOError:
                return
            except ConnectionResetError:
                return
            if not data:
                return
            received.extend(data)
            limit -= len(data)

    def write(obj: DS, n: int, more: bool = False) -> None:
        data = pattern(len(written), n)
        if obj.sock is not None:
            written.extend(data)
        if more:
            obj.msg_more(data)
        else:
            obj.write(data)

    def writer_of(n: int) -> Callable[[DS], None]:
        return lambda o: write(o, n)

    conn, peer = tcp_pair()
    with peer:
        async with ds_trio.loop(errors="raise") as lp:
            obj = Sink(conn, EPOLLOUT | EPOLLONESHOT)
            for op, arg in ops:
                if op == "write":
                    write(obj, arg)
                elif op == "msg_more":
                    write(obj, arg, more=True)
                elif op == "callable":
                    obj.write(writer_of(arg))
                elif op == "callable_close":
                    obj.write(lambda o: o.close())
                elif op == "flush_write":
                    obj.flush_write()
                elif op == "requeue":
                    if obj.sock is not None:
                        obj.requeue()
                elif op == "epwait":
                    obj.epwait(arg)
                elif op == "run":
                    for _ in range(arg):
                        await anyio.lowlevel.checkpoint()
                elif op == "peer_read":
                    read_peer(arg)
                elif op == "close":
                    obj.close()
            if obj.sock is not None:
                # Drain: the peer reads while the object flushes.
                with anyio.fail_after(GUARD):
                    while obj.sock is not None and not obj.flush_write():
                        read_peer(1 << 20)
                        await anyio.lowlevel.checkpoint()
                drained_at_close = obj.sock is not None
                obj.close()
            await _wait(lambda: lp.statistics().pending_closes == 0)
            spilled = lp.statistics().bytes_spilled
            lp.stop()
        with anyio.fail_after(GUARD):
            while True:
                await anyio.wait_readable(peer)
                before = len(received)
                read_peer(1 << 20)
                if len(received) == before:
                    break  # EOF (or reset)
    return bytes(written), bytes(received), drained_at_close, spilled


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_random_write_path_calls_deliver_exactly_what_was_written(
    backend: str,
) -> None:
    row = FaultRow(
        "write-path call fuzz",
        backend,
        f"{WRITE_PATH_EXAMPLES} sequences of up to 30 calls",
        "write/msg_more/callables/close/requeue/flush_write/epwait interleaved",
    )
    sequences = [0, 0, 0]  # drained before close, closed early, spilled

    @settings(FUZZ, max_examples=WRITE_PATH_EXAMPLES)
    @given(op_sequences())
    def run(ops: list[tuple[str, int]]) -> None:
        async def main() -> tuple[bytes, bytes, bool, int]:
            async with assert_no_leaks():  # spill files included
                return await run_ops(ops)

        written, received, drained, spilled = anyio.run(main, backend=backend)
        sequences[2] += spilled > 0
        # Never a byte that was not written, never out of order.
        assert written.startswith(received)
        if drained:
            if received != written:
                row.bytes_lost += len(written) - len(received)
            assert received == written
        sequences[0 if drained else 1] += 1

    try:
        run()
    finally:
        row.note = (
            f"{sequences[0]} drained then closed, {sequences[1]} closed early;"
            f" {sequences[2]} spilled"
        )
        record(row)
    assert row.clean, row


def test_pattern_is_position_dependent() -> None:
    assert pattern(0, 300)[251:] == pattern(251, 49)
    assert pattern(5, 3) == bytes([5, 6, 7])
