"""The loop: a task group, the registry, the run queue, rounds and the post-loop hook.

The seed keeps all of this in module globals of one process-wide loop.  Here
it lives in a :class:`Loop` (one per ``async with ds_trio.loop()``), found
through a ContextVar by the module-level legacy functions; outside a running
loop those functions act on a per-thread *pending* state that the next loop
started in that thread adopts ("create objects and timers, then EventLoop").

Rounds
------
The seed's loop is one thread doing, per iteration: the run queue
(``next_tick``), due timers, ``epoll_wait``, ``event_step`` for each ready
fd, deferred closes, the post-loop callback.  Here each DS object is a task
that waits for its own fd and calls its own ``event_step``, and one
*driver* task plays the rest of the iteration:

1. run the requeued items queued before this round (FIFO);
2. run the due timers (deadline order, ties in insertion order);
3. idle, unless anything ran or is queued, until a DS task reports activity,
   work is queued, the next timer is due, or - while a post-loop callback is
   set - the loop timeout passes;
4. let the scheduler run every task already woken by the kernel (the I/O
   phase: ``settle_passes`` scheduler passes, see ``_backend``);
5. release deferred closes, then call the post-loop callback.

The driver only runs when there is something for it to do: a DS object
that wakes, steps and re-arms costs no driver wake-up unless a post-loop
callback is set or it closed or requeued something.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import math
import numbers
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeAlias

import anyio
import anyio.abc

from . import _reactor
from ._backend import Backend, CancelScopeLike, current_backend
from ._errors import DSError, NotInLoopError
from ._idle import IdleTracker
from ._reaper import Reaper, reap_in_background
from ._timers import Timer, TimerQueue, check_delay

if TYPE_CHECKING:
    from ._ds import DS
    from ._reactor import EpollReactor

__all__ = [
    "DescriptorMap",
    "EventLoop",
    "Loop",
    "LoopStatistics",
    "Reset",
    "SetLoopTimeout",
    "SetPostLoopCallback",
    "add_timer",
    "current_loop",
    "in_loop",
    "loop",
    "now",
    "requeue",
]

log = logging.getLogger("ds_trio.loop")

ErrorPolicy: TypeAlias = Literal["raise", "log"]
PostLoopCallback: TypeAlias = Callable[[dict[int, "DS"]], object]
#: ``{signum: handler}``; handlers are called as ``handler(signum)``.
SignalHandlers: TypeAlias = (
    Mapping[signal.Signals, Callable[[int], object]]
    | Mapping[int, Callable[[int], object]]
)

_ERROR_POLICIES: Final = ("raise", "log")

_current: contextvars.ContextVar[Loop | None] = contextvars.ContextVar(
    "ds_trio.current_loop", default=None
)


class _Thread(threading.local):
    pending: _State | None = None

    def __init__(self) -> None:
        #: Loops running in this thread, innermost last.
        self.running: list[Loop] = []


_thread = _Thread()


def _check_policy(errors: object) -> ErrorPolicy:
    if errors not in _ERROR_POLICIES:
        raise ValueError(f"errors must be 'raise' or 'log', not {errors!r}")
    return errors


class _State:
    """What the seed keeps in its module globals.

    The pending state (no loop running) and every :class:`Loop` share this
    shape, so adoption moves fields and nothing is implemented twice.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        #: fd number -> DS object; ``%DescriptorMap``.
        self.descriptor_map: dict[int, DS] = {}
        #: Requeued objects and callables; ``$nextq``.
        self.runq: list[Any] = []
        #: Closed objects whose fd is released at the end of the round;
        #: ``$ToClose``.
        self.to_close: list[tuple[DS, Any]] = []
        self.timers = TimerQueue(clock)
        self.post_loop_callback: PostLoopCallback | None = None
        #: Milliseconds, as the seed's ``$LoopTimeout``; negative: no bound.
        self.loop_timeout: float = -1
        #: Bytes written to spill files so far.
        self.spilled_bytes = 0
        #: ``later`` callbacks of the current batch and the batch's timer.
        self.later_queue: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
        self.later_timer: Timer | None = None
        #: Idle tracking (``update_idle_time``); ``exp_armed`` is the seed's
        #: ``$exp_timer`` guard: an ``expire_old`` is queued with ``later``.
        self.idle = IdleTracker()
        self.exp_armed = False
        #: Overrides ``DS.EXPTIME`` for every object of this loop when set.
        self.exptime: float | None = None
        #: Named timers of ``add_uniq_timer``.
        self.uniq_timers: dict[object, Timer] = {}
        #: Children awaited with ``dwaitpid``/``awaitpid``: pid -> callback
        #: (of the pending state: for the next loop to watch).
        self.children: dict[int, Callable[[], object]] = {}

    # Hooks the running loop overrides; the pending state has nobody to wake.
    def kick(self) -> None:
        """Tell the driver there is work (no-op when no loop runs)."""

    def spawn(self, obj: DS) -> None:
        """Start the task of a newly registered object (no-op when pending)."""

    def schedule_close(self, obj: DS, sock: Any) -> None:
        """Queue a closed object's socket for release at the end of the round."""
        self.to_close.append((obj, sock))

    def register(self, obj: DS, fd: int) -> None:
        from ._errors import AlreadyRegisteredError

        other = self.descriptor_map.get(fd)
        if other is not None:
            raise AlreadyRegisteredError(
                f"fd {fd} is already registered to {other!r}; close it first"
            )
        self.descriptor_map[fd] = obj
        obj._ds_state = self
        self.spawn(obj)

    def release_closed(self, notify: Callable[[Any], None] | None = None) -> None:
        """Drop closed objects from the registry and close their fds.

        Deferred to the end of the round because the seed's loop could still
        hold events for the fd in the batch it was dispatching, and a new
        connection accepted later in the batch could otherwise get the same
        fd number.  Each fd goes through "notify_closing, close" with no
        checkpoint between, so no waiter can be left on a reused number.
        """
        while self.to_close:
            batch, self.to_close = self.to_close, []
            descriptor_map = self.descriptor_map
            for obj, sock in batch:
                fd = obj._fd
                if descriptor_map.get(fd) is obj:
                    del descriptor_map[fd]
                if notify is not None:
                    try:
                        notify(sock)
                    except Exception:  # a socket closed behind our back
                        log.debug("notify_closing failed for fd %d", fd, exc_info=True)
                try:
                    sock.close()
                except OSError:
                    log.warning("closing fd %d failed", fd, exc_info=True)

    def adopt(self, other: _State) -> None:
        """Take over everything ``other`` holds (its clock may differ)."""
        for fd, obj in other.descriptor_map.items():
            self.register(obj, fd)
        other.descriptor_map = {}
        self.runq.extend(other.runq)
        other.runq = []
        self.to_close.extend(other.to_close)
        other.to_close = []
        self.timers.adopt(other.timers)
        if other.post_loop_callback is not None:
            self.post_loop_callback = other.post_loop_callback
            other.post_loop_callback = None
        if other.loop_timeout >= 0:
            self.loop_timeout = other.loop_timeout
            other.loop_timeout = -1
        self.spilled_bytes += other.spilled_bytes
        other.spilled_bytes = 0
        self.later_queue.extend(other.later_queue)
        other.later_queue = []
        if other.later_timer is not None and other.later_timer.active:
            self.later_timer = other.later_timer  # moved with the timers
        other.later_timer = None
        self.idle.adopt(other.idle, self.timers.clock() - other.timers.clock())
        self.exp_armed = self.exp_armed or other.exp_armed
        other.exp_armed = False
        if other.exptime is not None:
            self.exptime = other.exptime
            other.exptime = None
        self.uniq_timers.update(
            (name, t) for name, t in other.uniq_timers.items() if t.active
        )
        other.uniq_timers = {}
        children, other.children = other.children, {}
        for pid, callback in children.items():
            self.watch_child(pid, callback)
        if self.runq or self.to_close:
            self.kick()

    def watch_child(self, pid: int, callback: Callable[[], object]) -> None:
        """Await child ``pid``; the pending state just remembers it."""
        self.children[pid] = callback

    def run_later(self) -> None:
        """Run the current ``later`` batch (the seed's ``_run_later``)."""
        batch, self.later_queue = self.later_queue, []
        timer, self.later_timer = self.later_timer, None
        if timer is not None:
            timer.cancel()
        for callback, args in batch:
            if self._is_finished():
                # A callback ended the loop (errors="raise"): the seed's
                # ``die`` left the rest of the batch unrun.
                break
            self.call(callback, args)

    def _is_finished(self) -> bool:
        """True once a running loop has finished; never for the pending state."""
        return False

    def call(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Call a loop callback; the pending state has no error policy."""
        callback(*args)

    def reset(self) -> None:
        """Forget everything: close registered objects, drop timers and queues.

        A ``close`` override may queue work, arm timers or register new
        objects while it runs, so this repeats until a pass finds nothing
        left (upstream ``c882fd47``).
        """
        tried: set[int] = set()  # a failing close() is not retried forever
        while True:
            self.runq = []
            self.timers.cancel_all()
            self.later_queue = []
            self.later_timer = None
            self.idle.clear()
            self.exp_armed = False
            self.exptime = None
            self.uniq_timers = {}
            self.forget_children()
            live = [
                obj
                for obj in self.descriptor_map.values()
                if obj.sock is not None and id(obj) not in tried
            ]
            if not live:
                break
            for obj in live:
                tried.add(id(obj))
                try:
                    obj.close()
                except Exception:
                    log.exception("close() of %r failed during Reset", obj)
        self.post_loop_callback = None
        self.loop_timeout = -1
        self.kick()

    def forget_children(self) -> None:
        """Stop awaiting children; reap them in the background (no zombies)."""
        pids = list(self.children)
        self.children = {}
        if pids:
            reap_in_background(pids)


def _pending() -> _State:
    state = _thread.pending
    if state is None:
        # The backend clock does not exist before a loop runs; pending timers
        # count on the monotonic clock and are shifted onto the backend's
        # clock when a loop adopts them.
        state = _thread.pending = _State(time.monotonic)
    return state


def _state() -> _State:
    current = _current.get()
    if current is not None:
        return current
    # Outside any loop's context - a task of the application's own task
    # group, an anyio server's handler - while exactly one loop runs in this
    # thread: join it, rather than a pending state no loop would adopt.
    running = _thread.running
    if len(running) == 1:
        return running[0]
    return _pending()


def current_loop() -> Loop:
    """The innermost running loop of this task.

    Raises:
        NotInLoopError: no ``ds_trio.loop()`` is running in this context.
    """
    current = _current.get()
    if current is None:
        raise NotInLoopError("no ds_trio loop is running in this context")
    return current


@dataclass(frozen=True, slots=True)
class LoopStatistics:
    """A snapshot of a loop's bookkeeping, from :meth:`Loop.statistics`."""

    #: Objects in the descriptor map (closed ones stay until the round ends).
    registered: int
    #: Live timers.
    timers_pending: int
    #: Items waiting in the run queue.
    queued: int
    #: Closed objects whose fd is not released yet.
    pending_closes: int
    #: Completed rounds.
    rounds: int
    #: Bytes written to spill files so far (output the sockets did not take).
    bytes_spilled: int


class Loop(_State):
    """A running DS loop; create it with :func:`ds_trio.loop`.

    Use it as ``async with ds_trio.loop() as loop:``.  The block's body runs
    beside the loop; leaving the block waits until the loop is finished, then
    closes everything still registered.  The loop is finished when the
    post-loop callback returns false, when :meth:`stop` is called, or - with
    no post-loop callback - when nothing is left that could ever run: no
    registered object, no timer, no queued work, no close pending, no child
    awaited, and the body has returned.
    If the loop finishes while the body still runs, the body is cancelled;
    cancelling the scope around the block ends the loop.
    """

    def __init__(
        self,
        *,
        errors: ErrorPolicy = "raise",
        signals: SignalHandlers | None = None,
        exptime: float | None = None,
        callbacks: bool | None = None,
        _keep_state: bool = False,
    ):
        self.errors: ErrorPolicy = _check_policy(errors)
        self._callbacks = _check_callbacks(callbacks)
        # trio: the loop's own epoll set for callback mode (see _reactor).
        self._reactor: EpollReactor | None = None
        self._signal_handlers = _check_signals(signals)
        self._signal_receiver: Any = None
        self._previous_signal_handlers: dict[int, Any] = {}
        self._sigchld_emulated: Callable[[int], object] | None = None
        self._keep_state = _keep_state
        self._backend: Backend | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._token: contextvars.Token[Loop | None] | None = None
        self._idle_scope: CancelScopeLike | None = None
        self._kicked = False
        # Set by the signal dispatcher for each signal it queues; the driver
        # lets it take every pending one before running the queue.
        self._signals_arriving = False
        self._body_done = False
        self._started = False
        self._finished = False
        self._stop_requested = False
        self._quitting = False
        self._failures: list[BaseException] = []
        self._rounds = 0
        self._reaper = Reaper(self)
        # asyncio: DS objects' tasks (see spawn()); None when not in use.
        self._object_tasks: set[asyncio.Task[None]] | None = None
        # The clock is bound when the loop starts; nothing can add timers to
        # a Loop before that (outside it they go to the pending state).
        super().__init__(_unstarted_clock)
        if exptime is not None:
            self.exptime = check_delay(exptime)
        self.timers.on_new_head = self._timer_head_moved
        self.timers.on_empty = self.kick

    # ------------------------------------------------------------------
    # Public surface
    # ------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"trio"``, ``"asyncio"`` or ``"uvloop"``."""
        return self._require_backend().name

    def now(self) -> float:
        """The backend's clock (``trio.current_time()``/``anyio.current_time()``)."""
        return self._require_backend().current_time()

    def stop(self) -> None:
        """Finish the loop at the end of the current round."""
        self._stop_requested = True
        self.kick()

    def statistics(self) -> LoopStatistics:
        """Counts for operators and tests; cheap, never blocks."""
        return LoopStatistics(
            registered=len(self.descriptor_map),
            timers_pending=len(self.timers),
            queued=len(self.runq),
            pending_closes=len(self.to_close),
            rounds=self._rounds,
            bytes_spilled=self.spilled_bytes,
        )

    # ------------------------------------------------------------------
    # async with
    # ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise DSError("a ds_trio loop can only be entered once")
        self._started = True
        backend = current_backend()
        if not self._callbacks:
            backend = dataclasses.replace(backend, callback_loop=None)
        elif (
            backend.callback_loop is None
            and backend.name == "trio"
            and _reactor.available()
        ):
            self._reactor = _reactor.EpollReactor()
            backend = dataclasses.replace(backend, callback_loop=self._reactor)
        self._backend = backend
        self.timers.clock = backend.current_time
        # tempfile probes directories (open + unlink) on its first call:
        # under EMFILE that fails as "No usable temporary directory", hiding
        # the real error of the first spill.  Settle it while fds are free.
        tempfile.gettempdir()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._token = _current.set(self)
        _thread.running.append(self)
        try:
            # Handlers go in before anything can checkpoint, so a signal
            # arriving while the loop starts is queued, not lost.
            self._install_signal_handlers(backend)
            if self._reactor is not None:
                tg.start_soon(self._reactor.run, name="ds_trio epoll set")
            elif backend.callback_loop is not None:
                self._object_tasks = set()
                tg.start_soon(self._own_object_tasks, name="ds_trio object tasks")
            self.adopt(_pending())
            tg.start_soon(self._driver, name=f"ds_trio driver {id(self):#x}")
        except BaseException:
            _current.reset(self._token)
            _thread.running.remove(self)
            self._remove_signal_handlers()
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        return self

    # ------------------------------------------------------------------
    # Signals
    # ------------------------------------------------------------------

    def _install_signal_handlers(self, backend: Backend) -> None:
        handlers = dict(self._signal_handlers)
        if not handlers:
            return
        if backend.name == "uvloop" and signal.SIGCHLD in handlers:
            # uvloop keeps SIGCHLD for itself (it refuses the handler); the
            # loop calls the handler after each registered child it reaps.
            self._sigchld_emulated = handlers.pop(signal.SIGCHLD)
        if not handlers:
            return
        # asyncio's remove_signal_handler() leaves SIG_DFL behind, not what
        # was there before: remember the previous handlers to restore them.
        self._previous_signal_handlers = {
            signum: signal.getsignal(signum) for signum in handlers
        }
        receiver = anyio.open_signal_receiver(*map(signal.Signals, handlers))
        signals = receiver.__enter__()
        self._signal_receiver = receiver
        if backend.name != "trio":
            _quiet_wakeup_fd()
        assert self._tg is not None
        self._tg.start_soon(self._dispatch_signals, signals, handlers)

    async def _dispatch_signals(
        self, signals: Any, handlers: dict[int, Callable[[int], object]]
    ) -> None:
        # Handlers run as ordinary loop callbacks from the run queue, never
        # inside a signal handler frame; all signals received before the
        # next round are handled in it.
        async for signum in signals:
            self.requeue_call(self.call, (handlers[signum], (signum,)))
            self._signals_arriving = True

    def _remove_signal_handlers(self) -> None:
        receiver, self._signal_receiver = self._signal_receiver, None
        if receiver is not None:
            receiver.__exit__(None, None, None)
        previous, self._previous_signal_handlers = self._previous_signal_handlers, {}
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        assert self._backend is not None
        tg = self._tg
        self._body_done = True
        body_exc = exc
        if exc is None:
            # The body returned: wait for the loop to finish.  The driver
            # ends it by cancelling the task group, which ends this sleep.
            # EventLoop() has no body: with a post-loop callback set, its
            # first round idles as the seed's first epoll_wait does, so the
            # single-step idiom (a callback returning false) waits for
            # something to happen instead of returning at once.
            if not (self._keep_state and self.post_loop_callback is not None):
                self.kick()
            try:
                await self._backend.sleep_forever()
            except BaseException as waited:
                exc_type, exc, tb = type(waited), waited, waited.__traceback__
        if not self._finished:
            # The body failed or the enclosing scope was cancelled.
            tg.cancel_scope.cancel()
        raised: BaseException | None
        try:
            suppressed = await tg.__aexit__(exc_type, exc, tb)
        except BaseException as group:
            raised = group
        else:
            raised = None if suppressed else exc
        finally:
            if self in _thread.running:
                _thread.running.remove(self)
            self._teardown(clean=raised is None and not self._failures)
            if self._token is not None:
                _current.reset(self._token)
                self._token = None
        failures = self._failures
        if raised is None:
            if not failures:
                return True
            if len(failures) == 1:
                raise failures[0]
            raise BaseExceptionGroup("ds_trio loop failed", failures)
        # Strip only the group our own task group wrapped around what the
        # body raised: the body's own exception groups come out as raised.
        unwrapped = _strip_task_group(raised, exc)
        if failures:
            raise BaseExceptionGroup("ds_trio loop failed", [unwrapped, *failures])
        if body_exc is not None and unwrapped is body_exc:
            return False  # re-raises the body's exception, traceback intact
        # Also a cancellation that arrived while waiting for the loop to
        # finish: returning False would swallow it, as nothing was raised
        # into this __aexit__.
        raise unwrapped

    def _teardown(self, *, clean: bool) -> None:
        self._remove_signal_handlers()
        try:
            self._teardown_state(clean=clean)
        finally:
            if self._reactor is not None:
                self._reactor.close()

    def _teardown_state(self, *, clean: bool) -> None:
        """Close everything still registered, after every task has ended.

        ``EventLoop()`` ending normally keeps its state instead (the seed's
        loop state outlives ``EventLoop`` until ``Reset``), so a ported test
        can single-step the loop by calling it again.
        """
        backend = self._backend
        notify = backend.notify_closing if backend is not None else None
        self._idle_scope = None
        if self._keep_state and clean:
            pending = _pending()
            for obj in self.descriptor_map.values():
                obj._detach()
            self.children = self._reaper.close(hand_over=True)
            pending.adopt(self)
            self.post_loop_callback = None
            return
        self._reaper.close(hand_over=False)
        self.runq = []
        self.later_queue = []
        self.idle.clear()
        self.timers.cancel_all()
        for obj in list(self.descriptor_map.values()):
            obj._detach()
            try:
                obj.close()
            except Exception:
                log.exception("close() of %r failed while ending the loop", obj)
        self.release_closed(notify)
        self.descriptor_map.clear()

    # ------------------------------------------------------------------
    # Hooks used by DS objects and the module-level functions
    # ------------------------------------------------------------------

    def kick(self) -> None:
        self._kicked = True
        scope = self._idle_scope
        if scope is not None:
            self._idle_scope = None
            scope.cancel()

    def spawn(self, obj: DS) -> None:
        tg = self._tg
        if tg is None or self._finished:
            return
        tasks = self._object_tasks
        if tasks is not None:
            # asyncio: a plain task owned by this loop (_own_object_tasks
            # cancels and awaits it).  anyio's task group adds an Event, a
            # CancelScope and two sets per task: 2 KiB of a 10k-connection
            # server's memory per idle connection.
            task = asyncio.get_running_loop().create_task(obj._run())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            tg.start_soon(obj._run, name=f"ds_trio {type(obj).__name__} fd={obj._fd}")
        obj._ds_running = True

    async def _own_object_tasks(self) -> None:
        """The supervisor of the asyncio object tasks: their nursery's exit.

        Runs until the loop's task group is cancelled, then cancels every
        object task and waits for all of them (each unregisters its fd)
        before the loop's teardown closes the sockets.
        """
        tasks = self._object_tasks
        assert tasks is not None
        try:
            await anyio.sleep_forever()
        finally:
            self._object_tasks = None  # spawn() starts no more
            with anyio.CancelScope(shield=True):
                while tasks:
                    for task in tasks:
                        task.cancel()
                    await asyncio.wait(list(tasks))

    def spawn_step(self, fn: Callable[[], Any], what: object) -> None:
        """Run an async step (requeued coroutine function) in its own task."""
        self._spawn_supervised(fn, (), what)

    def spawn_task(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start a supervisor task (a reaper wait) in the loop's task group."""
        self._spawn_supervised(fn, args, fn)

    def _spawn_supervised(
        self, fn: Callable[..., Any], args: tuple[Any, ...], what: object
    ) -> None:
        if self._tg is not None and not self._finished:
            self._tg.start_soon(self._run_supervised, fn, args, what)

    async def _run_supervised(
        self, fn: Callable[..., Any], args: tuple[Any, ...], what: object
    ) -> None:
        # Tasks the loop starts see it as current, and their errors follow
        # its policy (an async DS step's error closes that object).
        _current.set(self)
        try:
            await fn(*args)
        except Exception as exc:
            self.failed(exc, what, what if _is_ds(what) else None)  # type: ignore[arg-type]

    def forget_children(self) -> None:
        # Reset inside a running loop: the pidfd tasks still reap their
        # children (no zombie), but no callback runs any more.
        self.children = {}

    def requeue_call(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        """Run ``fn(*args)`` from the run queue in the next round."""
        self.runq.append(functools.partial(fn, *args))
        self.kick()

    def watch_child(self, pid: int, callback: Callable[[], object]) -> None:
        try:
            self._reaper.watch(pid, callback)
        except ChildProcessError:
            # Handed over from a finished loop and reaped since: nothing to
            # report its status with any more.
            log.warning("child %d vanished before this loop could await it", pid)

    def call(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception as exc:
            # The loop running the callback applies its policy.  Usually
            # that is this one; but a signal handler or reap callback this
            # loop queued can be run by the next EventLoop() (the run queue
            # is handed over), and a finished loop would lose the error.
            running = _current.get()
            (running if running is not None else self).failed(exc, callback)

    def schedule_close(self, obj: DS, sock: Any) -> None:
        backend = self._backend
        if backend is not None:
            # Wake a waiter on this fd at once (its task then ends) and take
            # the fd out of the poller, as the seed's EPOLL_CTL_DEL did; the
            # fd itself stays open until the round ends.
            try:
                backend.notify_closing(sock)
            except Exception:
                log.debug("notify_closing failed for fd %d", obj._fd, exc_info=True)
        self.to_close.append((obj, sock))
        self.kick()

    def _timer_head_moved(self, deadline: float) -> None:
        scope = self._idle_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    # ------------------------------------------------------------------
    # Errors
    # ------------------------------------------------------------------

    def policy_for(self, obj: object) -> ErrorPolicy:
        override = getattr(type(obj), "errors", None) if _is_ds(obj) else None
        if override is not None:
            return _check_policy(override)
        return self.errors

    def failed(self, exc: Exception, what: object, obj: DS | None = None) -> None:
        """Apply the error policy to an exception from user code.

        ``raise``: remember it and finish the loop; it propagates out of
        ``async with`` once everything is closed.  ``log``: log it with its
        traceback, close only the offending object, keep going.
        """
        if self.policy_for(obj) == "log":
            log.error(
                "%s raised; %s",
                what,
                "closing it" if obj else "continuing",
                exc_info=exc,
            )
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    log.exception("close() of %r failed", obj)
            return
        self._failures.append(exc)
        self._finish()

    # ------------------------------------------------------------------
    # The driver
    # ------------------------------------------------------------------

    def _require_backend(self) -> Backend:
        if self._backend is None:
            raise NotInLoopError("this ds_trio loop is not running")
        return self._backend

    def _is_finished(self) -> bool:
        # A method, not the attribute, where callbacks just ran: they may
        # have finished the loop behind the type checker's back.
        return self._finished

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            assert self._tg is not None
            self._tg.cancel_scope.cancel()

    def _run_queue(self) -> bool:
        """Run everything requeued before this round; True if anything ran."""
        queue = self.runq
        if not queue:
            return False
        self.runq = []
        for item in queue:
            if self._finished:
                # As in the seed, an exception ending the loop loses the
                # rest of the swapped-out queue.
                break
            if _is_ds(item):
                item._step_from_queue()
                continue
            step = getattr(item, "event_step", None)
            fn = step if step is not None else item
            try:
                result = fn()
            except Exception as exc:
                self.failed(exc, item)
                continue
            if _is_awaitable(result):
                self.spawn_step(_awaiter(result), item)
        return True

    def _run_timers(self) -> bool:
        timers = self.timers
        if not len(timers):
            return False
        ran = False
        for timer in timers.pop_due(timers.clock()):
            if self._finished:
                # The loop ended in this batch: drop the rest, as the seed
                # loses what an escaping exception skips.
                timer.cancel()
                continue
            try:
                ran = TimerQueue.fire(timer) or ran
            except Exception as exc:
                ran = True
                self.failed(exc, timer)
        return ran

    def _nothing_left(self) -> bool:
        return (
            self._body_done
            and not self.descriptor_map
            and not self.runq
            and not self.to_close
            and not len(self.timers)
            and not self.children
        )

    def _finish_normally(self) -> None:
        # The seed flushes pending ``later`` callbacks when its loop exits,
        # once, and not after a failure: a batch queued by that flush stays
        # pending, as does everything a ``die`` skipped.
        if self._finished:
            return
        if self.later_queue:
            self.run_later()
        self._finish()

    async def _idle(self, backend: Backend) -> None:
        deadline = self.timers.next_deadline()
        if self.post_loop_callback is not None and self.loop_timeout >= 0:
            deadline = min(deadline, backend.current_time() + self.loop_timeout / 1000)
        scope = backend.cancel_scope(deadline=deadline)
        with scope:
            self._idle_scope = scope
            await backend.sleep_forever()
        self._idle_scope = None

    async def _driver(self) -> None:
        backend = self._require_backend()
        while True:
            while self._signals_arriving:
                # The seed's daemons read every pending signal from the
                # signalfd in one wake-up and handled them all in that round
                # (t/sigfd.t: "TERM = 1, HUP = 3" after one iteration).  A
                # signal receiver hands over one signal per checkpoint, so
                # yield until the dispatcher has taken them all: twice, as
                # its turn may come after ours within one scheduling batch.
                self._signals_arriving = False
                await backend.checkpoint()
                await backend.checkpoint()
            ran = self._run_queue()
            ran = self._run_timers() or ran
            if self._finished:
                return
            if ran or self._kicked or self.runq or self.to_close:
                await backend.checkpoint()
            else:
                await self._idle(backend)
            # The I/O phase: tasks the kernel woke step before the round ends.
            if self.to_close or self.post_loop_callback is not None:
                for _ in range(backend.settle_passes):
                    await backend.checkpoint()
            self._kicked = False
            self.release_closed(backend.notify_closing)
            self._rounds += 1
            callback = self.post_loop_callback
            if callback is not None:
                try:
                    keep_going = callback(self.descriptor_map)
                except Exception as exc:
                    self.failed(exc, callback)
                    keep_going = True
                if not keep_going:
                    self._finish_normally()
            elif self._nothing_left():
                self._finish_normally()
            if self._stop_requested:
                self._finish_normally()
            if self._is_finished():
                return


def _check_signals(
    signals: SignalHandlers | None,
) -> dict[int, Callable[[int], object]]:
    if signals is None:
        return {}
    valid = signal.valid_signals()
    checked = {}
    for signum, handler in signals.items():
        if signum not in valid:
            raise ValueError(f"{signum!r} is not a valid signal number")
        if not callable(handler):
            raise TypeError(f"handler for signal {signum} is not callable: {handler!r}")
        checked[int(signum)] = handler
    return checked


def _quiet_wakeup_fd() -> None:
    """Keep asyncio's signal wake-up fd, minus its warning when it is full.

    asyncio installs it with ``warn_on_full_buffer=True``: under a signal
    storm that outpaces one loop iteration, CPython prints "Exception
    ignored when trying to write to the signal wakeup fd" for every signal
    (thousands of lines; an error under ``-W error``).  A full buffer loses
    nothing - the bytes already queued wake the loop, and signals of one
    kind coalesce anyway - so, as trio does, don't warn.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


def _unstarted_clock() -> float:
    raise NotInLoopError("this ds_trio loop has not started")


def _is_ds(item: object) -> bool:
    return getattr(type(item), "_ds_is_ds", False) is True


def _is_awaitable(value: object) -> bool:
    return hasattr(value, "__await__")


def _awaiter(awaitable: Any) -> Callable[[], Any]:
    async def run() -> None:
        await awaitable

    return run


def _strip_task_group(
    raised: BaseException, body_exc: BaseException | None
) -> BaseException:
    """``body_exc`` if ``raised`` is just the task group's wrapping of it."""
    if raised is body_exc or not isinstance(raised, BaseExceptionGroup):
        return raised
    cancelled = anyio.get_cancelled_exc_class()
    members = [e for e in raised.exceptions if not isinstance(e, cancelled)]
    if body_exc is None or len(members) != 1:
        return raised
    # trio splits groups on the way out (to sort out Cancelled), so the
    # member may be a copy of the body's group: compare leaves by identity.
    if members[0] is body_exc or _leaves(members[0]) == _leaves(body_exc):
        return body_exc
    return raised


def _leaves(exc: BaseException) -> list[int]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [id(exc)]


# ----------------------------------------------------------------------
# The public constructor and the module-level DS functions
# ----------------------------------------------------------------------


def loop(
    *,
    errors: ErrorPolicy = "raise",
    signals: SignalHandlers | None = None,
    exptime: float | None = None,
    callbacks: bool | None = None,
) -> Loop:
    """Create a DS loop to run with ``async with``.

    Args:
        errors: ``"raise"`` (default): an exception escaping ``event_step``, a
            timer, a requeued callable or the post-loop callback ends the
            loop and propagates out of the ``async with`` block, unwrapped,
            after everything is closed.  ``"log"``: it is logged with its
            traceback under ``ds_trio.loop``, only the offending object is
            closed, and the loop goes on (what servers want).  A DS subclass
            may override the policy for its objects with a class attribute
            ``errors``.
        signals: ``{signum: handler}``: while the loop runs, each signal
            received calls ``handler(signum)`` from the run queue (never in a
            signal handler frame), as newer DS's ``event_loop($sig)``.  The
            handlers are installed before the loop can run anything and the
            previous ones restored when it ends.  On uvloop, which keeps
            SIGCHLD for itself, a SIGCHLD handler is called after each
            registered child is reaped instead.  Signal handlers can only be
            installed in the main thread.
        exptime: idle expiry in seconds for every object of this loop,
            overriding ``DS.EXPTIME`` and subclasses' values (the seed's
            ``$EXPTIME`` was process-wide).
        callbacks: True: objects with a synchronous ``event_step``
            on a plain socket or pipe are stepped from readiness callbacks,
            as the seed's ``epoll_wait`` loop does - asyncio's
            ``add_reader``/``add_writer``, and on trio the loop's own epoll
            set waited on as one fd - while their tasks stay parked.  False:
            every object waits in its own task with ``wait_readable`` /
            ``wait_writable`` (slower per request; each wake-up is then a
            task switch that trio's instruments and debuggers see).  None
            (default): the environment variable ``DS_TRIO_CALLBACKS``
            (``0`` or ``1``) decides, and True when it is unset.

    Raises:
        ValueError: ``errors`` is neither ``"raise"`` nor ``"log"``, a
            signal number is invalid, ``exptime`` is NaN or infinite, or
            ``DS_TRIO_CALLBACKS`` is set to neither ``0`` nor ``1``.
        TypeError: a signal handler is not callable, or ``callbacks`` is
            not a bool.
    """
    return Loop(errors=errors, signals=signals, exptime=exptime, callbacks=callbacks)


def _check_callbacks(callbacks: object) -> bool:
    if callbacks is None:
        setting = os.environ.get("DS_TRIO_CALLBACKS", "1").strip()
        if setting not in ("0", "1"):
            raise ValueError(f"DS_TRIO_CALLBACKS must be 0 or 1, not {setting!r}")
        return setting == "1"
    if not isinstance(callbacks, bool):
        raise TypeError(f"callbacks must be True, False or None, not {callbacks!r}")
    return callbacks


def in_loop() -> bool:
    """True inside a running ds_trio loop (the seed's ``in_loop``)."""
    return _current.get() is not None


def now() -> float:
    """The running loop's clock, in seconds (the seed's ``now``).

    Raises:
        NotInLoopError: outside a running loop, where no backend clock exists.
    """
    current = _current.get()
    if current is None:
        raise NotInLoopError("now() needs a running ds_trio loop")
    return current.now()


def add_timer(seconds: float, callback: Callable[..., object], *args: Any) -> Timer:
    """Call ``callback(*args)`` ``seconds`` from now, from the loop's driver.

    Outside a running loop the timer goes to this thread's pending state and
    keeps its deadline relative to this call when a loop adopts it.  Equal
    deadlines fire in insertion order.  A zero or negative delay makes the
    timer due at once: added before the round's timers run (before the loop,
    from a requeued item) it fires in this round, added later (from a timer
    or an ``event_step``) in the next.

    Returns:
        A :class:`Timer`; its ``cancel()`` cancels it.

    Raises:
        TypeError: ``callback`` is not callable, or ``seconds`` not a number.
        ValueError: ``seconds`` is NaN or infinite.
    """
    if not callable(callback):
        raise TypeError(f"timer callback must be callable, got {callback!r}")
    # Inlined for the common case (a finite float, inside a loop's context):
    # a million pending timers are inserted at one call each.
    if type(seconds) is not float or seconds - seconds != 0.0:
        seconds = check_delay(seconds)
    state: _State | None = _current.get()
    if state is None:
        state = _state()
    return state.timers.add(seconds, callback, args)


def requeue(item: Any) -> None:
    """Run ``item`` in the next round (the seed's ``requeue``).

    ``item`` is a DS object (its ``event_step`` runs), any object with an
    ``event_step`` method, or a callable (called with no arguments).  Items
    run in FIFO order before the round's timers; an item requeued while the
    queue runs waits for the next round.  Requeueing twice runs twice.

    Raises:
        TypeError: ``item`` has no ``event_step`` and is not callable.
    """
    state = getattr(item, "_ds_state", None)
    if state is None:
        if not callable(item) and not callable(getattr(item, "event_step", None)):
            raise TypeError(
                f"requeue() needs a DS object, an object with event_step() "
                f"or a callable, got {item!r}"
            )
        state = _state()
    state.runq.append(item)
    state.kick()


def DescriptorMap() -> dict[int, DS]:
    """The live fd -> object map of the running loop (or the pending state).

    The seed's ``%DescriptorMap``; closed objects stay in it until the end of
    the round in which they were closed.
    """
    return _state().descriptor_map


def SetPostLoopCallback(callback: PostLoopCallback | None) -> None:
    """Call ``callback(descriptor_map)`` after every round; false ends the loop.

    ``None`` clears it.  Outside a running loop it is stored for the next
    loop started in this thread.

    Raises:
        TypeError: ``callback`` is neither callable nor None.
    """
    if callback is not None and not callable(callback):
        raise TypeError(
            f"post-loop callback must be callable or None, got {callback!r}"
        )
    _state().post_loop_callback = callback


def SetLoopTimeout(milliseconds: float) -> float:
    """Bound how long the loop idles before the post-loop callback runs again.

    Milliseconds, as in the seed: ``-1`` (any negative) means no bound, ``0``
    means never idle.  Returns the value stored.

    Raises:
        TypeError: not a number.
        ValueError: NaN.
    """
    value: object = milliseconds  # typed float, but checked as any real
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"loop timeout must be a number of milliseconds, not {milliseconds!r}"
        )
    if math.isnan(milliseconds):
        raise ValueError("loop timeout must not be NaN")
    _state().loop_timeout = float(milliseconds)
    return milliseconds


def Reset() -> None:
    """Forget all DS state of this context (the seed's ``Reset``).

    Closes every registered object, cancels every timer, empties the run
    queue, clears the post-loop callback and sets the loop timeout back to
    -1.  Inside a running loop it acts on that loop (the seed did not
    support that; newer DS does); the closed fds are released at the end of
    the round.  Outside a loop it acts on this thread's pending state and
    releases the fds at once.
    """
    current = _current.get()
    if current is not None:
        current.reset()
        return
    pending = _pending()
    pending.reset()
    pending.release_closed()


def EventLoop(
    *,
    backend: str = "trio",
    backend_options: dict[str, Any] | None = None,
    signals: SignalHandlers | None = None,
) -> None:
    """Run a loop to completion, synchronously (the seed's ``EventLoop``).

    Adopts everything created before the call (objects, timers, queued
    work, the post-loop callback and the loop timeout), runs until the loop
    is finished (see :class:`Loop`), and - unlike ``async with
    ds_trio.loop()`` - leaves whatever is still registered, pending or set
    in this thread's state for the next ``EventLoop`` call, as the seed's
    globals outlive it until ``Reset``.  When it ends with an exception,
    everything is closed first, as with ``async with``.  ``backend`` is an
    anyio backend name (``"trio"`` or ``"asyncio"``; with
    ``backend_options={"use_uvloop": True}`` for uvloop).

    Raises:
        DSError: called from inside a running loop.
    """
    if in_loop():
        raise DSError("EventLoop() cannot run inside a running ds_trio loop")
    anyio.run(
        _event_loop_main, signals, backend=backend, backend_options=backend_options
    )


async def _event_loop_main(
    signals: SignalHandlers | None,
) -> None:
    async with Loop(signals=signals, _keep_state=True):
        pass
