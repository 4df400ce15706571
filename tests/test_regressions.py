"""Regression tests for bugs found upstream in PublicInbox::DS and its users.

Each test names the upstream commit (ammarfaizi2 mirror of public-inbox)
whose bug it guards against.  Guards already covered elsewhere in the suite
are not repeated here.
"""

from __future__ import annotations

import gc
import socket
import weakref

import anyio
import pytest

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT
from ds_trio.testing import open_fds, socketpair

from .helpers import Echo, Recorder, wait_for

pytestmark = pytest.mark.anyio


async def test_close_from_a_queued_callable_completes_without_other_io() -> None:
    """Upstream 7c83d3e7: a deferred close from a queued callback stalled.

    The seed needed hacks to wake the loop for a close requested from a
    timer or a ``next_tick`` callback.  Here the close is requested from a
    requeued callable while the peer sends nothing: the fd must still be
    released and the loop must finish on its own.
    """
    a, b = socketpair()
    try:
        with anyio.fail_after(10):
            async with ds_trio.loop():
                obj = Recorder(a, [], "r")
                await anyio.wait_all_tasks_blocked()
                ds_trio.requeue(obj.close)
        assert obj.sock is None
        assert a.fileno() == -1
        assert obj.log == []  # never woken for I/O
    finally:
        b.close()


class _ClosesAnotherOnClose(socket.socket):
    """A socket whose real close closes another DS object (a "destructor")."""

    other: DS | None = None

    def close(self) -> None:
        super().close()
        other, self.other = self.other, None
        if other is not None:
            other.close()


async def test_close_during_close_processing_closes_both() -> None:
    """Upstream 8f23c134: a close during close processing corrupted ToClose.

    Perl destructors ran while the deferred-close array was being walked and
    pushed onto it.  Here the socket released at the end of the round
    closes a second object from its ``close``: both objects must end up
    closed and both fds released, the second in a later pass.
    """
    a1, b1 = socketpair()
    a2, b2 = socketpair()
    sock = _ClosesAnotherOnClose(fileno=a1.detach())
    try:
        with anyio.fail_after(10):
            async with ds_trio.loop() as loop:
                first = Recorder(sock, [], "first")
                second = Recorder(a2, [], "second")
                sock.other = second
                await anyio.wait_all_tasks_blocked()
                first.close()
                await wait_for(lambda: a2.fileno() == -1)
                assert second.sock is None
                assert sock.fileno() == -1
                await wait_for(lambda: not loop.descriptor_map)
                assert loop.statistics().pending_closes == 0
        assert first.log == second.log == []
    finally:
        b1.close()
        b2.close()


class _ResetsInStep(DS):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.steps = 0

    def event_step(self) -> None:
        self.steps += 1
        ds_trio.Reset()  # removes this very object from the map
        # The object goes on using itself after its own removal.
        assert self.sock is None
        assert self.do_read(bytearray(), 4096) == 0
        self.epwait(EPOLLIN | EPOLLONESHOT)


async def test_reset_from_inside_the_objects_own_event_step() -> None:
    """Upstream 0795b090 (and 1d34aa20): removal during the object's own step.

    A ``Reset`` in a forked child freed the object whose ``event_step`` was
    running, and the seed segfaulted.  Here a step resets the loop (closing
    itself and a bystander) and goes on touching itself: no exception, the
    loop finishes, both fds are released.
    """
    a, b = socketpair()
    c, d = socketpair()
    try:
        with anyio.fail_after(10):
            async with ds_trio.loop():
                obj = _ResetsInStep(a)
                bystander = Echo(c)
                ds_trio.add_timer(3600, print)  # dropped by the Reset
                b.send(b"x")
        assert obj.steps == 1
        assert obj.sock is None
        assert bystander.sock is None
        assert a.fileno() == -1
        assert c.fileno() == -1
    finally:
        b.close()
        d.close()


