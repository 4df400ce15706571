"""A load smoke test of the httpd example with real third-party clients.

The server runs as a real subprocess (``python -m ds_trio.examples.httpd
--port 0``) on each backend; ``wrk`` and ApacheBench (``ab``, Debian's
``apache2-utils``) hammer it for a few seconds with 50 connections.  Nothing
here is timed: the assertions are that every request got a complete 2xx
answer (no socket errors, no failed or non-2xx responses, every keep-alive
request kept alive), that the server logged no exception and that it still
answers afterwards.  Speed is measured in ``bench/httpd.py``.

A missing ``wrk`` or ``ab`` skips its test (``.ci/run`` installs both).
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SMALL = b"0123456789abcdef" * 64  # 1 KiB
BIG = bytes(range(256)) * 1024  # 256 KiB: several streaming steps each
CONNECTIONS = 50


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    served = tmp_path_factory.mktemp("httpd-load")
    (served / "1k.txt").write_bytes(SMALL)
    (served / "256k.bin").write_bytes(BIG)
    return served


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def check_still_serving(self) -> None:
        assert self.proc.poll() is None, "the server died"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for name, body in (("1k.txt", SMALL), ("256k.bin", BIG)):
            conn.request("GET", "/" + name)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, body)
        conn.close()
        text = self.log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert " raised" not in text, text[-3000:]


@pytest.fixture(params=["trio", "asyncio"])
def server(
    request: pytest.FixtureRequest, root: Path, tmp_path: Path
) -> Iterator[Server]:
    """The example as a subprocess on a free port; its log in a file.

    The log goes to a file, not a pipe: one INFO line per request would
    fill a pipe nobody reads and stall the server.
    """
    log = tmp_path / "httpd.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ds_trio.examples.httpd", "--root", str(root),
             "--port", "0", "--backend", request.param],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        port = wait_for_port(proc, log)
        yield Server(proc, port, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port from the "httpd serving ROOT on HOST:PORT" line (bounded poll)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"httpd serving .* on [0-9.]+:([0-9]+)", log.read_text())
        if m:
            return int(m[1])
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    pytest.fail("the server did not start")


def run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def field(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}:\s+([0-9]+)", text, re.MULTILINE)
    assert m, f"no {name!r} in:\n{text}"
    return int(m[1])


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_50_connections(server: Server) -> None:
    out = run(["wrk", "-t2", f"-c{CONNECTIONS}", "-d2s", "--timeout", "20s",
               server.url("1k.txt")])  # fmt: skip
    # wrk prints these lines only when their counts are not zero.
    assert "Socket errors" not in out, out
    assert "Non-2xx or 3xx responses" not in out, out
    m = re.search(r"([0-9]+) requests in .*, ([0-9.]+)([KMG]?)B read", out)
    assert m, out
    assert int(m[1]) >= CONNECTIONS, out
    server.check_still_serving()


needs_ab = pytest.mark.skipif(
    shutil.which("ab") is None, reason="ab (apache2-utils) is not installed"
)


@needs_ab
def test_ab_keep_alive_50_connections(server: Server) -> None:
    n = 2000
    out = run(["ab", "-q", "-k", "-c", str(CONNECTIONS), "-n", str(n),
               server.url("1k.txt")])  # fmt: skip
    assert field(out, "Complete requests") == n, out
    assert field(out, "Failed requests") == 0, out
    assert field(out, "Keep-Alive requests") == n, out  # none was closed
    assert field(out, "Document Length") == len(SMALL), out
    assert field(out, "HTML transferred") == n * len(SMALL), out
    assert "Non-2xx responses" not in out, out
    server.check_still_serving()


@needs_ab
def test_ab_connection_per_request_streaming(server: Server) -> None:
    n = 200
    out = run(["ab", "-q", "-c", "20", "-n", str(n), server.url("256k.bin")])
    assert field(out, "Complete requests") == n, out
    assert field(out, "Failed requests") == 0, out
    assert field(out, "HTML transferred") == n * len(BIG), out
    assert "Non-2xx responses" not in out, out
    server.check_still_serving()
