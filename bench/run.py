"""Benchmark ds_trio against its peers, side by side, with one command.

    .venv/bin/python bench/run.py --quick     # ~2 min: to iterate
    .venv/bin/python bench/run.py             # full: ~10-25 min
    .venv/bin/python bench/run.py --list      # systems and scenarios

Every system (an echo server under ``bench/servers/``) is measured on every
scenario in every round; rounds repeat with the system order rotated, so slow
drift of a noisy machine spreads over all systems instead of punishing the
one that happened to run last.  Results go to
``bench/results/<timestamp>/{results.md,results.json,results.png,logs/}`` and
``bench/results/latest.md``.  See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

import report

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
SERVERS_DIR = BENCH_DIR / "servers"
BUILD_DIR = BENCH_DIR / "build"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable

# The automake convention: a server that exits 77 before READY cannot run
# here (e.g. the ds_trio stub) and is reported as skipped, not failed.
EXIT_SKIP = 77

MIB = 1 << 20

# Background CPU use (in CPUs) above which a measurement is flagged as
# disturbed, and below which --wait-quiet considers the machine quiet.
QUIET_THRESHOLD = 0.2


# --------------------------------------------------------------------------
# The systems.  This dict is the plug-in slot: a new server is one entry,
# an argv whose "{port}" is replaced by the port to listen on (0: the server
# picks one and reports it in its "READY <port>" line).


@dataclass(frozen=True)
class System:
    """An echo server to measure."""

    name: str
    label: str
    argv: tuple[str, ...]
    # What must exist before it can run: "cc" (the C server is built by the
    # harness) or "perl-ds" (Debian's libpublicinbox-perl).
    needs: str | None = None


def _py(script: str, *args: str) -> tuple[str, ...]:
    return (PYTHON, str(SERVERS_DIR / script), "{port}", *args)


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System(
            "c-epoll", "C epoll (ceiling)", (str(BUILD_DIR / "c_echo"), "{port}"), "cc"
        ),
        System(
            "perl-ds",
            "Perl PublicInbox::DS 1.9",
            ("perl", str(SERVERS_DIR / "perl_ds_echo.pl"), "{port}"),
            "perl-ds",
        ),
        System("selectors", "Python selectors loop", _py("selectors_echo.py")),
        System("asyncio", "asyncio Protocol", _py("asyncio_echo.py")),
        System(
            "uvloop",
            "asyncio Protocol on uvloop",
            _py("asyncio_echo.py", "--backend", "uvloop"),
        ),
        System("trio", "trio serve_tcp", _py("trio_echo.py")),
        # The floor of one task per connection on trio (no DS, no streams):
        # what ds_trio's trio backend is measured against in docs.
        System(
            "trio-sketch",
            "trio wait_readable task per connection",
            _py("trio_sketch_echo.py"),
        ),
        System(
            "anyio-asyncio",
            "anyio streams on asyncio",
            _py("anyio_echo.py", "--backend", "asyncio"),
        ),
        System(
            "anyio-trio",
            "anyio streams on trio",
            _py("anyio_echo.py", "--backend", "trio"),
        ),
        System(
            "ds_trio-trio",
            "ds_trio on trio",
            _py("ds_trio_echo.py", "--backend", "trio"),
        ),
        # What callback mode buys on trio: the same server, every object
        # woken in its own task.
        System(
            "ds_trio-trio-tasks",
            "ds_trio on trio, callbacks=False",
            _py("ds_trio_echo.py", "--backend", "trio", "--tasks"),
        ),
        System(
            "ds_trio-asyncio",
            "ds_trio on asyncio",
            _py("ds_trio_echo.py", "--backend", "asyncio"),
        ),
        System(
            "ds_trio-uvloop",
            "ds_trio on uvloop",
            _py("ds_trio_echo.py", "--backend", "uvloop"),
        ),
    )
}

# The figures every other system is divided by, in the order of the columns.
REFERENCES: tuple[tuple[str, str], ...] = (
    ("asyncio", "asyncio"),
    ("perl-ds", "Perl DS"),
    ("c-epoll", "C"),
    # the trio target (<= 0.5x trio's own streams)
    ("trio", "trio"),
)


# --------------------------------------------------------------------------
# Scenarios and the two profiles.


@dataclass(frozen=True)
class Profile:
    """How long and how big: --quick iterates, full measures."""

    name: str
    rounds: int
    warmup_s: float
    duration_s: float
    bulk_total: int
    bulk_size: int
    bulk_cap_s: float
    idle_conns: int


PROFILES = {
    "full": Profile(
        "full",
        rounds=3,
        warmup_s=1.0,
        duration_s=4.0,
        bulk_total=256 * MIB,
        bulk_size=MIB,
        bulk_cap_s=30.0,
        idle_conns=10_000,
    ),
    "quick": Profile(
        "quick",
        rounds=2,
        warmup_s=0.3,
        duration_s=1.0,
        bulk_total=32 * MIB,
        bulk_size=MIB,
        bulk_cap_s=10.0,
        idle_conns=1000,
    ),
}


@dataclass(frozen=True)
class Scenario:
    """One workload: a loadgen mode at a connection count."""

    name: str
    mode: str  # pingpong | bulk | idle
    conns: int

    def title(self) -> str:
        if self.mode == "pingpong":
            return f"pingpong, {self.conns} connection{'s' * (self.conns > 1)}"
        if self.mode == "bulk":
            return f"bulk, {self.conns} connection{'s' * (self.conns > 1)}"
        return f"idle, {self.conns:,} connections"


def scenarios_for(profile: Profile) -> list[Scenario]:
    # idle first: it reads the server's RSS, best taken from a fresh process
    return [
        Scenario("idle", "idle", profile.idle_conns),
        Scenario("pingpong-1", "pingpong", 1),
        Scenario("pingpong-50", "pingpong", 50),
        Scenario("pingpong-500", "pingpong", 500),
        Scenario("bulk-1", "bulk", 1),
        Scenario("bulk-8", "bulk", 8),
    ]


# --------------------------------------------------------------------------
# Measurements.


@dataclass
class Measurement:
    """One (round, system, scenario) result; ``error`` set if it failed."""

    round: int
    system: str
    scenario: str
    rps: float | None = None
    mb_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_req: float | None = None
    cpu_source: str | None = None
    kib_per_conn: float | None = None
    rss_before_kib: int | None = None
    rss_holding_kib: int | None = None
    requests: int | None = None
    elapsed_s: float | None = None
    # CPUs' worth of user+system time used by neither the server nor the
    # load generator while this ran: someone else's work skewing it.
    background_cpu: float | None = None
    error: str | None = None


@dataclass
class RunResult:
    """Everything report.py needs."""

    started: str
    profile: Profile
    systems: list[System]
    scenarios: list[Scenario]
    skipped: dict[str, str]
    references: list[tuple[str, str]] = field(default_factory=list)
    quiet_threshold: float = 0.2
    measurements: list[Measurement] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


# --------------------------------------------------------------------------
# Toolchain: building the C programs, installing Perl DS.


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_c(source: Path, target: Path) -> str | None:
    """Compile *source* with ``cc -O2`` unless up to date; None or an error."""
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return None
    cc = shutil.which("cc")
    if cc is None:
        return "no C compiler (cc) on PATH"
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(target), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return f"cc failed on {source.name}: {proc.stderr.strip()[-500:]}"
    return None


def perl_ds_available() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = subprocess.run(
        ["perl", "-MPublicInbox::DS", "-MPublicInbox::Listener", "-e1"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def ensure_perl_ds(*, install: bool) -> str | None:
    """Make PublicInbox::DS 1.9 importable; None, or why it is not."""
    if perl_ds_available():
        return None
    if shutil.which("perl") is None:
        return "perl is not installed"
    if not install:
        return "libpublicinbox-perl is not installed (--no-install given)"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "libpublicinbox-perl is not installed and apt-get as root is unavailable"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # --no-install-recommends: the modules DS and Listener need are hard
    # dependencies; the recommends (git, xapian, ...) are for the daemons.
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "libpublicinbox-perl"]
    log("installing libpublicinbox-perl (Perl PublicInbox::DS 1.9) with apt-get ...")
    for attempt in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode == 0 and perl_ds_available():
            return None
        if attempt == 0:  # stale or missing package lists: refresh once
            subprocess.run(
                ["apt-get", "update"], env=env, capture_output=True, check=False
            )
    tail = proc.stderr.strip().splitlines()[-1:] or ["unknown error"]
    return f"apt-get install libpublicinbox-perl failed: {tail[0]}"


# --------------------------------------------------------------------------
# Process helpers.


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, inherited by every child.

    The Python servers raise their own too; this is what the Perl server and
    anything else started from here get.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def choose_cpus() -> tuple[int, int] | None:
    """(server CPU, loadgen CPU), or None when pinning is impossible."""
    if shutil.which("taskset") is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    # taskset execs the command, so the pid we get is the server's own
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)


def read_line(stream: IO[bytes], deadline: float) -> bytes | None:
    """One line from a pipe within *deadline*; None on EOF or timeout."""
    fd = stream.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1)  # byte by byte: never read past the line
        if not chunk:
            return None
        buf += chunk
    return buf


def cpu_seconds(pid: int) -> float | None:
    """The process's CPU time so far (sum over its threads), or None."""
    total = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            path = f"/proc/{pid}/task/{tid}/schedstat"
            with contextlib.suppress(OSError), open(path) as f:
                total += int(f.read().split()[0]) / 1e9
    except OSError:
        return None
    return total


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def server_env() -> dict[str, str]:
    """The environment for servers: the checkout's ds_trio importable even
    when it is not installed (a server's sys.path[0] is bench/servers)."""
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        PYTHONPATH=f"{REPO_DIR}{os.pathsep}{path}" if path else str(REPO_DIR),
    )


