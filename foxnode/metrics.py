"""Prometheus metrics of one node.

Each node has its own registry, so several nodes in one process (tests,
devnet) never mix their figures; ``/metrics`` exposes that registry.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

#: Ops counted under their own label; anything else is "other", so a client
#: inventing op names cannot grow the label set without bound.
KNOWN_OPS = frozenset({
    "register", "peers", "time", "info", "hello", "exchange",
    "publish", "subscribe", "unsubscribe", "filter", "poll", "unfilter",
})


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "foxnode_connections", "Open WebSocket connections",
            ["kind"], registry=r)
        #: requests answered, by (op, status): plain ints on the hot path,
        #: turned into a Prometheus counter family only when scraped
        self.request_counts: dict[tuple[str, int], int] = {}
        r.register(_RequestsCollector(self.request_counts))
        self.bad_messages = Counter(
            "foxnode_bad_messages", "Messages that were not valid requests", registry=r)
        self.store_size = Gauge(
            "foxnode_peer_store_size", "Addresses in the peer store", registry=r)
        self.store_writes = Histogram(
            "foxnode_peer_store_write_seconds",
            "Time to write and fsync the peers file (one write commits many changes)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.peer_connections = Gauge(
            "foxnode_peer_connections", "Live handshaken peer connections",
            ["direction"], registry=r)
        self.dials = Counter(
            "foxnode_dials", "Outbound dial attempts, by result", ["result"], registry=r)
        self.disconnects = Counter(
            "foxnode_peer_disconnects", "Peer connections ended, by reason", ["reason"], registry=r)
        self.gossip_received = Counter(
            "foxnode_gossip_envelopes_received", "Envelopes received from peers, by outcome",
            ["outcome"], registry=r)
        self.gossip_sent = Counter(
            "foxnode_gossip_envelopes_sent", "Envelopes forwarded to peers", registry=r)
        self.gossip_delivered = Counter(
            "foxnode_gossip_deliveries", "Messages delivered to local subscribers", registry=r)
        self.send_dropped = Counter(
            "foxnode_send_dropped", "Frames dropped because a connection's send queue was full",
            ["kind"], registry=r)
        self.rate_limited = Counter(
            "foxnode_rate_limited", "Requests refused by a rate limit", registry=r)
        self.filters = Gauge(
            "foxnode_filters", "Polled filters held (filters.py)", registry=r)
        self.filter_dropped = Counter(
            "foxnode_filter_messages_dropped",
            "Messages a filter dropped, the oldest, over its bounds before a poll collected them",
            registry=r)
        self.peer_events_dropped = Counter(
            "foxnode_peer_events_rate_limited",
            "Events pushed by peers (gossip, ihave, ...) dropped over their budget", registry=r)

        self.history_messages = Gauge(
            "foxnode_history_messages", "Envelopes in the message store", registry=r)
        self.history_bytes = Gauge(
            "foxnode_history_bytes",
            "Bytes of the envelopes in the message store (bounded by --max-store-bytes)", registry=r)
        self.history_evicted = Counter(
            "foxnode_history_evicted",
            "Envelopes dropped from the message store before their end, over --max-store-bytes",
            registry=r)
        self.catchup_envelopes = Counter(
            "foxnode_catchup_envelopes", "Envelopes caught up (new to this node) from each live peer",
            ["peer"], registry=r)
        self.catchup_seconds = Histogram(
            "foxnode_catchup_seconds", "Time from a peer link coming up to having caught up with it",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.catchup_bytes = Counter(
            "foxnode_catchup_bytes", "Bytes of catch-up frames (summaries, id lists, pushes) sent",
            ["direction"], registry=r)
        self.plugin_errors = Counter(
            "foxnode_plugin_errors", "Ops and validators of plugins that raised (or returned what is not JSON)",
            ["plugin", "kind"], registry=r)
        self.validator_refused = Counter(
            "foxnode_validator_refused", "Messages a plugin's validator refused (not delivered, not forwarded)",
            ["plugin"], registry=r)

    def count_request(self, op: str, status: int) -> None:
        key = (op if op in KNOWN_OPS else "other", status)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1

    def watch_store(self, size: Callable[[], int]) -> None:
        self.store_size.set_function(size)


class _RequestsCollector(Collector):
    """``foxnode_requests_total{op, status}`` from the node's plain counts."""

    def __init__(self, counts: dict[tuple[str, int], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("foxnode_requests", "Requests answered, by op and status",
                                     labels=["op", "status"])
        for (op, status), n in sorted(self._counts.items()):
            family.add_metric([op, str(status)], n)
        yield family
