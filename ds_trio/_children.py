"""``dwaitpid`` and ``awaitpid``: reap children from inside the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._errors import NotInLoopError
from ._loop import _current
from ._reaper import check_pid, run_sync_wait

__all__ = ["awaitpid", "dwaitpid"]


def dwaitpid(
    pid: int, callback: Callable[[Any, int], object] | None, arg: Any = None
) -> None:
    """Call ``callback(arg, pid)`` once child ``pid`` exits (the seed's order).

    Works for children started any way (``subprocess.Popen``, ``os.fork``,
    ``os.posix_spawn``).  The status is :func:`ds_trio.child_status` inside
    the callback.  Only this pid is ever waited for, so children that
    subprocess, trio or asyncio reap themselves stay theirs.  A callback's
    exception follows the loop's error policy.  With ``callback`` None the
    child is only reaped (the seed's ``ProcessPipe`` passes ``undef``).  A
    child registered more than once calls back every callback, in order.

    Raises:
        NotInLoopError: outside a running loop ("Not in EventLoop": the
            seed's callers catch it and fall back to a blocking waitpid).
        ChildProcessError: ``pid`` is not an unreaped child of this process.
        ValueError: ``pid`` is zero or negative.
        TypeError: ``callback`` is neither callable nor None.
    """
    pid = check_pid(pid)
    if callback is not None and not callable(callback):
        raise TypeError(f"dwaitpid() needs a callable or None, got {callback!r}")
    loop = _current.get()
    if loop is None:
        raise NotInLoopError("Not in EventLoop: dwaitpid() needs a running loop")

    def done() -> None:
        if callback is not None:
            callback(arg, pid)

    loop._reaper.watch(pid, done)


def awaitpid(
    pid: int, callback: Callable[..., object] | None = None, *args: Any
) -> int | None:
    """Call ``callback(pid, *args)`` once child ``pid`` exits (newer DS's order).

    Inside a loop it returns at once (None) and the callback runs from the
    loop.  Outside a loop it waits for the child now, calls the callback,
    and returns the ``os.waitpid``-style status, as newer DS does.  A child
    registered more than once calls back every callback, in order.

    Raises:
        ChildProcessError: ``pid`` is not an unreaped child of this process.
        ValueError: ``pid`` is zero or negative.
        TypeError: ``callback`` is neither callable nor None.
    """
    pid = check_pid(pid)
    if callback is not None and not callable(callback):
        raise TypeError(f"awaitpid() needs a callable or None, got {callback!r}")
    loop = _current.get()
    if loop is None:
        return run_sync_wait(pid, callback, args)

    def done() -> None:
        if callback is not None:
            callback(pid, *args)

    loop._reaper.watch(pid, done)
    return None