def _busy_seconds() -> float:
    """Busy time of all CPUs so far (/proc/stat: user through softirq).

    irq/softirq are in: without CONFIG_IRQ_TIME_ACCOUNTING (the usual
    configuration) the kernel bills the packet processing done in a task's
    context to that task as well, so the server's and loadgen's own times
    include it and must be subtracted from a total that includes it too.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    busy = user + nice + system + irq + softirq
    return busy / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    # waited-for children only: the loadgen counts once it exits; the
    # server, still running, does not
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class BackgroundMeter:
    """How much CPU others used during an interval, in CPUs."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.t0 = time.monotonic()
        self.busy0 = _busy_seconds()
        self.server0 = cpu_seconds(server_pid) or 0.0
        self.children0 = _children_seconds()

    def read(self) -> float:
        wall = time.monotonic() - self.t0
        ours = ((cpu_seconds(self.pid) or 0.0) - self.server0) + (
            _children_seconds() - self.children0
        )
        others = _busy_seconds() - self.busy0 - ours
        return max(0.0, others / wall) if wall > 0 else 0.0


def wait_until_quiet(server_pid: int, *, limit_s: float, threshold: float) -> None:
    """Wait (at most *limit_s*) for background CPU use to drop below
    *threshold* CPUs, sampled over 0.5 s."""
    deadline = time.monotonic() + limit_s
    while True:
        meter = BackgroundMeter(server_pid)
        time.sleep(0.5)
        load = meter.read()
        if load < threshold or time.monotonic() >= deadline:
            if load >= threshold:
                log(f"  machine still busy ({load:.2f} CPUs in use by others)")
            return
        time.sleep(1.0)


