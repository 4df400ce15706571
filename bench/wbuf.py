"""The DS write path (issue 4): spill files + sendfile, measured three ways.

    .venv/bin/python bench/wbuf.py            # full, ~11 min: (a) 1 GiB x 3 rounds
    .venv/bin/python bench/wbuf.py --quick    # ~1.5 min: smaller sizes, 2 rounds
    .venv/bin/python bench/wbuf.py --parts c  # only some parts (a, b, c)

(a) **Slow reader, 1 GiB.**  Each server answers ``bulk 1073741824`` on one
    loopback TCP connection to a client process (this script with
    ``--slow-reader``) that reads 64 KiB, sleeps 1 ms, reads again.  While
    it runs the harness samples the server's ``/proc/PID``: peak RSS
    (``VmHWM`` at the end, and the sampled peak of ``VmRSS`` over the
    pre-transfer baseline) and the spill files on disk (fds whose link
    ends in ``(deleted)``, their ``st_size`` and allocated blocks).  ds_trio's
    goal: peak RSS < 64 MiB, whatever the response size.
(b) **Fast reader, 256 MiB.**  ``bench/build/loadgen`` (C, epoll) reads as
    fast as it can: 256 responses of 1 MiB (the harness's ``bulk-1``) and one
    response of 256 MiB.  MB/s and server CPU µs per MiB, against the C
    server (the ceiling), a bare trio ``SocketStream.send_all`` server and
    ds_trio with sendfile switched off (``_ds_no_sendfile``: pread + send).
(c) **Cost of one partially written response, in process.**  A DS object
    on a loopback TCP pair whose peer is full (``ds_trio.testing.fill_socket``)
    writes a response (4 KiB ... 16 MiB): ``write()`` gets EAGAIN and spills
    all of it; the peer drains; ``flush_write()`` is called until it
    completes.  The thread CPU time of ``write`` + ``flush_write`` only (not
    the filling and draining) is the cost per response, with ``sendfile``
    (default) against ``_ds_no_sendfile = True`` (pread + send of 64 KiB,
    what the seed's ``send_tmpio`` does with sysseek + sysread + syswrite),
    and an asyncio-style heap buffer (bytearray + send) as a reference.

Servers run pinned to CPU 0 and clients to CPU 1 (taskset), systems in a
rotated order each round; figures are medians over rounds with (min-max).
Servers are started through bench/run.py's ``Server`` and the C programs
built with its ``build_c``.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run
from _benchutil import (
    DASH,
    fmt_range,
    md_table,
    per_round_ratio,
    proc_status_kib,
    spill_files,
)

MIB = 1 << 20
GIB = 1 << 30
OTHERS = (
    "Others' CPU: CPUs' worth of time used by processes other than the "
    "server and the client during the measurement (run.py's BackgroundMeter), "
    f"worst round; **!** from {run.QUIET_THRESHOLD} up."
)


def worst(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return DASH
    top = max(vals)
    return f"{top:.2f}" + (" **!**" if top >= run.QUIET_THRESHOLD else "")


THIS = str(Path(__file__).resolve())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Systems: the harness's, plus ds_trio with sendfile switched off.

PREAD = "ds_trio-trio-pread"

SYSTEMS: dict[str, run.System] = {
    **run.SYSTEMS,
    PREAD: run.System(
        PREAD,
        "ds_trio on trio, no sendfile (pread+send)",
        (run.PYTHON, THIS, "--serve", "{port}", "--backend", "trio", "--no-sendfile"),
    ),
}

SLOW_SYSTEMS = (
    "c-epoll",
    "perl-ds",
    "asyncio",
    "trio",
    "ds_trio-trio",
    "ds_trio-asyncio",
)
FAST_SYSTEMS = (
    "c-epoll",
    "perl-ds",
    "asyncio",
    "trio",
    "ds_trio-trio",
    PREAD,
    "ds_trio-asyncio",
)


def serve_main(port: int, backend: str, no_sendfile: bool) -> None:
    """``--serve``: bench/servers/ds_trio_echo.py, optionally without sendfile."""
    sys.path.insert(0, str(run.SERVERS_DIR))
    import ds_trio_echo

    if no_sendfile:
        base = ds_trio_echo.Client

        class NoSendfileClient(base):  # type: ignore[misc, valid-type]
            def __init__(self, sock: socket.socket) -> None:
                super().__init__(sock)
                self._ds_no_sendfile = True

        # Its Listener looks the class up at each accept.
        ds_trio_echo.Client = NoSendfileClient  # type: ignore[misc]
    sys.argv = [sys.argv[0], str(port), "--backend", backend]
    ds_trio_echo.main()


def prepare(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Build the C programs; return (runnable systems, skipped with reasons)."""
    err = run.build_c(run.BENCH_DIR / "loadgen.c", run.BUILD_DIR / "loadgen")
    if err:
        raise SystemExit(f"cannot build the load generator: {err}")
    skipped: dict[str, str] = {}
    for name in names:
        needs = SYSTEMS[name].needs
        why = None
        if needs == "cc":
            why = run.build_c(run.SERVERS_DIR / "c_echo.c", run.BUILD_DIR / "c_echo")
        elif needs == "perl-ds":
            why = run.ensure_perl_ds(install=False)
        if why:
            skipped[name] = why
            log(f"skipping {name}: {why}")
    return [n for n in names if n not in skipped], skipped


