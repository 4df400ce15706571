"""TLS (issue 6): a ds_trio TLS server against trio's SSLStream, side by side.

    .venv/bin/python bench/tls.py            # full: 5 rounds, ~7 min
    .venv/bin/python bench/tls.py --quick    # ~1.5 min: short windows, 2 rounds
    .venv/bin/python bench/tls.py --systems ds_trio-trio,trio --scenarios pingpong

Servers (each a process started from this script, pinned to CPU 0; same
protocol as bench/servers: ``bulk N`` is answered with N zero bytes, any
other line is echoed):

* ``ds_trio-trio``, ``ds_trio-asyncio`` (also ``ds_trio-uvloop``): a DS
  subclass of bench/servers/ds_trio_echo.py's ``Client`` whose ``__init__``
  calls ``self.starttls(ctx)``; its ``event_step`` is the echo server's
  (``flush_write`` first - it drives the handshake step queued at the head of
  ``wbuf`` -, then ``do_read`` / ``write``), so bulk responses spill and
  leave through pread + ``SSLSocket.send``;
* ``trio``: ``trio.serve_ssl_over_tcp`` + ``SSLStream``, a task per client
  doing ``receive_some`` / ``send_all`` (bench/servers/trio_echo.py over TLS);
* ``asyncio`` (also ``uvloop``): bench/servers/asyncio_echo.py's Protocol
  with ``create_server(ssl=ctx)`` (asyncio's MemoryBIO SSL transport).

One client for all of them (this script, ``--client``, pinned to CPU 1):
Python, blocking ``ssl`` sockets, a thread per connection, TLS 1.3 with
certificate verification against a trustme CA (ECDSA key; files in a temp
dir).  It reads the server's CPU time (schedstat of all its threads) at the
edges of each measured window.  Scenarios:

* ``pingpong-1``, ``pingpong-50``: C connections each send a 64-byte line
  and wait for its echo; warm-up, then a measured window: req/s, p50/p99
  latency, **server CPU µs per request**;
* ``bulk-1MiB``: one connection, ``bulk 1048576`` requests until 256 MiB;
  ``bulk-256MiB``: one ``bulk 268435456``: MB/s, server CPU µs per MiB;
* ``handshake-1``, ``handshake-4``: T client threads each loop: connect,
  full TLS handshake (no resumption), send one line, read it, close (no
  close_notify): handshakes/s and **server CPU µs per handshake**.

Each round starts a fresh server per system, primes it (0.3 s pingpong and
8 MiB of bulk), runs every scenario; the system order rotates each round.
Figures: median over rounds (min-max).  The client is Python, so at high
rates it is the bottleneck: compare server CPU per unit, and rates only as
"who is faster with the same client".  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run
from _benchutil import DASH, fmt_range, md_table, per_round_ratio

MIB = 1 << 20
THIS = str(Path(__file__).resolve())
MSG = (b"x" * 63) + b"\n"  # 64 bytes, never mistaken for "bulk N"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worst(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return DASH
    top = max(vals)
    return f"{top:.2f}" + (" **!**" if top >= run.QUIET_THRESHOLD else "")


# --------------------------------------------------------------------------
# Certificates


def make_certs(directory: Path) -> str:
    """Write ca.pem and server.pem (key + chain) into directory; key type."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(cert.private_key_pem.bytes(), None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__


def server_context(certdir: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(certdir, "server.pem"))
    return ctx


def client_context(certdir: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.path.join(certdir, "ca.pem"))


# --------------------------------------------------------------------------
# Servers (``--serve KIND PORT``)


