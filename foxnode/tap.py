"""``twistd foxnode``: the command-line options and the service they build.

``Options`` validates everything once, at the edge, and turns it into the
parts' configs (config.py, where every default is written); ``makeService``
reads as options, then configs, then the files, then build (service.py).
"""

from __future__ import annotations

import gc
import ipaddress
import math
import os
import signal
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.endpoints import serverFromString
from twisted.python import logfile, usage

from foxnode import address, frames, identity, keys, links, locks, logs, msgstore, pluginhost
from foxnode.client import TrustError, load_trust_root
from foxnode.config import (DEFAULT_TRUSTED, GossipConfig, HistoryConfig, LinkConfig, LinkShape, NodeConfig,
                            PeerConfig, PluginConfig, StoreConfig, WebConfig, default)
from foxnode.metrics import NodeMetrics
from foxnode.service import (  # noqa: F401  (CannotStart and why_not_listening were tap's)
    CannotStart, Configs, NodeService, build, why_not_listening)
from foxnode.store import BOOTSTRAP, PeerStore, StoreError
from foxnode.web import Origin, host_key

log = logs.logger(__name__)


#: No timeout or interval of a node needs more than a day; more is a typo
#: (or "inf") that leaves the node waiting for ever.
DAY = 86_400
#: Counts of things held in memory (connections, addresses): more than this
#: is a typo, and would let one client use up the machine.
MANY = 1_000_000


