"""The few async primitives the loop needs, bound once per loop to its backend.

On trio the loop calls ``trio.lowlevel`` directly: going through anyio's
trio backend costs about 30 % more per wake-up, and a DS object's wake-up is
the hot path.  On asyncio (and uvloop) anyio's functions are the portable
way to wait on a raw fd.  Everything else in ds_trio goes through this one
record, so no other part of the loop asks which backend is running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, Self

import anyio
import anyio.lowlevel
import sniffio
import trio

__all__ = ["Backend", "CancelScopeLike", "Reactor", "current_backend"]


class CancelScopeLike(Protocol):
    """What the loop needs of trio's and anyio's cancel scopes."""

    deadline: float

    def cancel(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> bool | None: ...


class Parked(Protocol):
    """How callback mode parks an object's task (an asyncio future's API)."""

    def done(self) -> bool: ...

    def set_result(self, result: None, /) -> None: ...

    def __await__(self) -> Generator[Any, None, Any]: ...


class Reactor(Protocol):
    """Readiness callbacks: the running asyncio loop, or trio's EpollReactor."""

    def create_future(self) -> Parked: ...

    def add_reader(self, fd: int, callback: Callable[[], object], /) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[], object], /) -> None: ...

    def remove_reader(self, fd: int, /) -> bool: ...

    def remove_writer(self, fd: int, /) -> bool: ...


@dataclass(frozen=True, slots=True)
class Backend:
    """Backend primitives, chosen when a loop starts."""

    name: str
    wait_readable: Callable[[Any], Awaitable[None]]
    wait_writable: Callable[[Any], Awaitable[None]]
    notify_closing: Callable[[Any], None]
    checkpoint: Callable[[], Awaitable[None]]
    current_time: Callable[[], float]
    sleep_forever: Callable[[], Awaitable[None]]
    #: ``trio.CancelScope`` or ``anyio.CancelScope`` (both fit CancelScopeLike).
    cancel_scope: Callable[..., Any]
    #: What a wait raises when another task closed the fd under it.
    closed_errors: tuple[type[BaseException], ...]
    #: Scheduler passes after which every task woken by the same poll has
    #: run its step (see docs/design: "what a round is").
    settle_passes: int
    #: Direction bits -> the wait for them (0: park until re-armed).
    waits: dict[int, Callable[[Any], Awaitable[None]]]
    #: Where readiness callbacks can run synchronous steps directly
    #: (``add_reader``/``add_writer``): the asyncio event loop, or on trio
    #: the loop's own EpollReactor (set when the loop starts); None: every
    #: object waits in its task.
    callback_loop: Reactor | None = None


_CLOSED = (trio.ClosedResourceError, anyio.ClosedResourceError)


def _park_with(
    sleep_forever: Callable[[], Awaitable[None]],
) -> Callable[[Any], Awaitable[None]]:
    async def park(_sock: Any) -> None:  # no interest armed: wait for epwait
        await sleep_forever()

    return park


def _waits(
    wait_readable: Callable[[Any], Awaitable[None]],
    wait_writable: Callable[[Any], Awaitable[None]],
    sleep_forever: Callable[[], Awaitable[None]],
) -> dict[int, Callable[[Any], Awaitable[None]]]:
    return {0: _park_with(sleep_forever), 0x001: wait_readable, 0x004: wait_writable}


def _trio_backend() -> Backend:
    return Backend(
        name="trio",
        wait_readable=trio.lowlevel.wait_readable,
        wait_writable=trio.lowlevel.wait_writable,
        notify_closing=trio.lowlevel.notify_closing,
        checkpoint=trio.lowlevel.checkpoint,
        # The run's clock, bound once: trio.current_time() looks the runner
        # up on every call (a third of a timer insert's cost).
        current_time=trio.lowlevel.current_clock().current_time,
        sleep_forever=trio.sleep_forever,
        cancel_scope=trio.CancelScope,
        closed_errors=_CLOSED,
        # A task woken by I/O joins the next batch; the driver's first
        # checkpoint puts it in that batch too (in random order), the second
        # puts it after the whole batch.
        settle_passes=2,
        waits=_waits(
            trio.lowlevel.wait_readable, trio.lowlevel.wait_writable, trio.sleep_forever
        ),
    )


async def _uvloop_wait_readable(obj: Any) -> None:
    # On uvloop a wait on an already-ready fd is not a cancel point (the
    # reader callback resolves the future before the cancel is delivered),
    # so a level-triggered object on a busy fd would ignore cancellation.
    await anyio.lowlevel.checkpoint_if_cancelled()
    await anyio.wait_readable(obj)


async def _uvloop_wait_writable(obj: Any) -> None:
    await anyio.lowlevel.checkpoint_if_cancelled()
    await anyio.wait_writable(obj)


def _asyncio_backend() -> Backend:
    loop_type = type(asyncio.get_running_loop())
    uvloop = loop_type.__module__.startswith("uvloop")
    wait_readable = _uvloop_wait_readable if uvloop else anyio.wait_readable
    wait_writable = _uvloop_wait_writable if uvloop else anyio.wait_writable
    return Backend(
        name="uvloop" if uvloop else "asyncio",
        wait_readable=wait_readable,
        wait_writable=wait_writable,
        notify_closing=anyio.notify_closing,
        checkpoint=anyio.lowlevel.checkpoint,
        # The event loop's clock, bound once (anyio.current_time() is three
        # calls deep); what anyio.current_time() returns.
        current_time=asyncio.get_running_loop().time,
        sleep_forever=anyio.sleep_forever,
        cancel_scope=anyio.CancelScope,
        closed_errors=_CLOSED,
        # asyncio needs one pass more than trio: the poll's reader callback
        # runs in one iteration and only schedules the waiting task's step
        # for the next.
        settle_passes=3,
        waits=_waits(wait_readable, wait_writable, anyio.sleep_forever),
        callback_loop=_callback_loop(),
    )


def _callback_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop if it supports ``add_reader`` (not Proactor)."""
    aio_loop = asyncio.get_running_loop()
    if isinstance(aio_loop, asyncio.BaseEventLoop) and not isinstance(
        aio_loop, asyncio.SelectorEventLoop
    ):
        return None  # e.g. the Proactor loop: no add_reader
    return aio_loop


def current_backend() -> Backend:
    """The primitives of the async library running in this thread."""
    library = sniffio.current_async_library()
    if library == "trio":
        return _trio_backend()
    if library == "asyncio":
        return _asyncio_backend()
    raise RuntimeError(f"ds_trio does not support the {library!r} async library")
