"""Object lifecycle against the seed: close, the registry, requeue, do_read.

Invariants of the seed's ``close`` (``DS.pm``), ``new``, ``requeue`` and
``do_read`` that the rest of the suite does not pin down; every test runs on
every backend and in both callback and task mode (``conftest.BACKENDS``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import anyio
import pytest

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT
from ds_trio.testing import socketpair

from .helpers import Recorder, fd_is_open, wait_for

pytestmark = pytest.mark.anyio


def _eof_or_pending(sock: socket.socket) -> bytes | None:
    """What a non-blocking recv returns now; None when nothing is there."""
    try:
        return sock.recv(100, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


async def test_close_never_shuts_the_socket_down() -> None:
    """The seed's close drops its handle, no ``shutdown(2)``: a dup lives on."""
    a, b = socketpair()
    dup = a.dup()
    try:
        async with ds_trio.loop() as lp:
            obj = Recorder(a, [], "r")
            obj.close()
            await wait_for(lambda: a.fileno() == -1)
            assert lp.statistics().pending_closes == 0
            # The peer sees no EOF: the connection lives on in the dup.
            assert _eof_or_pending(b) is None
            dup.sendall(b"still here")
            b.sendall(b"both ways")
            await anyio.wait_readable(b)
            assert b.recv(100) == b"still here"
            await anyio.wait_readable(dup)
            assert dup.recv(100) == b"both ways"
            lp.stop()
        dup.close()
        assert _eof_or_pending(b) == b""
    finally:
        dup.close()
        b.close()


async def test_object_closed_by_another_in_the_same_wakeup_is_not_stepped() -> None:
    """Both fds are ready; whichever steps first closes the other.

    The seed dispatched the stale event of the closed object (its
    ``event_step`` ran and had to notice ``sock`` was gone); here a closed
    object is never stepped for I/O again.
    """
    pairs = [socketpair() for _ in range(2)]
    log: list[str] = []
    try:
        async with ds_trio.loop() as lp:
            objs: list[Recorder] = []

            def close_other(me: Recorder) -> None:
                other = objs[1 - objs.index(me)]
                other.close()

            for i, (a, _) in enumerate(pairs):
                objs.append(Recorder(a, log, f"r{i}", on_step=close_other))
            await anyio.wait_all_tasks_blocked()
            for _, b in pairs:
                b.send(b"x")
            await wait_for(lambda: any(obj.sock is None for obj in objs))
            await wait_for(lambda: lp.statistics().pending_closes == 0)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert len(log) == 1
            assert [obj.sock is None for obj in objs].count(True) == 1
            lp.stop()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_requeued_closed_object_is_still_stepped() -> None:
    """``next_tick`` calls ``event_step`` on whatever was queued, closed or not."""
    a, b = socketpair()
    seen: list[object] = []

    class Late(DS):
        def event_step(self) -> None:
            seen.append(self.sock)

    try:
        async with ds_trio.loop():
            obj = Late(a, 0)
            obj.requeue()
            obj.close()
        assert seen == [None]
    finally:
        b.close()


async def test_same_socket_cannot_be_registered_again_before_its_close_ends() -> None:
    """The map entry outlives ``close`` until the round ends, as in the seed."""
    a, b = socketpair()
    got: dict[str, Any] = {}

    def reregister(obj: Recorder) -> None:
        obj.close()
        try:
            Recorder(a, [], "again")
        except ds_trio.AlreadyRegisteredError as exc:
            got["error"] = exc

    try:
        async with ds_trio.loop():
            Recorder(a, [], "r", on_step=reregister)
            b.send(b"x")
        assert isinstance(got["error"], ds_trio.AlreadyRegisteredError)
        assert a.fileno() == -1
    finally:
        b.close()


async def test_close_from_post_loop_callback_is_released_in_the_next_round() -> None:
    """A close the callback makes forces one more round, without other I/O."""
    a, b = socketpair()
    seen: list[tuple[bool, bool]] = []
    try:
        async with ds_trio.loop():
            obj = Recorder(a, [], "r")
            fd = a.fileno()

            def post(dmap: dict[int, DS]) -> bool:
                if obj.sock is not None:
                    obj.close()
                seen.append((dmap.get(fd) is obj, fd_is_open(fd)))
                return len(seen) < 2

            ds_trio.SetPostLoopCallback(post)
        assert seen == [(True, True), (False, False)]
    finally:
        b.close()


async def test_another_socket_object_on_a_registered_fd_number_is_refused() -> None:
    """Invariant 8: the registry is keyed by fd number, as ``%DescriptorMap``.

    A second socket object for the same number (``socket(fileno=...)``, as
    Perl's ``fdopen``) is the seed's "clobbering" confess; the first object
    keeps its entry and is still served.
    """
    a, b = socketpair()
    alias = socket.socket(fileno=a.fileno())
    try:
        async with ds_trio.loop() as lp:
            first = Recorder(a, [], "first")
            with pytest.raises(ds_trio.AlreadyRegisteredError, match=str(a.fileno())):
                Recorder(alias, [], "alias")
            assert ds_trio.DescriptorMap() == {a.fileno(): first}
            b.send(b"still served")
            await wait_for(lambda: first.data == b"still served")
            assert first.log == ["first"]
            lp.stop()
    finally:
        alias.detach()  # a's number: never close it twice
        b.close()


