"""Cancelling or failing a loop closes everything and leaks nothing.

Each test runs inside ``ds_trio.testing.assert_no_leaks()``; sockets the test
itself owns (the peers of the loop's sockets) are closed by an ExitStack
inside that block, so the leak check measures the library.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.testing

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio.testing import assert_no_leaks, fill_socket, open_fds, socketpair

from .helpers import Recorder

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


class Parked(DS):
    """Steps once per wake-up, never reads: with ONESHOT it parks disarmed."""

    def __init__(self, sock: socket.socket, events: int = EPOLLIN | EPOLLONESHOT):
        super().__init__(sock, events)
        self.steps = 0

    def event_step(self) -> None:
        self.steps += 1


class Writer(DS):
    """Wants to write; its socket's send buffer is full and the peer never reads."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLOUT | EPOLLONESHOT)
        self.steps = 0

    def event_step(self) -> None:
        self.steps += 1
        try:
            self.sock.send(b"more")
        except BlockingIOError:
            self.epwait(EPOLLOUT | EPOLLONESHOT)


class StuckAsync(DS):
    """An async event_step that never finishes: cancellation must end it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.started = 0

    async def event_step(self) -> None:
        self.started += 1
        await anyio.sleep_forever()


class StepError(Exception):
    pass


class Exploder(DS):
    """Raises from event_step on its first wake-up."""

    def event_step(self) -> None:
        raise StepError("event_step failed")


class AsyncExploder(DS):
    """Raises from an async event_step on its first wake-up, after a checkpoint."""

    async def event_step(self) -> None:
        await anyio.lowlevel.checkpoint()
        raise StepError("event_step failed")


class World:
    """Twenty registered objects of several kinds, plus timers and queued work.

    ``owned`` are the sockets handed to the loop; ``peers`` the test's ends.
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.objects: list[DS] = []
        self.owned: list[socket.socket] = []
        self.peers: list[socket.socket] = []
        self.timers: list[ds_trio.Timer] = []
        self.log: list[Any] = []
        self.queued_ran: list[str] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socketpair()
        self.stack.callback(b.close)
        # Also close ours if the library never took it (a failed test).
        self.stack.callback(a.close)
        self.owned.append(a)
        self.peers.append(b)
        return a, b

    def populate(self, count: int = 20) -> None:
        """Register ``count`` objects; call inside or outside a loop."""
        for i in range(count):
            a, b = self.pair()
            kind = i % 5
            obj: DS
            if kind == 0:
                # Parked with data unread: steps once, stays disarmed.
                b.send(b"unread data")
                obj = Parked(a)
            elif kind == 1:
                # Its peer does not read and its send buffer is full.
                fill_socket(a)
                obj = Writer(a)
            elif kind == 2:
                # Idle reader: parked in wait_readable, nothing to read.
                obj = Recorder(a, self.log, f"idle{i}")
            elif kind == 3:
                # A reader that gets data and reads it all, re-arming.
                b.send(b"hello")
                obj = Recorder(a, self.log, f"busy{i}")
            else:
                # Stuck inside an async event_step.
                b.send(b"wake")
                obj = StuckAsync(a)
            self.objects.append(obj)
        for delay in (60, 3600, 0.5):
            self.timers.append(ds_trio.add_timer(delay, self.log.append, delay))

    def settled(self) -> bool:
        """Every object reached the state populate() set it up for."""
        for obj in self.objects:
            if isinstance(obj, Parked) and obj.steps != 1:
                return False
            if isinstance(obj, StuckAsync) and obj.started != 1:
                return False
            if (
                isinstance(obj, Recorder)
                and obj.name.startswith("busy")
                and obj.data != b"hello"
            ):
                return False
        return True

    async def wait_settled(self) -> None:
        """Checkpoint until every object stepped as expected (no real sleep)."""
        await anyio.wait_all_tasks_blocked()
        for _ in range(10_000):
            if self.settled():
                break
            await anyio.lowlevel.checkpoint()
        assert self.settled()
        for obj in self.objects:
            if isinstance(obj, Writer):
                # Never writable: the peer does not read.
                assert obj.steps == 0
            if isinstance(obj, Recorder) and obj.name.startswith("idle"):
                assert obj.name not in self.log
            assert obj.sock is not None

    def queue_work(self) -> None:
        """Requeue a callable and a DS object (work pending at the cancel)."""
        ds_trio.requeue(lambda: self.queued_ran.append("callable"))
        ds_trio.requeue(self.objects[-1])

    def assert_all_closed(self) -> None:
        assert self.objects
        for obj in self.objects:
            assert obj.sock is None, obj
        for sock in self.owned:
            assert sock.fileno() == -1, sock
        for timer in self.timers:
            assert timer.active is False
        assert ds_trio.in_loop() is False


