"""The node: what each op does, independent of sockets.

A ``Node`` is the handler behind every WebSocket connection (see
protocol.py). Ops are plain methods taking the connection and the request's
``args`` and returning a ``codec.Reply`` or a Deferred of one, so they are
tested by calling them. The node serves its own ops (the lab's
``register`` and ``peers``, and ``info``; the lab's ``time`` is a plugin's,
plugins/time.py); the other parts' ops and pushed events are put in its tables, and its references to
the peer manager and gossip set, by service.py's ``build``, which is the
one place the parts are connected. The node tells them, in a fixed order,
of every connection that closes.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Mapping

import orjson
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from foxnode import PROTOCOL_VERSION, __version__, address, codec, logs
from foxnode.config import NodeConfig
from foxnode.identity import Identity
from foxnode.metrics import NodeMetrics
from foxnode.limits import TokenBucket, client_key
from foxnode.protocol import CLOSE_RATE_LIMIT, CLOSE_SHUTDOWN
from foxnode.store import REGISTER, PeerStore, StoreDurabilityError, StoreWriteError

if TYPE_CHECKING:
    from foxnode.gossip import Gossip
    from foxnode.peers import PeerManager

log = logs.logger(__name__)

#: Bytes of a reply besides its response: the head, and an id.
REPLY_MARGIN = 1024


def is_trusted_host(host: str, trusted: tuple) -> bool:
    """Whether a remote IP address falls in one of the ``trusted``
    networks (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # not an IP address (a UNIX socket, a test transport)
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip.version == net.version and ip in net for net in trusted)


#: An op: (connection, the request's args) -> a Reply, or a Deferred of one.
Op = Callable[[Any, Any], Any]
#: A handler of a pushed event: (connection, the event).
EventHandler = Callable[[Any, codec.Event], None]


