"""Supervisors: ``later`` batches, idle expiry, child reaping, signals, uniq timers.

Virtual time (``later``'s 60 s batches, ``EXPTIME``) is driven by trio's
MockClock; child reaping and signals run on trio and asyncio (and uvloop
for the SIGCHLD emulation).  No test sleeps real time to let time pass:
children exit when the test releases them through a pipe, and the only
real-time bounds are ``fail_after`` guards against hangs.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import signal
import socket
import subprocess
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import trio.testing

import ds_trio
import ds_trio._idle
import ds_trio._reaper
from ds_trio import DS, EPOLLIN, EPOLLONESHOT
from ds_trio.testing import assert_no_leaks, socketpair, zombie_children

from .helpers import wait_for

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

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

UVLOOP = pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(
            ("asyncio", {"use_uvloop": True}),
            id="uvloop",
            marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed"),
        )
    ],
)

#: Real-time guard against hangs (a bound on waiting for an event, never
#: an assertion about how long something took).
GUARD = 20


# ----------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------


def fork_child(
    code: int = 0,
    *,
    wait_fd: int | None = None,
    close_fd: int | None = None,
    kill_self: int | None = None,
) -> int:
    """Fork a child that exits at once with ``code`` (after reading one byte
    from ``wait_fd`` if given, or killing itself with ``kill_self``)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a multi-threaded process; the
        # child only calls async-signal-safe functions before _exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if close_fd is not None:
                os.close(close_fd)
            if wait_fd is not None:
                os.read(wait_fd, 1)
            if kill_self is not None:
                os.kill(os.getpid(), kill_self)
        finally:
            os._exit(code)
    return pid