def serve_ds_trio(port: int, certdir: str, backend: str) -> None:
    sys.path.insert(0, str(run.SERVERS_DIR))
    import anyio
    import ds_trio_echo
    from _common import raise_nofile_limit, ready

    import ds_trio

    ctx = server_context(certdir)

    class TLSClient(ds_trio_echo.Client):  # type: ignore[misc, name-defined]
        """The echo server's client, speaking TLS from the first byte."""

        def __init__(self, sock: socket.socket) -> None:
            super().__init__(sock)
            self.starttls(ctx)

    async def serve() -> None:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", port))
        lsock.listen(4096)
        async with ds_trio.loop(errors="log") as loop:
            ds_trio.Listener(lsock, lambda conn, _addr, _lsock: TLSClient(conn))
            ready(lsock.getsockname()[1])
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    loop.stop()
                    break

    raise_nofile_limit()
    options: dict[str, Any] = {}
    if backend == "uvloop":
        backend, options = "asyncio", {"use_uvloop": True}
    anyio.run(serve, backend=backend, backend_options=options)


def serve_trio(port: int, certdir: str) -> None:
    sys.path.insert(0, str(run.SERVERS_DIR))
    import trio
    from _common import (
        RECV_SIZE,
        parse_requests,
        raise_nofile_limit,
        ready,
        zero_chunks,
    )

    ctx = server_context(certdir)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        rest = b""
        try:
            while data := await stream.receive_some(RECV_SIZE):
                items, rest = parse_requests(rest + data if rest else data)
                for item in items:
                    if isinstance(item, int):
                        for chunk in zero_chunks(item):
                            await stream.send_all(chunk)
                    else:
                        await stream.send_all(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # handshake failure, reset, or EOF without close_notify
        finally:
            await trio.aclose_forcefully(stream)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"),
                handle,
                port,
                ctx,
            )
            ready(listeners[0].transport_listener.socket.getsockname()[1])

    raise_nofile_limit()
    trio.run(serve)


