"""Catch-up: when a peer link comes up, the two nodes hand each other the
unexpired envelopes one has and the other lacks (PROTOCOL.md "History and
catch-up"), without sending what both have.

Each side summarizes its message store per time bucket of creation
(``bucket_seconds`` [60]): how many envelopes, and the XOR of their ids.
Summaries travel first (``sync``); both sides compare the same two of them
(the one received, and the one they sent), so they agree on which buckets
differ and, for each, on who lists: the side holding fewer envelopes in it
(on a tie, the lower node id). The lister sends the ids it holds in the
bucket (``sync_have``); the other side pushes what the lister lacks
(``sync_push``, envelopes in batches) and asks for what it lacks itself
(``sync_want``), which the lister pushes. Every list and batch is answered,
once pushed, with ``sync_done``; when none is outstanding, that side has
caught up, and another round starts only if a side said it had more than it
could queue. So a node back after an hour lists only the few ids it has and
receives what it missed; two nodes that hold the same send a summary each.

Peer frames (after ``hello``, budgeted as every peer event is):
``{"event": "sync", "buckets": [[bucket, count, digest], ...]}``,
``{"event": "sync_have", "bucket": b, "ids": [...], "last": bool}``,
``{"event": "sync_want", "ids": [...]}``,
``{"event": "sync_push", "envelopes": [...]}``, ``{"event": "sync_done", "more": bool}``.

Pushed envelopes are taken only as answers: an id this node asked for, or
one of a bucket it listed, up to the count the pusher's summary gave. Each
is checked as gossip checks any (bad ones are held against the peer),
kept, delivered once (the seen ids and the store both say what came
already), and announced to the other peers by id (``ihave``), so what a
partition kept from one side spreads when it heals. Sending waits for the
connection to drain (``has_room``), so pushes never fill a send queue.

Bounds (HistoryConfig): per link, at most ``max_push_queue`` ids queued to
push and ``max_wanted`` ids awaited; a sync of at most 10,000 buckets; id
lists of at most ``sync_ids`` per frame.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from foxnode import codec, logs
from foxnode.config import HistoryConfig
from foxnode.gossip import is_message_id
from foxnode.limits import TokenBucket

if TYPE_CHECKING:
    from foxnode.gossip import Gossip
    from foxnode.history import History

log = logs.logger(__name__)

MAX_BUCKETS = 10_000


class _Done:
    """A mark in a push queue: so many ``sync_done`` to send there, one per
    list or want answered. Marks in a row are one, counted: wants that add
    no id (from a peer that asks for nothing, and reads nothing) do not
    grow the queue."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 1


def _mark(queue: deque) -> None:
    if queue and isinstance(queue[-1], _Done):
        queue[-1].n += 1
    else:
        queue.append(_Done())


@attrs.define(eq=False)
class Sync:
    """Catch-up with one peer connection."""

    conn: Any
    started: float
    round: int = 1
    #: the summary this side sent: bucket -> (count, digest)
    sent: dict[int, tuple[int, str]] = attrs.Factory(dict)
    #: the peer's summary has been answered
    answered: bool = False
    #: lists and wants sent and not yet answered with sync_done
    outstanding: int = 0
    #: envelopes the peer may still push, per bucket this side listed
    allowance: dict[int, int] = attrs.Factory(dict)
    #: ids asked for and not yet pushed
    wanted: set[str] = attrs.Factory(set)
    #: the ids the peer is listing, per bucket, until its last frame of it
    listing: dict[int, set[str]] = attrs.Factory(dict)
    #: the buckets the peer is to list (the compared summaries say so),
    #: and how many times (once per round that found them different),
    #: until its last frame of each: a list of any other is not answered
    expected: dict[int, int] = attrs.Factory(dict)
    #: ids this side listed and the peer has not yet asked for: what its
    #: wants may name at most (a want is an answer to a list)
    listed: int = 0
    #: ids to push, and _Done marks (one per list or want answered)
    queue: deque = attrs.Factory(deque)
    #: lists and wants to send, sent as the connection drains (a list of
    #: a full minute is more than a send queue holds): ("have", bucket,
    #: the position listed up to) or ("want", ids)
    outbox: deque = attrs.Factory(deque)
    pumping: Any = None
    #: the peer said it had more than it could queue
    more: bool = False
    #: this side could not queue all it should have pushed
    truncated: bool = False
    received: int = 0
    done: bool = False
    #: envelopes this side may push now: the peer's budget as this node's
    #: own (--peer-rate, --peer-burst), a little under it
    tokens: Any = None
    #: pushed envelopes dropped over the peer's budget: another round then
    over_budget: int = 0


