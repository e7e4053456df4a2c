"""The peer manager: which addresses to dial, the ``hello`` handshake, one
connection per pair of nodes, and discovery by peer exchange.

Dialing. A node may know thousands of addresses but keeps only a few
outbound connections, so instead of one ``ClientService`` per address (each
retrying its one endpoint forever) a scheduler picks, once a tick, which
eligible addresses to dial, as go-ethereum's dial scheduler and btcd's
connection manager do. Each dial uses Autobahn's client factory over a
Twisted client endpoint; per-address retry delays come from Twisted's
``backoffPolicy`` (growing, jittered, capped), reset by a good handshake.
Outbound connections, concurrent dials and the dial rate are bounded, so a
flood of registered addresses cannot make the node hammer anyone.

Handshake. The listening side puts a fresh nonce and its node id in the
WebSocket upgrade response (protocol.py). The dialer's ``hello`` carries its
node id, network, protocol version, listening port or advertised address, a
fresh nonce of its own, and its signature over ``hello_proof("dialer", ...)``;
the listener checks it and answers with its own id and its signature over
the same values with the role ``"listener"``. Each proof names the role,
the network, both nonces and both node ids, and each side checks the
other's with the values it saw itself (its own nonce, its own id), so a
signature taken from one connection proves nothing on another: not in the
other role, not to another node, not a second time. What no handshake
without a secure channel can stop is a full relay: a node in the middle
that passes every byte both ways is a proxy (TLS is the answer to that).
Either side ends the connection, with ``{code, text, retry_after?}`` in the
reply and the code in the close frame, on: wrong network, incompatible
version, bad proof, a connection to itself, a second connection to a node
already connected, or too many peers.

Peer exchange hands on only addresses this node completed a handshake with
by dialing them itself. The address an inbound peer advertises is only its
claim; the node proves it with a *probe*: a dial whose ``hello`` says
``"probe": true``, which the listener answers with its proof and then
closes, without making the prober a peer.

One connection per pair. When a second connection to a connected node
completes its handshake, both sides keep the one dialed by the node with
the greater id and close the other, so a simultaneous dial ends with
exactly one connection, never zero.
"""

from __future__ import annotations

import heapq
import os
import random
import string
import time
from typing import Any, Callable

import attrs
import orjson
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from foxnode import PROTOCOL_VERSION, __version__, address, codec, identity, logs
from foxnode.client import endpoint_for
from foxnode.limits import TokenBucket
from foxnode.protocol import CLOSE_NORMAL, FoxClientFactory
from foxnode.store import EXCHANGE, HANDSHAKE

log = logs.logger(__name__)

# Machine-readable reasons a peer connection ends, with their close codes.
WRONG_NETWORK = "wrong-network"
INCOMPATIBLE_VERSION = "incompatible-version"
BAD_PROOF = "bad-proof"
SELF = "self"
DUPLICATE = "duplicate"
TOO_MANY_PEERS = "too-many-peers"
BAD_HELLO = "bad-hello"
CLOSE_CODES = {
    WRONG_NETWORK: 4001,
    INCOMPATIBLE_VERSION: 4002,
    BAD_PROOF: 4003,
    SELF: 4004,
    DUPLICATE: 4005,
    TOO_MANY_PEERS: 4006,
    BAD_HELLO: 4007,
}
_CODE_OF_CLOSE = {v: k for k, v in CLOSE_CODES.items()}


@attrs.frozen
class PeerConfig:
    max_outbound: int = 8
    max_inbound: int = 24
    #: dials in flight at once, and dials started per second
    max_dialing: int = 4
    dial_rate: float = 4.0
    dial_timeout: float = 10.0
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
    tick: float = 1.0
    trust_roots: str | None = None


