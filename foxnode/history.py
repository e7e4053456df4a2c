"""History: what the node keeps of the messages it has seen, and the ops
that read it back (PROTOCOL.md "History and catch-up").

Gossip hands every new envelope to ``History.record`` (its JSON as it
travelled); the message store (msgstore.py) holds it until it expires.
Adds are committed once per reactor turn, together; ``publish`` answers
only once its envelope is committed (fsynced).

- ``history``: a page of stored messages on some topics, oldest first,
  filtered and opened as ``subscribe`` would (``key``, ``from``,
  ``min_pow``), with a cursor for the next page.
- ``subscribe`` (and ``filter``) with ``since``: the subscription is live
  from the moment it is made, but what it would receive is held back while
  the stored messages from ``since`` up to that moment are sent; then the
  held ones follow. A stored message arrived after that moment is not
  replayed (it went, or goes, live), one before is not live: no gap, no
  duplicate. The replay goes at the pace the reader reads, a page at a
  time, so a long history does not fill its send queue.

Catch-up between peers (catchup.py) reads the store through ``buckets``,
``ids_between`` and ``rows``.
"""

from __future__ import annotations

import base64
import math
import sqlite3
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import orjson
from twisted.internet.defer import Deferred

from foxnode import codec, logs
from foxnode.config import HistoryConfig
from foxnode.msgstore import MessageStore, Row

if TYPE_CHECKING:
    from foxnode.gossip import Envelope, Gossip, Subscription

log = logs.logger(__name__)

_CURSOR_PREFIX = "h1:"


def encode_cursor(created: float, seq: int) -> str:
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(orjson.dumps([created, seq])).decode("ascii").rstrip("=")


def decode_cursor(text: Any) -> tuple[float, int] | None:
    """The position a cursor of ours names; None for anything else."""
    if not isinstance(text, str) or not text.startswith(_CURSOR_PREFIX) or len(text) > 100:
        return None
    body = text[len(_CURSOR_PREFIX):]
    try:
        created, seq = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError):
        return None
    if (not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created)
            or not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63):
        return None
    return float(created), seq