def _figure(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


class Bounded:
    """The parser of one numeric option: a finite number of ``kind`` from
    ``low`` to ``high``. Outside that range the node would be useless (a
    bucket that never holds one token, a timeout that never fires), so it
    refuses to start, naming the option."""

    def __init__(self, option: str, kind: type, low: float, high: float) -> None:
        self.option, self.kind, self.low, self.high = option, kind, low, high
        # Shown in --help after the option's own text.
        self.coerceDoc = f"From {_figure(low)} to {_figure(high)}."

    def __call__(self, text: str) -> int | float:
        whole = self.kind is int
        try:
            value = self.kind(text)
        except ValueError:
            raise usage.UsageError(
                f"--{self.option} {text!r}: not a{' whole' if whole else ''} number") from None
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise usage.UsageError(f"--{self.option} {text}: give a{' whole' if whole else ''} number "
                                   f"from {_figure(self.low)} to {_figure(self.high)}")
        return value


def _number(option: str, default: float, doc: str, kind: type, low: float, high: float,
            short: str | None = None) -> list:
    return [option, short, default, doc, Bounded(option, kind, low, high)]


def _text(option: str, value: str) -> None:
    """Names go into logs, ``hello`` and replies: refuse what cannot travel
    as JSON (undecodable bytes from the command line come as lone
    surrogates) or would garble a log line."""
    if not value.isprintable():
        raise usage.UsageError(f"--{option} {value!r}: has control characters or undecodable bytes")


def _frames(text: str) -> str:
    try:
        return frames.parse_option(text)
    except ValueError as e:
        raise usage.UsageError(f"--frames {e}") from None


_frames.coerceDoc = f"One of: {', '.join(frames.CHOICES)}."  # shown in --help


def _link(option: str, parse: Any) -> Any:
    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise usage.UsageError(f"--{option} {e}") from None

    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a foxnode: the foxchain peer-to-peer node. One port serves the node's "
        "page (/), the WebSocket endpoint (/ws), /healthz and /metrics."
    )
    optParameters = [
        _number("port", 9000, "TCP port to listen on, all interfaces.", int, 0, 65535, short="p"),
        ["listen", None, None,
         "A Twisted server endpoint string instead of --port "
         "(tcp:9000:interface=127.0.0.1, ssl:9443:privateKey=key.pem, systemd:domain=INET:index=0)."],
        ["peers-file", None, "peers.json", "The JSON peer store."],
        ["data-dir", None, ".", "Where the node keeps its key (and other state)."],
        ["advertise", None, None, "The ws:// or wss:// address other nodes should dial to reach this node."],
        ["network", None, default(NodeConfig, "network"), "Nodes only peer within one network."],
        _number("max-register-addrs", default(NodeConfig, "max_register_addrs"), "Most addresses one register request may carry.", int, 1, 10_000),
        _number("max-message-size", default(NodeConfig, "max_message_size"), "Largest WebSocket message accepted, in bytes.", int, 1024, 1 << 26),
        _number("max-depth", default(NodeConfig, "max_depth"), "Deepest JSON nesting a request may have.", int, 8, 1000),
        _number("rate", default(NodeConfig, "rate"), "Requests per second one connection may send (token bucket).", float, 0.01, 1e9),
        _number("burst", default(NodeConfig, "burst"), "Requests one connection may send at once above --rate.", float, 1, 1e9),
        _number("peer-rate", default(NodeConfig, "peer_rate"),
                "Requests and events per second one peer (a connection that said hello) may send.",
                float, 0.01, 1e9),
        _number("peer-burst", default(NodeConfig, "peer_burst"), "Requests and events one peer may send at once above --peer-rate.",
                float, 1, 1e9),
        _number("max-in-flight", default(NodeConfig, "max_in_flight"),
                "Requests of one connection awaiting their replies before the node stops reading it.",
                int, 1, 100_000),
        _number("max-connections", default(NodeConfig, "max_connections"), "Most WebSocket connections in all.", int, 1, MANY),
        _number("max-per-ip", default(NodeConfig, "max_per_ip"), "Most WebSocket connections from one IP address.", int, 1, MANY),
        _number("ping-interval", default(NodeConfig, "ping_interval"), "Seconds (whole) between WebSocket pings to each connection.", int, 1, DAY),
        _number("ping-timeout", default(NodeConfig, "ping_timeout"), "Seconds (whole) to wait for a pong before closing a connection.", int, 1, DAY),
        # Autobahn's timers fire on whole seconds, rounded down: less than one
        # second would close upgrades before they could finish.
        _number("handshake-timeout", default(NodeConfig, "handshake_timeout"),
                "Seconds an HTTP request (however slowly it trickles in), a WebSocket opening handshake, "
                "a dial or a peer's hello may take.", float, 1, DAY),
        _number("max-http", default(WebConfig, "max_http"), "Most HTTP connections (not yet upgraded to WebSocket) in all.",
                int, 1, MANY),
        _number("max-http-per-ip", default(WebConfig, "max_http_per_ip"),
                "Most HTTP connections (not yet upgraded to WebSocket) from one IP address "
                "(IPv6: one /64); --trusted clients are held to --max-http only.", int, 1, MANY),
        _number("max-peers", default(StoreConfig, "max_peers"), "Most addresses the peer store holds.", int, 1, MANY),
        _number("max-outbound", default(PeerConfig, "max_outbound"), "Most outbound peer connections.", int, 0, 10_000),
        _number("max-inbound", default(PeerConfig, "max_inbound"), "Most inbound peer connections.", int, 0, 10_000),
        _number("max-dialing", default(PeerConfig, "max_dialing"), "Most dials in flight at once.", int, 1, 1000),
        _number("dial-rate", default(PeerConfig, "dial_rate"), "Most dials started per second.", float, 0.01, 1000),
        _number("exchange-interval", default(PeerConfig, "exchange_interval"), "Seconds between peer exchanges with each peer.", float, 0.1, DAY),
        _number("max-backoff", default(PeerConfig, "backoff_max"), "Longest delay, in seconds, between dials of a failing address.",
                float, 1, DAY),
        _number("max-payload", default(GossipConfig, "max_payload"), "Largest gossip message payload, in bytes.", int, 1, 1 << 26),
        _number("max-ttl", default(GossipConfig, "max_ttl"), "Longest time-to-live of a gossip message, in seconds.", int, 1, DAY),
        _number("min-pow", default(GossipConfig, "min_pow"),
                "Least proof of work (Whisper's: 2**leading zero bits of the work hash / (bytes * TTL)) "
                "of the envelopes this node takes and forwards; others are refused and counted.",
                float, 0, 1e12),
        _number("max-store-bytes", default(HistoryConfig, "max_store_bytes"),
                "Bytes of envelopes the message store (messages.sqlite in --data-dir) holds at most; "
                "beyond, those nearest their end go first. Each is kept until its TTL ends.",
                int, 1 << 20, 1 << 44),
        _number("send-queue", default(NodeConfig, "send_queue"),
                "Bytes a connection may hold back for a slow reader before pushes are dropped "
                "(subscribers, peers) or the connection closes (unread replies).", int, 1024, 1 << 30),
        ["frames", None, default(NodeConfig, "frames"),
         "Who reads and writes WebSocket frames: own (the node's fast path) or autobahn "
         "(Autobahn's frame code alone; slower, for comparison and as a way out).", _frames],
        ["link-latency", None, None,
         "Emulate this one-way latency, with jitter after a colon (40ms:10ms), on the peer links this "
         "node dials, both ways (links.py).", _link("link-latency", links.parse_latency)],
        ["link-loss", None, None,
         "Emulate this share of lost TCP segments (1%) on the links this node dials: each costs a "
         "retransmission's delay, as on TCP.", _link("link-loss", links.parse_loss)],
        ["link-bandwidth", None, None, "Emulate this bandwidth (1mbit, 100kbit) on each link this node dials.",
         _link("link-bandwidth", links.parse_rate)],
        ["cafile", None, None, "CA certificates (a PEM file or a directory of them) to verify wss:// peers with (default: system trust)."],
    ]
    optFlags = [
        ["debug", None, "Debug logging."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peer"] = []
        self["static-peer"] = []
        self["trusted-peer"] = []
        self["trusted"] = []
        self["allowed-origin"] = []
        self["allowed-host"] = []
        self["plugin"] = []
        self["link-rule"] = []

    def opt_plugin(self, spec: str) -> None:
        """A plugin to load: a dotted module name (mypackage.myplugin) or a
        path to a .py file; repeatable. foxnode's own (time) and installed
        packages' (entry points of the group foxnode.plugins) load always."""
        wrong = pluginhost.check_spec(spec)
        if wrong:
            raise usage.UsageError(f"--plugin {spec}: {wrong}")
        self["plugin"].append(spec)

    def opt_link_rule(self, rule: str) -> None:
        """Links to peers on these ports take this shape instead of the
        --link-* ones: PORT-PORT=latency=40ms:10ms,loss=1%,bandwidth=1mbit
        (a group of a devnet); repeatable, the first that matches counts."""
        try:
            self["link-rule"].append(links.parse_rule(rule))
        except ValueError as e:
            raise usage.UsageError(f"--link-rule {e}") from None

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

    def opt_static_peer(self, url: str) -> None:
        """A peer (ws:// or wss:// URL, may pin its node with #<node id>) kept
        connected at all times, outside --max-outbound; repeatable."""
        try:
            self["static-peer"].append(address.parse(url).url)
        except address.InvalidAddress as e:
            raise usage.UsageError(f"--static-peer {url}: {e}") from None

    def opt_trusted_peer(self, node_id: str) -> None:
        """A node id (64 hex digits) admitted as a peer even when the node
        has all the inbound peers it takes; repeatable."""
        if not identity.is_node_id(node_id.lower()):
            raise usage.UsageError(f"--trusted-peer {node_id}: give a node id of 64 hex digits")
        self["trusted-peer"].append(node_id.lower())

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd, which would print all of --help above the
            # error: one line is what a terminal or a journal needs.
            raise SystemExit(f"twistd foxnode: {e} (twistd foxnode --help lists the options)") from None

    def postOptions(self) -> None:
        if self["listen"] is None:
            # serverFromString wants "tcp:9000", not a bare port number.
            self["listen"] = f"tcp:{self['port']}"
        elif not self["listen"]:
            raise usage.UsageError("--listen: give an endpoint, e.g. tcp:9000:interface=127.0.0.1")
        _text("listen", self["listen"])
        for option in ("peers-file", "data-dir"):
            if not self[option]:
                raise usage.UsageError(f"--{option}: give a path")
        if os.path.exists(self["data-dir"]) and not os.path.isdir(self["data-dir"]):
            raise usage.UsageError(f"--data-dir {self['data-dir']}: not a directory")
        if os.path.isdir(self["peers-file"]):
            raise usage.UsageError(f"--peers-file {self['peers-file']}: is a directory; give a file in it")
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
        _text("network", self["network"])

    def configs(self) -> Configs:
        return Configs(node=self.node_config(), peers=self.peer_config(),
                       gossip=self.gossip_config(), web=self.web_config(),
                       store=StoreConfig(max_peers=self["max-peers"]),
                       history=HistoryConfig(max_store_bytes=self["max-store-bytes"]),
                       plugins=PluginConfig(modules=tuple(self["plugin"]), data_dir=self["data-dir"]))

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
            static=tuple(dict.fromkeys(self["static-peer"])),
            trusted_peers=frozenset(self["trusted-peer"]),
            links=self.link_config(),
        )

    def link_config(self) -> LinkConfig:
        latency, jitter = self["link-latency"] or (0.0, 0.0)
        shape = LinkShape(latency=latency, jitter=jitter, loss=self["link-loss"] or 0.0,
                          bandwidth=self["link-bandwidth"])
        return LinkConfig(default=shape, rules=tuple(self["link-rule"]))

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
                            default_ttl=min(default(GossipConfig, "default_ttl"), self["max-ttl"]), min_pow=self["min-pow"])

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
            max_connections=self["max-connections"],
            max_per_ip=self["max-per-ip"],
            max_depth=self["max-depth"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
            handshake_timeout=self["handshake-timeout"],
            # Peers that only learn our port must know to dial wss:// then.
            secure=self["listen"].startswith(("ssl:", "tls:")),
            trusted=tuple(self["trusted"]) or DEFAULT_TRUSTED,
            frames=self["frames"],
        )


