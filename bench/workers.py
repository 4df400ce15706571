"""Worker processes (issue 7): the ds_trio daemon at -W 1 and -W 2 against peers.

    .venv/bin/python bench/workers.py              # full: ~10 min
    .venv/bin/python bench/workers.py --quick      # ~2 min
    .venv/bin/python bench/workers.py --parts spread --rounds 7

Part ``load``: echo ping-pong (bench/loadgen.c, 64-byte lines, no
pipelining) on C = 50 and C = 500 connections against

* ``ds_trio-W1``, ``ds_trio-W2``: ``python -m ds_trio._daemon
  ds_trio_echo:make_post_accept -l 127.0.0.1:PORT -W N`` (the bench's
  ds_trio echo client class, bench/servers/ds_trio_echo.py, served by the
  daemon's master + N workers on one shared listening socket);
* ``ds_trio-W2-reuseport``: the same with ``--reuseport`` (one
  ``SO_REUSEPORT`` socket per worker);
* ``trio`` and ``asyncio``: bench/servers/trio_echo.py (``serve_tcp``) and
  asyncio_echo.py (``Protocol``), one process;
* ``trio-x2``, ``asyncio-x2``: two such processes on one port with
  ``SO_REUSEPORT``, the fair peers of a 2-worker daemon.

Figures: req/s; **server CPU µs per request**, the CPU time (schedstat, all
threads) of every process of the server - the daemon's master and all its
workers - summed over the measured window, sampled by the load generator
at the window's edges (``loadgen --server-pid PID,PID,...``), divided by the
requests; p99 latency; how the connections were spread over the server's
processes (the sockets each holds beyond its own, from /proc/PID/fd
sampled every 0.1 s while loadgen runs, fullest sample).  Ratios
are per round against ``asyncio`` (and ``trio``) from the same round, and
for a multi-process system against its one-process version (``ds_trio-W1``
for the 2-worker daemons).  ``conns/process`` also shows connections the
server had not accepted yet: a server that accepts one connection per
wake-up under load leaves some of the 500 in the listen backlog for seconds.

Part ``spread``: how many of 200 and 500 connections each of 2 and 4 daemon
workers accepts, with (1) the shared inherited listening socket and (2)
``--reuseport``.  Connections arrive in a burst (128 connects in flight,
loadgen's idle mode) or one at a time (``--max-inflight 1``); each sends a
line and reads its echo, then all are held while the harness counts each
worker's sockets.  Shown: every round's counts, and the least-loaded
worker's share of a fair split (1.00 = even; median and min over rounds).

Nothing is pinned: a 2-worker server needs both cores, so on a 2-core
machine the load generator shares them with the workers (and everything
else runs there too).  Each round starts every system fresh, primes it
(0.5 s ping-pong on 50 connections, 8 MiB bulk), and the order of systems
rotates from round to round.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import run
from _benchutil import DASH, TIMES, fmt_range, md_table, per_round_ratio

PY = sys.executable
SERVERS = run.SERVERS_DIR
LOADGEN = run.BUILD_DIR / "loadgen"
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The systems: each is one or more processes; CPU is summed over all of them.


@dataclass(frozen=True)
class System:
    name: str
    label: str
    kind: str  # "procs": `copies` servers on one port | "daemon": master+workers
    argv: tuple[str, ...]
    copies: int = 1
    workers: int = 0
    # the one-process system this one is the multi-process version of
    single: str | None = None


def _daemon(workers: int, *extra: str, backend: str = "trio") -> tuple[str, ...]:
    return (
        PY,
        "-m",
        "ds_trio._daemon",
        "ds_trio_echo:make_post_accept",
        "-l",
        f"{HOST}:{{port}}",
        "-W",
        str(workers),
        "--backend",
        backend,
        *extra,
    )


def systems_for(backend: str) -> dict[str, System]:
    def py(script: str, *args: str) -> tuple[str, ...]:
        return (PY, str(SERVERS / script), "{port}", *args)

    listed = (
        System("asyncio", "asyncio Protocol", "procs", py("asyncio_echo.py")),
        System(
            "asyncio-x2",
            f"2 {TIMES} asyncio Protocol, SO_REUSEPORT",
            "procs",
            py("asyncio_echo.py", "--reuseport"),
            copies=2,
            single="asyncio",
        ),
        System("trio", "trio serve_tcp", "procs", py("trio_echo.py")),
        System(
            "trio-x2",
            f"2 {TIMES} trio serve_tcp, SO_REUSEPORT",
            "procs",
            py("trio_echo.py", "--reuseport"),
            copies=2,
            single="trio",
        ),
        System(
            "ds_trio-W1",
            "ds_trio daemon -W 1",
            "daemon",
            _daemon(1, backend=backend),
            workers=1,
        ),
        System(
            "ds_trio-W2",
            "ds_trio daemon -W 2",
            "daemon",
            _daemon(2, backend=backend),
            workers=2,
            single="ds_trio-W1",
        ),
        System(
            "ds_trio-W2-reuseport",
            "ds_trio daemon -W 2 --reuseport",
            "daemon",
            _daemon(2, "--reuseport", backend=backend),
            workers=2,
            single="ds_trio-W1",
        ),
    )
    return {s.name: s for s in listed}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def socket_fds(pid: int) -> int:
    """How many sockets ``pid`` holds (-1 if it is gone)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return -1
    n = 0
    for name in names:
        with contextlib.suppress(OSError):
            n += os.readlink(f"{base}/{name}").startswith("socket:")
    return n


