"""Timers: the TimerQueue heap on a fake clock, then add_timer inside loops."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_trio
from ds_trio._timers import Timer, TimerQueue, check_delay

pytestmark = pytest.mark.anyio

MOCK_CLOCK = pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(
            ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
            id="trio-mockclock",
        )
    ],
)


class FakeClock:
    """A mutable clock for TimerQueue."""

    def __init__(self, start: float = 0.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value


def drain(queue: TimerQueue, now: float = math.inf) -> list[object]:
    """Pop and fire every timer due at ``now``; return the names of those fired."""
    names: list[object] = []
    while due := queue.pop_due(now):
        for timer in due:
            if TimerQueue.fire(timer):
                names.append(timer.name)
    return names


def noop(*args: object) -> None:
    pass


# ----------------------------------------------------------------------
# TimerQueue, synchronously, on a fake clock
# ----------------------------------------------------------------------


def test_equal_deadlines_pop_in_insertion_order() -> None:
    queue = TimerQueue(FakeClock())
    for name in "abcdefgh":
        queue.add(1.0, noop, (), name)
    assert drain(queue) == list("abcdefgh")


def test_pop_due_returns_nothing_before_the_deadline() -> None:
    clock = FakeClock()
    queue = TimerQueue(clock)
    queue.add(5.0, noop, (), "a")
    assert queue.pop_due(4.999) == []
    assert len(queue) == 1
    assert drain(queue, 5.0) == ["a"]
    assert len(queue) == 0


def test_deadline_is_clock_plus_delay() -> None:
    clock = FakeClock(100.0)
    queue = TimerQueue(clock)
    timer = queue.add(2.5, noop, ())
    assert timer.deadline == 102.5
    assert queue.next_deadline() == 102.5


op_strategy = st.lists(
    st.tuples(
        # delay: few distinct values so ties are frequent
        st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.25, 10.0]),
        # cancel this timer before draining?
        st.booleans(),
        # advance the fake clock by this much after the insert
        st.sampled_from([0.0, 0.0, 0.25, 1.0]),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(ops=op_strategy)
def test_timers_pop_in_deadline_then_insertion_order(
    ops: list[tuple[float, bool, float]],
) -> None:
    clock = FakeClock()
    queue = TimerQueue(clock)
    expected: list[tuple[float, int]] = []
    timers: list[tuple[Timer, bool]] = []
    for index, (delay, cancel, advance) in enumerate(ops):
        timer = queue.add(delay, noop, (), index)
        assert timer.deadline == clock.value + delay
        timers.append((timer, cancel))
        if not cancel:
            expected.append((clock.value + delay, index))
        clock.value += advance
    for timer, cancel in timers:
        if cancel:
            assert timer.cancel() is True
    assert len(queue) == len(expected)
    popped = drain(queue)
    assert popped == [index for _, index in sorted(expected)]
    assert len(queue) == 0
    assert queue.next_deadline() == math.inf
    assert all(not timer.active for timer, _ in timers)


@settings(max_examples=100, deadline=None)
@given(
    timers_spec=st.lists(
        st.tuples(st.floats(min_value=-5, max_value=5), st.booleans()), max_size=100
    )
)
def test_cancelled_timers_never_pop_and_next_deadline_skips_them(
    timers_spec: list[tuple[float, bool]],
) -> None:
    queue = TimerQueue(FakeClock())
    timers = [queue.add(delay, noop, (), i) for i, (delay, _) in enumerate(timers_spec)]
    cancelled = {i for i, (_, cancel) in enumerate(timers_spec) if cancel}
    for i in cancelled:
        timers[i].cancel()
    live = sorted((d, i) for i, (d, _) in enumerate(timers_spec) if i not in cancelled)
    assert queue.next_deadline() == (live[0][0] if live else math.inf)
    # Pop in two halves around a "now", as the loop does round after round.
    popped = drain(queue, 0.0) + drain(queue)
    assert popped == [i for _, i in live]
    assert not set(popped) & cancelled


def test_add_and_cancel_many_keeps_the_heap_bounded() -> None:
    queue = TimerQueue(FakeClock())
    keep = [queue.add(1000.0 + i, noop, ()) for i in range(10)]
    largest = 0
    for i in range(100_000):
        queue.add(float(i % 97), noop, ()).cancel()
        largest = max(largest, len(queue._heap))
        assert len(queue._heap) <= 2 * len(queue) + 64
    assert len(queue) == len(keep)
    assert largest <= 2 * len(keep) + 64
    assert drain(queue) == [None] * len(keep)


def test_cancelling_most_of_a_large_heap_compacts_it() -> None:
    queue = TimerQueue(FakeClock())
    timers = [queue.add(float(i), noop, (), i) for i in range(10_000)]
    for timer in timers[:9_000]:
        timer.cancel()
    assert len(queue) == 1_000
    assert len(queue._heap) <= 2 * len(queue) + 64
    assert drain(queue) == list(range(9_000, 10_000))


def test_cancel_returns_true_once_then_false() -> None:
    queue = TimerQueue(FakeClock())
    timer = queue.add(1.0, noop, ())
    active_before = timer.active
    first = timer.cancel()
    active_after = timer.active
    assert (active_before, first, active_after) == (True, True, False)
    assert timer.cancel() is False
    assert timer.cancel() is False
    assert len(queue) == 0
    assert drain(queue) == []


def test_cancel_after_firing_returns_false() -> None:
    fired: list[int] = []
    queue = TimerQueue(FakeClock())
    timer = queue.add(0.0, fired.append, (1,))
    assert queue.pop_due(0.0) == [timer]
    assert TimerQueue.fire(timer) is True
    assert fired == [1]
    assert timer.active is False
    assert timer.cancel() is False
    assert len(queue) == 0


def test_pop_due_returns_the_due_batch_in_order_and_leaves_the_rest() -> None:
    queue = TimerQueue(FakeClock())
    for name, delay in [("c", 2.0), ("a", 1.0), ("late", 3.0), ("b", 1.0)]:
        queue.add(delay, noop, (), name)
    assert [t.name for t in queue.pop_due(2.0)] == ["a", "b", "c"]
    assert len(queue) == 1
    assert queue.next_deadline() == 3.0


def test_batched_timer_cancelled_before_it_fires_does_not_fire() -> None:
    fired: list[str] = []
    queue = TimerQueue(FakeClock())
    first = queue.add(0.0, fired.append, ("first",))
    second = queue.add(0.0, fired.append, ("second",))
    assert queue.pop_due(0.0) == [first, second]
    assert TimerQueue.fire(first) is True
    # As an earlier callback of the batch would:
    assert second.cancel() is True
    assert second.active is False
    assert TimerQueue.fire(second) is False
    assert fired == ["first"]
    assert len(queue) == 0


def test_timer_added_while_a_batch_fires_is_not_in_that_batch() -> None:
    clock = FakeClock()
    queue = TimerQueue(clock)
    fired: list[str] = []

    def rearm() -> None:
        fired.append("rearm")
        queue.add(0.0, fired.append, ("zero",), "zero")
        queue.add(-1.0, fired.append, ("negative",), "negative")

    queue.add(0.0, rearm, ())
    for timer in queue.pop_due(clock.value):
        TimerQueue.fire(timer)
    assert fired == ["rearm"]
    assert len(queue) == 2
    # The next round, with the clock unmoved.
    assert drain(queue, clock.value) == ["negative", "zero"]


def test_fire_passes_the_args() -> None:
    seen: list[tuple[object, ...]] = []
    queue = TimerQueue(FakeClock())
    queue.add(0.0, lambda *a: seen.append(a), (1, "two", None))
    assert drain(queue) == [None]
    assert seen == [(1, "two", None)]


def test_adopt_keeps_the_remaining_time() -> None:
    pending_clock = FakeClock(100.0)
    pending = TimerQueue(pending_clock)
    timer = pending.add(5.0, noop, (), "t")
    assert timer.deadline == 105.0
    pending_clock.value = 103.0
    running = TimerQueue(FakeClock(0.0))
    running.adopt(pending)
    assert timer.deadline == pytest.approx(2.0)
    assert running.next_deadline() == pytest.approx(2.0)
    assert len(running) == 1
    assert len(pending) == 0
    assert pending._heap == []
    assert drain(running, 1.999) == []
    assert drain(running, 2.0) == ["t"]


def test_adopt_keeps_tie_order_and_drops_cancelled() -> None:
    pending = TimerQueue(FakeClock(50.0))
    running = TimerQueue(FakeClock(0.0))
    first = pending.add(1.0, noop, (), "first")
    dead = pending.add(1.0, noop, (), "dead")
    second = pending.add(1.0, noop, (), "second")
    early = pending.add(0.5, noop, (), "early")
    dead.cancel()
    # Added to the running queue after the pending ones, same deadline.
    running.clock = FakeClock(-49.0)
    later = running.add(50.0, noop, (), "later")
    running.clock = FakeClock(0.0)
    running.adopt(pending)
    assert first.deadline == second.deadline == later.deadline == 1.0
    assert early.deadline == 0.5
    assert len(running) == 4
    assert drain(running) == ["early", "first", "second", "later"]


def test_adopted_timer_cancels_from_its_new_queue() -> None:
    pending = TimerQueue(FakeClock(10.0))
    running = TimerQueue(FakeClock(0.0))
    timer = pending.add(1.0, noop, ())
    running.adopt(pending)
    assert len(running) == 1
    assert timer.cancel() is True
    assert len(running) == 0
    assert len(pending) == 0


def test_on_new_head_called_only_when_the_head_moves_earlier() -> None:
    heads: list[float] = []
    queue = TimerQueue(FakeClock())
    queue.on_new_head = heads.append
    queue.add(10.0, noop, ())
    assert heads == [10.0]
    queue.add(20.0, noop, ())
    assert heads == [10.0]
    queue.add(10.0, noop, ())  # a tie is not earlier
    assert heads == [10.0]
    queue.add(5.0, noop, ())
    assert heads == [10.0, 5.0]
    queue.add(7.0, noop, ())
    assert heads == [10.0, 5.0]
    queue.add(-1.0, noop, ())
    assert heads == [10.0, 5.0, -1.0]


def test_on_empty_called_when_the_last_live_timer_is_cancelled() -> None:
    calls: list[int] = []
    queue = TimerQueue(FakeClock())
    queue.on_empty = lambda: calls.append(len(queue))
    a = queue.add(1.0, noop, ())
    b = queue.add(2.0, noop, ())
    a.cancel()
    assert calls == []
    b.cancel()
    assert calls == [0]


def test_cancel_all_deactivates_every_timer() -> None:
    queue = TimerQueue(FakeClock())
    timers = [queue.add(float(i), noop, ()) for i in range(5)]
    queue.cancel_all()
    assert len(queue) == 0
    assert all(not t.active for t in timers)
    assert all(t.cancel() is False for t in timers)
    assert drain(queue) == []


def test_timers_compare_by_identity() -> None:
    queue = TimerQueue(FakeClock())
    # Same deadline, callback, args and name: still two different timers.
    first = queue.add(1.0, noop, (), "same")
    second = queue.add(1.0, noop, (), "same")
    assert first == first
    assert first != second
    assert len({first, second, first}) == 2
    assert {first: 1}[first] == 1
    assert hash(first) != hash(second)
    # Firing or cancelling does not change a timer's identity.
    pending_hash = hash(first)
    first.cancel()
    second.cancel()
    assert hash(first) == pending_hash
    assert first != second


def test_a_timer_is_truthy_in_every_state() -> None:
    # ``later`` callers keep the returned timer as their "armed" guard.
    queue = TimerQueue(FakeClock())
    timer = queue.add(0.0, noop, ())
    assert timer
    assert queue.pop_due(0.0) == [timer]
    assert TimerQueue.fire(timer)
    assert timer


def test_deadline_name_and_active_after_fire_cancel_and_adopt() -> None:
    pending = TimerQueue(FakeClock(100.0))
    fired = pending.add(1.0, noop, (), "fired")
    cancelled = pending.add(2.0, noop, (), "cancelled")
    adopted = pending.add(3.0, noop, (), "adopted")
    assert cancelled.cancel() is True
    assert (cancelled.deadline, cancelled.name, cancelled.active) == (
        102.0,
        "cancelled",
        False,
    )
    running = TimerQueue(FakeClock(0.0))
    running.adopt(pending)
    assert (adopted.deadline, adopted.name, adopted.active) == (3.0, "adopted", True)
    assert (fired.deadline, fired.name, fired.active) == (1.0, "fired", True)
    # The cancelled one was not moved: its deadline stays on the old clock.
    assert cancelled.deadline == 102.0
    assert running.pop_due(1.0) == [fired]
    assert fired.active is True  # batched, not yet run
    assert TimerQueue.fire(fired) is True
    assert (fired.deadline, fired.name, fired.active) == (1.0, "fired", False)
    assert repr(fired) == "<Timer done deadline=1.000000 name='fired'>"
    assert "active" in repr(adopted)
    assert adopted.cancel() is True
    assert adopted.cancel() is False
    assert (adopted.deadline, adopted.name, adopted.active) == (3.0, "adopted", False)
    assert len(running) == 0
    assert running.next_deadline() == math.inf


def test_cancel_is_idempotent_in_every_state() -> None:
    queue = TimerQueue(FakeClock())
    pending = queue.add(5.0, noop, ())
    batched = queue.add(0.0, noop, ())
    fired = queue.add(0.0, noop, ())
    torn_down = queue.add(9.0, noop, ())
    assert queue.pop_due(0.0) == [batched, fired]
    assert TimerQueue.fire(fired) is True
    assert [pending.cancel(), pending.cancel()] == [True, False]
    assert [batched.cancel(), batched.cancel()] == [True, False]
    assert TimerQueue.fire(batched) is False
    assert [fired.cancel(), fired.cancel()] == [False, False]
    queue.cancel_all()
    assert [torn_down.cancel(), torn_down.cancel()] == [False, False]
    assert len(queue) == 0


def test_cancelling_a_popped_timer_leaves_the_live_count_alone() -> None:
    queue = TimerQueue(FakeClock())
    batched = queue.add(0.0, noop, ())
    later = queue.add(1.0, noop, ())
    assert queue.pop_due(0.0) == [batched]
    assert batched.cancel() is True
    assert len(queue) == 1
    assert queue.next_deadline() == 1.0
    assert drain(queue) == [None]
    assert later.active is False


@pytest.mark.parametrize("value", [0, 1, -3, 0.5, -0.25, 1e9])
def test_check_delay_accepts_finite_numbers(value: float) -> None:
    result = check_delay(value)
    assert isinstance(result, float)
    assert result == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_delay_rejects_non_finite_with_value_error(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        check_delay(value)


@pytest.mark.parametrize("value", [True, False, "1", b"1", None, [1], 1j])
def test_check_delay_rejects_non_numbers_with_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        check_delay(value)


# ----------------------------------------------------------------------
# add_timer inside loops
# ----------------------------------------------------------------------


async def test_add_timer_passes_args() -> None:
    seen: list[tuple[object, ...]] = []
    async with ds_trio.loop():
        ds_trio.add_timer(0, lambda *a: seen.append(a), 1, "two", None)
        ds_trio.add_timer(0, lambda: seen.append(()))
    assert seen == [(1, "two", None), ()]


async def test_zero_and_negative_delays_fire_in_deadline_order() -> None:
    order: list[str] = []
    async with ds_trio.loop():
        ds_trio.add_timer(0, order.append, "a")
        ds_trio.add_timer(-5, order.append, "b")
        ds_trio.add_timer(0, order.append, "c")
        ds_trio.add_timer(-1, order.append, "d")
        ds_trio.add_timer(-5, order.append, "e")
    assert order == ["b", "e", "d", "a", "c"]


async def test_zero_delay_timer_fires_in_the_first_round() -> None:
    rounds: list[int] = []
    async with ds_trio.loop() as lp:
        ds_trio.add_timer(0, lambda: rounds.append(lp.statistics().rounds))
    assert rounds == [0]


@pytest.mark.parametrize("delay", [0, -1])
async def test_timer_added_from_a_timer_fires_in_a_later_round(delay: float) -> None:
    rounds: list[tuple[str, int]] = []
    async with ds_trio.loop() as lp:

        def first() -> None:
            rounds.append(("first", lp.statistics().rounds))
            ds_trio.add_timer(delay, second)

        def second() -> None:
            rounds.append(("second", lp.statistics().rounds))

        ds_trio.add_timer(0, first)
    assert rounds[0] == ("first", 0)
    assert rounds[1][0] == "second"
    assert rounds[1][1] >= 1


@MOCK_CLOCK
async def test_self_rearming_zero_timer_runs_once_per_round_without_spinning() -> None:
    # With a virtual clock that never moves, a 0 s timer re-adding itself
    # must still wait for the next round each time (the seed samples now once).
    seen_rounds: list[int] = []
    async with ds_trio.loop() as lp:
        start = ds_trio.now()

        def again() -> None:
            seen_rounds.append(lp.statistics().rounds)
            if len(seen_rounds) < 20:
                ds_trio.add_timer(0, again)

        ds_trio.add_timer(0, again)
    assert len(seen_rounds) == 20
    assert seen_rounds == sorted(set(seen_rounds))
    assert trio.current_time() == start


@MOCK_CLOCK
async def test_timers_fire_in_deadline_order_with_ties_in_insertion_order() -> None:
    order: list[str] = []
    async with ds_trio.loop():
        ds_trio.add_timer(3, order.append, "a")
        ds_trio.add_timer(1, order.append, "b")
        ds_trio.add_timer(2, order.append, "c")
        ds_trio.add_timer(1, order.append, "d")
        ds_trio.add_timer(0.5, order.append, "e")
        ds_trio.add_timer(3, order.append, "f")
        ds_trio.add_timer(1, order.append, "g")
    assert order == ["e", "b", "d", "g", "c", "a", "f"]


@MOCK_CLOCK
async def test_timers_added_before_the_loop_are_adopted_in_deadline_order() -> None:
    fired: list[tuple[str, float]] = []

    def record(name: str) -> None:
        fired.append((name, ds_trio.now()))

    # No loop runs yet: these go to the thread's pending state.
    assert not ds_trio.in_loop()
    ds_trio.add_timer(300, record, "c")
    ds_trio.add_timer(100, record, "a")
    ds_trio.add_timer(200, record, "b")
    ds_trio.add_timer(200, record, "b2")
    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.add_timer(150, record, "in-loop")
    assert [name for name, _ in fired] == ["a", "in-loop", "b", "b2", "c"]
    times = dict(fired)
    # Each pending timer keeps its delay, less the (real, tiny) time that
    # passed between add_timer and the loop's start.
    for name, delay in [("a", 100), ("b", 200), ("b2", 200), ("c", 300)]:
        assert delay - 10 < times[name] - start <= delay
    assert times["in-loop"] - start == pytest.approx(150)


async def test_zero_delay_timers_added_before_the_loop_fire_in_order() -> None:
    order: list[str] = []
    ds_trio.add_timer(0, order.append, "b")
    ds_trio.add_timer(-1, order.append, "a")
    ds_trio.add_timer(0, order.append, "c")
    async with ds_trio.loop() as lp:
        assert lp.statistics().timers_pending == 3
    assert order == ["a", "b", "c"]


@pytest.mark.parametrize("delay", [0, -1, -3600])
async def test_due_timer_added_before_the_loop_fires_in_the_first_round(
    delay: float,
) -> None:
    """Invariant 3: ``add_timer(0)`` (or negative) before ``EventLoop``.

    The seed's first ``RunTimers`` samples ``now`` after ``next_tick`` and
    fires it: the round counter is still 0, and the first post-loop call
    (which ends the loop) comes after it.
    """
    log: list[object] = []

    def post(_map: dict[int, ds_trio.DS]) -> bool:
        log.append("post")
        return False

    ds_trio.add_timer(
        delay, lambda: log.append(ds_trio.current_loop().statistics().rounds)
    )
    ds_trio.SetPostLoopCallback(post)
    async with ds_trio.loop():
        pass
    assert log == [0, "post"]


@pytest.mark.parametrize("delay", [0, -1])
async def test_due_timer_added_by_a_requeued_item_fires_in_the_same_round(
    delay: float,
) -> None:
    """The seed samples ``now`` after ``next_tick``: such a timer is due then."""
    log: list[object] = []

    def queued() -> None:
        log.append(("queued", ds_trio.current_loop().statistics().rounds))
        ds_trio.add_timer(
            delay,
            lambda: log.append(("timer", ds_trio.current_loop().statistics().rounds)),
        )

    def post(_map: dict[int, ds_trio.DS]) -> bool:
        log.append("post")
        return False

    ds_trio.requeue(queued)
    ds_trio.SetPostLoopCallback(post)
    async with ds_trio.loop():
        pass
    assert log == [("queued", 0), ("timer", 0), "post"]


@MOCK_CLOCK
async def test_now_in_a_timer_callback_is_at_least_its_deadline() -> None:
    seen: list[tuple[float, float]] = []
    timers: list[Timer] = []

    def record(index: int) -> None:
        seen.append((ds_trio.now(), timers[index].deadline))

    async with ds_trio.loop():
        for index, delay in enumerate([0.1, 1 / 3, 2.0, 7.77, 0, 1e-9, 42.5]):
            timers.append(ds_trio.add_timer(delay, record, index))
    assert len(seen) == len(timers)
    for now, deadline in seen:
        assert now >= deadline


async def test_cancel_before_firing_prevents_it() -> None:
    fired: list[str] = []
    async with ds_trio.loop():
        keep = ds_trio.add_timer(0, fired.append, "keep")
        drop = ds_trio.add_timer(0, fired.append, "drop")
        assert drop.cancel() is True
    assert fired == ["keep"]
    assert keep.active is False
    assert drop.active is False
    assert keep.cancel() is False
    assert drop.cancel() is False


async def test_cancel_inside_its_own_callback_returns_false() -> None:
    answers: list[bool] = []
    timers: list[Timer] = []
    async with ds_trio.loop():
        timers.append(ds_trio.add_timer(0, lambda: answers.append(timers[0].cancel())))
    assert answers == [False]


async def test_cancel_from_an_earlier_timer_in_the_same_round_prevents_it() -> None:
    fired: list[str] = []
    victim: list[Timer] = []

    def killer() -> None:
        fired.append("killer")
        assert victim[0].cancel() is True

    async with ds_trio.loop():
        ds_trio.add_timer(-1, killer)
        victim.append(ds_trio.add_timer(0, fired.append, "victim"))
    assert fired == ["killer"]


@MOCK_CLOCK
async def test_cancelling_the_last_timer_lets_an_idle_loop_finish() -> None:
    fired: list[str] = []

    async def cancel_later(timer: Timer) -> None:
        await trio.sleep(1)
        assert timer.cancel() is True

    start = trio.current_time()
    async with anyio.create_task_group() as outer:
        async with ds_trio.loop():
            timer = ds_trio.add_timer(3600, fired.append, "late")
            # Not a loop task: cancels while the driver sleeps towards 3600.
            outer.start_soon(cancel_later, timer)
        finished = trio.current_time()
    assert fired == []
    assert finished - start == pytest.approx(1)


@MOCK_CLOCK
async def test_cancelling_the_last_timer_from_a_timer_lets_the_loop_finish() -> None:
    fired: list[str] = []
    start = trio.current_time()
    async with ds_trio.loop():
        late = ds_trio.add_timer(3600, fired.append, "late")
        ds_trio.add_timer(5, late.cancel)
    assert fired == []
    assert trio.current_time() - start == pytest.approx(5)


@MOCK_CLOCK
async def test_earlier_timer_added_while_the_driver_sleeps_fires_at_its_time() -> None:
    fired: dict[str, float] = {}

    def record(name: str) -> None:
        fired[name] = ds_trio.now()

    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.add_timer(100, record, "late")
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(10)  # the driver is asleep until start + 100
        added = ds_trio.now()
        ds_trio.add_timer(5, record, "early")
        await anyio.sleep(50)
        assert "early" in fired
    assert added - start == pytest.approx(10)
    assert fired["early"] == pytest.approx(added + 5)
    assert fired["late"] == pytest.approx(start + 100)


async def test_zero_delay_timer_added_while_the_driver_sleeps_fires_at_once() -> None:
    fired = anyio.Event()
    late: list[str] = []
    # A hang guard only: the driver sleeps towards the hour-long timer, and
    # the new head must wake it without waiting for that.
    with anyio.fail_after(10):
        async with ds_trio.loop() as lp:
            hour = ds_trio.add_timer(3600, late.append, "hour")
            await anyio.wait_all_tasks_blocked()
            rounds = lp.statistics().rounds
            ds_trio.add_timer(0, fired.set)
            await fired.wait()
            assert lp.statistics().rounds >= rounds
            assert hour.cancel() is True
    assert late == []


@MOCK_CLOCK
async def test_earlier_timer_added_by_a_timer_fires_at_its_time() -> None:
    fired: dict[str, float] = {}

    def record(name: str) -> None:
        fired[name] = ds_trio.now()

    def add_early() -> None:
        record("adder")
        ds_trio.add_timer(1, record, "early")

    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.add_timer(100, record, "late")
        ds_trio.add_timer(10, add_early)
    assert fired["adder"] == pytest.approx(start + 10)
    assert fired["early"] == pytest.approx(start + 11)
    assert fired["late"] == pytest.approx(start + 100)


@MOCK_CLOCK
async def test_thousand_random_timers_fire_in_sorted_order() -> None:
    rng = random.Random(20240601)
    # Rounded delays make ties frequent; ties fire in insertion order.
    delays = [round(rng.uniform(-1, 600), 1) for _ in range(1000)]
    fired: list[int] = []
    late: list[int] = []
    timers: list[Timer] = []

    def record(index: int) -> None:
        fired.append(index)
        if ds_trio.now() < timers[index].deadline:
            late.append(index)

    async with ds_trio.loop():
        for index, delay in enumerate(delays):
            timers.append(ds_trio.add_timer(delay, record, index))
    assert fired == sorted(range(len(delays)), key=lambda i: (delays[i], i))
    assert late == []


async def test_failing_timer_under_errors_log_does_not_stop_later_timers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    order: list[str] = []

    def boom() -> None:
        order.append("boom")
        raise RuntimeError("timer exploded")

    async with ds_trio.loop(errors="log"):
        ds_trio.add_timer(-1, boom)
        ds_trio.add_timer(0, order.append, "after")
    assert order == ["boom", "after"]
    assert "timer exploded" in caplog.text


BAD_TIMER_ARGS: list[Any] = [
    pytest.param(1, "not callable", TypeError, id="str-callback"),
    pytest.param(1, None, TypeError, id="none-callback"),
    pytest.param(math.nan, noop, ValueError, id="nan"),
    pytest.param(math.inf, noop, ValueError, id="inf"),
    pytest.param(-math.inf, noop, ValueError, id="-inf"),
    pytest.param("1", noop, TypeError, id="str-seconds"),
    pytest.param(True, noop, TypeError, id="bool-seconds"),
]


@pytest.mark.parametrize(("seconds", "callback", "error"), BAD_TIMER_ARGS)
def test_add_timer_rejects_bad_input_outside_a_loop(
    seconds: Any, callback: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ds_trio.add_timer(seconds, callback)


@pytest.mark.parametrize(("seconds", "callback", "error"), BAD_TIMER_ARGS)
async def test_add_timer_rejects_bad_input_inside_a_loop(
    seconds: Any, callback: Any, error: type[Exception]
) -> None:
    async with ds_trio.loop() as lp:
        with pytest.raises(error):
            ds_trio.add_timer(seconds, callback)
        assert lp.statistics().timers_pending == 0


async def test_rejected_pending_timer_is_not_adopted() -> None:
    bad: Callable[..., object] = None  # type: ignore[assignment]
    with pytest.raises(TypeError):
        ds_trio.add_timer(0, bad)
    with pytest.raises(ValueError, match="finite"):
        ds_trio.add_timer(math.nan, noop)
    async with ds_trio.loop() as lp:
        assert lp.statistics().timers_pending == 0
