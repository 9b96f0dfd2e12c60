"""Slot assignment: one privacy unit, one prompt.

A unit's slot is ``HMAC(job key, unit id) mod (B·M)`` with B and M declared in the plan; a slot
over its cap N keeps the N units of lowest ``HMAC(job key, "rank" ‖ unit id)`` and drops the
rest. Nothing depends on how many records there are or on their order, so adding or removing
one unit changes the contents of at most one slot — whatever else is in the pool. (All of a
unit's records share its slot; the cap counts records, and a unit's records are ranked
together so they enter or leave the slot together with their unit's rank.)
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Sequence

from dp_decoding.records import Record


def _digest(key: bytes, domain: bytes, unit: str) -> int:
    mac = hmac.new(key, domain + b"\x00" + unit.encode("utf-8"), hashlib.sha256)
    return int.from_bytes(mac.digest(), "big")


class SlotAssigner:
    """Keyed assignment of privacy units to ``slots`` slots of capacity ``cap`` records."""

    def __init__(self, key: bytes, slots: int, cap: int, domain: bytes = b"slot") -> None:
        if len(key) < 16:
            raise ValueError("slot key must be at least 16 bytes")
        if slots < 1 or cap < 1:
            raise ValueError("slots and cap must be positive")
        self._key = key
        self._domain = domain
        self.slots = slots
        self.cap = cap

    def slot_of(self, unit: str) -> int:
        return _digest(self._key, self._domain, unit) % self.slots

    def rank_of(self, unit: str) -> int:
        return _digest(self._key, self._domain + b"/rank", unit)

    def assign(self, records: Sequence[Record]) -> list[list[Record]]:
        """Return ``slots`` lists of records (each at most ``cap`` long)."""
        by_slot: dict[int, list[tuple[int, int, Record]]] = defaultdict(list)
        for i, r in enumerate(records):
            by_slot[self.slot_of(r.unit)].append((self.rank_of(r.unit), i, r))
        out: list[list[Record]] = [[] for _ in range(self.slots)]
        for s, members in by_slot.items():
            # order by the unit's rank (ties within a unit broken by a content hash so the
            # order does not depend on file order)
            members.sort(key=lambda m: (m[0], hashlib.sha256(m[2].text.encode()).digest()))
            out[s] = [m[2] for m in members[: self.cap]]
        return out