class HandshakeRefused(Exception):
    def __init__(self, code: str, text: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.retry_after = retry_after

    def reason(self) -> dict[str, Any]:
        r: dict[str, Any] = {"code": self.code, "text": self.text}
        if self.retry_after is not None:
            r["retry_after"] = self.retry_after
        return r


DIALER = "dialer"
LISTENER = "listener"
#: addresses waiting for a probe at most (each came with an inbound peer)
MAX_UNPROVEN = 256
_HEX = frozenset(string.hexdigits)


def hello_proof(role: str, network: str, listener_nonce: str, dialer_nonce: str,
                dialer_id: str, listener_id: str) -> bytes:
    """What the ``role`` side of one handshake signs: the role, the network,
    both sides' fresh nonces and both node ids. Encoded as a JSON list, so
    that no value can run into the next."""
    if role not in (DIALER, LISTENER):
        raise ValueError(f"role must be {DIALER!r} or {LISTENER!r}")
    return orjson.dumps(["foxnode-hello/2", role, network, listener_nonce, dialer_nonce,
                         dialer_id, listener_id])


def is_nonce(value: object) -> bool:
    """A handshake nonce: 16 to 128 hex digits."""
    return isinstance(value, str) and 16 <= len(value) <= 128 and _HEX.issuperset(value)


class PeerManager:
    def __init__(self, node: Any, config: PeerConfig | None = None) -> None:
        self.node = node
        self.reactor = node.reactor
        self.config = config or PeerConfig()
        #: node id -> the one live, handshaken connection to that node
        self.peers: dict[str, Any] = {}
        #: address -> connection attempt in flight, and its protocol once connected
        self.dialing: dict[str, Deferred] = {}
        self._dial_conns: dict[str, Any] = {}
        self._next_attempt: dict[str, float] = {}
        self._backoff = backoffPolicy(
            initialDelay=self.config.backoff_initial, maxDelay=self.config.backoff_max,
            factor=2.0, jitter=lambda: random.uniform(0, self.config.backoff_initial))
        self._dial_tokens = TokenBucket(self.config.dial_rate, max(1.0, self.config.dial_rate),
                                        self.reactor.seconds)
        self._ticker = LoopingCall(self.tick)
        self._ticker.clock = self.reactor
        self._exchanger = LoopingCall(self._exchange_round)
        self._exchanger.clock = self.reactor
        self._soon: Any = None
        #: addresses inbound peers advertised, to be proven by a probe (in order)
        self._unproven: dict[str, None] = {}
        self.running = False
        node.peers = self
        node.add_op("hello", self.op_hello)
        node.add_op("exchange", self.op_exchange)
        node.on_new_addresses.append(lambda addrs: self.tick_soon())
        node.lost_hooks.append(self.connection_lost)
        node.start_hooks.append(self.start)
        node.stop_hooks.append(self.stop)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self._ticker.start(self.config.tick, now=True)
        self._exchanger.start(self.config.exchange_interval, now=False)

    def stop(self) -> None:
        self.running = False
        for call in (self._ticker, self._exchanger):
            if call.running:
                call.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        for attempt in list(self.dialing.values()):
            attempt.cancel()
        for conn in list(self._dial_conns.values()):
            conn.close(CLOSE_NORMAL, "node shutting down")

    def tick_soon(self) -> None:
        if self.running and (self._soon is None or not self._soon.active()):
            self._soon = self.reactor.callLater(0, self.tick)

    # -- who is connected ----------------------------------------------------------

    def outbound(self) -> int:
        return sum(1 for c in self.peers.values() if c.direction == "out")

    def inbound(self) -> int:
        return sum(1 for c in self.peers.values() if c.direction == "in")

    def _connected_addresses(self) -> set[str]:
        return {c.fox_state.get("dial_addr") or c.peer_addr for c in self.peers.values()}

    def state_of(self, record: Any, connected: set[str]) -> str:
        """``connected``: the addresses of live peers (``_connected_addresses``)."""
        if record.is_self:
            return "self"
        if record.node_id in self.peers or record.addr in connected:
            return "connected"
        if record.addr in self.dialing:
            return "dialing"
        if record.failures:
            return "failing" if record.failures >= 3 else "backoff"
        return "idle"

    def peer_states(self, limit: int = 500) -> list[dict[str, Any]]:
        now = self.reactor.seconds()
        connected = self._connected_addresses()
        out = []
        for r in self.node.store.records()[:limit]:
            entry = {"addr": r.addr, "state": self.state_of(r, connected), "node_id": r.node_id,
                     "source": r.source, "failures": r.failures, "last_error": r.last_error}
            retry = self._next_attempt.get(r.addr)
            if retry is not None and retry > now:
                entry["retry_in"] = round(retry - now, 1)
            out.append(entry)
        return out

    # -- dialing ---------------------------------------------------------------------

    def candidates(self, now: float, limit: int | None = None) -> list[Any]:
        """Addresses worth dialing now, best first (the best ``limit``)."""
        connected_ids = set(self.peers)
        connected_addrs = self._connected_addresses()
        wall = time.time()
        out = []
        for r in self.node.store.records():
            if (r.is_self or r.addr in self.dialing or r.addr in connected_addrs
                    or (r.node_id is not None and r.node_id in connected_ids)
                    or self._next_attempt.get(r.addr, 0) > now):
                continue
            if self._expired(r, wall):
                self.node.store.remove(r.addr)
                self._next_attempt.pop(r.addr, None)
                log.info("forgot peer {addr}: failing since {since:.0f}s ({error})", addr=r.addr,
                         since=wall - (r.last_handshake or r.added), error=r.last_error)
                continue
            out.append(r)
        # Bootstrap and proven addresses first, then the least failing.
        def rank(r: Any) -> tuple:
            return (r.source != "bootstrap" and not r.verified, r.failures, random.random())

        if limit is not None:
            return heapq.nsmallest(limit, out, key=rank)
        return sorted(out, key=rank)

    def _expired(self, record: Any, wall: float) -> bool:
        if record.failures == 0 or record.source == "bootstrap":
            return False
        limit = self.config.forget_verified_after if record.verified else self.config.forget_after
        return wall - (record.last_handshake or record.added) > limit

    def tick(self) -> None:
        if not self.running:
            return
        now = self.reactor.seconds()
        free = self.config.max_outbound - self.outbound() - len(self.dialing)
        if free <= 0 or len(self.dialing) >= self.config.max_dialing or not self._dial_tokens.ready():
            # Decided before scanning the store: a register flood ticks
            # often, and the periodic tick comes back for what waits.
            self._probe_some()
            return
        for record in self.candidates(now, limit=min(free, self.config.max_dialing)):
            if free <= 0 or len(self.dialing) >= self.config.max_dialing or not self._dial_tokens.take():
                break
            try:
                # Outcomes are logged and recorded by dial() itself.
                self.dial(record.addr).addErrback(lambda f: None)
            except Exception:
                # Never let one address stop the scheduler.
                log.failure("cannot dial {addr}", addr=record.addr)
                self._next_attempt[record.addr] = now + self.config.backoff_max
            free -= 1
        self._probe_some()

    def _probe_some(self) -> None:
        """Probe addresses inbound peers advertised, within the dial bounds
        (concurrent dials, dial rate) but outside ``max_outbound``: a probe
        closes as soon as it has its answer."""
        store = self.node.store
        for addr in list(self._unproven):
            if len(self.dialing) >= self.config.max_dialing:
                return
            record = store.get(addr)
            if record is None or record.dialed or record.is_self:
                del self._unproven[addr]
                continue
            if addr in self.dialing:
                continue
            if not self._dial_tokens.take():
                return
            del self._unproven[addr]
            try:
                self.dial(addr, probe=True).addErrback(lambda f: None)
            except Exception:
                log.failure("cannot probe {addr}", addr=addr)

    def _want_proof(self, addr: str) -> None:
        if addr not in self._unproven and len(self._unproven) < MAX_UNPROVEN:
            self._unproven[addr] = None
            self.tick_soon()

    def dial(self, addr: str, probe: bool = False) -> Deferred:
        """Connect to ``addr`` and say hello; fires with the connection or
        fails with the reason. Bookkeeping (backoff, record) is done here.
        A ``probe`` only proves who listens there: it closes once answered
        and fires with the connection closing."""
        self.node.metrics.dials.labels("started").inc()
        parsed = address.parse(addr)
        c = self.node.config
        factory = FoxClientFactory(addr, self.node, self.reactor,
                                   max_message_size=c.max_message_size, send_queue=c.send_queue,
                                   max_in_flight=c.max_in_flight,
                                   max_depth=c.max_depth, ping_interval=c.ping_interval,
                                   ping_timeout=c.ping_timeout, open_timeout=self.config.dial_timeout)
        endpoint = endpoint_for(self.reactor, parsed, self.config.trust_roots, self.config.dial_timeout)
        log.debug("dialing {addr}", addr=addr)
        d = endpoint.connect(factory)
        self.dialing[addr] = d

        def opened(proto: Any) -> Deferred:
            proto.fox_state["dial_addr"] = addr
            if probe:
                proto.fox_state["probe"] = True
            self._dial_conns[addr] = proto
            return proto.when_opened().addCallback(self._say_hello, addr)

        d.addCallback(opened)
        d.addTimeout(self.config.dial_timeout * 3, self.reactor)
        d.addCallbacks(self._dialed, self._dial_failed, errbackArgs=(addr,))
        d.addBoth(self._dial_done, addr)
        return d

    def _dial_done(self, result: Any, addr: str) -> Any:
        self.dialing.pop(addr, None)
        self._dial_conns.pop(addr, None)
        self.tick_soon()
        return result

    def _say_hello(self, proto: Any, addr: str) -> Deferred:
        listener_nonce, listener_id = proto.server_nonce, proto.server_node_id
        if not is_nonce(listener_nonce) or not identity.is_node_id(listener_id):
            proto.close(CLOSE_CODES[BAD_HELLO], BAD_HELLO)
            raise HandshakeRefused(BAD_HELLO, "the upgrade response lacks a nonce or node id "
                                              f"(a node older than protocol {PROTOCOL_VERSION}?)")
        nonce = os.urandom(16).hex()
        args = self._hello_args(nonce)
        if proto.fox_state.get("probe"):
            args["probe"] = True
        args["signature"] = self.node.identity.sign(hello_proof(
            DIALER, self.node.config.network, listener_nonce, nonce, self.node.node_id, listener_id))
        d = proto.request("hello", args, timeout=self.config.dial_timeout)
        d.addCallback(self._hello_answered, proto, addr, nonce)
        return d

    def _hello_args(self, nonce: str) -> dict[str, Any]:
        args: dict[str, Any] = {
            "node_id": self.node.node_id,
            "network": self.node.config.network,
            "version": PROTOCOL_VERSION,
            "agent": f"foxnode/{__version__}",
            "nonce": nonce,
        }
        if self.node.config.advertise:
            args["advertise"] = self.node.config.advertise
        if self.node.listen_port is not None:
            args["port"] = self.node.listen_port
            if self.node.config.secure:
                args["secure"] = True
        return args

    def _hello_answered(self, reply: codec.Reply, proto: Any, addr: str, nonce: str) -> Any:
        if not reply.ok():
            refusal = _refusal_from(reply)
            if refusal.code == TOO_MANY_PEERS and isinstance(reply.response, dict):
                self._learn(proto, reply.response.get("peers"), "a full peer")
            proto.close(CLOSE_CODES.get(refusal.code, CLOSE_NORMAL), refusal.code)
            raise refusal
        listener_id = proto.server_node_id

        def listener_proof(remote: dict[str, Any]) -> bytes:
            if remote["node_id"] != listener_id:
                raise HandshakeRefused(BAD_PROOF, "the reply's node id is not the one the upgrade named")
            return hello_proof(LISTENER, self.node.config.network, proto.server_nonce, nonce,
                               self.node.node_id, listener_id)

        try:
            remote = self._check_hello(reply.response, listener_proof, dialer=False)
        except HandshakeRefused as refusal:
            proto.close(CLOSE_CODES[refusal.code], refusal.code)
            raise
        if proto.fox_state.get("probe"):
            self._proven(addr, remote["node_id"])
            proto.close(CLOSE_NORMAL, "probe answered")
            return proto
        self._admit(proto, remote, addr)
        return proto

    def _proven(self, addr: str, node_id: str) -> None:
        """``addr`` led to ``node_id``, in a handshake this node dialed."""
        now = time.time()
        self._next_attempt.pop(addr, None)
        self.node.store.update(addr, node_id=node_id, last_handshake=now, last_dialed=now,
                               last_seen=now, failures=0, last_error=None)

    def _dialed(self, proto: Any) -> Any:
        self.node.metrics.dials.labels("connected").inc()
        return proto

    def _dial_failed(self, failure: Any, addr: str) -> Any:
        half_open = self._dial_conns.get(addr)
        if half_open is not None and half_open.node_id is None:
            # Timed out or refused mid-handshake: don't leave the socket behind.
            half_open.close(CLOSE_NORMAL, "handshake failed")
        if self.running:  # a dial cancelled by stop() says nothing of the address
            self._record_failure(failure, addr)
        return failure

    def _record_failure(self, failure: Any, addr: str) -> None:
        store = self.node.store
        record = store.get(addr)
        error = failure.value
        if isinstance(error, HandshakeRefused):
            why = error.code
        else:
            why = _short_error(error)
        self.node.metrics.dials.labels(why if isinstance(error, HandshakeRefused) else "failed").inc()
        if record is None:
            return None
        now = self.reactor.seconds()
        if isinstance(error, HandshakeRefused) and error.code == SELF:
            store.update(addr, is_self=True, node_id=self.node.node_id, last_error="this node itself")
            log.info("{addr} is this node itself; it will not be dialed again", addr=addr)
            return None
        if isinstance(error, HandshakeRefused) and error.code in (DUPLICATE, TOO_MANY_PEERS):
            # Not the address's fault: come back later, without counting a failure.
            self._next_attempt[addr] = now + (error.retry_after or self.config.backoff_max)
            store.update(addr, last_error=error.code)
            return None
        failures = record.failures + 1
        delay = self._backoff(failures - 1)
        self._next_attempt[addr] = now + delay
        store.update(addr, failures=failures, last_error=why)
        log.info("dial {addr} failed ({why}); attempt {n}, next in {delay:.1f}s",
                 addr=addr, why=why, n=failures, delay=delay)
        return None

    # -- the handshake, listening side --------------------------------------------------

    def op_hello(self, conn: Any, args: Any) -> codec.Reply:
        if conn.direction != "in":
            return codec.forbidden("hello is sent by the dialing node")
        if conn.node_id is not None:
            return codec.forbidden("hello was already said on this connection")
        my_nonce = getattr(conn, "handshake_nonce", "")

        def dialer_proof(remote: dict[str, Any]) -> bytes:
            return hello_proof(DIALER, self.node.config.network, my_nonce, remote["nonce"],
                               remote["node_id"], self.node.node_id)

        try:
            remote = self._check_hello(args, dialer_proof, dialer=True)
            addr = self._remote_address(conn, remote)
            if not remote.get("probe"):
                self._check_admission(conn, remote)
        except HandshakeRefused as refusal:
            log.info("refused peer from {host}: {code} ({text})", host=conn.remote_host,
                     code=refusal.code, text=refusal.text)
            self.node.metrics.disconnects.labels(refusal.code).inc()
            # Close after the reply has gone out.
            self.reactor.callLater(0, conn.close, CLOSE_CODES[refusal.code], refusal.code)
            reason = refusal.reason()
            if refusal.code == TOO_MANY_PEERS:
                # Turned away, a node whose only bootstrap we are would know
                # no one: tell it where else to go.
                reason["peers"] = self.sample_for(conn)
            status = {TOO_MANY_PEERS: 503, BAD_HELLO: 400}.get(refusal.code, 403)
            return codec.Reply(status, refusal.text, reason)
        response = self._hello_args("")
        del response["nonce"]
        response["signature"] = self.node.identity.sign(hello_proof(
            LISTENER, self.node.config.network, my_nonce, remote["nonce"], remote["node_id"],
            self.node.node_id))
        response["observed"] = conn.remote_host
        if remote.get("probe"):
            # Only proving who listens here: no peer, nothing recorded.
            response["probe"] = True
            self.reactor.callLater(0, conn.close, CLOSE_NORMAL, "probe answered")
            return codec.ok(response)
        self._admit(conn, remote, addr)
        return codec.ok(response)

    def _remote_address(self, conn: Any, remote: dict[str, Any]) -> str | None:
        """The address to dial the remote at: its ``advertise``, else the
        port it announced at the address its connection came from."""
        if remote.get("advertise") is not None:
            return address.parse(remote["advertise"]).url
        port = remote.get("port")
        if port is not None:
            return address.with_host(port, conn.remote_host, secure=remote.get("secure") is True)
        return None

    def _check_hello(self, args: Any, proof_of: Callable[[dict[str, Any]], bytes],
                     dialer: bool) -> dict[str, Any]:
        """Validate the other side's hello (a dialer's request, or the
        listener's reply) and its proof: ``proof_of(args)`` is what the other
        side must have signed, made of the values this side saw. Every
        refusal names the field."""
        if not isinstance(args, dict):
            raise HandshakeRefused(BAD_HELLO, 'hello needs "args": an object')
        node_id = args.get("node_id")
        if not identity.is_node_id(node_id):
            raise HandshakeRefused(BAD_HELLO, '"node_id" must be a string of 64 hex characters')
        network = args.get("network")
        if not isinstance(network, str):
            raise HandshakeRefused(BAD_HELLO, '"network" must be a string')
        if network != self.node.config.network:
            raise HandshakeRefused(WRONG_NETWORK, f'"network": this node is on network {self.node.config.network!r}')
        version = args.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise HandshakeRefused(BAD_HELLO, '"version" must be a whole number')
        if version != PROTOCOL_VERSION:
            raise HandshakeRefused(INCOMPATIBLE_VERSION, f'"version": this node speaks protocol {PROTOCOL_VERSION}')
        if dialer and not is_nonce(args.get("nonce")):
            raise HandshakeRefused(BAD_HELLO, '"nonce" must be a string of 16 to 128 hex digits')
        for name, valid, what in _OPTIONAL_FIELDS:
            if name in args and not valid(args[name]):
                raise HandshakeRefused(BAD_HELLO, f'"{name}" must be {what}')
        signature = args.get("signature")
        if not isinstance(signature, str):
            raise HandshakeRefused(BAD_HELLO, '"signature" must be a string (hex)')
        if not identity.verify(node_id, signature, proof_of(args)):
            raise HandshakeRefused(BAD_PROOF, '"signature" does not prove the node id on this connection')
        if node_id == self.node.node_id:
            raise HandshakeRefused(SELF, "this is a connection to the node itself")
        return args

    def _check_admission(self, conn: Any, remote: dict[str, Any]) -> None:
        existing = self.peers.get(remote["node_id"])
        if existing is not None and self._winner(existing, conn, remote["node_id"]) is existing:
            raise HandshakeRefused(DUPLICATE, "already connected to this node",
                                   retry_after=self.config.backoff_max)
        if existing is None and self.inbound() >= self.config.max_inbound:
            raise HandshakeRefused(TOO_MANY_PEERS, "this node has all the inbound peers it takes",
                                   retry_after=self.config.backoff_max)

    def _winner(self, a: Any, b: Any, remote_id: str) -> Any:
        """Of two connections to the same node, the one both sides keep:
        the one dialed by the node with the greater id; on a tie (both
        dialed by the same node) the older one."""
        def dialer(c: Any) -> str:
            return self.node.node_id if c.direction == "out" else remote_id

        if dialer(a) == dialer(b):
            return a
        return a if dialer(a) > dialer(b) else b

    # -- a connection becomes a peer ----------------------------------------------------

    def _admit(self, conn: Any, remote: dict[str, Any], addr: str | None) -> None:
        remote_id = remote["node_id"]
        existing = self.peers.get(remote_id)
        if existing is not None and existing is not conn:
            if self._winner(existing, conn, remote_id) is existing:
                conn.close(CLOSE_CODES[DUPLICATE], DUPLICATE)
                raise HandshakeRefused(DUPLICATE, "already connected to this node",
                                       retry_after=self.config.backoff_max)
            log.info("replacing connection to {peer} by the one both sides keep", peer=remote_id[:12])
            existing.fox_state["replaced"] = True
            existing.close(CLOSE_CODES[DUPLICATE], DUPLICATE)
            self._forget(existing)
        conn.node_id = remote_id
        dial_addr = conn.fox_state.get("dial_addr")
        conn.peer_addr = dial_addr or addr
        self.peers[remote_id] = conn
        self.node.metrics.peer_connections.labels(conn.direction).inc()
        now = time.time()
        store = self.node.store
        if dial_addr is not None:
            self._proven(dial_addr, remote_id)
        if addr is not None and addr != dial_addr and self._shareable_from(conn, addr):
            store.add([addr], HANDSHAKE, durable=False)
            record = store.get(addr)
            if record is not None and not record.dialed:
                # Only the peer's claim: noted (so that it is not dialed
                # while connected), and proven by a probe of our own before
                # it is handed on. An address already proven is not a
                # stranger's to rename.
                store.update(addr, node_id=remote_id, last_seen=now)
                self._want_proof(addr)
        log.info("peer {peer} connected ({direction}, {addr})", peer=remote_id[:12],
                 direction=conn.direction, addr=conn.peer_addr)
        # Learn the remote's peers now, then every exchange_interval.
        self.reactor.callLater(0, self.exchange_with, conn)

    def _shareable_from(self, conn: Any, addr: str) -> bool:
        try:
            parsed = address.parse(addr)
        except address.InvalidAddress:
            return False
        # An outside peer claiming a loopback address would have us dial ourselves.
        return not parsed.is_loopback or address.is_loopback_host(conn.remote_host)

    def _forget(self, conn: Any) -> None:
        if conn.node_id is not None and self.peers.get(conn.node_id) is conn:
            del self.peers[conn.node_id]
            self.node.metrics.peer_connections.labels(conn.direction).dec()

    def connection_lost(self, conn: Any, code: int | None, reason: str | None) -> None:
        if conn.node_id is None or self.peers.get(conn.node_id) is not conn:
            return
        self._forget(conn)
        why = _CODE_OF_CLOSE.get(code or 0) or (f"closed {code}" if code else "connection lost")
        if reason and code not in _CODE_OF_CLOSE:
            why += f": {reason}"
        self.node.metrics.disconnects.labels(_CODE_OF_CLOSE.get(code or 0, "closed")).inc()
        log.info("peer {peer} disconnected ({direction}, {addr}): {why}", peer=conn.node_id[:12],
                 direction=conn.direction, addr=conn.peer_addr, why=why)
        dial_addr = conn.fox_state.get("dial_addr")
        for addr in {dial_addr, conn.peer_addr} - {None}:
            if addr in self.node.store:
                self.node.store.update(addr, last_seen=time.time(), last_error=why)
                # Come back soon (jittered), as for a first retry.
                self._next_attempt[addr] = self.reactor.seconds() + self._backoff(0)
        self.tick_soon()

    # -- peer exchange ------------------------------------------------------------------

    def op_exchange(self, conn: Any, args: Any) -> codec.Reply:
        if conn.node_id is None:
            return codec.forbidden("exchange is for peers that said hello")
        return codec.ok({"peers": self.sample_for(conn), "connected": list(self.peers)})

    def sample_for(self, conn: Any) -> list[str]:
        """A bounded random sample of the addresses this node itself dialed
        and completed a handshake with, and that have not failed since."""
        remote_is_loopback = address.is_loopback_host(conn.remote_host)
        good = []
        for r in self.node.store.records():
            if r.is_self or not r.dialed or r.failures or r.node_id == conn.node_id:
                continue
            if not remote_is_loopback and address.parse(r.addr).is_loopback:
                continue
            good.append(r.addr)
        if self.node.config.advertise and self.node.config.advertise not in good:
            good.append(self.node.config.advertise)
        return random.sample(good, min(len(good), self.config.exchange_sample))

    def exchange_with(self, conn: Any) -> Deferred | None:
        if not conn.fox_open or self.peers.get(conn.node_id) is not conn:
            return None
        d = conn.request("exchange", timeout=self.config.dial_timeout)
        d.addCallback(self._exchanged, conn)
        d.addErrback(lambda f: log.debug("exchange with {peer} failed: {e}",
                                         peer=conn.node_id[:12] if conn.node_id else "?", e=f.value))
        return d

    def _exchanged(self, reply: codec.Reply, conn: Any) -> None:
        if not reply.ok() or not isinstance(reply.response, dict):
            return
        connected = reply.response.get("connected")
        if isinstance(connected, list):
            conn.fox_state["neighbours"] = [n for n in connected[:256] if identity.is_node_id(n)]
        self._learn(conn, reply.response.get("peers"), conn.node_id[:12])

    def _learn(self, conn: Any, offered: Any, who: str) -> None:
        """Take a bounded number of addresses offered by another node."""
        if not isinstance(offered, list):
            return
        store = self.node.store
        room = self.config.exchange_cap - sum(1 for r in store.records() if r.source == EXCHANGE)
        learned = []
        for addr in offered[: self.config.exchange_sample]:
            if len(learned) >= room:
                break
            try:
                parsed = address.parse(addr)
            except address.InvalidAddress:
                continue
            if parsed.url in store or not self._shareable_from(conn, parsed.url):
                continue
            learned.append(parsed.url)
        if learned:
            result = store.add(learned, EXCHANGE, durable=False)
            log.info("learned {n} addresses from {peer}", n=len(result.accepted), peer=who)
            self.tick_soon()

    def _exchange_round(self) -> None:
        for conn in list(self.peers.values()):
            self.exchange_with(conn)
        # Retry times of addresses the store has since dropped or evicted.
        store = self.node.store
        for addr in [a for a in self._next_attempt if a not in store]:
            del self._next_attempt[addr]

    def topology(self) -> dict[str, Any]:
        """The nodes and links this node can see: its own connections and
        its neighbours' (from the last exchange)."""
        me = self.node.node_id
        nodes = {me}
        links = set()
        for peer_id, conn in self.peers.items():
            nodes.add(peer_id)
            links.add(tuple(sorted((me, peer_id))))
            for n in conn.fox_state.get("neighbours", []):
                nodes.add(n)
                links.add(tuple(sorted((peer_id, n))))
        return {"nodes": sorted(nodes), "links": sorted(list(l) for l in links)}


def _is_address(value: object) -> bool:
    try:
        address.parse(value)
    except address.InvalidAddress:
        return False
    return True


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


#: fields a hello may carry, how each must look, and how that is said
_OPTIONAL_FIELDS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("port", _is_port, "a port number, 1 to 65535"),
    ("secure", lambda v: isinstance(v, bool), "true or false"),
    ("advertise", _is_address, f"a ws:// or wss:// address of at most {address.MAX_ADDRESS_LENGTH} characters"),
    ("agent", lambda v: isinstance(v, str) and len(v) <= 256, "a string of at most 256 characters"),
    ("probe", lambda v: isinstance(v, bool), "true or false"),
)


def _refusal_from(reply: codec.Reply) -> HandshakeRefused:
    body = reply.response if isinstance(reply.response, dict) else {}
    code = body.get("code") if body.get("code") in CLOSE_CODES else BAD_HELLO
    retry = body.get("retry_after")
    return HandshakeRefused(code, reply.error, retry if isinstance(retry, (int, float)) else None)


def _short_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