# --------------------------------------------------------------------------
# (a) slow reader


def slow_reader_main(port: int, total: int, chunk: int, pause: float) -> None:
    """``--slow-reader``: read ``total`` bytes, ``chunk`` at a time, pausing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    sock.sendall(b"bulk %d\n" % total)
    got = 0
    reads = 0
    while got < total:
        n = sock.recv_into(view, min(chunk, total - got))
        if n == 0:
            print(json.dumps({"error": f"EOF after {got} bytes"}), flush=True)
            sys.exit(1)
        if buf.count(0, 0, n) != n:
            print(json.dumps({"error": f"non-zero byte near {got}"}), flush=True)
            sys.exit(1)
        got += n
        reads += 1
        if pause:
            time.sleep(pause)
    elapsed = time.perf_counter() - t0
    line = b"wbuf-bench-final-line\n"
    sock.sendall(line)
    echo = b""
    while len(echo) < len(line):
        part = sock.recv(len(line) - len(echo))
        if not part:
            break
        echo += part
    if echo != line:
        print(json.dumps({"error": f"final echo mismatch: {echo!r}"}), flush=True)
        sys.exit(1)
    print(json.dumps({"bytes": got, "reads": reads, "elapsed_s": elapsed}), flush=True)


@dataclass
class SlowResult:
    hwm_kib: int | None = None
    rss_before_kib: int | None = None
    rss_peak_kib: int | None = None
    spill_peak_bytes: int = 0
    spill_peak_alloc: int = 0
    spill_peak_files: int = 0
    spill_left_files: int = 0
    cpu_s: float | None = None
    elapsed_s: float | None = None
    background: float | None = None
    error: str | None = None


def measure_slow(
    server: run.Server, cpu: int | None, total: int, chunk: int, pause: float
) -> SlowResult:
    res = SlowResult()
    pid = server.pid
    res.rss_before_kib = proc_status_kib(pid, "VmRSS")
    res.rss_peak_kib = res.rss_before_kib
    cpu0 = run.cpu_seconds(pid)
    meter = run.BackgroundMeter(pid)
    argv = [
        run.PYTHON,
        THIS,
        "--slow-reader",
        f"--port={server.port}",
        f"--total={total}",
        f"--chunk={chunk}",
        f"--pause={pause}",
    ]
    proc = subprocess.Popen(
        run.pinned(argv, cpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def sample() -> None:
        files, size, alloc = spill_files(pid)
        res.spill_peak_bytes = max(res.spill_peak_bytes, size)
        res.spill_peak_alloc = max(res.spill_peak_alloc, alloc)
        res.spill_peak_files = max(res.spill_peak_files, files)
        rss = proc_status_kib(pid, "VmRSS")
        if rss is not None:
            res.rss_peak_kib = max(res.rss_peak_kib or 0, rss)

    while proc.poll() is None:
        sample()
        time.sleep(0.02)
    out, err = proc.communicate()
    res.background = meter.read()
    res.cpu_s = (run.cpu_seconds(pid) or 0.0) - (cpu0 or 0.0)
    res.hwm_kib = proc_status_kib(pid, "VmHWM")
    time.sleep(0.2)  # let the server close the finished spill file
    res.spill_left_files = spill_files(pid)[0]
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": err.decode()[-300:]}
    if "error" in result or proc.returncode != 0:
        res.error = str(result.get("error") or f"exit {proc.returncode}")
    else:
        res.elapsed_s = float(result["elapsed_s"])
    return res


def part_a(args: argparse.Namespace, cpus: tuple[int, int] | None, logs: Path) -> str:
    total = args.slow_mib * MIB
    names, skipped = prepare(args.slow_systems)
    scpu, ccpu = cpus if cpus else (None, None)
    results: dict[str, list[SlowResult]] = {n: [] for n in names}
    for rnd, order in enumerate(run.rotations(names, args.rounds_a), 1):
        log(f"(a) round {rnd}/{args.rounds_a}: {' '.join(order)}")
        for name in order:
            try:
                server = run.Server(SYSTEMS[name], scpu, logs / f"a-{name}.log")
            except (run.SkipSystem, RuntimeError, OSError) as e:
                results[name].append(SlowResult(error=str(e)))
                log(f"  {name}: {e}")
                continue
            try:
                r = measure_slow(server, ccpu, total, args.chunk, args.pause)
            finally:
                server.stop()
            results[name].append(r)
            log(
                f"  {name:18} HWM {r.hwm_kib} KiB, peak spill "
                f"{r.spill_peak_bytes / MIB:.0f} MiB in {r.spill_peak_files} file(s), "
                f"{(r.elapsed_s or 0):.1f} s {r.error or ''}"
            )

    def col(name: str, fn: Callable[[SlowResult], float | None]) -> list[float | None]:
        return [fn(r) if r.error is None else None for r in results[name]]

    rows = []
    for name in names:
        errors = [r.error for r in results[name] if r.error]
        rows.append(
            [
                SYSTEMS[name].label,
                fmt_range(col(name, lambda r: r.hwm_kib / 1024 if r.hwm_kib else None)),
                fmt_range(
                    col(
                        name,
                        lambda r: (
                            (r.rss_peak_kib - r.rss_before_kib) / 1024
                            if r.rss_peak_kib and r.rss_before_kib
                            else None
                        ),
                    )
                ),
                fmt_range(col(name, lambda r: r.spill_peak_bytes / MIB), ".0f"),
                fmt_range(col(name, lambda r: r.spill_peak_alloc / MIB), ".0f"),
                fmt_range(col(name, lambda r: float(r.spill_peak_files)), ".0f"),
                fmt_range(col(name, lambda r: float(r.spill_left_files)), ".0f"),
                fmt_range(
                    col(
                        name,
                        lambda r: total / r.elapsed_s / 1e6 if r.elapsed_s else None,
                    )
                ),
                fmt_range(col(name, lambda r: r.cpu_s), ".2f"),
                worst(col(name, lambda r: r.background)),
                f"{len(errors)} failed: {errors[0][:80]}" if errors else "",
            ]
        )
    head = (
        f"### (a) {args.slow_mib:,} MiB in one response to a slow reader "
        f"({args.chunk // 1024} KiB reads, {args.pause * 1000:g} ms pause), "
        f"{args.rounds_a} rounds\n\n"
        "Peak RSS is `VmHWM` at the end of the transfer (whole process life: "
        "interpreter included); RSS growth is the sampled peak `VmRSS` minus "
        "`VmRSS` before the request.  Spill: deleted files held open by the "
        "server, sampled every 20 ms (size; allocated blocks).  Goal for "
        "ds_trio: peak RSS < 64 MiB.  " + OTHERS + "\n\n"
    )
    table = md_table(
        [
            "server",
            "peak RSS MiB",
            "RSS growth MiB",
            "peak spill MiB",
            "spill allocated MiB",
            "spill files",
            "files left after",
            "client MB/s",
            "server CPU s",
            "others' CPU",
            "errors",
        ],
        rows,
    )
    notes = "".join(f"\n\nSkipped {n}: {why}" for n, why in skipped.items())
    return head + table + notes


# --------------------------------------------------------------------------
# (b) fast reader through loadgen


@dataclass(frozen=True)
class Shape:
    label: str
    size: int
    total: int


@dataclass
class FastResult:
    mb_per_s: dict[str, list[float | None]] = field(default_factory=dict)
    cpu_us_per_mib: dict[str, list[float | None]] = field(default_factory=dict)
    background: dict[str, list[float | None]] = field(default_factory=dict)
    hwm_mib: list[float | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def measure_fast(server: run.Server, cpu: int | None, shape: Shape) -> dict[str, Any]:
    argv = [
        str(run.BUILD_DIR / "loadgen"),
        f"--port={server.port}",
        "--mode=bulk",
        "--conns=1",
        f"--bulk-size={shape.size}",
        f"--bulk-total={shape.total}",
        f"--server-pid={server.pid}",
        "--duration=120",
        "--timeout=240",
    ]
    proc = subprocess.run(
        run.pinned(argv, cpu), capture_output=True, text=True, timeout=300, check=False
    )
    result = run.parse_result(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exit {proc.returncode}: {proc.stderr[-300:]}")
    return result


def part_b(args: argparse.Namespace, cpus: tuple[int, int] | None, logs: Path) -> str:
    shapes = [
        Shape(f"{args.fast_mib} x 1 MiB", MIB, args.fast_mib * MIB),
        Shape(f"1 x {args.fast_mib} MiB", args.fast_mib * MIB, args.fast_mib * MIB),
    ]
    names, skipped = prepare(args.fast_systems)
    scpu, ccpu = cpus if cpus else (None, None)
    res: dict[str, FastResult] = {
        n: FastResult(
            mb_per_s={s.label: [] for s in shapes},
            cpu_us_per_mib={s.label: [] for s in shapes},
            background={s.label: [] for s in shapes},
        )
        for n in names
    }
    for rnd, order in enumerate(run.rotations(names, args.rounds_b), 1):
        log(f"(b) round {rnd}/{args.rounds_b}: {' '.join(order)}")
        for name in order:
            r = res[name]
            try:
                server = run.Server(SYSTEMS[name], scpu, logs / f"b-{name}.log")
            except (run.SkipSystem, RuntimeError, OSError) as e:
                r.errors.append(str(e))
                for s in shapes:
                    r.mb_per_s[s.label].append(None)
                    r.cpu_us_per_mib[s.label].append(None)
                r.hwm_mib.append(None)
                continue
            try:
                run.prime(server, ccpu)
                for s in shapes:
                    meter = run.BackgroundMeter(server.pid)
                    mbs: float | None
                    try:
                        out = measure_fast(server, ccpu, s)
                        mbs = float(out["mb_per_s"])
                        per_req = float(out["cpu_us_per_req"])
                        cpu = per_req / (s.size / MIB) if per_req >= 0 else None
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        r.errors.append(str(e))
                        mbs, cpu = None, None
                    r.background[s.label].append(meter.read())
                    r.mb_per_s[s.label].append(mbs)
                    r.cpu_us_per_mib[s.label].append(cpu)
                    log(f"  {name:18} {s.label:14} {mbs or 0:7.0f} MB/s, {cpu} us/MiB")
                    server.quiesce()
                hwm = proc_status_kib(server.pid, "VmHWM")
                r.hwm_mib.append(hwm / 1024 if hwm else None)
            finally:
                server.stop()

    ref = res.get("c-epoll")
    blocks = [
        f"### (b) fast reader (loadgen, 1 connection): {args.fast_mib} MiB, "
        f"{args.rounds_b} rounds\n\n"
        "MB/s = 10^6 bytes/s over the transfer; CPU = server CPU time "
        "(schedstat, all threads) per MiB sent; ÷ C = median of per-round "
        "ratios to the C server's MB/s.  Peak RSS (`VmHWM`) is over the "
        "server's life, after both shapes.  ds_trio's goal: \u2265 0.9 \u00d7 C.  "
        + OTHERS
    ]
    for s in shapes:
        rows = []
        for name in names:
            r = res[name]
            ratio = (
                per_round_ratio(r.mb_per_s[s.label], ref.mb_per_s[s.label])
                if ref
                else []
            )
            rows.append(
                [
                    SYSTEMS[name].label,
                    fmt_range(r.mb_per_s[s.label], ".0f"),
                    fmt_range(ratio, ".2f"),
                    fmt_range(r.cpu_us_per_mib[s.label], ".0f"),
                    fmt_range(r.hwm_mib, ".0f"),
                    worst(r.background[s.label]),
                ]
            )
        blocks.append(
            f"#### {s.label} response{'s' * (s.size < s.total)}\n\n"
            + md_table(
                [
                    "server",
                    "MB/s",
                    "÷ C",
                    "server CPU µs/MiB",
                    "peak RSS MiB",
                    "others' CPU",
                ],
                rows,
            )
        )
    errors = [f"{n}: {e}" for n in names for e in res[n].errors]
    if errors:
        blocks.append("Errors:\n\n" + "\n".join(f"- {e[:200]}" for e in errors))
    blocks += [f"Skipped {n}: {why}" for n, why in skipped.items()]
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------
# (c) in-process cost of a partially written response


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (server end, client end), non-blocking."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    for s in (server, client):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


class HeapWriter:
    """Reference: asyncio's selector transport buffer (bytearray + send)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def write(self, data: bytes) -> bool:
        if self.buf:
            self.buf += data
            return False
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return True
        self.buf += memoryview(data)[n:]
        return False

    def flush_write(self) -> bool:
        buf = self.buf
        while buf:
            try:
                n = self.sock.send(buf)
            except BlockingIOError:
                return False
            del buf[:n]
        return True


