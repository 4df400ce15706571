"""What every Python bench server shares: arguments, limits, protocol parsing.

Each server is a standalone script (``python bench/servers/X.py PORT``); this
module sits beside them, so it is importable through the script's directory
on ``sys.path``.  Keeping the protocol parsing here means the Python servers
differ only in their I/O layer, which is what the benchmark compares.

Protocol: ``bulk N\\n`` is answered with exactly N bytes (zeros here); any
other line ending in ``\\n`` is echoed back verbatim.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Iterator, Sequence

__all__ = [
    "BULK_CHUNK",
    "RECV_SIZE",
    "parse_args",
    "parse_requests",
    "raise_nofile_limit",
    "ready",
    "zero_chunks",
]

# One read's worth; larger reads only help bulk uploads, which we never get.
RECV_SIZE = 65536

# Bulk responses are slices of one preallocated zero buffer, so producing
# N bytes costs no allocation or copy in the server itself: what is measured
# is how each I/O layer moves them.
BULK_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(BULK_CHUNK))

_BULK_PREFIX = b"bulk "


def parse_args(
    description: str,
    *,
    backends: Sequence[str] = (),
    reuseport: bool = False,
    tasks: bool = False,
) -> argparse.Namespace:
    """Parse ``PORT [--backend NAME] [--reuseport] [--tasks]`` (``--backend``
    only if *backends*, ``--reuseport`` only if *reuseport*, ``--tasks``
    only if *tasks*)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "port", type=int, help="TCP port on 127.0.0.1 (0: any free port)"
    )
    if backends:
        parser.add_argument("--backend", choices=list(backends), default=backends[0])
    if reuseport:
        # bench/workers.py starts several such processes on one port
        parser.add_argument(
            "--reuseport", action="store_true", help="bind with SO_REUSEPORT"
        )
    if tasks:
        parser.add_argument(
            "--tasks",
            action="store_true",
            help="ds_trio.loop(callbacks=False): every object waits in its task",
        )
    return parser.parse_args()


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new limit.

    The idle scenario holds 10,000 connections; a default soft limit of 1024
    would make it a test of EMFILE handling instead.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have; the harness reports failures
    return soft


def ready(port: int) -> None:
    """Tell the harness we are listening (it waits for this exact line)."""
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def parse_requests(buf: bytes) -> tuple[list[bytes | int], bytes]:
    """Split *buf* into responses to send and the unfinished tail.

    Returns ``(items, rest)``: each item is either bytes to echo (consecutive
    echo lines are coalesced into one slice, so pipelined lines cost one
    send) or an int N for ``bulk N``.  Malformed ``bulk`` lines (``bulk x``)
    are echoed, as "any other line" is.
    """
    items: list[bytes | int] = []
    start = 0  # first byte not yet turned into an item
    pos = 0  # start of the line being looked at
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            break
        if buf.startswith(_BULK_PREFIX, pos):
            digits = buf[pos + len(_BULK_PREFIX) : nl]
            # ASCII digits only, as the C and Perl servers parse it (int()
            # would also take " 5", "+5" and "1_0")
            if digits.isdigit():
                if pos > start:
                    items.append(buf[start:pos])
                items.append(int(digits))
                start = nl + 1
        pos = nl + 1
    if pos > start:
        items.append(buf[start:pos])
    return items, buf[pos:]


def zero_chunks(n: int) -> Iterator[memoryview]:
    """Yield views of the shared zero buffer adding up to *n* bytes."""
    while n > 0:
        size = min(n, BULK_CHUNK)
        yield _ZEROS[:size]
        n -= size
