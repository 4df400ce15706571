"""Child reaping: ``dwaitpid`` / ``awaitpid`` as a supervisor of the loop.

The seed never calls ``waitpid(-1)``: it would steal the statuses of
children that backticks, ``system()`` (here: subprocess, trio, asyncio) wait
for themselves.  ds_trio keeps that rule - only registered pids are ever
waited for - and replaces the seed's SIGCHLD-plus-polling with one pidfd
per child where the kernel has it (Linux 5.3+): the pidfd becomes readable
when the child exits, so the waiting task wakes exactly once, with no
signal handler to interfere with anyone else's children.  Without pidfd
(old kernels, seccomp sandboxes) each child is awaited by a worker thread
blocked in ``waitid(WNOWAIT)``; the status is then collected with a
``WNOHANG`` ``waitpid`` from the loop.

A callback sees its child's status the way the seed's callbacks read
``$?``: through :func:`child_status`, so callback signatures stay the
seed's.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._errors import DSError

if TYPE_CHECKING:
    from ._loop import Loop

__all__ = ["Reaper", "check_pid", "child_status", "reap_in_background"]

log = logging.getLogger("ds_trio.reaper")

_status: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "ds_trio.child_status", default=None
)

_pidfd_works = hasattr(os, "pidfd_open")


def child_status() -> int:
    """The ``os.waitpid``-style status of the child whose callback is running.

    The seed's reap callbacks read ``$?``; ported callbacks call this
    instead (``os.waitstatus_to_exitcode(child_status())`` for an exit code).

    Raises:
        DSError: not inside a ``dwaitpid``/``awaitpid`` callback.
    """
    status = _status.get()
    if status is None:
        raise DSError("child_status() is only set inside a reap callback")
    return status


def check_pid(pid: object) -> int:
    """Validate a pid argument."""
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be an int, not {type(pid).__name__}")
    if pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    return pid


def _try_reap(pid: int) -> int | None:
    """``waitpid(pid, WNOHANG)``: the status, or None while it runs.

    Raises:
        ChildProcessError: ``pid`` is not an unreaped child of this process.
    """
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        raise ChildProcessError(
            errno.ECHILD,
            f"pid {pid} is not a child of this process, or was already reaped",
        ) from None
    return status if done == pid else None


def _reap_blocking(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def reap_in_background(pids: Iterable[int]) -> None:
    """Reap children nobody will wait for any more, without blocking anyone.

    Used when a loop ends (or ``Reset`` runs) with registered children still
    running: their callbacks cannot run any more, but they must not stay
    zombies.  One daemon thread per call waits for them in turn.
    """
    pending = []
    for pid in pids:
        try:
            if _try_reap(pid) is None:
                pending.append(pid)
        except ChildProcessError:
            continue
    if pending:
        log.info("reaping %d child(ren) still running at loop exit", len(pending))
        threading.Thread(
            target=_reap_blocking, args=(pending,), name="ds_trio reaper", daemon=True
        ).start()


class Reaper:
    """Waits for registered children on behalf of one loop."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        # The pidfd-less fallback parks one worker thread per child: anyio's
        # default limiter (40) would leave later children unnoticed.
        self._threads = anyio.CapacityLimiter(1 << 16)

    def watch(self, pid: int, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (with :func:`child_status` set) once ``pid`` exits.

        Raises:
            ChildProcessError: ``pid`` is not an unreaped child of ours.
        """
        global _pidfd_works
        loop = self.loop
        previous = loop.children.get(pid)
        if previous is not None:
            # Registered again: the seed kept one entry per dwaitpid call and
            # called every callback.  The waiter already running delivers to
            # all of them, in registration order, with the same status.
            loop.children[pid] = _Callbacks.chain(previous, callback)
            return
        status = _try_reap(pid)
        if status is not None:
            # It already exited: run the callback from the queue, as the
            # seed's dwaitpid "could've just missed our SIGCHLD".
            loop.children[pid] = callback
            loop.requeue_call(self._deliver, (pid, status))
            return
        loop.children[pid] = callback
        if _pidfd_works:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                    loop.children.pop(pid, None)
                    raise
                _pidfd_works = False
            else:
                loop.spawn_task(self._wait_pidfd, pid, pidfd)
                return
        loop.spawn_task(self._wait_thread, pid)

    async def _wait_pidfd(self, pid: int, pidfd: int) -> None:
        backend = self.loop._require_backend()
        try:
            while True:
                await backend.wait_readable(pidfd)
                status = self._collect(pid)
                if status is not None:
                    break
        finally:
            # notify_closing before close, no checkpoint between: the fd
            # number may be reused the moment it is closed.
            backend.notify_closing(pidfd)
            os.close(pidfd)
        self._deliver(pid, status)

    async def _wait_thread(self, pid: int) -> None:
        while True:
            await anyio.to_thread.run_sync(
                os.waitid,
                os.P_PID,
                pid,
                os.WEXITED | os.WNOWAIT,
                abandon_on_cancel=True,
                limiter=self._threads,
            )
            status = self._collect(pid)
            if status is not None:
                break
        self._deliver(pid, status)

    def _collect(self, pid: int) -> int | None:
        try:
            return _try_reap(pid)
        except ChildProcessError:
            # Someone else reaped it (a foreign waitpid(-1)): report it as
            # the seed did, with no status to give.
            log.warning("child %d was reaped by someone else", pid)
            return -1

    def _deliver(self, pid: int, status: int) -> None:
        # The callback registered now, not when the wait began: the pid may
        # have been registered again meanwhile.
        callback = self.loop.children.pop(pid, None)
        if callback is None:
            return  # forgotten (Reset) meanwhile
        # A reaped child may have been the last thing the loop waited for.
        self.loop.kick()
        callbacks = (
            callback.callbacks if isinstance(callback, _Callbacks) else (callback,)
        )
        token = _status.set(status)
        try:
            for each in callbacks:
                self.loop.call(each, ())
        finally:
            _status.reset(token)
        emulated = self.loop._sigchld_emulated
        if emulated is not None:
            self.loop.requeue_call(self.loop.call, (emulated, (signal.SIGCHLD,)))

    def close(self, *, hand_over: bool) -> dict[int, Callable[[], object]]:
        """The loop ends: hand children over, or reap them in the background."""
        children = self.loop.children
        self.loop.children = {}
        if hand_over:
            return children
        reap_in_background(children)
        return {}


class _Callbacks:
    """The callbacks of a child registered more than once, in order.

    The reaper calls each as a separate loop callback, so one that raises
    does not keep the others from running (the seed called each inside its
    own ``eval``).  It holds no loop: a finished ``EventLoop()`` hands its
    children over to the next one.
    """

    __slots__ = ("callbacks",)

    def __init__(self, callbacks: list[Callable[[], object]]) -> None:
        self.callbacks = callbacks

    @classmethod
    def chain(
        cls, previous: Callable[[], object], callback: Callable[[], object]
    ) -> _Callbacks:
        if isinstance(previous, _Callbacks):
            previous.callbacks.append(callback)
            return previous
        return cls([previous, callback])

    def __call__(self) -> None:
        for callback in self.callbacks:
            callback()


def run_sync_wait(pid: int, callback: Callable[..., object] | None, args: Any) -> int:
    """``awaitpid`` outside a loop: wait now, then call back (newer DS)."""
    _, status = os.waitpid(pid, 0)
    if callback is not None:
        token = _status.set(status)
        try:
            callback(pid, *args)
        finally:
            _status.reset(token)
    return status
