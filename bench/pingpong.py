"""1-byte ping-pong over a socketpair: ds_trio against bare loops, side by side.

Every variant does the same reads as the DS idiom: read until EAGAIN, then
wait.  Variants run interleaved (round-robin) for several rounds and the
report gives the median CPU µs per round trip (process CPU time: both ends
run in one thread, so this is the whole cost and is not inflated when other
processes compete for the cores) and the ratio to the bare trio loop.

    python bench/pingpong.py [--trips 20000] [--rounds 7] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Callable

import anyio
import trio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


def _clock() -> float:
    # CPU time of this (single-threaded) process: the variants share the
    # machine with whatever else runs, and CPU time is what they cost.
    return time.process_time()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


# ----------------------------------------------------------------------
# Bare trio: one task per end, wait_readable, read until EAGAIN.
# ----------------------------------------------------------------------


def bare_trio(trips: int) -> float:
    a, b = _pair()

    async def end(sock: socket.socket, first: bool, done: trio.Event) -> None:
        count = 0
        if first:
            sock.send(b"x")
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    break
                for _ in data:
                    if first:
                        count += 1
                        if count >= trips:
                            done.set()
                            return
                    sock.send(b"x")

    async def main() -> float:
        done = trio.Event()
        start = _clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(end, a, True, done)
            nursery.start_soon(end, b, False, done)
            await done.wait()
            nursery.cancel_scope.cancel()
        return _clock() - start

    try:
        return trio.run(main)
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------
# ds_trio: two DS objects.
# ----------------------------------------------------------------------


class _Oneshot(DS):
    """The DS idiom: do_read until it returns 0 (EAGAIN re-arms the interest)."""

    def __init__(
        self, sock: socket.socket, first: bool, trips: int, loop: ds_trio.Loop | None
    ) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.first = first
        self.trips = trips
        self.count = 0
        self.buf = bytearray()
        self.loop = loop

    def event_step(self) -> None:
        buf = self.buf
        sock = self.sock
        while self.do_read(buf, 64, 0):
            for _ in buf:
                if self.first:
                    self.count += 1
                    if self.count >= self.trips:
                        assert self.loop is not None
                        self.loop.stop()
                        return
                sock.send(b"x")


class _Level(_Oneshot):
    """Level-triggered: stays armed, reads with recv until EAGAIN."""

    def __init__(
        self, sock: socket.socket, first: bool, trips: int, loop: ds_trio.Loop | None
    ) -> None:
        DS.__init__(self, sock, EPOLLIN)
        self.first = first
        self.trips = trips
        self.count = 0
        self.loop = loop

    def event_step(self) -> None:
        sock = self.sock
        while True:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                return
            for _ in data:
                if self.first:
                    self.count += 1
                    if self.count >= self.trips:
                        assert self.loop is not None
                        self.loop.stop()
                        return
                sock.send(b"x")


def _ds(
    cls: type[_Oneshot], backend: str, options: dict[str, object]
) -> Callable[[int], float]:
    def run(trips: int) -> float:
        a, b = _pair()

        async def main() -> float:
            start = _clock()
            async with ds_trio.loop() as loop:
                cls(a, True, trips, loop)
                cls(b, False, trips, None)
                a.send(b"x")
            return _clock() - start

        return anyio.run(main, backend=backend, backend_options=options)

    return run


# ----------------------------------------------------------------------
# Bare selectors callback loop (the in-Python ceiling).
# ----------------------------------------------------------------------


def bare_selectors(trips: int) -> float:
    a, b = _pair()
    sel = selectors.DefaultSelector()
    state = {"count": 0, "done": False}

    def on_readable(sock: socket.socket, first: bool) -> None:
        while True:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                return
            for _ in data:
                if first:
                    state["count"] += 1
                    if state["count"] >= trips:
                        state["done"] = True
                        return
                sock.send(b"x")

    sel.register(a, selectors.EVENT_READ, True)
    sel.register(b, selectors.EVENT_READ, False)
    start = _clock()
    a.send(b"x")
    while not state["done"]:
        for key, _ in sel.select():
            on_readable(key.fileobj, key.data)  # type: ignore[arg-type]
    elapsed = _clock() - start
    sel.close()
    a.close()
    b.close()
    return elapsed


def _protocol(use_uvloop: bool) -> Callable[[int], float]:
    """asyncio ``Protocol`` ping-pong: the callback ceiling of the backend."""

    def run(trips: int) -> float:
        import asyncio

        a, b = _pair()

        class Side(asyncio.Protocol):
            def __init__(self, first: bool, done: asyncio.Future[None]) -> None:
                self.first = first
                self.done = done
                self.count = 0
                self.transport: asyncio.Transport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]

            def data_received(self, data: bytes) -> None:
                assert self.transport is not None
                for _ in data:
                    if self.first:
                        self.count += 1
                        if self.count >= trips:
                            if not self.done.done():
                                self.done.set_result(None)
                            return
                    self.transport.write(b"x")

        async def main() -> float:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            start = _clock()
            ta, _ = await loop.connect_accepted_socket(lambda: Side(True, done), a)
            tb, _ = await loop.connect_accepted_socket(lambda: Side(False, done), b)
            ta.write(b"x")
            await done
            elapsed = _clock() - start
            ta.close()
            tb.close()
            return elapsed

        if use_uvloop:
            import uvloop

            return uvloop.run(main())
        return asyncio.run(main())

    return run


VARIANTS: dict[str, Callable[[int], float]] = {
    "bare trio wait_readable": bare_trio,
    "ds_trio trio EPOLLIN|ONESHOT": _ds(_Oneshot, "trio", {}),
    "ds_trio trio EPOLLIN (level)": _ds(_Level, "trio", {}),
    "bare selectors": bare_selectors,
    "ds_trio asyncio EPOLLIN|ONESHOT": _ds(_Oneshot, "asyncio", {}),
    "ds_trio uvloop EPOLLIN|ONESHOT": _ds(_Oneshot, "asyncio", {"use_uvloop": True}),
    "asyncio Protocol": _protocol(False),
    "uvloop Protocol": _protocol(True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", nargs="*", help="substrings of variant names")
    args = parser.parse_args()
    names = [
        name
        for name in VARIANTS
        if not args.only or any(part in name for part in args.only)
    ]
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            elapsed = VARIANTS[name](args.trips)
            results[name].append(elapsed / args.trips * 1e6)
    base = statistics.median(results.get("bare trio wait_readable") or [float("nan")])
    print(
        f"1-byte ping-pong, {args.trips} round trips, {args.rounds} interleaved rounds"
    )
    versions = ", ".join(
        f"{pkg} {importlib.metadata.version(pkg)}"
        for pkg in ("trio", "anyio", "uvloop")
    )
    print(f"python {sys.version.split()[0]}, {versions}")
    print()
    print("| variant | median CPU us/RT | min | max | x bare trio |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        values = results[name]
        med = statistics.median(values)
        print(
            f"| {name} | {med:.2f} | {min(values):.2f} | {max(values):.2f} "
            f"| {med / base:.3f} |"
        )


if __name__ == "__main__":
    main()