class _RepopulatesOnClose(DS):
    """A close that queues work, arms a timer and registers a new object."""

    spare: socket.socket | None = None
    ran: list[str]

    def __init__(self, sock: socket.socket, spare: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.spare = spare
        self.ran = []

    def event_step(self) -> None:
        pass

    def close(self) -> bool:
        if self.sock is not None:
            ds_trio.requeue(lambda: self.ran.append("queued"))
            ds_trio.add_timer(0, self.ran.append, "timer")
            ds_trio.later(self.ran.append, "later")
            spare, self.spare = self.spare, None
            if spare is not None:
                Echo(spare)
        return super().close()


def test_reset_loops_until_close_overrides_stop_repopulating() -> None:
    """Upstream c882fd47: destructors re-populated the containers Reset emptied.

    ``Reset`` must loop until everything is empty: after it, no registered
    object (not even one a ``close`` override created), no timer, no queued
    work, not in a loop, and the fd count back to its baseline.
    """
    baseline = set(open_fds())
    a, b = socketpair()
    spare, spare_peer = socketpair()
    try:
        obj = _RepopulatesOnClose(a, spare)
        ds_trio.Reset()
        assert obj.sock is None
        assert ds_trio.DescriptorMap() == {}
        assert spare.fileno() == -1
        assert not ds_trio.in_loop()
        ds_trio.SetLoopTimeout(0)
        ds_trio.SetPostLoopCallback(lambda _map: False)
        ds_trio.EventLoop()  # anything left over would run here
        assert obj.ran == []
    finally:
        b.close()
        spare_peer.close()
    ds_trio.Reset()
    assert set(open_fds()) <= baseline


async def test_reset_inside_a_loop_loops_until_close_overrides_stop() -> None:
    """Upstream c882fd47, inside a running loop (which newer DS supports).

    After ``Reset`` the loop holds no timer and no queued work that a
    ``close`` override added, and the object that override registered is
    closed too, so the loop finishes by itself without running any of it.
    """
    a, b = socketpair()
    spare, spare_peer = socketpair()
    try:
        with anyio.fail_after(10):
            async with ds_trio.loop() as loop:
                obj = _RepopulatesOnClose(a, spare)
                await anyio.wait_all_tasks_blocked()
                ds_trio.Reset()
                stats = loop.statistics()
                assert (stats.timers_pending, stats.queued) == (0, 0)
                assert all(o.sock is None for o in loop.descriptor_map.values())
        assert obj.ran == []
        assert spare.fileno() == -1
    finally:
        b.close()
        spare_peer.close()


async def test_listener_on_a_blocking_socket_is_made_non_blocking() -> None:
    """Upstream 8472ccdd: an inherited blocking listener could hang ``accept``.

    With several accepts per wake-up, a blocking listener would block the
    whole loop in the second ``accept``.  The listener must switch the
    socket to non-blocking (and warn), then serve and keep the loop alive.
    """
    lsock = socket.create_server(("127.0.0.1", 0))
    assert lsock.getblocking()
    accepted: list[socket.socket] = []

    def post_accept(conn: socket.socket, _addr: object, _listener: object) -> None:
        accepted.append(conn)
        Echo(conn)

    try:
        with anyio.fail_after(10):
            async with ds_trio.loop() as loop:
                ds_trio.Listener(lsock, post_accept, accepts_per_wake=4)
                # Checked before any connection: a blocking accept would hang.
                assert not lsock.getblocking()
                client = socket.create_connection(lsock.getsockname())
                try:
                    client.sendall(b"ping")
                    got = b""
                    while len(got) < 4:
                        await anyio.wait_readable(client)
                        got += client.recv(4)
                    assert got == b"ping"
                    assert len(accepted) == 1
                finally:
                    client.close()
                loop.stop()
    finally:
        lsock.close()


class _Streamer(DS):
    """Streams a large response in pieces from a self-referencing callable."""

    def __init__(self, sock: socket.socket, pieces: int) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.left = pieces
        self.write(self._next)

    def event_step(self) -> None:
        self.flush_write()

    def _next(self, _obj: DS) -> None:
        # Each piece queues the next behind it: a recursive writer would
        # nest one frame per piece.
        while self.left and self.sock is not None:
            self.left -= 1
            if not self.write(b"x" * 65536):
                self.write(self._next)
                return


async def test_streamed_response_is_freed_by_refcount_after_close() -> None:
    """Upstream 4685b1d8 (and 271301a4, 656bc41e): recursion and cycles.

    Streaming a large response recursed inside ``write`` and left cycles
    between the client and its queued callbacks, leaking in long-running
    daemons.  Here a 4 MiB response, streamed by a callable that holds the
    object, is cut short by a close while much of it is still queued: the
    peer receives a prefix and the object is freed by reference counting
    alone (the cycle collector disabled), spill files included.
    """
    a, b = socketpair()
    gc.collect()
    gc.disable()
    try:
        with anyio.fail_after(10):
            async with ds_trio.loop():
                obj = _Streamer(a, 64)
                ref = weakref.ref(obj)
                got = 0
                while got < 256 * 1024:
                    await anyio.wait_readable(b)
                    got += len(b.recv(65536))
                assert obj.wbuf  # still streaming
                obj.close()
                del obj
        assert ref() is None
    finally:
        gc.enable()
        b.close()
