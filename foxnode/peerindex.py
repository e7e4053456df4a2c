"""The peer store's memory: every record by address, and the order a full
store evicts in. Pure: no files, no clock (times are handed in), no
reactor, so its rules are tested as plain functions.

Held back: addresses added by a register whose write has not ended are
never evicted meanwhile (the register would then be told it failed after
all); ``release`` makes them evictable once their write is over.
"""

from __future__ import annotations

import heapq
from typing import Any, Iterable

import attrs

from foxnode.storefiles import BOOTSTRAP, PeerRecord

#: why an address was not taken
FULL = "peer store is full"


def eviction_key(record: PeerRecord) -> tuple[bool, int, float] | None:
    """Where a record stands in the order a full store evicts in, worst
    first: never verified, then most failures, then oldest. None: never
    evicted as it is (bootstrap, or verified and working)."""
    if record.source == BOOTSTRAP or (record.verified and not record.failures and not record.is_self):
        return None
    return (record.verified, -record.failures, record.added)


@attrs.define(eq=False)
class Added:
    """What one ``PeerIndex.add`` did."""

    accepted: list[str]
    rejected: list[dict[str, str]]
    #: addresses new to the index
    fresh: list[str]
    #: records dropped to make room
    evicted: list[PeerRecord]

    @property
    def changed(self) -> bool:
        return bool(self.fresh or self.evicted)


class PeerIndex:
    """Records by address, in the order they were added, at most ``max_peers``."""

    def __init__(self, max_peers: int, records: Iterable[PeerRecord] = ()) -> None:
        self.max_peers = max_peers
        self._records: dict[str, PeerRecord] = {r.addr: r for r in records}
        #: each address's place in the order records were added: among
        #: equally bad records the oldest arrival is evicted first
        self._arrival: dict[str, int] = {a: i for i, a in enumerate(self._records)}
        self._arrivals = len(self._arrival)
        #: addresses not evicted until released (their write is in flight)
        self._held: set[str] = set()
        #: (eviction key, arrival, address) of evictable records, worst on
        #: top; an entry whose record changed or went is stale and skipped
        #: when met. Kept only once the store has been full (None until
        #: then), and without held records.
        self._order: list[tuple[bool, int, float, int, str]] | None = None

    # -- reading -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, addr: str) -> bool:
        return addr in self._records

    def get(self, addr: str) -> PeerRecord | None:
        return self._records.get(addr)

    def addresses(self) -> list[str]:
        return list(self._records)

    def records(self) -> list[PeerRecord]:
        return list(self._records.values())

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    # -- changing ---------------------------------------------------------------

    def add(self, addrs: Iterable[str], source: str, now: float, hold: bool = False) -> Added:
        """Take valid, already-parsed addresses; a full index evicts the
        worst evictable records, but never the request's own addresses nor
        held ones, and rejects what still does not fit. ``hold``: the new
        addresses are not evictable until ``release``."""
        accepted: list[str] = []
        rejected: list[dict[str, str]] = []
        fresh: list[str] = []
        for addr in addrs:
            if addr in self._records or addr in fresh:
                accepted.append(addr)
            else:
                fresh.append(addr)
        evicted: list[PeerRecord] = []
        overflow = len(self._records) + len(fresh) - self.max_peers
        if overflow > 0:
            evicted = self._eviction_candidates(overflow, keep=set(accepted))
            for victim in evicted:
                self.drop(victim.addr)
            room = self.max_peers - len(self._records)
            rejected = [{"addr": a, "reason": FULL} for a in fresh[room:]]
            fresh = fresh[:room]
        for addr in fresh:
            record = self._records[addr] = PeerRecord(addr=addr, added=now, source=source)
            self._arrival[addr] = self._arrivals
            self._arrivals += 1
            if hold:
                self._held.add(addr)
            else:
                self._note(record)
        accepted.extend(fresh)
        return Added(accepted, rejected, fresh, evicted)

    def release(self, addrs: Iterable[str]) -> None:
        """Their write is over: evictable from now on."""
        for addr in addrs:
            self._held.discard(addr)
            record = self._records.get(addr)
            if record is not None:
                self._note(record)

    def drop(self, addr: str) -> PeerRecord | None:
        record = self._records.pop(addr, None)
        self._arrival.pop(addr, None)
        self._held.discard(addr)
        return record

    def update(self, addr: str, fields: dict[str, Any]) -> PeerRecord | None:
        """Change fields of a record; records change only through here (the
        eviction order follows)."""
        record = self._records.get(addr)
        if record is None:
            return None
        tracked = self._order is not None
        was = eviction_key(record) if tracked else None
        for name, value in fields.items():
            setattr(record, name, value)
        if tracked and eviction_key(record) != was:
            self._note(record)
        return record

    # -- the eviction order --------------------------------------------------------

    def _eviction_candidates(self, count: int, keep: set[str]) -> list[PeerRecord]:
        # Taken from a heap, not by sorting the store: a register flood into
        # a full store evicts on every request.
        if self._order is None:
            self._rebuild()
        order = self._order
        assert order is not None
        victims: list[PeerRecord] = []
        chosen: set[str] = set()
        kept = []
        while order and len(victims) < count:
            entry = heapq.heappop(order)
            addr = entry[4]
            record = self._records.get(addr)
            if record is None or addr in chosen or eviction_key(record) != entry[:3]:
                continue  # stale: the record went or changed (a newer entry exists)
            if addr in keep or addr in self._held:
                # A request's own addresses, or (after an update during its
                # write) one a request still waits to see written: kept,
                # and its entry goes back.
                kept.append(entry)
                continue
            victims.append(record)
            chosen.add(addr)
        for entry in kept:
            heapq.heappush(order, entry)
        return victims

    def _note(self, record: PeerRecord) -> None:
        if self._order is None:
            return  # built from the records when first needed
        key = eviction_key(record)
        if key is not None:
            heapq.heappush(self._order, (*key, self._arrival[record.addr], record.addr))
            if len(self._order) > 2 * len(self._records) + 1024:
                self._rebuild()  # mostly stale entries by now

    def _rebuild(self) -> None:
        self._order = [
            (*key, self._arrival[r.addr], r.addr) for r in self._records.values()
            if r.addr not in self._held and (key := eviction_key(r)) is not None
        ]
        heapq.heapify(self._order)
