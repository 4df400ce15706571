"""The write path: an ordered queue of spill files and callables.

DS never buffers output on the heap.  What the socket does not take at once
goes to an unlinked temporary file (a *spill file*), and the queue (``wbuf``)
mixes those files with callables that run once everything queued before
them has been sent.  The kernel already keeps large socket buffers and the
page cache keeps recent file data, so a slow client costs disk pages the
kernel can drop, not heap the process can never give back
(``Documentation/technical/ds.txt``).

Differences from the seed, each a fix or a speed-up:

* spill files are sent with ``os.sendfile`` (no copy through Python) where
  the socket allows it, with ``pread`` + ``send`` otherwise (TLS);
* data written after a queued callable starts a new spill entry (the seed
  crashed there: "Not an ARRAY reference", fixed upstream in 0f334acf);
* a callable that closes the object stops the flush: nothing more is sent
  and nothing is re-armed (the seed re-armed a deregistered fd and died,
  fixed upstream in 336a3183);
* every spill file is closed when sent, when the object closes and when the
  loop ends, so none outlives its connection.

These functions are the bodies of the ``DS`` methods of the same names.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import tempfile
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._tls import want

if TYPE_CHECKING:
    from ._ds import DS

__all__ = [
    "MSG_MORE",
    "Held",
    "Spill",
    "flush_write",
    "msg_more",
    "open_spill",
    "write",
    "write_file",
]

log = logging.getLogger("ds_trio.wbuf")

#: ``send(2)`` flag: more data follows (Linux); 0 where it does not exist.
MSG_MORE: Final = getattr(socket, "MSG_MORE", 0)

_ONESHOT: Final = 1 << 30
_EPOLLOUT_ONESHOT: Final = 0x004 | _ONESHOT
_PlainSocket: Final = socket.socket
_os_write: Final = os.write
# How much one read+send round moves when sendfile cannot be used, as the
# seed's send_tmpio.
_CHUNK: Final = 65536
_o_tmpfile_works = hasattr(os, "O_TMPFILE")


def open_spill(directory: str | None) -> int:
    """An unlinked temporary file in ``directory``; returns its fd.

    ``O_TMPFILE`` makes the file nameless from birth, so nothing is left
    behind even if the process dies; elsewhere it is created and unlinked at
    once, as the seed's ``tmpfile`` does.
    """
    global _o_tmpfile_works
    directory = directory if directory is not None else tempfile.gettempdir()
    flags = os.O_RDWR | os.O_CLOEXEC
    if _o_tmpfile_works:
        try:
            return os.open(directory, flags | os.O_TMPFILE, 0o600)
        except IsADirectoryError:  # kernel without O_TMPFILE
            _o_tmpfile_works = False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # This filesystem cannot; others may, so keep trying next time.
    fd, name = tempfile.mkstemp(prefix="ds_trio-wbuf-", dir=directory)
    os.unlink(name)
    return fd


class Spill:
    """A spill file in the write queue: bytes from ``offset`` to ``end``.

    ``appendable`` spill files take later writes at their end (the seed's
    tmpio without a length); files injected with a fixed length never do.
    """

    __slots__ = ("appendable", "end", "fd", "offset")

    def __init__(
        self, fd: int, end: int = 0, *, offset: int = 0, appendable: bool = True
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.end = end
        self.appendable = appendable

    def append(self, data: Any) -> None:
        """Write ``data`` at the end of the file (raises OSError)."""
        view = _bytes_view(data)
        end = self.end
        while view:
            n = os.pwrite(self.fd, view, end)
            end += n
            view = view[n:]
        self.end = end

    def send(self, sock: Any, use_sendfile: bool) -> int:
        """Send from the file to ``sock``: bytes sent, 0 when exhausted.

        Raises BlockingIOError when the socket takes nothing now, OSError on
        a real error.  One call sends until the socket is full or the file
        is exhausted: fairness between clients comes from one-shot re-arming,
        not from a per-step byte cap (as in the seed).
        """
        remaining = self.end - self.offset
        if remaining <= 0:
            return 0
        if use_sendfile:
            n = os.sendfile(sock.fileno(), self.fd, self.offset, remaining)
            if not n:  # an injected file truncated under us
                raise OSError(errno.EIO, "file shorter than queued")
        else:
            data = os.pread(self.fd, min(remaining, _CHUNK), self.offset)
            if not data:  # truncated under us
                raise OSError(errno.EIO, "spill file shorter than expected")
            n = sock.send(data)
        self.offset += n
        return n

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Spill fd={self.fd} {self.offset}/{self.end}>"


class Held:
    """Bytes queued in memory: ``view`` is what is left to send.

    Two kinds, both bounded.  *Referenced*: an immutable ``bytes`` object
    (or a view of one) is queued without a copy - only at the head of the
    queue or behind more of the same object, so an object holds at most one
    application buffer it had allocated anyway.  *Copied*: a small
    remainder is copied while the object's copied bytes stay under
    ``DS.WBUF_MEMORY_MAX`` (a spill file costs an ``open`` and a ``pwrite``,
    four to five times a heap copy for a few KiB).  Anything else spills.
    """

    __slots__ = ("charged", "owner", "view")

    def __init__(self, view: memoryview, owner: object, charged: int) -> None:
        self.view = view
        #: The immutable object referenced, None for a copy.
        self.owner = owner
        #: Copied bytes counted against the object's WBUF_MEMORY_MAX.
        self.charged = charged

    def send(self, sock: Any, plain: bool) -> int:
        """Send from the head of the view: bytes sent, 0 when exhausted.

        ``plain``: not TLS (the spill file's ``use_sendfile``); over TLS at
        most ``_CHUNK`` per call, as write() explains.
        """
        view = self.view
        if not view:
            return 0
        n: int = sock.send(view if plain or len(view) <= _CHUNK else view[:_CHUNK])
        self.view = view[n:]
        return n

    def __repr__(self) -> str:
        kind = "referenced" if self.owner is not None else "copied"
        return f"<Held {kind} {len(self.view)} bytes>"


def _immutable_owner(data: object, view: memoryview) -> object | None:
    """The immutable object behind ``data``, or None if it may change."""
    if type(data) is bytes:
        return data
    owner = view.obj
    if type(owner) is bytes:
        return owner
    return None


def _bytes_view(data: object) -> memoryview:
    if isinstance(data, str):
        raise TypeError(
            "write() takes bytes-like objects or callables, not str: encode it first"
        )
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"write() takes bytes-like objects or callables, not {type(data).__name__}"
        ) from None
    # Lengths and offsets are bytes (the seed's "use bytes").
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _spill(obj: DS, view: memoryview, queue: deque[Any]) -> bool:
    """Queue ``view`` in a new spill file; False if the object was dropped."""
    try:
        fd = open_spill(obj.spill_dir)
    except OSError as exc:
        obj.drop(f"tmpfile: {exc}")
        return False
    spill = Spill(fd)
    try:
        spill.append(view)
    except OSError as exc:
        spill.close()
        obj.drop(f"write ({view.nbytes}) to tmpfile: {exc}")
        return False
    queue.append(spill)
    obj._ds_state.spilled_bytes += view.nbytes
    return True


def _enqueue(obj: DS, data: object, view: memoryview, queue: deque[Any]) -> bool:
    """Queue ``view`` (the unsent part of ``data``); False if the object was dropped.

    Held in memory when that is free (more of the immutable object already
    at the tail, or the queue was empty) or cheap and bounded (a copy under
    ``WBUF_MEMORY_MAX``); otherwise appended to the tail spill file or a new
    one.  Order is the queue's, whichever entry takes the bytes.
    """
    owner = _immutable_owner(data, view)
    tail = queue[-1] if queue else None
    if owner is not None and (
        tail is None or (type(tail) is Held and tail.owner is owner)
    ):
        queue.append(Held(view, owner, 0))
        return True
    if type(tail) is Spill and tail.appendable:
        try:
            tail.append(view)
        except OSError as exc:
            obj.drop(f"print to tmpfile: {exc}")
            return False
        obj._ds_state.spilled_bytes += view.nbytes
        return True
    n = view.nbytes
    if obj._ds_wmem + n <= obj.WBUF_MEMORY_MAX:
        obj._ds_wmem += n
        if type(tail) is Held and tail.owner is None:
            # Extend the tail copy (its unsent part plus the new bytes).
            tail.view = memoryview(bytes(tail.view) + view)
            tail.charged += n
        else:
            queue.append(Held(memoryview(bytes(view)), None, n))
        return True
    return _spill(obj, view, queue)


def _queue(obj: DS) -> deque[Any]:
    # The seed pushes onto the *existing* array: flush_write may hold an
    # empty-but-present queue while it runs a callable that writes, and must
    # see the growth (upstream c30b4427).
    queue = obj.wbuf
    if queue is None:
        queue = obj.wbuf = deque()
    return queue


def write(obj: DS, data: WriteItem) -> bool:
    """Write bytes, or queue a callable to run after what is queued.

    ``data`` is a bytes-like object or a callable, called with the object
    once everything queued before it has been sent - at once when nothing
    is queued.  Bytes are never reordered.  What the socket does not take
    now is queued: immutable ``bytes`` by reference (at the head of the
    queue, or behind more of the same object), mutable data as a copy (so
    the caller may reuse a ``bytearray`` at once) kept in memory under
    ``WBUF_MEMORY_MAX``, anything else in an unlinked spill file.  After a
    partial send the object is requeued, after EAGAIN
    ``EPOLLOUT|EPOLLONESHOT`` is armed.  A hard error (EPIPE, ECONNRESET,
    ...) closes the object.  The seed's ``write``.

    Returns:
        True when everything went out now, the callable ran now, or the
        object is already closed (the seed's deliberate lie: a caller
        that wrote twice after the first write killed the object is not
        hurt by it).  False when anything is queued - not an error - and
        when this write found the connection broken (the object is then
        closed: check ``self.sock``) or could not spill (dropped).

    Raises:
        TypeError: ``data`` is a ``str`` or not bytes-like nor callable.
    """
    sock = obj.sock
    if sock is None:
        # "Write lies on a dead socket": a caller can do two writes in one
        # step, the first failing and closing the object; it will be dead
        # soon and is not hurt by the lie.
        return True
    queue = obj.wbuf
    if type(data) is not bytes and callable(data):
        if queue:
            queue.append(data)
            return False
        data(obj)
        return True
    if queue:
        _enqueue(obj, data, _bytes_view(data), queue)
        return False
    view: memoryview | None
    plain = type(sock) is _PlainSocket
    if type(data) is not bytes or not plain:
        view = _bytes_view(data)
        if not plain and view.nbytes > _CHUNK:
            # OpenSSL may have put part of a failed SSL_write on the wire,
            # and insists the retry passes at least as many bytes; the retry
            # comes from the spill file in _CHUNK pieces, so never try more.
            data = view[:_CHUNK]
    else:
        view = None
    try:
        # write(2) on a plain socket's own fd is send(2) without flags,
        # through a fast-call C function (send() builds and parses an
        # argument tuple); on a pipe it is the seed's syswrite.
        if plain:
            written = _os_write(sock.fileno(), data)
        elif obj._ds_is_socket:
            written = sock.send(data)
        else:
            written = _os_write(obj._fd, data)
    except BlockingIOError:
        obj.epwait(obj.epbit(_EPOLLOUT_ONESHOT))
        written = 0
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
        _tls_blocked(obj, exc)
        written = 0
    except InterruptedError:  # pragma: no cover - PEP 475 retries send()
        written = 0
    except OSError:
        return obj.close()
    if view is None:
        if written == len(data):
            return True
        view = memoryview(data)
    elif written == view.nbytes:
        return True
    if written:
        # The socket is probably still writable: continue next round
        # without a poller round trip.
        obj.requeue()
    _enqueue(obj, data, view[written:], _queue(obj))
    return False


def write_file(obj: DS, file: Any, offset: int, length: int | None) -> bool:
    """``DS.write_file``: queue a region of a file, sent with ``sendfile``."""
    if isinstance(file, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(
            f"write_file() needs a file and an offset >= 0, got {offset!r}"
        )
    fd = file if isinstance(file, int) else file.fileno()
    if length is None:
        length = os.fstat(fd).st_size - offset
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"write_file() length must be an int >= 0, got {length!r}")
    sock = obj.sock
    if sock is None:
        return True  # the seed's lie on a dead socket, as write()
    if length == 0:
        return not obj.wbuf
    # A private fd: the caller may close its file at once, and the queue
    # closes this one when the region is sent or the object closes.
    entry = Spill(os.dup(fd), offset + length, offset=offset, appendable=False)
    queue = _queue(obj)
    queue.append(entry)
    if len(queue) > 1:
        return False
    # Nothing was queued before: start sending now, as write() does.
    return flush_write(obj)


class _FdOut:
    """``send`` for an object that is not a socket (a pipe): ``write(2)``.

    The seed's ``syswrite`` writes to any handle; ``send`` is for sockets.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, data: Any) -> int:
        return os.write(self.fd, data)


def _tls_blocked(obj: DS, exc: BaseException) -> None:
    # A TLS write may need to read first (renegotiation, key update): wait
    # for whatever direction OpenSSL asked for - the seed's epbit().
    obj._ds_tls_want = want(exc)
    obj.epwait(obj._ds_tls_want | _ONESHOT)


def flush_write(obj: DS) -> bool:
    """Send what is queued; True only when the queue is empty.

    Queued entries are sent in order (spill files and file regions with
    ``sendfile`` where the socket allows it); queued callables run in
    order.  Stops when the socket is
    full (write interest armed), when a callable queued more work (it
    arranged its own wake-up), or when a callable closed the object
    (nothing more is sent or re-armed).  A hard write error closes the
    object; nothing is raised.  Protocol code calls this first in
    ``event_step`` and reads more only when it returned True.  The seed's
    ``flush_write``.
    """
    sock = obj.sock
    if sock is None:
        # Closed: nothing will ever be flushed (upstream 358f6126 returns
        # early here; the seed reached into the deleted queue).
        return False
    queue = obj.wbuf
    if queue is None:
        return True
    use_sendfile = obj._ds_sendfile_ok()
    out = sock if obj._ds_is_socket else _FdOut(obj._fd)
    while queue:
        head = queue[0]
        entry_type = type(head)
        if entry_type is Held or entry_type is Spill:
            try:
                while head.send(out, use_sendfile):
                    pass
            except BlockingIOError:
                obj.epwait(obj.epbit(_EPOLLOUT_ONESHOT))
                return False
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                _tls_blocked(obj, exc)
                return False
            except OSError as exc:
                if (
                    entry_type is Spill
                    and use_sendfile
                    and exc.errno in (errno.EINVAL, errno.ENOSYS)
                ):
                    # sendfile refused this socket type: read+send from now on.
                    obj._ds_no_sendfile = True
                    use_sendfile = False
                    continue
                obj.close()
                return False
            queue.popleft()
            if entry_type is Spill:
                head.close()
            else:
                obj._ds_wmem -= head.charged
            continue
        queue.popleft()
        before = len(queue)
        head(obj)
        if obj.sock is not sock:
            # The callable closed (or replaced) the transport: send nothing
            # more and re-arm nothing (upstream 336a3183).
            return False
        if len(queue) > before:
            # It queued more work and, by contract, arranged its wake-up.
            return False
    if obj.wbuf is queue:
        obj.wbuf = None
    return True


def msg_more(obj: DS, data: Any) -> bool:
    """``DS.msg_more``: ``send(MSG_MORE)`` when nothing is queued, else write."""
    sock = obj.sock
    if sock is None:
        return True
    if MSG_MORE and not obj.wbuf and obj._ds_msg_more_ok():
        try:
            sent = sock.send(data, MSG_MORE)
        except OSError:
            pass  # EAGAIN or a real error: write() sorts it out
        else:
            view = _bytes_view(data)
            if sent == view.nbytes:
                return True
            if _enqueue(obj, data, view[sent:], _queue(obj)):
                obj.epwait(_EPOLLOUT_ONESHOT)
            return False
    # The base class's write, never a subclass override (the seed calls
    # PublicInbox::DS::write as a function so NNTPdeflate does not
    # compress twice).
    return write(obj, data)


def discard(queue: deque[Any] | None) -> None:
    """Close every spill file of a dropped queue."""
    if not queue:
        return
    for entry in queue:
        if type(entry) is Spill:
            try:
                entry.close()
            except OSError:
                log.warning("closing spill file failed", exc_info=True)


def spill_entry_count(queue: deque[Any] | None) -> int:
    """How many spill files a queue holds (for statistics and tests)."""
    return 0 if not queue else sum(1 for entry in queue if type(entry) is Spill)


WriteItem = bytes | bytearray | memoryview | Callable[["DS"], object]
