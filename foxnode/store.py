"""The peer store: every address the node knows, in a human-readable JSON
file that never loses an acknowledged write.

Durability: a ``commit()`` Deferred fires only after the file holding the
change was written to a temporary file, fsynced, renamed over the old one
and the directory fsynced. Group commit: while one write is on its way to
the disk, every change made meanwhile waits for the *next* write, so a burst
of concurrent registers costs two fsyncs, not one per request. Bookkeeping
updates (handshakes, failures) are only marked dirty and flushed lazily.

The file is never overwritten when it could not be read: ``load`` refuses
with a ``StoreError`` naming the file and the fault.

Writes run on the store's own daemon thread, not the reactor's pool: a
write that hangs (a hung disk) holds neither the reactor's shutdown, which
joins its pool's threads, nor ``close()``, which gives up after a timeout
and says what was not written.
"""

from __future__ import annotations

import errno
import heapq
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
import orjson
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from foxnode import address, logs

FORMAT = "foxnode/peers"
VERSION = 1
DEFAULT_MAX_PEERS = 10_000
#: seconds over which evictions from a full store are summed up in the log
EVICTION_LOG_WINDOW = 10.0
#: seconds ``close()`` (the node's shutdown) waits for the last write
CLOSE_TIMEOUT = 5.0
_HEAD = b'{\n  "format": "%s",\n  "version": %d,\n  "peers": {\n' % (FORMAT.encode(), VERSION)

#: Sources of an address, as stored in its record.
BOOTSTRAP = "bootstrap"
REGISTER = "register"
EXCHANGE = "exchange"
HANDSHAKE = "handshake"

log = logs.logger(__name__)


class StoreError(Exception):
    """The peers file cannot be used; the message names the file and fault."""


class StoreWriteError(Exception):
    """Writing the peers file failed; acknowledged nothing."""


class StoreDurabilityError(StoreWriteError):
    """The peers file holds the change, but the directory could not be
    synced after the rename: kept in memory (as in the file), not
    confirmed durable; the next write syncs again."""


class DirectorySyncError(OSError):
    """The rename is done, the directory's fsync failed."""


@attrs.define
class PeerRecord:
    addr: str
    added: float
    source: str
    #: node id behind the address, once a handshake showed it
    node_id: str | None = None
    last_handshake: float | None = None
    last_seen: float | None = None
    failures: int = 0
    last_error: str | None = None
    #: the address turned out to be this node itself: never dial it
    is_self: bool = False
    #: when this node last completed a handshake by dialing the address
    #: itself; only such addresses are handed on to other peers (an
    #: address a peer merely advertised proves nothing). Absent from files
    #: written before it existed.
    last_dialed: float | None = None

    @property
    def verified(self) -> bool:
        return self.last_handshake is not None

    @property
    def dialed(self) -> bool:
        return self.last_dialed is not None

    def to_json(self) -> dict[str, Any]:
        # Spelled out: attrs.asdict is several times slower, and every
        # write serializes every record.
        return {
            "added": self.added, "source": self.source, "node_id": self.node_id,
            "last_handshake": self.last_handshake, "last_seen": self.last_seen,
            "failures": self.failures, "last_error": self.last_error, "is_self": self.is_self,
            "last_dialed": self.last_dialed,
        }


_FIELDS: dict[str, tuple[type, ...]] = {
    "added": (int, float),
    "source": (str,),
    "node_id": (str, type(None)),
    "last_handshake": (int, float, type(None)),
    "last_seen": (int, float, type(None)),
    "failures": (int,),
    "last_error": (str, type(None)),
    "is_self": (bool,),
    "last_dialed": (int, float, type(None)),
}


