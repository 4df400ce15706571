"""Bench echo server on ds_trio (placeholder until the library lands).

The harness runs ``python bench/servers/ds_trio_echo.py PORT --backend
trio|asyncio|uvloop``.  Until the real server is written, this stub exits
with status 77, which the harness reports as "skipped" (the automake
convention for a test that cannot run here).

Usage: ``python bench/servers/ds_trio_echo.py PORT [--backend ...]``
"""

from __future__ import annotations

import sys

EXIT_SKIP = 77


def main() -> None:
    sys.stderr.write("ds_trio server not yet available\n")
    sys.exit(EXIT_SKIP)


if __name__ == "__main__":
    main()
