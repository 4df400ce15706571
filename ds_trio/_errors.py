"""The exception family ds_trio raises at its public boundary."""

from __future__ import annotations

__all__ = ["AlreadyRegisteredError", "DSError", "NotInLoopError"]


class DSError(Exception):
    """Base class of every exception ds_trio raises on its own account."""


class NotInLoopError(DSError, RuntimeError):
    """A function that needs a running loop was called outside one.

    The seed's ``dwaitpid`` dies with ``"Not in EventLoop"`` in the same
    situation; ``now()`` has no clock to read before a backend runs.
    """


class AlreadyRegisteredError(DSError, ValueError):
    """A second DS object was created for a file descriptor already registered.

    The seed confesses (a fatal error) on the same clobbering: two objects
    owning one fd would each believe every wake-up was theirs.
    """
