"""Bench echo server on a plain ``selectors`` loop: the in-Python ceiling.

No framework, no coroutines: one level-triggered epoll (``DefaultSelector``),
non-blocking sockets, callbacks inline.  Like the DS clients and the C
server, a connection with unsent output stops reading until it drained:
that is the back-pressure, and it keeps responses in request order.

Usage: ``python bench/servers/selectors_echo.py PORT``
"""

from __future__ import annotations

import selectors
import socket
from collections import deque

from _common import (
    RECV_SIZE,
    parse_args,
    parse_requests,
    raise_nofile_limit,
    ready,
    zero_chunks,
)


class Conn:
    """One client: its socket, unparsed input and unsent output."""

    __slots__ = ("out", "rest", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rest = b""
        self.out: deque[memoryview] = deque()
        self.writing = False  # registered for EVENT_WRITE instead of READ


def _flush(conn: Conn) -> bool:
    """Send queued output; True when drained.  Raises OSError if gone."""
    out = conn.out
    while out:
        view = out[0]
        try:
            sent = conn.sock.send(view)
        except BlockingIOError:
            return False
        if sent < len(view):
            out[0] = view[sent:]
            return False
        out.popleft()
    return True


def serve(port: int) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    ready(lsock.getsockname()[1])

    def close(conn: Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    def set_writing(conn: Conn, writing: bool) -> None:
        if conn.writing != writing:
            conn.writing = writing
            events = selectors.EVENT_WRITE if writing else selectors.EVENT_READ
            sel.modify(conn.sock, events, conn)

    def on_event(conn: Conn) -> None:
        try:
            if conn.writing:
                if not _flush(conn):
                    return
                set_writing(conn, False)
                # lines that arrived behind the bulk request are handled now
                if conn.rest and handle(conn, b""):
                    return
            data = conn.sock.recv(RECV_SIZE)
            if not data:
                close(conn)
                return
            handle(conn, data)
        except OSError:  # ECONNRESET and friends: the client left
            close(conn)

    def handle(conn: Conn, data: bytes) -> bool:
        """Answer complete lines; True if output is pending (now writing)."""
        items, conn.rest = parse_requests(conn.rest + data if conn.rest else data)
        out = conn.out
        for item in items:
            if isinstance(item, int):
                out.extend(zero_chunks(item))
            else:
                out.append(memoryview(item))
        if _flush(conn):
            return False
        set_writing(conn, True)
        return True

    def on_accept() -> None:
        # A bounded batch: enough to drain a burst, short enough that
        # established clients are not starved by a connect storm.
        for _ in range(64):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(sock, selectors.EVENT_READ, Conn(sock))

    while True:
        for key, _mask in sel.select():
            if key.data is None:
                on_accept()
            else:
                on_event(key.data)


def main() -> None:
    args = parse_args(__doc__ or "")
    raise_nofile_limit()
    serve(args.port)


if __name__ == "__main__":
    main()