class SkipSystem(Exception):
    """The system cannot run here; the message says why."""


class Server:
    """A running echo server subprocess."""

    def __init__(self, system: System, cpu: int | None, log_path: Path) -> None:
        self.system = system
        argv = [a.replace("{port}", "0") for a in system.argv]
        if not Path(argv[0]).exists() and shutil.which(argv[0]) is None:
            raise SkipSystem(f"{argv[0]} not found")
        script = next((a for a in argv[1:] if a.endswith((".py", ".pl"))), None)
        if script is not None and not Path(script).exists():
            raise SkipSystem(f"{Path(script).name} not found")
        self.log_file = log_path.open("ab")
        self.log_file.write(f"--- {time.strftime('%H:%M:%S')} start\n".encode())
        self.log_file.flush()
        self.proc = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            cwd=REPO_DIR,
            env=server_env(),
        )
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, time.monotonic() + 30)
        if line is None or not line.startswith(b"READY "):
            code = self._stop()
            tail = self._log_tail(log_path)
            if code == EXIT_SKIP:
                raise SkipSystem(tail or "server exited with status 77")
            raise RuntimeError(
                f"server did not become ready (exit {code}): {tail or line!r}"
            )
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()
        return self.proc.returncode

    def stop(self) -> None:
        self._stop()

    @staticmethod
    def _log_tail(path: Path) -> str:
        lines = [
            ln
            for ln in path.read_text(errors="replace").splitlines()
            if ln and not ln.startswith("--- ")
        ]
        return lines[-1].strip() if lines else ""

    def quiesce(self, *, limit_s: float = 5.0) -> None:
        """Wait until the server stops burning CPU (e.g. closing 10,000
        connections after idle), so that work is not billed to the next
        scenario's window."""
        deadline = time.monotonic() + limit_s
        last = cpu_seconds(self.pid)
        while last is not None and time.monotonic() < deadline:
            time.sleep(0.1)
            now = cpu_seconds(self.pid)
            if now is None or now - last < 0.002:
                return
            last = now


