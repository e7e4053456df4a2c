"""What a node is told at start: one frozen ``attrs`` class per part, and
every default written here once.

``tap.Options`` takes its defaults from these classes (``default()``), the
parts take their config from them, and nothing else repeats a figure. The
values are validated once, at the edge (tap.py); the parts trust them.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from foxnode.web import HostKey, Origin

#: Networks whose clients are the node's operator unless ``--trusted`` says otherwise.
DEFAULT_TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
#: Seconds an HTTP request, a WebSocket opening handshake, a dial or a
#: peer's hello may take (one option, ``--handshake-timeout``, sets all).
HANDSHAKE_TIMEOUT = 10.0
#: Largest WebSocket message a node accepts, and one WebSocket connection's
#: bytes held back for a slow reader.
MAX_MESSAGE_SIZE = 1 << 20
SEND_QUEUE = 1 << 20
#: Requests of one connection waiting for their replies before the node
#: stops reading it (a register waiting for the disk, and all behind it).
MAX_IN_FLIGHT = 64
#: Deepest JSON nesting a message may have.
MAX_DEPTH = 64
#: Addresses the peer store holds at most.
MAX_PEERS = 10_000
#: Keys the key store holds at most.
MAX_KEYS = 1000


@attrs.frozen
class NodeConfig:
    """The node and its connections."""

    network: str = "foxchain"
    #: the URL other nodes should dial; None: announce the port only
    advertise: str | None = None
    bootstrap: tuple[str, ...] = ()
    #: addresses one ``register`` request may carry
    max_register_addrs: int = 100
    max_message_size: int = MAX_MESSAGE_SIZE
    send_queue: int = SEND_QUEUE
    #: requests per second per connection, and the burst allowed above it
    rate: float = 50.0
    burst: float = 100.0
    #: the budget of one peer (a connection that said hello): its requests
    #: and pushed events per second, and the burst above it
    peer_rate: float = 1000.0
    peer_burst: float = 5000.0
    max_in_flight: int = MAX_IN_FLIGHT
    #: WebSocket connections in all, and from one remote IP address
    max_connections: int = 1000
    max_per_ip: int = 32
    max_depth: int = MAX_DEPTH
    #: seconds between WebSocket pings, and to wait for the pong: how a
    #: dead or half-open connection is found
    ping_interval: int = 30
    ping_timeout: int = 15
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: this node serves TLS (wss://)
    secure: bool = False
    #: networks whose clients are the node's operator (PROTOCOL.md "Who may
    #: do what"): not rate-limited or capped per IP, and alone allowed the
    #: operator ops
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = DEFAULT_TRUSTED
    #: who reads and writes WebSocket frames on the listening side
    #: (``--frames``): "own", the node's fast path (frames.py), or
    #: "autobahn", Autobahn's frame code alone
    frames: str = "own"


@attrs.frozen
class StoreConfig:
    """The peer store."""

    max_peers: int = MAX_PEERS
    #: seconds bookkeeping changes (handshakes, failures) wait before they
    #: are written with whatever else changed meanwhile
    flush_delay: float = 2.0


@attrs.frozen
class KeyConfig:
    """The key store (keys.py; its file is ``keys.json`` in the data directory)."""

    #: keys held at most: each is a secret the operator must be able to
    #: list and a line of the file rewritten at every change
    max_keys: int = MAX_KEYS
    #: the longest password ``newkey`` takes, in bytes of UTF-8 (crypto.py
    #: refuses more whatever this says)
    max_password: int = 1024
    #: the longest key id looked up; longer ones are no id of ours
    max_id_length: int = 128


@attrs.frozen
class LinkShape:
    """One emulated link (links.py): per direction, as netem's on each side."""

    #: seconds one way, and the most a draw adds or takes (uniform)
    latency: float = 0.0
    jitter: float = 0.0
    #: the share of TCP segments lost (and so retransmitted, late)
    loss: float = 0.0
    #: bytes per second; None: as fast as the machine
    bandwidth: float | None = None

    def is_plain(self) -> bool:
        return not (self.latency or self.jitter or self.loss or self.bandwidth)


@attrs.frozen
class LinkConfig:
    """Link emulation on the peer connections a node dials (``--link-*``)."""

    #: the shape of every link, unless a rule says otherwise
    default: LinkShape = LinkShape()
    #: (lowest port, highest port, shape): links to peers on those ports
    #: (a group of a devnet) take this shape; the first rule that matches
    rules: tuple[tuple[int, int, LinkShape], ...] = ()
    #: TCP's least retransmission timeout (Linux's): what a lost segment costs
    min_rto: float = 0.2

    def shape_for(self, port: int) -> LinkShape:
        for low, high, shape in self.rules:
            if low <= port <= high:
                return shape
        return self.default

    def is_plain(self) -> bool:
        return self.default.is_plain() and all(s.is_plain() for _, _, s in self.rules)


