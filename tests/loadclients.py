"""Load-generating clients for a server in another process (plain epoll).

Shared by ``tests/test_load.py`` and ``bench/soak.py``.  Thousands of
connections are driven from one thread with ``select.epoll``: no event
loop, no task per connection, so the client side costs a socket and a few
bytes per connection and never competes with the server's loop for the
GIL.  :class:`ServerProcess` starts ``bench/loadserver.py`` and talks to
its control pipe.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOADSERVER = REPO / "bench" / "loadserver.py"
HOST = "127.0.0.1"

#: Real-time bound on any wait here: a guard against hangs, never a
#: measurement.
GUARD = 120.0


def raise_nofile(want: int) -> int:
    """Raise this process's soft fd limit towards ``want`` (up to the hard one).

    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


class ServerProcess:
    """``bench/loadserver.py`` running in a child process."""

    def __init__(
        self,
        app: str = "echo",
        backend: str = "trio",
        *,
        exptime: float | None = None,
        root: str | None = None,
        sndbuf: int = 0,
        stderr: Any = None,
    ) -> None:
        cmd = [sys.executable, str(LOADSERVER), "--app", app, "--backend", backend]
        if exptime is not None:
            cmd += ["--exptime", str(exptime)]
        if root is not None:
            cmd += ["--root", root]
        if sndbuf:
            cmd += ["--sndbuf", str(sndbuf)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        hello = self._line()
        self.port: int = hello["port"]
        self.pid: int = hello["pid"]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load server exited: {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._line()

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def wait_registered(self, n: int) -> None:
        """Wait until the server holds ``n`` objects (clients + its own 2)."""
        self.wait_stats(lambda st: st["registered"] == n, command="count")

    def wait_stats(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        command: str = "stats",
        timeout: float = GUARD,
    ) -> dict[str, Any]:
        """Poll ``command`` until ``predicate`` holds (bounded; raises on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.command(command)
            if "error" not in st and predicate(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"server stats never matched: {st}")
            time.sleep(0.002)

    def proc_fds(self) -> dict[int, str]:
        """The server's open fds, read from ``/proc`` (outside its loop)."""
        base = f"/proc/{self.pid}/fd"
        fds = {}
        for name in os.listdir(base):
            try:
                fds[int(name)] = os.readlink(f"{base}/{name}")
            except OSError:
                continue
        return fds

    def zombies(self) -> int:
        """The server's children that exited and were never reaped."""
        from ds_trio.testing import child_processes

        return sum(1 for s in child_processes(self.pid).values() if s == "Z")

    def quit(self) -> int:
        """Stop the server; its exit status."""
        try:
            self.command("quit")
        except (BrokenPipeError, RuntimeError, json.JSONDecodeError):
            pass
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class Pool:
    """Many client connections to one port, driven by one epoll set."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.addr = (host, port)
        self.ep = select.epoll()
        self.socks: list[socket.socket] = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()
        self.ep.close()

    def connect(
        self,
        n: int,
        *,
        batch: int = 1000,
        accepted: Callable[[int], None] | None = None,
    ) -> list[socket.socket]:
        """Open ``n`` connections in batches of ``batch``.

        After each batch ``accepted(total)`` is called (it should wait until
        the server accepted them): the listen backlog is never overrun, so
        no SYN waits for a retransmission.
        """
        new: list[socket.socket] = []
        while len(new) < n:
            chunk = []
            for _ in range(min(batch, n - len(new))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(self.addr)
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise OSError(err, os.strerror(err))
                chunk.append(s)
            self._wait_connected(chunk)
            new += chunk
            self.socks += chunk
            if accepted is not None:
                accepted(len(self.socks))
        return new

    def _wait_connected(self, socks: list[socket.socket]) -> None:
        pending = {s.fileno(): s for s in socks}
        for fd in pending:
            self.ep.register(fd, select.EPOLLOUT)
        deadline = time.monotonic() + GUARD
        try:
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} connects never completed")
                for fd, _ in self.ep.poll(1.0):
                    s = pending.pop(fd)
                    self.ep.unregister(fd)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect: {os.strerror(err)}")
        finally:
            for fd in pending:
                self.ep.unregister(fd)

    def exchange(
        self, socks: Iterable[socket.socket], make: Callable[[int], bytes]
    ) -> tuple[int, int]:
        """Send ``make(i)`` on the i-th socket, read the echo of each.

        Returns ``(bytes_lost, dropped)``: bytes that did not come back as
        sent (wrong or missing) and connections that closed or reset
        instead of answering.
        """
        want: dict[int, tuple[socket.socket, bytes]] = {}
        got: dict[int, bytearray] = {}
        for i, s in enumerate(socks):
            data = make(i)
            s.sendall(data)  # a short line always fits the socket buffer
            want[s.fileno()] = (s, data)
            got[s.fileno()] = bytearray()
            self.ep.register(s.fileno(), select.EPOLLIN)
        lost = dropped = 0
        deadline = time.monotonic() + GUARD
        try:
            while want:
                if time.monotonic() > deadline:
                    break
                for fd, _ in self.ep.poll(1.0):
                    s, data = want[fd]
                    buf = got[fd]
                    try:
                        chunk = s.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        dropped += 1
                        lost += len(data) - len(buf)
                    else:
                        buf += chunk
                        if len(buf) < len(data):
                            continue
                        if buf != data:
                            lost += len(data)
                    del want[fd]
                    self.ep.unregister(fd)
        finally:
            for fd, (_, data) in want.items():
                lost += len(data) - len(got[fd])
                dropped += 1
                self.ep.unregister(fd)
        return lost, dropped

    def close_all(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()
