"""A DS connection as an ``anyio.abc.ByteStream``.

Stream-based code (an anyio protocol library, a handler written for
``anyio.connect_tcp`` streams) awaits ``send``/``receive``; DS code writes
synchronously into an ordered queue.  :class:`DSStream` joins the two: the
connection stays a DS object in the loop's descriptor map (so graceful
shutdown sees it and ``busy()`` works), its output goes through DS's write
queue (spill files, callables, TLS), and the stream's caller does the
waiting.  The object itself has no task of its own while it is a stream:
trio and anyio allow one waiter per fd and direction, and that waiter is
the stream's caller.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.abc import SocketAttribute

from ._ds import _NO_SCOPE, DS
from ._flags import EPOLLIN
from ._loop import Loop
from ._tls import is_tls, want

__all__ = ["DSStream"]

_BOTH = 0x005
_OUT = 0x004


class _StreamConnection(DS):
    """The DS object behind a :class:`DSStream`: registered, but taskless."""

    def event_step(self) -> None:  # never called: no task, never requeued
        pass

    def busy(self) -> bool:
        return bool(self.rbuf or self.wbuf)


class DSStream(anyio.abc.ByteStream):
    """An ``anyio.abc.ByteStream`` over a DS connection.

    Create it from a socket (``DSStream(sock)``, registering a new DS object
    in the running loop) or from an existing DS object with
    :meth:`DS.to_stream`.  ``send`` queues through the object's write path
    and returns once the queue has drained (flow control); ``receive``
    returns what ``do_read`` reads, raising ``anyio.EndOfStream`` at EOF;
    ``aclose`` closes the object (TLS: close_notify first).  The typed
    attributes are the socket's (``SocketAttribute``).
    """

    def __init__(self, obj_or_sock: DS | socket.socket) -> None:
        if isinstance(obj_or_sock, DS):
            obj = obj_or_sock
        else:
            obj = _StreamConnection(obj_or_sock, 0)
        obj._ds_external = True
        obj._interrupt()  # its task, if it had one, ends
        self._obj = obj
        self._eof = False

    @property
    def obj(self) -> DS:
        """The DS object behind the stream."""
        return self._obj

    def _backend(self) -> Any:
        state = self._obj._ds_state
        assert isinstance(state, Loop)
        return state._require_backend()

    async def _wait(self, default_direction: int) -> None:
        obj = self._obj
        sock = obj.sock
        if sock is None:
            raise anyio.ClosedResourceError
        backend = self._backend()
        direction = obj._ev & _BOTH or default_direction
        try:
            if direction & _OUT:
                await backend.wait_writable(sock)
            elif not (is_tls(sock) and sock.pending()):
                await backend.wait_readable(sock)
        except backend.closed_errors:
            raise anyio.ClosedResourceError from None
        except (trio.BusyResourceError, anyio.BusyResourceError):
            # One exception family at the boundary: anyio's, on every backend.
            raise anyio.BusyResourceError("waiting on this stream") from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        obj = self._obj
        if obj._wait_dir != _NO_SCOPE:
            raise anyio.BusyResourceError("receiving")
        while True:
            if obj.sock is None:
                if self._eof:
                    raise anyio.EndOfStream
                raise anyio.ClosedResourceError
            pending = obj.rbuf
            if pending:  # bytes the DS code read before handing over
                obj.rbuf = pending[max_bytes:] or None
                return bytes(pending[:max_bytes])
            sock = obj.sock
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                await self._wait(EPOLLIN)
                continue
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(want(exc))
                continue
            except OSError:
                # A reset is a broken stream, not an end of it (do_read
                # cannot tell the two apart for us: it closes on both).
                obj.close()
                raise anyio.BrokenResourceError from None
            if not data:
                self._eof = True
                obj.close()
                raise anyio.EndOfStream
            return bytes(data)

    async def send(self, item: bytes) -> None:
        obj = self._obj
        if obj.sock is None:
            raise anyio.ClosedResourceError
        obj.write(item)
        await self._flush()
        await anyio.lowlevel.checkpoint()

    async def _flush(self) -> None:
        obj = self._obj
        backend = self._backend()
        try:
            while await obj._ds_flush_once(backend) is not None:
                pass
        except backend.closed_errors:
            raise anyio.BrokenResourceError from None
        if obj.sock is None:
            raise anyio.BrokenResourceError

    async def send_eof(self) -> None:
        obj = self._obj
        await self._flush()
        sock = obj.sock
        if sock is None:
            raise anyio.ClosedResourceError
        sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        obj = self._obj
        if obj.sock is not None and obj.shutdn() is False and obj.sock is not None:
            # TLS: close_notify is queued; let it go out, within the bound.
            with anyio.move_on_after(obj.TLS_SHUTDOWN_TIMEOUT):
                try:
                    await self._flush()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass
        obj.close()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Any:
        sock = self._obj.sock
        if sock is None:
            return {}
        attrs: dict[Any, Any] = {
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: lambda: sock.getsockname(),
            SocketAttribute.raw_socket: lambda: sock,
        }
        if sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            if peer is not None:
                attrs[SocketAttribute.remote_address] = lambda: peer
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attrs[SocketAttribute.local_port] = lambda: sock.getsockname()[1]
            if peer is not None:
                attrs[SocketAttribute.remote_port] = lambda: peer[1]
        return attrs
