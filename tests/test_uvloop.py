"""Smoke test on anyio's asyncio backend with uvloop."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import ds_trio
from ds_trio.testing import assert_no_leaks, socketpair

from .helpers import Echo, Recorder, roundtrip

pytest.importorskip("uvloop")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> object:
    return ("asyncio", {"use_uvloop": True})


async def test_uvloop_echo_timer_close_and_clean_exit() -> None:
    fired: list[str] = []
    log: list[Any] = []
    async with assert_no_leaks():
        echo_sock, client = socketpair()
        parked_sock, parked_peer = socketpair()
        try:
            async with ds_trio.loop() as lp:
                assert lp.backend == "uvloop"
                echo = Echo(echo_sock)
                parked = Recorder(parked_sock, log, "parked")
                ds_trio.add_timer(0, fired.append, "zero")

                for i in range(5):
                    payload = f"request {i}\n".encode() * (i + 1)
                    assert await roundtrip(client, payload) == payload
                assert fired == ["zero"]

                # parked waits in wait_readable; closing it must wake and end
                # its task without aborting the process.
                await anyio.wait_all_tasks_blocked()
                assert log == []
                parked.close()
                assert parked.sock is None
                await anyio.wait_all_tasks_blocked()
                # The loop keeps serving after the close.
                assert await roundtrip(client, b"after close") == b"after close"
                echo.close()
            assert lp.statistics().registered == 0
            assert echo.sock is None
            assert echo_sock.fileno() == -1
            assert parked_sock.fileno() == -1
            assert log == []
        finally:
            for sock in (echo_sock, client, parked_sock, parked_peer):
                sock.close()


async def test_uvloop_loop_exits_when_nothing_is_left() -> None:
    fired: list[float] = []
    async with assert_no_leaks():
        a, b = socketpair()
        try:
            async with ds_trio.loop() as lp:
                Echo(a)
                ds_trio.add_timer(0, lambda: fired.append(ds_trio.now()))
                # Peer hangs up: Echo reads EOF and closes itself, then
                # nothing is left and the loop finishes on its own.
                b.close()
            assert fired
            assert lp.statistics().registered == 0
            assert a.fileno() == -1
        finally:
            a.close()
            b.close()