@contextlib.contextmanager
def world() -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        yield World(stack)


def assert_loop_emptied(lp: ds_trio.Loop) -> None:
    stats = lp.statistics()
    assert stats.registered == 0
    assert stats.timers_pending == 0
    assert stats.queued == 0
    assert stats.pending_closes == 0


CancelFrom = Literal["body", "timer", "requeued"]


@pytest.mark.parametrize("cancel_from", ["body", "timer", "requeued"])
async def test_cancelling_the_scope_around_the_loop_closes_everything(
    cancel_from: CancelFrom,
) -> None:
    after_scope: list[bool] = []
    async with assert_no_leaks():
        with world() as w:
            with anyio.CancelScope() as cs:
                async with ds_trio.loop() as lp:
                    w.populate()
                    await w.wait_settled()
                    w.queue_work()
                    # A close whose fd release is still pending at the cancel.
                    w.objects[2].close()

                    def cancel() -> None:
                        w.queue_work()
                        cs.cancel()

                    if cancel_from == "body":
                        cs.cancel()
                    elif cancel_from == "timer":
                        ds_trio.add_timer(0, cancel)
                    else:
                        ds_trio.requeue(cancel)
                    await anyio.sleep_forever()
            after_scope.append(cs.cancelled_caught)
            w.assert_all_closed()
            assert_loop_emptied(lp)
    assert after_scope == [True]


@MOCK_CLOCK
async def test_move_on_after_around_the_loop_closes_everything() -> None:
    reached = False
    async with assert_no_leaks():
        with world() as w:
            start = trio.current_time()
            with anyio.move_on_after(30) as cs:
                async with ds_trio.loop() as lp:
                    w.populate()
                    w.queue_work()
            reached = True
            assert cs.cancelled_caught
            # The 0.5 s timer fired; the 60 s and 3600 s ones did not.
            assert w.log.count(0.5) == 1
            assert 60 not in w.log
            assert 3600 not in w.log
            assert trio.current_time() - start == pytest.approx(30)
            w.assert_all_closed()
            assert_loop_emptied(lp)
    assert reached


async def test_loop_objects_created_before_the_loop_are_closed_on_cancel() -> None:
    async with assert_no_leaks():
        with world() as w:
            w.populate()  # pending state: adopted by the loop below
            with anyio.CancelScope() as cs:
                async with ds_trio.loop() as lp:
                    assert lp.statistics().registered == 20
                    await w.wait_settled()
                    cs.cancel()
                    await anyio.sleep_forever()
            assert cs.cancelled_caught
            w.assert_all_closed()
            assert ds_trio.DescriptorMap() == {}


async def test_exception_in_body_closes_everything_and_propagates_unwrapped() -> None:
    loops: list[ds_trio.Loop] = []

    async def run(w: World) -> None:
        async with ds_trio.loop() as lp:
            loops.append(lp)
            w.populate()
            await w.wait_settled()
            w.queue_work()
            raise ValueError("body failed")

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(ValueError, match="body failed") as info:
                await run(w)
            assert type(info.value) is ValueError
            w.assert_all_closed()
            assert_loop_emptied(loops[0])


async def test_exception_in_body_before_any_checkpoint_propagates_unwrapped() -> None:
    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            raise ValueError("early")

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(ValueError, match="early") as info:
                await run(w)
            assert type(info.value) is ValueError
            w.assert_all_closed()


async def test_exception_group_raised_in_body_propagates_as_raised() -> None:
    mine = ExceptionGroup("mine", [ValueError("inner")])

    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            await w.wait_settled()
            raise mine

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(BaseException) as info:  # noqa: PT011
                await run(w)
            w.assert_all_closed()
            assert info.value is mine


async def test_multi_error_group_raised_in_body_is_not_wrapped() -> None:
    mine = ExceptionGroup("mine", [ValueError("a"), TypeError("b")])

    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            await w.wait_settled()
            raise mine

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(BaseException) as info:  # noqa: PT011
                await run(w)
            w.assert_all_closed()
            assert info.value is mine


