"""Filters for polling (PROTOCOL.md "Filters (polling)"): a subscription
held by the node for a client that cannot keep a connection open.

``filter`` takes what ``subscribe`` takes and makes a gossip subscription
whose "connection" is the filter itself: gossip matches, opens and encodes
each message exactly as it would for a subscriber (``Gossip.deliver``), and
the filter keeps the event frame until ``poll`` collects it (its
``"subscription"`` is the filter's id). A filter
outlives the connection that made it and ends ``filter_timeout`` seconds
[300] after its last poll; the sweep that ends them is a timer of the
service tree (service.py ``GossipService``).

Bounds (GossipConfig; defaults in brackets): at most ``max_filters`` [256]
filters per node and ``max_filters_per_ip`` [16] per client address (an
IPv6 client's /64; the node's operator is held to the total only), and
clients together at most ``max_filters`` less ``operator_filters`` [32],
so that many addresses cannot take the operator's filters too; each
holds at most ``filter_messages`` [1000] messages and ``filter_bytes``
[256 KiB] of frames, the oldest dropped beyond: the next poll says how many
(``"dropped"``) and ``foxnode_filter_messages_dropped_total`` counts them all. So
filters hold at most ``max_filters`` x ``filter_bytes`` [64 MiB] of frames,
plus what a subscription costs (gossip.py) each.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any

import attrs
import orjson

from foxnode import codec, logs
from foxnode.config import GossipConfig
from foxnode.gossip import Gossip, Subscription
from foxnode.limits import client_key

log = logs.logger(__name__)


@attrs.define(eq=False)
class Filter:
    """One filter: its subscription, and the event frames waiting for a poll.
    Gossip sees it as the subscription's connection (``fox_state``,
    ``send_frame``)."""

    id: str
    owner: "Filters"
    #: whom the per-address cap counts it against; None: the operator's
    client: str | None
    last_poll: float
    held: deque = attrs.Factory(deque)
    held_bytes: int = 0
    #: messages dropped (the oldest, over the bounds) since the last poll
    dropped: int = 0
    sub: Subscription | None = None
    #: what gossip keeps of a subscriber
    fox_state: dict = attrs.Factory(dict)

    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        self.held.append(frame)
        self.held_bytes += len(frame)
        config = self.owner.config
        while len(self.held) > 1 and (len(self.held) > config.filter_messages
                                      or self.held_bytes > config.filter_bytes):
            self.held_bytes -= len(self.held.popleft())
            self.dropped += 1
            self.owner.metrics.filter_dropped.inc()
        return True

    def has_room(self) -> bool:
        """Whether a frame now is kept without dropping an older one: a
        ``since`` replay waits for the next poll otherwise."""
        config = self.owner.config
        # Room for one more of the largest frames (its payload, and the
        # rest); an empty filter takes one whatever its size, as send_frame does.
        return not self.held or (len(self.held) < config.filter_messages
                                 and self.held_bytes + config.max_payload + 2048 <= config.filter_bytes)

    def can_send(self) -> bool:
        return self.owner.filters.get(self.id) is self

    def describe(self) -> str:
        return f"filter {self.id[:8]}"


class Filters:
    """The node's filters; serves ``filter``, ``poll`` and ``unfilter``."""

    def __init__(self, reactor: Any, gossip: Gossip, metrics: Any, config: GossipConfig | None = None) -> None:
        self.reactor = reactor
        self.gossip = gossip
        self.metrics = metrics
        self.config = config or gossip.config
        #: filter id -> filter
        self.filters: dict[str, Filter] = {}
        #: client address -> its filters
        self.per_ip: dict[str, int] = {}
        self.ops = {"filter": self.op_filter, "poll": self.op_poll, "unfilter": self.op_unfilter}
        metrics.filters.set_function(lambda: len(self.filters))

    def op_filter(self, conn: Any, args: Any) -> codec.Reply:
        gossip = self.gossip
        selection = gossip.selection_args("filter", args)
        if isinstance(selection, codec.Reply):
            return selection
        topics, *wanted = selection
        since = gossip.since_arg("filter", args)
        if isinstance(since, codec.Reply):
            return since
        if len(self.filters) >= self.config.max_filters:
            return codec.too_many(f"Too many filters on this node (at most {self.config.max_filters}); "
                                  "unfilter one, or let one expire.")
        client = None if getattr(conn, "trusted", False) else client_key(conn.remote_host)
        others = self.config.max_filters - self.config.operator_filters
        if client is not None and sum(self.per_ip.values()) >= others:
            return codec.too_many(f"Too many filters from clients on this node (at most {others}; the rest "
                                  "are kept for its operator); unfilter one, or let one expire.")
        if client is not None and self.per_ip.get(client, 0) >= self.config.max_filters_per_ip:
            return codec.too_many(f"Too many filters from {client} (at most {self.config.max_filters_per_ip} "
                                  "per client address); unfilter one, or let one expire.")
        made = Filter(secrets.token_hex(16), self, client, self.reactor.seconds())
        made.sub = gossip.add_subscription(made, topics, *wanted, sub_id=made.id, since=since)
        self.filters[made.id] = made
        if client is not None:
            self.per_ip[client] = self.per_ip.get(client, 0) + 1
        return codec.ok({"filter": made.id})

    def _named(self, op: str, args: Any) -> Filter | codec.Reply:
        if not isinstance(args, dict):
            return codec.bad_args(op, '"args" must be an object with "filter"')
        if "filter" not in args:
            return codec.bad_args(op, '"filter" is missing: the id filter replied with')
        filter_id = args["filter"]
        if not isinstance(filter_id, str):
            return codec.bad_args(op, '"filter" must be the id filter replied with (a string)')
        found = self.filters.get(filter_id)
        if found is None or self._expired(found):
            return codec.not_found(f'Filter "{filter_id[:100]}" is not known.')
        return found

    def _expired(self, f: Filter) -> bool:
        if self.reactor.seconds() - f.last_poll < self.config.filter_timeout:
            return False
        self._end(f)
        return True

    def op_poll(self, conn: Any, args: Any) -> codec.Reply:
        found = self._named("poll", args)
        if isinstance(found, codec.Reply):
            return found
        limit = args.get("limit", self.config.filter_messages)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return codec.bad_args("poll", '"limit" must be a whole number, 1 or more')
        found.last_poll = self.reactor.seconds()
        out: list[orjson.Fragment] = []
        size = 0
        held = found.held
        while held and len(out) < limit and (not out or size + len(held[0]) <= self.config.poll_bytes):
            frame = held.popleft()
            found.held_bytes -= len(frame)
            size += len(frame)
            out.append(orjson.Fragment(frame))
        dropped, found.dropped = found.dropped, 0
        return codec.ok({"messages": out, "more": bool(held), "dropped": dropped})

    def op_unfilter(self, conn: Any, args: Any) -> codec.Reply:
        found = self._named("unfilter", args)
        if isinstance(found, codec.Reply):
            return found
        self._end(found)
        return codec.ok({"filter": found.id})

    def _end(self, f: Filter) -> None:
        if self.filters.pop(f.id, None) is None:
            return
        self.gossip.connection_closed(f)
        f.held.clear()
        f.held_bytes = 0
        if f.client is not None:
            left = self.per_ip[f.client] - 1
            if left:
                self.per_ip[f.client] = left
            else:
                del self.per_ip[f.client]

    def sweep(self) -> None:
        """End the filters not polled for ``filter_timeout`` seconds."""
        now = self.reactor.seconds()
        for f in [f for f in self.filters.values() if now - f.last_poll >= self.config.filter_timeout]:
            log.debug("{f}: not polled for {s:g} s, ended", f=f.describe(), s=self.config.filter_timeout)
            self._end(f)

    def stop(self) -> None:
        for f in list(self.filters.values()):
            self._end(f)
