"""Helpers shared by the focused benchmarks (wbuf.py, idle_expiry.py, tls.py).

Not a benchmark itself.  Statistics and Markdown formatting (median with
the min-max range over rounds, per-round ratios), and a few readings of
``/proc/PID`` that the scripts take of a server process: its peak and
current RSS, its CPU time and the spill files it holds open.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterable, Sequence

DASH = "\u2013"  # en dash, as bench/report.py
TIMES = "\u00d7"

__all__ = [
    "DASH",
    "TIMES",
    "fmt_range",
    "md_table",
    "per_round_ratio",
    "proc_status_kib",
    "spill_files",
]


def fmt_range(values: Sequence[float | None], spec: str = ".1f") -> str:
    """``median (min-max)`` of the non-None values (en dashes), DASH if none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return DASH
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, spec)
    return f"{med:{spec}} ({min(vals):{spec}}{DASH}{max(vals):{spec}})"


def per_round_ratio(
    values: Sequence[float | None], refs: Sequence[float | None]
) -> list[float | None]:
    """``values[i] / refs[i]`` for every round where both exist."""
    out: list[float | None] = []
    for v, r in zip(values, refs, strict=False):
        out.append(v / r if v is not None and r else None)
    return out


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; columns after the first are right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def spill_files(pid: int) -> tuple[int, int, int]:
    """``(count, bytes, allocated bytes)`` of the deleted files PID holds open.

    Spill files (ds_trio's ``O_TMPFILE`` files, Perl DS's unlinked
    ``tmpfile``) show in ``/proc/PID/fd`` as links ending in ``(deleted)``;
    ``os.stat`` through the link gives their size and allocated blocks.
    """
    base = f"/proc/{pid}/fd"
    count = size = allocated = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0, 0, 0
    for name in names:
        with contextlib.suppress(OSError):
            if not os.readlink(f"{base}/{name}").endswith("(deleted)"):
                continue
            st = os.stat(f"{base}/{name}")
            count += 1
            size += st.st_size
            allocated += st.st_blocks * 512
    return count, size, allocated