VARIANTS_C = ("sendfile", "pread+send", "copy", "ref", "heap")
LABELS_C = {
    "sendfile": "ds_trio spill + sendfile (`WBUF_MEMORY_MAX = 0`, bytearray)",
    "pread+send": "ds_trio spill + pread/send 64 KiB (`_ds_no_sendfile`: the seed)",
    "copy": "ds_trio default, bytearray: heap copy up to 16 KiB, else spill",
    "ref": "ds_trio default, immutable bytes: queued by reference",
    "heap": "reference: heap bytearray + send (asyncio transport), no spill",
}


def clock_overhead_ns() -> float:
    clock = time.thread_time_ns
    samples = []
    for _ in range(2000):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def part_c(args: argparse.Namespace) -> str:
    from ds_trio import DS
    from ds_trio.testing import drain_socket, fill_socket

    class Sink(DS):
        """Writes only; never stepped (no loop runs: write/flush are synchronous)."""

        def event_step(self) -> None:
            pass

    class SpillingSink(Sink):
        WBUF_MEMORY_MAX = 0  # the seed: every queued byte to a spill file

    # Two socket-buffer settings: the kernel's (loopback autotuning fills
    # ~4 MiB, whose copying evicts the CPU caches before every response)
    # and 64 KiB (SO_SNDBUF/SO_RCVBUF: a small fill, caches stay warm, and
    # large responses leave in many partial flushes).
    bufs: list[tuple[str, int | None]] = [("kernel default", None), ("64 KiB", 65536)]
    # One object per variant and setting for the whole run: created outside
    # any loop, never closed (DS.close defers the fd close to a loop round).
    writers: dict[tuple[str, str], Any] = {}
    peers: dict[tuple[str, str], socket.socket] = {}
    for blabel, bsize in bufs:
        for v in VARIANTS_C:
            s, c = tcp_pair()
            if bsize:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bsize)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bsize)
            peers[blabel, v] = c
            if v == "heap":
                writers[blabel, v] = HeapWriter(s)
            else:
                spilling = v in ("sendfile", "pread+send")
                obj = (SpillingSink if spilling else Sink)(s, 0)
                obj._ds_no_sendfile = v == "pread+send"
                writers[blabel, v] = obj
    overhead = clock_overhead_ns()
    sizes = [
        (4 << 10, "4 KiB"),
        (16 << 10, "16 KiB"),
        (64 << 10, "64 KiB"),
        (MIB, "1 MiB"),
        (16 * MIB, "16 MiB"),
    ]
    counts = {4 << 10: 400, 16 << 10: 400, 64 << 10: 300, MIB: 100, 16 * MIB: 15}
    if args.quick:
        counts = {k: max(5, v // 10) for k, v in counts.items()}
    payloads = {size: bytes(size) for size, _ in sizes}
    # Mutable payloads are copied when queued; immutable ones referenced.
    mutable = {size: bytearray(size) for size, _ in sizes}
    clock = time.thread_time_ns
    # per (buffers, size, variant): per-round medians (µs), flushes/response
    Key = tuple[str, int, str]
    cost: dict[Key, list[float]] = {}
    flushes: dict[Key, list[float]] = {}
    filled: dict[str, list[int]] = {b: [] for b, _ in bufs}
    skipped = 0
    for rnd, order in enumerate(run.rotations(list(VARIANTS_C), args.rounds_c), 1):
        log(f"(c) round {rnd}/{args.rounds_c}: {' '.join(order)}")
        for blabel, _ in bufs:
            for size, _label in sizes:
                for v in order:
                    payload = payloads[size] if v == "ref" else mutable[size]
                    w, peer = writers[blabel, v], peers[blabel, v]
                    sock = w.sock
                    per: list[float] = []
                    nflush: list[int] = []
                    for _ in range(counts[size]):
                        filled[blabel].append(fill_socket(sock))
                        t0 = clock()
                        done = w.write(payload)
                        spent = clock() - t0
                        intervals = 1
                        if done:
                            # The kernel grew the buffers between the fill
                            # and the write (loopback autotuning): nothing
                            # was queued, so this sample measures nothing.
                            skipped += 1
                            drain_socket(peer)
                            continue
                        k = 0
                        while not done:
                            drain_socket(peer)
                            t0 = clock()
                            done = w.flush_write()
                            spent += clock() - t0
                            intervals += 1
                            k += 1
                        drain_socket(peer)
                        per.append((spent - overhead * intervals) / 1000)
                        nflush.append(k)
                    key = (blabel, size, v)
                    cost.setdefault(key, []).append(statistics.median(per))
                    flushes.setdefault(key, []).append(statistics.mean(nflush))
    blocks = [
        f"### (c) CPU per partially written response, in process "
        f"({args.rounds_c} rounds)\n\n"
        "The peer (loopback TCP) is full, so `write()` queues the whole "
        "response; the peer drains; `flush_write()` runs until it returns "
        'True ("flushes": calls needed, the peer drained before each).  '
        "Figure: thread CPU time (user+sys) of those calls only, median per "
        f"response within a round, then median (min{DASH}max) over rounds; "
        f"{counts[4 << 10]}/{counts[16 << 10]}/{counts[64 << 10]}/{counts[MIB]}/"
        f"{counts[16 * MIB]} "
        "responses per round for 4 KiB/16 KiB/64 KiB/1 MiB/16 MiB.  Clock overhead "
        f"({overhead:.0f} ns per reading pair) subtracted.  ÷ sendfile: "
        "per-round ratio to the sendfile variant.  Spill files are in "
        f"{tempfile.gettempdir()}.  Samples skipped because the kernel took "
        f"the whole response after all: {skipped}."
    ]
    for blabel, bsize in bufs:
        rows = []
        for size, label in sizes:
            base = cost[blabel, size, "sendfile"]
            for v in VARIANTS_C:
                us = cost[blabel, size, v]
                rows.append(
                    [
                        label,
                        LABELS_C[v],
                        fmt_range(us, ".1f"),
                        fmt_range(per_round_ratio(us, base), ".2f"),
                        fmt_range([x * MIB / size for x in us], ".0f")
                        if size >= MIB
                        else "",
                        f"{statistics.mean(flushes[blabel, size, v]):.1f}",
                    ]
                )
        fill = statistics.median(filled[blabel]) / 1024
        what = (
            "kernel default socket buffers"
            if bsize is None
            else f"SO_SNDBUF/SO_RCVBUF {bsize // 1024} KiB"
        )
        blocks.append(
            f"#### {what}: {fill:,.0f} KiB fill the socket before each response\n\n"
            + md_table(
                [
                    "response",
                    "variant",
                    "CPU µs/response",
                    "÷ sendfile",
                    "µs/MiB",
                    "flushes",
                ],
                rows,
            )
        )
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds")
    parser.add_argument("--parts", default="a,b,c", help="which parts: a,b,c")
    parser.add_argument("--rounds", type=int, help="rounds for every part")
    parser.add_argument("--slow-mib", type=int, help="(a) response size in MiB")
    parser.add_argument("--fast-mib", type=int, help="(b) MiB per run")
    parser.add_argument("--systems", help="restrict (a) and (b) to these systems")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    # internal modes
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="trio", help=argparse.SUPPRESS)
    parser.add_argument("--no-sendfile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slow-reader", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=65536, help=argparse.SUPPRESS)
    parser.add_argument("--pause", type=float, default=0.001, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None:
        serve_main(args.serve, args.backend, args.no_sendfile)
        return
    if args.slow_reader:
        slow_reader_main(args.port, args.total, args.chunk, args.pause)
        return

    args.slow_mib = args.slow_mib or (128 if args.quick else 1024)
    args.fast_mib = args.fast_mib or (64 if args.quick else 256)
    args.rounds_a = args.rounds or (2 if args.quick else 3)
    args.rounds_b = args.rounds or (2 if args.quick else 5)
    args.rounds_c = args.rounds or (2 if args.quick else 5)
    chosen = set(args.systems.split(",")) if args.systems else None
    args.slow_systems = [n for n in SLOW_SYSTEMS if not chosen or n in chosen]
    args.fast_systems = [n for n in FAST_SYSTEMS if not chosen or n in chosen]
    parts = {p.strip() for p in args.parts.split(",")}

    run.raise_nofile_limit()
    cpus = None if args.no_pin else run.choose_cpus()
    import importlib.metadata

    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("trio", "anyio", "uvloop")
    )
    out = [
        f"## ds_trio write path (bench/wbuf.py{' --quick' if args.quick else ''})",
        f"Python {sys.version.split()[0]}, {versions}; kernel {os.uname().release}; "
        + (
            f"servers on CPU {cpus[0]}, clients on CPU {cpus[1]} (taskset); "
            if cpus
            else "no pinning; "
        )
        + f"spill files in {tempfile.gettempdir()}.",
    ]
    with tempfile.TemporaryDirectory(prefix="wbuf-bench-") as tmp:
        logs = Path(tmp)
        if "a" in parts:
            out.append(part_a(args, cpus, logs))
        if "b" in parts:
            out.append(part_b(args, cpus, logs))
        if "c" in parts:
            out.append(part_c(args))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
