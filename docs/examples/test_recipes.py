"""The testing page's recipes, runnable as they are shown.

Run them with ``.venv/bin/python -m pytest docs/examples/test_recipes.py``.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable, Iterator

import anyio
import anyio.lowlevel
import pytest
import trio.testing

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT
from ds_trio.testing import assert_no_leaks, fill_socket, socketpair

pytestmark = pytest.mark.anyio

# --- conftest.py -------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(autouse=True)
def _clean_ds_state() -> Iterator[None]:
    """The pending state is per thread: start and end every test empty."""
    ds_trio.Reset()
    yield
    ds_trio.Reset()


# --- virtual time ------------------------------------------------------------

MOCK_CLOCK = pytest.mark.parametrize(
    "anyio_backend",
    [
        pytest.param(
            ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
            id="trio-mockclock",
        )
    ],
)


@MOCK_CLOCK
async def test_an_hour_of_timers_takes_no_time() -> None:
    fired: list[float] = []
    async with ds_trio.loop():
        start = ds_trio.now()
        ds_trio.add_timer(3600, lambda: fired.append(ds_trio.now() - start))
        ds_trio.add_timer(60, lambda: fired.append(ds_trio.now() - start))
    assert fired == [60, 3600]


@MOCK_CLOCK
async def test_loop_timeout_paces_the_post_loop_callback() -> None:
    times: list[float] = []

    def post(descriptor_map: dict[int, DS]) -> bool:
        times.append(ds_trio.now())
        return len(times) < 4

    ds_trio.SetLoopTimeout(250)  # milliseconds, as in Perl
    ds_trio.SetPostLoopCallback(post)
    async with ds_trio.loop():  # nothing registered: only the timeout wakes it
        pass
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([0.25, 0.25, 0.25])


# --- waiting for a DS object to react ----------------------------------------


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Yield to the scheduler until ``predicate()`` holds; never sleeps."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.lowlevel.checkpoint()


class Counter(DS):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.received = bytearray()

    def event_step(self) -> None:
        while self.do_read(self.received, 4096, len(self.received)):
            pass


async def test_object_reads_what_the_peer_sent() -> None:
    a, b = socketpair()
    with b:
        async with ds_trio.loop() as loop:
            obj = Counter(a)
            b.send(b"hello")
            # Not anyio.wait_all_tasks_blocked(): on asyncio it can return
            # before the selector has even polled the socket.
            await wait_for(lambda: obj.received == b"hello")
            loop.stop()


# --- leaks, EAGAIN -------------------------------------------------------------


class Writer(DS):
    """Writes until EAGAIN, then waits for writability."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLOUT | EPOLLONESHOT)
        self.blocked = 0

    def event_step(self) -> None:
        try:
            self.sock.send(b"more")
        except BlockingIOError:
            self.blocked += 1
            self.epwait(EPOLLOUT | EPOLLONESHOT)


async def test_full_socket_takes_the_eagain_path_and_nothing_leaks() -> None:
    async with assert_no_leaks():
        a, b = socketpair()
        with b:
            fill_socket(a)  # the next send on a raises BlockingIOError
            with anyio.move_on_after(0.2):
                async with ds_trio.loop():
                    writer = Writer(a)
                    writer.requeue()  # step once now, although not writable
            assert writer.blocked == 1
            assert writer.sock is None  # cancelling the loop closed it
            assert a.fileno() == -1


# --- errors --------------------------------------------------------------------


class Boom(Exception):
    pass


class Exploding(DS):
    def event_step(self) -> None:
        raise Boom(self.sock.fileno())


async def test_one_failure_is_raised_unwrapped() -> None:
    a, b = socketpair()
    b.send(b"x")
    with b, pytest.raises(Boom):
        async with ds_trio.loop():
            Exploding(a, EPOLLIN)


async def test_failures_of_the_loop_and_the_body_come_as_a_group() -> None:
    a, b = socketpair()
    b.send(b"x")
    with b, pytest.RaisesGroup(Boom, ValueError, match="ds_trio loop failed"):
        async with ds_trio.loop():
            Exploding(a, EPOLLIN)
            try:
                await anyio.sleep_forever()  # until Boom cancels the body
            finally:
                raise ValueError("the body failed while it was cancelled")


async def test_errors_log_closes_only_the_offender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="ds_trio")
    a, b = socketpair()
    with b:
        async with ds_trio.loop(errors="log") as loop:
            bad = Exploding(a, EPOLLIN)
            b.send(b"x")
            await wait_for(lambda: bad.sock is None)
            loop.stop()
    [record] = caplog.records
    assert record.name == "ds_trio.loop"
    assert record.exc_info is not None
    assert record.exc_info[0] is Boom