class Catchup:
    """Catch-up for one node, on its gossip and its history."""

    def __init__(self, reactor: Any, gossip: "Gossip", history: "History", node_id: str, metrics: Any,
                 config: HistoryConfig | None = None, budget: tuple[float, float] = (1000.0, 5000.0)) -> None:
        self.reactor = reactor
        self.gossip = gossip
        self.history = history
        self.node_id = node_id
        self.metrics = metrics
        self.config = config or HistoryConfig()
        self.syncs: dict[Any, Sync] = {}
        #: a peer's budget of events (``--peer-rate``, ``--peer-burst``):
        #: pushes are paced within it, each envelope counted as one event
        self.budget = budget
        self.events = {"sync": self.on_sync, "sync_have": self.on_have, "sync_want": self.on_want,
                       "sync_push": self.on_push, "sync_done": self.on_done}
        gossip.catchup = self

    # -- links -----------------------------------------------------------------

    def peer_up(self, conn: Any) -> None:
        rate, burst = self.budget
        sync = self.syncs[conn] = Sync(conn, self.reactor.seconds(),
                                       tokens=TokenBucket(rate * 0.9, max(1.0, burst * 0.9), self.reactor.seconds))
        self._send_summary(sync)
        early = conn.fox_state.pop("early_sync", None)
        if early is not None:
            self.on_sync(conn, early)

    def peer_down(self, conn: Any) -> None:
        sync = self.syncs.pop(conn, None)
        if sync is not None:
            sync.queue.clear()
            sync.outbox.clear()
            if sync.pumping is not None and sync.pumping.active():
                sync.pumping.cancel()
            if not sync.done and sync.received:
                log.info("catch-up with {peer} cut short: {n} envelopes received", peer=_peer(conn),
                         n=sync.received)
        try:
            self.metrics.catchup_envelopes.remove(_peer(conn))
        except KeyError:
            pass

    def stop(self) -> None:
        for conn in list(self.syncs):
            self.peer_down(conn)

    def _send_summary(self, sync: Sync) -> None:
        sync.sent = self.history.buckets()
        sync.answered = False
        self._send(sync, "sync", buckets=[[b, n, d] for b, (n, d) in sorted(sync.sent.items())])

    def _send(self, sync: Sync, name: str, **fields: Any) -> None:
        frame = codec.encode_event(name, **fields)
        self.metrics.catchup_bytes.labels("sent").inc(len(frame))
        sync.conn.send_frame(frame)

    # -- the summary -----------------------------------------------------------

    def on_sync(self, conn: Any, event: codec.Event) -> None:
        sync = self.syncs.get(conn)
        if sync is None:
            # Before this side's peer_up (the hello's reply still on its
            # way): taken up then. One frame, the last.
            conn.fox_state["early_sync"] = event
            return
        theirs = _summary(event.body.get("buckets"))
        if theirs is None:
            log.info("catch-up: a malformed sync from {peer}, ignored", peer=_peer(conn))
            return
        # Only the minutes an unexpired envelope can be from: a summary
        # naming others would have this side list for nothing.
        now, width, gossip_config = self.reactor.seconds(), self.config.bucket_seconds, self.gossip.config
        low = int((now - gossip_config.max_ttl - gossip_config.max_skew) // width)
        high = int((now + gossip_config.max_skew) // width)
        theirs = {b: v for b, v in theirs.items() if low <= b <= high}
        if sync.answered:
            # The peer starts another round: answered with a fresh summary,
            # against which both compare.
            if sync.round >= 2 * self.config.max_rounds:
                return
            sync.round += 1
            sync.done = False
            self._send_summary(sync)
        sync.answered = True
        mine = sync.sent
        for bucket in sorted(set(mine) | set(theirs)):
            my_n, my_digest = mine.get(bucket, (0, ""))
            their_n, their_digest = theirs.get(bucket, (0, ""))
            if my_digest == their_digest and my_n == their_n:
                continue
            if my_n < their_n or (my_n == their_n and self.node_id < conn.node_id):
                # This side lists; the peer pushes what it lacks.
                sync.allowance[bucket] = min(their_n, self.config.max_wanted)
                sync.outbox.append(("have", bucket, None))
                sync.outstanding += 1
            else:
                # The peer lists; this side answers that list once.
                sync.expected[bucket] = sync.expected.get(bucket, 0) + 1
        self._wake(sync)
        self._check_done(sync)

    def on_have(self, conn: Any, event: codec.Event) -> None:
        sync = self.syncs.get(conn)
        body = event.body
        bucket, ids, last = body.get("bucket"), body.get("ids"), body.get("last")
        if sync is None or not isinstance(bucket, int) or isinstance(bucket, bool) or not isinstance(ids, list):
            return
        if bucket not in sync.expected:
            # Not a bucket the summaries had the peer list, or listed
            # already: answering would push it all again (an amplifier).
            return
        listed = sync.listing.setdefault(bucket, set())
        room = self.config.max_wanted - sum(map(len, sync.listing.values()))
        listed.update(i for i in ids[:max(0, min(room, self.config.sync_ids))] if is_message_id(i))
        if not last:
            return
        del sync.listing[bucket]
        left = sync.expected.pop(bucket) - 1
        if left:
            sync.expected[bucket] = left
        mine = self.history.ids_in(bucket)
        theirs = listed
        lacking = [i for i in mine if i not in theirs]
        room = self.config.max_push_queue - len(sync.queue)
        if len(lacking) > room:
            lacking, sync.truncated = lacking[:max(0, room)], True
        sync.queue.extend(lacking)
        mine_set = set(mine)
        wants = [i for i in theirs if i not in mine_set and i not in self.gossip.seen]
        room = self.config.max_wanted - len(sync.wanted)
        if len(wants) > room:
            wants, sync.more = wants[:max(0, room)], True
        step = self.config.sync_ids
        for i in range(0, len(wants), step):
            chunk = wants[i:i + step]
            sync.wanted.update(chunk)
            sync.outbox.append(("want", chunk))
            sync.outstanding += 1
        _mark(sync.queue)
        self._wake(sync)

    def on_want(self, conn: Any, event: codec.Event) -> None:
        sync = self.syncs.get(conn)
        ids = event.body.get("ids")
        if sync is None or not isinstance(ids, list):
            return
        # Only as many as this side listed: a want answers a list, and
        # wants beyond would have it push again what it pushed already.
        ids = [i for i in ids[:min(self.config.sync_ids, sync.listed)] if is_message_id(i)]
        sync.listed -= len(ids)
        room = self.config.max_push_queue - len(sync.queue)
        if len(ids) > room:
            ids, sync.truncated = ids[:max(0, room)], True
        sync.queue.extend(ids)
        _mark(sync.queue)
        self._wake(sync)

    # -- pushing ---------------------------------------------------------------

    def _wake(self, sync: Sync) -> None:
        """Send what is queued now, unless a pump waits for the connection already."""
        if sync.pumping is None or not sync.pumping.active():
            self._pump(sync)

    def _pump(self, sync: Sync) -> None:
        sync.pumping = None
        conn = sync.conn
        if self.syncs.get(conn) is not sync:
            return
        step = self.config.sync_ids
        while sync.outbox and conn.has_room():
            item = sync.outbox.popleft()
            if item[0] == "want":
                self._send(sync, "sync_want", ids=item[1])
                continue
            _, bucket, after = item
            rows = self.history.ids_page(bucket, after, step + 1)
            ids = [r[0] for r in rows[:step]]
            last = len(rows) <= step
            self._send(sync, "sync_have", bucket=bucket, ids=ids, last=last)
            sync.listed += len(ids)
            if not last:
                sync.outbox.appendleft(("have", bucket, rows[step - 1][1:]))
        if sync.outbox:
            if conn.can_send():
                sync.pumping = self.reactor.callLater(self.config.replay_wait, self._pump, sync)
            return
        limit = min(self.config.push_bytes, conn.send_limit - 1024)
        while sync.queue and conn.has_room():
            head = sync.queue[0]
            if not isinstance(head, _Done) and not sync.tokens.take(
                    _ids_ahead(sync.queue, self.config.push_envelopes)):
                break
            if isinstance(head, _Done):
                head.n -= 1
                if not head.n:
                    sync.queue.popleft()
                self._send(sync, "sync_done", more=sync.truncated)
                sync.truncated = False
                continue
            ids = []
            while sync.queue and not isinstance(sync.queue[0], _Done) and len(ids) < self.config.push_envelopes:
                ids.append(sync.queue.popleft())
            batch: list[orjson.Fragment] = []
            size = 0
            for row in self.history.rows(ids):
                if batch and size + len(row.envelope) > limit:
                    self._push(sync, batch)
                    batch, size = [], 0
                if len(row.envelope) <= limit:
                    batch.append(orjson.Fragment(row.envelope))
                    size += len(row.envelope) + 1
            if batch:
                self._push(sync, batch)
        if sync.queue and conn.can_send():
            sync.pumping = self.reactor.callLater(self.config.replay_wait, self._pump, sync)


    def _push(self, sync: Sync, batch: list[orjson.Fragment]) -> None:
        self._send(sync, "sync_push", envelopes=batch)

    # -- receiving -------------------------------------------------------------

    def on_push(self, conn: Any, event: codec.Event) -> None:
        sync = self.syncs.get(conn)
        envelopes = event.body.get("envelopes")
        if sync is None or not isinstance(envelopes, list):
            return
        envelopes = envelopes[:self.config.push_envelopes]
        bucket_of_peer = getattr(conn, "peer_bucket", None)
        if len(envelopes) > 1 and bucket_of_peer is not None and not bucket_of_peer.take(len(envelopes) - 1):
            # Each envelope is one event of the peer's budget (the frame
            # itself was the first): over it, dropped, and asked again in
            # another round.
            sync.over_budget += len(envelopes)
            self.metrics.peer_events_dropped.inc(len(envelopes))
            return
        gossip, history = self.gossip, self.history
        width = self.config.bucket_seconds
        fresh: list[str] = []
        unasked = 0
        for raw in envelopes:
            message_id = raw.get("id") if isinstance(raw, dict) else None
            created = raw.get("created") if isinstance(raw, dict) else None
            if not is_message_id(message_id) or not isinstance(created, (int, float)) or isinstance(created, bool):
                unasked += 1
                continue
            if message_id in sync.wanted:
                sync.wanted.discard(message_id)
            else:
                bucket = int(created // width) if abs(created) < 1e15 else None
                if sync.allowance.get(bucket, 0) <= 0:
                    unasked += 1
                    continue
                sync.allowance[bucket] -= 1
            if message_id in gossip.seen or history.has(message_id):
                gossip.metrics.gossip_received.labels("duplicate").inc()
                continue
            envelope = gossip.check(conn, raw)
            if envelope is None:
                continue
            if gossip.accept(envelope, sender=conn, forward=False):
                gossip.metrics.gossip_received.labels("caught_up").inc()
                fresh.append(envelope.id)
        if unasked:
            log.info("catch-up: {n} envelopes from {peer} that were not asked for, ignored", n=unasked,
                     peer=_peer(conn))
        if fresh:
            sync.received += len(fresh)
            self.metrics.catchup_envelopes.labels(_peer(conn)).inc(len(fresh))
            # What this side lacked, the others may lack too: announced,
            # they ask for it as for any envelope (Plumtree's graft).
            for other, link in list(gossip.links.items()):
                if other is conn:
                    continue
                for i in range(0, len(fresh), 1000):
                    other.send_frame(codec.encode_event("ihave", ids=fresh[i:i + 1000]), droppable=True)

    def on_done(self, conn: Any, event: codec.Event) -> None:
        sync = self.syncs.get(conn)
        if sync is None or sync.outstanding <= 0:
            return
        sync.outstanding -= 1
        if event.body.get("more") is True:
            sync.more = True
        self._check_done(sync)

    def _check_done(self, sync: Sync) -> None:
        if sync.done or not sync.answered or sync.outstanding:
            return
        took = self.reactor.seconds() - sync.started
        self.metrics.catchup_seconds.observe(took)
        if sync.received:
            log.info("caught up with {peer}: {n} envelopes in {s:.2f} s", peer=_peer(sync.conn),
                     n=sync.received, s=took)
        sync.allowance.clear()
        sync.wanted.clear()
        sync.done = True
        if sync.over_budget:
            log.info("catch-up with {peer}: {n} envelopes came over its budget; another round",
                     peer=_peer(sync.conn), n=sync.over_budget)
            sync.more, sync.over_budget = True, 0
        if sync.more and sync.round < self.config.max_rounds:
            sync.round += 1
            sync.more = False
            sync.done = False
            self._send_summary(sync)


def _summary(raw: Any) -> dict[int, tuple[int, str]] | None:
    if not isinstance(raw, list) or len(raw) > MAX_BUCKETS:
        return None
    out: dict[int, tuple[int, str]] = {}
    for entry in raw:
        if (not isinstance(entry, list) or len(entry) != 3 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                       for x in entry[:2])
                or not isinstance(entry[2], str) or len(entry[2]) > 64 or entry[1] < 0):
            return None
        out[entry[0]] = (entry[1], entry[2])
    return out


def _peer(conn: Any) -> str:
    return (getattr(conn, "node_id", None) or "?")[:16]


def _ids_ahead(queue: deque, most: int) -> int:
    """Ids before the next _Done mark, up to ``most``."""
    n = 0
    for item in queue:
        if isinstance(item, _Done) or n >= most:
            break
        n += 1
    return n
