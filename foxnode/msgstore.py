"""The message store: every unexpired envelope the node has seen, in SQLite.

One file in the data directory, ``messages.sqlite``, in WAL mode, written
and read on the reactor's thread by one connection, so a read sees every
envelope added before it, committed or not (history and ``since`` replays
need no second view of what is on its way to the disk). Adds are grouped
into one transaction per reactor turn (history.py commits); a transaction
that holds an envelope published here is committed with
``synchronous=FULL`` (fsynced before ``publish`` answers 202), others with
``NORMAL`` (in the WAL, so a kill -9 loses nothing; a power cut may lose
the last of what was only forwarded, which peers hand back at catch-up).

What it holds, and the bounds: one row per envelope (its JSON as it
travelled, sealed content and all: the store never sees a plaintext it
could not see on the wire), until the envelope expires (swept) or until
the rows' bytes pass ``max_bytes``, when the envelopes nearest their end go
first. A row's bytes are its JSON plus ``ROW_OVERHEAD`` for the indexes.

A file that is not SQLite, or SQLite of another application or format, or
that fails SQLite's quick check, is refused with one line and left as it
was: the node does not start on it.

Order. Rows are read oldest first by ``(created, seq)``, ``seq`` the order
of arrival; a cursor is that pair, so pages neither repeat nor skip a row
whatever is added meanwhile (a row added behind a cursor was not there
when the reader passed that point: a ``since`` replay or a later
``history`` finds it).
"""

from __future__ import annotations

import heapq
import os
import sqlite3
from typing import Iterable, Iterator, NamedTuple

from foxnode import logs

log = logs.logger(__name__)

STORE_FILE = "messages.sqlite"
#: ``PRAGMA application_id``: "foxm", so another program's database is told apart
APPLICATION_ID = 0x666F786D
FORMAT = 1
#: what a row costs beside its envelope's JSON: the id, topic and times
#: again in three indexes, and SQLite's own bookkeeping (measured: about
#: 300 bytes for a 64-hex id and a short topic)
ROW_OVERHEAD = 400

_SCHEMA = """
CREATE TABLE envelopes (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    size INTEGER NOT NULL,
    envelope BLOB NOT NULL
);
CREATE INDEX envelopes_by_topic ON envelopes (topic, created, seq);
CREATE INDEX envelopes_by_created ON envelopes (created, seq);
CREATE INDEX envelopes_by_expiry ON envelopes (expires);
"""


class MessageStoreError(Exception):
    """The message store cannot be used; ``str()`` is the one line to say."""


class Row(NamedTuple):
    seq: int
    id: str
    topic: str
    created: float
    expires: float
    envelope: bytes


