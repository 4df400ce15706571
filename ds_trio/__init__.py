"""ds_trio: PublicInbox::DS on structured concurrency with trio and anyio.

The public surface.  Legacy DS names (``EventLoop``, ``SetPostLoopCallback``,
``requeue``, ``do_read``, ...) keep the seed's spelling and meaning; the
snake_case names beside the CamelCase ones are the same objects.
"""

from __future__ import annotations

from ._accept import ACCEPT_BACKOFF as ACCEPT_BACKOFF
from ._accept import Listener as Listener
from ._accept import graceful_shutdown as graceful_shutdown
from ._accept import listen_fds as listen_fds
from ._accept import serve as serve
from ._children import awaitpid as awaitpid
from ._children import dwaitpid as dwaitpid
from ._ds import DS as DS
from ._errors import AlreadyRegisteredError as AlreadyRegisteredError
from ._errors import DSError as DSError
from ._errors import NotInLoopError as NotInLoopError
from ._flags import EPOLLET as EPOLLET
from ._flags import EPOLLEXCLUSIVE as EPOLLEXCLUSIVE
from ._flags import EPOLLIN as EPOLLIN
from ._flags import EPOLLONESHOT as EPOLLONESHOT
from ._flags import EPOLLOUT as EPOLLOUT
from ._flags import Events as Events
from ._later import LATER_DELAY as LATER_DELAY
from ._later import add_uniq_timer as add_uniq_timer
from ._later import expire_old as expire_old
from ._later import later as later
from ._loop import DescriptorMap as DescriptorMap
from ._loop import EventLoop as EventLoop
from ._loop import Loop as Loop
from ._loop import LoopStatistics as LoopStatistics
from ._loop import Reset as Reset
from ._loop import SetLoopTimeout as SetLoopTimeout
from ._loop import SetPostLoopCallback as SetPostLoopCallback
from ._loop import add_timer as add_timer
from ._loop import current_loop as current_loop
from ._loop import in_loop as in_loop
from ._loop import loop as loop
from ._loop import now as now
from ._loop import requeue as requeue
from ._reaper import child_status as child_status
from ._streams import DSStream as DSStream
from ._timers import Timer as Timer

__version__ = "0.1.0.dev0"

# ----------------------------------------------------------------------
# Legacy DS names: Pythonic aliases of the seed's CamelCase functions.
# Each is the same object as its Perl-named original.
# ----------------------------------------------------------------------
event_loop = EventLoop
reset = Reset
set_loop_timeout = SetLoopTimeout
set_post_loop_callback = SetPostLoopCallback
descriptor_map = DescriptorMap

__all__ = [
    "ACCEPT_BACKOFF",
    "DS",
    "EPOLLET",
    "EPOLLEXCLUSIVE",
    "EPOLLIN",
    "EPOLLONESHOT",
    "EPOLLOUT",
    "LATER_DELAY",
    "AlreadyRegisteredError",
    "DSError",
    "DSStream",
    "DescriptorMap",
    "EventLoop",
    "Events",
    "Listener",
    "Loop",
    "LoopStatistics",
    "NotInLoopError",
    "Reset",
    "SetLoopTimeout",
    "SetPostLoopCallback",
    "Timer",
    "__version__",
    "add_timer",
    "add_uniq_timer",
    "awaitpid",
    "child_status",
    "current_loop",
    "descriptor_map",
    "dwaitpid",
    "event_loop",
    "expire_old",
    "graceful_shutdown",
    "in_loop",
    "later",
    "listen_fds",
    "loop",
    "now",
    "requeue",
    "reset",
    "serve",
    "set_loop_timeout",
    "set_post_loop_callback",
]
