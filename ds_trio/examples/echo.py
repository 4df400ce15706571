"""A line echo server: the smallest real DS program.

    python -m ds_trio.examples.echo [--host HOST] [--port 7007] [--backend trio]
    python -m ds_trio._daemon ds_trio.examples.echo:make_post_accept \
        -l 127.0.0.1:7007 -W 2

Each client is a DS object with ``EPOLLIN|EPOLLONESHOT`` interest.  Its
``event_step`` follows public-inbox's pattern: flush queued output first and
read more only once it is gone ("otherwise we can be buffering infinitely
w/o backpressure"), answer every complete line with ``write()``, keep a
partial line in ``rbuf``, and mark activity for idle expiry when a line is
complete or queued output has drained (bytes of an unfinished line are not
activity: a slowloris client is expired).  SIGTERM,
SIGQUIT or SIGINT start a graceful shutdown: the listener closes, idle
clients are closed, busy ones (a partial line, unsent output) finish.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from collections.abc import Callable

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT

log = logging.getLogger("ds_trio.examples.echo")

#: The longest line a client may send before it is dropped.
MAX_LINE = 65536


class EchoClient(DS):
    """Echoes each line back."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.update_idle_time()

    def event_step(self) -> None:
        had_output = bool(self.wbuf)
        if not self.flush_write() or self.sock is None:
            return
        if had_output:
            self.update_idle_time()  # queued output drained: progress
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.do_read(rbuf, 65536, len(rbuf)):
            end = rbuf.rfind(b"\n") + 1
            if end:
                # Only complete lines count as activity: a client trickling
                # a byte at a time and never ending its line (slowloris)
                # stays idle and is expired after EXPTIME.
                self.update_idle_time()
                self.write(bytes(rbuf[:end]))
                del rbuf[:end]
            if len(rbuf) > MAX_LINE:
                self.drop(f"line longer than {MAX_LINE} bytes")
                return
            if self.wbuf:
                # Output is queued and its wake-up arranged: read more only
                # once it has drained.
                self.rbuf_idle(rbuf)
                return

    def busy(self) -> bool:
        """Mid-line or with unsent output: graceful shutdown waits for it."""
        return bool(self.rbuf or self.wbuf)


def make_post_accept() -> Callable[[socket.socket, object, socket.socket], object]:
    """The daemon's app factory: ``ds_trio._daemon`` calls it once per worker."""

    def post_accept(sock: socket.socket, _addr: object, _listen: socket.socket) -> None:
        EchoClient(sock)

    return post_accept


async def serve(host: str, port: int) -> None:
    """Listen on ``host:port`` and echo lines until a shutdown signal."""

    def shut_down(signum: int) -> None:
        log.warning("signal %d: shutting down gracefully", signum)
        ds_trio.graceful_shutdown(timeout=10)

    signals = dict.fromkeys((signal.SIGTERM, signal.SIGQUIT, signal.SIGINT), shut_down)
    async with ds_trio.loop(errors="log", signals=signals):
        [address] = _start(host, port)
        log.warning("echo server listening on %s:%d", *address[:2])


def _start(host: str, port: int) -> list[tuple[str, int]]:
    listener = socket.create_server((host, port), backlog=1024)
    listener.setblocking(False)
    post_accept = make_post_accept()
    ds_trio.Listener(listener, post_accept)
    return [listener.getsockname()]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="ds_trio line echo server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument(
        "--backend", default="trio", choices=["trio", "asyncio", "uvloop"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    backend = "asyncio" if args.backend == "uvloop" else args.backend
    options = {"use_uvloop": True} if args.backend == "uvloop" else {}
    anyio.run(serve, args.host, args.port, backend=backend, backend_options=options)


if __name__ == "__main__":
    main()
