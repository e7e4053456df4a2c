"""The peer store: every address the node knows, in a human-readable JSON
file and its journal, never losing an acknowledged write.

This is the facade the node uses; the parts are

- ``peerindex``: the records in memory and the order a full store evicts
  in (pure);
- ``storewriter``: group commit onto the journal, and folds, on the
  store's own thread;
- ``storefiles``: the two files' formats, reading them, writing atomically.

Durability: a ``commit()`` Deferred fires only after every change made so
far is in the journal and the journal is fsynced. Registers wait for that;
bookkeeping updates (handshakes, failures) and learned addresses are only
marked dirty and written by the next ``flush()`` (the node's
``service.StoreService`` calls it every ``flush_delay``). The journal is folded into the peers file
when it grows longer than the store (at least ``FOLD_LINES`` lines), after
a failed write, and at ``close()``.

The files are never overwritten when they could not be read: ``open``
refuses with a ``StoreError`` naming the file and the fault.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from foxnode import address, logs
from foxnode.config import MAX_PEERS, StoreConfig, default
from foxnode.peerindex import PeerIndex
from foxnode.storefiles import (
    BOOTSTRAP,
    DISK,
    EXCHANGE,
    FORMAT,
    HANDSHAKE,
    MAX_UNREGISTERED,
    REGISTER,
    VERSION,
    DirectorySyncError,
    DiskOps,
    Epoch,
    PeerRecord,
    StoreContents,
    StoreDurabilityError,
    StoreError,
    StoreWriteError,
    del_line,
    journal_path,
    peers_file_body,
    peers_file_chunks,
    put_line,
    read_store,
    unregister_line,
    write_atomically,
)
from foxnode.storewriter import Batch, GroupWriter, StoreFiles

__all__ = [
    "BOOTSTRAP", "CLOSE_TIMEOUT", "EXCHANGE", "FORMAT", "HANDSHAKE", "REGISTER", "VERSION",
    "AddResult", "DirectorySyncError", "PeerRecord", "PeerStore", "StoreDurabilityError", "StoreError",
    "StoreWriteError", "journal_path", "load", "write_atomically",
]

#: seconds over which evictions from a full store are summed up in the log
EVICTION_LOG_WINDOW = 10.0
#: seconds ``close()`` (the node's shutdown) waits for the last write
CLOSE_TIMEOUT = 5.0
#: the journal is folded once it has more lines than this and than the store
FOLD_LINES = 4096

log = logs.logger(__name__)


def load(path: str | os.PathLike, max_peers: int = MAX_PEERS) -> list[PeerRecord]:
    """The records the peers file and its journal hold together; missing
    files are an empty store."""
    return list(read_store(path, max_peers).records.values())


@attrs.define(eq=False)
class AddResult:
    accepted: list[str]
    rejected: list[dict[str, str]]
    #: fires when every accepted address is on disk
    durable: Deferred


class PeerStore:
    """The node's known addresses, in memory, mirrored to the peers file
    and its journal."""

    def __init__(
        self,
        reactor: Any,
        path: str | os.PathLike,
        records: Iterable[PeerRecord] = (),
        max_peers: int = MAX_PEERS,
        flush_delay: float = default(StoreConfig, "flush_delay"),
        on_write: Any = None,
        runner: Any = None,
        ops: DiskOps = DISK,
        contents: StoreContents | None = None,
    ) -> None:
        """``contents``: what ``open`` read (then ``records`` is unused);
        ``runner`` runs the writes (``testing.InlineWriter``: at once);
        ``ops``: the system calls that write (tests record or fail them)."""
        self._reactor = reactor
        self.path = Path(path)
        self.flush_delay = flush_delay
        if contents is None:
            contents = StoreContents({r.addr: r for r in records}, Epoch.fresh(), 0, 0)
        self._index = PeerIndex(max_peers, contents.records.values())
        #: addresses the operator unregistered, oldest first: not taken
        #: back from peers until registered again (kept in the files too)
        self._unregistered: dict[str, str] = dict(contents.unregistered)
        self._files = StoreFiles(self.path, contents.epoch, contents.journal_size, ops)
        self._writer = GroupWriter(reactor, self._take, runner=runner, on_write=on_write,
                                   on_failure=self._write_failed)
        #: addresses changed since the last batch, in the order the journal
        #: must replay them; True: dropped meanwhile (the journal says so
        #: before it puts the address again, at the end)
        self._pending: dict[str, bool] = {}
        #: journal lines since the last fold (replayed ones included)
        self._journal_lines = contents.journal_lines
        self._fold_asked = False
        #: bookkeeping changes not yet in a batch
        self._changes = 0
        self._dirty = False
        self._evicted_unsaid = 0
        self._eviction_log_call: Any = None
        self._closed = False
        self._close_timer: Any = None
        #: bumped on every change of the set of addresses, so callers can cache
        self.generation = 0

    @classmethod
    def open(cls, reactor: Any, path: str | os.PathLike, **kw: Any) -> "PeerStore":
        """Read the peers file and replay its journal (``StoreError`` if
        either is unusable), touching neither."""
        contents = read_store(path, kw.get("max_peers", MAX_PEERS))
        return cls(reactor, path, contents=contents, **kw)

    @property
    def max_peers(self) -> int:
        return self._index.max_peers

    @property
    def journal(self) -> Path:
        return self._files.journal

    @property
    def writes(self) -> int:
        """Batches written (appends and folds)."""
        return self._writer.writes

    @property
    def runner(self) -> Any:
        return self._writer.runner

    @runner.setter
    def runner(self, runner: Any) -> None:
        self._writer.runner = runner

    # -- reading ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, addr: str) -> bool:
        return addr in self._index

    def get(self, addr: str) -> PeerRecord | None:
        return self._index.get(addr)

    def addresses(self) -> list[str]:
        return self._index.addresses()

    def records(self) -> list[PeerRecord]:
        return self._index.records()

    # -- changing ----------------------------------------------------------

    def add(self, addrs: Iterable[str], source: str, now: float | None = None,
            durable: bool = True, revive: bool | None = None) -> AddResult:
        """Add valid, already-parsed addresses; returns which were taken and
        a Deferred for their durability. Full stores evict never-verified
        and failing addresses first; bootstrap addresses are never evicted.

        ``durable=False`` (addresses learned from peers) only marks the store
        dirty: such additions are written with the next lazy flush.

        An unregistered address is taken only with ``revive`` (by default,
        a durable add: the operator's ``register``), which ends its
        unregistration; otherwise it is left out, unsaid."""
        now = self._reactor.seconds() if now is None else now
        if self._unregistered and not (durable if revive is None else revive):
            addrs = [a for a in addrs if not self.is_unregistered(a)]
        added = self._index.add(addrs, source, now, hold=durable)
        if source == BOOTSTRAP:
            # Named on the command line (--peer, --static-peer): kept as a
            # bootstrap address (never evicted or forgotten) even when it
            # was known before from a register or a peer.
            for addr in added.accepted:
                record = self._index.get(addr)
                if record is not None and record.source != BOOTSTRAP:
                    self.update(addr, source=BOOTSTRAP)
        for victim in added.evicted:
            self._changed(victim.addr, dropped=True)
        if added.evicted:
            self._say_evicted(len(added.evicted))
        revived: dict[str, str] = {}
        for addr in added.fresh:
            if self._unregistered:
                key = address.endpoint(addr)
                if key in self._unregistered:
                    # (the put line says so in the journal)
                    revived[addr] = self._unregistered.pop(key)
            self._changed(addr, fresh=True)
        if added.changed:
            self.generation += 1
        if added.changed and not durable:
            self.mark_dirty()
            done = _succeed()
        elif added.changed:
            done = self.commit().addBoth(self._settle, added.fresh, source, added.accepted, revived)
        elif added.accepted and durable:
            # Already known; but maybe not yet on disk if another request's
            # commit is still in flight, so wait for the disk all the same.
            unsure = self._writer.busy or self._dirty or self._pending
            done = self.commit() if unsure else _succeed()
            done.addCallback(self._still_there, added.accepted)
        else:
            done = _succeed()
        return AddResult(added.accepted, added.rejected, done)

    def _settle(self, result: Any, fresh: list[str], source: str, accepted: list[str],
                revived: dict[str, str] | None = None) -> Any:
        """A register's write is over: on failure roll its new addresses
        back (an address it revived is unregistered again: the next write,
        a fold, says so), on success check they are all still there."""
        if isinstance(result, Failure) and not result.check(StoreDurabilityError):
            # (After a failed directory sync the file holds them: kept, so
            # that memory stays what the files hold.) Forgotten, so that no
            # one sees (or later writes) what was never acknowledged.
            for addr in fresh:
                record = self._index.get(addr)
                if record is not None and record.source == source and not record.verified:
                    self._index.drop(addr)
                    self._changed(addr, dropped=True)
                    self.generation += 1
                    if revived and addr in revived:
                        self._unregistered[address.endpoint(addr)] = revived[addr]
        self._index.release(fresh)
        if isinstance(result, Failure):
            return result
        return self._still_there(result, accepted)

    def _still_there(self, _: Any, accepted: list[str]) -> None:
        # Another request's failed write may have rolled back an address this
        # one found already known, or a full store evicted it meanwhile.
        missing = [a for a in accepted if a not in self._index]
        if missing:
            raise StoreWriteError(f"{len(missing)} of the addresses could not be written")

    def remove(self, addr: str) -> None:
        if self._index.drop(addr) is not None:
            self._changed(addr, dropped=True)
            self.generation += 1
            self.mark_dirty()

    def unregister(self, addrs: Iterable[str]) -> Deferred:
        """The operator takes addresses back: removed, and remembered as
        unregistered (``is_unregistered``) until added with ``revive``.
        Fires once the files say so."""
        for addr in addrs:
            self._index.drop(addr)
            key = address.endpoint(addr)
            self._unregistered.pop(key, None)
            self._unregistered[key] = addr
            if len(self._unregistered) > MAX_UNREGISTERED:
                del self._unregistered[next(iter(self._unregistered))]
            self._changed(addr, dropped=True)
        self.generation += 1
        self._changes += 1
        return self.commit()

    def is_unregistered(self, addr: str) -> bool:
        """Whether the operator unregistered what ``addr`` reaches, in any
        spelling (``address.endpoint``: pinned or not, any case, ...)."""
        try:
            return address.endpoint(addr) in self._unregistered
        except address.InvalidAddress:
            return False

    def unregistered(self) -> list[str]:
        """Unregistered addresses, oldest first, as they were unregistered."""
        return list(self._unregistered.values())

    def update(self, addr: str, **fields: Any) -> PeerRecord | None:
        """Change bookkeeping fields of a record; written lazily."""
        record = self._index.update(addr, fields)
        if record is None:
            return None
        self._changed(addr)
        self.mark_dirty()
        return record

    def _changed(self, addr: str, dropped: bool = False, fresh: bool = False) -> None:
        pending = self._pending
        if dropped or fresh:
            # Moved to the end: the journal replays a removal, and an
            # address added anew, in the order memory has them.
            was = pending.pop(addr, False)
            pending[addr] = dropped or was
        else:
            pending.setdefault(addr, False)

    # -- evictions, said in the log ---------------------------------------------

    def _say_evicted(self, count: int) -> None:
        # A flood into a full store evicts on every register: the first
        # eviction is logged at once, the rest summed up once a window.
        if self._eviction_log_call is None:
            log.info("peer store full: evicted {n} unverified or failing addresses", n=count)
            if not self._closed:  # nothing scheduled after close: said at once
                self._eviction_log_call = self._reactor.callLater(EVICTION_LOG_WINDOW, self._say_evicted_since)
        else:
            self._evicted_unsaid += count

    def _say_evicted_since(self) -> None:
        count, self._evicted_unsaid = self._evicted_unsaid, 0
        self._eviction_log_call = None
        if count:
            log.info("peer store full: evicted {n} unverified or failing addresses in the last {s:.0f} s",
                     n=count, s=EVICTION_LOG_WINDOW)
            if not self._closed:
                self._eviction_log_call = self._reactor.callLater(EVICTION_LOG_WINDOW, self._say_evicted_since)

    # -- writing -------------------------------------------------------------

    def mark_dirty(self) -> None:
        """A change to be written with the next ``flush`` (or commit)."""
        self._dirty = True
        self._changes += 1

    def flush(self) -> None:
        """Write the lazy changes, if any: called every ``flush_delay``
        seconds by the node's service tree (service.StoreService)."""
        if self._dirty and not self._closed:
            self.commit().addErrback(lambda f: None)  # logged by _write_failed

    def commit(self) -> Deferred:
        """Deferred that fires once every change made so far is on disk."""
        return self._writer.commit()

    def fold(self) -> Deferred:
        """Fold the journal into the peers file with the next write."""
        self._fold_asked = True
        return self.commit()

    def snapshot(self) -> bytes:
        """The peers file's content as a fold would write it now."""
        return b"".join(peers_file_chunks(peers_file_body(self._index.records()), self._files.epoch,
                                          self._unregistered.values()))

    def _take(self, failed: bool) -> Batch:
        """The next batch: every change since the last one, as journal
        lines; or, after a failure (when what the journal holds is not
        known), once the journal is long, or when asked, a fold."""
        changes, self._changes = self._changes, 0
        self._dirty = False
        if failed or self._fold_asked or self._journal_lines > max(FOLD_LINES, len(self._index)):
            self._fold_asked = False
            self._pending.clear()
            self._journal_lines = 0
            body = peers_file_body(self._index.records())
            return Batch(partial(self._files.fold, body, tuple(self._unregistered.values())), changes)
        if not self._pending:
            return Batch(None, changes)
        lines = []
        for addr, dropped in self._pending.items():
            record = self._index.get(addr)
            if dropped:
                withdrawn = self._unregistered and self._unregistered.get(address.endpoint(addr)) == addr
                lines.append(unregister_line(addr) if withdrawn else del_line(addr))
            if record is not None:
                lines.append(put_line(record))
        self._pending.clear()
        self._journal_lines += len(lines)
        return Batch(partial(self._files.append, lines), changes)

    def _write_failed(self, error: BaseException) -> None:
        # Written again with the next batch (a fold, which syncs the
        # directory again too).
        self._dirty = True
        self._changes += self._writer.in_flight_changes
        log.error("cannot write peers file {path}: {error}", path=str(self.path), error=error)

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> Deferred:
        """Fold the journal into the peers file, for service shutdown;
        fires once that is on disk, or after ``timeout`` seconds of a write
        that does not end (a hung disk): then one line says what was not
        written, and no register still waiting is acknowledged."""
        self._closed = True
        if self._eviction_log_call is not None and self._eviction_log_call.active():
            self._eviction_log_call.cancel()
            self._say_evicted_since()
        idle = not (self._dirty or self._pending or self._journal_lines or self._writer.busy)
        if idle or self._writer.abandoned:
            self._stop_writing()
            return _succeed()
        d = self.fold()
        if timeout is not None and not d.called:
            self._close_timer = self._reactor.callLater(timeout, self._give_up, timeout)
        d.addErrback(lambda f: None)
        d.addBoth(self._closed_down)
        return d

    def _closed_down(self, _: Any) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self._stop_writing()

    def _stop_writing(self) -> None:
        # The journal's descriptor is the writer thread's: closed there,
        # after whatever it still runs.
        if self._files.is_open and not self._writer.abandoned:
            self._writer.runner.run(self._files.close).addErrback(lambda f: None)
        self._writer.stop()

    def _give_up(self, timeout: float) -> None:
        self._close_timer = None
        log.error("peer store: shutting down without the last write to {path}, which did not end "
                  "within {timeout:g} s: not written: {addresses} registered addresses "
                  "(not acknowledged) and {changes} other changes",
                  path=str(self.path), timeout=timeout, addresses=len(self._index.held),
                  changes=self._writer.in_flight_changes + self._changes)
        self._writer.abandon("the node shut down before the peers file was written")
        self._stop_writing()


def _succeed() -> Deferred:
    d: Deferred = Deferred()
    d.callback(None)
    return d
