"""The fault suite's report: one row per scenario run, printed as a table.

Every fault scenario (tests/test_faults_*.py, and bench/soak.py for the long
tier) measures what it held and what it broke, asserts that nothing was lost
or leaked, and records a :class:`FaultRow`.  ``pytest`` prints the table at
the end of the session (see ``pytest_terminal_summary`` in conftest.py); set
``DS_TRIO_FAULT_TABLE=path.md`` to also write it as Markdown.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from ds_trio.testing import LeakReport


@dataclass
class FaultRow:
    scenario: str
    backend: str
    load: str  # what was held, e.g. "10,000 conns idle+active"
    faults: str  # what was injected, e.g. "1,000 RST at random points"
    bytes_lost: int = 0  # bytes a client should have received and did not
    fds: int = 0  # leaked fds (non-spill)
    spill: int = 0  # leaked spill files
    tasks: int = 0
    zombies: int = 0
    note: str = ""

    @property
    def clean(self) -> bool:
        leaked = self.fds + self.spill + self.tasks + self.zombies
        return not (self.bytes_lost or leaked)

    def add_leaks(self, report: LeakReport) -> None:
        self.fds += len(report.fds)
        self.spill += len(report.spill_files)
        self.tasks += report.tasks
        self.zombies += len(report.zombies)


ROWS: list[FaultRow] = []


def record(row: FaultRow) -> FaultRow:
    """Add ``row`` to the session's table and return it."""
    ROWS.append(row)
    return row


def markdown(rows: list[FaultRow] | None = None) -> str:
    rows = ROWS if rows is None else rows
    names = [f.name for f in fields(FaultRow)]
    lines = [
        "| " + " | ".join(names) + " |",
        "|" + "|".join("---" for _ in names) + "|",
    ]
    for row in rows:
        values = asdict(row)
        lines.append("| " + " | ".join(str(values[name]) for name in names) + " |")
    return "\n".join(lines) + "\n"


def write_if_asked(rows: list[FaultRow] | None = None) -> None:
    path = os.environ.get("DS_TRIO_FAULT_TABLE")
    if path and (ROWS if rows is None else rows):
        with open(path, "w", encoding="utf-8") as f:
            f.write(markdown(rows))
