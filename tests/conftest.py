"""Shared fixtures: every async test runs on trio, asyncio and uvloop.

Only anyio's pytest plugin drives async tests (pytest-trio is disabled in
pyproject's addopts): pytest-trio's trio_mode would silently run the
asyncio-parametrised rows on trio and ignore their clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import trio.testing

import ds_trio

# (anyio backend, callback mode).  Synchronous steps run from readiness
# callbacks by default on every backend; "trio-tasks" runs the suite with
# DS_TRIO_CALLBACKS=0, where each object waits in its own task (the path
# TLS and async steps always take).
BACKENDS = [
    pytest.param((("asyncio", {}), True), id="asyncio"),
    pytest.param((("trio", {}), True), id="trio"),
    pytest.param((("trio", {}), False), id="trio-tasks"),
    # uvloop too: an fd closed under a watcher aborts the process there.
    pytest.param((("asyncio", {"use_uvloop": True}), True), id="uvloop"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> object:
    backend, callbacks = request.param
    # Also inherited by the servers the tests start as subprocesses.
    monkeypatch.setenv("DS_TRIO_CALLBACKS", "1" if callbacks else "0")
    return backend


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture(autouse=True)
def _clean_pending_state() -> Iterator[None]:
    """Every test starts and ends with an empty per-thread pending state."""
    ds_trio.Reset()
    yield
    ds_trio.Reset()


@pytest.fixture(autouse=True)
def _ds_logs_visible(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ds_trio")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault suite's table (tests/faultlib.py) when it ran."""
    from tests import faultlib

    if not faultlib.ROWS:
        return
    terminalreporter.section("fault suite: lost and leaked (must all be 0)")
    terminalreporter.write(faultlib.markdown())
    faultlib.write_if_asked()