@attrs.frozen
class PeerConfig:
    """Dialing, the handshake and peer exchange."""

    max_outbound: int = 8
    max_inbound: int = 24
    #: dials in flight at once, and dials started per second
    max_dialing: int = 4
    dial_rate: float = 4.0
    dial_timeout: float = HANDSHAKE_TIMEOUT
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    #: an address failing this long without a good handshake is forgotten
    #: (verified ones get ``forget_verified_after``); bootstrap ones never
    forget_after: float = 3600.0
    forget_verified_after: float = 24 * 3600.0
    exchange_interval: float = 30.0
    #: addresses one exchange reply carries / one exchange may add
    exchange_sample: int = 32
    #: most addresses learned by exchange the store may hold
    exchange_cap: int = 2000
    #: seconds between the dial scheduler's rounds (it also runs at once
    #: when something changes: a new address, a dial ending)
    tick: float = 1.0
    #: addresses kept connected at all times (``--static-peer``): outside
    #: ``max_outbound``, redialed with backoff for ever, never forgotten
    static: tuple[str, ...] = ()
    #: node ids admitted even when the inbound slots are full (``--trusted-peer``)
    trusted_peers: frozenset[str] = frozenset()
    #: seconds between sweeps that forget addresses failing too long
    sweep_interval: float = 10.0
    trust_roots: str | None = None
    #: link emulation on dialed peer connections (links.py); plain: none
    links: LinkConfig = LinkConfig()


@attrs.frozen
class GossipConfig:
    """Publish/subscribe and Plumtree spreading (gossip.py has the bounds in bytes)."""

    default_ttl: int = 60
    max_ttl: int = 3600
    #: largest encoded payload of one message, in bytes
    max_payload: int = 64 * 1024
    #: how far in the future an envelope's creation time may be (clock skew)
    max_skew: float = 30.0
    max_topic_length: int = 128
    max_topics_per_connection: int = 64
    #: ids remembered at most (each until its envelope expires)
    seen_capacity: int = 200_000
    #: envelopes kept to answer grafts: how many, how many bytes, how long
    cache_capacity: int = 10_000
    cache_bytes: int = 32 * 1024 * 1024
    cache_seconds: float = 120.0
    #: seconds between sweeps of expired ids and old cached envelopes
    sweep_interval: float = 5.0
    #: how long to wait for an announced envelope before asking for it,
    #: at least; where envelopes come later over the tree (slow links, a
    #: busy machine), the wait follows how late they come, up to
    #: ``graft_timeout_max``: a graft for an envelope on its way costs a copy
    graft_timeout: float = 0.4
    graft_timeout_max: float = 4.0
    #: lazy links each new id is announced to (``ihave``), at most, drawn
    #: at random from those not known to hold it: gossipsub's D_lazy. All
    #: of them, as plain Plumtree, costs an id frame over every link of
    #: every node for each message, which on a large network is most of
    #: the work; a handful still finds any node the tree missed.
    lazy_fanout: int = 6
    #: seconds new ids wait before they are announced, in one frame per
    #: link: peers that send or announce an id meanwhile hold it and are
    #: not told of it
    lazy_delay: float = 0.05
    #: seconds after which each id is announced once more, to as many
    #: other links not known to hold it by then
    lazy_repeat: float = 1.0
    #: bad envelopes a peer may send (a burst, then per second) before it is dropped
    abuse_burst: float = 20.0
    abuse_rate: float = 0.5
    #: envelopes below this proof of work (crypto.pow_value) are refused,
    #: counted and not forwarded (``--min-pow``)
    min_pow: float = 0.0
    #: seconds ``publish`` works for its ``pow`` target unless its
    #: ``pow_time`` says otherwise, and the most it may say
    pow_time: float = 2.0
    max_pow_time: float = 10.0
    #: proof-of-work searches under way at once (each a thread of the
    #: reactor's pool, up to ``max_pow_time``): more get 429, so publishers
    #: cannot take every thread and core of the node
    max_works: int = 2
    #: of ``max_works``, how many only the operator may take (when there
    #: is more than one): other clients cannot hold every search slot
    operator_works: int = 1
    #: subscriptions one connection may hold
    max_subscriptions_per_connection: int = 64
    #: subscriptions the connections of one client address (an IPv6
    #: client's /64) hold together; the operator is held to the bound per
    #: connection only. Each subscription gets a frame of its own for each
    #: message, so this bounds what one address makes a publish cost.
    max_subscriptions_per_ip: int = 256
    #: polled filters (filters.py, PROTOCOL.md "Filters (polling)"): a
    #: filter ends this many seconds after its last poll (or its making)
    filter_timeout: float = 300.0
    #: filters a node holds at most, and one client address (an IPv6
    #: client's /64) may make (the node's operator is held to the total only)
    max_filters: int = 256
    max_filters_per_ip: int = 16
    #: of ``max_filters``, how many only the operator may take: clients
    #: from many addresses (an IPv6 /48 holds 65,536 /64s) fill the rest at
    #: most, and the operator can still make filters
    operator_filters: int = 32
    #: messages one filter holds for its next poll, and their bytes: over
    #: either, the oldest are dropped (and counted)
    filter_messages: int = 1000
    filter_bytes: int = 256 * 1024
    #: the bytes of messages one poll reply carries at most (at least one
    #: message whatever its size; "more" says the rest waits)
    poll_bytes: int = 256 * 1024
    #: seconds between sweeps of filters not polled for ``filter_timeout``
    filter_sweep_interval: float = 10.0
    #: bytes of live events one subscription holds while its ``since``
    #: replay runs (history.py), the oldest dropped beyond (as a full send
    #: queue would)
    max_held_bytes: int = 1024 * 1024


