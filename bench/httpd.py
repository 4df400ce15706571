"""The httpd example against ``python -m http.server`` and nginx.

    .venv/bin/python bench/httpd.py            # full: 3 rounds, ~8-12 min
    .venv/bin/python bench/httpd.py --quick    # ~2 min: 2 rounds, 256 MiB
    .venv/bin/python bench/httpd.py --systems ds_trio-trio,nginx --rounds 5

Every system serves the same temporary directory (a 1 KiB file and a 1 GiB
file) on a free loopback port, and is measured on:

``small``  requests/s for the 1 KiB file, ``wrk -t1 -c50`` for 5 s (after a
           1 s warm-up on the same server), and the server's CPU µs per
           request over the measured run;
``dl-1``   MB/s (10^6 bytes/s) of one download of the 1 GiB file;
``dl-N``   aggregate MB/s of N (default 4) concurrent downloads of it.

The downloads are read by N processes of this script (``--get``), pinned
with wrk to the client CPU: a blocking socket, ``recv_into`` a 1 MiB buffer,
the length checked against Content-Length and the file's size.  Each reader
connects and sends its request, then waits for a "go" line, so interpreter
start-up is not timed; MB/s = all bytes / (last end - first start) on the
system-wide monotonic clock.  The readers' own CPU is recorded
(``reader_cpu``, in CPUs over the transfer) to show they are not the
bottleneck.  Server CPU per GiB comes from ``/proc/PID/task/*/schedstat`` of
the server and its children (nginx's worker).

The systems (``--list``): the httpd example (``ds_trio.examples.httpd``) on
trio, asyncio and uvloop; ``python -m http.server -p HTTP/1.1`` (threading,
keep-alive); nginx (Debian's ``nginx-light``, installed with apt-get when
missing and running as root; skipped otherwise) with ``worker_processes 1``,
``sendfile on``, ``tcp_nopush on``, started in the foreground with a
temporary configuration.  All of them write an access log line per request
(to a file), as they do by default.  Servers are pinned to one CPU and the
clients to the other (taskset); systems rotate order each round; a fresh
server per system per round.  Results: a Markdown table of medians with
(min-max) over rounds and per-round ratios, printed and written to
``bench/results/httpd-<time>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import run
from _benchutil import DASH, fmt_range, md_table, per_round_ratio

THIS = str(Path(__file__).resolve())
GIB = 1 << 30
SMALL_NAME, BIG_NAME = "1k.txt", "big.bin"

NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    types {{ text/plain txt; }}
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def _example(backend: str) -> list[str]:
    return [run.PYTHON, "-m", "ds_trio.examples.httpd", "--root", "{root}",
            "--port", "{port}", "--backend", backend]  # fmt: skip


SYSTEMS: dict[str, tuple[str, list[str]]] = {
    "ds_trio-trio": ("ds_trio httpd on trio", _example("trio")),
    "ds_trio-asyncio": ("ds_trio httpd on asyncio", _example("asyncio")),
    "ds_trio-uvloop": ("ds_trio httpd on uvloop", _example("uvloop")),
    "http.server": (
        "python -m http.server (threads)",
        [
            run.PYTHON,
            "-m",
            "http.server",
            "-b",
            "127.0.0.1",
            "-d",
            "{root}",
            "-p",
            "HTTP/1.1",
            "{port}",
        ],
    ),
    "nginx": (
        "nginx 1 worker, sendfile",
        ["nginx", "-p", "{tmp}", "-c", "{tmp}/nginx.conf", "-g", "daemon off;"],
    ),
}
REFERENCES = ("nginx", "http.server")


@dataclass
class Result:
    system: str
    round: int
    rps: float | None = None
    cpu_us_per_req: float | None = None
    p99_ms: float | None = None
    wrk_cpu: float | None = None  # CPUs wrk used during the measured run
    dl1_mbps: float | None = None
    dl1_cpu_s_per_gib: float | None = None
    dln_mbps: float | None = None
    dln_cpu_s_per_gib: float | None = None
    reader_cpu: float | None = None  # CPUs the readers used during dl-N
    others_cpu: float | None = None  # CPUs used by others, worst scenario
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# The reader (a child process).


def get(host: str, port: int, path: str, expect: int) -> None:
    """Download ``path``; print JSON with the timing and the length."""
    sock = socket.create_connection((host, port), timeout=120)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    sys.stdout.write("connected\n")
    sys.stdout.flush()
    sys.stdin.readline()  # "go"
    start = time.monotonic()
    cpu0 = time.process_time()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    head = b""
    while b"\r\n\r\n" not in head:
        n = sock.recv_into(view)
        if not n:
            raise SystemExit("EOF in the response head")
        head += bytes(view[:n])
    head, _, rest = head.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    got = len(rest)
    while got < length:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
    end = time.monotonic()
    sock.close()
    ok = status == 200 and got == length == expect
    json.dump(
        {"ok": ok, "status": status, "bytes": got, "start": start, "end": end,
         "cpu": time.process_time() - cpu0},
        sys.stdout,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Servers.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from ``/proc/PID/stat``, 0.0 once gone.

    Not the per-thread ``schedstat`` sum that run.py uses: http.server's
    threads exit with their connections, and a dead thread's time is only
    kept in the process's totals (at clock-tick resolution, fine for runs of
    seconds).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (nginx's worker), in seconds."""
    total = proc_cpu_seconds(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            total += proc_cpu_seconds(int(entry))
    return total


class Others:
    """CPUs used by processes other than the server tree and our children."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.busy0 = run._busy_seconds()
        self.server0 = tree_cpu_seconds(pid)
        self.children0 = run._children_seconds()

    def read(self, extra_cpu: float = 0.0) -> float:
        wall = time.monotonic() - self.t0
        ours = tree_cpu_seconds(self.pid) - self.server0
        ours += run._children_seconds() - self.children0 + extra_cpu
        return max(0.0, (run._busy_seconds() - self.busy0 - ours) / wall)


class Server:
    def __init__(
        self, name: str, root: Path, tmp: Path, cpu: int | None, log: IO[bytes]
    ) -> None:
        self.port = free_port()
        subs = {"{root}": str(root), "{port}": str(self.port), "{tmp}": str(tmp)}
        argv = [subs.get(a, a).replace("{tmp}", str(tmp)) for a in SYSTEMS[name][1]]
        if name == "nginx":
            (tmp / "nginx.conf").write_text(
                NGINX_CONF.format(tmp=tmp, port=self.port, root=root)
            )
        env = dict(os.environ, PYTHONPATH=str(run.REPO_DIR))
        self.proc = subprocess.Popen(
            run.pinned(argv, cpu), stdin=subprocess.DEVNULL, stdout=log,
            stderr=log, cwd=tmp, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def nginx_available(install: bool) -> str | None:
    """None if nginx can run, else why not (installing it when allowed)."""
    if shutil.which("nginx"):
        return None
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return "nginx not installed (apt-get install nginx-light)"
    run.log("installing nginx-light with apt-get ...")
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"],
    ):
        if subprocess.run(argv, capture_output=True, check=False).returncode:
            return f"{' '.join(argv[:2])} failed"
    return None if shutil.which("nginx") else "nginx-light did not install nginx"


# --------------------------------------------------------------------------
# Measurements.


def wrk(port: int, cpu: int | None, seconds: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", "-c50", f"-d{seconds}s", "--timeout", "10s", "--latency",
            f"http://127.0.0.1:{port}/{SMALL_NAME}"]  # fmt: skip
    out = subprocess.run(
        run.pinned(argv, cpu), capture_output=True, text=True, timeout=seconds + 60,
        check=False,
    ).stdout  # fmt: skip
    res: dict[str, Any] = {"errors": []}
    for line in out.splitlines():
        words = line.split()
        if " requests in " in line:
            res["requests"] = int(words[0])
        elif line.startswith("Requests/sec:"):
            res["rps"] = float(words[1])
        elif words[:1] == ["99%"]:
            res["p99_ms"] = _ms(words[1])
        elif "Socket errors" in line or "Non-2xx" in line:
            res["errors"].append(line.strip())
    if "requests" not in res:
        res["errors"].append(f"wrk output not understood: {out[-300:]!r}")
    return res


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def downloads(
    port: int, cpu: int | None, n: int, size: int
) -> tuple[float | None, float, list[str]]:
    """(aggregate MB/s, readers' CPUs, errors) for ``n`` concurrent downloads."""
    argv = [run.PYTHON, THIS, "--get", str(port), f"/{BIG_NAME}", str(size)]
    procs = [
        subprocess.Popen(
            run.pinned(argv, cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()  # "connected": the request is sent
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results, errors = [], []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        try:
            results.append(json.loads(out))
        except ValueError:
            errors.append(f"reader failed: {out[-200:]!r}")
    errors += [f"bad download: {r}" for r in results if not r["ok"]]
    if errors or not results:
        return None, 0.0, errors
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["bytes"] for r in results)
    return total / wall / 1e6, sum(r["cpu"] for r in results) / wall, errors


def measure(
    name: str, rnd: int, root: Path, args: argparse.Namespace, logs: Path
) -> Result:
    res = Result(name, rnd)
    cpus = None if args.no_pin else run.choose_cpus()
    scpu, ccpu = (cpus[0], cpus[1]) if cpus else (None, None)
    with (
        tempfile.TemporaryDirectory(prefix=f"httpd-{name}-") as tmpdir,
        (logs / f"{name}.log").open("ab") as log,
    ):
        tmp = Path(tmpdir)
        server = Server(name, root, tmp, scpu, log)
        try:
            others: list[float] = []
            wrk(server.port, ccpu, 1)  # warm-up
            meter = Others(server.pid)
            cpu0, wrk0 = tree_cpu_seconds(server.pid), run._children_seconds()
            w = wrk(server.port, ccpu, args.duration)
            cpu = tree_cpu_seconds(server.pid) - cpu0
            res.wrk_cpu = (run._children_seconds() - wrk0) / args.duration
            others.append(meter.read())
            res.errors += w["errors"]
            if w.get("requests"):
                res.rps, res.p99_ms = w.get("rps"), w.get("p99_ms")
                res.cpu_us_per_req = cpu / w["requests"] * 1e6
            for n in (1, args.concurrent):
                meter = Others(server.pid)
                cpu0 = tree_cpu_seconds(server.pid)
                mbps, reader_cpu, errors = downloads(server.port, ccpu, n, args.size)
                cpu = tree_cpu_seconds(server.pid) - cpu0
                others.append(meter.read())
                res.errors += errors
                per_gib = cpu / (n * args.size / GIB)
                if n == 1:
                    res.dl1_mbps, res.dl1_cpu_s_per_gib = mbps, per_gib
                else:
                    res.dln_mbps, res.dln_cpu_s_per_gib = mbps, per_gib
                    res.reader_cpu = reader_cpu
            res.others_cpu = max(others)
        finally:
            server.stop()
    return res


# --------------------------------------------------------------------------
# Report.


def report(
    results: list[Result], names: Sequence[str], args: argparse.Namespace
) -> str:
    def series(name: str, attr: str) -> list[float | None]:
        return [getattr(r, attr) for r in results if r.system == name]

    refs = [r for r in REFERENCES if r in names]

    def ratio(name: str, attr: str, ref: str) -> str:
        return fmt_range(per_round_ratio(series(name, attr), series(ref, attr)), ".2f")

    size = f"{args.size / GIB:g} GiB" if args.size >= GIB else f"{args.size >> 20} MiB"
    head1 = ["system", "req/s", "CPU µs/req", "p99 ms", "wrk's CPUs"]
    head1 += [f"{what} ÷ {ref}" for ref in refs for what in ("req/s", "CPU/req")]
    rows1 = []
    for name in names:
        row = [SYSTEMS[name][0], fmt_range(series(name, "rps"), ".0f"),
               fmt_range(series(name, "cpu_us_per_req"), ".0f"),
               fmt_range(series(name, "p99_ms"), ".1f"),
               fmt_range(series(name, "wrk_cpu"), ".2f")]  # fmt: skip
        for ref in refs:
            row += [ratio(name, "rps", ref), ratio(name, "cpu_us_per_req", ref)]
        rows1.append(row)
    n = args.concurrent
    head2 = ["system", "MB/s x1", f"MB/s x{n}", "CPU s/GiB x1", f"CPU s/GiB x{n}",
             f"readers' CPUs x{n}"]  # fmt: skip
    head2 += [f"MB/s x{n} ÷ {ref}" for ref in refs]
    head2 += [f"CPU/GiB x{n} ÷ {ref}" for ref in refs]
    rows2 = []
    for name in names:
        row = [SYSTEMS[name][0], fmt_range(series(name, "dl1_mbps"), ".0f"),
               fmt_range(series(name, "dln_mbps"), ".0f"),
               fmt_range(series(name, "dl1_cpu_s_per_gib"), ".2f"),
               fmt_range(series(name, "dln_cpu_s_per_gib"), ".2f"),
               fmt_range(series(name, "reader_cpu"), ".2f")]  # fmt: skip
        row += [ratio(name, "dln_mbps", ref) for ref in refs]
        row += [ratio(name, "dln_cpu_s_per_gib", ref) for ref in refs]
        rows2.append(row)
    others = [r.others_cpu for r in results if r.others_cpu is not None]
    lines = [
        f"`{' '.join(['bench/httpd.py', *sys.argv[1:]])}` — {args.rounds} rounds, "
        f"{datetime.now():%Y-%m-%d %H:%M}; others' CPU (worst scenario per "
        f"round, median) {fmt_range(others, '.2f')}",
        "",
        f"1 KiB file, wrk -t1 -c50, {args.duration:g} s:",
        "",
        md_table(head1, rows1),
        "",
        f"{size} file, single and {n} concurrent downloads:",
        "",
        md_table(head2, rows2),
    ]
    errors = [f"- {r.system} round {r.round}: {e}" for r in results for e in r.errors]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def make_root(where: Path, size: int) -> Path:
    root = where / "root"
    root.mkdir()
    (root / SMALL_NAME).write_bytes(b"0123456789abcdef" * 64)
    block = os.urandom(1 << 20)
    with (root / BIG_NAME).open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    # nginx's worker runs as "nobody" when started as root.
    for path in (where, root, root / SMALL_NAME, root / BIG_NAME):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=int, help="wrk seconds (5)")
    parser.add_argument("--size-mib", type=int, help="big file in MiB (1024)")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--systems", help="comma-separated names (--list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--get", nargs=3, metavar=("PORT", "PATH", "SIZE"))
    args = parser.parse_args(argv)
    if args.get:
        get("127.0.0.1", int(args.get[0]), args.get[1], int(args.get[2]))
        return
    if args.list:
        for name, (label, _) in SYSTEMS.items():
            print(f"{name:16} {label}")
        return
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    args.size = (args.size_mib or (256 if args.quick else 1024)) << 20
    names = run.select_names(args.systems, list(SYSTEMS), "system")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    if "nginx" in names and (why := nginx_available(not args.no_install)):
        run.log(f"skipping nginx: {why}")
        names.remove("nginx")
    run.raise_nofile_limit()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = run.RESULTS_DIR
    logs = out_dir / f"httpd-{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="httpd-bench-") as tmpdir:
        run.log(f"writing the {args.size >> 20} MiB file ...")
        root = make_root(Path(tmpdir), args.size)
        for rnd, order in enumerate(run.rotations(names, args.rounds), 1):
            for name in order:
                run.log(f"round {rnd}/{args.rounds}: {name}")
                try:
                    res = measure(name, rnd, root, args, logs)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    res = Result(name, rnd, errors=[str(e)])
                run.log(
                    f"  {res.rps or 0:.0f} req/s, {res.cpu_us_per_req or 0:.0f} µs/req;"
                    f" {res.dl1_mbps or 0:.0f} / {res.dln_mbps or 0:.0f} MB/s"
                    + (f"; errors: {res.errors}" if res.errors else "")
                )
                results.append(res)
    text = report(results, names, args)
    print(text)
    (out_dir / f"httpd-{stamp}.md").write_text(text)
    (out_dir / f"httpd-{stamp}.json").write_text(
        json.dumps([r.__dict__ for r in results], indent=1)
    )
    run.log(f"wrote {out_dir / f'httpd-{stamp}.md'} {DASH} logs in {logs}")


if __name__ == "__main__":
    main()
