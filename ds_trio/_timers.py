"""The deadline heap: one sorted-deadline scheduler per loop.

The seed keeps ``@Timers`` sorted by a linear scan on insert (its comment says
that beat heaps in Danga's benchmarks; that holds only for FIFO inserts, and
with random deadlines it is thousands of times slower at 100k timers).  Here
a binary heap of timers keeps inserts and pops logarithmic.  Each timer is a
list whose first two items are its deadline and a number from one
process-wide counter, so equal deadlines fire in insertion order (the seed's
stable sort) and comparisons never reach the callback.

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
_heappush = heapq.heappush


def check_delay(seconds: object) -> float:
    """Validate a timer delay: a finite real number of seconds."""
    if type(seconds) is float:  # the common case, without the ABC check
        if seconds - seconds == 0:  # not inf, not NaN
            return seconds
        raise ValueError(f"seconds must be finite, got {seconds!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"seconds must be a real number, not {type(seconds).__name__}")
    value = float(seconds)
    if not math.isfinite(value):
        raise ValueError(f"seconds must be finite, got {seconds!r}")
    return value


class Timer(list[Any]):
    """A pending timer, as returned by :func:`ds_trio.add_timer`.

    The seed returned the raw ``[fire_time, coderef]`` array and callers
    cancelled by clearing the coderef; here :meth:`cancel` does that.  The
    timer *is* its heap entry - a list ``[deadline, seq, callback, args,
    queue, name]`` - so the heap compares it in C (deadline, then the unique
    sequence number) and an insert allocates one object, not two: a
    million pending timers cost a million small lists.
    """

    __slots__ = ()

    @property
    def deadline(self) -> float:
        """When the timer fires, on the clock of the loop that holds it."""
        return float(self[0])

    @property
    def active(self) -> bool:
        """True until the timer fired or was cancelled."""
        return self[2] is not None

    @property
    def name(self) -> object:
        """The name given to ``add_uniq_timer``, or None."""
        return self[5]

    def cancel(self) -> bool:
        """Cancel the timer.

        Returns:
            True if it was pending, False if it had already fired or been
            cancelled.  Never raises, so it is safe in cleanup code.
        """
        if self[2] is None:
            return False
        self[2] = None
        self[3] = ()
        queue = self[4]
        self[4] = None
        if queue is not None:
            queue._note_cancelled()
        return True

    def __repr__(self) -> str:
        state = "active" if self.active else "done"
        return f"<Timer {state} deadline={self[0]:.6f} name={self[5]!r}>"

    # Hashable by identity, so a timer can be a dict key or in a set.  No
    # __eq__ override: the heap compares timers with list's C comparison,
    # and an object.__eq__ slot made each comparison a Python-level
    # dispatch (1M inserts: 1.5 s of heappush, not 0.9).  The unique seq
    # makes two different timers unequal all the same.
    __hash__ = object.__hash__  # type: ignore[assignment]


class TimerQueue:
    """A heap of timers on one clock.

    ``clock`` returns the current time of that clock; ``on_new_head`` (if
    set) is called with the new earliest deadline whenever an insert becomes
    the head, so a sleeping driver can move its wake-up earlier without a
    task switch; ``on_empty`` when the last live timer is cancelled.
    """

    __slots__ = ("_cancelled", "_heap", "clock", "on_empty", "on_new_head")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._heap: list[Timer] = []
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
        timer = Timer((deadline, next(_seq), callback, args, self, name))
        heap = self._heap
        _heappush(heap, timer)
        if heap[0] is timer and self.on_new_head is not None:
            self.on_new_head(deadline)
        return timer

    def next_deadline(self) -> float:
        """The earliest live deadline, or ``math.inf``."""
        heap = self._heap
        while heap:
            head = heap[0]
            if head[2] is not None:
                return float(head[0])
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
            timer = heapq.heappop(heap)
            if timer[2] is None:
                self._cancelled -= 1
                continue
            timer[4] = None
            due.append(timer)
        return due

    @staticmethod
    def fire(timer: Timer) -> bool:
        """Run a timer returned by :meth:`pop_due` unless it was cancelled since.

        Returns:
            True if its callback ran.
        """
        callback, args = timer[2], timer[3]
        if callback is None:
            return False
        timer[2] = None
        timer[3] = ()
        callback(*args)
        return True

    def _note_cancelled(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(heap):
            self._heap = [timer for timer in heap if timer[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
        if self.on_empty is not None and len(self) == 0:
            self.on_empty()

    def adopt(self, other: TimerQueue) -> None:
        """Move every live timer of ``other`` (another clock) into this queue.

        Each keeps its remaining time: the seed's clock never stops, so a
        timer added before the loop started fires relative to when it was
        added, not to when the loop began.  Relative order, ties included,
        is kept because the sequence number travels with the timer.
        """
        delta = self.clock() - other.clock()
        moved = [timer for timer in other._heap if timer[2] is not None]
        other._heap = []
        other._cancelled = 0
        heap = self._heap
        for timer in moved:
            timer[0] += delta
            timer[4] = self
            heapq.heappush(heap, timer)
        if moved and self.on_new_head is not None:
            self.on_new_head(heap[0][0])

    def cancel_all(self) -> None:
        """Cancel every timer (loop teardown, ``Reset``)."""
        heap, self._heap = self._heap, []
        self._cancelled = 0
        for timer in heap:
            timer[4] = None
            timer[2] = None
            timer[3] = ()