async def test_fd_number_released_at_the_end_of_the_round_can_be_registered_again() -> (
    None
):
    """Invariant 7: the entry and the fd live exactly until the round ends.

    Once the deferred close is processed, the same fd number is free for a
    new object, which is then registered and served normally.
    """
    a, b = socketpair()
    c, d = socketpair()
    got: dict[str, Any] = {}
    try:
        with anyio.fail_after(10):  # a hang guard: the old entry never leaves
            async with ds_trio.loop():
                fd = a.fileno()

                def closer(obj: Recorder) -> None:
                    obj.close()
                    got["mapped after close"] = ds_trio.DescriptorMap().get(fd) is obj

                Recorder(a, [], "old", on_step=closer)

                def post(dmap: dict[int, DS]) -> bool:
                    if "new" in got or fd in dmap:
                        return "new" not in got or not got["new"].data
                    got["fd open at post"] = fd_is_open(fd)
                    os.dup2(c.fileno(), fd)
                    got["new"] = Recorder(socket.socket(fileno=fd), [], "new")
                    d.send(b"to the new object")
                    return True

                ds_trio.SetPostLoopCallback(post)
                b.send(b"x")
        assert got["mapped after close"] is True
        assert got["fd open at post"] is False
        assert got["new"].data == b"to the new object"
        assert got["new"].sock is None  # closed when the loop ended
        assert not fd_is_open(fd)
    finally:
        for sock in (a, b, c, d):
            sock.close()


class Stepper(DS):
    """Counts steps; the first one requeues the object instead of re-arming."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.steps = 0

    def event_step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self.requeue()


async def test_oneshot_object_that_requeues_steps_once_more_then_stays_silent() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as lp:
            obj = Stepper(a)
            b.send(b"unread")  # stays readable: only the interest decides
            await wait_for(lambda: obj.steps == 2)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            assert obj.steps == 2
            lp.stop()
    finally:
        b.close()


@pytest.mark.parametrize(
    ("before", "offset", "after"),
    [
        (b"keep-this-and-drop", 9, b"keep-this"),  # truncated at offset
        (b"ab", 4, b"ab\0\0"),  # padded with NULs up to offset
        (b"abc", 3, b"abc"),  # appending: unchanged
        (b"abcdef", -2, b"abcd"),  # negative: counted from the end
    ],
)
async def test_do_read_at_eof_leaves_the_buffer_ending_at_offset(
    before: bytes, offset: int, after: bytes
) -> None:
    """``sysread`` sets the length to offset + bytes read, also at EOF (0)."""
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = Recorder(a, [], "r", events=0)
            b.close()
            await anyio.wait_readable(a)
            buf = bytearray(before)
            assert obj.do_read(buf, 100, offset) == 0
            assert obj.sock is None
            assert buf == after
    finally:
        b.close()


class StepError(Exception):
    pass


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "error", [anyio.ClosedResourceError, StepError], ids=["closed-resource", "other"]
)
async def test_any_exception_from_an_io_step_follows_the_policy(
    error: type[Exception], is_async: bool
) -> None:
    """The seed let every exception of ``event_step`` out of ``EventLoop``.

    An ``anyio.ClosedResourceError`` raised by the step's own code (a stream
    it uses was closed) is no exception to that, in task mode as in
    callback mode.
    """

    class Raiser(DS):
        def event_step(self) -> None:
            raise error("from the step")

    class AsyncRaiser(DS):
        async def event_step(self) -> None:
            await anyio.lowlevel.checkpoint()
            raise error("from the step")

    a, b = socketpair()
    try:
        with anyio.fail_after(10), pytest.raises(error, match="from the step"):
            async with ds_trio.loop():
                obj = AsyncRaiser(a) if is_async else Raiser(a)
                b.send(b"x")
        assert obj.sock is None
        assert a.fileno() == -1
    finally:
        b.close()


async def test_closed_resource_error_from_a_step_under_log_closes_only_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Raiser(DS):
        def event_step(self) -> None:
            raise anyio.ClosedResourceError("a stream the step uses")

    a, b = socketpair()
    c, d = socketpair()
    try:
        async with ds_trio.loop(errors="log") as lp:
            bad = Raiser(a)
            good = Recorder(c, [], "good")
            b.send(b"x")
            await wait_for(lambda: bad.sock is None)
            d.send(b"still served")
            await wait_for(lambda: good.data == b"still served")
            lp.stop()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].exc_info is not None
        assert isinstance(errors[0].exc_info[1], anyio.ClosedResourceError)
    finally:
        b.close()
        d.close()


async def test_closed_object_is_not_stepped_for_input_before_its_fd_is_released() -> (
    None
):
    """close deregisters at once (the seed's EPOLL_CTL_DEL), the fd lives on.

    The post-loop callback closes the object, then its peer sends: the next
    round's I/O must not step it, while its fd is still open until that
    round ends.
    """
    a, b = socketpair()
    log: list[str] = []
    seen: list[tuple[bool, bool]] = []
    try:
        async with ds_trio.loop():
            obj = Recorder(a, log, "r")
            fd = a.fileno()

            def post(dmap: dict[int, DS]) -> bool:
                seen.append((dmap.get(fd) is obj, fd_is_open(fd)))
                if len(seen) == 1:
                    obj.close()
                    b.send(b"too late")
                return len(seen) < 3

            ds_trio.SetPostLoopCallback(post)
            ds_trio.SetLoopTimeout(0)  # rounds go on without any other I/O
        assert log == []
        assert seen == [(True, True), (False, False), (False, False)]
    finally:
        b.close()
