"""A static-file HTTP/1.1 server in the spirit of public-inbox-httpd.

    python -m ds_trio.examples.httpd --root DIR [--port 8080] [--cert C --key K]
    python -m ds_trio.examples.httpd --root DIR --workers 2   # via ds_trio._daemon

Each client is a DS object with ``EPOLLIN|EPOLLONESHOT`` interest, and its
``event_step`` follows ``PublicInbox::HTTP``: flush queued output first and
read only once it is gone (backpressure: a pipelining client that never
reads its responses stops being read), parse one request from ``rbuf``,
read and discard its body, answer it, and queue ``_next_request`` behind the
response so the next pipelined request is parsed only after the previous
response has drained.  Files are streamed by a queued callable that sends
one piece and re-queues itself (``getline_pull``): on plain sockets an
``os.sendfile`` of what the socket takes (then it waits for ``EPOLLOUT``),
over TLS a ``pread`` chunk through ``write``, so a slow client costs at most
one chunk in a spill file, never the whole file.

Choices: ``Range`` with several ranges is answered with the whole file
(200), as RFC 9110 allows a server to ignore ``Range``; directories are
served through their ``index.html`` or not at all (404); anything that
would leave the root (``..`` segments, also encoded, or a symlink leading
out) gets 403/404 and not a byte of the file.  For idle expiry a complete
request head, body bytes and response bytes sent are activity; header
bytes trickling in are not, so a slowloris client is expired after
``EXPTIME``.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import logging
import mimetypes
import os
import re
import signal
import socket
import ssl
import stat
import urllib.parse
from collections import deque
from collections.abc import Callable

import anyio

import ds_trio
from ds_trio import DS, EPOLLIN, EPOLLONESHOT, EPOLLOUT

__all__ = ["HTTPClient", "main", "make_post_accept", "serve"]

log = logging.getLogger("ds_trio.examples.httpd")

MAX_REQUEST_LINE = 8192  # longer → 414
MAX_HEADER = 16384  # unfinished header longer than this → 400 (HTTP.pm's 0x4000)
MAX_CHUNK_LINE = 256  # chunk-size line cap (HTTP.pm), against endless hex
CHUNK = 65536  # bytes pread per streaming step (TLS)
SENDFILE_CHUNK = 1 << 20  # bytes offered to one sendfile() (plain TCP/UNIX)
ENV_ROOT, ENV_CERT, ENV_KEY = (
    "DS_TRIO_HTTPD_ROOT",
    "DS_TRIO_HTTPD_CERT",
    "DS_TRIO_HTTPD_KEY",
)

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")  # more digits: absurd, and int()
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # int(b"-1", 16) is valid Python
_REASONS = {
    100: "Continue",
    200: "OK",
    206: "Partial Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
}


class BadRequest(Exception):
    """The client broke the protocol: answer ``status`` and close."""

    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


class Request:
    """A parsed request head."""

    def __init__(self, method: str, target: str, version: str) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers: dict[str, str] = {}

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",")}

    def keep_alive(self) -> bool:
        conn = self.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_head(head: bytes) -> Request:
    """Parse a request line and header fields (without the blank line)."""
    line, *fields = head.split(b"\n")
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise BadRequest
    method, target, version = parts
    if not _VERSION.fullmatch(version) or not target:
        raise BadRequest
    req = Request(method.decode(), target.decode("latin-1"), version.decode())
    for raw in fields:
        name, colon, value = raw.rstrip(b"\r").partition(b":")
        # No obs-fold and no "Name :" (request-smuggling guards, as HTTP.pm).
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest
        key, val = name.decode().lower(), value.strip(b" \t").decode("latin-1")
        # Duplicates fold to "a, b", so two Content-Lengths fail int() below.
        req.headers[key] = f"{req.headers[key]}, {val}" if key in req.headers else val
    return req


class HTTPClient(DS):
    """One HTTP connection: parse, discard bodies, serve files in order."""

    def __init__(
        self,
        sock: socket.socket,
        root: str,
        peer: str = "-",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(sock, EPOLLIN | EPOLLONESHOT)
        self.root = os.fsencode(os.path.realpath(root))
        self.peer = peer
        self.req: Request | None = None  # head parsed, body still being read
        self.body_left = 0  # identity body bytes left to discard
        self.chunk_state: str | None = None  # "size", "data", "crlf", "trailer"
        self.responding = False  # from response start until it drained
        self.keep = False
        self.stream: tuple[int, int, int] | None = None  # (fd, offset, end)
        # Plain sockets get file bytes by sendfile(): no copy through Python
        # and no spill file, since it sends only what the socket takes.
        self.use_sendfile = tls is None
        self.update_idle_time()
        if tls is not None:
            # The handshake is driven by flush_write at the top of event_step.
            self.starttls(tls)

    def busy(self) -> bool:
        """Mid-request, mid-response or with output queued: shutdown waits."""
        return bool(self.rbuf or self.req or self.responding or self.wbuf)

    def close(self) -> bool:
        self._close_stream()
        return super().close()

    def event_step(self) -> None:
        had_output = bool(self.wbuf)
        if not self.flush_write() or self.sock is None:
            return
        if had_output:
            self.update_idle_time()  # queued output drained: progress
        rbuf = self.rbuf if self.rbuf is not None else bytearray()
        self.rbuf = None
        try:
            # Pipelined bytes already in rbuf are processed before reading.
            while not self._process(rbuf):
                if not self.do_read(rbuf, 16384, len(rbuf)):
                    return  # EAGAIN (rbuf kept, EPOLLIN armed) or closed
        except BadRequest as exc:
            # Framing is lost: answer, then close (keep is False).
            self.keep = False
            self.rbuf, self.req, self.chunk_state, self.body_left = None, None, None, 0
            self._error(exc.status, "-", "-")

    # -- request parsing ---------------------------------------------------

    def _process(self, rbuf: bytearray) -> bool:
        """Consume what ``rbuf`` holds; True once a response has started."""
        if self.req is None:
            while rbuf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore leading CRLFs
                del rbuf[:2]
            eol = rbuf.find(b"\n", 0, MAX_REQUEST_LINE + 1)
            if eol < 0 and len(rbuf) > MAX_REQUEST_LINE:
                raise BadRequest(414)
            end = _HEADER_END.search(rbuf, 0, MAX_HEADER + 4)
            if end is None:
                if len(rbuf) > MAX_HEADER:
                    raise BadRequest(400)
                return False
            req = parse_head(bytes(rbuf[: end.start()]))
            del rbuf[: end.end()]
            # A complete head is activity; its bytes trickling in are not,
            # so a slowloris client (a header byte now and then) expires.
            self.update_idle_time()
            self._prepare_body(req)
        if not self._discard_body(rbuf):
            return False
        done, self.req = self.req, None
        assert done is not None
        self.rbuf_idle(rbuf)  # pipelined bytes wait for this response to drain
        self._respond(done)
        return True

    def _prepare_body(self, req: Request) -> None:
        te = req.headers.get("transfer-encoding")
        cl = req.headers.get("content-length")
        if te is not None:
            if te.lower() != "chunked" or cl is not None:
                raise BadRequest  # HTTP.pm: only exactly "chunked"; no smuggling
            self.chunk_state = "size"
        elif cl is not None:
            if not _CONTENT_LENGTH.fullmatch(cl):
                raise BadRequest
            self.body_left = int(cl)
        has_body = self.chunk_state is not None or self.body_left > 0
        # HTTP/1.0 clients do not know 100 (RFC 9110 §10.1.1).  The write
        # cannot queue: a request is parsed only once the previous response
        # drained, so the socket buffer is empty and the body may be read on.
        if (
            has_body
            and req.version != "HTTP/1.0"
            and "100-continue" in req.tokens("expect")
        ):
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.req = req

    def _discard_body(self, rbuf: bytearray) -> bool:
        """Drop body bytes from ``rbuf``; True once the body is complete."""
        if rbuf and (self.body_left or self.chunk_state is not None):
            self.update_idle_time()  # an upload making progress is not idle
        if self.chunk_state is None and self.body_left:
            n = min(self.body_left, len(rbuf))
            del rbuf[:n]
            self.body_left -= n
            return not self.body_left
        while self.chunk_state is not None:
            if self.chunk_state == "data":
                n = min(self.body_left, len(rbuf))
                del rbuf[:n]
                self.body_left -= n
                if self.body_left:
                    return False
                self.chunk_state = "crlf"
            eol = rbuf.find(b"\n", 0, MAX_CHUNK_LINE)
            if eol < 0:
                if len(rbuf) >= MAX_CHUNK_LINE or (
                    self.chunk_state == "crlf" and len(rbuf) > 2
                ):
                    raise BadRequest
                return False
            line = bytes(rbuf[:eol]).rstrip(b"\r")
            del rbuf[: eol + 1]
            if self.chunk_state == "crlf":
                if line:
                    raise BadRequest
                self.chunk_state = "size"
            elif self.chunk_state == "size":
                size = line.split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.fullmatch(size):
                    raise BadRequest
                self.body_left = int(size, 16)
                self.chunk_state = "data" if self.body_left else "trailer"
            elif not line:  # the blank line after the trailer section
                self.chunk_state = None
        return True

    # -- responses ---------------------------------------------------------

    def _respond(self, req: Request) -> None:
        self.keep = req.keep_alive()
        path = req.target.split("?", 1)[0].split("#", 1)[0]
        head_only = req.method == "HEAD"
        if req.method not in ("GET", "HEAD"):
            self._error(405, req.method, path, extra="Allow: GET, HEAD\r\n")
            return
        try:
            fd, size, name = self._open(path)
        except BadRequest as exc:
            self._error(exc.status, req.method, path, head=head_only)
            return
        status, start, end = 200, 0, size
        extra = ""
        spec = req.headers.get("range", "").strip()
        # Several ranges ("a-b,c-d") or a malformed one: ignore Range (200).
        if _RANGE.fullmatch(spec):
            parsed = _parse_range(spec, size)
            if parsed is None:
                os.close(fd)
                unsat = f"Content-Range: bytes */{size}\r\n"
                self._error(416, req.method, path, extra=unsat, head=head_only)
                return
            start, end = parsed
            status = 206
            extra = f"Content-Range: bytes {start}-{end - 1}/{size}\r\n"
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        extra += f"Content-Type: {ctype}\r\nAccept-Ranges: bytes\r\n"
        head = self._head(status, end - start, extra)
        self._log(req.method, path, status, 0 if head_only else end - start)
        self.responding = True
        if head_only or start == end:
            os.close(fd)
            self.write(head)  # no MSG_MORE: nothing follows to push it out
            self._response_done()
            return
        # The stream first: a head write that finds the client gone closes
        # the object, and close() must close the file too.
        self.stream = (fd, start, end)
        self.msg_more(head)  # header and first chunk leave in one segment
        self.write(self._pull)

    def _open(self, target: str) -> tuple[int, int, str]:
        """Map a request path to an open regular file under the root."""
        if not target.startswith("/"):
            raise BadRequest(400)
        raw = urllib.parse.unquote_to_bytes(target)  # decoded exactly once
        if b"\0" in raw:
            raise BadRequest(400)
        parts = raw.split(b"/")
        if b".." in parts:  # also catches %2e%2e and ..%2f after decoding
            raise BadRequest(403)
        rel = b"/".join(p for p in parts if p and p != b".")
        path = os.path.realpath(os.path.join(self.root, rel))
        if os.path.isdir(path):
            path = os.path.realpath(os.path.join(path, b"index.html"))
        # realpath resolved every symlink: anything not under the root is
        # outside it, whatever the link said.
        if path != self.root and not path.startswith(self.root + b"/"):
            raise BadRequest(404)
        try:
            # O_NONBLOCK: a FIFO under the root must not hang the loop;
            # O_NOFOLLOW: a symlink swapped in after realpath is refused.
            fd = os.open(
                path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError:
            raise BadRequest(404) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadRequest(404)
        return fd, st.st_size, os.fsdecode(path)

    def _head(self, status: int, length: int, extra: str = "") -> bytes:
        conn = "keep-alive" if self.keep else "close"
        return (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Content-Length: {length}\r\nConnection: {conn}\r\n{extra}\r\n"
        ).encode("latin-1")

    def _error(
        self,
        status: int,
        method: str,
        path: str,
        *,
        extra: str = "",
        head: bool = False,
    ) -> None:
        body = b"" if head else f"{status} {_REASONS[status]}\n".encode()
        self._log(method, path, status, len(body))
        self.responding = True
        # The length is the body's even for HEAD (what GET would send).
        self.write(
            self._head(status, len(f"{status} {_REASONS[status]}\n"), extra) + body
        )
        self._response_done()

    def _log(self, method: str, path: str, status: int, nbytes: int) -> None:
        log.info("%s %s %s %d %d", self.peer, method, path, status, nbytes)

    def _pull(self, _obj: object) -> None:
        """Send one piece of the file, then queue itself behind it."""
        if self.stream is None or self.sock is None:
            return
        fd, offset, end = self.stream
        blocked = False
        if self.use_sendfile:
            want = min(SENDFILE_CHUNK, end - offset)
            try:
                sent = os.sendfile(self.sock.fileno(), fd, offset, want)
            except BlockingIOError:
                sent, blocked = 0, True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    self.close()  # the peer is gone (EPIPE, ECONNRESET)
                    return
                self.use_sendfile = False  # not for this socket: pread below
                sent = -1
            else:
                if not sent:  # the file shrank: the promised length is lost
                    self.close()
                    return
                # Less than offered: the socket is full; wait, do not retry.
                blocked = sent < want
        else:
            sent = -1
        if sent < 0:
            self._pull_pread(fd, offset, end)
            return
        offset += sent
        self.stream = (fd, offset, end)
        self.update_idle_time()  # a slow download is activity, not idleness
        if offset >= end:
            self._close_stream()
            self._response_done()
            return
        self._pull_again(EPOLLOUT if blocked else 0)

    def _pull_pread(self, fd: int, offset: int, end: int) -> None:
        """The TLS way: pread one chunk and write it (it may spill)."""
        try:
            data = os.pread(fd, min(CHUNK, end - offset), offset)
        except OSError as exc:
            log.warning("%s: read failed: %s", self.peer, exc)
            data = b""
        if not data:  # the file shrank: the promised length cannot be kept
            self.close()
            return
        offset += len(data)
        self.stream = (fd, offset, end)
        self.update_idle_time()
        self.write(data)
        if self.sock is None:
            return
        if offset >= end:
            self._close_stream()
            self._response_done()
            return
        self._pull_again(0)

    def _pull_again(self, wait: int) -> None:
        # HTTP.pm's getline_pull: go on after what is queued drains; when
        # nothing is, arrange the wake-up ourselves, as write() did not:
        # writability after a full socket, else the next loop round.
        # Append to the existing deque: flush_write may be holding it
        # (empty) while it runs us.
        queue = self.wbuf
        if queue is None:
            queue = self.wbuf = deque()
        idle = not queue
        queue.append(self._pull)
        if not idle:
            return
        if wait:
            self.epwait(self.epbit(wait | EPOLLONESHOT))
        else:
            self.requeue()

    def _close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            os.close(stream[0])

    def _response_done(self) -> None:
        # Runs after every byte of the response has been sent.
        self.write(self._next_request)

    def _next_request(self, _obj: object) -> None:
        self.responding = False
        if self.keep:
            self.requeue()  # parse pipelined bytes or read the next request
        else:
            self.shutdn()


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` → ``(start, end)`` (end exclusive); None: unsatisfiable."""
    m = _RANGE.fullmatch(spec)
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:  # suffix range: the last N bytes
        n = _position(m[2], size)
        return (max(size - n, 0), size) if n and size else None
    start = _position(m[1], size)
    end = min(_position(m[2], size) + 1, size) if m[2] else size
    return (start, end) if start < size and start < end else None


