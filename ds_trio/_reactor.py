"""Readiness callbacks on trio: the loop's own epoll set, waited on as one fd.

trio has no ``add_reader``: every wait is a task switch plus an
``EPOLL_CTL_MOD`` of the object's fd, which made a DS object woken per
request cost as much as trio's own streams.  The seed instead runs every
ready ``event_step`` from one ``epoll_wait`` loop.  This module gives the
trio backend the same shape as callback mode on asyncio: DS objects whose
step is synchronous register their fd here (level-triggered, kept while the
interest stays the same, so a request costs no ``epoll_ctl``), their tasks
park, and one supervisor task of the loop waits until this epoll fd is
readable, then calls the callbacks of up to ``MAX_EVENTS`` ready fds - the
seed's 1000 per ``epoll_wait``.  An epoll fd is itself pollable, so trio's
scheduler sees one fd for the whole set.

Linux only (``select.epoll``); elsewhere the trio backend keeps its task
waits.  The interface is the subset of asyncio's event loop that callback
mode uses, so ``_ds`` drives both the same way.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Callable, Generator
from typing import Any, Final

import trio

__all__ = ["EpollReactor", "available"]

# The seed's batch: epoll_wait($Epoll, 1000, ...).
MAX_EVENTS: Final = 1000

_READ: Final = select.EPOLLIN
_WRITE: Final = select.EPOLLOUT
# Errors and hang-ups wake whichever direction is registered, as they wake
# a poll() for either: the step's read or write then sees the error.
_READ_READY: Final = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_READY: Final = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


def available() -> bool:
    """Whether this platform has epoll (else trio keeps its task waits)."""
    return hasattr(select, "epoll")


class ParkedTask:
    """A parked object task, woken once by :meth:`set_result`.

    The asyncio future's protocol (``done``, ``set_result``, ``await``), so
    callback mode parks the same way on both backends; smaller than a
    ``trio.Event`` (10k idle connections each hold one).
    """

    __slots__ = ("_done", "_task")

    def __init__(self) -> None:
        self._done = False
        self._task: trio.lowlevel.Task | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, _result: None) -> None:
        if self._done:
            return
        self._done = True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class EpollReactor:
    """``add_reader``/``add_writer`` for trio, backed by one epoll set.

    Each fd has at most one reader and one writer callback; the kernel
    registration follows them (ADD, MOD, DEL).  :meth:`run` is the loop's
    supervisor task that dispatches readiness.
    """

    __slots__ = ("_epoll", "_masks", "_readers", "_writers")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        self._masks: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<EpollReactor fd={self.fileno()} fds={len(self._masks)}>"

    def fileno(self) -> int:
        return -1 if self._epoll.closed else self._epoll.fileno()

    # -- the part of asyncio's loop API callback mode uses --------------

    def create_future(self) -> ParkedTask:
        return ParkedTask()

    def add_reader(self, fd: int, callback: Callable[[], object], /) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], object], /) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int, /) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def remove_writer(self, fd: int, /) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def switch(self, fd: int, callback: Callable[[], object], readable: bool) -> None:
        """Move ``fd``'s one callback to the other direction.

        One ``EPOLL_CTL_MOD`` where ``remove_*`` then ``add_*`` would cost a
        DEL and an ADD: an object streaming a response switches between
        reading and writing for every chunk the socket does not take.
        """
        if readable:
            self._writers.pop(fd, None)
            self._readers[fd] = callback
        else:
            self._readers.pop(fd, None)
            self._writers[fd] = callback
        self._update(fd)

    def _update(self, fd: int) -> None:
        mask = (_READ if fd in self._readers else 0) | (
            _WRITE if fd in self._writers else 0
        )
        have = self._masks.get(fd, 0)
        if mask == have:
            return
        epoll = self._epoll
        if epoll.closed:
            # The loop has ended; objects leaving callback mode afterwards
            # only forget their callbacks.
            self._masks.pop(fd, None)
            return
        if not mask:
            del self._masks[fd]
            try:
                epoll.unregister(fd)
            except (OSError, ValueError):
                # The fd was closed behind the object's back: the kernel
                # dropped its registration already.
                pass
            return
        try:
            if have:
                epoll.modify(fd, mask)
            else:
                epoll.register(fd, mask)
        except FileExistsError:
            # A registration outlived an fd closed behind our back through a
            # dup; take it over.
            epoll.modify(fd, mask)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self._readers.pop(fd, None)
                self._writers.pop(fd, None)
                raise
            epoll.register(fd, mask)
        self._masks[fd] = mask

    # -- the supervisor task ----------------------------------------------

    async def run(self) -> None:
        """Wait for the set to be readable, run the ready callbacks, repeat."""
        epoll = self._epoll
        poll = epoll.poll
        readers = self._readers
        writers = self._writers
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        epfd = epoll.fileno()
        busy = False
        while True:
            if busy:
                # After a batch, let every other task run once and look
                # again before sleeping: under load the next requests are
                # usually there by then, and this skips trio's re-arm of the
                # epoll fd (an EPOLL_CTL_MOD) and, at low concurrency, a
                # sleep and wake-up of the thread (bench: 0.7x the CPU per
                # request at C=1, 0.9x at C=500, even at C=50).  Nothing
                # spins: an empty look means a real wait.
                await checkpoint()
            else:
                await wait_readable(epfd)
            batch = poll(0, MAX_EVENTS)
            busy = bool(batch)
            for fd, events in batch:
                # One callback per fd and batch: a reader's step may switch
                # the object to writing, and the stale event must not call
                # the new callback too.  Both are looked up now, not when
                # the poll returned: an earlier step may have closed this fd
                # (its real close waits for the round's end, so the number
                # cannot be reused meanwhile).
                callback = readers.get(fd) if events & _READ_READY else None
                if callback is None and events & _WRITE_READY:
                    callback = writers.get(fd)
                if callback is not None:
                    callback()

    def close(self) -> None:
        """Close the epoll fd (after :meth:`run` has ended)."""
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()
        self._epoll.close()
