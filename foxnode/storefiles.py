"""The peer store's two files, how they are read and how they are written.

The peers file is the human-readable JSON users see, one record per
address on a line of its own. Beside it, ``<peers file>.journal`` holds the
changes made since the peers file was last written: one JSON line each, a
record put, an address removed, or an address the operator unregistered,
appended and fsynced per group commit. Unregistered addresses (at most
``MAX_UNREGISTERED``, the oldest dropped first) are kept too, in the peers
file's ``"unregistered"`` list, so that a node never takes one back from
its peers, restarted or not, until it is registered again (a put).
Folding writes the peers file anew (atomically) and starts a new journal.

Each fold is an epoch: the peers file names the journal that continues it
(``"journal": {"id", "epoch"}``) and the journal's first line names the
epoch it belongs to. Reading them together tells apart the journal of this
file (replayed), the one it was folded from, left by a crash between the
rename and the journal's reset (of an older epoch, so already in the file:
ignored), and any other (refused).

Nothing here decides what to write or when; ``DiskOps`` is the one seam
through which every system call that writes passes, so tests can record,
fail or hang them.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

import attrs
import orjson

from foxnode import address

FORMAT = "foxnode/peers"
JOURNAL_FORMAT = "foxnode/peers-journal"
VERSION = 1
JOURNAL_SUFFIX = ".journal"

#: Addresses the operator unregistered that a store remembers at most.
MAX_UNREGISTERED = 10_000

#: Sources of an address, as stored in its record.
BOOTSTRAP = "bootstrap"
REGISTER = "register"
EXCHANGE = "exchange"
HANDSHAKE = "handshake"


class StoreError(Exception):
    """The store's files cannot be used; the message names the file and fault."""


class StoreWriteError(Exception):
    """Writing the store failed; acknowledged nothing."""


class StoreDurabilityError(StoreWriteError):
    """The file holds the change, but the directory could not be synced
    after the rename: kept in memory (as in the file), not confirmed
    durable; the next write syncs again."""


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
    #: registered by the node's operator (a ``--trusted`` client): a pin of
    #: its guards every spelling of its endpoint (peers.py ``pins_of``), as
    #: a bootstrap address's does; a stranger's pin guards only itself.
    #: Absent from files written before it existed, and when false.
    operator: bool = False

    @property
    def verified(self) -> bool:
        return self.last_handshake is not None

    @property
    def dialed(self) -> bool:
        return self.last_dialed is not None

    def to_json(self) -> dict[str, Any]:
        # Spelled out: attrs.asdict is several times slower, and a fold
        # serializes every record.
        out = {
            "added": self.added, "source": self.source, "node_id": self.node_id,
            "last_handshake": self.last_handshake, "last_seen": self.last_seen,
            "failures": self.failures, "last_error": self.last_error, "is_self": self.is_self,
            "last_dialed": self.last_dialed,
        }
        if self.operator:
            out["operator"] = True
        return out


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
    "operator": (bool,),
}


def _record_from_json(addr: Any, raw: Any, where: str) -> PeerRecord:
    if not isinstance(addr, str):
        raise StoreError(f"{where}: an address is not a string")
    where = f"{where}: peer {addr!r}"
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


@attrs.frozen
class Epoch:
    """Which journal continues a peers file: the store's id (random, kept
    across folds) and the number of folds so far."""

    id: str
    number: int

    @classmethod
    def fresh(cls) -> "Epoch":
        return cls(secrets.token_hex(8), 0)

    def next(self) -> "Epoch":
        return Epoch(self.id, self.number + 1)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "epoch": self.number}


def _epoch_from_json(raw: Any) -> Epoch | None:
    if (isinstance(raw, dict) and isinstance(raw.get("id"), str) and isinstance(raw.get("epoch"), int)
            and not isinstance(raw.get("epoch"), bool) and raw["epoch"] >= 0):
        return Epoch(raw["id"], raw["epoch"])
    return None


def journal_path(path: str | os.PathLike) -> Path:
    """The journal beside the peers file (beside the file a symlink points to)."""
    target = Path(os.path.realpath(path))
    return target.with_name(target.name + JOURNAL_SUFFIX)


@attrs.define
class StoreContents:
    """What the two files hold together, and where the journal goes on."""

    records: dict[str, PeerRecord]
    #: the epoch the next journal line belongs to
    epoch: Epoch
    #: the journal's valid length in bytes (0: start a new journal), past
    #: which a torn last line is cut off before the next append
    journal_size: int
    #: lines in the journal (its header not counted)
    journal_lines: int
    #: addresses the operator unregistered, oldest first, by what they
    #: reach (``address.endpoint``): their spelling as unregistered
    unregistered: dict[str, str] = attrs.field(factory=dict)


