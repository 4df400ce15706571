"""Coverage-guided fuzzing of the httpd example with atheris (optional).

    .venv/bin/pip install atheris
    .venv/bin/python bench/fuzz_httpd.py -runs=20000        # libFuzzer flags
    .venv/bin/python bench/fuzz_httpd.py -max_total_time=600 corpus/
                                  # an empty corpus/ gets a few seed requests

Each input is one client session: the bytes are sent to an ``HTTPClient``
over a socketpair (in pieces: the first input byte picks the piece size),
the client's write side is shut, and everything the server answers until
it closes is checked: a sequence of well-formed responses, a 200/206 body
that is (part of) a served file, and never the secret file that lies just
outside the root (``..``, encoded ``..``, a symlink out).  Any exception
escaping the server's loop, or a failed check, is a crash (libFuzzer saves
the input).  ``parse_head`` is fed the same bytes on its own.

The hypothesis tests in ``tests/test_load.py`` cover the same ground with
structured inputs in CI; this script is for long runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Heavy dependencies first, uninstrumented: coverage is wanted for
# ds_trio (the example and the DS paths it drives), not for trio or anyio.
import anyio  # noqa: E402
import hypothesis  # noqa: E402, F401
import pytest  # noqa: E402, F401
import trio  # noqa: E402, F401

with atheris.instrument_imports(include=["ds_trio"]):
    from ds_trio.examples import httpd
    from tests.test_load import (
        SECRET,
        check_http_output,
        http_session,
        served_files,
    )


def make_root() -> Path:
    # libFuzzer ends the process without running atexit handlers: one fixed
    # directory, replaced by each run, instead of a new one per run.
    base = Path(
        os.environ.get("FUZZ_HTTPD_DIR")
        or Path(tempfile.gettempdir()) / "ds_trio-fuzz-httpd"
    )
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "secret.txt").write_bytes(SECRET)
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"hello, world\n")
    (root / "sub" / "index.html").write_bytes(b"<h1>index</h1>\n")
    (root / "link-out").symlink_to(base / "secret.txt")
    (root / "linkdir").symlink_to(base)
    return root


ROOT = make_root()
FILES = served_files(ROOT)


def one_input(data: bytes) -> None:
    if not data:
        return
    try:
        httpd.parse_head(data[1:])
    except httpd.BadRequest:
        pass
    piece = 1 + data[0] * 16
    body = data[1:]
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)]
    out = anyio.run(http_session, ROOT, pieces, backend="trio")
    check_http_output(out, FILES)


SEEDS = [
    b"GET /small.txt HTTP/1.1\r\n\r\n",
    b"HEAD /sub/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /small.txt HTTP/1.1\r\nRange: bytes=2-5\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
    b"Expect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
    b"abcGET /%2e%2e/secret.txt HTTP/1.1\r\n\r\n",
]


def seed(argv: list[str]) -> None:
    """Give empty corpus directories named on the command line a few requests."""
    for arg in argv[1:]:
        path = Path(arg)
        if not arg.startswith("-") and path.is_dir() and not any(path.iterdir()):
            for i, request in enumerate(SEEDS):
                (path / f"seed-{i}").write_bytes(b"\x00" + request)


def main() -> None:
    seed(sys.argv)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