@attrs.frozen
class HistoryConfig:
    """The message store and what reads it (msgstore.py, history.py,
    catchup.py; PROTOCOL.md "History and catch-up")."""

    #: bytes of envelopes the store holds at most (``--max-store-bytes``):
    #: beyond, those nearest their end go first
    max_store_bytes: int = 256 * 1024 * 1024
    #: seconds between sweeps of expired envelopes
    sweep_interval: float = 10.0
    #: ``history``'s ``limit``: the default and the most
    default_limit: int = 100
    max_limit: int = 1000
    #: the bytes of messages one history reply carries at most (at least
    #: one message; the cursor says where the rest begins)
    page_bytes: int = 512 * 1024
    #: stored messages one history request reads at most, when its
    #: ``key``/``from``/``min_pow`` leave most of them out
    scan_rows: int = 5000
    #: and bytes of them: a page of what a filter leaves out costs at most this
    scan_bytes: int = 4 * 1024 * 1024
    #: stored messages read at a time by a ``since`` replay, and the
    #: seconds it waits for a slow reader to catch up
    replay_batch: int = 100
    replay_wait: float = 0.05
    #: catch-up summaries count the envelopes held per this many seconds
    #: of their creation time
    bucket_seconds: float = 60.0
    #: ids in one catch-up frame, envelopes in one push and their bytes
    sync_ids: int = 1000
    push_envelopes: int = 200
    push_bytes: int = 256 * 1024
    #: ids a node queues to push to one peer, and waits for from one, at most
    max_push_queue: int = 50_000
    max_wanted: int = 50_000
    #: rounds of catch-up with one peer per connection at most (another
    #: starts when the last ended with more to come)
    max_rounds: int = 8


@attrs.frozen
class WebConfig:
    """The HTTP side of the port: the page, /healthz, /metrics, the upgrade to /ws."""

    #: origins besides the node's own whose pages may open ``/ws``
    allowed_origins: tuple[Origin, ...] = ()
    #: ``--allowed-origin '*'``: any page may
    any_origin: bool = False
    #: host names besides the node's addresses and ``localhost``
    allowed_hosts: tuple[HostKey, ...] = ()
    #: HTTP connections (not yet upgraded to WebSocket) in all, and from
    #: one client address (an IPv6 client: its /64); the node's operator
    #: (``--trusted``) is held to the total only
    max_http: int = 128
    max_http_per_ip: int = 16
    #: seconds each HTTP request has to arrive whole, however it trickles
    request_timeout: float = HANDSHAKE_TIMEOUT


@attrs.frozen
class PluginConfig:
    """Plugins (pluginhost.py, PROTOCOL.md "Plugins")."""

    #: ``--plugin`` values, in order: dotted module names or paths to .py files
    modules: tuple[str, ...] = ()
    #: the node's data directory: each plugin's own is ``plugins/<name>`` in it
    data_dir: str = "."
    #: seconds an op or validator may hold the reactor before a warning names it
    slow_call: float = 0.5


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of the config class ``config``: where
    a command-line option takes its default from."""
    return attrs.fields_dict(config)[name].default
