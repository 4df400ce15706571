"""Helpers for testing DS code: leak checks and socket helpers.

Typical use, on either backend::

    async def test_cancel_cleans_up():
        async with ds_trio.testing.assert_no_leaks():
            with anyio.move_on_after(1):
                async with ds_trio.loop():
                    MyServer(listen_sock)
                    ...

``assert_no_leaks`` compares open fds (spill files included: they show as
``(deleted)`` entries), tasks and zombie children before and after the
block, and fails with the list of what leaked.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import sniffio

__all__ = [
    "LeakReport",
    "assert_no_leaks",
    "child_processes",
    "count_tasks",
    "drain_socket",
    "fill_socket",
    "open_fds",
    "socketpair",
    "zombie_children",
]


def open_fds() -> dict[int, str]:
    """This process's open fds and what each points to (from ``/proc/self/fd``)."""
    fds: dict[int, str] = {}
    base = "/proc/self/fd"
    for name in os.listdir(base):
        try:
            fds[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:  # the fd listdir itself used, already gone
            continue
    return fds


def child_processes(parent: int | None = None) -> dict[int, str]:
    """Children of ``parent`` (default: this process): pid -> state letter.

    The state is the kernel's (``/proc/PID/stat``): ``"Z"`` for a zombie,
    ``"R"``, ``"S"``, ... for a live process.
    """
    parent = os.getpid() if parent is None else parent
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, ...
        if int(fields[1]) == parent:
            children[int(name)] = fields[0]
    return children


def zombie_children() -> set[int]:
    """Pids of this process's children that exited and were never reaped."""
    return {pid for pid, state in child_processes().items() if state == "Z"}


def count_tasks() -> int:
    """The number of tasks alive in the running async library."""
    library = sniffio.current_async_library()
    if library == "trio":
        import trio

        def walk(task: trio.lowlevel.Task) -> int:
            return 1 + sum(
                walk(child)
                for nursery in task.child_nurseries
                for child in nursery.child_tasks
            )

        root = trio.lowlevel.current_root_task()
        assert root is not None
        return walk(root)
    return len(asyncio.all_tasks())


@dataclass
class LeakReport:
    """What :func:`assert_no_leaks` found (empty lists: nothing leaked)."""

    fds: list[str] = field(default_factory=list)
    spill_files: list[str] = field(default_factory=list)
    tasks: int = 0
    zombies: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fds or self.spill_files or self.tasks or self.zombies)


def _describe(fds: dict[int, str], numbers: Iterable[int]) -> list[str]:
    return [f"fd {fd} -> {fds[fd]}" for fd in sorted(numbers)]


@asynccontextmanager
async def assert_no_leaks(
    *, check_tasks: bool = True, check_zombies: bool = True
) -> AsyncIterator[LeakReport]:
    """Fail if the block leaves fds, spill files, tasks or zombies behind.

    Fds are compared by number and target, so an fd closed and reopened
    for something else counts as a leak of the new target.  Spill files
    are fds whose target ends in ``(deleted)``.

    Raises:
        AssertionError: naming everything that leaked.
    """
    fds_before = open_fds()
    tasks_before = count_tasks() if check_tasks else 0
    zombies_before = zombie_children() if check_zombies else set()
    report = LeakReport()
    yield report
    fds_after = open_fds()
    leaked = [fd for fd, target in fds_after.items() if fds_before.get(fd) != target]
    for line in _describe(fds_after, leaked):
        (report.spill_files if line.endswith("(deleted)") else report.fds).append(line)
    if check_tasks:
        report.tasks = max(0, count_tasks() - tasks_before)
    if check_zombies:
        report.zombies = sorted(zombie_children() - zombies_before)
    if report:
        raise AssertionError(f"leaked: {report}")


def socketpair(
    family: int = socket.AF_UNIX, type: int = socket.SOCK_STREAM
) -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking sockets."""
    a, b = socket.socketpair(family, type)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def fill_socket(sock: socket.socket, chunk: int = 65536) -> int:
    """Send until the kernel says EAGAIN; return the bytes sent.

    Makes the next write on ``sock`` take DS's EAGAIN path.
    """
    was_blocking = sock.getblocking()
    sock.setblocking(False)
    total = 0
    data = b"\0" * chunk
    try:
        while True:
            try:
                total += sock.send(data)
            except BlockingIOError:
                if chunk == 1:
                    return total
                # Top up the last few bytes too, so EAGAIN is certain.
                chunk = 1
                data = b"\0"
    finally:
        sock.setblocking(was_blocking)


def drain_socket(sock: socket.socket, chunk: int = 65536) -> bytes:
    """Read whatever is readable now, without blocking (EOF ends it too)."""
    was_blocking = sock.getblocking()
    sock.setblocking(False)
    parts = []
    try:
        while True:
            try:
                data = sock.recv(chunk)
            except BlockingIOError:
                break
            if not data:
                break
            parts.append(data)
    finally:
        sock.setblocking(was_blocking)
    return b"".join(parts)