# --------------------------------------------------------------------------
# Running the load generator.


def loadgen_argv(
    profile: Profile, scenario: Scenario, server: Server, cpu: int | None
) -> list[str]:
    argv = [
        str(BUILD_DIR / "loadgen"),
        f"--port={server.port}",
        f"--mode={scenario.mode}",
        f"--conns={scenario.conns}",
        f"--server-pid={server.pid}",
        "--timeout=240",
    ]
    if scenario.mode == "pingpong":
        argv += [f"--warmup={profile.warmup_s}", f"--duration={profile.duration_s}"]
    elif scenario.mode == "bulk":
        argv += [
            f"--bulk-total={profile.bulk_total}",
            f"--bulk-size={profile.bulk_size}",
            f"--duration={profile.bulk_cap_s}",
        ]
    else:
        argv += ["--hold=120"]
    return pinned(argv, cpu)


def prime(server: Server, cpu: int | None) -> None:
    """Put a fresh server through a short throwaway load before measuring.

    A benchmarked server should be in the state a long-running one is in.
    A fresh one is not: e.g. glibc raises its mmap threshold only after the
    first large block is freed, and until then asyncio's 256 KiB recv()
    buffer costs an mmap+mremap+munmap per read, tripling its CPU per
    request in whichever scenario happens to run first.  Results discarded.
    """
    loadgen = str(BUILD_DIR / "loadgen")
    runs = (
        ["--mode=pingpong", "--conns=50", "--warmup=0", "--duration=0.5"],
        ["--mode=bulk", "--conns=2", f"--bulk-total={8 * MIB}", f"--bulk-size={MIB}"],
    )
    for extra in runs:
        argv = [loadgen, f"--port={server.port}", "--timeout=60", *extra]
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            # failures surface in the real measurements
            subprocess.run(
                pinned(argv, cpu), capture_output=True, timeout=90, check=False
            )
    server.quiesce()


def parse_result(stdout: str) -> dict[str, object]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError("loadgen printed no result")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise RuntimeError("loadgen result is not an object")
    if "error" in result:
        raise RuntimeError(f"loadgen: {result['error']}")
    return result


def _num(result: dict[str, object], key: str) -> float | None:
    value = result.get(key)
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    return None


def run_idle(argv: list[str], server: Server, m: Measurement) -> None:
    m.rss_before_kib = vm_rss_kib(server.pid)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        line = read_line(proc.stdout, time.monotonic() + 240)
        if line is None or b'"holding"' not in line:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(
                f"loadgen never held its connections: {(line or b'') + out!r} "
                f"{err.decode(errors='replace').strip()[-300:]}"
            )
        # The connections are established and served: what the server
        # holds now, minus what it held before, is their cost.
        m.rss_holding_kib = vm_rss_kib(server.pid)
        proc.stdin.write(b"release\n")
        proc.stdin.flush()
        out_b, err_b = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = parse_result(out_b.decode())
    held = _num(result, "held") or 0
    if m.rss_before_kib is not None and m.rss_holding_kib is not None and held:
        m.kib_per_conn = (m.rss_holding_kib - m.rss_before_kib) / held
    m.requests = int(held)
    m.elapsed_s = _num(result, "elapsed_s")
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exit {proc.returncode}: {err_b.decode()[-300:]}")