class Node:
    def __init__(self, reactor: Any, config: NodeConfig, identity: Identity,
                 store: PeerStore, metrics: NodeMetrics | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.identity = identity
        self.store = store
        self.metrics = metrics or NodeMetrics()
        self.metrics.watch_store(lambda: len(self.store))
        self.started = reactor.seconds()
        #: the TCP port we listen on, once listening
        self.listen_port: int | None = None
        self.connections: set = set()
        #: WebSocket connections (open or opening) per remote IP address
        self._per_ip: Counter[str] = Counter()
        self.stopping = False
        #: the peer manager and gossip, set by service.build
        self.peers: PeerManager | None = None
        self.gossip: Gossip | None = None
        self._peers_cache: tuple[int, bytes, list[str] | None] = (-1, b"", None)
        #: the ops table: every op served, by name (tests walk it)
        self._ops: dict[str, Op] = {}
        #: ops only the node's operator (``conn.trusted``) may use
        self._operator_ops: set[str] = set()
        #: names of the loaded plugins, for ``info`` (set by service.build,
        #: which serves their ops; the lab's ``time`` is one: plugins/time.py)
        self.plugins: list[str] = []
        self.serve({"register": self.op_register, "peers": self.op_peers, "info": self.op_info})
        #: handlers of the events peers push, by event name
        self._events: dict[str, EventHandler] = {}

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def serve(self, ops: Mapping[str, Op], operator: bool = False) -> None:
        """Serve each op of ``ops`` by its name; ``operator`` ops only to
        trusted clients (PROTOCOL.md "Who may do what")."""
        for name, op in ops.items():
            self._ops[name] = op
            if operator:
                self._operator_ops.add(name)
            else:
                self._operator_ops.discard(name)

    def hear(self, events: Mapping[str, EventHandler]) -> None:
        """Hand each event peers push, by its name, to its handler."""
        self._events.update(events)

    def op_names(self) -> list[str]:
        return list(self._ops)

    def close_connections(self, wait: float = 3.0) -> Deferred:
        """Refuse new connections and close every one; fires once they
        closed, or after ``wait`` seconds: a peer that never answers does
        not hold the shutdown."""
        self.stopping = True
        conns = list(self.connections)
        for conn in conns:
            conn.close(CLOSE_SHUTDOWN, "node shutting down")
        closed = DeferredList([c.when_closed() for c in conns], consumeErrors=True)
        closed.addTimeout(wait, self.reactor)
        return closed.addErrback(lambda _: None)

    # -- ConnectionHandler -------------------------------------------------------

    def is_trusted(self, conn: Any) -> bool:
        """Whether ``conn`` comes from the node's operator (``--trusted``)."""
        return is_trusted_host(conn.remote_host, self.config.trusted)

    def connection_opened(self, conn: Any) -> None:
        # Only a client that connects to the node is its operator: a node
        # this one dialed (any address may be registered, one in a trusted
        # network too) is a peer, whatever its address.
        conn.trusted = conn.direction == "in" and self.is_trusted(conn)
        # The operator's scripts may pipeline as fast as they like; a peer
        # is budgeted whoever it is, once it said hello.
        if not conn.trusted:
            conn.rate_bucket = TokenBucket(self.config.rate, self.config.burst, self.reactor.seconds)
        conn.peer_bucket = TokenBucket(self.config.peer_rate, self.config.peer_burst, self.reactor.seconds)
        self.connections.add(conn)
        self.metrics.connections.labels(conn.direction).inc()
        if conn.direction == "in":
            # As the lab's node did ("Client connected: ..."); peers get their
            # own line once they said hello.
            log.info("client connected from {host}", host=conn.remote_host)
        if self.stopping:
            # Its opening handshake was under way when the node began to stop.
            conn.close(CLOSE_SHUTDOWN, "node shutting down")

    def admit(self, conn: Any) -> str | None:
        """Whether a new WebSocket connection may open; the reason if not."""
        if self.stopping:
            return "node shutting down"
        host = conn.remote_host
        key = client_key(host)
        if self._per_ip[key] >= self.config.max_per_ip and not self.is_trusted(conn):
            return f"too many connections from {host}" + (f" ({key})" if key != host else "")
        # Counted from the upgrade on, so a burst of handshakes counts too.
        self._per_ip[key] += 1
        conn.fox_state["counted_ip"] = key
        return None

    def rate_refused(self, conn: Any, bucket: TokenBucket) -> codec.Reply:
        """The reply to a message over the connection's rate (the bucket
        set in ``connection_opened``, which the protocol charges for every
        message, well-formed or not); closes a connection that keeps going."""
        self.metrics.rate_limited.inc()
        self._close_if_ignored(conn, bucket)
        return codec.too_many(
            f"Too many requests: the limit is {bucket.rate:g} per second; "
            f"retry after {bucket.retry_after():.2f} s.")

    def event_refused(self, conn: Any, bucket: TokenBucket) -> None:
        """A peer's pushed event over its budget: dropped and counted."""
        self.metrics.peer_events_dropped.inc()
        self._close_if_ignored(conn, bucket)

    def _close_if_ignored(self, conn: Any, bucket: TokenBucket) -> None:
        if bucket.refused > bucket.burst and conn.can_send():
            # Kept sending while told to slow down: not a client that listens.
            log.info("{conn}: closing, ignored the rate limit", conn=conn.describe())
            conn.close(CLOSE_RATE_LIMIT, "request rate limit ignored")

    def message_refused(self, conn: Any, reply: codec.Reply) -> None:
        """A message that was not a request, answered by the codec."""
        self.metrics.bad_messages.inc()
        log.debug("{host}: bad message: {why}", host=conn.remote_host, why=reply.error)

    def handle_request(self, conn: Any, request: codec.Request) -> Any:
        op = self._ops.get(request.op)
        if op is None:
            self.metrics.count_request("other", 404)
            return codec.not_found_op(request.op)
        if request.op in self._operator_ops and not conn.trusted:
            self.metrics.count_request(request.op, 403)
            return codec.forbidden(f'Operation "{request.op}" is only for trusted clients.')
        result = op(conn, request.args)
        if isinstance(result, codec.Reply):
            self.metrics.count_request(request.op, result.status)
        else:
            result.addCallback(self._counted, request.op)
        return result

    def _counted(self, reply: codec.Reply, op: str) -> codec.Reply:
        self.metrics.count_request(op, reply.status)
        return reply

    def handle_event(self, conn: Any, event: codec.Event) -> None:
        handler = self._events.get(event.name)
        if handler is None:
            log.debug("{conn}: ignored event {name!r}", conn=conn.describe(), name=event.name)
            return
        handler(conn, event)

    def connection_lost(self, conn: Any, code: int | None, reason: str | None) -> None:
        host = conn.fox_state.pop("counted_ip", None)
        if host is not None:
            self._per_ip[host] -= 1
            if not self._per_ip[host]:
                del self._per_ip[host]
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.connections.labels(conn.direction).dec()
            if conn.direction == "in" and conn.node_id is None:
                log.info("client from {host} disconnected ({code}{reason})", host=conn.remote_host,
                         code=code, reason=f": {reason}" if reason else "")
        # The peer manager first: it tells its listeners (gossip) the peer
        # is down before gossip forgets the connection's subscriptions.
        if self.peers is not None:
            self.peers.connection_lost(conn, code, reason)
        if self.gossip is not None:
            self.gossip.connection_closed(conn)

    # -- the lab's ops ---------------------------------------------------------------

    def op_register(self, conn: Any, args: Any) -> Any:
        if not isinstance(args, dict) or "addr" not in args:
            return codec.missing_args("register", "addr")
        given = args["addr"]
        if not isinstance(given, list):
            given = [given]
        valid: list[str] = []
        rejected: list[dict[str, Any]] = []
        limit = self.config.max_register_addrs
        for i, addr in enumerate(given):
            if i >= limit:
                rejected.append({"addr": addr, "reason": f"more than {limit} addresses in one request"})
                continue
            try:
                valid.append(address.parse(addr).url)
            except address.InvalidAddress as e:
                # A non-string is shown as the JSON text it came as (cut short).
                shown = addr if isinstance(addr, str) else json.dumps(addr, default=repr)[:100]
                rejected.append({"addr": shown, "reason": str(e)})
        result = self.store.add(valid, REGISTER)
        rejected.extend(result.rejected)
        response = {"accepted": result.accepted, "rejected": rejected}
        if conn.trusted:
            # The operator's pins guard their endpoints (peers.py pins_of);
            # a stranger may register pins too, but they guard only themselves.
            for addr in result.accepted:
                record = self.store.get(addr)
                if "#" in addr and record is not None and not record.operator:
                    self.store.update(addr, operator=True)
        if result.accepted and self.peers is not None:
            self.peers.addresses_added(result.accepted)

        def settled(outcome: Any) -> Any:
            if not isinstance(outcome, Failure):
                return codec.accepted(response)
            outcome.trap(StoreWriteError)
            if isinstance(outcome.value, StoreDurabilityError):
                # The file holds them and so does the store: kept and
                # listed, but not acknowledged as durable.
                return codec.unavailable(f"Peer store could not confirm the write ({outcome.value}); "
                                         "the addresses are kept, but may not survive a crash. "
                                         "Register them again to confirm.")
            return codec.unavailable(f"Peer store unavailable ({outcome.value}); "
                                     "nothing was registered. Try again later.")

        return result.durable.addBoth(settled)

    def _reply_budget(self) -> int:
        """Bytes a reply's ``response`` may take: the message size limit
        less room for the reply's head and an id."""
        return max(1024, self.config.max_message_size - REPLY_MARGIN)

    def op_peers(self, conn: Any, args: Any) -> codec.Reply:
        cursor = args.get("cursor") if isinstance(args, dict) else None
        if cursor is not None and not isinstance(cursor, str):
            return codec.bad_args("peers", '"cursor" must be the "next" of an earlier peers reply')
        generation, whole, ordered = self._peers_cache
        if generation != self.store.generation:
            # Serialized once per change of the address set, not per request.
            whole = orjson.dumps({"peers": self.store.addresses()})
            ordered = None
            self._peers_cache = (self.store.generation, whole, ordered)
        if cursor is None and len(whole) <= self._reply_budget():
            return codec.ok(orjson.Fragment(whole))  # the seed's reply, exactly
        if ordered is None:
            # Pages go in address order, so that a cursor (the last address
            # of a page) still means the same place after the store changed.
            ordered = sorted(self.store.addresses())
            self._peers_cache = (self.store.generation, whole, ordered)
        start = bisect.bisect_right(ordered, cursor) if cursor is not None else 0
        # Room for '{"peers":[],"next":' and the cursor, an address at most.
        room = self._reply_budget() - 32 - 6 * address.MAX_ADDRESS_LENGTH
        page: list[str] = []
        for addr in ordered[start:]:
            room -= len(orjson.dumps(addr)) + 1
            if room < 0 and page:
                break
            page.append(addr)
        response: dict[str, Any] = {"peers": page}
        if start + len(page) < len(ordered):
            response["next"] = page[-1] if page else cursor
        return codec.ok(response)

    def op_info(self, conn: Any, args: Any) -> codec.Reply:
        if args is not None and not isinstance(args, dict):
            return codec.bad_args("info", '"args" must be an object')
        detail = (args or {}).get("detail", False)
        if not isinstance(detail, bool):
            return codec.bad_args("info", '"detail" must be true or false')
        info = self.info(conn)
        if detail and self.peers is not None:
            # For the node's page: every known address with its dial state,
            # and the links this node can see.
            info["peers"] = self.peers.peer_states()
            info["topology"] = self.peers.topology()
            self._fit_detail(info)
        return codec.ok(info)

    def _fit_detail(self, info: dict[str, Any]) -> None:
        """Cut ``info``'s detail until it fits a message; say so."""
        budget = self._reply_budget()
        if len(orjson.dumps(info)) <= budget:
            return
        info["truncated"] = True
        peers = info["peers"]
        while peers and len(orjson.dumps(info)) > budget:
            del peers[len(peers) // 2:]
        if len(orjson.dumps(info)) > budget:
            info["topology"] = {"nodes": [], "links": []}

    # -- views -----------------------------------------------------------------------

    def listen_address(self, conn: Any = None) -> str | None:
        """Where this node can be reached: ``--advertise``, or the local
        address the asking connection came in on."""
        if self.config.advertise:
            return self.config.advertise
        if self.listen_port is None:
            return None
        host = conn.local_host if conn is not None else "127.0.0.1"
        return address.with_host(self.listen_port, host, secure=self.config.secure)

    def live_peers(self) -> list[dict[str, Any]]:
        if self.peers is None:
            return []
        return [
            {"node_id": c.node_id, "addr": c.peer_addr, "direction": c.direction,
             "kind": self.peers.kind(c)}
            for c in self.peers.peers.values()
        ]

    def info(self, conn: Any = None) -> dict[str, Any]:
        listen = self.listen_address(conn)
        return {
            "node_id": self.node_id,
            "network": self.config.network,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "listen": listen,
            # To paste into another node's register: it will dial this node
            # and no other there (PROTOCOL.md "Peer management").
            "address": address.pinned(listen, self.node_id) if listen else None,
            "uptime": round(self.reactor.seconds() - self.started, 3),
            "connected": self.live_peers(),
            # For consoles and testers (``.help``): every op this node serves.
            "ops": sorted(self._ops),
            # Envelopes below it are refused here (--min-pow): what a publisher must reach.
            "min_pow": self.gossip.config.min_pow if self.gossip is not None else 0.0,
            "plugins": list(self.plugins),
            # Link emulation on the links this node dials (links.py), or None.
            "links": self.peers.links_info() if self.peers is not None else None,
        }

    def health(self) -> dict[str, Any]:
        live = self.live_peers()
        return {
            "status": "ok",
            "node_id": self.node_id,
            "network": self.config.network,
            "version": __version__,
            "uptime": round(self.reactor.seconds() - self.started, 3),
            "peers": {
                "known": len(self.store),
                "connected": len(live),
                "inbound": sum(1 for p in live if p["direction"] == "in"),
                "outbound": sum(1 for p in live if p["direction"] == "out"),
            },
            "connections": len(self.connections),
        }
