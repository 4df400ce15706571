"""Timers: 1,000,000 pending timers, and ping-pong latency while they wait.

    python bench/timers.py [--timers 1000000] [--rounds 3] [--trips 5000]

(1) CPU seconds to insert N timers with random delays (1 s to 1 h) into a
running loop with ``add_timer``, against the seed's algorithm (sorted list,
linear scan from the front, transliterated) on a smaller N it can finish.
(2) 1-byte ping-pong between two DS objects (µs per round trip, median of
interleaved rounds) with no timer pending and with the N timers pending: the
heap is only touched when a timer is due or inserted, so the two should
match.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import time
from typing import Any

import trio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT


class _End(DS):
    def __init__(self, sock: socket.socket, first: bool, trips: int, done: Any) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.first = first
        self.trips = trips
        self.count = 0
        self.done = done
        self.buf = bytearray()

    def event_step(self) -> None:
        while self.do_read(self.buf, 64, 0):
            for _ in self.buf:
                if self.first:
                    self.count += 1
                    if self.count >= self.trips:
                        self.done.set()
                        return
                self.sock.send(b"x")


def _noop() -> None:
    pass


async def _measure(n_timers: int, trips: int) -> tuple[float, float]:
    rng = random.Random(1)
    delays = [rng.uniform(1, 3600) for _ in range(n_timers)]
    async with ds_trio.loop() as loop:
        cpu = time.process_time()
        timers = [ds_trio.add_timer(d, _noop) for d in delays]
        insert_cpu = time.process_time() - cpu
        a, b = socket.socketpair()
        done = trio.Event()
        _End(a, True, trips, done)
        _End(b, False, trips, done)
        cpu = time.process_time()
        a.send(b"x")
        await done.wait()
        rt = (time.process_time() - cpu) / trips * 1e6
        for t in timers:
            t.cancel()
        loop.stop()
    return insert_cpu, rt


def _seed_insert(n: int) -> float:
    """The seed's add_timer: append if latest, else scan for the spot."""
    rng = random.Random(1)
    timers: list[list[float]] = []
    cpu = time.process_time()
    now = 0.0
    for _ in range(n):
        fire = now + rng.uniform(1, 3600)
        if not timers or fire >= timers[-1][0]:
            timers.append([fire])
            continue
        for i, t in enumerate(timers):
            if t[0] > fire:
                timers.insert(i, [fire])
                break
    return time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trips", type=int, default=5000)
    parser.add_argument("--seed-n", type=int, default=20_000)
    args = parser.parse_args()
    inserts, with_rt, without_rt = [], [], []
    for _ in range(args.rounds):
        _, rt0 = trio.run(_measure, 0, args.trips)
        without_rt.append(rt0)
        ins, rt1 = trio.run(_measure, args.timers, args.trips)
        inserts.append(ins)
        with_rt.append(rt1)
    seed = _seed_insert(args.seed_n)
    med = statistics.median
    print(f"{args.timers:,} timers, {args.rounds} rounds (trio backend)\n")
    print("| figure | median | min | max |")
    print("|---|---:|---:|---:|")
    print(
        f"| insert {args.timers:,} timers, CPU s | {med(inserts):.2f} "
        f"| {min(inserts):.2f} | {max(inserts):.2f} |"
    )
    print(
        f"| ping-pong, no timer pending, µs/RT | {med(without_rt):.1f} "
        f"| {min(without_rt):.1f} | {max(without_rt):.1f} |"
    )
    print(
        f"| ping-pong, {args.timers:,} pending, µs/RT | {med(with_rt):.1f} "
        f"| {min(with_rt):.1f} | {max(with_rt):.1f} |"
    )
    print(
        f"\nseed's linear-scan insert of {args.seed_n:,} random timers: "
        f"{seed:.2f} CPU s ({seed / args.seed_n * 1e6:.0f} µs/insert); "
        f"ds_trio: {med(inserts) / args.timers * 1e6:.2f} µs/insert"
    )


if __name__ == "__main__":
    main()
