"""The foxchain ledger: every block a node accepted, in one SQLite file
(``chain.sqlite`` in the plugin's data directory), and its best chain.

Fork choice: the best chain ends at the block with the most cumulative
work (the sum of ``2**difficulty`` from the genesis block on); between
equal work, the lower hash. Every node that holds the same blocks picks
the same head, whatever order they came in. A block whose head is better
than the current one becomes the head; the best chain is re-marked from
where the two forks meet (a reorg), in one transaction.

A block joins the ledger only onto a parent it holds, one height above it,
no earlier than it: the ledger keeps no orphans (a node that meets one
fetches the chain it belongs to from its peers instead).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterable

from foxnode.plugins.chain.block import FIELDS, GENESIS, Invalid, canonical, work

FILE = "chain.sqlite"
#: what ``add`` says of a block
KNOWN, SIDE, HEAD, ORPHAN = "known", "side", "head", "orphan"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    hash TEXT PRIMARY KEY,
    height INTEGER NOT NULL,
    prev TEXT NOT NULL,
    time INTEGER NOT NULL,
    data TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    difficulty INTEGER NOT NULL,
    work INTEGER NOT NULL,
    best INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS best_by_height ON blocks (best, height);
"""


class LedgerError(Exception):
    """The ledger's file cannot be used; the message is one line."""


def _row(row: sqlite3.Row | tuple) -> dict[str, Any]:
    h, height, prev, time, data, nonce, difficulty, cumulative = row
    return {"height": height, "prev": prev, "time": time, "data": json.loads(data), "nonce": nonce,
            "difficulty": difficulty, "hash": h, "work": cumulative}


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Is the chain ending at ``a`` better than the one ending at ``b``?"""
    return (a["work"], _low(a["hash"])) > (b["work"], _low(b["hash"]))


def _low(digest: str) -> int:
    return -int(digest, 16)


_COLUMNS = "hash, height, prev, time, data, nonce, difficulty, work"


class Ledger:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._head = self._best_head()

    @classmethod
    def open(cls, path: str) -> "Ledger":
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            ledger = cls(db)
            if ledger.get(GENESIS["hash"]) is None:
                g = GENESIS
                db.execute(f"INSERT INTO blocks ({_COLUMNS}, best) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                           (g["hash"], 0, g["prev"], g["time"], canonical(g["data"]).decode(), 0, 0,
                            work(0)))
                ledger._head = ledger._best_head()
            return ledger
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{path}: not a foxchain ledger ({e})") from None

    def close(self) -> None:
        self.db.close()

    # -- reading -------------------------------------------------------------------

    def _best_head(self) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM blocks WHERE best = 1 ORDER BY height DESC LIMIT 1"
                              ).fetchone()
        return _row(row) if row else None

    def head(self) -> dict[str, Any]:
        """The head of the best chain (with its cumulative ``work``)."""
        assert self._head is not None
        return dict(self._head)

    def get(self, digest: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM blocks WHERE hash = ?", (digest,)).fetchone()
        return _row(row) if row else None

    def at(self, height: int) -> dict[str, Any] | None:
        """The best chain's block at ``height``."""
        row = self.db.execute(f"SELECT {_COLUMNS} FROM blocks WHERE best = 1 AND height = ?",
                              (height,)).fetchone()
        return _row(row) if row else None

    def recent(self, count: int) -> list[dict[str, Any]]:
        """The best chain's last ``count`` blocks, newest first."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM blocks WHERE best = 1 ORDER BY height DESC LIMIT ?",
                               (count,)).fetchall()
        return [_row(r) for r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM blocks").fetchone()[0]

    def locator(self) -> list[str]:
        """Hashes of the best chain, head first, then ever sparser back to
        the genesis block (1, 2, 4, 8 ... below): at most about 64 for any
        chain, and whoever holds more finds where we part."""
        height = self._head["height"]
        heights, step = [], 1
        while height > 0:
            heights.append(height)
            if len(heights) >= 10:
                step *= 2
            height -= step
        heights.append(0)
        found = []
        for h in heights:
            block = self.at(h)
            if block is not None:
                found.append(block["hash"])
        return found

    def after(self, locator: Iterable[str], limit: int) -> list[dict[str, Any]]:
        """The best chain's blocks after the first hash of ``locator`` on
        it (after the genesis block if none is), oldest first, ``limit`` at most."""
        start = 0
        for digest in locator:
            row = self.db.execute("SELECT height FROM blocks WHERE hash = ? AND best = 1", (digest,)).fetchone()
            if row:
                start = row[0]
                break
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM blocks WHERE best = 1 AND height > ? "
                               "ORDER BY height LIMIT ?", (start, limit)).fetchall()
        return [_row(r) for r in rows]

    # -- writing -------------------------------------------------------------------

    def add(self, block: dict[str, Any]) -> str:
        """Take ``block`` (checked on its own already: block.check): KNOWN,
        ORPHAN (its parent is not here; nothing kept), SIDE (kept, not on
        the best chain) or HEAD (the new head); ``Invalid`` if it does not
        fit its parent."""
        digest = block["hash"]
        if self.get(digest) is not None:
            return KNOWN
        parent = self.get(block["prev"])
        if parent is None:
            return ORPHAN
        if block["height"] != parent["height"] + 1:
            raise Invalid(f'"height" is {block["height"]}, its parent\'s is {parent["height"]}: '
                          f'it must be {parent["height"] + 1}')
        if block["time"] < parent["time"]:
            raise Invalid('"time" is earlier than its parent\'s')
        cumulative = parent["work"] + work(block["difficulty"])
        row = {k: block[k] for k in FIELDS}
        new = {**row, "hash": digest, "work": cumulative}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(f"INSERT INTO blocks ({_COLUMNS}, best) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                            (digest, row["height"], row["prev"], row["time"], canonical(row["data"]).decode(),
                             row["nonce"], row["difficulty"], cumulative))
            outcome = SIDE
            if better(new, self._head):
                self._reorg(new)
                outcome = HEAD
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            self._head = self._best_head()
            raise
        if outcome == HEAD:
            self._head = new
        return outcome

    def _reorg(self, new: dict[str, Any]) -> None:
        """Mark the chain ending at ``new`` best: walk back to where it meets
        the best chain, unmark the best chain above that, mark the walk."""
        path = []
        cursor = new
        while True:
            row = self.db.execute("SELECT best, prev, height FROM blocks WHERE hash = ?", (cursor["hash"],)
                                  ).fetchone()
            if row[0] == 1:
                fork = row[2]
                break
            path.append(cursor["hash"])
            cursor = {"hash": row[1]}
        self.db.execute("UPDATE blocks SET best = 0 WHERE best = 1 AND height > ?", (fork,))
        self.db.executemany("UPDATE blocks SET best = 1 WHERE hash = ?", [(h,) for h in path])
