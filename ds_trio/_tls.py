"""TLS on DS objects: handshake and shutdown as steps of the write queue.

ds_trio uses the stdlib's ``ssl.SSLSocket`` wrapped around the object's own
non-blocking socket with ``do_handshake_on_connect=False``, not
``SSLObject`` + ``MemoryBIO``: ``SSLWantReadError`` / ``SSLWantWriteError``
are exactly the seed's ``PublicInbox::TLS::epollbit()`` (the direction
OpenSSL needs next, which may be the opposite of the caller's - a TLS read
can need to write and a TLS write to read, the reason DS has a single
``event_step``), OpenSSL reads and writes the fd directly (no copy through
BIOs, no userspace ciphertext queue), and the fd stays the object's fd, so
STARTTLS swaps the transport under the same registration.

The handshake (``accept_tls_step``) and the shutdown (``shutdn_tls_step``)
put themselves at the *front* of the write queue while they wait, so
``flush_write`` sees the queue grow and stops, and nothing queued behind
them is written before the handshake completes - the seed's design.

Trap: OpenSSL decrypts whole records, so after a short ``recv`` the rest of
a record sits in ``SSLSocket.pending()`` and the fd is *not* readable; the
object's task checks ``pending()`` before waiting and steps at once instead.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._ds import DS

__all__ = ["accept_tls_step", "is_tls", "shutdn_tls_step", "starttls", "want"]

log = logging.getLogger("ds_trio.tls")

_IN: Final = 0x001
_OUT: Final = 0x004
_ONESHOT: Final = 1 << 30


def is_tls(sock: object) -> bool:
    """True for a socket with TLS active (the seed's ``->can('stop_SSL')``)."""
    return isinstance(sock, ssl.SSLSocket) and sock._sslobj is not None  # type: ignore[attr-defined]


def want(exc: BaseException) -> int:
    """The direction an SSL/socket "would block" error asks for (0: none)."""
    if isinstance(exc, ssl.SSLWantWriteError):
        return _OUT
    if isinstance(exc, ssl.SSLWantReadError):
        return _IN
    return 0


def _wait_step(obj: DS, direction: int, step: object) -> bool:
    obj._ds_tls_want = direction
    obj.epwait(direction | _ONESHOT)
    from ._wbuf import _queue  # _wbuf imports this module

    _queue(obj).appendleft(step)
    return False


def accept_tls_step(obj: DS) -> bool | None:
    """One server-side handshake step (``DS.accept_tls_step``)."""
    sock = obj.sock
    if sock is None:
        return None
    try:
        sock.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
        return _wait_step(obj, want(exc), type(obj).accept_tls_step)
    except OSError as exc:
        # Garbage, plaintext on the TLS port, a vanished client: close that
        # client only (the seed died on unexpected SSL states; newer DS
        # closes the client, upstream c51c22c3).
        log.info("%r: TLS handshake failed: %s", obj, exc)
        obj.close()
        return False
    obj._ds_tls_want = 0
    return True


def shutdn_tls_step(obj: DS) -> bool | None:
    """One TLS shutdown step (``DS.shutdn_tls_step``); closes when done."""
    sock = obj.sock
    if sock is None:
        return None
    try:
        sock.unwrap()
    except ssl.SSLWantReadError:
        # close_notify went out; waiting for the peer's is what
        # IO::Socket::SSL's SSL_fast_shutdown skips, and so do we.
        return obj.close()
    except ssl.SSLWantWriteError:
        return _wait_step(obj, _OUT, type(obj).shutdn_tls_step)
    except (OSError, ValueError):
        return obj.close()
    return obj.close()


def starttls(obj: DS, context: ssl.SSLContext, *, server_side: bool = True) -> bool:
    """Switch the object to TLS under the same fd (``DS.starttls``)."""
    sock = obj.sock
    if sock is None:
        return False
    if is_tls(sock):
        raise ValueError(f"{obj!r} already speaks TLS")
    if not _still_connected(obj, sock):
        return False
    # wrap_socket takes over the fd and detaches the plain socket object,
    # so no byte the kernel holds is lost or read twice across the switch.
    try:
        obj.sock = context.wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=False
        )
    except OSError as exc:
        # The peer reset between the check above and ssl's own: the fd is
        # gone with ssl's socket object, so its number may be reused at
        # once - the object leaves the descriptor map now, not at the end
        # of the round.
        log.info("%r: TLS handshake failed: %s", obj, exc)
        state = obj._ds_state
        if state.descriptor_map.get(obj._fd) is obj:
            del state.descriptor_map[obj._fd]
        obj.close()
        return False
    obj._interrupt()  # a wait on the old socket object ends
    return bool(obj.accept_tls_step())


def _still_connected(obj: DS, sock: object) -> bool:
    """False (and the object closed) if the peer already reset the connection.

    ``ssl`` checks ``getpeername()`` after taking the fd over from the
    plain socket; on a reset connection it then raises, closing the fd
    itself (bytes were pending) or leaving it to the garbage collector
    (none were).  Either way the object would stay registered under an fd
    number it no longer owns.  A reset before the handshake is an aborted
    handshake: one log line, that client closed.
    """
    getpeername = getattr(sock, "getpeername", None)
    if getpeername is None:
        return True
    try:
        getpeername()
    except OSError as exc:
        log.info("%r: TLS handshake failed: %s", obj, exc)
        obj.close()
        return False
    return True