def _position(digits: str, size: int) -> int:
    """A byte position; past the file's size it is only "beyond the end".

    int() of thousands of digits raises (and costs quadratic time), so any
    number longer than the size's own digits is treated as size + 1.
    """
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(size)) else size + 1


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key or None)
    return ctx


PostAccept = Callable[[socket.socket, object, socket.socket], object]


def make_post_accept(
    root: str | None = None, tls: ssl.SSLContext | None = None
) -> PostAccept:
    """The app factory (``ds_trio._daemon`` calls it with no arguments).

    Without arguments the root and TLS files come from ``DS_TRIO_HTTPD_*``
    environment variables, which ``main`` sets before starting workers.
    """
    if root is None:
        root = os.environ.get(ENV_ROOT, ".")
        tls = _tls_context(os.environ.get(ENV_CERT), os.environ.get(ENV_KEY))

    def post_accept(sock: socket.socket, addr: object, _listen: socket.socket) -> None:
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr or "-")
        HTTPClient(sock, root, peer, tls)

    return post_accept


async def serve(
    host: str, port: int, root: str, tls: ssl.SSLContext | None = None
) -> None:
    """Serve ``root`` on ``host:port`` until a shutdown signal."""

    def shut_down(signum: int) -> None:
        log.warning("signal %d: shutting down gracefully", signum)
        ds_trio.graceful_shutdown(timeout=10)

    signals = dict.fromkeys((signal.SIGTERM, signal.SIGQUIT, signal.SIGINT), shut_down)
    async with ds_trio.loop(errors="log", signals=signals):
        listener = socket.create_server((host, port), backlog=1024)
        listener.setblocking(False)
        ds_trio.Listener(listener, make_post_accept(root, tls))
        log.warning("httpd serving %s on %s:%d", root, *listener.getsockname()[:2])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="ds_trio static-file HTTP server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--root", default=".")
    parser.add_argument(
        "--backend", default="trio", choices=["trio", "asyncio", "uvloop"]
    )
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workers > 0:
        from ds_trio import _daemon

        # Workers are fresh interpreters: they learn the settings from here.
        os.environ[ENV_ROOT] = os.path.realpath(args.root)
        for name, value in ((ENV_CERT, args.cert), (ENV_KEY, args.key)):
            if value:
                os.environ[name] = os.path.realpath(value)
        _daemon.main(
            [
                "ds_trio.examples.httpd:make_post_accept",
                *("-l", f"{args.host}:{args.port}", "-W", str(args.workers)),
                *("--backend", args.backend),
            ]
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tls = _tls_context(args.cert, args.key)
    backend = "asyncio" if args.backend == "uvloop" else args.backend
    options = {"use_uvloop": True} if args.backend == "uvloop" else {}
    anyio.run(
        serve,
        args.host,
        args.port,
        args.root,
        tls,
        backend=backend,
        backend_options=options,
    )


if __name__ == "__main__":
    main()
