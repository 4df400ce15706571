"""The long tier of the fault suite: the echo example under sustained load.

    .venv/bin/python bench/soak.py --quick            # ~60 s
    .venv/bin/python bench/soak.py                    # a few minutes
    .venv/bin/python bench/soak.py --duration 3600    # an hour
    .venv/bin/python bench/soak.py --backends trio,asyncio,uvloop

For each backend, the echo example runs alone in a child process
(``bench/loadserver.py``, which answers ``stats`` on a control pipe) and
this process drives it from one epoll loop:

1. **throughput**, in alternating rounds: 50 workers doing line ping-pong
   alone, then the same 50 workers beside 1,000 slowloris clients (a byte a
   second each, never a newline).  Lines/s side by side, per-round ratio.
2. **soak** for the rest of the duration, everything at once: 10,000
   connections held, each echoing a line every EXPTIME/2 (so none
   is idle long enough to expire); 1,000 tricklers, replaced as the server
   expires them; 50 workers; and a stream of short-lived connections that
   break at random points (RST mid-line, RST with spilled output queued,
   half-close after a line, RST after the echo).
3. **final check**: every client closed; the server must be back to its
   starting fds and tasks, with no spill file and no zombie child.

The server's ``EXPTIME`` is ``--exptime`` (default 20 s).  Its idle check
runs on ``later``'s 60 s batches; in runs shorter than ten minutes this
script also asks for a check (``expire`` on the control pipe) every
EXPTIME/2 seconds, so tricklers are seen to expire in a ``--quick`` run.

Output: the fault table (``tests/faultlib.py``'s rows: scenario, load held,
faults injected, bytes lost, fds / spill files / tasks / zombies leaked)
and the throughput table, as Markdown on stdout and in ``--out`` (default
``bench/results/soak-<time>.md``).  Exit status 1 if a byte was lost or
anything leaked.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import resource
import select
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.faultlib import FaultRow, markdown  # noqa: E402
from tests.loadclients import HOST, Pool, ServerProcess, raise_nofile  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _benchutil import fmt_range, md_table  # noqa: E402

LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


@dataclass
class Counters:
    worker_lines: int = 0
    idle_lines: int = 0
    idle_closed: int = 0
    trickler_expired: int = 0
    trickler_lifetimes: list[float] = field(default_factory=list)
    churn: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def lose(self, kind: str, n: int, why: str) -> None:
        self.lost[kind] = self.lost.get(kind, 0) + n
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {why}")


class Conn:
    """One client connection and what it waits for."""

    __slots__ = ("born", "expect", "got", "kind", "sent_at", "sock", "state")

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.kind = kind
        self.expect = b""
        self.got = bytearray()
        self.born = time.monotonic()
        self.sent_at = 0.0
        self.state = ""


class Driver:
    """All client connections, one epoll set, timers on a heap."""

    def __init__(self, port: int, counters: Counters, rng: random.Random) -> None:
        self.addr = (HOST, port)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.c = counters
        self.rng = rng
        self.timers: list[tuple[float, int, object]] = []
        self.seq = 0

    # -- connections ----------------------------------------------------

    def open(self, kind: str, rcvbuf: int = 0) -> Conn | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:  # before connect: the window is fixed small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            sock.connect(self.addr)
        except BlockingIOError:
            pass
        except OSError as exc:
            sock.close()
            self.c.errors.append(f"connect: {exc}")
            return None
        return self.adopt(sock, kind)

    def adopt(self, sock: socket.socket, kind: str) -> Conn:
        conn = Conn(sock, kind)
        self.conns[sock.fileno()] = conn
        self.ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        return conn

    def close(self, conn: Conn, *, rst: bool = False) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self.conns.get(fd) is not conn:
            return
        del self.conns[fd]
        self.ep.unregister(fd)
        if rst:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        conn.sock.close()

    def send_line(self, conn: Conn, line: bytes) -> None:
        conn.expect = line
        conn.sent_at = time.monotonic()
        conn.got.clear()
        try:
            conn.sock.sendall(line)  # short lines: the socket buffer takes them
        except OSError as exc:
            self.c.lose(conn.kind, len(line), f"send: {exc}")
            self.close(conn)

    # -- timers -----------------------------------------------------------

    def at(self, when: float, action: object) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, action))

    # -- the loop ---------------------------------------------------------

    def run_until(self, deadline: float, on_tick: object = None) -> None:
        while True:
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, action = heapq.heappop(self.timers)
                action()  # type: ignore[operator]
            if now >= deadline:
                return
            nxt = min(deadline, self.timers[0][0] if self.timers else deadline)
            for fd, ev in self.ep.poll(max(0.0, nxt - now), 512):
                conn = self.conns.get(fd)
                if conn is not None:
                    self.readable(conn, ev)

    def readable(self, conn: Conn, _ev: int) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        handler = getattr(self, f"on_{conn.kind}")
        handler(conn, data)

    # -- behaviours: data (b"" is EOF or reset) ------------------------------

    def _echo_progress(self, conn: Conn, data: bytes) -> bool | None:
        """Add ``data``; True when the expected echo is complete and exact."""
        if not data:
            return None
        conn.got += data
        if len(conn.got) < len(conn.expect):
            return False
        if conn.got != conn.expect:
            self.c.lose(conn.kind, len(conn.expect), "echo differs")
        conn.got.clear()
        conn.expect = b""
        return True

    def on_worker(self, conn: Conn, data: bytes) -> None:
        done = self._echo_progress(conn, data)
        if done is None:
            self.c.lose("worker", len(conn.expect) - len(conn.got), "closed by server")
            self.close(conn)
        elif done:
            self.c.worker_lines += 1
            if conn.state != "stopping":
                self.send_line(conn, self.line(conn, 100))

    def on_idle(self, conn: Conn, data: bytes) -> None:
        done = self._echo_progress(conn, data)
        if done is None:
            self.c.idle_closed += 1
            now = time.monotonic()
            lag = f"{now - conn.born:.1f} s after its last echo" + (
                f", a line sent {now - conn.sent_at:.1f} s before unanswered"
                if conn.expect
                else ""
            )
            self.c.lose("idle", len(conn.expect) - len(conn.got), f"closed {lag}")
            self.close(conn)
        elif done:
            self.c.idle_lines += 1
            conn.born = time.monotonic()  # held conns: time of the last echo

    def on_trickler(self, conn: Conn, data: bytes) -> None:
        if data:
            self.c.errors.append(f"trickler got {data[:20]!r}")
        self.c.trickler_expired += 1
        self.c.trickler_lifetimes.append(time.monotonic() - conn.born)
        self.close(conn)
        if self.tricklers_wanted:
            self.open_trickler(conn.kind)

    def on_half_close(self, conn: Conn, data: bytes) -> None:
        if data:
            conn.got += data
            return
        if conn.got != conn.expect:
            self.c.lose("half_close", len(conn.expect), f"got {len(conn.got)} bytes")
        self.close(conn)

    def on_rst_after_echo(self, conn: Conn, data: bytes) -> None:
        done = self._echo_progress(conn, data)
        if done is None:
            self.c.lose("rst_after_echo", len(conn.expect), "closed before the echo")
            self.close(conn)
        elif done:
            self.close(conn, rst=True)

    def on_spill_rst(self, conn: Conn, data: bytes) -> None:
        if not data:
            self.close(conn)
        # otherwise: echoes we never meant to read all of

    def on_rst_mid_line(self, conn: Conn, data: bytes) -> None:
        if not data:
            self.close(conn)

    # -- httpd behaviours ---------------------------------------------------

    http_files: dict[bytes, bytes] = {}  # noqa: RUF012 - set per soak

    def http_get(self, conn: Conn, path: bytes) -> None:
        conn.state = path.decode()
        self.send_line(conn, b"GET " + path + b" HTTP/1.1\r\nHost: soak\r\n\r\n")
        conn.expect = self.http_files[path]  # the body that must come back

    def on_http_worker(self, conn: Conn, data: bytes) -> None:
        if not data:
            self.c.lose("http_worker", len(conn.expect), "closed by server")
            self.close(conn)
            return
        conn.got += data
        end = conn.got.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(conn.got[:end]).lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if len(conn.got) < end + 4 + length:
            return
        body = bytes(conn.got[end + 4 : end + 4 + length])
        if not head.startswith(b"http/1.1 200") or body != conn.expect:
            self.c.lose("http_worker", len(conn.expect), f"bad response {head[:40]!r}")
        del conn.got[: end + 4 + length]
        conn.expect = b""  # answered: nothing owed (stop_conns waits on it)
        self.c.worker_lines += 1
        if conn.state != "stopping":
            self.http_get(conn, self.rng.choice(list(self.http_files)))

    def on_http_rst(self, conn: Conn, data: bytes) -> None:
        if not data:
            self.close(conn)

    on_http_trickler = on_trickler

    def http_churn(self) -> None:
        """A download reset midway: the server holds a file fd and spills."""
        self.c.churn["http_rst"] = self.c.churn.get("http_rst", 0) + 1
        conn = self.open("http_rst", rcvbuf=1024)
        if conn is None:
            return
        try:
            conn.sock.send(b"GET /big.bin HTTP/1.1\r\n\r\n")
        except OSError:
            self.close(conn)
            return
        self.at(
            time.monotonic() + self.rng.uniform(0.05, 1.0),
            lambda: self.close(conn, rst=True),
        )

    def open_trickler(self, kind: str = "trickler") -> Conn | None:
        conn = self.open(kind)
        if conn is not None and kind == "http_trickler":
            # A request head that never ends: a header value, a byte a tick.
            try:
                conn.sock.send(b"GET /small.txt HTTP/1.1\r\nX-Slow: ")
            except OSError:
                pass
        return conn

    # -- load -----------------------------------------------------------------

    tricklers_wanted = False

    def line(self, conn: Conn, n: int) -> bytes:
        body = b"%d %s " % (conn.sock.fileno(), conn.kind.encode())
        return body + b"." * max(0, n - len(body) - 1) + b"\n"

    def start_workers(self, n: int) -> list[Conn]:
        workers = [c for c in (self.open("worker") for _ in range(n)) if c]
        for conn in workers:
            self.send_line(conn, self.line(conn, 100))
        return workers

    def stop_conns(self, conns: list[Conn]) -> None:
        for conn in conns:
            conn.state = "stopping"
        for conn in conns:
            if conn.expect and conn.sock.fileno() >= 0:
                # Wait for the echo in flight: stopping loses nothing.
                deadline = time.monotonic() + 10
                while conn.expect and time.monotonic() < deadline:
                    self.run_until(time.monotonic() + 0.01)
            self.close(conn)

    SPILL_BLOCK = b"s" * 60000 + b"\n"

    def pump(self, conn: Conn, until: float) -> None:
        if conn.sock.fileno() < 0:
            return
        if time.monotonic() >= until:
            self.close(conn, rst=True)
            return
        try:
            for _ in range(3):  # up to ~1.8 MB/s per connection
                conn.sock.send(self.SPILL_BLOCK)
        except BlockingIOError:
            pass
        except OSError:
            self.close(conn)
            return
        self.at(time.monotonic() + 0.1, lambda: self.pump(conn, until))

    def trickle(self) -> None:
        """Every trickler sends its byte (one action for all: cheap)."""
        for conn in list(self.conns.values()):
            if conn.kind in ("trickler", "http_trickler"):
                try:
                    conn.sock.send(b"x")
                except OSError:
                    self.on_trickler(conn, b"")
        if self.tricklers_wanted:
            self.at(time.monotonic() + 1.0, self.trickle)

    def churn(self) -> None:
        """One short-lived connection that breaks at a random point."""
        kind = self.rng.choice(
            ["rst_mid_line", "spill_rst", "half_close", "rst_after_echo"]
        )
        self.c.churn[kind] = self.c.churn.get(kind, 0) + 1
        conn = self.open(kind, rcvbuf=1024 if kind == "spill_rst" else 0)
        if conn is None:
            return
        if kind == "rst_mid_line":
            try:
                conn.sock.send(b"partial line, never ended")
            except OSError:
                pass
            self.at(
                time.monotonic() + self.rng.uniform(0, 0.2),
                lambda: self.close(conn, rst=True),
            )
        elif kind == "spill_rst":
            # Long lines sent for a while, echoes never read: the server's
            # socket fills and its echoes spill; then the reset drops them.
            self.pump(conn, time.monotonic() + self.rng.uniform(0.3, 1.5))
        elif kind == "half_close":
            self.send_line(conn, self.line(conn, self.rng.randint(2, 3000)))
            if conn.sock.fileno() >= 0:
                conn.sock.shutdown(socket.SHUT_WR)
        else:
            self.send_line(conn, self.line(conn, self.rng.randint(2, 3000)))


# ----------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------


def throughput_rounds(
    driver: Driver, rounds: int, seconds: float, tricklers: int, workers: int
) -> tuple[list[float], list[float]]:
    alone, loaded = [], []
    for _ in range(rounds):
        for with_tricklers in (False, True):
            trick: list[Conn] = []
            if with_tricklers:
                driver.tricklers_wanted = True
                trick = [
                    c for c in (driver.open("trickler") for _ in range(tricklers)) if c
                ]
                driver.run_until(time.monotonic() + 1.0)  # let them connect
                driver.at(time.monotonic(), driver.trickle)
            ws = driver.start_workers(workers)
            driver.run_until(time.monotonic() + 0.3)  # warm-up
            before, t0 = driver.c.worker_lines, time.monotonic()
            driver.run_until(t0 + seconds)
            rate = (driver.c.worker_lines - before) / (time.monotonic() - t0)
            driver.stop_conns(ws)
            if with_tricklers:
                driver.tricklers_wanted = False
                driver.timers = [t for t in driver.timers if t[2] != driver.trickle]
                heapq.heapify(driver.timers)
                for conn in [c for c in driver.conns.values() if c.kind == "trickler"]:
                    driver.close(conn)
                loaded.append(rate)
                del trick
            else:
                alone.append(rate)
    return alone, loaded


def soak_backend(backend: str, args: argparse.Namespace) -> tuple[list[FaultRow], str]:
    rng = random.Random(args.seed)
    counters = Counters()
    log_path = args.out_dir / f"soak-{args.stamp}-{backend}.log"
    log_file = log_path.open("wb")
    server = ServerProcess(
        "echo", backend, exptime=args.exptime, sndbuf=args.sndbuf, stderr=log_file
    )
    rows: list[FaultRow] = []
    try:
        base = server.stats()
        driver = Driver(server.port, counters, rng)
        start = time.monotonic()
        end = start + args.duration

        # 1. Throughput with and without tricklers.
        alone, loaded = throughput_rounds(
            driver, args.rounds, args.round_seconds, args.tricklers, args.workers
        )
        server.wait_registered(base["registered"])
        expired_in_rounds = counters.trickler_expired

        # 2. The soak: everything at once.
        pool = Pool(server.port)
        pool.connect(
            args.conns,
            accepted=lambda n: server.wait_registered(base["registered"] + n),
        )
        held = server.stats()
        rss_per_conn = (held["rss_kib"] - base["rss_kib"]) / max(1, args.conns)
        idle = [driver.adopt(s, "idle") for s in pool.socks]
        pool.socks = []  # the driver owns them now
        driver.tricklers_wanted = True
        for _ in range(args.tricklers):
            driver.open("trickler")
        driver.at(time.monotonic() + 1.0, driver.trickle)
        workers = driver.start_workers(args.workers)

        # Each held connection echoes a line every EXPTIME/2 (a margin for
        # late ticks): none is idle long enough to expire.  Small batches
        # often, so the workers do not wait behind bursts.
        period = args.exptime / 2
        tick = 0.02
        per_tick = max(1, round(len(idle) * tick / period))
        cursor = [0]

        def activate() -> None:
            for _ in range(per_tick):
                conn = idle[cursor[0] % len(idle)]
                cursor[0] += 1
                if conn.sock.fileno() >= 0 and not conn.expect:
                    driver.send_line(conn, driver.line(conn, rng.randint(2, 200)))
            driver.at(time.monotonic() + tick, activate)

        def churn_tick() -> None:
            for _ in range(max(1, int(args.churn_rate * 0.1))):
                driver.churn()
            driver.at(time.monotonic() + 0.1, churn_tick)

        samples: list[dict[str, int]] = []

        def sample() -> None:
            if os.environ.get("SOAK_DEBUG"):
                print(
                    f"{time.monotonic() - soak_start:.1f}s"
                    f" workers {counters.worker_lines}"
                    f" idle {counters.idle_lines} expired {counters.trickler_expired}"
                    f" conns {len(driver.conns)} timers {len(driver.timers)}",
                    file=sys.stderr,
                )
            # Short runs ask for the idle check (see the module docstring).
            st = server.command("expire" if args.duration < 600 else "stats")
            if "error" not in st:  # EMFILE under an fd clamp: next time
                samples.append(st)
            driver.at(time.monotonic() + args.exptime / 2, sample)

        clamps = [0]
        soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)

        def clamp_fds() -> None:
            # Resource fault: the server's fd limit drops to what it holds
            # plus a few, for one second: accept() and spill files hit
            # EMFILE, then the limit comes back.
            held_fds = len(server.proc_fds())
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (held_fds + 2, hard))
            clamps[0] += 1
            driver.at(time.monotonic() + 1.0, unclamp_fds)

        def unclamp_fds() -> None:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
            driver.at(time.monotonic() + args.fd_fault_every, clamp_fds)

        if args.fd_fault_every > 0:
            driver.at(time.monotonic() + args.fd_fault_every / 2, clamp_fds)
        driver.at(time.monotonic(), activate)
        driver.at(time.monotonic() + 0.05, churn_tick)
        driver.at(time.monotonic() + args.exptime / 2, sample)
        soak_start = time.monotonic()
        lines_before = counters.worker_lines
        driver.run_until(max(end, soak_start + 1.6 * args.exptime))
        soak_secs = time.monotonic() - soak_start
        soak_rate = (counters.worker_lines - lines_before) / soak_secs

        # 3. Stop, drain, final check.
        driver.timers.clear()
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
        driver.tricklers_wanted = False
        driver.stop_conns(workers)
        driver.stop_conns([c for c in idle if c.expect])
        # Let the last short-lived connections finish (their own timers were
        # dropped: break them now).
        for conn in list(driver.conns.values()):
            if conn.kind in ("rst_mid_line", "spill_rst"):
                driver.close(conn, rst=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            c.kind in ("half_close", "rst_after_echo") for c in driver.conns.values()
        ):
            driver.run_until(time.monotonic() + 0.05)
        alive_idle = args.conns - counters.idle_closed
        for conn in list(driver.conns.values()):
            driver.close(conn)
        driver.ep.close()
        pool.ep.close()
        after = settle(server, base)
        final = FaultRow(
            "final check (server /proc)",
            backend,
            f"{args.duration:.0f} s run",
            "all of the above",
            fds=after["fds"] - base["fds"],
            spill=after["spill"] - base["spill"],
            tasks=after["tasks"] - base["tasks"],
            zombies=server.zombies(),
            note=(
                f"RSS {base['rss_kib'] / 1024:.0f} MiB at start,"
                f" {held['rss_kib'] / 1024:.0f} MiB holding {args.conns:,},"
                + (
                    f" {samples[0]['rss_kib'] / 1024:.0f} ->"
                    f" {samples[-1]['rss_kib'] / 1024:.0f}"
                    " MiB over the soak,"
                    if samples
                    else ""
                )
                + f" {after['rss_kib'] / 1024:.0f} MiB after;"
                f" {after['bytes_spilled'] / 2**20:.1f} MiB spilled in all"
            ),
        )
        status = server.quit()
        if status != 0:
            counters.errors.append(f"server exit status {status}")
        lost = counters.lost
        lives = counters.trickler_lifetimes
        rows += [
            FaultRow(
                "10k conns held, idle+active",
                backend,
                f"{args.conns:,} conns, each echoing a line every <= {period:g} s",
                "none (must all survive)",
                bytes_lost=lost.get("idle", 0),
                note=f"{counters.idle_lines:,} lines echoed;"
                f" {alive_idle:,}/{args.conns:,}"
                f" still open at the end; RSS {rss_per_conn:.1f} KiB/conn",
            ),
            FaultRow(
                "slowloris",
                backend,
                f"{args.workers} workers + {args.tricklers:,} tricklers (replaced)",
                f"{counters.trickler_expired - expired_in_rounds:,} tricklers expired"
                f" (EXPTIME {args.exptime:g} s)",
                bytes_lost=lost.get("worker", 0) + lost.get("trickler", 0),
                note=(
                    f"lifetimes {min(lives):.0f}-{max(lives):.0f} s"
                    if lives
                    else "none expired"
                ),
            ),
            FaultRow(
                "abrupt disconnects",
                backend,
                f"~{args.churn_rate:g} short-lived conns/s",
                ", ".join(f"{n:,} {k}" for k, n in sorted(counters.churn.items())),
                bytes_lost=sum(
                    lost.get(k, 0) for k in ("half_close", "rst_after_echo")
                ),
                note="spill_rst: 60 KB lines sent for 0.3-1.5 s, echoes never read,"
                " then RST",
            ),
            final,
        ]
        log_file.close()
        log_text = log_path.read_text(errors="replace")
        if args.fd_fault_every > 0:
            rows.insert(
                3,
                FaultRow(
                    "fd exhaustion (EMFILE)",
                    backend,
                    "all of the above",
                    f"{clamps[0]} x 1 s with the fd limit at held + 2",
                    note=f"{log_text.count('pausing')} accept back-offs,"
                    f" {log_text.count('dropped')} writes dropped (spill failed)"
                    f" logged; server log: {log_path.name}",
                ),
            )
        if alive_idle != args.conns:
            counters.errors.append(f"{args.conns - alive_idle} held connections lost")
        ratio = [b / a for a, b in zip(alone, loaded, strict=False) if a]
        tput = md_table(
            [
                "backend",
                "workers alone (lines/s)",
                "with tricklers (lines/s)",
                "ratio",
                "in the soak (lines/s)",
            ],
            [
                [
                    backend,
                    fmt_range(alone, ".0f"),
                    fmt_range(loaded, ".0f"),
                    fmt_range(ratio, ".2f"),
                    f"{soak_rate:.0f}",
                ]
            ],
        )
        if counters.errors:
            print(f"{backend}: errors: {counters.errors}", file=sys.stderr)
            rows[-1].note += f"; ERRORS: {len(counters.errors)}"
        return rows, tput
    finally:
        server.kill()


def settle(server: ServerProcess, base: dict[str, int]) -> dict[str, int]:
    """The server's stats once it is back to ``base`` (or after 30 s: leaks).

    What it still holds beyond ``base`` is listed on stderr.
    """
    before = server.proc_fds()
    try:
        server.wait_registered(base["registered"])
        return server.wait_stats(
            lambda st: st["fds"] <= base["fds"] and st["tasks"] <= base["tasks"],
            timeout=30,
        )
    except TimeoutError:
        st = server.stats()
        fds = server.proc_fds()
        extra = sorted(t for fd, t in fds.items() if before.get(fd) != t or fd > 20)
        print(f"server still holds: {st}; fds: {extra[:40]}", file=sys.stderr)
        return st


def soak_httpd(backend: str, args: argparse.Namespace) -> FaultRow:
    """The httpd example: keep-alive GETs, header tricklers, resets mid-download."""
    rng = random.Random(args.seed)
    counters = Counters()
    root = Path(tempfile.mkdtemp(prefix="soak-httpd-"))
    files = {
        b"/small.txt": b"hello, world\n",
        b"/page.html": rng.randbytes(20_000),
        b"/mid.bin": rng.randbytes(300_000),
    }
    for name, body in files.items():
        (root / name.decode().lstrip("/")).write_bytes(body)
    (root / "big.bin").write_bytes(rng.randbytes(8 << 20))
    log_path = args.out_dir / f"soak-{args.stamp}-{backend}-httpd.log"
    log_file = log_path.open("wb")
    server = ServerProcess(
        "httpd",
        backend,
        exptime=args.exptime,
        root=str(root),
        sndbuf=args.sndbuf,
        stderr=log_file,
    )
    try:
        base = server.stats()
        driver = Driver(server.port, counters, rng)
        driver.http_files = files
        workers = [
            c for c in (driver.open("http_worker") for _ in range(args.workers)) if c
        ]
        for conn in workers:
            driver.http_get(conn, rng.choice(list(files)))
        driver.tricklers_wanted = True
        for _ in range(args.tricklers):
            driver.open_trickler("http_trickler")
        driver.at(time.monotonic() + 1.0, driver.trickle)

        def churn_tick() -> None:
            for _ in range(max(1, int(args.churn_rate * 0.1))):
                driver.http_churn()
            driver.at(time.monotonic() + 0.1, churn_tick)

        def check() -> None:
            st = server.command("expire" if args.duration < 600 else "stats")
            if os.environ.get("SOAK_DEBUG"):
                print(f"httpd check: {st}", file=sys.stderr)
            driver.at(time.monotonic() + args.exptime / 2, check)

        driver.at(time.monotonic() + 0.05, churn_tick)
        driver.at(time.monotonic() + args.exptime / 2, check)
        t0 = time.monotonic()
        driver.run_until(t0 + max(args.http_duration, 1.6 * args.exptime))
        secs = time.monotonic() - t0
        driver.timers.clear()
        driver.tricklers_wanted = False
        driver.stop_conns(workers)
        for conn in list(driver.conns.values()):
            driver.close(conn, rst=conn.kind == "http_rst")
        driver.ep.close()
        after = settle(server, base)
        row = FaultRow(
            "httpd: GETs, slowloris, resets",
            backend,
            f"{args.workers} keep-alive clients GETting 13 B-300 KB files,"
            f" {args.tricklers:,} header tricklers (replaced)",
            f"{counters.trickler_expired:,} tricklers expired,"
            f" {counters.churn.get('http_rst', 0):,} 8 MiB downloads reset midway",
            bytes_lost=sum(counters.lost.values()),
            fds=after["fds"] - base["fds"],
            spill=after["spill"] - base["spill"],
            tasks=after["tasks"] - base["tasks"],
            zombies=server.zombies(),
            note=f"{counters.worker_lines:,} responses checked in {secs:.0f} s;"
            f" {after['bytes_spilled'] / 2**20:.1f} MiB spilled; server log:"
            f" {log_path.name}",
        )
        status = server.quit()
        if status != 0 or counters.errors:
            print(f"{backend} httpd: exit {status}, {counters.errors}", file=sys.stderr)
            row.note += f"; ERRORS: {len(counters.errors)}, exit {status}"
        return row
    finally:
        server.kill()
        log_file.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration", type=float, default=300, help="seconds per backend"
    )
    parser.add_argument("--quick", action="store_true", help="~60 s in all")
    parser.add_argument("--backends", default="trio,asyncio")
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--tricklers", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--churn-rate", type=float, default=50, help="conns/s")
    parser.add_argument("--exptime", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--sndbuf",
        type=int,
        default=65536,
        help="the server's SO_SNDBUF per client (0: the kernel's autotuning)",
    )
    parser.add_argument(
        "--fd-fault-every",
        type=float,
        default=10,
        help="seconds between 1 s fd-limit clamps (0: none)",
    )
    parser.add_argument("--out")
    parser.add_argument(
        "--no-httpd", dest="httpd", action="store_false", help="skip the httpd phase"
    )
    parser.add_argument(
        "--http-duration", type=float, default=None, help="default: duration / 3"
    )
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if args.quick:
        args.duration = 30
        args.exptime = 10
        args.rounds = 2
        args.round_seconds = 1.5
    if args.http_duration is None:
        args.http_duration = args.duration / 3
    limit = raise_nofile(args.conns + args.tricklers + args.workers + 2000)
    if limit < args.conns + args.tricklers + args.workers + 500:
        args.conns = max(0, limit - args.tricklers - args.workers - 500)
        print(
            f"RLIMIT_NOFILE {limit}: holding {args.conns} connections", file=sys.stderr
        )
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir = REPO / "bench" / "results"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[FaultRow] = []
    tputs = []
    t0 = time.monotonic()
    for backend in backends:
        r, t = soak_backend(backend, args)
        rows += r
        tputs.append(t)
        if args.httpd:
            rows.append(soak_httpd(backend, args))
    header = tputs[0].splitlines()[:2]
    tput = "\n".join(header + [t.splitlines()[2] for t in tputs])
    report = (
        f"## soak: {args.duration:.0f} s per backend"
        f" ({time.monotonic() - t0:.0f} s in all),"
        f" `{' '.join(sys.argv[1:]) or '(defaults)'}`\n\n"
        + markdown(rows)
        + "\nWorkers' line ping-pong (median (min-max) of rounds; ratio per round):\n\n"
        + tput
        + "\n"
    )
    print(report)
    out = Path(args.out) if args.out else args.out_dir / f"soak-{args.stamp}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"written to {out}", file=sys.stderr)
    return 0 if all(row.clean for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