def popen_child(script: str, *, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/bin/sh", "-c", script], stdin=stdin)


def spawn_child(code: int) -> int:
    return os.posix_spawn("/bin/sh", ["sh", "-c", f"exit {code}"], dict(os.environ))


def exit_code() -> int:
    """The exit code (negative: killing signal) of the child being reported."""
    return os.waitstatus_to_exitcode(ds_trio.child_status())


def reap_now(pid: int) -> None:
    """Reap our own exited child (the test's cleanup, never the library's)."""
    os.waitpid(pid, 0)


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists at all (reaped, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_until_reaped(pid: int) -> None:
    """Wait (bounded, real time) until someone else reaped ``pid``."""
    with anyio.fail_after(GUARD):
        while not gone(pid):
            await anyio.sleep(0.005)


def called_from_run_queue() -> bool:
    return any(frame.name == "_run_queue" for frame in traceback.extract_stack())


class Idler(DS):
    """Parked (no interest) object recording when it was shut down."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, 0)
        self.shut_at: list[float] = []

    def event_step(self) -> None:  # pragma: no cover - never armed
        pass

    def shutdn(self) -> bool | None:
        self.shut_at.append(ds_trio.now())
        return super().shutdn()


class ImapLike(Idler):
    """A protocol with IMAP's idle expiry."""

    EXPTIME = 1800


# ----------------------------------------------------------------------
# later
# ----------------------------------------------------------------------


def test_later_delay_is_the_seeds_sixty_seconds() -> None:
    assert ds_trio.LATER_DELAY == 60


@MOCK_CLOCK
async def test_later_batch_uses_one_timer_and_runs_60s_after_the_batch_began() -> None:
    ran: list[tuple[str, float]] = []

    def record(name: str) -> None:
        ran.append((name, ds_trio.now()))

    async with ds_trio.loop() as lp:
        start = ds_trio.now()
        first = ds_trio.later(record, "a")
        timers_with_batch = lp.statistics().timers_pending
        await anyio.sleep(10)
        second = ds_trio.later(record, "b")
        await anyio.sleep(30)
        third = ds_trio.later(record, "c")
        assert first is second is third
        assert lp.statistics().timers_pending == timers_with_batch
        assert ran == []
    assert [name for name, _ in ran] == ["a", "b", "c"]
    for _, when in ran:
        assert when == pytest.approx(start + 60)


@MOCK_CLOCK
async def test_later_passes_args_and_returns_a_truthy_active_timer() -> None:
    got: list[tuple[int, str]] = []
    async with ds_trio.loop():
        timer = ds_trio.later(lambda n, s: got.append((n, s)), 1, "x")
        assert isinstance(timer, ds_trio.Timer)
        assert timer
        assert timer.active
    assert got == [(1, "x")]
    assert not timer.active


@MOCK_CLOCK
async def test_later_called_from_a_later_callback_starts_a_new_batch() -> None:
    ran: list[tuple[str, float]] = []
    timers: list[ds_trio.Timer] = []

    def record(name: str) -> None:
        ran.append((name, ds_trio.now()))

    def first() -> None:
        record("first")
        timers.append(ds_trio.later(record, "second"))

    async with ds_trio.loop():
        start = ds_trio.now()
        timers.append(ds_trio.later(first))
        timers.append(ds_trio.later(record, "same batch"))
    assert [name for name, _ in ran] == ["first", "same batch", "second"]
    assert ran[0][1] == pytest.approx(start + 60)
    assert ran[1][1] == pytest.approx(start + 60)
    assert ran[2][1] == pytest.approx(start + 120)
    assert timers[0] is timers[1]
    assert timers[2] is not timers[0]


@MOCK_CLOCK
async def test_pending_later_callbacks_run_when_post_loop_callback_ends_loop() -> None:
    ran: list[tuple[str, float]] = []

    def record(name: str) -> None:
        ran.append((name, ds_trio.now()))

    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.later(record, "x")
        ds_trio.later(record, "y")
        ds_trio.SetPostLoopCallback(lambda _map: False)
    assert [name for name, _ in ran] == ["x", "y"]
    assert all(when < start + 60 for _, when in ran)


@MOCK_CLOCK
async def test_pending_later_callbacks_run_when_loop_is_stopped() -> None:
    ran: list[tuple[str, float]] = []

    def record(name: str) -> None:
        ran.append((name, ds_trio.now()))

    async with ds_trio.loop() as lp:
        start = ds_trio.now()
        ds_trio.later(record, "x")
        await anyio.sleep(5)
        ds_trio.later(record, "y")
        await anyio.sleep(5)
        assert ran == []
        lp.stop()
        await anyio.sleep_forever()
    assert [name for name, _ in ran] == ["x", "y"]
    assert all(start + 10 <= when < start + 60 for _, when in ran)


class LaterBoom(Exception):
    pass


@MOCK_CLOCK
@pytest.mark.parametrize("when", ["batch timer", "exit flush"])
@pytest.mark.parametrize(
    ("errors", "expected"), [("raise", ["bad"]), ("log", ["bad", "after bad"])]
)
async def test_later_callback_exception_and_the_rest_of_its_batch(
    when: str, errors: Literal["raise", "log"], expected: list[str]
) -> None:
    """The seed's ``_run_later`` has no eval: a ``die`` skips the batch's rest.

    Under ``errors="log"`` the failure is logged and the batch goes on.
    """
    ran: list[str] = []

    def bad() -> None:
        ran.append("bad")
        raise LaterBoom

    ds_trio.later(bad)
    ds_trio.later(ran.append, "after bad")
    if when == "exit flush":
        ds_trio.SetPostLoopCallback(lambda _map: False)
    raises: AbstractContextManager[object] = (
        pytest.raises(LaterBoom) if errors == "raise" else nullcontext()
    )
    with raises:
        async with ds_trio.loop(errors=errors):
            pass
    assert ran == expected


async def test_exit_flush_runs_the_later_batch_once_when_two_ends_meet() -> None:
    """Two TERMs handled in one round: the post-loop callback and stop() agree.

    The seed flushes once (``_run_later`` after the loop); a callback that
    re-arms itself with ``later`` (``expire_old``, IMAP's idle tick) must
    not run again from a second flush.
    """
    ran: list[str] = []

    def tick() -> None:
        ran.append("tick")
        ds_trio.later(tick)

    def two_terms() -> None:
        ds_trio.graceful_shutdown()  # sets the post-loop callback
        ds_trio.graceful_shutdown()  # the second one stops the loop

    with anyio.fail_after(30):
        async with ds_trio.loop():
            ds_trio.later(tick)
            ds_trio.requeue(two_terms)
    assert ran == ["tick"]


def test_later_batch_queued_by_the_exit_flush_stays_for_the_next_event_loop() -> None:
    ran: list[str] = []

    def tick() -> None:
        ran.append("tick")
        if len(ran) == 1:
            ds_trio.later(ran.append, "queued by the flush")

    def post(_map: dict[int, DS]) -> bool:
        ds_trio.current_loop().stop()
        return False

    # Each EventLoop() waits for the batch's timer (60 s), as the seed's
    # first epoll_wait does; the flush runs when the post-loop callback ends it.
    mock = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    ds_trio.later(tick)
    ds_trio.SetPostLoopCallback(post)
    ds_trio.EventLoop(backend_options=mock)
    assert ran == ["tick"]
    ds_trio.EventLoop(backend_options=mock)
    assert ran == ["tick", "queued by the flush"]


async def test_exit_flush_runs_inside_the_loop() -> None:
    """The seed's ``_run_later`` runs before ``local $in_loop`` is undone."""
    seen: list[tuple[bool, bool]] = []

    def check() -> None:
        seen.append((ds_trio.in_loop(), ds_trio.current_loop() is lp))

    ds_trio.later(check)
    ds_trio.SetPostLoopCallback(lambda _map: False)
    ds_trio.SetLoopTimeout(0)
    async with ds_trio.loop() as lp:
        pass
    assert seen == [(True, True)]


async def test_failed_loop_does_not_flush_later_even_if_stop_was_requested() -> None:
    ran: list[str] = []

    def post(_map: dict[int, DS]) -> bool:
        ds_trio.current_loop().stop()
        raise LaterBoom

    ds_trio.later(ran.append, "later")
    ds_trio.SetPostLoopCallback(post)
    with pytest.raises(LaterBoom):
        async with ds_trio.loop():
            pass
    assert ran == []


@pytest.mark.parametrize("bad", [None, "callback", 42])
async def test_later_rejects_a_non_callable(bad: Any) -> None:
    async with ds_trio.loop() as lp:
        with pytest.raises(TypeError):
            ds_trio.later(bad)
        assert lp.statistics().timers_pending == 0


# ----------------------------------------------------------------------
# Idle expiry
# ----------------------------------------------------------------------


@MOCK_CLOCK
async def test_not_idle_long_true_within_exptime_false_after() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = Idler(a)
            t0 = ds_trio.now()
            assert obj.not_idle_long(t0) is False  # never tracked
            assert obj.update_idle_time() is True
            assert obj.not_idle_long(t0) is True
            assert obj.not_idle_long(t0 + 179.5) is True
            assert obj.not_idle_long(t0 + 180) is False
            assert obj.not_idle_long(t0 + 500) is False
            await anyio.sleep(100)
            obj.update_idle_time()  # activity at t0 + 100
            assert obj.not_idle_long(t0 + 250) is True
            assert obj.not_idle_long(t0 + 280) is False
            obj.close()
            assert obj.not_idle_long(t0 + 101) is False  # closed
            assert obj.update_idle_time() is False
    finally:
        b.close()


@MOCK_CLOCK
async def test_not_idle_long_uses_subclass_exptime_and_loop_override() -> None:
    pairs = [socketpair() for _ in range(2)]
    try:
        async with ds_trio.loop():
            imap = ImapLike(pairs[0][0])
            t0 = ds_trio.now()
            imap.update_idle_time()
            assert imap.not_idle_long(t0 + 1000) is True
            assert imap.not_idle_long(t0 + 1800) is False
            imap.close()
        async with ds_trio.loop(exptime=30):
            short = ImapLike(pairs[1][0])
            t0 = ds_trio.now()
            short.update_idle_time()
            assert short.not_idle_long(t0 + 29) is True
            assert short.not_idle_long(t0 + 30) is False
            short.close()
    finally:
        for _, peer in pairs:
            peer.close()


@MOCK_CLOCK
@pytest.mark.parametrize(
    ("cls", "loop_exptime", "exptime"),
    [
        pytest.param(Idler, None, 180, id="DS-180"),
        pytest.param(ImapLike, None, 1800, id="imap-1800"),
        pytest.param(Idler, 30, 30, id="loop-30"),
        pytest.param(ImapLike, 30, 30, id="loop-overrides-imap"),
    ],
)
async def test_idle_object_is_shut_down_between_exptime_and_exptime_plus_60(
    cls: type[Idler], loop_exptime: float | None, exptime: float
) -> None:
    a, b = socketpair()
    try:
        with anyio.fail_after(10 * exptime + 600):  # virtual: no endless re-arming
            async with ds_trio.loop(exptime=loop_exptime) as lp:
                obj = cls(a)
                touched = ds_trio.now()
                obj.update_idle_time()
                await anyio.sleep(exptime - 1)
                assert obj.sock is not None
                assert obj.shut_at == []
                await anyio.sleep(62)
                assert obj.sock is None
                assert len(obj.shut_at) == 1
                assert exptime < obj.shut_at[0] - touched <= exptime + 60
                assert len(lp.idle) == 0
    finally:
        b.close()


@MOCK_CLOCK
async def test_objects_with_different_exptime_expire_independently() -> None:
    pairs = [socketpair() for _ in range(2)]
    try:
        async with ds_trio.loop():
            ds_obj = Idler(pairs[0][0])
            imap = ImapLike(pairs[1][0])
            t0 = ds_trio.now()
            ds_obj.update_idle_time()
            imap.update_idle_time()
            await anyio.sleep(241)
            assert ds_obj.sock is None
            assert imap.sock is not None
            await anyio.sleep(1861 - 241)
            assert imap.sock is None
            assert 180 < ds_obj.shut_at[0] - t0 <= 240
            assert 1800 < imap.shut_at[0] - t0 <= 1860
    finally:
        for _, peer in pairs:
            peer.close()


@MOCK_CLOCK
async def test_activity_at_179s_postpones_shutdown_past_the_180s_check() -> None:
    pairs = [socketpair() for _ in range(3)]
    try:
        async with ds_trio.loop():
            anchor, control, active = (Idler(a) for a, _ in pairs)
            # The anchor starts the check batches: checks at t0 + 60 k.
            t0 = ds_trio.now()
            anchor.update_idle_time()
            await anyio.sleep(59.5)
            # Both idle from here; the check at t0 + 240 is 180.5 s later.
            touched = ds_trio.now()
            control.update_idle_time()
            active.update_idle_time()
            await anyio.sleep(179)
            refreshed = ds_trio.now()
            active.update_idle_time()
            await anyio.sleep(2)  # past the t0 + 240 check
            assert control.sock is None
            assert 180 < control.shut_at[0] - touched <= 181
            assert active.sock is not None
            assert active.shut_at == []
            assert active.not_idle_long(ds_trio.now())
            await anyio.sleep(240)
            assert active.sock is None
            assert 180 < active.shut_at[0] - refreshed <= 240
            assert anchor.shut_at[0] - t0 == pytest.approx(240)
    finally:
        for _, peer in pairs:
            peer.close()


@MOCK_CLOCK
async def test_closing_an_object_forgets_its_idle_entry() -> None:
    pairs = [socketpair() for _ in range(2)]
    try:
        async with ds_trio.loop() as lp:
            first = Idler(pairs[0][0])
            second = Idler(pairs[1][0])
            first.update_idle_time()
            second.update_idle_time()
            assert len(lp.idle) == 2
            first.close()
            assert len(lp.idle) == 1
            assert first.not_idle_long(ds_trio.now()) is False
            assert second.not_idle_long(ds_trio.now()) is True
            second.close()
            assert len(lp.idle) == 0
            closed_at = ds_trio.now()
        # The pending check runs once more, finds nothing and is not re-armed.
        assert trio.current_time() - closed_at <= 60
        assert first.shut_at == []
        assert second.shut_at == []
    finally:
        for _, peer in pairs:
            peer.close()


class ExplodingIdler(Idler):
    """A protocol whose ``shutdn`` fails."""

    def shutdn(self) -> bool | None:
        self.shut_at.append(ds_trio.now())
        raise RuntimeError("shutdn exploded")


@MOCK_CLOCK
async def test_a_failing_shutdn_under_errors_log_spares_the_other_idle_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # errors="log" means the loop goes on: the other idle clients of the
    # same check are still shut down, the failing one is closed, and idle
    # expiry keeps working for clients tracked afterwards.
    pairs = [socketpair() for _ in range(3)]
    try:
        with anyio.fail_after(3600):  # virtual time
            async with ds_trio.loop(errors="log") as lp:
                bad = ExplodingIdler(pairs[0][0])
                good = Idler(pairs[1][0])
                t0 = ds_trio.now()
                bad.update_idle_time()
                good.update_idle_time()
                await anyio.sleep(241)
                assert len(bad.shut_at) == 1
                assert "shutdn exploded" in caplog.text
                assert bad.sock is None  # the offending object is closed
                assert good.sock is None
                assert 180 < good.shut_at[0] - t0 <= 240
                later_one = Idler(pairs[2][0])
                touched = ds_trio.now()
                later_one.update_idle_time()
                await anyio.sleep(241)
                assert later_one.sock is None
                assert 180 < later_one.shut_at[0] - touched <= 240
                assert len(lp.idle) == 0
    finally:
        for _, peer in pairs:
            peer.close()


@MOCK_CLOCK
async def test_a_failing_shutdn_under_errors_raise_ends_the_loop() -> None:
    a, b = socketpair()
    try:
        with anyio.fail_after(3600), pytest.raises(RuntimeError, match="exploded"):
            async with ds_trio.loop():
                ExplodingIdler(a).update_idle_time()
                await anyio.sleep_forever()
    finally:
        b.close()


class NntpLike(Idler):
    """NNTP's ``busy``: partial input, queued output, or recent activity."""

    def busy(self) -> bool:
        return bool(self.rbuf or self.wbuf or self.not_idle_long(ds_trio.now()))


@MOCK_CLOCK
async def test_graceful_shutdown_keeps_a_recently_active_client_until_it_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Daemon.pm's worker_quit asks busy(), which for NNTP and IMAP includes
    # not_idle_long: a client active within EXPTIME holds the worker, and
    # the idle expiry (checked with the later batches) lets it go.
    pairs = [socketpair() for _ in range(2)]
    try:
        with anyio.fail_after(3600):  # virtual time
            async with ds_trio.loop(exptime=100) as lp:
                active = NntpLike(pairs[0][0])
                silent = NntpLike(pairs[1][0])  # never active: not busy
                t0 = ds_trio.now()
                active.update_idle_time()
                await anyio.sleep(30)
                ds_trio.graceful_shutdown(timeout=1000)
                await anyio.sleep(1)
                assert silent.sock is None
                assert silent.shut_at == []  # closed as idle, not expired
                assert active.sock is not None
                await anyio.sleep(100 - 31 - 1)  # t0 + 99: still within EXPTIME
                assert active.sock is not None
                assert active.not_idle_long(ds_trio.now())
                await anyio.sleep_forever()  # the loop finishes by itself
            ended = trio.current_time()
    finally:
        for _, peer in pairs:
            peer.close()
    assert active.sock is None
    assert 100 < ended - t0 <= 160
    assert len(lp.idle) == 0
    assert "timed out" not in caplog.text


@MOCK_CLOCK
async def test_one_check_among_4000_objects_shuts_exactly_the_idle_one_percent() -> (
    None
):
    pairs = [socketpair() for _ in range(2000)]
    try:
        async with ds_trio.loop() as lp:
            objs = [Idler(sock) for pair in pairs for sock in pair]
            idle = set(objs[::100])
            assert len(idle) == 40
            t0 = ds_trio.now()
            for obj in objs:
                obj.update_idle_time()
            await anyio.sleep(200)  # after the t0 + 180 check, before t0 + 240
            assert all(obj.sock is not None for obj in objs)
            for obj in objs:
                if obj not in idle:
                    obj.update_idle_time()
            await anyio.sleep(41)
            shut = {obj for obj in objs if obj.sock is not None} ^ set(objs)
            assert shut == idle
            check_times = {obj.shut_at[0] for obj in shut}
            assert len(check_times) == 1  # one check did it
            assert 180 < check_times.pop() - t0 <= 240
            assert all(len(obj.shut_at) == 1 for obj in shut)
            assert all(obj.shut_at == [] for obj in objs if obj not in idle)
            assert len(lp.idle) == len(objs) - len(idle)
            for obj in objs:
                obj.close()
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


class CountingTime(float):
    """A timestamp counting how often it is compared."""

    compared = 0

    def _count(self) -> None:
        CountingTime.compared += 1

    def __lt__(self, other: float) -> bool:
        self._count()
        return float(self) < other

    def __le__(self, other: float) -> bool:
        self._count()
        return float(self) <= other

    def __gt__(self, other: float) -> bool:
        self._count()
        return float(self) > other

    def __ge__(self, other: float) -> bool:
        self._count()
        return float(self) >= other


def test_idle_tracker_pop_expired_returns_only_expired_in_order_without_scanning() -> (
    None
):
    tracker = ds_trio._idle.IdleTracker()
    objs: list[Any] = [object() for _ in range(5000)]
    for i, obj in enumerate(objs):
        tracker.touch(obj, 180, CountingTime(i * 0.001))
    idle = objs[::100]
    idle_ids = {id(obj) for obj in idle}
    for obj in objs:
        if id(obj) not in idle_ids:
            tracker.touch(obj, 180, CountingTime(150))
    CountingTime.compared = 0
    expired = tracker.pop_expired(200.0)
    assert expired == idle
    assert len(tracker) == 5000 - 50
    # O(expired), not O(tracked): the 4950 others are not all looked at.
    assert CountingTime.compared < 5000 // 4
    assert tracker.pop_expired(200.0) == []
    assert tracker.idle_since(objs[1], 180) == 150
    assert tracker.idle_since(objs[0], 180) is None


def test_idle_tracker_touch_moves_to_back_and_forget_removes() -> None:
    tracker = ds_trio._idle.IdleTracker()
    a, b, c, d = (object() for _ in range(4))
    for t, obj in enumerate((a, b, c, d)):
        tracker.touch(obj, 10, float(t))  # type: ignore[arg-type]
    tracker.touch(a, 10, 5.0)  # type: ignore[arg-type]
    tracker.forget(c)  # type: ignore[arg-type]
    assert len(tracker) == 3
    assert tracker.idle_since(c, 10) is None  # type: ignore[arg-type]
    assert tracker.pop_expired(100.0) == [b, d, a]
    assert len(tracker) == 0


def test_idle_tracker_groups_by_exptime() -> None:
    tracker = ds_trio._idle.IdleTracker()
    short: Any = object()
    long: Any = object()
    tracker.touch(long, 1800, 0.0)
    tracker.touch(short, 180, 0.0)
    assert tracker.pop_expired(200.0) == [short]
    assert tracker.pop_expired(1799.0) == []
    assert tracker.pop_expired(1801.0) == [long]


def test_idle_tracker_adopt_shifts_times_and_keeps_order() -> None:
    mine = ds_trio._idle.IdleTracker()
    other = ds_trio._idle.IdleTracker()
    x, y, p, q = (object() for _ in range(4))
    mine.touch(x, 100, 10.0)  # type: ignore[arg-type]
    mine.touch(y, 100, 30.0)  # type: ignore[arg-type]
    other.touch(p, 100, 5.0)  # type: ignore[arg-type]
    other.touch(q, 100, 25.0)  # type: ignore[arg-type]
    mine.adopt(other, 10.0)
    assert len(other) == 0
    assert len(mine) == 4
    assert mine.idle_since(p, 100) == 15.0  # type: ignore[arg-type]
    assert mine.idle_since(q, 100) == 35.0  # type: ignore[arg-type]
    assert mine.pop_expired(120.5) == [x, p]
    assert mine.pop_expired(1000.0) == [y, q]


# ----------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------


class Collector:
    """Collects callback calls; :meth:`wait` until ``want`` of them arrived.

    Tests wait for their callbacks in the loop's body, so they do not
    depend on the loop finishing by itself once the last child is reaped
    (tested separately).
    """

    def __init__(self, want: int = 1) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.want = want
        self.done = anyio.Event()

    def add(self, *item: Any) -> None:
        self.calls.append(item)
        if len(self.calls) >= self.want:
            self.done.set()

    async def wait(self) -> None:
        with anyio.fail_after(GUARD):
            await self.done.wait()


CHILD_KINDS = ["popen", "fork", "posix_spawn"]


def start_child(kind: str, code: int) -> tuple[int, subprocess.Popen[bytes] | None]:
    if kind == "popen":
        proc = popen_child(f"exit {code}")
        return proc.pid, proc
    if kind == "fork":
        return fork_child(code), None
    return spawn_child(code), None


@pytest.mark.parametrize("kind", CHILD_KINDS)
async def test_dwaitpid_calls_back_arg_then_pid_with_the_exit_status(kind: str) -> None:
    got = Collector()
    async with assert_no_leaks():
        async with ds_trio.loop():
            pid, proc = start_child(kind, 7)
            ds_trio.dwaitpid(
                pid,
                lambda arg, p: got.add(arg, p, exit_code(), ds_trio.in_loop()),
                "arg",
            )
            await got.wait()
        if proc is not None:
            proc.returncode = 7
    assert got.calls == [("arg", pid, 7, True)]
    assert gone(pid)


@pytest.mark.parametrize("kind", CHILD_KINDS)
async def test_awaitpid_calls_back_pid_then_args_with_the_exit_status(
    kind: str,
) -> None:
    got = Collector()
    async with assert_no_leaks():
        async with ds_trio.loop():
            pid, proc = start_child(kind, 3)
            registered = ds_trio.awaitpid(
                pid, lambda p, *args: got.add(p, *args, exit_code()), "a", "b"
            )
            assert registered is None
            await got.wait()
        if proc is not None:
            proc.returncode = 3
    assert got.calls == [(pid, "a", "b", 3)]
    assert gone(pid)


async def test_awaitpid_without_callback_reaps_the_child() -> None:
    release_r, release_w = os.pipe()
    try:
        async with assert_no_leaks(), ds_trio.loop():
            pid = fork_child(1, wait_fd=release_r, close_fd=release_w)
            assert ds_trio.awaitpid(pid) is None
            os.write(release_w, b"x")
            with anyio.fail_after(GUARD):
                while not gone(pid):
                    await anyio.sleep(0.005)
    finally:
        os.close(release_r)
        os.close(release_w)


async def test_child_status_of_a_signal_killed_child() -> None:
    got = Collector()
    async with assert_no_leaks(), ds_trio.loop():
        pid = fork_child(0, kill_self=signal.SIGKILL)
        ds_trio.dwaitpid(pid, lambda _a, _p: got.add(ds_trio.child_status()))
        await got.wait()
    [(status,)] = got.calls
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


async def test_child_status_outside_a_reap_callback_raises() -> None:
    with pytest.raises(ds_trio.DSError):
        ds_trio.child_status()
    async with ds_trio.loop():
        with pytest.raises(ds_trio.DSError):
            ds_trio.child_status()


async def test_thousand_children_exiting_in_random_order_are_each_reaped_once() -> None:
    rng = random.Random(20240607)
    kinds = ["fork"] * 300 + ["popen"] * 700
    rng.shuffle(kinds)
    expected: dict[int, int] = {}
    got = Collector(len(kinds))

    def on_fork(code: int, pid: int) -> None:
        got.add(pid, code, exit_code())

    def on_popen(pid: int, proc: subprocess.Popen[bytes], code: int) -> None:
        proc.returncode = exit_code()
        got.add(pid, code, proc.returncode)

    release_r, release_w = os.pipe()
    async with assert_no_leaks():
        try:
            async with ds_trio.loop():
                for kind in kinds:
                    code = rng.randrange(256)
                    # Each child exits once it got one byte from the pipe: the
                    # kernel decides which child gets which byte.
                    if kind == "fork":
                        pid = fork_child(code, wait_fd=release_r, close_fd=release_w)
                        expected[pid] = code
                        ds_trio.dwaitpid(pid, on_fork, code)
                    else:
                        proc = popen_child(f"read x; exit {code}", stdin=release_r)
                        expected[proc.pid] = code
                        ds_trio.awaitpid(proc.pid, on_popen, proc, code)
                left = len(kinds)
                while left:
                    batch = min(left, rng.randint(1, 64))
                    os.write(release_w, b"\n" * batch)
                    left -= batch
                    await anyio.lowlevel.checkpoint()
                await got.wait()
                await anyio.wait_all_tasks_blocked()
        finally:
            os.close(release_w)
            os.close(release_r)
    assert len(got.calls) == len(kinds)
    assert sorted(got.calls) == sorted((p, c, c) for p, c in expected.items())
    assert not zombie_children()


async def test_child_that_exited_before_registration_still_calls_back() -> None:
    got = Collector()
    r, w = os.pipe()
    try:
        async with assert_no_leaks():
            pid = fork_child(9, close_fd=r)
            os.close(w)
            w = -1
            with anyio.fail_after(GUARD):
                # EOF: the child closed its end, i.e. it is exiting ...
                await anyio.wait_readable(r)
                assert os.read(r, 1) == b""
                # ... and now it is a zombie (waitid WNOWAIT does not reap).
                await anyio.to_thread.run_sync(
                    os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT
                )
            assert pid in zombie_children()
            async with ds_trio.loop():
                ds_trio.dwaitpid(pid, lambda _a, p: got.add(p, exit_code()))
                await got.wait()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert got.calls == [(pid, 9)]
    assert gone(pid)


async def test_reaping_never_takes_the_status_of_an_unregistered_child() -> None:
    # The seed's reap_pids: "We can't use waitpid(-1) safely here since it
    # can hit ``, system(), and other things."  A child that exited but
    # was never registered stays a zombie for its owner (here subprocess),
    # with its real status, while the loop reaps a registered sibling.
    got = Collector()
    release_r, release_w = os.pipe()
    foreign = popen_child("exit 7")
    try:
        with anyio.fail_after(GUARD):
            await anyio.to_thread.run_sync(
                os.waitid, os.P_PID, foreign.pid, os.WEXITED | os.WNOWAIT
            )
        async with ds_trio.loop() as lp:
            pid = fork_child(4, wait_fd=release_r, close_fd=release_w)
            ds_trio.dwaitpid(pid, lambda _a, p: got.add(p, exit_code()))
            os.write(release_w, b"x")
            await got.wait()
            await anyio.wait_all_tasks_blocked()
            assert foreign.pid not in lp.children
            assert foreign.pid in zombie_children()
    finally:
        os.close(release_r)
        os.close(release_w)
    assert got.calls == [(pid, 4)]
    assert gone(pid)
    assert foreign.wait() == 7  # not stolen: ECHILD would make this 0


async def test_reaping_needs_no_sigchld_and_a_loop_sigchld_handler_runs_queued(
    guard: SignalGuard,
) -> None:
    # The seed's SIGCHLD handler only enqueued reap_pids (enqueue_reap),
    # and reaping ran from the loop.  ds_trio reaps through pidfds: it
    # installs no SIGCHLD handler of its own, and one given to the loop
    # runs from the run queue (uvloop: after the reap), beside the reap
    # callback, which runs once, in the loop, with the child's status.
    async with ds_trio.loop():
        before = signal.getsignal(signal.SIGCHLD)
        got = Collector()
        ds_trio.dwaitpid(fork_child(3), lambda _a, p: got.add(p, exit_code()))
        assert signal.getsignal(signal.SIGCHLD) is before
        await got.wait()
        assert signal.getsignal(signal.SIGCHLD) is before
    sigchld = HandlerLog()
    reaped = HandlerLog()
    with anyio.fail_after(GUARD):
        async with ds_trio.loop(signals={signal.SIGCHLD: sigchld}):
            pid = fork_child(5)
            codes: list[int] = []

            def on_reap(_arg: object, _pid: int) -> None:
                codes.append(exit_code())
                reaped(0)

            ds_trio.dwaitpid(pid, on_reap)
            await wait_for(lambda: bool(sigchld.calls and reaped.calls))
            await anyio.wait_all_tasks_blocked()
    assert codes == [5]
    assert reaped.in_loop == [True]
    # At least once (another exiting child of the test process may add one).
    assert set(sigchld.calls) == {signal.SIGCHLD}
    assert all(sigchld.from_run_queue)
    assert gone(pid)
    assert guard.stray == []


@pytest.mark.parametrize("register", ["dwaitpid", "awaitpid"])
@pytest.mark.parametrize("which", ["parent", "init"])
async def test_pid_that_is_not_our_child_raises_and_the_loop_goes_on(
    register: str, which: str
) -> None:
    foreign = os.getppid() if which == "parent" else 1
    assert foreign != os.getpid()
    got = Collector()
    func: Callable[..., object] = getattr(ds_trio, register)
    async with ds_trio.loop() as lp:
        with pytest.raises(ChildProcessError):
            func(foreign, lambda *_: got.add("foreign"))
        assert foreign not in lp.children
        pid = fork_child(4)
        ds_trio.dwaitpid(pid, lambda _a, _p: got.add(exit_code()))
        await got.wait()
    assert got.calls == [(4,)]
    assert not gone(foreign)


@pytest.mark.parametrize("register", ["dwaitpid", "awaitpid"])
@pytest.mark.parametrize("pid", [0, -1, -12345])
async def test_non_positive_pid_raises_value_error(register: str, pid: int) -> None:
    func: Callable[..., object] = getattr(ds_trio, register)
    async with ds_trio.loop() as lp:
        with pytest.raises(ValueError, match="positive"):
            func(pid, lambda *_: None)
        assert not lp.children


@pytest.mark.parametrize("register", ["dwaitpid", "awaitpid"])
async def test_non_callable_callback_raises_type_error(register: str) -> None:
    func: Callable[..., object] = getattr(ds_trio, register)
    pid = fork_child(0)
    try:
        async with ds_trio.loop() as lp:
            with pytest.raises(TypeError):
                func(pid, "not callable")
            assert not lp.children
    finally:
        reap_now(pid)


def test_dwaitpid_outside_a_loop_raises_not_in_loop() -> None:
    pid = fork_child(0)
    try:
        with pytest.raises(ds_trio.NotInLoopError) as info:
            ds_trio.dwaitpid(pid, lambda _a, _p: None)
        assert isinstance(info.value, RuntimeError)
        assert not gone(pid)  # not reaped: the caller falls back to waitpid
    finally:
        os.waitpid(pid, 0)


def test_awaitpid_outside_a_loop_waits_and_returns_the_status() -> None:
    calls: list[tuple[Any, ...]] = []
    pid = fork_child(12)
    status = ds_trio.awaitpid(
        pid, lambda p, *args: calls.append((p, *args, exit_code())), "a", "b"
    )
    assert status is not None
    assert os.waitstatus_to_exitcode(status) == 12
    assert calls == [(pid, "a", "b", 12)]
    assert gone(pid)
    plain = fork_child(0, kill_self=signal.SIGTERM)
    status = ds_trio.awaitpid(plain)
    assert status is not None
    assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
    assert gone(plain)


async def test_callback_exception_propagates_out_of_the_loop_by_default() -> None:
    class Boom(Exception):
        pass

    def explode(_arg: object, _pid: int) -> None:
        raise Boom("reap callback exploded")

    async with assert_no_leaks():
        with anyio.fail_after(GUARD), pytest.raises(Boom):
            async with ds_trio.loop():
                pid = fork_child(0)
                ds_trio.dwaitpid(pid, explode)
                await anyio.sleep_forever()
    assert gone(pid)


async def test_callback_exception_is_logged_and_the_loop_goes_on_with_errors_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got = Collector()

    def explode(_arg: object, _pid: int) -> None:
        raise RuntimeError("reap callback exploded")

    release_r, release_w = os.pipe()
    try:
        async with ds_trio.loop(errors="log"):
            first = fork_child(0)
            ds_trio.dwaitpid(first, explode)
            second = fork_child(5, wait_fd=release_r, close_fd=release_w)
            ds_trio.awaitpid(second, lambda _p: got.add(exit_code()))
            with anyio.fail_after(GUARD):
                while not gone(first):
                    await anyio.sleep(0.005)
            await wait_for(lambda: "reap callback exploded" in caplog.text)
            os.write(release_w, b"x")
            await got.wait()
    finally:
        os.close(release_r)
        os.close(release_w)
    assert got.calls == [(5,)]
    records = [
        r
        for r in caplog.records
        if r.name == "ds_trio.loop"
        and r.exc_info is not None
        and "reap callback exploded" in str(r.exc_info[1])
    ]
    assert len(records) == 1
    assert gone(second)


async def test_loop_does_not_finish_while_a_registered_child_is_pending() -> None:
    calls: list[int] = []

    def reaped(_arg: object, _pid: int) -> None:
        calls.append(exit_code())

    release_r, release_w = os.pipe()
    try:
        with anyio.fail_after(GUARD):
            async with ds_trio.loop():
                pid = fork_child(6, wait_fd=release_r, close_fd=release_w)
                ds_trio.dwaitpid(pid, reaped)
                # Only the child is left once the body returns; it exits
                # after that.
                os.close(release_w)
                release_w = -1
    finally:
        os.close(release_r)
        if release_w >= 0:
            os.close(release_w)
    assert calls == [6]
    assert gone(pid)


async def test_loop_finishes_by_itself_once_the_last_child_is_reaped() -> None:
    got = Collector()
    finished = False

    async def run_loop() -> None:
        nonlocal finished
        async with ds_trio.loop():
            pid = fork_child(0, wait_fd=release_r, close_fd=release_w)
            ds_trio.dwaitpid(pid, lambda _a, p: got.add(p))
        finished = True

    release_r, release_w = os.pipe()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_loop)
            await anyio.wait_all_tasks_blocked()  # the loop idles, child pending
            assert not finished
            os.write(release_w, b"x")
            await got.wait()
            # Nothing is left: the loop ends without any kernel event.
            await anyio.wait_all_tasks_blocked()
            done = finished
            tg.cancel_scope.cancel()
    finally:
        os.close(release_r)
        os.close(release_w)
    assert done


async def test_cancelled_loop_ends_promptly_and_leaves_no_zombie() -> None:
    calls: list[int] = []
    release_r, release_w = os.pipe()
    try:
        pid = fork_child(0, wait_fd=release_r)
        async with assert_no_leaks(check_zombies=False):
            with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
                async with ds_trio.loop():
                    ds_trio.dwaitpid(pid, lambda _a, _p: calls.append(1))
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
                    await anyio.sleep_forever()
            assert scope.cancelled_caught
        assert not gone(pid)  # still running: only the library may reap it
        os.kill(pid, signal.SIGKILL)
        await wait_until_reaped(pid)
        assert pid not in zombie_children()
    finally:
        os.close(release_r)
        os.close(release_w)
    assert calls == []


async def test_dwaitpid_without_a_callback_reaps_the_child() -> None:
    # The seed's reap_pids calls back only "elsif ($cb)": ProcessPipe's
    # CLOSE registers its pid with no callback at all, just to reap it.
    release_r, release_w = os.pipe()
    try:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            pid = fork_child(2, wait_fd=release_r, close_fd=release_w)
            ds_trio.dwaitpid(pid, None)
            assert pid in lp.children
            os.write(release_w, b"x")
            await wait_until_reaped(pid)
            await anyio.wait_all_tasks_blocked()
            assert pid not in lp.children
    finally:
        os.close(release_r)
        os.close(release_w)


@pytest.mark.parametrize("exited", [False, True], ids=["running", "exited"])
async def test_a_child_registered_twice_calls_back_both_callbacks_once(
    exited: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The seed kept one [pid, cb, arg] entry per dwaitpid call and called
    # each callback: neither registration may be lost.
    got = Collector(3)
    release_r, release_w = os.pipe()
    try:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            pid = fork_child(5, wait_fd=release_r, close_fd=release_w)
            if exited:
                os.write(release_w, b"x")
                await anyio.to_thread.run_sync(
                    os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT
                )
            ds_trio.dwaitpid(pid, lambda a, p: got.add("first", a, p, exit_code()), 1)
            ds_trio.awaitpid(pid, lambda p, a: got.add("second", a, p, exit_code()), 2)
            ds_trio.dwaitpid(pid, lambda a, p: got.add("third", a, p, exit_code()), 3)
            assert list(lp.children) == [pid]
            if not exited:
                await anyio.wait_all_tasks_blocked()
                assert got.calls == []
                os.write(release_w, b"x")
            await got.wait()
            await anyio.wait_all_tasks_blocked()
            assert not lp.children
    finally:
        os.close(release_r)
        os.close(release_w)
    assert got.calls == [
        ("first", 1, pid, 5),
        ("second", 2, pid, 5),
        ("third", 3, pid, 5),
    ]
    assert "reaped by someone else" not in caplog.text
    assert gone(pid)


async def test_a_failing_callback_of_a_child_registered_twice_spares_the_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got = Collector()

    def explode(_arg: object, _pid: int) -> None:
        raise RuntimeError("first reap callback exploded")

    async with ds_trio.loop(errors="log"):
        pid = fork_child(3)
        ds_trio.dwaitpid(pid, explode)
        ds_trio.dwaitpid(pid, lambda _a, p: got.add(p, exit_code()))
        await got.wait()
    assert got.calls == [(pid, 3)]
    assert "first reap callback exploded" in caplog.text


@pytest.mark.parametrize("how", ["flag", "enosys"])
async def test_pidfd_less_fallback_still_delivers_callbacks(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    opened: list[int] = []

    def no_pidfd(pid: int, flags: int = 0) -> int:
        opened.append(pid)
        raise OSError(errno.ENOSYS, "pidfd_open not available")

    monkeypatch.setattr(ds_trio._reaper, "_pidfd_works", how == "enosys")
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    got = Collector(3)
    release_r, release_w = os.pipe()
    try:
        async with assert_no_leaks():
            async with ds_trio.loop():
                forked = [
                    fork_child(c, wait_fd=release_r, close_fd=release_w) for c in (1, 2)
                ]
                proc = popen_child("read x; exit 3", stdin=release_r)
                for pid in forked:
                    ds_trio.dwaitpid(pid, lambda _a, p: got.add(p, exit_code()))
                ds_trio.awaitpid(proc.pid, lambda p: got.add(p, exit_code()))
                await anyio.wait_all_tasks_blocked()
                assert got.calls == []
                os.write(release_w, b"\n\n\n")
                await got.wait()
                await anyio.wait_all_tasks_blocked()
            proc.returncode = 3
    finally:
        os.close(release_r)
        os.close(release_w)
    assert sorted(got.calls) == sorted([(forked[0], 1), (forked[1], 2), (proc.pid, 3)])
    if how == "flag":
        assert opened == []
    else:
        assert opened  # tried, then fell back
    assert not zombie_children()


# ----------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------

GUARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


class SignalGuard:
    """Python handlers installed before the test: strays never kill pytest."""

    def __init__(self) -> None:
        self.stray: list[int] = []

    def handler(self, signum: int, frame: object) -> None:
        self.stray.append(signum)


@pytest.fixture
def guard() -> Iterator[SignalGuard]:
    guard = SignalGuard()
    saved = {signum: signal.getsignal(signum) for signum in GUARDED_SIGNALS}
    for signum in GUARDED_SIGNALS:
        signal.signal(signum, guard.handler)
    try:
        yield guard
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


class HandlerLog:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.in_loop: list[bool] = []
        self.from_run_queue: list[bool] = []

    def __call__(self, signum: int) -> None:
        self.calls.append(signum)
        self.in_loop.append(ds_trio.in_loop())
        self.from_run_queue.append(called_from_run_queue())


async def test_signal_handler_runs_from_the_loops_run_queue(guard: SignalGuard) -> None:
    usr1 = HandlerLog()
    hup = HandlerLog()
    with anyio.fail_after(GUARD):
        async with ds_trio.loop(signals={signal.SIGUSR1: usr1, signal.SIGHUP: hup}):
            await anyio.lowlevel.checkpoint()
            os.kill(os.getpid(), signal.SIGUSR1)
            await wait_for(lambda: bool(usr1.calls))
    assert usr1.calls == [signal.SIGUSR1]
    assert usr1.in_loop == [True]
    assert usr1.from_run_queue == [True]
    assert hup.calls == []
    assert guard.stray == []


async def test_signals_sent_back_to_back_are_all_handled(guard: SignalGuard) -> None:
    handlers = {signum: HandlerLog() for signum in GUARDED_SIGNALS}
    with anyio.fail_after(GUARD):
        async with ds_trio.loop(signals=dict(handlers)):
            await anyio.lowlevel.checkpoint()
            for signum in GUARDED_SIGNALS:
                os.kill(os.getpid(), signum)
            await wait_for(lambda: all(h.calls for h in handlers.values()))
    for signum, log in handlers.items():
        assert log.calls == [signum]
        assert log.from_run_queue == [True]
    assert guard.stray == []


async def test_signals_pending_together_are_all_handled_in_one_round(
    guard: SignalGuard,
) -> None:
    # t/sigfd.t: "Send TERM and HUP; run another iteration -> TERM = 1,
    # HUP = 3": one wake-up drains every pending signal.  Here the signals
    # are all pending before the loop can run anything, so every handler
    # must run in the same round (the post-loop callback counts rounds).
    extra = (signal.SIGWINCH, signal.SIGURG, signal.SIGALRM, signal.SIGTERM)
    signums = GUARDED_SIGNALS + extra
    saved = {signum: signal.getsignal(signum) for signum in extra}
    rounds = 0
    seen: dict[int, int] = {}

    def count_round(_map: object) -> bool:
        nonlocal rounds
        rounds += 1
        return True

    def handler(signum: int) -> None:
        seen[signum] = rounds

    try:
        for signum in extra:
            signal.signal(signum, guard.handler)
        with anyio.fail_after(GUARD):
            async with ds_trio.loop(signals=dict.fromkeys(signums, handler)) as lp:
                ds_trio.SetPostLoopCallback(count_round)
                await anyio.lowlevel.checkpoint()
                for signum in signums:
                    os.kill(os.getpid(), signum)
                await wait_for(lambda: len(seen) == len(signums))
                lp.stop()
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
    assert sorted(seen) == sorted(signums)
    assert len(set(seen.values())) == 1, seen
    assert guard.stray == []


async def test_signal_sent_before_the_first_checkpoint_is_handled(
    guard: SignalGuard,
) -> None:
    usr1 = HandlerLog()
    with anyio.fail_after(GUARD):
        async with ds_trio.loop(signals={signal.SIGUSR1: usr1}):
            os.kill(os.getpid(), signal.SIGUSR1)
            await wait_for(lambda: bool(usr1.calls))
    assert usr1.calls == [signal.SIGUSR1]
    assert usr1.in_loop == [True]
    assert guard.stray == []


@pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(
            ("asyncio", {"use_uvloop": True}),
            id="uvloop",
            marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed"),
        ),
        pytest.param(("trio", {}), id="trio"),
    ],
)
async def test_previous_signal_handlers_are_restored_after_the_loop(
    guard: SignalGuard,
) -> None:
    before = {signum: signal.getsignal(signum) for signum in GUARDED_SIGNALS}
    async with ds_trio.loop(signals={s: HandlerLog() for s in GUARDED_SIGNALS}):
        await anyio.lowlevel.checkpoint()
    after = {signum: signal.getsignal(signum) for signum in GUARDED_SIGNALS}
    assert after == before
    # The restored handler really is in place: the signal reaches it.
    os.kill(os.getpid(), signal.SIGUSR1)
    assert guard.stray == [signal.SIGUSR1]


PING_SIZE = 16384
PING_ROUNDS = 300


def ping_payload(index: int) -> bytes:
    return random.Random(index).randbytes(PING_SIZE)


class Pinger(DS):
    """Sends a message, waits for its echo, compares it, sends the next."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.buf = bytearray()
        self.sent = 0
        self.good = 0
        self.bad = 0

    def send_next(self) -> None:
        self.write(ping_payload(self.sent))
        self.sent += 1

    def event_step(self) -> None:
        if not self.flush_write():
            return
        while self.do_read(self.buf, 65536, len(self.buf)):
            while len(self.buf) >= PING_SIZE:
                got = bytes(self.buf[:PING_SIZE])
                del self.buf[:PING_SIZE]
                if got == ping_payload(self.good + self.bad):
                    self.good += 1
                else:
                    self.bad += 1
                if self.sent < PING_ROUNDS:
                    self.send_next()


class Ponger(DS):
    """Echoes whole messages back."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.buf = bytearray()

    def event_step(self) -> None:
        if not self.flush_write():
            return
        while self.do_read(self.buf, 65536, len(self.buf)):
            while len(self.buf) >= PING_SIZE:
                self.write(bytes(self.buf[:PING_SIZE]))
                del self.buf[:PING_SIZE]


async def test_signal_storm_during_ping_pong_loses_no_bytes(guard: SignalGuard) -> None:
    usr1 = HandlerLog()
    a, b = socketpair()
    async with assert_no_leaks():
        with anyio.fail_after(GUARD):
            async with ds_trio.loop(signals={signal.SIGUSR1: usr1}):
                pinger = Pinger(a)
                ponger = Ponger(b)
                pinger.send_next()
                for i in range(200):
                    os.kill(os.getpid(), signal.SIGUSR1)
                    if i % 4 == 0:
                        await anyio.lowlevel.checkpoint()
                storm_overlapped = pinger.good + pinger.bad < PING_ROUNDS
                await wait_for(lambda: pinger.good + pinger.bad == PING_ROUNDS)
                await wait_for(lambda: bool(usr1.calls))
                pinger.close()
                ponger.close()
    assert storm_overlapped
    assert pinger.bad == 0
    assert pinger.good == PING_ROUNDS
    assert 1 <= len(usr1.calls) <= 200
    assert set(usr1.calls) == {signal.SIGUSR1}
    assert all(usr1.in_loop)
    assert guard.stray == []


class HandlerBoom(Exception):
    pass


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_handler_queued_by_one_event_loop_fails_the_next_one(
    guard: SignalGuard, backend: str
) -> None:
    """Whichever EventLoop() runs a handler gets its exception.

    A single step can end with the handler still queued (it runs from the
    run queue, a round after the signal woke the loop) and the next
    ``EventLoop()`` runs it: the error must end that call, not vanish into
    the finished loop that queued it.
    """
    calls: list[int] = []

    def handler(signum: int) -> None:
        calls.append(signum)
        raise HandlerBoom

    try:
        ds_trio.add_timer(0, os.kill, os.getpid(), signal.SIGUSR1)
        ds_trio.SetPostLoopCallback(lambda _map: False)
        try:
            ds_trio.EventLoop(backend=backend, signals={signal.SIGUSR1: handler})
        except HandlerBoom:  # the handler ran in that step already
            pass
        else:
            assert calls == []  # still queued: the next call runs it
            with pytest.raises(HandlerBoom):
                ds_trio.EventLoop(backend=backend)
        assert calls == [signal.SIGUSR1]
    finally:
        ds_trio.Reset()
    assert guard.stray == []


def test_invalid_signal_number_raises_value_error() -> None:
    with pytest.raises(ValueError, match="valid signal"):
        ds_trio.loop(signals={0: lambda _s: None})
    with pytest.raises(ValueError, match="valid signal"):
        ds_trio.loop(signals={100000: lambda _s: None})


def test_non_callable_signal_handler_raises_type_error() -> None:
    bad: Any = "not callable"
    with pytest.raises(TypeError):
        ds_trio.loop(signals={signal.SIGUSR1: bad})


@UVLOOP
async def test_sigchld_handler_on_uvloop_is_called_after_each_reaped_child() -> None:
    order: list[tuple[str, int]] = []
    with anyio.fail_after(GUARD):
        async with ds_trio.loop(
            signals={signal.SIGCHLD: lambda s: order.append(("sigchld", s))}
        ) as lp:
            assert lp.backend == "uvloop"
            pid = fork_child(2)
            ds_trio.dwaitpid(pid, lambda _a, _p: order.append(("reaped", exit_code())))
            await wait_for(lambda: len(order) >= 2)
    assert order == [("reaped", 2), ("sigchld", signal.SIGCHLD)]
    assert gone(pid)


# ----------------------------------------------------------------------
# add_uniq_timer
# ----------------------------------------------------------------------


@MOCK_CLOCK
async def test_add_uniq_timer_arms_once_per_name_until_fired_or_cancelled() -> None:
    fired: list[tuple[str, float]] = []

    def record(name: str) -> None:
        fired.append((name, ds_trio.now()))

    async with ds_trio.loop():
        start = ds_trio.now()
        first = ds_trio.add_uniq_timer("tick", 60, record, "a")
        assert first is not None
        assert first.active
        assert ds_trio.add_uniq_timer("tick", 10, record, "dup") is None
        assert ds_trio.add_uniq_timer("other", 5, record, "o") is not None
        await anyio.sleep(61)
        again = ds_trio.add_uniq_timer("tick", 30, record, "b")  # after firing
        assert again is not None
        assert again.cancel()
        third = ds_trio.add_uniq_timer("tick", 30, record, "c")  # after cancel
        assert third is not None
    assert [name for name, _ in fired] == ["o", "a", "c"]
    assert fired[0][1] == pytest.approx(start + 5)
    assert fired[1][1] == pytest.approx(start + 60)
    assert fired[2][1] == pytest.approx(start + 91)


@MOCK_CLOCK
async def test_add_uniq_timer_can_rearm_itself_from_its_callback() -> None:
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(ds_trio.now())
        if len(ticks) < 3:
            assert ds_trio.add_uniq_timer("idle", 60, tick) is not None

    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.add_uniq_timer("idle", 60, tick)
    assert ticks == [
        pytest.approx(start + 60),
        pytest.approx(start + 120),
        pytest.approx(start + 180),
    ]
