"""Callback mode: synchronous steps run from readiness callbacks.

asyncio's and uvloop's ``add_reader``/``add_writer``, and on trio the loop's
own epoll set (``_reactor.EpollReactor``).  The behaviour must be the same
as the task mode's (``callbacks=False``, async steps, TLS): these tests run
on every backend and check the transitions between the two modes, the lazy
one-shot disarm and what a steady request costs.
"""

from __future__ import annotations

import asyncio
import select
import socket
import types
from typing import Any

import anyio
import pytest

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio._reactor import EpollReactor
from ds_trio.testing import assert_no_leaks

from .helpers import Echo, pair, roundtrip, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> object:
    if request.param[1].get("use_uvloop"):
        pytest.importorskip("uvloop")
    monkeypatch.delenv("DS_TRIO_CALLBACKS", raising=False)  # the default: on
    return request.param


@pytest.fixture
def epoll_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record the (kind, fd) of every epoll_ctl of the loops' epoll sets."""
    calls: list[tuple[str, int]] = []
    real_epoll = select.epoll

    class CountingEpoll:  # select.epoll cannot be subclassed
        def __init__(self) -> None:
            self._epoll = real_epoll()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._epoll, name)

        def register(self, fd: int, eventmask: int) -> None:
            calls.append(("add", fd))
            self._epoll.register(fd, eventmask)

        def modify(self, fd: int, eventmask: int) -> None:
            calls.append(("mod", fd))
            self._epoll.modify(fd, eventmask)

        def unregister(self, fd: int) -> None:
            calls.append(("del", fd))
            self._epoll.unregister(fd)

    # Only the loop's epoll set: trio's own poller (created before the test
    # body runs) must not be counted.
    monkeypatch.setattr(
        "ds_trio._reactor.select", types.SimpleNamespace(epoll=CountingEpoll)
    )
    return calls


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_steady_requests_cost_no_registration_change(
    anyio_backend: Any,
) -> None:
    # About the asyncio selector loop: counts its add_reader calls (uvloop's
    # methods cannot be wrapped; trio's epoll set has its own test below).
    aio_loop = asyncio.get_running_loop()
    calls: list[str] = []
    add_reader, remove_reader = aio_loop.add_reader, aio_loop.remove_reader

    a, b = pair()
    watched = a.fileno()

    def counting_add(fd: Any, cb: Any, *args: Any) -> None:
        if fd == watched:
            calls.append("add")
        add_reader(fd, cb, *args)

    def counting_remove(fd: Any) -> bool:
        if fd == watched:
            calls.append("remove")
        return remove_reader(fd)

    with b:
        async with ds_trio.loop():
            aio_loop.add_reader = counting_add  # type: ignore[method-assign,assignment]
            aio_loop.remove_reader = counting_remove  # type: ignore[method-assign]
            try:
                obj = Echo(a)
                for i in range(50):
                    line = b"line %d\n" % i
                    assert await roundtrip(b, line) == line
                # One registration for 50 one-shot steps, each re-armed by
                # do_read's EAGAIN: kept, never removed and added again.
                assert calls == ["add"]
                obj.close()
                assert calls == ["add", "remove"]
            finally:
                del aio_loop.add_reader, aio_loop.remove_reader


class NotRearming(DS):
    """Reads nothing and re-arms nothing: one step, then silence."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.steps = 0

    def event_step(self) -> None:
        self.steps += 1


async def test_oneshot_disarms_when_the_step_does_not_rearm(anyio_backend: Any) -> None:
    a, b = pair()
    with b:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            obj = NotRearming(a)
            b.sendall(b"x")  # stays unread: the fd stays readable
            await wait_for(lambda: obj.steps == 1)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert obj.steps == 1
            obj.epwait(EPOLLIN | EPOLLONESHOT)  # re-armed from outside
            await wait_for(lambda: obj.steps == 2)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert obj.steps == 2
            obj.close()
            lp.stop()


class Switcher(DS):
    """Echo that answers through EPOLLIN|EPOLLOUT, then EPOLLOUT, then EPOLLIN.

    Every interest change moves a callback-mode object to the task's waits
    (both directions) and back.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.pending = bytearray()
        self.log: list[str] = []

    def event_step(self) -> None:
        if self.pending:
            self.log.append("out")
            sent = self.sock.send(self.pending)
            del self.pending[:sent]
            if self.pending:
                self.epwait(EPOLLOUT | EPOLLONESHOT)
                return
        buf = bytearray()
        if self.do_read(buf, 65536):
            self.log.append("in")
            self.pending += buf
            # Ask for both directions: writable at once.
            self.epwait(EPOLLIN | EPOLLOUT | EPOLLONESHOT)


