"""Linux epoll interest bits, as the seed's ``PublicInbox::Syscall`` exports them."""

from __future__ import annotations

import enum

__all__ = [
    "EPOLLET",
    "EPOLLEXCLUSIVE",
    "EPOLLIN",
    "EPOLLONESHOT",
    "EPOLLOUT",
    "Events",
]


class Events(enum.IntFlag):
    """Interest mask for a DS object (the Linux values, so Perl ports keep them).

    ``EPOLLET`` is accepted and emulated as level-triggered: DS's edge-triggered
    users read until ``EAGAIN`` anyway, so the only difference is an extra,
    harmless ``event_step`` call.  ``EPOLLEXCLUSIVE`` is accepted and ignored:
    trio and anyio register every fd in their own poller (trio always with
    ``EPOLLONESHOT``, which the kernel refuses together with
    ``EPOLLEXCLUSIVE``; asyncio's selector with neither).
    """

    EPOLLIN = 0x001
    EPOLLOUT = 0x004
    EPOLLEXCLUSIVE = 1 << 28
    EPOLLONESHOT = 1 << 30
    EPOLLET = 1 << 31


EPOLLIN = Events.EPOLLIN
EPOLLOUT = Events.EPOLLOUT
EPOLLEXCLUSIVE = Events.EPOLLEXCLUSIVE
EPOLLONESHOT = Events.EPOLLONESHOT
EPOLLET = Events.EPOLLET

#: Every bit a caller may pass.
ALL_EVENTS = int(EPOLLIN | EPOLLOUT | EPOLLEXCLUSIVE | EPOLLONESHOT | EPOLLET)
#: The two directions, the only bits that decide what a task waits for.
DIRECTIONS = int(EPOLLIN | EPOLLOUT)


def check_events(events: object) -> int:
    """Validate an interest mask and return it as a plain int."""
    if isinstance(events, bool) or not isinstance(events, int):
        raise TypeError(
            f"events must be an int of EPOLL* flags, not {type(events).__name__}"
        )
    unknown = int(events) & ~ALL_EVENTS
    if events < 0 or unknown:
        raise ValueError(
            f"events {int(events):#x} has bits ds_trio does not know: {unknown:#x}"
        )
    return int(events)