def _time_arg(args: dict, name: str) -> float | None | codec.Reply:
    if name not in args:
        return None
    value = args[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return codec.Reply(400, f'"{name}" must be a time in unix seconds (a number, 0 or more)')
    return float(value)


def since_arg(op: str, args: dict) -> float | None | codec.Reply:
    """``since`` of subscribe/filter: None when absent, or the refusal."""
    value = _time_arg(args, "since")
    if isinstance(value, codec.Reply):
        return codec.bad_args(op, value.error)
    return value


class History:
    """The node's message store, as gossip and the ops see it."""

    def __init__(self, reactor: Any, store: MessageStore, gossip: "Gossip", metrics: Any,
                 config: HistoryConfig | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.gossip = gossip
        self.metrics = metrics
        self.config = config or HistoryConfig()
        #: catch-up's summary: time bucket -> [envelopes, XOR of their ids]
        self._buckets: dict[int, list[int]] = {}
        for message_id, created in store.all_ids():
            self._count(message_id, created, +1)
        #: ids of this node's publishes kept and not yet delivered (gossip
        #: accepts them a turn after the commit): a ``since`` replay leaves
        #: them to their live delivery, or it would send them twice
        self.undelivered: set[str] = set()
        #: Deferreds of publishes waiting for this turn's commit
        self._waiting: list[Deferred] = []
        self._commit_call: Any = None
        #: a commit failed: the store takes nothing more until the node restarts
        self.broken: str | None = None
        self.ops = {"history": self.op_history}
        gossip.history = self
        metrics.history_messages.set_function(lambda: self.store.count)
        metrics.history_bytes.set_function(lambda: self.store.bytes)

    # -- keeping ---------------------------------------------------------------

    def record(self, envelope: "Envelope", encoded: bytes, durable: bool = False) -> bool:
        """Keep ``envelope`` (``encoded``: its JSON); False if it is kept
        already. Committed at the end of this turn."""
        if self.broken is not None or self.store.closed:
            return True  # not kept, but new as far as anyone can tell
        try:
            added = self.store.add(envelope.id, envelope.topic, envelope.created, envelope.expires,
                                   encoded, durable=durable)
            if not added:
                return False
            self._count(envelope.id, envelope.created, +1)
            if self.store.bytes > self.store.max_bytes:
                # A disk full shows here too (a DELETE writes): the same break.
                for message_id, created in self.store.evict():
                    self._count(message_id, created, -1)
                    self.metrics.history_evicted.inc()
        except sqlite3.Error as e:
            self._break(e)
            return True
        self._schedule_commit()
        return True

    def committed(self) -> Deferred:
        """Fires once what was recorded so far is on disk; fails if it
        cannot be (the reply to a publish waits for it)."""
        d: Deferred = Deferred()
        if self.broken is not None:
            d.errback(RuntimeError(self.broken))
            return d
        self._waiting.append(d)
        self._schedule_commit()
        return d

    def _schedule_commit(self) -> None:
        if self._commit_call is None:
            self._commit_call = self.reactor.callLater(0, self.commit)

    def commit(self) -> None:
        self._commit_call = None
        waiting, self._waiting = self._waiting, []
        try:
            self.store.commit()
        except sqlite3.Error as e:
            self._break(e)
            for d in waiting:
                d.errback(RuntimeError(self.broken))
            return
        for d in waiting:
            d.callback(None)

    def _break(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = str(error)
            log.error("message store {path} cannot be written ({why}); messages pass on but are no longer kept, and publish "
                      "answers 503, until the node is restarted", path=self.store.path, why=self.broken)

    def sweep(self) -> None:
        """Forget the expired envelopes (a timer of the service tree)."""
        if self.broken is not None or self.store.closed:
            return
        try:
            for message_id, created in self.store.sweep(self.reactor.seconds()):
                self._count(message_id, created, -1)
        except sqlite3.Error as e:
            self._break(e)
            return
        self._schedule_commit()

    def close(self) -> None:
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        if not self.store.closed:
            try:
                self.commit()
            finally:
                self.store.close()

    # -- catch-up's view -------------------------------------------------------

    def _count(self, message_id: str, created: float, delta: int) -> None:
        bucket = int(created // self.config.bucket_seconds)
        entry = self._buckets.get(bucket)
        if entry is None:
            entry = self._buckets[bucket] = [0, 0]
        entry[0] += delta
        entry[1] ^= int(message_id[:32], 16)
        if not entry[0]:
            del self._buckets[bucket]

    def buckets(self) -> dict[int, tuple[int, str]]:
        """Time bucket -> (envelopes held, digest of their ids)."""
        return {b: (n, f"{x:032x}") for b, (n, x) in self._buckets.items()}

    def ids_in(self, bucket: int) -> list[str]:
        width = self.config.bucket_seconds
        return self.store.ids_between(bucket * width, (bucket + 1) * width, self.reactor.seconds())

    def ids_page(self, bucket: int, after: tuple[float, int] | None, limit: int) -> list[tuple[str, float, int]]:
        width = self.config.bucket_seconds
        return self.store.ids_page(bucket * width, (bucket + 1) * width, self.reactor.seconds(), after, limit)

    def rows(self, ids: Iterable[str]) -> Iterator[Row]:
        return self.store.get(ids, self.reactor.seconds())

    def has(self, message_id: str) -> bool:
        return self.store.has(message_id)

    # -- history ---------------------------------------------------------------

    def op_history(self, conn: Any, args: Any) -> codec.Reply:
        selection = self.gossip.selection_args("history", args)
        if isinstance(selection, codec.Reply):
            return selection
        topics, key, senders, min_pow = selection
        since, until = _time_arg(args, "since"), _time_arg(args, "until")
        for value in (since, until):
            if isinstance(value, codec.Reply):
                return codec.bad_args("history", value.error)
        since = 0.0 if since is None else since
        until = math.inf if until is None else until
        limit = args.get("limit", self.config.default_limit)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= self.config.max_limit:
            return codec.bad_args("history", f'"limit" must be a whole number from 1 to {self.config.max_limit}')
        after = None
        if args.get("cursor") is not None:
            after = decode_cursor(args["cursor"])
            if after is None:
                return codec.bad_args("history", '"cursor" must be the "cursor" of an earlier history reply')
        try:
            return self._history_page(topics, since, until, limit, after, key, senders, min_pow)
        except sqlite3.Error as e:
            log.error("history: the message store {path} cannot be read ({why})", path=self.store.path, why=e)
            return codec.unavailable(f"The message store cannot be read ({e}); retry later.")

    def _history_page(self, topics: list[str], since: float, until: float, limit: int,
                      after: tuple[float, int] | None, key: str | None, senders: frozenset[str] | None,
                      min_pow: float) -> codec.Reply:
        budget = self.config.page_bytes
        out: list[orjson.Fragment] = []
        size = scanned = scanned_bytes = 0
        now = self.reactor.seconds()
        while True:
            ask = min(max(limit, 100), self.config.scan_rows - scanned)
            rows = self.store.page(topics, since, until, now, after=after, limit=ask)
            stop = None
            for row in rows:
                frame = self._event(row, key, senders, min_pow, None)
                if frame is not None:
                    if out and size + len(frame) > budget:
                        stop = "full"  # this one opens the next page
                        break
                    out.append(orjson.Fragment(frame))
                    size += len(frame)
                scanned += 1
                scanned_bytes += len(row.envelope)
                after = (row.created, row.seq)
                if (len(out) >= limit or scanned >= self.config.scan_rows
                        or scanned_bytes >= self.config.scan_bytes):
                    stop = "enough"
                    break
            if stop == "full":
                more = True
            elif stop == "enough":
                # Anything past this page at all? One row says.
                more = bool(self.store.page(topics, since, until, now, after=after, limit=1))
            elif len(rows) < ask:
                more = False
            else:
                continue
            break
        return codec.ok({"messages": out, "cursor": encode_cursor(*after) if more and after else None})

    def _event(self, row: Row, key: str | None, senders: frozenset[str] | None, min_pow: float,
               sub_id: str | None) -> bytes | None:
        """The event frame a subscription with these filters gets of a
        stored envelope; None when it gets nothing."""
        from foxnode.gossip import Envelope

        envelope, payload = Envelope.stored(row.envelope)
        return self.gossip.event_frame(envelope, payload, key, senders, min_pow, sub_id)

    # -- since -----------------------------------------------------------------

    def replay(self, sub: "Subscription", since: float) -> None:
        """Send ``sub`` the stored messages from ``since`` up to now, then
        what it got meanwhile (``sub.held``, which gossip fills until then)."""
        sub.held = []
        sub.skipped = set()
        upto = self.store.last_seq
        self.reactor.callLater(0, self._replay, sub, since, upto, None)

    def _replay(self, sub: "Subscription", since: float, upto: int, after: tuple[float, int] | None) -> None:
        if sub.held is None:
            return  # its connection closed
        if not sub.topics:
            self._release(sub)  # unsubscribed
            return
        try:
            self._replay_rows(sub, since, upto, after)
        except sqlite3.Error as e:
            # Not the replay, but not a subscription held back for ever either: it goes live.
            log.error("since: the message store {path} cannot be read ({why}); the subscription goes live "
                      "without the rest of its replay", path=self.store.path, why=e)
            held = sub.held or []
            self._release(sub)
            for _, frame in held:
                self._send(sub, frame)

    def _replay_rows(self, sub: "Subscription", since: float, upto: int, after: tuple[float, int] | None) -> None:
        conn = sub.conn
        batch = self.config.replay_batch
        rows = self.store.page(sorted(sub.topics), since, math.inf, self.reactor.seconds(),
                               after=after, upto_seq=upto, limit=batch)
        for row in rows:
            if not _has_room(conn):
                if conn.can_send():
                    self.reactor.callLater(self.config.replay_wait, self._replay, sub, since, upto, after)
                return
            after = (row.created, row.seq)
            if row.id in self.undelivered:
                # A publish of this node, kept but not yet delivered:
                # it comes live (held now, or after the replay).
                sub.skipped.add(row.id)
                continue
            frame = self._event(row, sub.key, sub.senders, sub.min_pow, sub.id)
            if frame is not None:
                self._send(sub, frame)
        if len(rows) == batch:
            # A batch a turn: a long history does not hold the reactor.
            self.reactor.callLater(0, self._replay, sub, since, upto, after)
            return
        # Then what came live meanwhile, but for what the replay sent (a
        # publish of this node is kept a turn before it is delivered).
        held, skipped = sub.held, sub.skipped or set()
        self._release(sub)
        for message_id, frame in held:
            seq = self.store.seq_of(message_id)
            if seq is None or seq > upto or message_id in skipped:
                self._send(sub, frame)

    def _release(self, sub: "Subscription") -> None:
        """The replay is over: ``sub`` holds nothing more back."""
        state = sub.conn.fox_state
        state["held_bytes"] = max(0, state.get("held_bytes", 0) - sub.held_bytes)
        sub.held, sub.skipped, sub.held_bytes = None, None, 0

    def _send(self, sub: "Subscription", frame: bytes) -> None:
        if sub.conn.send_frame(frame, droppable=True):
            self.metrics.gossip_delivered.inc()
        else:
            self.metrics.send_dropped.labels("subscriber").inc()


def _has_room(conn: Any) -> bool:
    """Whether ``conn`` takes more frames now without queueing them: a
    connection while its reader keeps up; a polled filter while it holds
    less than its bounds (filters.py)."""
    has_room = getattr(conn, "has_room", None)
    return has_room is None or has_room()
