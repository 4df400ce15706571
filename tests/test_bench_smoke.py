"""Smoke test of the benchmark's echo servers (bench/servers/).

Each server is started as the harness starts it (port 0, "READY <port>" on
stdout), asked for one echo line and one ``bulk 1000``, and stopped with
SIGTERM.  A wrong byte here would make every benchmark figure meaningless,
and a server that ignores SIGTERM would hang the harness.

Plain synchronous tests: the servers are separate processes, so no event
loop is needed on this side.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SERVERS = BENCH / "servers"

# A server exiting 77 before READY cannot run here: skipped, as the
# harness does.
EXIT_SKIP = 77

PYTHON_SERVERS = {
    "selectors": ["selectors_echo.py"],
    "asyncio": ["asyncio_echo.py"],
    "uvloop": ["asyncio_echo.py", "--backend", "uvloop"],
    "trio": ["trio_echo.py"],
    "trio-sketch": ["trio_sketch_echo.py"],
    "anyio-asyncio": ["anyio_echo.py", "--backend", "asyncio"],
    "anyio-trio": ["anyio_echo.py", "--backend", "trio"],
    "ds_trio-trio": ["ds_trio_echo.py", "--backend", "trio"],
    "ds_trio-trio-tasks": ["ds_trio_echo.py", "--backend", "trio", "--tasks"],
    "ds_trio-asyncio": ["ds_trio_echo.py", "--backend", "asyncio"],
    "ds_trio-uvloop": ["ds_trio_echo.py", "--backend", "uvloop"],
}

STARTUP_TIMEOUT = 20.0
IO_TIMEOUT = 10.0


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first stdout line, or what came before EOF/timeout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            # byte by byte from the fd: never swallow more than the line
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                break
            buf += chunk
    return buf


def _server_env() -> dict[str, str]:
    # the checkout's ds_trio must be importable by ds_trio_echo.py, whose
    # sys.path[0] is bench/servers, even when the package is not installed
    repo = str(BENCH.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{path}" if path else repo)


@contextlib.contextmanager
def running(argv: list[str], log: Path) -> Iterator[int]:
    """Run a server; yield its port; stop it with SIGTERM and check it went."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=_server_env(),
        )
    try:
        line = _read_line(proc, STARTUP_TIMEOUT)
        if not line.startswith(b"READY "):
            if proc.poll() is None:
                proc.kill()
            code = proc.wait(timeout=IO_TIMEOUT)
            message = log.read_text(errors="replace").strip()
            if code == EXIT_SKIP:
                pytest.skip(message or "server exited with status 77")
            pytest.fail(f"no READY line (got {line!r}, exit {code}): {message}")
        yield int(line.split()[1])
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("server ignored SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def check_protocol(port: int) -> None:
    """One echo line, one ``bulk 1000``, then an echo proving nothing strayed;
    then the same pipelined behind a large bulk response."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        line = b"hello bench, this line comes back verbatim\n"
        sock.sendall(line)
        assert _recv_exactly(sock, len(line)) == line

        sock.sendall(b"bulk 1000\n")
        assert len(_recv_exactly(sock, 1000)) == 1000

        # had the server sent more than 1000 bytes, they would come first
        sock.sendall(b"after\n")
        assert _recv_exactly(sock, 6) == b"after\n"

    # Pipelined: lines queued behind a bulk response larger than the socket
    # buffers are answered after it, in order; "bulk x" is just a line; a
    # line split across two writes is one line.
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        size = 3_000_000
        sock.sendall(b"one\nbulk %d\ntwo\nbulk 5\nbulk x\npart" % size)
        assert _recv_exactly(sock, 4) == b"one\n"
        sock.sendall(b"ial\n")
        body = _recv_exactly(sock, size)
        assert len(body) == size
        tail = b"two\n" + b"?" * 5 + b"bulk x\npartial\n"
        got = _recv_exactly(sock, len(tail))
        assert got[:4] == b"two\n"
        assert got[9:] == b"bulk x\npartial\n"


@pytest.mark.parametrize("name", list(PYTHON_SERVERS))
def test_python_server_speaks_the_protocol(name: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(SERVERS / PYTHON_SERVERS[name][0]), "0"]
    argv += PYTHON_SERVERS[name][1:]
    with running(argv, tmp_path / "server.log") as port:
        check_protocol(port)


@pytest.fixture(scope="module")
def c_echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc): the C ceiling server cannot be built")
    binary = tmp_path_factory.mktemp("c_echo") / "c_echo"
    subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(binary), str(SERVERS / "c_echo.c")],
        check=True,
        capture_output=True,
    )
    return binary


def test_c_server_speaks_the_protocol(c_echo: Path, tmp_path: Path) -> None:
    with running([str(c_echo), "0"], tmp_path / "server.log") as port:
        check_protocol(port)


def _perl_ds_installed() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = subprocess.run(
        ["perl", "-MPublicInbox::DS", "-MPublicInbox::Listener", "-e1"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def test_perl_ds_server_speaks_the_protocol(tmp_path: Path) -> None:
    if not _perl_ds_installed():
        pytest.skip(
            "PublicInbox::DS not installed (apt-get install libpublicinbox-perl; "
            "bench/run.py does it when run as root)"
        )
    argv = ["perl", str(SERVERS / "perl_ds_echo.pl"), "0"]
    with running(argv, tmp_path / "server.log") as port:
        check_protocol(port)


def test_timer_bench_measures_every_peer() -> None:
    """bench/timers.py end to end on a tiny count: every peer gets a row.

    Perl's row is either measured or skipped with its reason; a peer whose
    insert broke would fail the child process and so this test.
    """
    systems = ["ds_trio-trio", "ds_trio-asyncio", "asyncio", "uvloop", "perl-ds"]
    argv = [sys.executable, str(BENCH / "timers.py"), "--timers", "300"]
    argv += ["--rounds", "1", "--trips", "20", "--perl-random-n", "50"]
    argv += ["--systems", ",".join(systems)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    rows = {
        line.split("|")[1].strip(): line
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| system")
    }
    assert set(rows) == set(systems)
    if "skipped" not in rows["perl-ds"]:
        assert "(N=50)" in rows["perl-ds"]
    assert "ping-pong between two DS objects" in done.stdout