class MessageStore:
    """The SQLite file and its bookkeeping; no clock, no reactor (times
    are passed in), no knowledge of gossip beyond an envelope's id, topic,
    times and JSON."""

    def __init__(self, db: sqlite3.Connection, path: str, max_bytes: int) -> None:
        self._db = db
        self.path = path
        self.max_bytes = max_bytes
        row = db.execute("SELECT count(*), coalesce(sum(size), 0), coalesce(max(seq), 0) FROM envelopes").fetchone()
        #: rows held and their bytes (ROW_OVERHEAD each included)
        self.count, self.bytes, self.last_seq = row
        #: a transaction is open (adds not yet committed)
        self._dirty = False
        self._durable = False
        self.closed = False

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str, max_bytes: int) -> "MessageStore":
        """Open or create the store at ``path``; ``MessageStoreError`` if it
        is not ours or not sound (the file is left as it was)."""
        check_file(path)
        try:
            # A lock held by another program fails a write at once rather
            # than holding the reactor for the default 5 s.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=True, timeout=0.05)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                # New (checked empty above): make it ours in one transaction.
                db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={FORMAT}")
                db.execute("COMMIT")
        except sqlite3.Error as e:
            raise MessageStoreError(f"message store {path}: {e}") from None
        return cls(db, path, max_bytes)

    # -- writing ---------------------------------------------------------------

    def add(self, message_id: str, topic: str, created: float, expires: float, envelope: bytes,
            durable: bool = False) -> bool:
        """Hold one envelope (``envelope`` its JSON); False if it is held
        already. Committed by ``commit`` (a ``durable`` one with an fsync)."""
        if durable and not self._durable:
            # The safety level is set outside a transaction: what is open
            # is committed as it was, and a durable one begins.
            self.commit()
            self._db.execute("PRAGMA synchronous=FULL")
            self._durable = True
        self._begin()
        size = len(envelope) + ROW_OVERHEAD
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO envelopes (id, topic, created, expires, size, envelope) VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, topic, created, expires, size, envelope))
        if cursor.rowcount != 1:
            return False
        self.count += 1
        self.bytes += size
        self.last_seq = cursor.lastrowid
        return True

    def evict(self) -> list[tuple[str, float]]:
        """Drop the envelopes nearest their end until the store is within
        ``max_bytes``; the (id, created) of those dropped."""
        gone: list[tuple[str, float]] = []
        while self.bytes > self.max_bytes and self.count:
            self._begin()
            excess = self.bytes - self.max_bytes
            # A batch at a time, enough to cover the excess at the mean size.
            batch = max(1, min(1000, -(-excess * self.count // max(1, self.bytes))))
            rows = self._db.execute(
                "DELETE FROM envelopes WHERE seq IN (SELECT seq FROM envelopes ORDER BY expires, seq LIMIT ?) "
                "RETURNING id, created, size", (batch,)).fetchall()
            for message_id, created, size in rows:
                self.count -= 1
                self.bytes -= size
                gone.append((message_id, created))
        return gone

    def sweep(self, now: float) -> list[tuple[str, float]]:
        """Drop the envelopes expired by ``now``; the (id, created) of those."""
        self._begin()
        rows = self._db.execute("DELETE FROM envelopes WHERE expires < ? RETURNING id, created, size",
                                (now,)).fetchall()
        for _, _, size in rows:
            self.count -= 1
            self.bytes -= size
        return [(message_id, created) for message_id, created, _ in rows]

    def commit(self) -> None:
        """Commit what was added since the last commit: fsynced when a
        durable add is among it."""
        try:
            if self._dirty:
                self._db.execute("COMMIT")
        finally:
            self._dirty = False
            if self._durable:
                self._durable = False
                self._db.execute("PRAGMA synchronous=NORMAL")

    def _begin(self) -> None:
        if not self._dirty:
            self._db.execute("BEGIN")
            self._dirty = True

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.commit()
        finally:
            self.closed = True
            self._db.close()

    # -- reading ---------------------------------------------------------------

    def has(self, message_id: str) -> bool:
        return self.seq_of(message_id) is not None

    def seq_of(self, message_id: str) -> int | None:
        """When ``message_id`` arrived (its ``seq``), if it is held."""
        row = self._db.execute("SELECT seq FROM envelopes WHERE id = ?", (message_id,)).fetchone()
        return row[0] if row is not None else None

    def page(self, topics: Iterable[str], since: float, until: float, now: float,
             after: tuple[float, int] | None = None, upto_seq: int | None = None,
             limit: int = 100) -> list[Row]:
        """Unexpired envelopes on ``topics`` created from ``since`` to
        ``until``, oldest first, past the position ``after`` (a row's
        ``(created, seq)``), arrived no later than ``upto_seq``.

        What it costs is the page, not the store: each topic is read along
        its own index, from the cursor on (the position of each of them,
        then the envelopes of the first ``limit`` of all), so topics with
        little in them beside a busy one, or a cursor deep in a long topic,
        scan no more than they return."""
        topics = list(dict.fromkeys(topics))
        if not topics:
            return []
        where = ["topic = ? AND created <= ? AND expires >= ?"]
        params: list = [until, now]
        if after is None or since > after[0]:
            where.append("AND created >= ?")  # all of the range is past the cursor
            params.append(since)
        else:
            # "created >= ?" apart, so that the index is entered at the cursor.
            where.append("AND created >= ? AND (created > ? OR seq > ?)")
            params += [after[0], after[0], after[1]]
        if upto_seq is not None:
            where.append("AND seq <= ?")
            params.append(upto_seq)
        condition = " ".join(where)
        if len(topics) == 1:
            return [Row(*r) for r in self._db.execute(
                f"SELECT seq, id, topic, created, expires, envelope FROM envelopes INDEXED BY envelopes_by_topic "
                f"WHERE {condition} ORDER BY created, seq LIMIT ?", (topics[0], *params, limit))]
        positions = heapq.nsmallest(limit, (p for topic in topics for p in self._db.execute(
            f"SELECT created, seq FROM envelopes INDEXED BY envelopes_by_topic "
            f"WHERE {condition} ORDER BY created, seq LIMIT ?", (topic, *params, limit))))
        seqs = [seq for _, seq in positions]
        rows: list[Row] = []
        for i in range(0, len(seqs), 500):  # within any SQLite's count of variables
            chunk = seqs[i:i + 500]
            rows += (Row(*r) for r in self._db.execute(
                f"SELECT seq, id, topic, created, expires, envelope FROM envelopes "
                f"WHERE seq IN ({','.join('?' * len(chunk))}) ORDER BY created, seq", chunk))
        return rows

    def ids_between(self, start: float, end: float, now: float) -> list[str]:
        """Ids of the unexpired envelopes created in ``[start, end)``."""
        return [r[0] for r in self._db.execute(
            "SELECT id FROM envelopes WHERE created >= ? AND created < ? AND expires >= ? ORDER BY created, seq",
            (start, end, now))]

    def ids_page(self, start: float, end: float, now: float, after: tuple[float, int] | None,
                 limit: int) -> list[tuple[str, float, int]]:
        """(id, created, seq) of the unexpired envelopes created in
        ``[start, end)``, oldest first, past the position ``after``: a
        long listing read a frame at a time."""
        sql = "SELECT id, created, seq FROM envelopes WHERE created >= ? AND created < ? AND expires >= ?"
        params: list = [start, end, now]
        if after is not None:
            sql += " AND created >= ? AND (created > ? OR seq > ?)"
            params += [after[0], after[0], after[1]]
        return self._db.execute(sql + " ORDER BY created, seq LIMIT ?", (*params, limit)).fetchall()

    def get(self, ids: Iterable[str], now: float) -> Iterator[Row]:
        """The unexpired envelopes among ``ids`` that are held."""
        ids = list(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            yield from (Row(*r) for r in self._db.execute(
                f"SELECT seq, id, topic, created, expires, envelope FROM envelopes "
                f"WHERE id IN ({','.join('?' * len(chunk))}) AND expires >= ? ORDER BY created, seq",
                (*chunk, now)))

    def all_ids(self) -> Iterator[tuple[str, float]]:
        """(id, created) of every envelope held, for the catch-up summary."""
        yield from self._db.execute("SELECT id, created FROM envelopes")


def check_file(path: str) -> None:
    """Refuse (``MessageStoreError``) a file at ``path`` that is not a
    sound message store; nothing there, or an empty file, is fine."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        _check(path)


def _check(path: str) -> None:
    """Refuse, in one line, a file that is not a sound foxnode message
    store; opened read-only, so nothing of it changes."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise MessageStoreError(f"message store {path}: cannot open it ({e})") from None
    try:
        app, version = (db.execute("PRAGMA application_id").fetchone()[0],
                        db.execute("PRAGMA user_version").fetchone()[0])
        if app != APPLICATION_ID:
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables or app:
                raise MessageStoreError(
                    f"message store {path}: a database of another program, not foxnode's; "
                    "move it away (it is left as it is)")
            return
        if version != FORMAT:
            raise MessageStoreError(f"message store {path}: format {version}, this foxnode reads {FORMAT}")
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise MessageStoreError(f"message store {path}: damaged ({verdict}); move it away "
                                    "to start with an empty one (it is left as it is)")
    except sqlite3.DatabaseError as e:
        raise MessageStoreError(f"message store {path}: not a message store ({e}); move it away "
                                "(it is left as it is)") from None
    finally:
        db.close()
