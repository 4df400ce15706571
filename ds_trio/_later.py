"""``later`` batches, idle expiry and named timers (module-level DS functions).

``later(cb)`` is the seed's way to run housekeeping "some time soon" without
a timer per call: every callback queued while one 60-second timer is armed
runs when it fires, and whatever is still queued runs when the loop
finishes.  ``expire_old`` is itself run through ``later``: while anything is
tracked, idle clients are checked about once a minute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from ._loop import Loop, _state
from ._timers import Timer, check_delay

__all__ = ["LATER_DELAY", "add_uniq_timer", "expire_old", "later"]

#: Seconds from a batch's first ``later`` call to its run (the seed's 60).
LATER_DELAY: Final = 60.0


def later(callback: Callable[..., object], *args: Any) -> Timer:
    """Run ``callback(*args)`` with the current batch, about 60 s from now.

    All callbacks queued while a batch's timer is pending run together when
    it fires, in order; callbacks queued by them start a new batch.  Pending
    callbacks also run when the loop finishes normally.

    Returns:
        The batch's timer (truthy; the seed's callers keep it as their
        "armed" guard).

    Raises:
        TypeError: ``callback`` is not callable.
    """
    if not callable(callback):
        raise TypeError(f"later() needs a callable, got {callback!r}")
    state = _state()
    state.later_queue.append((callback, args))
    timer = state.later_timer
    if timer is None or not timer.active:
        timer = state.later_timer = state.timers.add(LATER_DELAY, state.run_later, ())
    return timer


def expire_old() -> None:
    """Shut down every object idle longer than its ``EXPTIME`` (the seed's).

    Objects are checked oldest first and the scan stops at the first one
    still within its time, so a check costs O(expired), not O(tracked).
    ``shutdn`` is called on each expired object; closing it forgets it.
    While anything is still tracked the next check is queued with
    :func:`later`.
    """
    state = _state()
    now = state.timers.clock()
    try:
        for obj in state.idle.pop_expired(now):
            if obj.sock is None:
                continue
            try:
                obj.shutdn()
            except Exception as exc:
                if not isinstance(state, Loop):
                    raise
                # The object's failure, under the loop's policy: errors="log"
                # closes it and goes on with the others.
                state.failed(exc, obj.shutdn, obj)
    finally:
        # Re-armed even after a failure: the seed's loop died with it, but
        # a loop that goes on must keep checking.
        if len(state.idle):
            later(expire_old)
            state.exp_armed = True
        else:
            state.exp_armed = False


def add_uniq_timer(
    name: object, seconds: float, callback: Callable[..., object], *args: Any
) -> Timer | None:
    """Arm a timer named ``name`` unless one of that name is pending (newer DS).

    "A common pattern we use is to arm a timer once and prevent it from
    being armed until it fires" (upstream e693f102).

    Returns:
        The new timer, or None when one of that name was already pending.

    Raises:
        TypeError: ``callback`` is not callable or ``seconds`` not a number.
        ValueError: ``seconds`` is NaN or infinite.
    """
    if not callable(callback):
        raise TypeError(f"timer callback must be callable, got {callback!r}")
    delay = check_delay(seconds)
    state = _state()
    pending = state.uniq_timers.get(name)
    if pending is not None and pending.active:
        return None
    timer = state.timers.add(delay, callback, args, name)
    state.uniq_timers[name] = timer
    return timer
