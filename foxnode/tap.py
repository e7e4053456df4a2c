"""``twistd foxnode``: the command-line options and the service they build.

``Options`` validates everything once, at the edge; ``makeService`` is short
and declarative: identity, peer store, node, web site, listening endpoint.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage
from zope.interface import implementer

from foxnode import address, identity, locks, logs
from foxnode.client import TrustError, load_trust_root
from foxnode.gossip import Gossip, GossipConfig
from foxnode.metrics import NodeMetrics
from foxnode.node import DEFAULT_TRUSTED, Node, NodeConfig
from foxnode.peers import PeerConfig, PeerManager
from foxnode.protocol import FoxServerFactory
from foxnode.store import BOOTSTRAP, PeerStore, StoreError
from foxnode.web import Origin, WebConfig, host_key, make_site

log = logs.logger(__name__)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _nonnegative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise ValueError("must be greater than 0")
    return x


def _burst(value: str) -> float:
    x = float(value)
    if not 1 <= x < float("inf"):
        raise ValueError("must be at least 1 (one message)")
    return x


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a foxnode: the foxchain peer-to-peer node. One port serves the node's "
        "page (/), the WebSocket endpoint (/ws), /healthz and /metrics."
    )
    optParameters = [
        ["port", "p", 9000, "TCP port to listen on, all interfaces.", int],
        ["listen", None, None,
         "A Twisted server endpoint string instead of --port "
         "(tcp:9000:interface=127.0.0.1, ssl:9443:privateKey=key.pem, systemd:domain=INET:index=0)."],
        ["peers-file", None, "peers.json", "The JSON peer store."],
        ["data-dir", None, ".", "Where the node keeps its key (and other state)."],
        ["advertise", None, None, "The ws:// or wss:// address other nodes should dial to reach this node."],
        ["network", None, "foxchain", "Nodes only peer within one network."],
        ["max-register-addrs", None, 100, "Most addresses one register request may carry.", _positive_int],
        ["max-message-size", None, 1 << 20, "Largest WebSocket message accepted, in bytes.", _positive_int],
        ["max-depth", None, 64, "Deepest JSON nesting a request may have.", _positive_int],
        ["rate", None, 50.0, "Requests per second one connection may send (token bucket).", _positive_float],
        ["burst", None, 100.0, "Requests one connection may send at once above --rate.", _positive_float],
        ["peer-rate", None, 1000.0,
         "Requests and events per second one peer (a connection that said hello) may send.",
         _positive_float],
        ["peer-burst", None, 5000.0, "Requests and events one peer may send at once above --peer-rate.",
         _burst],
        ["max-in-flight", None, 64,
         "Requests of one connection awaiting their replies before the node stops reading it.",
         _positive_int],
        ["max-connections", None, 1000, "Most WebSocket connections in all.", _positive_int],
        ["max-per-ip", None, 32, "Most WebSocket connections from one IP address.", _positive_int],
        ["ping-interval", None, 30, "Seconds (whole) between WebSocket pings to each connection.", _positive_int],
        ["ping-timeout", None, 15, "Seconds (whole) to wait for a pong before closing a connection.", _positive_int],
        ["handshake-timeout", None, 10.0,
         "Seconds an HTTP request (however slowly it trickles in), a WebSocket opening handshake, "
         "a dial or a peer's hello may take.", _positive_float],
        ["max-http", None, 128, "Most HTTP connections (not yet upgraded to WebSocket) in all.",
         _positive_int],
        ["max-http-per-ip", None, 16,
         "Most HTTP connections (not yet upgraded to WebSocket) from one IP address "
         "(IPv6: one /64); --trusted clients are held to --max-http only.", _positive_int],
        ["max-peers", None, 10_000, "Most addresses the peer store holds.", _positive_int],
        ["max-outbound", None, 8, "Most outbound peer connections.", _nonnegative_int],
        ["max-inbound", None, 24, "Most inbound peer connections.", _nonnegative_int],
        ["max-dialing", None, 4, "Most dials in flight at once.", _positive_int],
        ["dial-rate", None, 4.0, "Most dials started per second.", _positive_float],
        ["exchange-interval", None, 30.0, "Seconds between peer exchanges with each peer.", _positive_float],
        ["max-backoff", None, 60.0, "Longest delay, in seconds, between dials of a failing address.",
         _positive_float],
        ["max-payload", None, 64 * 1024, "Largest gossip message payload, in bytes.", _positive_int],
        ["max-ttl", None, 3600, "Longest time-to-live of a gossip message, in seconds.", _positive_int],
        ["send-queue", None, 1 << 20,
         "Bytes a connection may hold back for a slow reader before pushes are dropped "
         "(subscribers, peers) or the connection closes (unread replies).", _positive_int],
        ["cafile", None, None, "CA certificates (a PEM file or a directory of them) to verify wss:// peers with (default: system trust)."],
    ]
    optFlags = [
        ["debug", None, "Debug logging."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []
        self["trusted"] = []
        self["allowed-origin"] = []
        self["allowed-host"] = []

    def opt_allowed_origin(self, origin: str) -> None:
        """An origin (scheme://host[:port]) besides the node's own whose web
        pages may open /ws; '*' for any page; repeatable."""
        if origin != "*" and Origin.parse(origin) is None:
            raise usage.UsageError(f"--allowed-origin {origin}: give scheme://host[:port] or *")
        self["allowed-origin"].append(origin)

    def opt_allowed_host(self, name: str) -> None:
        """A host name (or address) besides the node's own addresses and
        localhost that requests may name in Host; repeatable."""
        if host_key(name) is None:
            raise usage.UsageError(f"--allowed-host {name}: give a host name or IP address, no port")
        self["allowed-host"].append(name)

    def opt_trusted(self, cidr: str) -> None:
        """A network (CIDR, or one address) whose clients are the node's
        operator; repeatable; given at all, it replaces the default
        127.0.0.0/8 and ::1."""
        try:
            self["trusted"].append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise usage.UsageError(f"--trusted {cidr}: {e}") from None

    def opt_peer(self, url: str) -> None:
        """A bootstrap peer (ws:// or wss:// URL) to dial; repeatable."""
        try:
            self["peer"].append(address.parse(url).url)
        except address.InvalidAddress as e:
            raise usage.UsageError(f"--peer {url}: {e}") from None

    def postOptions(self) -> None:
        if self["listen"] is None:
            if not 0 <= self["port"] <= 65535:
                raise usage.UsageError(f"--port {self['port']}: out of range 0..65535")
            # serverFromString wants "tcp:9000", not a bare port number.
            self["listen"] = f"tcp:{self['port']}"
        if self["advertise"] is not None:
            try:
                address.parse(self["advertise"])
            except address.InvalidAddress as e:
                raise usage.UsageError(f"--advertise {self['advertise']}: {e}") from None
        if self["cafile"] is not None:
            if not os.path.exists(self["cafile"]):
                raise usage.UsageError(f"--cafile {self['cafile']}: no such file or directory")
            try:
                load_trust_root(self["cafile"])
            except TrustError as e:
                raise usage.UsageError(f"--cafile {e}") from None
        if not self["network"] or len(self["network"]) > 64:
            raise usage.UsageError("--network: give a name of 1 to 64 characters")

    def peer_config(self) -> PeerConfig:
        return PeerConfig(
            max_outbound=self["max-outbound"],
            max_inbound=self["max-inbound"],
            max_dialing=self["max-dialing"],
            dial_rate=self["dial-rate"],
            exchange_interval=self["exchange-interval"],
            backoff_max=self["max-backoff"],
            dial_timeout=self["handshake-timeout"],
            trust_roots=self["cafile"],
        )

    def web_config(self) -> WebConfig:
        origins = self["allowed-origin"]
        return WebConfig(
            allowed_origins=tuple(Origin.parse(o) for o in origins if o != "*"),
            any_origin="*" in origins,
            allowed_hosts=tuple(host_key(h) for h in self["allowed-host"]),
            max_http=self["max-http"],
            max_http_per_ip=self["max-http-per-ip"],
            request_timeout=self["handshake-timeout"],
        )

    def gossip_config(self) -> GossipConfig:
        return GossipConfig(max_payload=self["max-payload"], max_ttl=self["max-ttl"],
                            default_ttl=min(60, self["max-ttl"]))

    def node_config(self) -> NodeConfig:
        return NodeConfig(
            network=self["network"],
            advertise=self["advertise"],
            bootstrap=tuple(self["peer"]),
            max_register_addrs=self["max-register-addrs"],
            max_message_size=self["max-message-size"],
            send_queue=self["send-queue"],
            rate=self["rate"],
            burst=self["burst"],
            peer_rate=self["peer-rate"],
            peer_burst=self["peer-burst"],
            max_in_flight=self["max-in-flight"],
            max_per_ip=self["max-per-ip"],
            max_depth=self["max-depth"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
            handshake_timeout=self["handshake-timeout"],
            # Peers that only learn our port must know to dial wss:// then.
            secure=self["listen"].startswith(("ssl:", "tls:")),
            trusted=tuple(self["trusted"]) or DEFAULT_TRUSTED,
        )


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """Wraps the configured endpoint to learn the port it really bound
    (``tcp:0`` in tests, or whatever systemd handed over)."""

    def __init__(self, endpoint: Any, on_listening: Any) -> None:
        self._endpoint = endpoint
        self._on_listening = on_listening

    def listen(self, factory: Any) -> Deferred:
        return self._endpoint.listen(factory).addCallback(self._on_listening)


class NodeService(service.MultiService):
    """The running node: its listening port and its long-lived parts."""

    def __init__(self, reactor: Any, node: Node, endpoint: Any, site: Any,
                 file_locks: list[locks.FileLock] | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.node = node
        self.site = site
        #: held until the node has stopped (locks.py)
        self.file_locks = file_locks or []
        self.port: Any = None
        self._listening: list[Deferred] = []
        endpoint = _ReportingEndpoint(endpoint, self._bound)
        from twisted.application.internet import StreamServerEndpointService

        listener = StreamServerEndpointService(endpoint, site)
        # Fail twistd's start when the port cannot be bound, rather than log and idle.
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def _bound(self, port: Any) -> Any:
        self.port = port
        self.node.listen_port = port.getHost().port
        log.info("foxnode {node_id} listening on port {port}, network {network!r}",
                 node_id=self.node.node_id, port=self.node.listen_port, network=self.node.config.network)
        waiters, self._listening = self._listening, []
        for d in waiters:
            d.callback(port)
        return port

    def when_listening(self) -> Deferred:
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._listening.append(d)
        return d

    def startService(self) -> None:
        for lock in self.file_locks:
            lock.note_pid()  # twistd may have forked into the background since
        super().startService()
        self.node.start()

    def stopService(self) -> Deferred:
        stopped = super().stopService()
        d = DeferredList([stopped, self.node.stop()], consumeErrors=True)
        return d.addCallback(self._release)

    def _release(self, _: Any) -> None:
        for lock in self.file_locks:
            lock.release()


def makeService(config: Options, reactor: Any = None) -> NodeService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    logs.set_debug(bool(config["debug"]))
    metrics = NodeMetrics()
    # Locked before anything is read, so a second node on either file
    # neither shares the key nor overwrites the store.
    try:
        file_locks = locks.lock_node_files(config["data-dir"], config["peers-file"])
    except locks.LockError as e:
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    # The store first: a node refused for its peers file leaves nothing behind.
    try:
        store = PeerStore.open(reactor, config["peers-file"], max_peers=config["max-peers"],
                               on_write=metrics.store_writes.observe)
        node_identity = identity.load_or_create(config["data-dir"])
    except (StoreError, identity.IdentityError) as e:
        for lock in file_locks:
            lock.release()
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    node_config = config.node_config()
    if node_config.bootstrap:
        # Dialed whatever the disk does: the operator named them, so a
        # failed write keeps them (said in the log) instead of rolling back.
        store.add(node_config.bootstrap, BOOTSTRAP, durable=False)
        store.commit().addErrback(lambda _: None)  # a failure is logged by the store
    node = Node(reactor, node_config, node_identity, store, metrics)
    PeerManager(node, config.peer_config())
    Gossip(node, config.gossip_config())
    ws_factory = FoxServerFactory(
        node, reactor, max_message_size=node_config.max_message_size,
        send_queue=node_config.send_queue, max_depth=node_config.max_depth,
        ping_interval=node_config.ping_interval, ping_timeout=node_config.ping_timeout,
        open_timeout=node_config.handshake_timeout, max_connections=config["max-connections"],
        max_in_flight=node_config.max_in_flight)
    site = make_site(node, ws_factory, config.web_config())
    endpoint = serverFromString(reactor, config["listen"])
    from autobahn.websocket import USES_NVX

    log.info("foxnode {node_id}: peers file {path} ({n} known), data dir {dir}, "
             "Autobahn native acceleration {nvx}",
             node_id=node.node_id, path=os.path.abspath(config["peers-file"]),
             n=len(store), dir=os.path.abspath(config["data-dir"]), nvx="on" if USES_NVX else "off")
    return NodeService(reactor, node, endpoint, site, file_locks)