def _read(path: Path, what: str, error: type[Exception] = StoreError) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror})") from None


def read_document(path: Path, what: str, form: str, version: int, part: str, most: int,
                  error: type[Exception] = StoreError) -> dict[str, Any] | None:
    """A node's versioned JSON file (the peers file, the key store): the
    whole document, checked to be an object of this ``form`` and
    ``version`` whose ``part`` is an object of at most ``most`` entries;
    None if there is no file. Anything else raises ``error``, one line
    naming the file and the fault."""
    data = _read(path, what, error)
    if data is None:
        return None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise error(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error(f"{what} {path}: top level is not an object")
    if doc.get("format") != form:
        raise error(f"{what} {path}: 'format' is not {form!r}")
    if doc.get("version") != version:
        raise error(f"{what} {path}: unsupported version {str(doc.get('version'))[:20]!r}")
    entries = doc.get(part)
    if not isinstance(entries, dict):
        raise error(f"{what} {path}: {part!r} is not an object")
    if len(entries) > most:
        raise error(f"{what} {path}: {len(entries)} {part}, more than the limit {most}")
    return doc


def _endpoint(addr: str, where: str) -> str:
    try:
        return address.endpoint(addr)
    except address.InvalidAddress as e:
        raise StoreError(f"{where}: unregistered address {addr[:100]!r} is invalid ({e})") from None


def read_peers_file(path: Path, max_peers: int
                    ) -> tuple[dict[str, PeerRecord], Epoch | None, bool, dict[str, str]]:
    """The peers file's records and epoch (None in a file written before
    the journal), whether the file exists, and its unregistered addresses."""
    doc = read_document(path, "peers file", FORMAT, VERSION, "peers", max_peers)
    if doc is None:
        return {}, None, False, {}
    peers = doc["peers"]
    epoch = None
    if "journal" in doc:
        epoch = _epoch_from_json(doc["journal"])
        if epoch is None:
            raise StoreError(f"peers file {path}: 'journal' is not an id and an epoch")
    unregistered = doc.get("unregistered", [])
    if (not isinstance(unregistered, list) or len(unregistered) > MAX_UNREGISTERED
            or not all(isinstance(a, str) for a in unregistered)):
        raise StoreError(f"peers file {path}: 'unregistered' is not a list of at most "
                         f"{MAX_UNREGISTERED} addresses")
    where = f"peers file {path}"
    records = {a: _record_from_json(a, raw, where) for a, raw in peers.items()}
    return records, epoch, True, {_endpoint(a, where): a for a in unregistered}


def read_store(path: str | os.PathLike, max_peers: int) -> StoreContents:
    """Read and validate the peers file, then replay its journal; missing
    files are an empty store. Refuses (``StoreError``, one line naming the
    file) anything it cannot account for; only a torn last journal line,
    which a crash during an append leaves, is dropped."""
    path = Path(path)
    records, epoch, exists, unregistered = read_peers_file(path, max_peers)
    jpath = journal_path(path)
    data = _read(jpath, "peers journal")
    if not data:
        return StoreContents(records, epoch or Epoch.fresh(), 0, 0, unregistered)
    lines = data.split(b"\n")
    # Whatever follows the last newline was being appended when the node
    # died: never acknowledged, so dropped.
    size = len(data) - len(lines[-1])
    lines = lines[:-1]
    if not lines:
        return StoreContents(records, epoch or Epoch.fresh(), 0, 0, unregistered)
    header = _journal_line(lines[0], jpath, 1)
    theirs = _epoch_from_json(header) if header.get("format") == JOURNAL_FORMAT else None
    if theirs is None:
        raise StoreError(f"peers journal {jpath}: line 1 is not a journal header")
    if epoch is None:
        # No peers file, or one written before journals: only a first
        # epoch's journal can continue it.
        if theirs.number != 0:
            why = "the peers file is missing" if not exists else "the peers file names no journal"
            raise StoreError(f"peers journal {jpath}: continues epoch {theirs.number} of its store, but "
                             f"{why}; refusing to guess (move the journal away to start without it)")
    elif theirs.id != epoch.id or theirs.number > epoch.number:
        raise StoreError(f"peers journal {jpath}: belongs to another peers file than {path} "
                         "(move it away to start without it)")
    elif theirs.number < epoch.number:
        # A fold wrote the peers file but did not get to reset the journal:
        # it was folded from memory holding all of the journal.
        return StoreContents(records, epoch, 0, 0, unregistered)
    for number, line in enumerate(lines[1:], start=2):
        change = _journal_line(line, jpath, number)
        op, addr = change.get("op"), change.get("addr")
        where = f"peers journal {jpath}: line {number}"
        if op == "put":
            # An update keeps its place, a new address goes last, as in
            # memory (a removed and re-added one has its "del" first).
            records[addr] = _record_from_json(addr, change.get("record"), where)
            unregistered.pop(address.endpoint(addr), None)  # registered again
        elif op == "del" and isinstance(addr, str):
            records.pop(addr, None)
        elif op == "unregister" and isinstance(addr, str):
            records.pop(addr, None)
            key = _endpoint(addr, where)
            unregistered.pop(key, None)
            unregistered[key] = addr
            if len(unregistered) > MAX_UNREGISTERED:
                del unregistered[next(iter(unregistered))]
        else:
            raise StoreError(f"{where}: not a change of the store")
    if len(records) > max_peers:
        raise StoreError(f"peers journal {jpath}: {len(records)} peers, more than the limit {max_peers}")
    return StoreContents(records, theirs, size, len(lines) - 1, unregistered)


def _journal_line(line: bytes, jpath: Path, number: int) -> dict[str, Any]:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"peers journal {jpath}: line {number} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise StoreError(f"peers journal {jpath}: line {number} is not an object")
    return value


# -- encoding ------------------------------------------------------------------------------

def _head(epoch: Epoch) -> bytes:
    return (b'{\n  "format": "%s",\n  "version": %d,\n  "journal": %s,\n  "peers": {\n'
            % (FORMAT.encode(), VERSION, orjson.dumps(epoch.to_json())))


def peers_file_body(records: Iterable[PeerRecord]) -> bytes:
    """The records as the peers file holds them, one line each (encoded
    on the reactor's thread, where records change)."""
    return b",\n".join(b"    " + orjson.dumps(r.addr) + b": " + orjson.dumps(r.to_json()) for r in records)


def peers_file_chunks(body: bytes, epoch: Epoch, unregistered: Iterable[str] = ()) -> list[bytes]:
    """The peers file's content, in chunks written in order; the list of
    unregistered addresses only where there is one."""
    listed = list(unregistered)
    tail = (b"\n  }" if body else b"  }")
    if listed:
        tail += b',\n  "unregistered": [\n' + b",\n".join(b"    " + orjson.dumps(a) for a in listed) + b"\n  ]"
    return [_head(epoch), body, tail + b"\n}\n"]


def journal_header(epoch: Epoch) -> bytes:
    return orjson.dumps({"format": JOURNAL_FORMAT, **epoch.to_json()}) + b"\n"


def put_line(record: PeerRecord) -> bytes:
    return orjson.dumps({"op": "put", "addr": record.addr, "record": record.to_json()}) + b"\n"


def del_line(addr: str) -> bytes:
    return orjson.dumps({"op": "del", "addr": addr}) + b"\n"


def unregister_line(addr: str) -> bytes:
    return orjson.dumps({"op": "unregister", "addr": addr}) + b"\n"


# -- writing -------------------------------------------------------------------------------

class DiskOps:
    """Every system call that writes the store's files. The methods look
    ``os`` up when called, so a test patching ``os.fsync`` reaches them
    too; a test may instead hand in a subclass that records the order of
    calls, fails or hangs."""

    def open(self, path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        os.replace(src, dst)

    def unlink(self, path: str | os.PathLike) -> None:
        os.unlink(path)


DISK = DiskOps()


def write_all(ops: DiskOps, fd: int, chunks: Iterable[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[ops.write(fd, view):]


def sync_directory(ops: DiskOps, directory: Path) -> None:
    """fsync a directory after a rename; a failure is ``DirectorySyncError``."""
    try:
        dfd = ops.open(directory, os.O_RDONLY)
        try:
            ops.fsync(dfd)
        finally:
            ops.close(dfd)
    except OSError as e:
        raise DirectorySyncError(e.errno, f"cannot sync its directory: {e.strerror}") from e


def _temp_name(name: str) -> str:
    # Unpredictable, so nobody can plant a file or symlink there ahead of us.
    return f".{name}.tmp-{secrets.token_hex(8)}"


_TEMP_ATTEMPTS = 16


def write_atomically(path: Path, data: bytes | list[bytes], ops: DiskOps = DISK, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order) so
    that a crash at any moment leaves either the old or the new file, never
    a mix; runs in a thread. A symlink stays a symlink: the file it points
    to is replaced, in its own directory. A failure before the rename
    leaves no temporary file; one after it raises ``DirectorySyncError``."""
    target = Path(os.path.realpath(path))
    directory = target.parent
    for _ in range(_TEMP_ATTEMPTS):
        tmp = directory / _temp_name(target.name)
        try:
            # O_EXCL | O_NOFOLLOW: never write through anything found there.
            fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))
    try:
        try:
            write_all(ops, fd, [data] if isinstance(data, bytes) else data)
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(tmp, target)
    except BaseException:
        try:
            ops.unlink(tmp)
        except OSError:
            pass
        raise
    sync_directory(ops, directory)