async def test_error_from_an_inner_task_group_in_the_body_keeps_its_type() -> None:
    """except* still sees the error raised inside the body's own task group."""

    async def fail() -> None:
        raise KeyError("child")

    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            await w.wait_settled()
            async with anyio.create_task_group() as tg:
                tg.start_soon(fail)

    caught: list[BaseException] = []
    async with assert_no_leaks():
        with world() as w:
            try:
                await run(w)
            except* KeyError as group:
                caught.extend(group.exceptions)
            w.assert_all_closed()
    assert len(caught) == 1
    assert isinstance(caught[0], KeyError)


@pytest.mark.parametrize("exploder", [Exploder, AsyncExploder])
async def test_exception_from_event_step_closes_everything_and_propagates(
    exploder: type[DS],
) -> None:
    loops: list[ds_trio.Loop] = []
    body_cancelled: list[bool] = []

    async def run(w: World) -> None:
        async with ds_trio.loop() as lp:
            loops.append(lp)
            w.populate()
            await w.wait_settled()
            a, b = w.pair()
            w.objects.append(exploder(a))
            b.send(b"go")
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                body_cancelled.append(True)
                raise

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(StepError, match="event_step failed") as info:
                await run(w)
            assert type(info.value) is StepError
            assert body_cancelled == [True]
            w.assert_all_closed()
            assert_loop_emptied(loops[0])


async def test_exception_from_a_timer_closes_everything_and_propagates() -> None:
    def boom() -> None:
        raise StepError("timer failed")

    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            await w.wait_settled()
            ds_trio.add_timer(0, boom)

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(StepError, match="timer failed") as info:
                await run(w)
            assert type(info.value) is StepError
            w.assert_all_closed()


async def test_exception_from_a_requeued_callable_closes_everything() -> None:
    def boom() -> None:
        raise StepError("requeued failed")

    async def run(w: World) -> None:
        async with ds_trio.loop():
            w.populate()
            await w.wait_settled()
            ds_trio.requeue(boom)
            await anyio.sleep_forever()

    async with assert_no_leaks():
        with world() as w:
            with pytest.raises(StepError, match="requeued failed") as info:
                await run(w)
            assert type(info.value) is StepError
            w.assert_all_closed()


async def test_repeated_loop_round_and_exit_leaks_nothing() -> None:
    async with assert_no_leaks():
        for i in range(200):
            a, b = socketpair()
            try:
                log: list[Any] = []
                async with ds_trio.loop() as lp:
                    obj = Recorder(a, log, "r")
                    b.send(b"x")
                    ds_trio.add_timer(0, lp.stop)
                    if i % 2:
                        ds_trio.requeue(lambda: None)
                assert lp.statistics().rounds >= 1
                assert obj.sock is None
                assert a.fileno() == -1
            finally:
                a.close()
                b.close()


async def test_repeated_loop_with_post_loop_callback_false_leaks_nothing() -> None:
    async with assert_no_leaks():
        for _ in range(200):
            a, b = socketpair()
            try:
                async with ds_trio.loop() as lp:
                    ds_trio.SetLoopTimeout(0)
                    ds_trio.SetPostLoopCallback(lambda m: False)
                    Parked(a)
                assert lp.statistics().rounds == 1
                assert a.fileno() == -1
            finally:
                a.close()
                b.close()


def is_active(timer: ds_trio.Timer) -> bool:
    """Read ``timer.active`` without mypy keeping an earlier narrowing."""
    return timer.active