async def test_interest_changes_move_between_modes(anyio_backend: Any) -> None:
    a, b = pair()
    with b:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            obj = Switcher(a)
            for i in range(30):
                line = b"switch %d\n" % i
                assert await roundtrip(b, line) == line
            assert obj.log.count("in") == 30
            assert obj.log.count("out") >= 30
            obj.close()
            lp.stop()


class Poker(DS):
    """On each line, arms another object for writing (epwait from a step)."""

    def __init__(self, sock: socket.socket, other: DS) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.other = other

    def event_step(self) -> None:
        buf = bytearray()
        while self.do_read(buf, 65536):
            self.other.epwait(EPOLLOUT | EPOLLONESHOT)


class Greeter(DS):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, 0)  # parked until someone arms it
        self.greeted = 0

    def event_step(self) -> None:
        self.greeted += 1
        self.sock.send(b"hi\n")


async def test_epwait_from_another_objects_step(anyio_backend: Any) -> None:
    a, b = pair()
    c, d = pair()
    with b, d:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            greeter = Greeter(c)
            Poker(a, greeter)
            for i in range(5):
                b.sendall(b"poke\n")
                expected = i + 1
                await wait_for(lambda: greeter.greeted == expected)  # noqa: B023
                await anyio.wait_readable(d)
                assert d.recv(100) == b"hi\n"
            lp.stop()


class Failing(DS):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)

    def event_step(self) -> None:
        raise RuntimeError("step failed")


async def test_step_error_in_a_callback_follows_the_policy(anyio_backend: Any) -> None:
    a, b = pair()
    c, d = pair()
    with b, d:
        async with assert_no_leaks():
            with pytest.raises(RuntimeError, match="step failed"):
                async with ds_trio.loop():
                    Echo(c)
                    assert await roundtrip(d, b"before\n") == b"before\n"
                    Failing(a)
                    b.sendall(b"boom\n")
                    await anyio.sleep_forever()
            assert a.fileno() == -1
            assert c.fileno() == -1


class LateBytes(DS):
    """Reads short, then the peer sends more before the step reads again."""

    def __init__(self, sock: socket.socket, peer: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.peer = peer
        self.got = bytearray()
        self.second_reads: list[int] = []

    def event_step(self) -> None:
        buf = bytearray()
        if not self.do_read(buf, 65536):
            return
        self.got += buf
        if b"first" in buf and not self.second_reads:
            self.peer.sendall(b"late")  # arrives after the short read
        n = self.do_read(buf, 65536, len(buf))
        self.second_reads.append(n)
        self.got += buf[len(buf) - n :] if n else b""


async def test_a_short_read_skips_the_next_recv_but_loses_nothing(
    anyio_backend: Any,
) -> None:
    # A short read on a stream socket means its queue was empty: the next
    # do_read of the same step arms EPOLLIN instead of a recv() bound to
    # fail with EAGAIN.  Bytes that arrived in between wake the object at
    # once (level-triggered), so nothing waits and nothing is lost.
    a, b = pair()
    with b:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            obj = LateBytes(a, b)
            b.sendall(b"first")
            await wait_for(lambda: bytes(obj.got) == b"firstlate")
            assert obj.second_reads[0] == 0  # skipped
            obj.close()
            lp.stop()


@pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["trio"])
async def test_trio_epoll_set_keeps_a_steady_registration(
    anyio_backend: Any, epoll_calls: list[tuple[str, int]]
) -> None:
    # The trio loop's epoll set: one EPOLL_CTL_ADD for 50 one-shot steps
    # (each re-armed by do_read's EAGAIN), one DEL on close, and the set's
    # own fd closed with the loop.
    calls = epoll_calls

    a, b = pair()
    watched = a.fileno()
    reactor: EpollReactor | None = None
    with b:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            reactor = lp._reactor
            assert reactor is not None
            obj = Echo(a)
            for i in range(50):
                line = b"line %d\n" % i
                assert await roundtrip(b, line) == line
            assert [c for c in calls if c[1] == watched] == [("add", watched)]
            obj.close()
            assert [c for c in calls if c[1] == watched] == [
                ("add", watched),
                ("del", watched),
            ]
            lp.stop()
        assert reactor is not None
        assert reactor.fileno() == -1  # closed with the loop


@pytest.mark.parametrize(
    "anyio_backend",
    [("trio", {}), ("asyncio", {})],
    ids=["trio", "asyncio"],
)
async def test_callbacks_false_waits_in_tasks_with_the_same_behaviour(
    anyio_backend: Any,
) -> None:
    a, b = pair()
    c, d = pair()
    with b, d:
        async with assert_no_leaks(), ds_trio.loop(callbacks=False) as lp:
            assert lp._reactor is None
            echo = Echo(c)
            for i in range(10):
                line = b"task %d\n" % i
                assert await roundtrip(d, line) == line
            late = LateBytes(a, b)
            b.sendall(b"first")
            await wait_for(lambda: bytes(late.got) == b"firstlate")
            # The short-read skip is callback mode's: a task reads again.
            assert late.second_reads[0] == 4
            echo.close()
            late.close()
            lp.stop()