class HangUp:
    """What SIGHUP does to a node run by twistd: as twistd's SIGUSR1 does
    for its log file, but reopening rather than rotating the file, for
    logrotate and the like, which move it away first. On standard output
    there is nothing to reopen; the node goes on either way."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _received(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen)

    def reopen(self) -> None:
        # twistd keeps its LogFile to itself (only its SIGUSR1 handler knows
        # it): the log files open in this process are twistd's.
        files = [o for o in gc.get_objects() if isinstance(o, logfile.BaseLogFile)]
        for f in files:
            try:
                f.reopen()
            except OSError as e:
                log.error("SIGHUP: cannot reopen the log file {path}: {why}; still writing to the old one",
                          path=f.path, why=e.strerror)
            else:
                log.info("SIGHUP: reopened the log file {path}", path=f.path)
        if not files:
            log.info("SIGHUP: no log file to reopen; the node goes on")


def makeService(config: Options, reactor: Any = None, runner: Any = None) -> NodeService:
    """Options, then configs, then the files, then build; the service listens
    when twistd starts it. ``runner`` runs the peer store's writes (default:
    a thread of its own; host.py shares one among its nodes)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    logs.set_debug(bool(config["debug"]))
    configs = config.configs()
    # A bad endpoint (syntax, TLS files) is refused before anything is locked or read.
    endpoint = _server_endpoint(reactor, config["listen"])
    # Imported before anything is locked or read: a plugin that fails to
    # import leaves the node's files as they were.
    try:
        plugins = pluginhost.load(configs.plugins.modules)
    except pluginhost.PluginError as e:
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    metrics = NodeMetrics()
    file_locks, store, node_identity, key_store, messages = _open_files(reactor, config, configs, metrics,
                                                                        runner)
    named = configs.node.bootstrap + configs.peers.static
    if named:
        # Dialed whatever the disk does: the operator named them, so a
        # failed write keeps them (said in the log) instead of rolling back.
        # Static peers are kept as bootstrap ones are: never evicted, never
        # forgotten; and named again, an unregistered one is taken back.
        store.add(named, BOOTSTRAP, durable=False, revive=True)
        store.commit().addErrback(lambda _: None)  # a failure is logged by the store
    try:
        node_service = build(reactor, configs, store, node_identity, endpoint, listen=config["listen"],
                             file_locks=file_locks, metrics=metrics, keys=key_store, messages=messages,
                             plugins=plugins)
    except pluginhost.PluginError as e:
        # An op the node serves itself: nothing was started.
        messages.close()
        for lock in file_locks:
            lock.release()
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    from autobahn.websocket import USES_NVX

    log.info("foxnode {node_id}: peers file {path} ({n} known), data dir {dir}, "
             "Autobahn native acceleration {nvx}, plugins {plugins}",
             node_id=node_identity.node_id, path=os.path.abspath(config["peers-file"]),
             n=len(store), dir=os.path.abspath(config["data-dir"]), nvx="on" if USES_NVX else "off",
             plugins=", ".join(p.name for p in plugins) or "none")
    if config.parent is not None:
        # Run by twistd, which leaves SIGHUP at its default: the end of the
        # process, without its shutdown.
        node_service.hangup = HangUp(reactor)
    return node_service


