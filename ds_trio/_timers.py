"""The deadline heap: one sorted-deadline scheduler per loop.

The seed keeps ``@Timers`` sorted by a linear scan on insert (its comment says
that beat heaps in Danga's benchmarks; that holds only for FIFO inserts, and
with random deadlines it is thousands of times slower at 100k timers).  Here
a binary heap of ``(deadline, seq, timer)`` tuples keeps inserts and pops
logarithmic.  ``seq`` comes from one process-wide counter, so equal deadlines
fire in insertion order (the seed's stable sort) and tuples never compare two
``Timer`` objects.

Cancellation is lazy, as in the seed (which cleared the coderef slot) and in
trio's and asyncio's own timer heaps: a cancelled timer stays in the heap
until it reaches the top, and the heap is compacted when more than half of it
is dead, so cancelling never makes it grow without bound.

This module does no I/O and knows nothing about tasks: the loop's driver asks
it for due timers and for the next deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
import numbers
from collections.abc import Callable
from typing import Any, Final

__all__ = ["Timer", "TimerQueue", "check_delay"]

# Compaction does not pay off for tiny heaps.
_COMPACT_MIN: Final = 64

_seq = itertools.count()


def check_delay(seconds: object) -> float:
    """Validate a timer delay: a finite real number of seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"seconds must be a real number, not {type(seconds).__name__}")
    value = float(seconds)
    if not math.isfinite(value):
        raise ValueError(f"seconds must be finite, got {seconds!r}")
    return value


class Timer:
    """A pending timer, as returned by :func:`ds_trio.add_timer`.

    The seed returned the raw ``[fire_time, coderef]`` array and callers
    cancelled by clearing the coderef; here :meth:`cancel` does that.
    """

    __slots__ = ("_args", "_callback", "_deadline", "_queue", "name")

    def __init__(
        self,
        deadline: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        queue: TimerQueue,
        name: object = None,
    ) -> None:
        self._deadline = deadline
        self._callback: Callable[..., object] | None = callback
        self._args = args
        self._queue: TimerQueue | None = queue
        self.name = name

    @property
    def deadline(self) -> float:
        """When the timer fires, on the clock of the loop that holds it."""
        return self._deadline

    @property
    def active(self) -> bool:
        """True until the timer fired or was cancelled."""
        return self._callback is not None

    def cancel(self) -> bool:
        """Cancel the timer.

        Returns:
            True if it was pending, False if it had already fired or been
            cancelled.  Never raises, so it is safe in cleanup code.
        """
        if self._callback is None:
            return False
        self._callback = None
        self._args = ()
        queue = self._queue
        self._queue = None
        if queue is not None:
            queue._note_cancelled(self)
        return True

    def __repr__(self) -> str:
        state = "active" if self.active else "done"
        return f"<Timer {state} deadline={self._deadline:.6f} name={self.name!r}>"


class TimerQueue:
    """A heap of timers on one clock.

    ``clock`` returns the current time of that clock; ``on_new_head`` (if
    set) is called with the new earliest deadline whenever an insert becomes
    the head, so a sleeping driver can move its wake-up earlier without a
    task switch; ``on_empty`` when the last live timer is cancelled.
    """

    __slots__ = ("_cancelled", "_heap", "clock", "on_empty", "on_new_head")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._cancelled = 0
        self.clock = clock
        self.on_new_head: Callable[[float], object] | None = None
        self.on_empty: Callable[[], object] | None = None

    def __len__(self) -> int:
        """The number of live (not cancelled, not fired) timers."""
        return len(self._heap) - self._cancelled

    def add(
        self,
        seconds: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        name: object = None,
    ) -> Timer:
        """Insert a timer firing ``seconds`` from now (arguments pre-validated)."""
        deadline = self.clock() + seconds
        timer = Timer(deadline, callback, args, self, name)
        heap = self._heap
        heapq.heappush(heap, (deadline, next(_seq), timer))
        if heap[0][2] is timer and self.on_new_head is not None:
            self.on_new_head(deadline)
        return timer

    def next_deadline(self) -> float:
        """The earliest live deadline, or ``math.inf``."""
        heap = self._heap
        while heap:
            entry = heap[0]
            if entry[2]._callback is not None:
                return entry[0]
            heapq.heappop(heap)
            self._cancelled -= 1
        return math.inf

    def pop_due(self, now: float) -> list[Timer]:
        """Remove and return every live timer due at ``now``, earliest first.

        Taken as one batch before any of them runs, so a timer added by a
        callback in the batch waits for the next round even when the clock
        has not moved (the seed gets that from sampling ``now`` once; with a
        coarse or virtual clock a self-rearming 0-second timer would
        otherwise spin).  A batched timer cancelled by an earlier one in the
        same batch does not fire: :meth:`fire` skips it.
        """
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            if timer._callback is None:
                self._cancelled -= 1
                continue
            timer._queue = None
            due.append(timer)
        return due

    @staticmethod
    def fire(timer: Timer) -> bool:
        """Run a timer returned by :meth:`pop_due` unless it was cancelled since.

        Returns:
            True if its callback ran.
        """
        callback, args = timer._callback, timer._args
        if callback is None:
            return False
        timer._callback = None
        timer._args = ()
        callback(*args)
        return True

    def _note_cancelled(self, timer: Timer) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(heap):
            self._heap = [entry for entry in heap if entry[2]._callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
        if self.on_empty is not None and len(self) == 0:
            self.on_empty()

    def adopt(self, other: TimerQueue) -> None:
        """Move every live timer of ``other`` (another clock) into this queue.

        Each keeps its remaining time: the seed's clock never stops, so a
        timer added before the loop started fires relative to when it was
        added, not to when the loop began.  Relative order, ties included,
        is kept because ``seq`` travels with the entry.
        """
        delta = self.clock() - other.clock()
        moved = []
        for deadline, seq, timer in other._heap:
            if timer._callback is None:
                continue
            timer._deadline = deadline + delta
            timer._queue = self
            moved.append((timer._deadline, seq, timer))
        other._heap = []
        other._cancelled = 0
        heap = self._heap
        for entry in moved:
            heapq.heappush(heap, entry)
        if moved and self.on_new_head is not None:
            self.on_new_head(heap[0][0])

    def cancel_all(self) -> None:
        """Cancel every timer (loop teardown, ``Reset``)."""
        heap, self._heap = self._heap, []
        self._cancelled = 0
        for _, _, timer in heap:
            timer._queue = None
            timer._callback = None
            timer._args = ()