class Group:
    """A running system: its processes, the port, the serving pids."""

    def __init__(self, system: System, log_path: Path) -> None:
        self.system = system
        self.port = free_port()
        self.log_file = log_path.open("ab")
        self.procs: list[subprocess.Popen[bytes]] = []
        argv = [a.replace("{port}", str(self.port)) for a in system.argv]
        self.serving: list[int] = []  # pids that accept connections
        try:
            deadline = time.monotonic() + 60
            if system.kind == "daemon":
                proc = self._start(argv)
                for _ in range(system.workers):
                    self.serving.append(self._ready(proc, deadline, b"READY "))
            else:
                for _ in range(system.copies):
                    proc = self._start(argv)
                    self._ready(proc, deadline, f"READY {self.port}".encode())
                    self.serving.append(proc.pid)
        except BaseException:
            self.stop()
            raise
        self.pids = sorted({p.pid for p in self.procs} | set(self.serving))
        # sockets each serving process holds before any client: listeners,
        # wake-up socketpairs...
        self.base_fds = {pid: socket_fds(pid) for pid in self.serving}

    def _start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        env = run.server_env()
        env["PYTHONPATH"] = f"{SERVERS}{os.pathsep}{env['PYTHONPATH']}"
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            cwd=run.REPO_DIR,
            env=env,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def _ready(proc: subprocess.Popen[bytes], deadline: float, prefix: bytes) -> int:
        assert proc.stdout is not None
        line = run.read_line(proc.stdout, deadline)
        if line is None or not line.startswith(prefix):
            raise RuntimeError(f"not ready (exit {proc.poll()}): {line!r}")
        return int(line.split()[1]) if prefix == b"READY " else proc.pid

    def cpu(self) -> float:
        return sum(run.cpu_seconds(pid) or 0.0 for pid in self.pids)

    def conns(self, base: dict[int, int] | None = None) -> list[int]:
        """Client sockets per serving process, most first (minus *base*, by
        default what each held at start)."""
        base = base or self.base_fds
        counts = [socket_fds(pid) - base[pid] for pid in self.serving]
        return sorted(counts, reverse=True)

    def quiesce(self, *, limit_s: float = 5.0) -> None:
        deadline = time.monotonic() + limit_s
        last = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.cpu()
            if now - last < 0.002 * len(self.pids):
                return
            last = now

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # a daemon's workers exit on their own when the master does (the
        # parent pipe); do not leave any behind if one did not
        for pid in self.serving:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()


