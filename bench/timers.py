"""Timers: 1,000,000 pending timers against the peers, and ping-pong beside them.

    python bench/timers.py [--timers 1000000] [--rounds 3] [--trips 5000]
                           [--perl-random-n 5000] [--systems a,b]

(1) CPU seconds to insert N timers into a running loop, every handle kept
(a server keeps one per connection, to cancel it), side by side, each
measurement in a fresh process, the systems' order rotated between rounds:

- ``ds_trio-trio``, ``ds_trio-asyncio``: ``ds_trio.add_timer`` (one heap);
- ``asyncio``, ``uvloop``: ``loop.call_later``;
- ``perl-ds``: ``PublicInbox::DS::add_timer`` of Debian's public-inbox 1.9
  (the seed), which keeps its timers sorted by a linear scan from the front.

Two delay patterns: ``random`` (uniform in 1 s - 1 h, so inserts land all
over the queue) and ``equal`` (every timer 60 s, so deadlines only grow:
the case the seed's scan was tuned for, an append).  The seed's random
inserts are quadratic, so Perl runs them at ``--perl-random-n`` timers and
the figure to compare is µs per insert (which grows linearly with N there).

(2) 1-byte ping-pong between two DS objects on trio (µs per round trip,
median of interleaved rounds) with no timer pending and with the N timers
pending: the heap is only touched when a timer is due or inserted, so the
two should match.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import run
import trio
from _benchutil import DASH, fmt_range, md_table, per_round_ratio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT

SYSTEMS = ("ds_trio-trio", "ds_trio-asyncio", "asyncio", "uvloop", "perl-ds")
PATTERNS = ("random", "equal")
# The seed's 1 s - 1 h spread, and the one delay of the "equal" pattern.
DELAY_MIN, DELAY_MAX, EQUAL_DELAY = 1.0, 3600.0, 60.0

_PERL_INSERT = r"""
use strict; use warnings; use PublicInbox::DS;
my ($n, $pattern, $lo, $hi, $eq) = @ARGV;
srand(1);
my @delays = map { $pattern eq 'equal' ? $eq : $lo + rand($hi - $lo) } 1 .. $n;
my $cb = sub {};
my @t0 = times;
my @keep = map { PublicInbox::DS::add_timer($_, $cb) } @delays;
my @t1 = times;
printf "%.6f\n", ($t1[0] + $t1[1]) - ($t0[0] + $t0[1]);
"""


def _noop() -> None:
    pass


def _delays(n: int, pattern: str) -> list[float]:
    if pattern == "equal":
        return [EQUAL_DELAY] * n
    rng = random.Random(1)
    return [rng.uniform(DELAY_MIN, DELAY_MAX) for _ in range(n)]


# -- (1) the insert, one system per child process --------------------------


async def _insert_ds_trio(delays: list[float]) -> float:
    async with ds_trio.loop() as loop:
        cpu = time.process_time()
        timers = [ds_trio.add_timer(d, _noop) for d in delays]
        spent = time.process_time() - cpu
        for t in timers:
            t.cancel()
        loop.stop()
    return spent


async def _insert_call_later(delays: list[float]) -> float:
    import asyncio

    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    handles = [loop.call_later(d, _noop) for d in delays]
    spent = time.process_time() - cpu
    for h in handles:
        h.cancel()
    return spent


def child_insert(system: str, pattern: str, n: int) -> float:
    """Run in the child: CPU seconds for ``n`` inserts on ``system``."""
    delays = _delays(n, pattern)
    if system == "ds_trio-trio":
        return trio.run(_insert_ds_trio, delays)
    if system == "ds_trio-asyncio":
        import anyio

        return anyio.run(_insert_ds_trio, delays, backend="asyncio")
    if system == "asyncio":
        import asyncio

        return asyncio.run(_insert_call_later(delays))
    if system == "uvloop":
        import uvloop

        return uvloop.run(_insert_call_later(delays))
    raise SystemExit(f"unknown system {system!r}")


def measure_insert(system: str, pattern: str, n: int) -> float:
    """CPU seconds for ``n`` inserts on ``system``, in a fresh process."""
    if system == "perl-ds":
        argv = ["perl", "-e", _PERL_INSERT, "--", str(n), pattern]
        argv += [str(DELAY_MIN), str(DELAY_MAX), str(EQUAL_DELAY)]
    else:
        argv = [sys.executable, __file__, "--child", system, pattern, str(n)]
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, env=run.server_env()
    )
    return float(out.stdout.strip().splitlines()[-1])


# -- (2) ping-pong with the timers pending ----------------------------------


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


async def _pingpong(n_timers: int, trips: int) -> float:
    delays = _delays(n_timers, "random")
    async with ds_trio.loop() as loop:
        timers = [ds_trio.add_timer(d, _noop) for d in delays]
        a, b = socket.socketpair()
        done = trio.Event()
        ends = (_End(a, True, trips, done), _End(b, False, trips, done))
        cpu = time.process_time()
        a.send(b"x")
        await done.wait()
        rt = (time.process_time() - cpu) / trips * 1e6
        for end in ends:
            end.close()
        for t in timers:
            t.cancel()
        loop.stop()
    return rt


# -- the report --------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(f"{child_insert(sys.argv[2], sys.argv[3], int(sys.argv[4])):.6f}")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trips", type=int, default=5000)
    parser.add_argument("--perl-random-n", type=int, default=5000)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    skipped: dict[str, str] = {}
    if "perl-ds" in systems and (why := run.ensure_perl_ds(install=False)):
        skipped["perl-ds"] = why
        systems.remove("perl-ds")

    def n_for(system: str, pattern: str) -> int:
        if system == "perl-ds" and pattern == "random":
            return min(args.perl_random_n, args.timers)
        return args.timers

    # seconds[(system, pattern)] -> one value per round
    seconds: dict[tuple[str, str], list[float]] = {}
    rts: dict[int, list[float]] = {0: [], args.timers: []}
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for pattern in PATTERNS:
            for system in order:
                n = n_for(system, pattern)
                secs = measure_insert(system, pattern, n)
                seconds.setdefault((system, pattern), []).append(secs)
                print(
                    f"round {r + 1}: {system} {pattern} {n:,}: {secs:.2f} s",
                    file=sys.stderr,
                )
        for n_timers in (0, args.timers) if r % 2 == 0 else (args.timers, 0):
            rts[n_timers].append(trio.run(_pingpong, n_timers, args.trips))

    print(
        f"{args.timers:,} timers inserted with every handle kept, "
        f"{args.rounds} rounds, medians (min{DASH}max)\n"
    )
    header = ["system"]
    for pattern in PATTERNS:
        header += [f"{pattern}: CPU s", "µs/insert", "÷ ds_trio-trio"]
    rows = []
    ref = {p: seconds.get(("ds_trio-trio", p), []) for p in PATTERNS}
    for system in [*systems, *skipped]:
        if system in skipped:
            rows.append(
                [system, f"skipped: {skipped[system]}", *[""] * (len(header) - 2)]
            )
            continue
        row = [system]
        for pattern in PATTERNS:
            vals = seconds[(system, pattern)]
            n = n_for(system, pattern)
            per = [v / n * 1e6 for v in vals]
            cpu = fmt_range(vals, ".2f") + (f" (N={n:,})" if n != args.timers else "")
            refs_per = [v / args.timers * 1e6 for v in ref[pattern]]
            ratio = per_round_ratio(per, refs_per) if refs_per else []
            ratio_vals = [x for x in ratio if x is not None]
            row += [
                cpu,
                fmt_range(per, ".2f"),
                f"{statistics.median(ratio_vals):.2f}" if ratio_vals else DASH,
            ]
        rows.append(row)
    print(md_table(header, rows))
    print(
        f"\nping-pong between two DS objects on trio, µs per round trip: "
        f"no timer pending {fmt_range(rts[0])}; "
        f"{args.timers:,} pending {fmt_range(rts[args.timers])}"
    )


if __name__ == "__main__":
    main()