def _open_files(reactor: Any, config: Options, configs: Configs, metrics: NodeMetrics,
                runner: Any = None) -> tuple[list[locks.FileLock], PeerStore, identity.Identity, keys.KeyStore,
                                             msgstore.MessageStore]:
    """Lock the node's files, then read the peer store, the key and the key
    store; any fault ends the start in one line, with nothing left locked
    and no file written."""
    # Locked before anything is read, so a second node on either file
    # neither shares the key nor overwrites the store.
    try:
        file_locks = locks.lock_node_files(config["data-dir"], config["peers-file"])
    except locks.LockError as e:
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    # The store first: a node refused for its peers file leaves nothing behind.
    try:
        store = PeerStore.open(reactor, config["peers-file"], max_peers=configs.store.max_peers,
                               flush_delay=configs.store.flush_delay, on_write=metrics.store_writes.observe,
                               runner=runner)
        # Read before node.key may be created: a refused start leaves the data directory as it was.
        key_store = keys.KeyStore.open(reactor, os.path.join(config["data-dir"], keys.KEY_FILE),
                                       configs.keys)
        messages_path = os.path.join(config["data-dir"], msgstore.STORE_FILE)
        msgstore.check_file(messages_path)
        node_identity = identity.load_or_create(config["data-dir"])
        messages = msgstore.MessageStore.open(messages_path, configs.history.max_store_bytes)
    except (StoreError, identity.IdentityError, keys.KeyStoreError, msgstore.MessageStoreError) as e:
        for lock in file_locks:
            lock.release()
        raise SystemExit(f"foxnode: cannot start: {e}") from None
    return file_locks, store, node_identity, key_store, messages


def _server_endpoint(reactor: Any, description: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except OSError as e:  # a TLS key or certificate file
        why = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    except (SSL.Error, crypto.Error) as e:
        why = f"cannot load the TLS key or certificate: {e}"
    except IndexError:
        why = "systemd passed no such socket (start it through its .socket unit)"
    except Exception as e:  # ValueError, TypeError, KeyError: the endpoint syntax
        why = str(e) or type(e).__name__
    raise SystemExit(f"foxnode: cannot start: --listen {description}: {why}")
