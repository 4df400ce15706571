"""A tiny line echo server: the smallest real DS program.

    python -m ds_trio.examples.echo [--host 127.0.0.1] [--port 7007] [--backend trio]

Each client is a DS object with ``EPOLLIN|EPOLLONESHOT`` interest.  Its
``event_step`` first tries to finish pending output and reads more only once
that output is gone - DS's backpressure rule ("only read more requests if
we've drained the write buffer").  Until the write path lands, the pending
output lives in a small buffer here; accepting is done by a level-triggered
listener object.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Callable

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT

log = logging.getLogger("ds_trio.examples.echo")


class EchoClient(DS):
    """Echoes each line back."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.pending = b""

    def event_step(self) -> None:
        if not self._flush():
            return
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        while self.sock is not None and self.do_read(rbuf, 65536, len(rbuf)):
            end = rbuf.rfind(b"\n") + 1
            if end:
                self.pending = bytes(rbuf[:end])
                del rbuf[:end]
                if not self._flush():
                    self.rbuf_idle(rbuf)
                    return

    def _flush(self) -> bool:
        """Send pending output; True when it is all gone and the socket open."""
        while self.pending and self.sock is not None:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                self.epwait(EPOLLOUT | EPOLLONESHOT)
                return False
            except OSError:
                self.close()
                return False
            self.pending = self.pending[sent:]
        return self.sock is not None


class Listener(DS):
    """Accepts one connection per wake-up (level-triggered, as upstream)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, EPOLLIN)

    def event_step(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        EchoClient(conn)


def make_post_accept() -> Callable[[socket.socket, object, socket.socket], object]:
    """The daemon's app factory: ``ds_trio._daemon`` calls it once per worker."""

    def post_accept(sock: socket.socket, _addr: object, _listen: socket.socket) -> None:
        EchoClient(sock)

    return post_accept


async def serve(host: str, port: int) -> None:
    """Listen on ``host:port`` and echo lines until cancelled."""
    listener = socket.create_server((host, port), backlog=1024)
    async with ds_trio.loop(errors="log"):
        Listener(listener)
        log.warning("echo server listening on %s:%d", *listener.getsockname()[:2])


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
    try:
        anyio.run(serve, args.host, args.port, backend=backend, backend_options=options)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