async def test_the_environment_chooses_when_the_caller_does_not(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair()
    with b:
        monkeypatch.setenv("DS_TRIO_CALLBACKS", "0")
        async with ds_trio.loop() as lp:
            obj = LateBytes(a, b)
            b.sendall(b"first")
            await wait_for(lambda: bytes(obj.got) == b"firstlate")
            assert obj.second_reads[0] == 4  # task mode
            obj.close()
            lp.stop()
        # an explicit argument wins over the environment
        async with ds_trio.loop(callbacks=True) as lp:
            if anyio_backend[0] == "trio":
                assert lp._reactor is not None
            lp.stop()


def test_bad_callback_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="callbacks must be True, False or None"):
        ds_trio.loop(callbacks="yes")  # type: ignore[arg-type]
    monkeypatch.setenv("DS_TRIO_CALLBACKS", "on")
    with pytest.raises(ValueError, match="DS_TRIO_CALLBACKS must be 0 or 1"):
        ds_trio.loop()


class Counting(DS):
    """Reads everything, counts steps, and records the batch it stepped in."""

    def __init__(self, sock: socket.socket, log: list[int]) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.log = log
        self.got = bytearray()

    def event_step(self) -> None:
        buf = bytearray()
        while self.do_read(buf, 65536):
            self.got += buf
            del buf[:]
        self.log.append(self._fd)


@pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["trio"])
async def test_trio_epoll_set_serves_more_ready_fds_than_one_batch(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The seed takes at most 1000 events per epoll_wait; the rest wait for
    # the next pass.  With batches of 2, seven ready objects all step, each
    # exactly once per readiness, and nothing is lost.
    monkeypatch.setattr(ds_trio._reactor, "MAX_EVENTS", 2)
    pairs = [pair() for _ in range(7)]
    log: list[int] = []
    try:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            objs = [Counting(a, log) for a, _ in pairs]
            for _, b in pairs:
                b.sendall(b"ready")
            await wait_for(lambda: all(bytes(o.got) == b"ready" for o in objs))
            assert sorted(log) == sorted(o._fd for o in objs)
            for _, b in pairs:
                b.sendall(b"!")
            await wait_for(lambda: all(bytes(o.got) == b"ready!" for o in objs))
            assert len(log) == 14
            for o in objs:
                o.close()
            lp.stop()
    finally:
        for _, b in pairs:
            b.close()


class ReadThenWrite(DS):
    """Reads a line with EPOLLIN, answers it under EPOLLOUT, and back."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.pending = b""

    def event_step(self) -> None:
        if self.pending:
            self.sock.send(self.pending)
            self.pending = b""
            self.epwait(EPOLLIN | EPOLLONESHOT)
            return
        buf = bytearray()
        if self.do_read(buf, 65536):
            self.pending = bytes(buf)
            self.epwait(EPOLLOUT | EPOLLONESHOT)


@pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["trio"])
async def test_trio_epoll_set_switches_direction_in_one_modify(
    anyio_backend: Any, epoll_calls: list[tuple[str, int]]
) -> None:
    calls = epoll_calls
    a, b = pair()
    watched = a.fileno()
    with b:
        async with assert_no_leaks(), ds_trio.loop() as lp:
            obj = ReadThenWrite(a)
            for i in range(10):
                line = b"turn %d\n" % i
                assert await roundtrip(b, line) == line
            obj.close()
            lp.stop()
    mine = [kind for kind, fd in calls if fd == watched]
    # IN -> OUT -> IN per line: two EPOLL_CTL_MODs, never a DEL and an ADD.
    assert mine == ["add"] + ["mod"] * 20 + ["del"]


class ClosesBehindItsBack(DS):
    """Closes its raw socket (a bug), then asks for writing."""

    def event_step(self) -> None:
        buf = bytearray()
        self.do_read(buf, 100)
        self.sock.close()
        self.epwait(EPOLLOUT | EPOLLONESHOT)


async def test_a_refused_registration_follows_the_policy(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The kernel refuses the new interest (EBADF) after the step: the
    # object is closed and logged under errors="log", and the loop and its
    # other objects go on - on trio the epoll set's task must not die.
    a, b = pair()
    c, d = pair()
    with b, d:
        async with assert_no_leaks(), ds_trio.loop(errors="log") as lp:
            buggy = ClosesBehindItsBack(a)
            Echo(c)
            b.sendall(b"x")
            await wait_for(lambda: buggy.sock is None)
            assert await roundtrip(d, b"still served\n") == b"still served\n"
            lp.stop()
    assert any(
        "ClosesBehindItsBack" in r.getMessage() and r.name == "ds_trio.loop"
        for r in caplog.records
    )
