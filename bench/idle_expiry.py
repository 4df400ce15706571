"""Idle expiry (issue 5): ds_trio's IdleTracker against the seed's full scan.

    .venv/bin/python bench/idle_expiry.py            # 10k and 100k tracked, 5 rounds
    .venv/bin/python bench/idle_expiry.py --quick    # 100k only, 2 rounds, fewer reps
    .venv/bin/python bench/idle_expiry.py --conns 100000 --idle-pct 1

What it measures, in one process, the two variants interleaved round by
round (order rotated), for N tracked connections of which 1 % are idle
longer than ``EXPTIME`` (180 s):

* **check, 1 % expire**: one ``expire_old`` call that finds and shuts down
  the N/100 idle ones.  The structure is rebuilt between calls (not timed).
* **check, none expire**: the common case (a check every 60 s finding
  nobody, or few): ``expire_old`` when no one is idle; batched calls.
* **update_idle_time**: touching an already tracked connection (the
  per-request cost).
* **bytes per connection**: ``tracemalloc`` growth while the structure is
  built for N connections, divided by N; and the transient allocation
  peak during one check (the seed builds a whole new dict each time).

The variants:

* ``ds_trio``: ``ds_trio._idle.IdleTracker`` itself (insertion-ordered
  ``OrderedDict`` per ``EXPTIME``; a check pops from the front and stops at
  the first object still within its time), driven as ``ds_trio.expire_old``
  and ``DS.update_idle_time`` drive it, minus the loop.
* ``seed``: a line-by-line transliteration of the seed's ``expire_old``
  (DS.pm lines 649-664: walk ``%$EXPMAP`` (fd -> idle_at), build ``%new``
  keeping the live ones and the expired ones whose ``shutdn`` returned
  false) plus the ``delete @$EXPMAP{@$close_now}`` that the seed's
  ``PostEventLoop`` does for the closed fds; ``update_idle_time`` is
  ``$EXPMAP->{fileno($sock)} = now()``.

The connections are lightweight fake objects (``sock``, ``fd``, ``shutdn``):
100,000 real sockets exceed this machine's RLIMIT_NOFILE (20,000), and the
data structure is what differs.  A fake ``shutdn`` does what ``close`` does
to these structures (ds_trio: ``IdleTracker.forget``; seed: queue the fd for
``PostEventLoop``) and returns false, as the seed's ``close`` does.  Times
are thread CPU time.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _benchutil import DASH, fmt_range, md_table, per_round_ratio

from ds_trio._idle import IdleTracker

EXPTIME = 180.0
clock = time.thread_time_ns


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Fake:
    """A tracked connection: what expire_old and close touch, nothing more."""

    __slots__ = ("fd", "owner", "sock")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sock: object | None = True
        self.owner: Any = None

    def shutdn(self) -> bool:
        # plain socket: shutdn is close, which forgets the object and
        # returns false (the seed's 0)
        self.sock = None
        self.owner.closed(self)
        return False


@dataclass
class Population:
    """N fake connections, their ages, and which ones are idle."""

    objs: list[Fake]
    ages: list[float]  # seconds since last activity, at time `now`
    now: float

    @classmethod
    def make(cls, n: int, idle_pct: float, seed: int) -> Population:
        rng = random.Random(seed)
        objs = [Fake(fd) for fd in range(5, 5 + n)]
        n_idle = round(n * idle_pct / 100)
        idle = set(rng.sample(range(n), n_idle))
        ages = [
            EXPTIME + 1 + rng.random() * EXPTIME
            if i in idle
            else rng.random() * EXPTIME * 0.9
            for i in range(n)
        ]
        return cls(objs, ages, 10_000.0)

    def reset(self, owner: Any) -> None:
        for obj in self.objs:
            obj.sock = True
            obj.owner = owner


class DsTrio:
    """ds_trio: IdleTracker, as ds_trio.expire_old / DS.update_idle_time use it."""

    name = "ds_trio IdleTracker"

    def __init__(self) -> None:
        self.tracker = IdleTracker()
        self.exp_armed = False
        self.to_close: list[Fake] = []

    def build(self, pop: Population) -> None:
        # Touches arrive in time order: oldest activity first.
        tracker = self.tracker
        now = pop.now
        for i in sorted(range(len(pop.objs)), key=pop.ages.__getitem__, reverse=True):
            tracker.touch(pop.objs[i], EXPTIME, now - pop.ages[i])  # type: ignore[arg-type]

    def closed(self, obj: Fake) -> None:
        # DS.close: `if state.idle.groups: state.idle.forget(self)`, then
        # schedule the fd close
        if self.tracker.groups:
            self.tracker.forget(obj)  # type: ignore[arg-type]
        self.to_close.append(obj)

    def expire_old(self, now: float) -> None:
        # ds_trio._later.expire_old, with later() reduced to a flag
        tracker = self.tracker
        for obj in tracker.pop_expired(now):
            if obj.sock is not None:
                obj.shutdn()
        self.exp_armed = bool(len(tracker))
        self.to_close.clear()

    def update_idle_time(self, obj: Fake, now: float) -> None:
        # DS.update_idle_time
        if obj.sock is None:
            return
        self.tracker.touch(obj, EXPTIME, now)  # type: ignore[arg-type]
        if not self.exp_armed:
            self.exp_armed = True


class Seed:
    """The seed: %$EXPMAP fd -> idle_at, rebuilt by every expire_old."""

    name = "seed full scan (DS.pm 649-664)"

    def __init__(self) -> None:
        self.expmap: dict[int, float] = {}
        self.descriptor_map: dict[int, Fake] = {}
        self.exp_timer = False
        self.to_close: list[int] = []

    def build(self, pop: Population) -> None:
        now = pop.now
        expmap = self.expmap
        for obj, age in zip(pop.objs, pop.ages, strict=True):
            expmap[obj.fd] = now - age
        self.descriptor_map = {obj.fd: obj for obj in pop.objs}

    def closed(self, obj: Fake) -> None:
        self.to_close.append(obj.fd)  # push @$ToClose, $sock

    def expire_old(self, now: float) -> None:
        exp = EXPTIME
        old = now - exp
        new = {}
        for fd, idle_at in self.expmap.items():
            if idle_at < old:
                ds_obj = self.descriptor_map[fd]
                if not ds_obj.shutdn():
                    new[fd] = idle_at
            else:
                new[fd] = idle_at
        self.expmap = new
        self.exp_timer = bool(new)  # scalar(keys %new) ? later(...) : undef
        # PostEventLoop: delete @$EXPMAP{@$close_now}
        close_now, self.to_close = self.to_close, []
        for fd in close_now:
            new.pop(fd, None)

    def update_idle_time(self, obj: Fake, now: float) -> None:
        if obj.sock is None:
            return
        self.expmap[obj.fd] = now
        if not self.exp_timer:
            self.exp_timer = True


VARIANTS: dict[str, Callable[[], Any]] = {"ds_trio": DsTrio, "seed": Seed}


@dataclass
class Figures:
    check_expire_us: list[float] = field(default_factory=list)
    check_none_us: list[float] = field(default_factory=list)
    touch_ns: list[float] = field(default_factory=list)
    bytes_per_conn: list[float] = field(default_factory=list)
    check_peak_kib: list[float] = field(default_factory=list)


def fresh(variant: str, pop: Population) -> Any:
    v = VARIANTS[variant]()
    pop.reset(v)
    v.build(pop)
    return v


def measure(variant: str, pop: Population, fig: Figures, reps: int) -> None:
    n = len(pop.objs)
    n_idle = sum(age > EXPTIME for age in pop.ages)
    gc.collect()

    # memory per tracked connection: build under tracemalloc
    pop.reset(None)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    v = VARIANTS[variant]()
    pop.reset(v)
    v.build(pop)
    built = tracemalloc.get_traced_memory()[0]
    fig.bytes_per_conn.append((built - before) / n)
    # transient peak of one check (1 % expiring)
    tracemalloc.reset_peak()
    v.expire_old(pop.now)
    peak = tracemalloc.get_traced_memory()[1]
    fig.check_peak_kib.append((peak - built) / 1024)
    tracemalloc.stop()
    del v
    gc.collect()

    # check with 1 % expiring: rebuilt between calls
    times = []
    for _ in range(reps):
        v = fresh(variant, pop)
        gc.collect()
        t0 = clock()
        v.expire_old(pop.now)
        times.append((clock() - t0) / 1000)
        closed = sum(obj.sock is None for obj in pop.objs)
        if closed != n_idle:
            raise RuntimeError(f"{variant}: {closed} closed, expected {n_idle}")
    fig.check_expire_us.append(statistics.median(times))

    # check with nothing to expire (after the idle ones are gone), batched
    v = fresh(variant, pop)
    v.expire_old(pop.now)
    batch = 10_000 if variant == "ds_trio" else max(3, 2_000_000 // n)
    times = []
    for _ in range(reps):
        t0 = clock()
        for _ in range(batch):
            v.expire_old(pop.now)
        times.append((clock() - t0) / 1000 / batch)
    fig.check_none_us.append(statistics.median(times))

    # update_idle_time on already tracked objects, in a shuffled order,
    # with the clock moving forward
    live = [obj for obj in pop.objs if obj.sock is not None]
    random.Random(1).shuffle(live)
    now = pop.now
    times = []
    for _ in range(max(1, reps // 2)):
        t0 = clock()
        for obj in live:
            now += 1e-6
            v.update_idle_time(obj, now)
        times.append((clock() - t0) / len(live))
    fig.touch_ns.append(statistics.median(times))


def rotations(names: Sequence[str], rounds: int) -> list[list[str]]:
    return [
        list(names[r % len(names) :]) + list(names[: r % len(names)])
        for r in range(rounds)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100k only, 2 rounds")
    parser.add_argument("--conns", help="comma-separated tracked-connection counts")
    parser.add_argument("--idle-pct", type=float, default=1.0, help="%% idle (1)")
    parser.add_argument("--rounds", type=int, help="rounds (5; quick: 2)")
    parser.add_argument("--reps", type=int, help="timed calls per round (9; quick: 3)")
    args = parser.parse_args(argv)
    conns = [
        int(c)
        for c in (args.conns or ("100000" if args.quick else "10000,100000")).split(",")
    ]
    rounds = args.rounds or (2 if args.quick else 5)
    reps = args.reps or (3 if args.quick else 9)

    results: dict[tuple[int, str], Figures] = {}
    for n in conns:
        pop = Population.make(n, args.idle_pct, seed=n)
        for rnd, order in enumerate(rotations(list(VARIANTS), rounds), 1):
            log(f"{n:,} tracked, round {rnd}/{rounds}: {' '.join(order)}")
            for variant in order:
                fig = results.setdefault((n, variant), Figures())
                measure(variant, pop, fig, reps)
                log(
                    f"  {variant:8} expire {fig.check_expire_us[-1]:9.1f} us, "
                    f"none {fig.check_none_us[-1]:9.2f} us, "
                    f"touch {fig.touch_ns[-1]:6.0f} ns, "
                    f"{fig.bytes_per_conn[-1]:.0f} B/conn"
                )

    print(
        f"## Idle expiry: ds_trio IdleTracker vs the seed's full scan "
        f"(bench/idle_expiry.py{' --quick' if args.quick else ''})\n"
    )
    print(
        f"Python {sys.version.split()[0]}; {rounds} rounds (variants interleaved, "
        f"order rotated), {reps} timed checks per round; {args.idle_pct:g} % of "
        f"the tracked connections idle longer than EXPTIME = {EXPTIME:g} s.  "
        f"Median over rounds (min{DASH}max); thread CPU time.  "
        "Seed \u00f7 ds_trio: median of per-round ratios.\n"
    )
    rows = []
    for n in conns:
        d, s = results[n, "ds_trio"], results[n, "seed"]
        n_idle = round(n * args.idle_pct / 100)
        for label, get, spec in (
            (
                f"expire_old, {n_idle:,} of {n:,} expire (\u00b5s)",
                "check_expire_us",
                ".1f",
            ),
            (f"expire_old, none of {n:,} expire (\u00b5s)", "check_none_us", ".2f"),
            ("update_idle_time, tracked object (ns)", "touch_ns", ".0f"),
            ("memory per tracked connection (bytes)", "bytes_per_conn", ".1f"),
            ("transient allocation during one check (KiB)", "check_peak_kib", ".1f"),
        ):
            dv, sv = getattr(d, get), getattr(s, get)
            rows.append(
                [
                    f"{n:,}",
                    label,
                    fmt_range(dv, spec),
                    fmt_range(sv, spec),
                    fmt_range(per_round_ratio(sv, dv), ".1f"),
                ]
            )
    print(
        md_table(
            [
                "tracked",
                "figure",
                "ds_trio IdleTracker",
                "seed full scan",
                "seed \u00f7 ds_trio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