def measure(
    profile: Profile,
    scenario: Scenario,
    server: Server,
    cpu: int | None,
    m: Measurement,
) -> None:
    argv = loadgen_argv(profile, scenario, server, cpu)
    meter = BackgroundMeter(server.pid)
    if scenario.mode == "idle":
        try:
            run_idle(argv, server, m)
        finally:
            m.background_cpu = meter.read()
        return
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False
    )
    m.background_cpu = meter.read()
    result = parse_result(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exit {proc.returncode}: {proc.stderr[-300:]}")
    m.rps = _num(result, "rps")
    m.mb_per_s = _num(result, "mb_per_s") if scenario.mode == "bulk" else None
    m.p50_us = _num(result, "p50_us")
    m.p99_us = _num(result, "p99_us")
    m.cpu_us_per_req = _num(result, "cpu_us_per_req")
    source = result.get("cpu_source")
    m.cpu_source = source if isinstance(source, str) else None
    m.requests = int(_num(result, "requests") or 0)
    m.elapsed_s = _num(result, "elapsed_s")


def describe(m: Measurement, scenario: Scenario) -> str:
    if m.error:
        return f"FAILED: {m.error}"
    noisy = (
        f"  [others used {m.background_cpu:.2f} CPU]"
        if m.background_cpu is not None and m.background_cpu >= QUIET_THRESHOLD
        else ""
    )
    return _describe(m, scenario) + noisy


def _describe(m: Measurement, scenario: Scenario) -> str:
    if scenario.mode == "idle":
        return f"{m.kib_per_conn:.2f} KiB/conn" if m.kib_per_conn is not None else "?"
    cpu = f"{m.cpu_us_per_req:.1f}" if m.cpu_us_per_req is not None else "?"
    if scenario.mode == "bulk":
        return f"{m.mb_per_s or 0:.0f} MB/s, cpu {cpu} us/req"
    return f"{m.rps or 0:.0f} req/s, p99 {m.p99_us or 0:.0f} us, cpu {cpu} us/req"


# --------------------------------------------------------------------------
# The run.


def select_names(spec: str | None, known: Sequence[str], what: str) -> list[str]:
    """Comma-separated names or prefixes ("pingpong" = all pingpong-*)."""
    if not spec:
        return list(known)
    chosen: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        matches = [k for k in known if k == word or k.startswith(word + "-")]
        if not matches:
            raise SystemExit(f"unknown {what} {word!r}; known: {', '.join(known)}")
        chosen += [k for k in matches if k not in chosen]
    return [k for k in known if k in chosen]  # registry order


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """Round r starts r places further along, so each system takes each
    position in turn."""
    n = len(names)
    for r in range(rounds):
        k = r % n if n else 0
        yield list(names[k:]) + list(names[:k])


def environment(cpus: tuple[int, int] | None, nofile: int) -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cc_version = ""
    if shutil.which("cc"):
        out = subprocess.run(
            ["cc", "--version"], capture_output=True, text=True, check=False
        ).stdout
        cc_version = out.splitlines()[0] if out else ""
    perl = (
        subprocess.run(
            ["perl", "-e", "print $^V"], capture_output=True, text=True, check=False
        ).stdout
        if shutil.which("perl")
        else ""
    )
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "cc": cc_version,
        "perl": perl,
        "pinning": (
            f"server on CPU {cpus[0]}, loadgen on CPU {cpus[1]} (taskset)"
            if cpus
            else "none (fewer than 2 CPUs or no taskset): figures are noisier"
        ),
        "nofile": str(nofile),
    }


