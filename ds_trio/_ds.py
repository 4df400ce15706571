"""The DS object: one socket, one task, one ``event_step`` callback.

The seed registers each object's fd with a process-wide epoll set and calls
``event_step`` when it is ready.  Here each object is a task in its loop's
task group.  In task mode it waits for its armed interest with
``wait_readable`` / ``wait_writable`` and then calls ``event_step`` (trio's
epoll backend registers every wait with ``EPOLLONESHOT`` and re-arms it on
the next wait, the seed's syscalls).  In callback mode - the default for
synchronous steps on plain sockets, see below - the task parks and
readiness callbacks (asyncio's ``add_reader``, or on trio the loop's own
epoll set in ``_reactor``) call ``event_step`` as the seed's loop does.

There is deliberately one callback for both directions: a TLS read may have
to write and a TLS write may have to read, so only the object, from its own
state, knows which call to make next (``Documentation/technical/ds.txt``).
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import ssl
import stat
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

import anyio

from . import _tls, _wbuf
from ._errors import DSError
from ._flags import DIRECTIONS, EPOLLIN, EPOLLONESHOT, check_events
from ._loop import (
    ErrorPolicy,
    EventLoop,
    Reset,
    SetLoopTimeout,
    SetPostLoopCallback,
    _current,
    _state,
    requeue,
)
from ._reactor import EpollReactor

if TYPE_CHECKING:
    from ._backend import CancelScopeLike, Parked, Reactor
    from ._loop import Loop, _State
    from ._streams import DSStream
    from ._timers import Timer

__all__ = ["DS"]

log = logging.getLogger("ds_trio.ds")

_IN: Final = int(EPOLLIN)
_ONESHOT: Final = int(EPOLLONESHOT)
_IN_ONESHOT: Final = int(EPOLLIN | EPOLLONESHOT)
_OUT: Final = 0x004
_BOTH: Final = DIRECTIONS
_NOT_BOTH: Final = ~DIRECTIONS

# ``_wait_dir`` when no wait scope is open (task not started, running an
# async step, or ended).
_NO_SCOPE: Final = -1

_PlainSocket: Final = socket.socket
_read: Final = os.read


def _check_socket(sock: object) -> int:
    """Validate what ``DS()`` was given; return its fd and make it non-blocking."""
    if isinstance(sock, int):
        raise TypeError(
            "DS() needs a socket object, not a raw fd number: a socket object's "
            "fileno() turns to -1 when closed, a raw number can be reused"
        )
    fileno = getattr(sock, "fileno", None)
    if not callable(fileno) or not callable(getattr(sock, "close", None)):
        raise TypeError(
            f"DS() needs a socket (an object with fileno() and close()), "
            f"got {type(sock).__name__}"
        )
    try:
        fd = fileno()
    except ValueError as exc:  # file objects raise on a closed file
        raise ValueError(f"DS() was given a closed {type(sock).__name__}") from exc
    if not isinstance(fd, int):
        raise TypeError(f"{type(sock).__name__}.fileno() returned {fd!r}")
    if fd < 0:
        raise ValueError(
            f"DS() was given a closed {type(sock).__name__} (fileno() == {fd})"
        )
    if isinstance(sock, socket.socket):
        sock.setblocking(False)
    else:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            raise TypeError(
                f"fd {fd} is a regular file or directory; epoll cannot watch it"
            )
        os.set_blocking(fd, False)
    return fd


class DS:
    """Base class of every DS object (``PublicInbox::DS``).

    ``DS(sock, events)`` registers ``sock`` (a socket, or another pollable
    object with ``fileno()`` and ``close()`` such as a pipe) under its fd
    number and starts the object's task in the running loop, or in the next
    loop started in this thread when none is running.  Subclasses implement
    :meth:`event_step`, synchronous or ``async def``.

    ``events`` is a mask of :class:`ds_trio.Events` bits: ``EPOLLIN`` and/or
    ``EPOLLOUT`` choose the directions; with ``EPOLLONESHOT`` the object is
    disarmed after one ``event_step`` until :meth:`epwait` re-arms it,
    without it the interest stays armed (level-triggered).

    Raises:
        TypeError: ``sock`` is not a socket-like object (a raw fd number, a
            regular file, anything without ``fileno()``), or ``events`` is
            not an int.
        ValueError: ``sock`` is closed, or ``events`` has unknown bits.
        AlreadyRegisteredError: its fd is already registered.
    """

    __slots__ = (
        "__weakref__",
        "_ds_cb",
        "_ds_cb_fut",
        "_ds_drained",
        "_ds_external",
        "_ds_in_cb",
        "_ds_is_socket",
        "_ds_no_sendfile",
        "_ds_running",
        "_ds_shutdown_timer",
        "_ds_state",
        "_ds_stepping",
        "_ds_stream",
        "_ds_tls_want",
        "_ds_wmem",
        "_ev",
        "_fd",
        "_scope",
        "_steps_due",
        "_wait_dir",
        "rbuf",
        "sock",
        "wbuf",
    )

    #: Error policy for this class's objects (``"raise"`` or ``"log"``);
    #: ``None`` uses the loop's.
    errors: ClassVar[ErrorPolicy | None] = None
    #: Set per subclass: whether ``event_step`` is a coroutine function.
    _ds_async_step: ClassVar[bool] = False
    #: Marks DS objects for the loop without an import cycle.
    _ds_is_ds: ClassVar[bool] = True
    #: Where spill files are created; None: ``tempfile.gettempdir()``.
    spill_dir: ClassVar[str | None] = None
    #: Bytes of queued output an object may keep as heap copies instead of
    #: spilling them (small remainders: a spill file costs an open and a
    #: pwrite, several times a copy).  0 spills every copy, as the seed.
    #: Immutable ``bytes`` are queued by reference and do not count.
    WBUF_MEMORY_MAX: ClassVar[int] = 16384
    #: Seconds a TLS shutdown may wait to send close_notify before the
    #: connection is closed anyway.
    TLS_SHUTDOWN_TIMEOUT: ClassVar[float] = 5.0
    #: Seconds of inactivity after which ``expire_old`` shuts an object
    #: down (the seed's ``$EXPTIME``; IMAP uses 1800).  A loop's
    #: ``exptime`` overrides it for all of that loop's objects.
    EXPTIME: ClassVar[float] = 180

    sock: Any
    rbuf: bytearray | None
    wbuf: deque[Any] | None
    _ds_state: _State

    # ------------------------------------------------------------------
    # Legacy class methods: PublicInbox::DS->EventLoop, ->SetPostLoopCallback,
    # ->SetLoopTimeout, ->Reset.  The same objects as the module functions.
    # ------------------------------------------------------------------
    EventLoop = staticmethod(EventLoop)
    SetPostLoopCallback = staticmethod(SetPostLoopCallback)
    SetLoopTimeout = staticmethod(SetLoopTimeout)
    Reset = staticmethod(Reset)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._ds_async_step = inspect.iscoroutinefunction(cls.event_step)

    def __init__(self, sock: Any, events: int = _IN_ONESHOT) -> None:
        fd = _check_socket(sock)
        ev = check_events(events)
        self.sock = sock
        self.rbuf = None
        self.wbuf = None
        self._fd = fd
        self._ev = ev
        self._scope: CancelScopeLike | None = None
        self._wait_dir = _NO_SCOPE
        self._steps_due = 0
        self._ds_running = False
        self._ds_no_sendfile = False
        self._ds_tls_want = 0
        self._ds_external = False
        self._ds_is_socket = isinstance(sock, socket.socket)
        # A plain stream socket: a short read means its receive queue was
        # empty (see do_read).
        self._ds_stream = (
            type(sock) is socket.socket and sock.type == socket.SOCK_STREAM
        )
        self._ds_drained = False
        self._ds_stepping = False
        self._ds_shutdown_timer: Timer | None = None
        self._ds_cb: Reactor | None = None
        self._ds_cb_fut: Parked | None = None
        self._ds_in_cb = False
        self._ds_wmem = 0
        _state().register(self, fd)

    def __repr__(self) -> str:
        state = "closed" if self.sock is None else f"events={self._ev:#x}"
        return f"<{type(self).__name__} fd={self._fd} {state}>"

    # ------------------------------------------------------------------
    # What subclasses implement
    # ------------------------------------------------------------------

    def event_step(self) -> Any:
        """Called when the armed interest is ready, or when requeued.

        The loop does not say which direction fired: the object decides from
        its own state.  Every exit path must leave the object re-armed
        (``epwait``, usually through ``do_read``/``write`` hitting EAGAIN),
        requeued, or closed, or it is never called again.
        """
        raise NotImplementedError(f"{type(self).__name__} must define event_step()")

    # ------------------------------------------------------------------
    # Interest, read path, lifecycle
    # ------------------------------------------------------------------

    requeue = requeue

    def epwait(self, events: int) -> None:
        """Replace the armed interest (the seed's ``epwait``: ``EPOLL_CTL_MOD``).

        Takes effect at once: a wait in the old direction is interrupted,
        also when called from outside the object's task.  A no-op on a
        closed object (the seed confessed ENOENT there and killed the
        worker; newer DS stops re-arming closed transports).
        """
        if type(events) is not int:
            events = check_events(events)
        elif events & ~0xD0000005:
            check_events(events)
        if self.sock is None:
            return
        self._ev = events
        if self._wait_dir != events & _BOTH:
            self._interrupt()

    def _interrupt(self) -> None:
        # Cancel the task's wait scope: a wait in the old direction ends and
        # the task re-reads its interest.  Harmless when the task is inside
        # its own step (no checkpoint runs before it leaves the scope) or
        # when no scope is open.  In callback mode the registration is
        # changed instead - after the step, when called from inside it.
        if self._ds_cb is not None:
            if not self._ds_in_cb:
                self._cb_arm()
            return
        scope = self._scope
        if scope is not None:
            scope.cancel()

    def do_read(self, rbuf: bytearray, length: int, offset: int = 0) -> int:
        """Read up to ``length`` bytes into ``rbuf`` at ``offset``.

        As Perl's ``sysread`` with an offset, ``rbuf`` ends right after the
        data read (shorter buffers are padded with NUL bytes up to
        ``offset``).

        Returns:
            The number of bytes read; 0 when nothing was read: on EOF (the
            object is closed), on EAGAIN (read interest re-armed with
            ``EPOLLIN|EPOLLONESHOT`` - over TLS, whichever direction OpenSSL
            asked for - and a non-empty ``rbuf`` kept through
            :meth:`rbuf_idle`), or on any other error (closed, not logged:
            clients break connections all the time).  Check ``self.sock`` to
            tell them apart.
        """
        sock = self.sock
        if sock is None:
            return 0
        if self._ds_drained:
            # The previous read of this step was short: the kernel's queue
            # was empty then.  Skip the recv() that would fail with EAGAIN
            # (a syscall and an exception per request) and arm as EAGAIN
            # does; bytes that arrived since make the level-triggered
            # interest fire at once.
            self._ds_drained = False
            self._ev = _IN_ONESHOT
            if self._wait_dir != _IN:
                self._interrupt()
            self.rbuf = rbuf if rbuf else None
            return 0
        plain = type(sock) is _PlainSocket
        try:
            if plain:
                # read(2) on the socket's own fd, the same as recv(2) without
                # flags, but through a fast-call C function: recv() builds an
                # argument tuple and parses it (about 5 % of a DS step).
                data = _read(sock.fileno(), length)
            elif self._ds_is_socket:
                data = sock.recv(length)
            else:
                data = _read(self._fd, length)
        except BlockingIOError:
            # The seed calls epwait() and rbuf_idle() as plain functions
            # here (no subclass override applies); inlined because this is
            # the end of nearly every step.  Inside the object's own step
            # its scope already waits for reading.
            self._ev = _IN_ONESHOT
            if self._wait_dir != _IN:
                self._interrupt()
            self.rbuf = rbuf if rbuf else None
            return 0
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            # TLS may need the other direction to go on reading (epbit).
            self._ds_tls_want = _tls.want(exc)
            self.epwait(self._ds_tls_want | _ONESHOT)
            self.rbuf = rbuf if rbuf else None
            return 0
        except OSError:
            self.close()
            return 0
        n = len(data)
        if n < length or not n:  # (a zero length reads 0 bytes: EOF too)
            if not n:
                # sysread at EOF still sets the length to offset + 0 bytes read.
                if offset < len(rbuf):
                    del rbuf[offset:]
                elif offset > len(rbuf):
                    rbuf += bytes(offset - len(rbuf))
                self.close()
                return 0
            if self._ds_in_cb and self._ds_stream and plain:
                # Only within the object's own step from a readiness
                # callback; reset when the step ends.
                self._ds_drained = True
        if offset == len(rbuf):
            rbuf += data
        elif offset < len(rbuf):
            rbuf[offset:] = data
        else:
            rbuf += bytes(offset - len(rbuf))
            rbuf += data
        return n

    def rbuf_idle(self, rbuf: bytearray) -> None:
        """Keep a non-empty partial read in ``self.rbuf``; drop an empty one.

        Dropping empty buffers is what lets 10k idle clients cost little; a
        kept ``rbuf`` also tells graceful shutdown the client is mid-request.
        """
        self.rbuf = rbuf if rbuf else None

    # ------------------------------------------------------------------
    # Write path (bodies in _wbuf)
    # ------------------------------------------------------------------

    # The hot path's two methods are _wbuf's functions themselves (their
    # docstrings are the methods'): one Python frame less per call.
    write = _wbuf.write

    flush_write = _wbuf.flush_write

    def write_file(self, file: Any, offset: int = 0, length: int | None = None) -> bool:
        """Queue ``length`` bytes of ``file`` from ``offset`` (zero-copy).

        ``file`` is an fd or an object with ``fileno()`` (a regular file);
        ``length`` None means to its end.  The region goes out with
        ``os.sendfile`` straight from the page cache (``pread`` + ``send``
        over TLS) in queue order, through a duplicate fd, so the caller may
        close its file at once.  The seed's write queue held such injected
        files as ``[fh, offset, length]``.  A file that shrinks before its
        region is sent closes the object (the promised length cannot be
        kept).

        Returns:
            As :meth:`write`: True if all of it went out now.

        Raises:
            ValueError: a negative ``offset`` or ``length``.
            OSError: ``file`` is not an open file (from ``dup``/``fstat``).
        """
        return _wbuf.write_file(self, file, offset, length)

    def msg_more(self, data: bytes | bytearray | memoryview) -> bool:
        """Write with ``MSG_MORE`` ("more follows") when nothing is queued.

        On Linux, for non-TLS sockets with an empty queue, the kernel holds
        the bytes back until the next plain write, so a response header and
        body leave in one segment without ``TCP_CORK``.  Otherwise exactly
        :meth:`write` (the base class's, never a subclass override).  End
        every response with a :meth:`write` of at least one byte, or the
        last piece waits ~200 ms: an empty write sends nothing, so it does
        not push the held bytes out (nor did the seed's ``syswrite``).
        """
        return _wbuf.msg_more(self, data)

    def epbit(self, default: int) -> int:
        """The interest to wait for (the seed's ``epbit($sock, $default)``).

        ``default`` on plain sockets; over TLS, the direction the last TLS
        operation asked for (``EPOLLIN`` or ``EPOLLOUT``, other bits of
        ``default`` kept), which may be the opposite of the caller's.
        """
        want = self._ds_tls_want
        if want and _tls.is_tls(self.sock):
            return (default & _NOT_BOTH) | want
        return default

    # ------------------------------------------------------------------
    # TLS (bodies in _tls)
    # ------------------------------------------------------------------

    def accept_tls_step(self) -> bool | None:
        """One non-blocking server-side TLS handshake step.

        Returns:
            True when the handshake is complete; False when incomplete (the
            step put itself at the front of the write queue and armed the
            direction TLS asked for) or failed (the object is closed, with
            one log line under ``ds_trio.tls``); None if already closed.
        """
        return _tls.accept_tls_step(self)

    def shutdn_tls_step(self) -> bool | None:
        """One TLS shutdown step: send close_notify, then close.

        Does not wait for the peer's close_notify (IO::Socket::SSL's
        ``SSL_fast_shutdown``).  Returns False when it must wait to send
        (queued at the front of the write queue), else what ``close``
        returns; None if already closed.
        """
        return _tls.shutdn_tls_step(self)

    def starttls(self, context: ssl.SSLContext, *, server_side: bool = True) -> bool:
        """Switch to TLS in place (STARTTLS), or start implicit TLS lazily.

        The socket is wrapped with ``do_handshake_on_connect=False`` under
        the same object and fd, and the first :meth:`accept_tls_step` runs
        at once.  Bytes the protocol already read into ``rbuf`` stay there:
        plaintext pipelined after a STARTTLS command is the protocol's to
        discard (RFC 3207 §4.2).

        Returns:
            True if the handshake already completed (requeue the object to
            go on), False while it is in progress (``event_step`` must start
            with ``flush_write()``, which drives it).

        Raises:
            ValueError: TLS is already active.
        """
        return _tls.starttls(self, context, server_side=server_side)

    async def drained(self) -> bool:
        """Wait until the write queue is empty (for async ``event_step`` code).

        Flushes as :meth:`flush_write` does and waits for the socket in
        between.  Must be awaited from the object's own ``async def
        event_step`` (the object's task is the one waiter on its fd).

        It disarms the interest while it flushes; the step re-arms as usual
        (``do_read`` hitting EAGAIN, ``epwait``) before it returns.

        Returns:
            True when the queue is empty, False if the object was closed.

        Raises:
            DSError: awaited from outside the object's own async step.
        """
        if not self._ds_stepping:
            raise DSError(
                f"{self!r}.drained() must be awaited from its own async event_step"
            )
        backend = cast("Loop", self._ds_state)._require_backend()
        while await self._ds_flush_once(backend) is not None:
            pass
        return self.sock is not None

    async def _ds_flush_once(self, backend: Any) -> int | None:
        """One ``flush_write`` and the wait it asked for; None when drained.

        The interest is disarmed first, so what ``flush_write`` (or a queued
        callable) armed tells EAGAIN (wait for that direction) from a
        requeue (a queued producer re-pushed itself: just yield) - a stale
        ``EPOLLIN`` left by an earlier ``do_read`` must not be waited for.
        """
        self._ev &= _NOT_BOTH
        if self.flush_write():
            return None
        sock = self.sock
        if sock is None:
            return None
        direction = self._ev & _BOTH
        # Only the waits are guarded: close() from elsewhere ends them with
        # ClosedResourceError, while the same error raised by a queued
        # callable is the step's own and follows the error policy.
        try:
            if direction & _OUT:
                await backend.wait_writable(sock)
            elif direction & _IN and not (_tls.is_tls(sock) and sock.pending()):
                await backend.wait_readable(sock)
            else:
                await backend.checkpoint()
        except backend.closed_errors:
            return None  # closed by someone else while waiting
        return direction

    def to_stream(self) -> DSStream:
        """Hand this connection to stream-based code as an anyio ``ByteStream``.

        The object stays registered (graceful shutdown and ``busy()`` still
        see it) and keeps its write queue; from now on the stream's caller
        drives it and its ``event_step`` is no longer called.
        """
        from ._streams import DSStream

        return DSStream(self)

    def _ds_sendfile_ok(self) -> bool:
        sock = self.sock
        return (
            not self._ds_no_sendfile
            and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
        )

    def _ds_msg_more_ok(self) -> bool:
        # send(MSG_MORE) on a pipe fails (ENOTSOCK) and the seed then
        # writes: go straight to write.
        return self._ds_is_socket and not isinstance(self.sock, ssl.SSLSocket)

    # ------------------------------------------------------------------
    # Idle expiry
    # ------------------------------------------------------------------

    def _exptime(self) -> float:
        # The loop's setting is the most specific one: it overrides every
        # class's EXPTIME (as the seed's process-wide $EXPTIME did).
        override = self._ds_state.exptime
        return float(override if override is not None else type(self).EXPTIME)

    def update_idle_time(self) -> bool:
        """Mark activity now; arms the idle check (``later(expire_old)``).

        Returns:
            True, or False if the object is closed (IMAP's keep-alive tick
            relies on that).
        """
        if self.sock is None:
            return False
        state = self._ds_state
        state.idle.touch(self, self._exptime(), state.timers.clock())
        if not state.exp_armed:
            from ._later import expire_old, later

            later(expire_old)
            state.exp_armed = True
        return True

    def not_idle_long(self, now: float) -> bool:
        """True if the object was active less than ``EXPTIME`` before ``now``.

        False when closed or never tracked.  Protocols use it in ``busy()``
        so that graceful shutdown gives a recently active client time to
        finish (NNTP and IMAP do).
        """
        if self.sock is None:
            return False
        exptime = self._exptime()
        idle_at = self._ds_state.idle.idle_since(self, exptime)
        return idle_at is not None and idle_at + exptime > now

    def close(self) -> bool:
        """Close the object (idempotent); queued output is discarded.

        The object leaves the poller at once and its task ends, but its fd
        stays open and in the descriptor map until the current round ends:
        the seed defers the real close so the fd number cannot be reused by
        a connection accepted later in the same round.  No ``shutdown(2)``.

        Returns:
            False, always (the seed returns 0): callers write
            ``return self.close()`` on error paths.
        """
        sock = self.sock
        if sock is None:
            return False
        self.sock = None
        # Dropping the queue also breaks self-referential closures queued
        # in it (a queued "close me" callback holding the object); its
        # spill files are closed now, not whenever the GC gets to them.
        wbuf, self.wbuf = self.wbuf, None
        self._ds_wmem = 0
        _wbuf.discard(wbuf)
        timer = self._ds_shutdown_timer
        if timer is not None:
            self._ds_shutdown_timer = None
            timer.cancel()
        state = self._ds_state
        if state.idle.groups:
            state.idle.forget(self)
        self._interrupt()  # ends a parked task; notify_closing ends a waiting one
        state.schedule_close(self, sock)
        return False

    def drop(self, *message: object) -> bool:
        """Log ``message`` as a warning and close (the seed's ``drop``).

        For errors that need an operator's attention (ENOSPC, EMFILE, ...).
        """
        log.warning("%r dropped: %s", self, " ".join(str(part) for part in message))
        return self.close()

    def shutdn(self) -> bool | None:
        """Shut the connection down (the seed's ``shutdn``).

        Plain sockets are closed.  Over TLS the shutdown step runs first
        (close_notify, then close), ahead of anything queued, bounded by
        ``TLS_SHUTDOWN_TIMEOUT``.  No ``shutdown(2)``: nothing shares the fd.

        Returns:
            None if already closed, else what :meth:`close` or
            :meth:`shutdn_tls_step` returns.
        """
        sock = self.sock
        if sock is None:
            return None
        if _tls.is_tls(sock):
            result = self.shutdn_tls_step()
            if self.sock is not None and self._ds_shutdown_timer is None:
                # close_notify could not go out yet: bound the wait for a
                # peer that never reads.
                from ._loop import add_timer

                self._ds_shutdown_timer = add_timer(
                    self.TLS_SHUTDOWN_TIMEOUT, self.close
                )
            return result
        return self.close()

    # ------------------------------------------------------------------
    # The object's task
    # ------------------------------------------------------------------

    def _detach(self) -> None:
        """Forget the (ended) task: the object moves to another state."""
        self._scope = None
        self._wait_dir = _NO_SCOPE
        self._ds_running = False

    def _step_from_queue(self) -> None:
        """Run a requeued step (called by the driver, in FIFO order)."""
        state = cast("Loop", self._ds_state)
        if not self._ds_async_step:
            try:
                self.event_step()
            except Exception as exc:
                state.failed(exc, self, self)
            return
        if self._ds_running:
            # The object's own task runs async steps, one at a time.
            self._steps_due += 1
            self._interrupt()
        else:
            state.spawn_step(self.event_step, self)

    async def _run(self) -> None:
        state = cast("Loop", self._ds_state)
        _current.set(state)
        backend = state._require_backend()
        cancel_scope = backend.cancel_scope
        # Shared by every object of the loop: a parked task costs no more
        # than its frame and its scope.
        waits = backend.waits
        closed_errors = backend.closed_errors
        async_step = self._ds_async_step
        # Synchronous steps run from readiness callbacks (unless the loop
        # was started with callbacks=False).
        callback_loop = None if async_step else backend.callback_loop
        try:
            while True:
                sock = self.sock
                if sock is None or self._ds_external:
                    return
                if self._steps_due:
                    self._steps_due -= 1
                    await self._async_step()
                    if state.post_loop_callback is not None:
                        state.kick()
                    continue
                ev = self._ev
                direction = ev & _BOTH
                if (
                    callback_loop is not None
                    and direction != _BOTH
                    and not _tls.is_tls(sock)
                ):
                    await self._park_with_callbacks(callback_loop)
                    continue
                wait: Callable[[Any], Awaitable[None]]
                if direction == _BOTH:
                    wait = self._wait_either
                elif direction == _IN and _tls.is_tls(sock):
                    wait = self._wait_readable_tls
                else:
                    wait = waits[direction]
                oneshot = ev & _ONESHOT
                disarmed = ev & _NOT_BOTH
                step_now = False
                with cancel_scope() as scope:
                    self._scope = scope
                    self._wait_dir = direction
                    # The fast path: wait, step, wait again in the same scope
                    # while the interest stays the same.  Anything that changes
                    # it (epwait, close, a requeued async step) cancels the
                    # scope or is seen below, and the outer loop starts over.
                    while True:
                        try:
                            await wait(sock)
                        except closed_errors:
                            # close() (notify_closing) ended the wait.  Only
                            # here: the same error from a step is the step's
                            # own and follows the loop's policy.
                            return
                        # A task woken by I/O may return normally even after
                        # close() or epwait() from elsewhere: re-check both.
                        if self.sock is not sock or self._ev != ev:
                            break
                        if oneshot:
                            self._ev = disarmed
                        if async_step:
                            step_now = True
                            break
                        self.event_step()
                        if state.post_loop_callback is not None:
                            state.kick()
                        if self._ev != ev or self.sock is not sock:
                            break
                self._scope = None
                self._wait_dir = _NO_SCOPE
                if step_now:
                    await self._async_step()
                    if state.post_loop_callback is not None:
                        state.kick()
        except Exception as exc:
            state.failed(exc, self, self)
        finally:
            self._scope = None
            self._wait_dir = _NO_SCOPE
            self._ds_running = False

    # ------------------------------------------------------------------
    # Callback mode (synchronous event_step, every backend)
    #
    # A task woken per request costs a future, a task step and, through
    # anyio, an add_reader/remove_reader pair on asyncio: about four times
    # an asyncio Protocol; on trio a task switch and an epoll_ctl.  The
    # object's task parks for its lifetime instead while the fd stays
    # registered with the event loop (on trio: the loop's EpollReactor) and
    # readiness calls event_step directly.  The registration is kept across
    # steps while the interest stays the same (one-shot is applied to _ev,
    # and the registration dropped only if the step did not re-arm it), so
    # a request costs no epoll_ctl at all.  Async steps, TLS (decrypted
    # bytes never make the fd readable) and EPOLLIN|EPOLLOUT go back to
    # the task's waits.
    # ------------------------------------------------------------------

    async def _park_with_callbacks(self, aio_loop: Reactor) -> None:
        fut = aio_loop.create_future()
        self._ds_cb_fut = fut
        self._ds_cb = aio_loop
        self._wait_dir = 0
        try:
            self._cb_arm()
            if not fut.done():
                await fut
        finally:
            self._cb_release()

    def _cb_arm(self) -> None:
        """Make the registration match the armed interest, or hand back to the task."""
        aio_loop = self._ds_cb
        assert aio_loop is not None
        sock = self.sock
        want = self._ev & _BOTH
        if sock is None or self._ds_external or want == _BOTH or _tls.is_tls(sock):
            self._cb_release()
            return
        have = self._wait_dir
        if have == want:
            return
        fd = self._fd
        if have and want and type(aio_loop) is EpollReactor:
            aio_loop.switch(fd, self._cb_ready, want == _IN)
            self._wait_dir = want
            return
        self._cb_unregister(aio_loop)
        if want == _IN:
            aio_loop.add_reader(fd, self._cb_ready)
        elif want == _OUT:
            aio_loop.add_writer(fd, self._cb_ready)
        self._wait_dir = want

    def _cb_unregister(self, aio_loop: Reactor) -> None:
        have = self._wait_dir
        if have == _IN:
            aio_loop.remove_reader(self._fd)
        elif have == _OUT:
            aio_loop.remove_writer(self._fd)
        self._wait_dir = 0

    def _cb_release(self) -> None:
        """Leave callback mode: unregister and wake the parked task."""
        aio_loop = self._ds_cb
        if aio_loop is None:
            return
        # Unregister before the fd can be closed: uvloop aborts the process
        # on an fd closed under a registered watcher.
        self._cb_unregister(aio_loop)
        self._ds_cb = None
        self._wait_dir = _NO_SCOPE
        fut, self._ds_cb_fut = self._ds_cb_fut, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _cb_ready(self) -> None:
        """The fd is ready: one ``event_step``, called by the event loop."""
        state: Loop = self._ds_state  # type: ignore[assignment]
        sock = self.sock
        if sock is None or state._finished:
            self._cb_release()
            return
        if _current.get(None) is not state:
            # The handle runs in the context add_reader captured, which may
            # be another task's (epwait called from elsewhere).
            _current.set(state)
        # Compared before masked: EPOLLONESHOT is 1 << 30, a two-digit int
        # whose bitwise operations take CPython's slow path and allocate.
        ev = self._ev
        if ev == _IN_ONESHOT:
            self._ev = _ONESHOT
        elif ev & _ONESHOT:
            self._ev = ev & _NOT_BOTH
        self._ds_in_cb = True
        try:
            self.event_step()
        except Exception as exc:
            self._ds_in_cb = False
            state.failed(exc, self, self)
        finally:
            self._ds_in_cb = False
            self._ds_drained = False
        if state.post_loop_callback is not None:
            state.kick()
        ev = self._ev
        if (
            self.sock is not sock
            or (_IN if ev == _IN_ONESHOT else ev & _BOTH) != self._wait_dir
            or self._ds_external
        ) and self._ds_cb is not None:
            try:
                self._cb_arm()
            except Exception as exc:
                # The kernel refused the new interest (an fd closed behind
                # the object's back: EBADF): the loop's policy decides, as
                # for the step itself, instead of the event loop's handler
                # (asyncio) or the end of every object (trio's epoll set).
                state.failed(exc, self, self)

    async def _async_step(self) -> None:
        # drained() checks this: only the object's own step may await it.
        self._ds_stepping = True
        try:
            await self.event_step()
        finally:
            self._ds_stepping = False

    async def _wait_readable_tls(self, sock: Any) -> None:
        # Decrypted bytes already in OpenSSL's buffer never make the fd
        # readable: step at once instead of waiting for them.
        backend = cast("Loop", self._ds_state)._require_backend()
        if sock.pending():
            await backend.checkpoint()
        else:
            await backend.wait_readable(sock)

    async def _wait_either(self, sock: Any) -> None:
        """Wait until ``sock`` is readable or writable (``EPOLLIN|EPOLLOUT``).

        Neither trio nor anyio can wait for either direction in one call, so
        this rare interest costs a small task group per wait.
        """
        backend = cast("Loop", self._ds_state)._require_backend()
        if _tls.is_tls(sock) and sock.pending():
            await backend.checkpoint()  # decrypted bytes wait: readable now
            return
        async with anyio.create_task_group() as tg:

            async def wait(fn: Any) -> None:
                try:
                    await fn(sock)
                except backend.closed_errors:
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(wait, backend.wait_writable)
            await wait(backend.wait_readable)