def _run_event_loop_twice_then_reset(backend: str) -> None:
    """The seed's single-step idiom: EventLoop with a false post-loop callback.

    Runs entirely in the calling thread (the pending state is per thread).
    """
    rounds: list[int] = []
    log: list[Any] = []
    fired: list[str] = []

    def once(descriptor_map: dict[int, DS]) -> bool:
        rounds.append(len(descriptor_map))
        return False

    with contextlib.ExitStack() as stack:
        stack.callback(ds_trio.Reset)
        owned: list[socket.socket] = []
        peers: list[socket.socket] = []
        objects: list[Recorder] = []
        for i in range(3):
            a, b = socketpair()
            stack.callback(b.close)
            stack.callback(a.close)
            owned.append(a)
            peers.append(b)
            objects.append(Recorder(a, log, f"r{i}"))
        ds_trio.SetPostLoopCallback(once)
        ds_trio.add_timer(0, fired.append, "zero")
        hour = ds_trio.add_timer(3600, fired.append, "hour")
        peers[0].send(b"first")

        added = time.monotonic()
        ds_trio.EventLoop(backend=backend)
        assert rounds == [3]
        assert fired == ["zero"]
        assert log == ["r0"]
        assert objects[0].data == b"first"
        assert ds_trio.in_loop() is False
        assert all(obj.sock is not None for obj in objects)
        assert all(sock.fileno() >= 0 for sock in owned)
        assert set(ds_trio.DescriptorMap().values()) == set(objects)
        # The hour timer is still pending, back on the monotonic clock.
        assert hour.active is True
        assert 3500 < hour.deadline - added <= 3600

        # The objects stay registered for the next EventLoop call.
        peers[1].send(b"second")
        ds_trio.EventLoop(backend=backend)
        assert rounds == [3, 3]
        assert log == ["r0", "r1"]
        assert objects[1].data == b"second"
        assert set(ds_trio.DescriptorMap().values()) == set(objects)
        assert hour.active is True

        ds_trio.Reset()
        assert all(obj.sock is None for obj in objects)
        assert all(sock.fileno() == -1 for sock in owned)
        assert ds_trio.DescriptorMap() == {}
        assert not is_active(hour)
        assert fired == ["zero"]


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_event_loop_single_steps_and_keeps_objects_until_reset(backend: str) -> None:
    before = open_fds()
    _run_event_loop_twice_then_reset(backend)
    after = open_fds()
    assert {fd: t for fd, t in after.items() if before.get(fd) != t} == {}


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
async def test_event_loop_in_a_worker_thread_keeps_objects_until_reset(
    backend: str,
) -> None:
    run: Callable[[str], None] = _run_event_loop_twice_then_reset
    async with assert_no_leaks():
        await anyio.to_thread.run_sync(run, backend)


@pytest.mark.parametrize(
    ("backend", "options"),
    [("trio", {}), ("asyncio", {}), ("asyncio", {"use_uvloop": True})],
    ids=["trio", "asyncio", "uvloop"],
)
def test_repeated_event_loop_and_reset_leaks_nothing(
    backend: str, options: dict[str, Any]
) -> None:
    """``t/ds-leak.t``: create, run one iteration, ``Reset``, many times.

    The seed ran it RLIMIT_NOFILE + 1 times to prove ``Reset`` closes the
    poller each time.  Here every iteration also registers an object, arms
    timers, queues work and a ``later`` batch; after each ``Reset`` nothing
    of it is left, and after all of them no fd and no thread is left over.
    """
    fired: list[int] = []

    def iteration(i: int) -> None:
        a, b = socketpair()
        try:
            obj = Recorder(a, [], f"r{i}")
            b.send(b"x")
            ds_trio.add_timer(0, fired.append, i)
            ds_trio.add_timer(3600, fired.append, -i)
            ds_trio.requeue(lambda: None)
            ds_trio.later(lambda: None)
            ds_trio.SetLoopTimeout(0)
            ds_trio.SetPostLoopCallback(lambda _map: False)
            ds_trio.EventLoop(backend=backend, backend_options=options)
            ds_trio.Reset()
            assert obj.data == b"x"
            assert obj.sock is None
            assert a.fileno() == -1
            assert ds_trio.DescriptorMap() == {}
        finally:
            a.close()
            b.close()

    # uvloop opens a pipe and libuv its spare /dev/null once per process.
    iteration(0)
    baseline_fds = open_fds()
    baseline_threads = threading.active_count()
    for i in range(1, 101):
        iteration(i)
    assert fired == list(range(101))
    after = open_fds()
    assert {fd: t for fd, t in after.items() if baseline_fds.get(fd) != t} == {}
    assert threading.active_count() == baseline_threads


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_event_loop_failing_timer_closes_everything_and_raises_unwrapped(
    backend: str,
) -> None:
    def boom() -> None:
        raise StepError("timer failed")

    before = open_fds()
    with contextlib.ExitStack() as stack:
        stack.callback(ds_trio.Reset)
        a, b = socketpair()
        stack.callback(b.close)
        stack.callback(a.close)
        obj = Recorder(a, [], "r")
        hour = ds_trio.add_timer(3600, boom)
        ds_trio.add_timer(0, boom)
        with pytest.raises(StepError, match="timer failed") as info:
            ds_trio.EventLoop(backend=backend)
        assert type(info.value) is StepError
        # A failed EventLoop keeps nothing for the next call.
        assert obj.sock is None
        assert a.fileno() == -1
        assert not is_active(hour)
        assert ds_trio.DescriptorMap() == {}
    after = open_fds()
    assert {fd: t for fd, t in after.items() if before.get(fd) != t} == {}