def run(args: argparse.Namespace) -> RunResult:
    profile = PROFILES["quick" if args.quick else "full"]
    if args.rounds:
        profile = Profile(**{**asdict(profile), "rounds": args.rounds})
    if args.duration:
        profile = Profile(**{**asdict(profile), "duration_s": args.duration})
    if args.idle_conns:
        profile = Profile(**{**asdict(profile), "idle_conns": args.idle_conns})
    if args.bulk_mib:
        profile = Profile(**{**asdict(profile), "bulk_total": args.bulk_mib * MIB})
    all_scenarios = scenarios_for(profile)
    names = select_names(args.scenarios, [s.name for s in all_scenarios], "scenario")
    scenarios = [s for s in all_scenarios if s.name in names]
    systems = [SYSTEMS[n] for n in select_names(args.systems, list(SYSTEMS), "system")]

    err = build_c(BENCH_DIR / "loadgen.c", BUILD_DIR / "loadgen")
    if err:
        raise SystemExit(f"cannot build the load generator: {err}")
    skipped: dict[str, str] = {}
    needs: dict[str, str | None] = {}
    if any(s.needs == "cc" for s in systems):
        needs["cc"] = build_c(SERVERS_DIR / "c_echo.c", BUILD_DIR / "c_echo")
    if any(s.needs == "perl-ds" for s in systems):
        needs["perl-ds"] = ensure_perl_ds(install=not args.no_install)
    for s in systems:
        why = needs.get(s.needs) if s.needs else None
        if why:
            skipped[s.name] = why
            log(f"skipping {s.name}: {why}")

    nofile = raise_nofile_limit()
    if nofile < profile.idle_conns + 64:
        log(f"warning: RLIMIT_NOFILE is {nofile}, idle needs {profile.idle_conns}")
    cpus = None if args.no_pin else choose_cpus()
    server_cpu, loadgen_cpu = cpus if cpus else (None, None)

    started = datetime.now()
    out_dir = (
        Path(args.out) if args.out else RESULTS_DIR / started.strftime("%Y%m%d-%H%M%S")
    )
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = RunResult(
        started=started.isoformat(timespec="seconds"),
        profile=profile,
        systems=systems,
        scenarios=scenarios,
        skipped=skipped,
        references=list(REFERENCES),
        quiet_threshold=QUIET_THRESHOLD,
        environment=environment(cpus, nofile),
    )
    log(
        f"profile {profile.name}: {profile.rounds} rounds, "
        f"{len(systems) - len(skipped)} systems, {len(scenarios)} scenarios; "
        f"pinning: {result.environment['pinning']}; output {out_dir}"
    )

    t0 = time.monotonic()
    all_names = [s.name for s in systems]
    for rnd, rotated in enumerate(rotations(all_names, profile.rounds), 1):
        order = [n for n in rotated if n not in skipped]
        result.orders.append(order)
        log(f"== round {rnd}/{profile.rounds}: {' '.join(order)}")
        for name in order:
            if name in skipped:  # found out earlier in this round
                continue
            system = SYSTEMS[name]
            try:
                server = Server(system, server_cpu, logs / f"{name}.log")
            except SkipSystem as e:
                skipped[name] = str(e)
                log(f"  {name}: skipped: {e}")
                continue
            except (RuntimeError, OSError) as e:
                for sc in scenarios:
                    result.measurements.append(
                        Measurement(rnd, name, sc.name, error=str(e))
                    )
                log(f"  {name}: FAILED to start: {e}")
                continue
            try:
                prime(server, loadgen_cpu)
                for sc in scenarios:
                    m = Measurement(rnd, name, sc.name)
                    if not server.alive():
                        m.error = f"server died (exit {server.proc.returncode})"
                    else:
                        if args.wait_quiet > 0:
                            wait_until_quiet(
                                server.pid,
                                limit_s=args.wait_quiet,
                                threshold=QUIET_THRESHOLD,
                            )
                        try:
                            measure(profile, sc, server, loadgen_cpu, m)
                        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                            m.error = str(e)
                        server.quiesce()
                    result.measurements.append(m)
                    log(f"  {name:16} {sc.name:13} {describe(m, sc)}")
            finally:
                server.stop()
    result.wall_s = time.monotonic() - t0

    (out_dir / "results.json").write_text(report.to_json(result))
    md = report.markdown(result, image="results.png")
    (out_dir / "results.md").write_text(md)
    png = report.plot(result, out_dir / "results.png")
    if out_dir.parent == RESULTS_DIR:
        # latest.md sits beside the run directories: its image is one level down
        latest = report.markdown(result, image=f"{out_dir.name}/results.png")
        (RESULTS_DIR / "latest.md").write_text(latest)
    log(
        f"done in {result.wall_s / 60:.1f} min: {out_dir / 'results.md'}"
        + ("" if png else " (no plot: matplotlib missing)")
    )
    print(md)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, 2 rounds")
    parser.add_argument("--systems", help="comma-separated systems (default: all)")
    parser.add_argument(
        "--scenarios", help="comma-separated scenarios or prefixes (default: all)"
    )
    parser.add_argument("--rounds", type=int, help="override the profile's rounds")
    parser.add_argument("--duration", type=float, help="pingpong seconds measured")
    parser.add_argument("--idle-conns", type=int, help="connections held in idle")
    parser.add_argument("--bulk-mib", type=int, help="MiB transferred per bulk run")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get libpublicinbox-perl"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other "
        f"processes to use less than {QUIET_THRESHOLD} CPU",
    )
    parser.add_argument("--out", help="output directory (default: results/<time>)")
    parser.add_argument("--list", action="store_true", help="list and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in SYSTEMS.values():
            print(f"system   {s.name:16} {s.label}")
        for sc in scenarios_for(PROFILES["quick" if args.quick else "full"]):
            print(f"scenario {sc.name:16} {sc.title()}")
        return
    run(args)


if __name__ == "__main__":
    main()
