"""The DS object: interest, oneshot and level-triggered wake-ups, read path, close."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile

import anyio
import pytest

import ds_trio
from ds_trio import DS, EPOLLET, EPOLLEXCLUSIVE, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio.testing import count_tasks, fill_socket, socketpair

from .helpers import Recorder, wait_for

pytestmark = pytest.mark.anyio


class Counter(DS):
    """Counts steps; reads nothing unless told to (so data stays readable)."""

    def __init__(self, sock: socket.socket, events: int) -> None:
        super().__init__(sock, events)
        self.steps = 0
        self.read_on_step = False

    def event_step(self) -> None:
        self.steps += 1
        if self.read_on_step:
            buf = bytearray()
            while self.do_read(buf, 4096, 0):
                pass


async def test_oneshot_disarms_after_one_step_until_epwait() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, EPOLLIN | EPOLLONESHOT)
            b.send(b"x")
            await wait_for(lambda: obj.steps == 1)
            b.send(b"y")  # still unread data, but the object is disarmed
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            assert obj.steps == 1
            obj.epwait(EPOLLIN | EPOLLONESHOT)  # from outside its task
            await wait_for(lambda: obj.steps == 2)
            await anyio.wait_all_tasks_blocked()
            assert obj.steps == 2
            loop.stop()
    finally:
        b.close()


async def test_level_triggered_interest_stays_armed() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, EPOLLIN)
            b.send(b"x")
            await wait_for(lambda: obj.steps >= 3)  # unread data: woken again
            obj.read_on_step = True
            # do_read's EAGAIN re-arms with EPOLLIN|EPOLLONESHOT, as the
            # seed's epwait replaces the registration's mask.
            await wait_for(lambda: obj._ev == EPOLLIN | EPOLLONESHOT)
            steps = obj.steps
            await anyio.wait_all_tasks_blocked()
            assert obj.steps == steps
            loop.stop()
    finally:
        b.close()


@pytest.mark.parametrize("flag", [EPOLLET, EPOLLEXCLUSIVE])
async def test_et_and_exclusive_are_accepted(flag: int) -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, EPOLLIN | flag)
            obj.read_on_step = True
            b.send(b"x")
            await wait_for(lambda: obj.steps >= 1)
            loop.stop()
    finally:
        b.close()


async def test_in_and_out_interest_wakes_on_either() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            # Nothing to read, but writable: EPOLLIN|EPOLLOUT wakes.
            obj = Counter(a, EPOLLIN | EPOLLOUT | EPOLLONESHOT)
            await wait_for(lambda: obj.steps == 1)
            # Now not writable (buffer full) but readable.
            fill_socket(a)
            b.send(b"x")
            obj.epwait(EPOLLIN | EPOLLOUT | EPOLLONESHOT)
            await wait_for(lambda: obj.steps == 2)
            loop.stop()
    finally:
        b.close()


async def test_epwait_from_a_timer_switches_direction_at_once() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, EPOLLIN | EPOLLONESHOT)  # nothing will ever be read
            await anyio.wait_all_tasks_blocked()
            ds_trio.add_timer(0, obj.epwait, EPOLLOUT | EPOLLONESHOT)
            await wait_for(lambda: obj.steps == 1)  # writable: woken
            loop.stop()
    finally:
        b.close()


async def test_epwait_from_another_objects_step() -> None:
    a, b = socketpair()
    c, d = socketpair()
    try:
        async with ds_trio.loop() as loop:
            target = Counter(a, 0)

            def poke(_: Recorder) -> None:
                target.epwait(EPOLLOUT | EPOLLONESHOT)

            Recorder(c, [], "poker", on_step=poke)
            await anyio.wait_all_tasks_blocked()
            assert target.steps == 0
            d.send(b"go")
            await wait_for(lambda: target.steps == 1)
            loop.stop()
    finally:
        b.close()
        d.close()


async def test_do_read_returns_count_and_appends_at_offset() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, 0)
            b.send(b"hello")
            buf = bytearray(b"ab")
            await anyio.wait_readable(a)
            assert obj.do_read(buf, 3, 2) == 3
            assert buf == b"abhel"
            assert obj.do_read(buf, 10, 1) == 2  # overwrite from 1, truncate after
            assert buf == b"alo"
            b.send(b"z")
            await anyio.wait_readable(a)
            assert obj.do_read(buf, 10, 5) == 1  # padded with NULs up to offset
            assert buf == b"alo\0\0z"
            loop.stop()
    finally:
        b.close()


async def test_do_read_eagain_rearms_and_keeps_only_non_empty_rbuf() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop() as loop:
            obj = Counter(a, 0)
            partial = bytearray(b"partial request")
            assert obj.do_read(partial, 100, len(partial)) == 0
            assert obj.sock is a
            assert obj.rbuf is partial
            assert obj._ev == EPOLLIN | EPOLLONESHOT
            assert obj.do_read(bytearray(), 100) == 0
            assert _rbuf(obj) is None
            loop.stop()
    finally:
        b.close()


def _rbuf(obj: DS) -> bytearray | None:
    return obj.rbuf


async def test_do_read_eof_closes_and_returns_zero() -> None:
    a, b = socketpair()
    async with ds_trio.loop():
        obj = Counter(a, 0)
        b.close()
        await anyio.wait_readable(a)
        assert obj.do_read(bytearray(), 100) == 0
        assert obj.sock is None
    assert a.fileno() == -1


async def test_do_read_error_closes_without_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = socket.socket()
    b = socket.socket()
    server = socket.create_server(("127.0.0.1", 0))
    try:
        a.connect(server.getsockname())
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        async with ds_trio.loop():
            obj = Counter(a, 0)
            conn.send(b"x")
            conn.close()  # RST: ECONNRESET on read
            await anyio.wait_readable(a)
            got = obj.do_read(bytearray(), 100)
            while got:  # the byte may come before the reset
                got = obj.do_read(bytearray(), 100)
            assert obj.sock is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        b.close()
        server.close()


async def test_close_wakes_parked_task_and_task_ends() -> None:
    a, b = socketpair()
    c, d = socketpair()
    try:
        async with ds_trio.loop() as loop:
            await anyio.wait_all_tasks_blocked()
            baseline = count_tasks()
            waiting = Counter(a, EPOLLIN)  # parked in wait_readable
            parked = Counter(c, 0)  # no interest: parked in sleep
            await anyio.wait_all_tasks_blocked()
            assert count_tasks() == baseline + 2
            waiting.close()
            parked.close()
            await wait_for(lambda: count_tasks() == baseline)
            loop.stop()
    finally:
        b.close()
        d.close()


async def test_closed_object_ignores_epwait_and_reads() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = Counter(a, 0)
            obj.close()
            obj.epwait(EPOLLIN)  # the seed confessed ENOENT here
            assert obj.do_read(bytearray(), 10) == 0
            assert obj.shutdn() is None
    finally:
        b.close()


async def test_shutdn_closes_plain_socket() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = Counter(a, 0)
            assert obj.shutdn() is False
            assert obj.sock is None
        assert a.fileno() == -1
    finally:
        b.close()


async def test_drop_logs_warning_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            obj = Counter(a, 0)
            assert obj.drop("tmpfile", "ENOSPC") is False
            assert obj.sock is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].name == "ds_trio.ds"
        assert "tmpfile ENOSPC" in warnings[0].getMessage()
    finally:
        b.close()


async def test_registering_a_registered_fd_is_an_error() -> None:
    a, b = socketpair()
    try:
        async with ds_trio.loop():
            first = Counter(a, 0)
            with pytest.raises(ds_trio.AlreadyRegisteredError, match=str(a.fileno())):
                Counter(a, 0)
            assert ds_trio.DescriptorMap()[a.fileno()] is first
            first.close()
    finally:
        b.close()


def test_registering_a_registered_fd_outside_loop_is_an_error() -> None:
    a, b = socketpair()
    try:
        Counter(a, 0)
        with pytest.raises(ds_trio.AlreadyRegisteredError):
            Counter(a, 0)
    finally:
        b.close()


def test_bad_sockets_are_rejected_with_clear_errors() -> None:
    with pytest.raises(TypeError, match="raw fd"):
        Counter(0, EPOLLIN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="socket"):
        Counter("not a socket", EPOLLIN)  # type: ignore[arg-type]
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        Counter(closed, EPOLLIN)
    with tempfile.TemporaryFile() as regular, pytest.raises(TypeError, match="regular"):
        Counter(regular, EPOLLIN)  # type: ignore[arg-type]
    assert ds_trio.DescriptorMap() == {}


def test_bad_events_are_rejected() -> None:
    a, b = socketpair()
    try:
        with pytest.raises(ValueError, match="bits"):
            Counter(a, 1 << 5)
        with pytest.raises(ValueError, match="bits"):
            Counter(a, -1)
        with pytest.raises(TypeError):
            Counter(a, "EPOLLIN")  # type: ignore[arg-type]
        assert ds_trio.DescriptorMap() == {}
        obj = Counter(a, 0)
        with pytest.raises(ValueError, match="bits"):
            obj.epwait(1 << 7)
    finally:
        a.close()
        b.close()


async def test_pipes_work_as_ds_objects() -> None:
    r, w = os.pipe()
    reader = os.fdopen(r, "rb", buffering=0)
    got = bytearray()

    class PipeReader(DS):
        def event_step(self) -> None:
            while True:
                try:
                    data = self.sock.read(100)
                except BlockingIOError:
                    return
                if not data:
                    self.close()
                    return
                if data is None:
                    return
                got.extend(data)

    try:
        async with ds_trio.loop():
            PipeReader(reader, EPOLLIN)
            os.write(w, b"from a pipe")
            os.close(w)
        assert bytes(got) == b"from a pipe"
        assert reader.closed
    finally:
        with contextlib.suppress(OSError):
            os.close(w)


async def test_event_step_must_be_defined() -> None:
    a, b = socketpair()
    try:
        with pytest.raises(NotImplementedError):
            async with ds_trio.loop():
                DS(a, EPOLLIN)
                b.send(b"x")
    finally:
        b.close()


class _CountingSocket(socket.socket):
    """A socket subclass that overrides recv and send, as wrappers do."""

    recvs = 0
    sends = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        type(self).recvs += 1
        return super().recv(bufsize, flags)

    def send(self, data: object, flags: int = 0) -> int:
        type(self).sends += 1
        return super().send(data, flags)  # type: ignore[arg-type]


class _Echo(DS):
    def event_step(self) -> None:
        if not self.flush_write() or self.sock is None:
            return
        buf = bytearray()
        while self.do_read(buf, 4096):
            self.write(bytes(buf))
            buf = bytearray()


async def test_socket_subclass_overrides_of_recv_and_send_are_used() -> None:
    # Plain sockets are read and written with read(2)/write(2) on their fd
    # (the same syscalls without flags, through faster C calls); a subclass
    # must still get its own recv/send called.
    a, b = socketpair()
    sub = _CountingSocket(fileno=a.detach())
    _CountingSocket.recvs = _CountingSocket.sends = 0
    try:
        async with ds_trio.loop() as loop:
            _Echo(sub)
            b.send(b"ping")
            with anyio.fail_after(10):
                got = b""
                while got != b"ping":
                    await anyio.wait_readable(b)
                    got += b.recv(100)
            assert _CountingSocket.recvs >= 1
            assert _CountingSocket.sends == 1
            loop.stop()
    finally:
        b.close()