def serve_asyncio(port: int, certdir: str, backend: str) -> None:
    sys.path.insert(0, str(run.SERVERS_DIR))
    import asyncio

    from _common import raise_nofile_limit, ready
    from asyncio_echo import EchoProtocol

    ctx = server_context(certdir)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            EchoProtocol, "127.0.0.1", port, backlog=1024, reuse_address=True, ssl=ctx
        )
        ready(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    raise_nofile_limit()
    if backend == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
    else:
        asyncio.run(serve())


def _py(*args: str) -> tuple[str, ...]:
    return (run.PYTHON, THIS, "--serve", *args, "--port", "{port}")


SYSTEMS: dict[str, run.System] = {
    s.name: s
    for s in (
        run.System(
            "ds_trio-trio", "ds_trio TLS on trio", _py("ds_trio", "--backend", "trio")
        ),
        run.System(
            "ds_trio-asyncio",
            "ds_trio TLS on asyncio",
            _py("ds_trio", "--backend", "asyncio"),
        ),
        run.System(
            "ds_trio-uvloop",
            "ds_trio TLS on uvloop",
            _py("ds_trio", "--backend", "uvloop"),
        ),
        run.System("trio", "trio SSLStream", _py("trio")),
        run.System(
            "asyncio", "asyncio Protocol, ssl=", _py("asyncio", "--backend", "asyncio")
        ),
        run.System(
            "uvloop", "uvloop Protocol, ssl=", _py("asyncio", "--backend", "uvloop")
        ),
    )
}
DEFAULT_SYSTEMS = ("ds_trio-trio", "ds_trio-asyncio", "trio", "asyncio")


# --------------------------------------------------------------------------
# The client (``--client MODE``)


def server_cpu(pid: int) -> float:
    return run.cpu_seconds(pid) or 0.0


def connect(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    parts = []
    while n:
        data = sock.recv(n)
        if not data:
            raise ConnectionError("server closed the connection")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def timed_window(
    worker: Any,
    threads: int,
    pid: int,
    warmup: float,
    duration: float,
    setup: Any = None,
) -> dict[str, Any]:
    """Run ``worker(i, stop, record)`` in threads; measure one window.

    ``record(t_end, latency)`` is called per completed unit; only units
    completing inside the window count.
    """
    stop = threading.Event()
    records: list[list[tuple[float, float]]] = [[] for _ in range(threads)]
    errors: list[str] = []
    ready = threading.Barrier(threads + 1)

    def body(i: int) -> None:
        try:
            state = setup(i) if setup else None
            ready.wait()
            worker(state, stop, records[i].append)
        except Exception as e:  # a failed measurement, reported
            errors.append(f"{type(e).__name__}: {e}")
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()

    ts = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    time.sleep(warmup)
    cpu0 = server_cpu(pid)
    t0 = time.perf_counter()
    time.sleep(duration)
    t1 = time.perf_counter()
    cpu1 = server_cpu(pid)
    stop.set()
    for t in ts:
        t.join(timeout=30)
    if errors:
        return {"error": errors[0]}
    lat = sorted(d for rec in records for (t, d) in rec if t0 <= t < t1)
    done = len(lat)
    return {
        "units": done,
        "elapsed_s": t1 - t0,
        "rate": done / (t1 - t0),
        "p50_us": (percentile(lat, 0.5) or 0) * 1e6,
        "p99_us": (percentile(lat, 0.99) or 0) * 1e6,
        "server_cpu_us_per_unit": (cpu1 - cpu0) * 1e6 / done if done else None,
    }


def client_pingpong(args: argparse.Namespace, ctx: ssl.SSLContext) -> dict[str, Any]:
    def setup(_i: int) -> ssl.SSLSocket:
        return connect(ctx, args.port)

    cipher: list[Any] = []

    def worker(sock: ssl.SSLSocket, stop: threading.Event, record: Any) -> None:
        if not cipher:
            cipher.append(f"{sock.version()} {sock.cipher()[0]}")  # type: ignore[index]
        clock = time.perf_counter
        with sock:
            while not stop.is_set():
                t0 = clock()
                sock.sendall(MSG)
                if recv_exact(sock, len(MSG)) != MSG:
                    raise RuntimeError("echo mismatch")
                t1 = clock()
                record((t1, t1 - t0))

    out = timed_window(
        worker, args.conns, args.server_pid, args.warmup, args.duration, setup
    )
    out["cipher"] = cipher[0] if cipher else None
    return out


def client_handshake(args: argparse.Namespace, ctx: ssl.SSLContext) -> dict[str, Any]:
    line = b"handshake-bench\n"

    def worker(_state: None, stop: threading.Event, record: Any) -> None:
        clock = time.perf_counter
        while not stop.is_set():
            t0 = clock()
            sock = connect(ctx, args.port)  # full handshake: no session reuse
            try:
                sock.sendall(line)
                if recv_exact(sock, len(line)) != line:
                    raise RuntimeError("echo mismatch")
            finally:
                sock.close()
            t1 = clock()
            record((t1, t1 - t0))

    return timed_window(worker, args.conns, args.server_pid, args.warmup, args.duration)


def client_bulk(args: argparse.Namespace, ctx: ssl.SSLContext) -> dict[str, Any]:
    size, total = args.bulk_size, args.bulk_total
    sock = connect(ctx, args.port)
    cipher = f"{sock.version()} {sock.cipher()[0]}"  # type: ignore[index]
    buf = bytearray(MIB)
    view = memoryview(buf)
    got = 0
    reqs = max(1, total // size)
    cpu0 = server_cpu(args.server_pid)
    t0 = time.perf_counter()
    for _ in range(reqs):
        sock.sendall(b"bulk %d\n" % size)
        left = size
        while left:
            n = sock.recv_into(view, min(left, MIB))
            if not n:
                return {"error": f"EOF after {got} bytes"}
            left -= n
            got += n
    t1 = time.perf_counter()
    cpu1 = server_cpu(args.server_pid)
    final = b"bulk-bench-final\n"
    sock.sendall(final)
    if recv_exact(sock, len(final)) != final:
        return {"error": "final echo mismatch"}
    sock.close()
    return {
        "units": reqs,
        "bytes": got,
        "elapsed_s": t1 - t0,
        "mb_per_s": got / (t1 - t0) / 1e6,
        "server_cpu_us_per_mib": (cpu1 - cpu0) * 1e6 / (got / MIB),
        "cipher": cipher,
    }


def client_main(args: argparse.Namespace) -> None:
    ctx = client_context(args.certdir)
    fn = {
        "pingpong": client_pingpong,
        "handshake": client_handshake,
        "bulk": client_bulk,
    }[args.client]
    try:
        out = fn(args, ctx)
    except Exception as e:  # reported to the harness as a failed measurement
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------
# The harness


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    conns: int = 1
    bulk_size: int = 0


@dataclass
class Cell:
    rate: list[float | None] = field(default_factory=list)
    cpu: list[float | None] = field(default_factory=list)
    p50: list[float | None] = field(default_factory=list)
    p99: list[float | None] = field(default_factory=list)
    background: list[float | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def scenarios(bulk_total: int) -> list[Scenario]:
    return [
        Scenario("pingpong-1", "pingpong", 1),
        Scenario("pingpong-50", "pingpong", 50),
        Scenario("bulk-1MiB", "bulk", 1, MIB),
        Scenario(f"bulk-{bulk_total // MIB}MiB", "bulk", 1, bulk_total),
        Scenario("handshake-1", "handshake", 1),
        Scenario("handshake-4", "handshake", 4),
    ]


def run_client(
    extra: Sequence[str], server: run.Server, cpu: int | None, certdir: str
) -> dict[str, Any]:
    argv = [
        run.PYTHON,
        THIS,
        *extra,
        f"--port={server.port}",
        f"--server-pid={server.pid}",
        f"--certdir={certdir}",
    ]
    proc = subprocess.run(
        run.pinned(argv, cpu), capture_output=True, text=True, timeout=600, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"client exit {proc.returncode}: {proc.stderr[-300:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def client_args(sc: Scenario, args: argparse.Namespace) -> list[str]:
    if sc.mode == "bulk":
        return [
            "--client=bulk",
            f"--bulk-size={sc.bulk_size}",
            f"--bulk-total={args.bulk_total}",
        ]
    warmup, duration = (
        (args.warmup, args.duration)
        if sc.mode == "pingpong"
        else (args.warmup / 2, args.duration)
    )
    return [
        f"--client={sc.mode}",
        f"--conns={sc.conns}",
        f"--warmup={warmup}",
        f"--duration={duration}",
    ]


def harness(args: argparse.Namespace) -> None:
    names = (
        [n.strip() for n in args.systems.split(",")]
        if args.systems
        else list(DEFAULT_SYSTEMS)
    )
    for n in names:
        if n not in SYSTEMS:
            raise SystemExit(f"unknown system {n!r}; known: {', '.join(SYSTEMS)}")
    all_sc = scenarios(args.bulk_total)
    if args.scenarios:
        wanted = [w.strip() for w in args.scenarios.split(",")]
        all_sc = [
            s
            for s in all_sc
            if any(s.name == w or s.name.startswith(w) for w in wanted)
        ]
    run.raise_nofile_limit()
    cpus = None if args.no_pin else run.choose_cpus()
    scpu, ccpu = cpus if cpus else (None, None)
    cells: dict[tuple[str, str], Cell] = {
        (n, s.name): Cell() for n in names for s in all_sc
    }
    cipher = ""
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        certdir = tmp
        key_type = make_certs(Path(tmp))
        logs = Path(tmp)
        for rnd, order in enumerate(run.rotations(names, args.rounds), 1):
            log(f"== round {rnd}/{args.rounds}: {' '.join(order)}")
            for name in order:
                try:
                    server = run.Server(
                        run.System(
                            name,
                            SYSTEMS[name].label,
                            (*SYSTEMS[name].argv, f"--certdir={certdir}"),
                        ),
                        scpu,
                        logs / f"{name}.log",
                    )
                except (run.SkipSystem, RuntimeError, OSError) as e:
                    for s in all_sc:
                        cells[name, s.name].errors.append(f"start: {e}")
                    log(f"  {name}: failed to start: {e}")
                    continue
                try:
                    # prime: a fresh process is not a long-running one
                    run_client(
                        [
                            "--client=pingpong",
                            "--conns=4",
                            "--warmup=0",
                            "--duration=0.3",
                        ],
                        server,
                        ccpu,
                        certdir,
                    )
                    run_client(
                        [
                            "--client=bulk",
                            f"--bulk-size={MIB}",
                            f"--bulk-total={8 * MIB}",
                        ],
                        server,
                        ccpu,
                        certdir,
                    )
                    server.quiesce()
                    for sc in all_sc:
                        meter = run.BackgroundMeter(server.pid)
                        out = run_client(client_args(sc, args), server, ccpu, certdir)
                        cell = cells[name, sc.name]
                        cell.background.append(meter.read())
                        if "error" in out or not server.alive():
                            err = out.get("error") or "server died"
                            cell.errors.append(str(err))
                            cell.rate.append(None)
                            cell.cpu.append(None)
                            cell.p50.append(None)
                            cell.p99.append(None)
                            log(f"  {name:16} {sc.name:14} FAILED: {err}")
                        elif sc.mode == "bulk":
                            cipher = out.get("cipher") or cipher
                            cell.rate.append(out["mb_per_s"])
                            cell.cpu.append(out["server_cpu_us_per_mib"])
                            log(
                                f"  {name:16} {sc.name:14} {out['mb_per_s']:8.0f} MB/s"
                                f"  cpu {out['server_cpu_us_per_mib']:.0f} us/MiB"
                            )
                        else:
                            cipher = out.get("cipher") or cipher
                            cell.rate.append(out["rate"])
                            cell.cpu.append(out["server_cpu_us_per_unit"])
                            cell.p50.append(out["p50_us"])
                            cell.p99.append(out["p99_us"])
                            log(
                                f"  {name:16} {sc.name:14} {out['rate']:8.0f} /s"
                                f"  p99 {out['p99_us']:.0f} us"
                                f"  cpu {out['server_cpu_us_per_unit'] or 0:.1f} us"
                            )
                        server.quiesce()
                finally:
                    server.stop()
                    tail = (logs / f"{name}.log").read_text(errors="replace")
                    if "Traceback" in tail or "Error" in tail:
                        log(f"  {name} server log:\n{tail[-1500:]}")
    wall = time.monotonic() - t_start
    report(args, names, all_sc, cells, cipher, key_type, cpus, wall)


def report(
    args: argparse.Namespace,
    names: list[str],
    all_sc: list[Scenario],
    cells: dict[tuple[str, str], Cell],
    cipher: str,
    key_type: str,
    cpus: tuple[int, int] | None,
    wall: float,
) -> None:
    import importlib.metadata

    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("trio", "anyio", "uvloop")
    )
    ref = "trio" if "trio" in names else names[0]
    print(
        f"## TLS: ds_trio vs trio SSLStream (bench/tls.py{' --quick' * args.quick})\n"
    )
    print(
        f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, {versions}; "
        f"{cipher or 'TLS'}, {key_type} certificate from trustme; "
        + (
            f"servers on CPU {cpus[0]}, client on CPU {cpus[1]} (taskset); "
            if cpus
            else "no pinning; "
        )
        + f"{args.rounds} rounds, system order rotated; pingpong "
        f"{args.warmup:g} s warm-up + {args.duration:g} s, handshakes "
        f"{args.warmup / 2:g} s + {args.duration:g} s, bulk {args.bulk_total // MIB} "
        f"MiB; wall {wall / 60:.1f} min.  Median over rounds (min{DASH}max).  "
        f"\u00f7 {SYSTEMS[ref].label}: median of per-round ratios "
        "(CPU: > 1 costs more; rate: > 1 is faster).  The client is one "
        "Python process: rates are capped by it, server CPU per unit is not.  "
        "Others' CPU: CPUs' worth of time used by processes other than the "
        "server and the client during the measurement (run.py's "
        f"BackgroundMeter), worst round; **!** from {run.QUIET_THRESHOLD} up.\n"
    )
    for sc in all_sc:
        if sc.mode == "bulk":
            head = [
                "server",
                "MB/s",
                f"\u00f7 {ref}",
                "server CPU \u00b5s/MiB",
                f"\u00f7 {ref}",
                "others' CPU",
            ]
        else:
            unit = "handshakes/s" if sc.mode == "handshake" else "req/s"
            per = "handshake" if sc.mode == "handshake" else "req"
            head = [
                "server",
                unit,
                f"\u00f7 {ref}",
                "p50 \u00b5s",
                "p99 \u00b5s",
                f"server CPU \u00b5s/{per}",
                f"\u00f7 {ref}",
                "others' CPU",
            ]
        rows = []
        r = cells[ref, sc.name]
        for name in names:
            c = cells[name, sc.name]
            row = [
                SYSTEMS[name].label,
                fmt_range(c.rate, ".0f"),
                fmt_range(per_round_ratio(c.rate, r.rate), ".2f"),
            ]
            if sc.mode != "bulk":
                row += [fmt_range(c.p50, ".0f"), fmt_range(c.p99, ".0f")]
            row += [
                fmt_range(c.cpu, ".1f" if sc.mode != "bulk" else ".0f"),
                fmt_range(per_round_ratio(c.cpu, r.cpu), ".2f"),
                worst(c.background),
            ]
            rows.append(row)
        if sc.mode == "pingpong":
            title = f"{sc.conns} connection{'s' * (sc.conns > 1)}, 64-byte line echoed"
        elif sc.mode == "handshake":
            title = (
                f"{sc.conns} client thread{'s' * (sc.conns > 1)}: "
                "connect, full handshake, one line echoed, close"
            )
        else:
            n = args.bulk_total // sc.bulk_size
            title = f"one connection, {n} x `bulk {sc.bulk_size}`"
        print(f"### {sc.name}: {title}\n")
        print(md_table(head, rows))
        errs = [f"{n}: {e}" for n in names for e in cells[n, sc.name].errors]
        if errs:
            print("\nErrors: " + "; ".join(e[:160] for e in errs))
        print()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, 2 rounds")
    parser.add_argument(
        "--systems", help=f"comma-separated, from: {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--scenarios", help="comma-separated names or prefixes")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=float, help="pingpong warm-up seconds")
    parser.add_argument("--duration", type=float, help="measured seconds")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk run (256)")
    parser.add_argument("--no-pin", action="store_true")
    # internal modes
    parser.add_argument(
        "--serve", choices=("ds_trio", "trio", "asyncio"), help=argparse.SUPPRESS
    )
    parser.add_argument("--backend", default="trio", help=argparse.SUPPRESS)
    parser.add_argument(
        "--client", choices=("pingpong", "handshake", "bulk"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certdir", help=argparse.SUPPRESS)
    parser.add_argument("--conns", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--bulk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bulk-total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve == "ds_trio":
        serve_ds_trio(args.port, args.certdir, args.backend)
        return
    if args.serve == "trio":
        serve_trio(args.port, args.certdir)
        return
    if args.serve == "asyncio":
        serve_asyncio(args.port, args.certdir, args.backend)
        return
    if args.client:
        args.warmup = 0.0 if args.warmup is None else args.warmup
        args.duration = 1.0 if args.duration is None else args.duration
        client_main(args)
        return

    args.rounds = args.rounds or (2 if args.quick else 5)
    args.warmup = (
        args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    )
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.bulk_total = (args.bulk_mib or (32 if args.quick else 256)) * MIB
    harness(args)


if __name__ == "__main__":
    main()