class Meter:
    """Others' CPU during an interval, in CPUs (run.BackgroundMeter for a
    server of several processes)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.t0 = time.monotonic()
        self.busy0 = run._busy_seconds()
        self.ours0 = group.cpu() + run._children_seconds()

    def read(self) -> float:
        wall = time.monotonic() - self.t0
        ours = self.group.cpu() + run._children_seconds() - self.ours0
        others = run._busy_seconds() - self.busy0 - ours
        return max(0.0, others / wall) if wall > 0 else 0.0


# --------------------------------------------------------------------------
# Part "load".


@dataclass
class Result:
    rps: float | None = None
    cpu_us: float | None = None
    p99_us: float | None = None
    conns: list[int] = field(default_factory=list)
    others: float | None = None
    error: str | None = None


def pingpong(group: Group, conns: int, warmup: float, duration: float) -> Result:
    argv = [
        str(LOADGEN),
        f"--port={group.port}",
        "--mode=pingpong",
        f"--conns={conns}",
        f"--warmup={warmup}",
        f"--duration={duration}",
        f"--server-pid={','.join(map(str, group.pids))}",
        "--timeout=120",
    ]
    before = {pid: socket_fds(pid) for pid in group.serving}
    meter = Meter(group)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Sample until loadgen is done and keep the fullest sample: on a busy
    # machine opening 500 connections can take longer than the warm-up.
    spread: list[int] = []
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        sample = group.conns(before)
        if sum(sample) >= sum(spread):
            spread = sample
    out, err = proc.communicate(timeout=180)
    others = meter.read()
    result = run.parse_result(out)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exit {proc.returncode}: {err[-300:]}")
    return Result(
        rps=run._num(result, "rps"),
        cpu_us=run._num(result, "cpu_us_per_req"),
        p99_us=run._num(result, "p99_us"),
        conns=spread,
        others=others,
    )


def prime(group: Group) -> None:
    """A throwaway load first (see run.prime: a fresh server is not in a
    long-running one's state)."""
    for extra in (
        ["--mode=pingpong", "--conns=50", "--warmup=0", "--duration=0.5"],
        ["--mode=bulk", "--conns=2", f"--bulk-total={8 << 20}", "--bulk-size=1048576"],
    ):
        subprocess.run(
            [str(LOADGEN), f"--port={group.port}", "--timeout=60", *extra],
            capture_output=True,
            timeout=90,
            check=False,
        )
    group.quiesce()


def run_load(args: argparse.Namespace, systems: list[System], out: Path) -> str:
    conns_list = args.conns
    results: dict[tuple[str, int], list[Result]] = {
        (s.name, c): [] for s in systems for c in conns_list
    }
    names = [s.name for s in systems]
    by_name = {s.name: s for s in systems}
    for rnd, order in enumerate(run.rotations(names, args.rounds), 1):
        log(f"== load round {rnd}/{args.rounds}: {' '.join(order)}")
        for name in order:
            try:
                group = Group(by_name[name], out / f"{name}.log")
            except (RuntimeError, OSError) as e:
                log(f"  {name}: FAILED to start: {e}")
                for c in conns_list:
                    results[name, c].append(Result(error=str(e)))
                continue
            try:
                prime(group)
                for c in conns_list:
                    try:
                        r = pingpong(group, c, args.warmup, args.duration)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        r = Result(error=str(e))
                    results[name, c].append(r)
                    group.quiesce()
                    log(f"  {name:22} C={c:<4} {describe(r)}")
            finally:
                group.stop()
    return load_tables(systems, conns_list, results)


def describe(r: Result) -> str:
    if r.error:
        return f"FAILED: {r.error}"
    return (
        f"{r.rps or 0:8.0f} req/s  cpu {r.cpu_us or 0:6.1f} us/req  "
        f"p99 {r.p99_us or 0:7.0f} us  conns {r.conns}  others {r.others or 0:.2f}"
    )


def _spread(rs: Sequence[Result]) -> str:
    """The median round's connections per process, e.g. ``26/24``."""
    rounds = [r.conns for r in rs if r.conns and not r.error]
    if not rounds:
        return DASH
    # the round whose least-loaded process is the median one
    rounds.sort(key=lambda c: c[-1])
    mid = rounds[len(rounds) // 2]
    return "/".join(map(str, mid))


def load_tables(
    systems: Sequence[System],
    conns_list: Sequence[int],
    results: dict[tuple[str, int], list[Result]],
) -> str:
    parts = []
    for c in conns_list:
        ref_a = [r.rps for r in results.get(("asyncio", c), [])]
        ref_a_cpu = [r.cpu_us for r in results.get(("asyncio", c), [])]
        ref_t_cpu = [r.cpu_us for r in results.get(("trio", c), [])]
        rows = []
        for s in systems:
            rs = results[s.name, c]
            rps = [r.rps for r in rs]
            cpu = [r.cpu_us for r in rs]
            others = [r.others for r in rs if r.others is not None]
            single = results.get((s.single, c)) if s.single else None
            per_process = (
                per_round_ratio(cpu, [r.cpu_us for r in single]) if single else []
            )
            rows.append(
                [
                    s.label,
                    fmt_range(rps, ".0f"),
                    fmt_range(cpu, ".1f"),
                    fmt_range([r.p99_us for r in rs], ".0f"),
                    _spread(rs),
                    fmt_range(per_round_ratio(rps, ref_a), ".2f"),
                    fmt_range(per_round_ratio(cpu, ref_a_cpu), ".2f"),
                    fmt_range(per_round_ratio(cpu, ref_t_cpu), ".2f"),
                    fmt_range(per_process, ".2f"),
                    f"{max(others):.2f}" if others else DASH,
                ]
            )
        header = [
            f"C={c}",
            "req/s",
            "CPU µs/req",
            "p99 µs",
            "conns/process",
            f"req/s {TIMES} asyncio",
            f"CPU {TIMES} asyncio",
            f"CPU {TIMES} trio",
            f"CPU {TIMES} 1 process",
            "others' CPU (max)",
        ]
        parts.append(md_table(header, rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------
# Part "spread".


def hold(group: Group, conns: int, inflight: int) -> list[int]:
    """Open ``conns`` connections (each served once), count each worker's."""
    argv = [
        str(LOADGEN),
        f"--port={group.port}",
        "--mode=idle",
        f"--conns={conns}",
        f"--max-inflight={inflight}",
        "--hold=60",
        "--timeout=60",
    ]
    before = {pid: socket_fds(pid) for pid in group.serving}
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = run.read_line(proc.stdout, time.monotonic() + 60)
        if line is None or b'"holding"' not in line:
            raise RuntimeError(f"loadgen never held its connections: {line!r}")
        counts = group.conns(before)
        proc.stdin.write(b"release\n")
        proc.stdin.flush()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sum(counts) != conns:
        raise RuntimeError(f"counted {sum(counts)} connections, not {conns}: {counts}")
    return counts


def run_spread(args: argparse.Namespace, backend: str, out: Path) -> str:
    designs = {"shared": (), "reuseport": ("--reuseport",)}
    cases = [
        (design, w) for w in args.spread_workers for design in designs
    ]  # interleaved: shared, reuseport, shared, ...
    arrivals = {"burst": 128, "one at a time": 1}
    counts: dict[tuple[str, int, int, str], list[list[int]]] = {}
    for rnd, order in enumerate(run.rotations(cases, args.spread_rounds), 1):
        log(f"== spread round {rnd}/{args.spread_rounds}")
        for design, w in order:
            system = System(
                f"ds_trio-W{w}-{design}",
                "",
                "daemon",
                _daemon(w, *designs[design], backend=backend),
                workers=w,
            )
            group = Group(system, out / f"{system.name}.log")
            try:
                # each worker serves a first connection before counting, so
                # none is still starting up
                prime_workers(group)
                group.quiesce()
                for n in args.spread_conns:
                    for arrival, inflight in arrivals.items():
                        c = hold(group, n, inflight)
                        group.quiesce()
                        counts.setdefault((design, w, n, arrival), []).append(c)
                        log(f"  {design:9} W={w} {n:4} {arrival:13} {c}")
            finally:
                group.stop()
    rows = []
    for w in args.spread_workers:
        for n in args.spread_conns:
            for arrival in arrivals:
                for design in designs:
                    rounds = counts.get((design, w, n, arrival), [])
                    fair = n / w
                    share = [c[-1] / fair for c in rounds]
                    rows.append(
                        [
                            f"{design}, {w} workers, {n} conns, {arrival}",
                            "; ".join("/".join(map(str, c)) for c in rounds),
                            f"{statistics.median(share):.2f}" if share else DASH,
                            f"{min(share):.2f}" if share else DASH,
                        ]
                    )
    header = [
        "case",
        "connections per worker, each round",
        "least-loaded ÷ fair (median)",
        "(worst)",
    ]
    return md_table(header, rows)


def prime_workers(group: Group) -> None:
    """Connections until every worker has accepted one (bounded)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.ExitStack() as stack:
            clients = []
            for _ in range(8 * len(group.serving)):
                client = stack.enter_context(
                    socket.create_connection((HOST, group.port), timeout=10)
                )
                client.sendall(b"hi\n")
                clients.append(client)
            for client in clients:
                client.recv(16)
            if all(c > 0 for c in group.conns()):
                return
    log("  warning: not every worker accepted within 30 s")


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, 2 rounds")
    parser.add_argument("--parts", default="load,spread", help="load,spread")
    parser.add_argument("--systems", help="comma-separated (default: all)")
    parser.add_argument("--rounds", type=int, help="load rounds (3; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds (1; quick 0.3)")
    parser.add_argument("--duration", type=float, help="seconds (4; quick 1)")
    parser.add_argument(
        "--conns", default="50,500", help="load: connection counts (50,500)"
    )
    parser.add_argument("--spread-rounds", type=int, help="spread rounds (5)")
    parser.add_argument("--spread-workers", default="2,4", help="spread: -W values")
    parser.add_argument("--spread-conns", default="200,500", help="spread: conns")
    parser.add_argument(
        "--backend", default="trio", choices=("trio", "asyncio", "uvloop")
    )
    parser.add_argument("--out", help="logs directory (default: results/workers-*)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    args.duration = args.duration or (1.0 if args.quick else 4.0)
    args.spread_rounds = args.spread_rounds or (2 if args.quick else 5)
    args.conns = [int(x) for x in args.conns.split(",")]
    args.spread_workers = [int(x) for x in args.spread_workers.split(",")]
    args.spread_conns = [int(x) for x in args.spread_conns.split(",")]
    parts = set(args.parts.split(","))

    err = run.build_c(run.BENCH_DIR / "loadgen.c", LOADGEN)
    if err:
        raise SystemExit(f"cannot build the load generator: {err}")
    run.raise_nofile_limit()
    all_systems = systems_for(args.backend)
    names = run.select_names(args.systems, list(all_systems), "system")
    systems = [all_systems[n] for n in names]
    out = (
        Path(args.out)
        if args.out
        else (run.RESULTS_DIR / time.strftime("workers-%Y%m%d-%H%M%S"))
    )
    out.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))
    print(
        f"bench/workers.py, {time.strftime('%Y-%m-%d %H:%M')}, {cpus} CPUs, "
        f"nothing pinned, ds_trio backend {args.backend}\n"
    )
    if "load" in parts:
        print(
            f"Echo ping-pong, 64-byte lines, {args.rounds} rounds, "
            f"{args.warmup} s warm-up + {args.duration} s measured; "
            f"median (min{DASH}max); CPU summed over all of a server's processes.\n"
        )
        print(run_load(args, systems, out), "\n", flush=True)
    if "spread" in parts:
        print(f"Connections per daemon worker, {args.spread_rounds} rounds.\n")
        print(run_spread(args, args.backend, out), flush=True)


if __name__ == "__main__":
    main()
