"""Small DS subclasses and utilities shared by the tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

import ds_trio
import ds_trio.testing
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class Recorder(DS):
    """Records each event_step in a shared log and reads what is readable."""

    def __init__(
        self,
        sock: socket.socket,
        log: list[Any],
        name: str,
        events: int = EPOLLIN | EPOLLONESHOT,
        on_step: Callable[[Recorder], None] | None = None,
    ) -> None:
        super().__init__(sock, events)
        self.log = log
        self.name = name
        self.on_step = on_step
        self.data = bytearray()

    def event_step(self) -> None:
        self.log.append(self.name)
        if self.on_step is not None:
            self.on_step(self)
        if self.sock is None:
            return
        while self.do_read(self.data, 65536, len(self.data)):
            pass


class Echo(DS):
    """Echoes what it reads (plain send; the write path is not needed here)."""

    def __init__(self, sock: socket.socket, events: int = EPOLLIN | EPOLLONESHOT):
        super().__init__(sock, events)

    def event_step(self) -> None:
        buf = bytearray()
        while self.do_read(buf, 65536, 0):
            self.sock.sendall(bytes(buf))


class ReceiveMore:
    """``recv_exactly`` and ``recv_until_eof`` for test clients with ``recv``.

    A subclass defines ``async def recv(n) -> bytes`` returning ``b""`` at
    EOF.
    """

    async def recv(self, n: int = 65536) -> bytes:
        raise NotImplementedError

    async def recv_exactly(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            data = await self.recv(n - len(got))
            if not data:
                break
            got += data
        return bytes(got)

    async def recv_until_eof(self) -> bytes:
        got = bytearray()
        while data := await self.recv():
            got += data
        return bytes(got)


async def reserve_libuv_emfile_fd() -> None:
    """On uvloop, make libuv take its reserved fd before a leak check.

    The first time libuv opens a TCP stream it opens ``/dev/null`` too and
    keeps it for the event loop's life (its EMFILE trick); a block that
    opens the loop's first libuv stream would report it as leaked.  A no-op
    elsewhere.
    """
    import asyncio

    import sniffio

    if sniffio.current_async_library() != "asyncio":
        return
    if not type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        return
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = await anyio.connect_tcp("127.0.0.1", server.getsockname()[1])
        await client.aclose()


async def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` to an echo peer and read until as many bytes came back."""
    sock.sendall(payload)
    received = bytearray()
    while len(received) < len(payload):
        await anyio.wait_readable(sock)
        chunk = sock.recv(65536)
        assert chunk, "echo peer closed early"
        received += chunk
    return bytes(received)


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def pair() -> tuple[socket.socket, socket.socket]:
    return ds_trio.testing.socketpair()


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 10) -> None:
    """Yield to the scheduler until ``predicate()`` holds (bounded, never sleeps).

    ``wait_all_tasks_blocked`` does not cover I/O the asyncio loop has not
    polled yet, so tests that wait for a DS task to react to bytes they sent
    use this instead.
    """
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.lowlevel.checkpoint()