def _record_from_json(addr: str, raw: Any, path: Path) -> PeerRecord:
    where = f"peers file {path}: peer {addr!r}"
    try:
        address.parse(addr)
    except address.InvalidAddress as e:
        raise StoreError(f"{where}: invalid address ({e})") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{where}: record is not an object")
    values: dict[str, Any] = {}
    for name, types in _FIELDS.items():
        if name not in raw:
            if name in ("added", "source"):
                raise StoreError(f"{where}: missing field {name!r}")
            continue
        value = raw[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise StoreError(f"{where}: field {name!r} has the wrong type")
        values[name] = value
    if values.get("failures", 0) < 0:
        raise StoreError(f"{where}: field 'failures' is negative")
    return PeerRecord(addr=addr, **values)


def _eviction_key(record: PeerRecord) -> tuple[bool, int, float] | None:
    """Where a record stands in the order a full store evicts in, worst
    first: never verified, then most failures, then oldest. None: never
    evicted as it is (bootstrap, or verified and working)."""
    if record.source == BOOTSTRAP or (record.verified and not record.failures and not record.is_self):
        return None
    return (record.verified, -record.failures, record.added)


def load(path: str | os.PathLike, max_peers: int = DEFAULT_MAX_PEERS) -> list[PeerRecord]:
    """Read and validate the peers file; a missing file is an empty store."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreError(f"peers file {path}: cannot read ({e.strerror})") from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"peers file {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"peers file {path}: top level is not an object")
    if doc.get("format") != FORMAT:
        raise StoreError(f"peers file {path}: 'format' is not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise StoreError(f"peers file {path}: unsupported version {doc.get('version')!r}")
    peers = doc.get("peers")
    if not isinstance(peers, dict):
        raise StoreError(f"peers file {path}: 'peers' is not an object")
    if len(peers) > max_peers:
        raise StoreError(f"peers file {path}: {len(peers)} peers, more than the limit {max_peers}")
    return [_record_from_json(addr, raw, path) for addr, raw in peers.items()]


def _temp_name(name: str) -> str:
    # Unpredictable, so nobody can plant a file or symlink there ahead of us.
    return f".{name}.tmp-{secrets.token_hex(8)}"


_TEMP_ATTEMPTS = 16


def write_atomically(path: Path, data: bytes | list[bytes], mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order) so
    that a crash at any moment leaves either the old or the new file, never
    a mix; runs in a thread. A symlink stays a symlink: the file it points
    to is replaced, in its own directory. A failure before the rename
    leaves no temporary file; one after it raises ``DirectorySyncError``.
    The new file has ``mode`` from its first byte on (0o600 for secrets:
    never readable by others, not even between the write and a chmod)."""
    target = Path(os.path.realpath(path))
    directory = target.parent
    for _ in range(_TEMP_ATTEMPTS):
        tmp = directory / _temp_name(target.name)
        try:
            # O_EXCL | O_NOFOLLOW: never write through anything found there.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))
    try:
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise DirectorySyncError(e.errno, f"cannot sync its directory: {e.strerror}") from e


class _Writer:
    """The store's own daemon thread, running one write at a time; results
    (what the job returned, or its failure) come back on the reactor's
    thread. A daemon, so that a write hung in the kernel does not keep the
    process from exiting. The key store runs its writes here too."""

    def __init__(self, reactor: Any, name: str = "foxnode-store-writer") -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: queue.SimpleQueue | None = None

    def run(self, write: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(self._jobs,), name=self._name,
                             daemon=True).start()
        self._jobs.put((write, args, d))
        return d

    def stop(self) -> None:
        """End the thread once its jobs are done; a later ``run`` starts another."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            write, args, d = job
            try:
                result = write(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


@attrs.define(eq=False)
class AddResult:
    accepted: list[str]
    rejected: list[dict[str, str]]
    #: fires when every accepted address is on disk
    durable: Deferred


class PeerStore:
    """The node's known addresses, in memory, mirrored to one JSON file."""

    def __init__(
        self,
        reactor: Any,
        path: str | os.PathLike,
        records: Iterable[PeerRecord] = (),
        max_peers: int = DEFAULT_MAX_PEERS,
        flush_delay: float = 2.0,
        on_write: Callable[[float], None] | None = None,
        write: Callable[[Path, list[bytes]], None] | None = None,
    ) -> None:
        self._reactor = reactor
        #: what puts the file on disk (tests hand in one that hangs or fails)
        self._write = write if write is not None else write_atomically
        self._writer = _Writer(reactor)
        self.path = Path(path)
        self.max_peers = max_peers
        self.flush_delay = flush_delay
        self._on_write = on_write
        self._records: dict[str, PeerRecord] = {r.addr: r for r in records}
        #: addresses added by registers whose write has not completed yet
        self._unwritten: set[str] = set()
        #: each record's line in the file, in the records' order, encoded
        #: when the record is made or changed
        self._lines: dict[str, bytes] = {a: self._line(r) for a, r in self._records.items()}
        #: each address's place in the order records were added: among
        #: equally bad records the oldest arrival is evicted first
        self._arrival: dict[str, int] = {a: i for i, a in enumerate(self._records)}
        self._arrivals = len(self._arrival)
        #: (eviction key, arrival, address) of evictable records, worst on
        #: top; an entry whose record changed or went is stale and skipped
        #: when met. Kept only once the store has been full (None until
        #: then), and without records still waiting for their first write.
        self._eviction_order: list[tuple[bool, int, float, int, str]] | None = None
        self._evicted_unsaid = 0
        self._eviction_log_call: Any = None
        #: bumped on every change of the set of addresses, so callers can cache
        self.generation = 0
        self._writing = False
        self._waiters: list[Deferred] = []
        #: the waiters of the write in flight, and how many changes it carries
        self._in_flight: list[Deferred] = []
        self._in_flight_changes = 0
        #: changes (bookkeeping, learned addresses) not yet in a write
        self._changes = 0
        self._lazy_call: Any = None
        self._dirty = False
        self._closed = False
        #: close() gave up waiting for the disk: nothing more is acknowledged
        self._abandoned = False
        self._close_timer: Any = None
        self.writes = 0

    @classmethod
    def open(cls, reactor: Any, path: str | os.PathLike, **kw: Any) -> "PeerStore":
        records = load(path, kw.get("max_peers", DEFAULT_MAX_PEERS))
        return cls(reactor, path, records, **kw)

    # -- reading ---------------------------------------------------------

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

    # -- changing ----------------------------------------------------------

    def add(self, addrs: Iterable[str], source: str, now: float | None = None,
            durable: bool = True) -> AddResult:
        """Add valid, already-parsed addresses; returns which were taken and
        a Deferred for their durability. Full stores evict never-verified
        and failing addresses first; bootstrap addresses are never evicted.

        ``durable=False`` (addresses learned from peers) only marks the file
        dirty: such additions are written with the next lazy flush."""
        now = self._reactor.seconds() if now is None else now
        accepted: list[str] = []
        rejected: list[dict[str, str]] = []
        fresh = []
        for addr in addrs:
            if addr in self._records or addr in fresh:
                accepted.append(addr)
            else:
                fresh.append(addr)
        overflow = len(self._records) + len(fresh) - self.max_peers
        if overflow > 0:
            victims = self._eviction_candidates(overflow, keep=set(accepted))
            for victim in victims:
                self._drop(victim.addr)
            if victims:
                self._say_evicted(len(victims))
            room = self.max_peers - len(self._records)
            for addr in fresh[room:]:
                rejected.append({"addr": addr, "reason": "peer store is full"})
            fresh = fresh[:room]
        for addr in fresh:
            record = self._records[addr] = PeerRecord(addr=addr, added=now, source=source)
            self._lines[addr] = self._line(record)
            self._arrival[addr] = self._arrivals
            self._arrivals += 1
            if not durable:
                self._note_eviction_order(record)
            accepted.append(addr)
        if (fresh or overflow > 0) and not durable:
            self.generation += 1
            self.mark_dirty()
            done = _succeed()
        elif fresh or overflow > 0:
            self.generation += 1
            self._unwritten.update(fresh)
            done = self.commit().addBoth(self._settle, fresh, source, accepted)
        elif accepted and durable:
            # Already known; but maybe not yet on disk if another writer's
            # commit is still in flight, so wait for the disk all the same.
            done = self.commit() if (self._writing or self._waiters or self._dirty) else _succeed()
            done.addCallback(self._still_there, accepted)
        else:
            done = _succeed()
        return AddResult(accepted, rejected, done)

    def _settle(self, result: Any, fresh: list[str], source: str, accepted: list[str]) -> Any:
        """A register's write is over: on failure roll its new addresses
        back, on success check they are all still there."""
        self._unwritten.difference_update(fresh)
        if isinstance(result, Failure) and not result.check(StoreDurabilityError):
            # (After a failed directory sync the file holds them: kept, so
            # that memory stays what the file holds.)
            result = self._roll_back(result, fresh, source)
        # Evictable from now on (they were kept out of the eviction order
        # while their write was in flight).
        for addr in fresh:
            record = self._records.get(addr)
            if record is not None:
                self._note_eviction_order(record)
        if isinstance(result, Failure):
            return result
        return self._still_there(result, accepted)

    def _roll_back(self, failure: Failure, fresh: list[str], source: str) -> Failure:
        """A failed write: forget this request's new addresses, so that no
        one sees (or later writes) what was never acknowledged."""
        for addr in fresh:
            record = self._records.get(addr)
            if record is not None and record.source == source and not record.verified:
                self._drop(addr)
                self.generation += 1
        return failure

    def _still_there(self, _: Any, accepted: list[str]) -> None:
        # Another request's failed write may have rolled back an address this
        # one found already known, or a full store evicted it meanwhile.
        missing = [a for a in accepted if a not in self._records]
        if missing:
            raise StoreWriteError(f"{len(missing)} of the addresses could not be written")

    def _eviction_candidates(self, count: int, keep: set[str]) -> list[PeerRecord]:
        # Taken from a heap, not by sorting the store: a register flood into
        # a full store evicts on every request.
        if self._eviction_order is None:
            self._rebuild_eviction_order()
        order = self._eviction_order
        victims: list[PeerRecord] = []
        chosen: set[str] = set()
        held = []
        while order and len(victims) < count:
            entry = heapq.heappop(order)
            addr = entry[4]
            record = self._records.get(addr)
            if record is None or addr in chosen or _eviction_key(record) != entry[:3]:
                continue  # stale: the record went or changed (a newer entry exists)
            if addr in keep or addr in self._unwritten:
                # A request's own addresses, or (after an update during its
                # write) one a request still waits to see written, which it
                # would then be told failed: kept, and its entry goes back.
                held.append(entry)
                continue
            victims.append(record)
            chosen.add(addr)
        for entry in held:
            heapq.heappush(order, entry)
        return victims

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

    def _note_eviction_order(self, record: PeerRecord) -> None:
        if self._eviction_order is None:
            return  # built from the records when first needed
        key = _eviction_key(record)
        if key is not None:
            heapq.heappush(self._eviction_order, (*key, self._arrival[record.addr], record.addr))
            if len(self._eviction_order) > 2 * len(self._records) + 1024:
                self._rebuild_eviction_order()  # mostly stale entries by now

    def _rebuild_eviction_order(self) -> None:
        self._eviction_order = [
            (*key, self._arrival[r.addr], r.addr) for r in self._records.values()
            if r.addr not in self._unwritten and (key := _eviction_key(r)) is not None
        ]
        heapq.heapify(self._eviction_order)

    def remove(self, addr: str) -> None:
        if addr in self._records:
            self._drop(addr)
            self.generation += 1
            self.mark_dirty()

    def _drop(self, addr: str) -> None:
        del self._records[addr]
        self._lines.pop(addr, None)
        self._arrival.pop(addr, None)

    def update(self, addr: str, **fields: Any) -> PeerRecord | None:
        """Change bookkeeping fields of a record; written lazily. Records
        are changed only through here (the file's cached line follows)."""
        record = self._records.get(addr)
        if record is None:
            return None
        tracked = self._eviction_order is not None
        was = _eviction_key(record) if tracked else None
        for name, value in fields.items():
            setattr(record, name, value)
        if tracked and _eviction_key(record) != was:
            self._note_eviction_order(record)
        self._lines[addr] = self._line(record)
        self.mark_dirty()
        return record

    # -- writing -------------------------------------------------------------

    def mark_dirty(self) -> None:
        self._dirty = True
        self._changes += 1
        if self._closed:
            return  # close() wrote what there was; the node is going away
        if self._lazy_call is None or not self._lazy_call.active():
            self._lazy_call = self._reactor.callLater(self.flush_delay, self._lazy_flush)

    def _lazy_flush(self) -> None:
        self._lazy_call = None
        if self._dirty:
            self.commit().addErrback(lambda f: None)  # logged by _written

    def commit(self) -> Deferred:
        """Deferred that fires once every change made so far is on disk."""
        if self._abandoned:
            return fail(StoreWriteError("the node is shutting down"))
        d: Deferred = Deferred()
        self._waiters.append(d)
        self._dirty = True
        if not self._writing:
            self._start_write()
        return d

    def snapshot(self) -> bytes:
        """The file's content: one line per address, each encoded when its
        record was made or last changed, so a write of a large store joins
        bytes it already has."""
        return b"".join(self._chunks())

    def _chunks(self) -> list[bytes]:
        # The body is the only large part: joined once, never copied again.
        body = b",\n".join(self._lines.values())
        return [_HEAD, body, b"\n  }\n}\n" if body else b"  }\n}\n"]

    @staticmethod
    def _line(record: PeerRecord) -> bytes:
        return b"    " + orjson.dumps(record.addr) + b": " + orjson.dumps(record.to_json())

    def _start_write(self) -> None:
        self._writing = True
        self._in_flight, self._waiters = self._waiters, []
        self._in_flight_changes, self._changes = self._changes, 0
        self._dirty = False
        data = self._chunks()
        started = time.monotonic()
        self._writer.run(self._write, self.path, data).addBoth(self._written, started)

    def _written(self, result: Any, started: float) -> None:
        if self._abandoned:
            return  # close() gave up on it and answered its waiters
        self._writing = False
        waiters, self._in_flight = self._in_flight, []
        if isinstance(result, Failure):
            error = result.value
            # Written again with the next write (a failed directory sync
            # too: that write syncs the directory again).
            self._dirty = True
            self._changes += self._in_flight_changes
            log.error("cannot write peers file {path}: {error}", path=str(self.path), error=error)
            if isinstance(error, DirectorySyncError):
                refusal: StoreWriteError = StoreDurabilityError(
                    f"peers file written but not confirmed durable: {_describe(error)}")
            else:
                refusal = StoreWriteError(f"cannot write peers file: {_describe(error)}")
            for w in waiters:
                w.errback(refusal)
        else:
            self._in_flight_changes = 0
            self.writes += 1
            if self._on_write is not None:
                self._on_write(time.monotonic() - started)
            for w in waiters:
                w.callback(None)
        if self._waiters:
            self._start_write()

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> Deferred:
        """Flush pending changes, for service shutdown; fires once they are
        on disk, or after ``timeout`` seconds of a write that does not end
        (a hung disk): then one line says what was not written, and no
        register still waiting is acknowledged."""
        self._closed = True
        if self._lazy_call is not None and self._lazy_call.active():
            self._lazy_call.cancel()
        self._lazy_call = None
        if self._eviction_log_call is not None and self._eviction_log_call.active():
            self._eviction_log_call.cancel()
            self._say_evicted_since()
        if not (self._dirty or self._writing or self._waiters) or self._abandoned:
            self._writer.stop()
            return _succeed()
        d = self.commit()
        if timeout is not None and not d.called:
            self._close_timer = self._reactor.callLater(timeout, self._give_up, timeout)
        d.addErrback(lambda f: None)
        d.addBoth(self._closed_down)
        return d

    def _closed_down(self, _: Any) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self._writer.stop()

    def _give_up(self, timeout: float) -> None:
        self._close_timer = None
        self._abandoned = True
        log.error("peer store: shutting down without the last write to {path}, which did not end "
                  "within {timeout:g} s: not written: {addresses} registered addresses "
                  "(not acknowledged) and {changes} other changes",
                  path=str(self.path), timeout=timeout, addresses=len(self._unwritten),
                  changes=self._in_flight_changes + self._changes)
        waiters = self._in_flight + self._waiters
        self._in_flight, self._waiters = [], []
        for w in waiters:
            w.errback(StoreWriteError("the node shut down before the peers file was written"))


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _succeed() -> Deferred:
    d: Deferred = Deferred()
    d.callback(None)
    return d
