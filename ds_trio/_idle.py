"""Idle tracking for ``update_idle_time`` / ``not_idle_long`` / ``expire_old``.

Idle expiry (``update_idle_time`` / ``not_idle_long`` / ``expire_old``)
shuts down clients idle longer than ``EXPTIME``.  Upstream removed it
because its scan touched every connection (O(n) per check, notes §2.2).
Here tracked objects sit in insertion-ordered dicts by last activity, one
per distinct ``EXPTIME`` (a daemon has one or two), so the oldest are at the
front: a check pops the expired ones and stops at the first that is not,
O(expired + number of EXPTIME values), and touching an object is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._ds import DS

__all__ = ["IdleTracker"]


class IdleTracker:
    """Objects ordered by their last activity, grouped by ``EXPTIME``."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[float, OrderedDict[DS, float]] = {}

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def touch(self, obj: DS, exptime: float, now: float) -> None:
        group = self.groups.get(exptime)
        if group is None:
            group = self.groups[exptime] = OrderedDict()
        group[obj] = now
        group.move_to_end(obj)

    def idle_since(self, obj: DS, exptime: float) -> float | None:
        group = self.groups.get(exptime)
        return None if group is None else group.get(obj)

    def forget(self, obj: DS) -> None:
        # Closing forgets the object at once: a stale entry would otherwise
        # linger until expiry (upstream 87751674).
        for group in self.groups.values():
            group.pop(obj, None)

    def pop_expired(self, now: float) -> list[DS]:
        """Remove and return the objects idle longer than their EXPTIME."""
        expired: list[DS] = []
        for exptime, group in self.groups.items():
            oldest_allowed = now - exptime
            while group:
                obj, idle_at = next(iter(group.items()))
                if idle_at >= oldest_allowed:
                    break
                group.popitem(last=False)
                expired.append(obj)
        return expired

    def shift(self, delta: float) -> None:
        """Move every timestamp onto another clock (adoption by a loop)."""
        for group in self.groups.values():
            for obj in group:
                group[obj] += delta

    def adopt(self, other: IdleTracker, delta: float) -> None:
        """Take ``other``'s entries (on a clock ``delta`` behind), keeping order."""
        other.shift(delta)
        for exptime, group in other.groups.items():
            mine = self.groups.get(exptime)
            merged = sorted(
                [*(mine.items() if mine else ()), *group.items()],
                key=lambda item: item[1],
            )
            self.groups[exptime] = OrderedDict(merged)
        other.groups = {}

    def clear(self) -> None:
        self.groups = {}
