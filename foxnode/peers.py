"""The peer manager: which addresses to dial, the ``hello`` handshake on
both sides, one connection per pair of nodes, and discovery by peer
exchange.

Dialing. A node may know thousands of addresses but keeps only a few
outbound connections, so instead of one ``ClientService`` per address (each
retrying its one endpoint forever) a scheduler picks, once a round, which
eligible addresses to dial, as go-ethereum's dial scheduler and btcd's
connection manager do. Each address's lifecycle (idle, dialing,
handshaking, connected, backoff, self, forgotten) is one record in a
``dialing.DialBook``, changed only by its transition table; this module
turns what happens on the wire into its events. Each dial uses Autobahn's
client factory over a Twisted client endpoint; per-address retry delays
come from Twisted's ``backoffPolicy`` (growing, jittered, capped), reset by
a good handshake. Outbound connections, concurrent dials and the dial rate
are bounded, so a flood of registered addresses cannot make the node hammer
anyone. The rounds and the exchanges are run by timer services (service.py).

Handshake: see handshake.py (what is sent, signed and checked). Either side
ends the connection, with ``{code, text, retry_after?}`` in the reply and
the code in the close frame, on: wrong network, incompatible version, bad
proof, a connection to itself, a second connection to a node already
connected, or too many peers.

Peer exchange hands on only addresses this node completed a handshake with
by dialing them itself. The address an inbound peer advertises is only its
claim; the node proves it with a *probe*: a dial whose ``hello`` says
``"probe": true``, which the listener answers with its proof and then
closes, without making the prober a peer.

One connection per pair. When a second connection to a connected node
completes its handshake, both sides keep the one dialed by the node with
the greater id and close the other, so a simultaneous dial ends with
exactly one connection, never zero.

Listeners. Whoever needs to know which peer links are up (gossip) is given
to the manager as a ``PeerListener`` and told ``peer_up``/``peer_down``, in
that order for each connection, after the manager's own bookkeeping.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol as TypingProtocol

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from foxnode import PROTOCOL_VERSION, address, codec, identity, links, logs
from foxnode.client import endpoint_for
from foxnode.config import PeerConfig
from foxnode.dialing import IN_FLIGHT, DialBook, Event, Seen, State, choose, expired
from foxnode.handshake import (  # noqa: F401  (the names tests and others import from here)
    BAD_HELLO, BAD_PROOF, CLOSE_CODES, CODE_OF_CLOSE, DIALER, DUPLICATE, INCOMPATIBLE_VERSION,
    LISTENER, SELF, TOO_MANY_PEERS, WRONG_NETWORK, WRONG_NODE, HandshakeRefused, check_dialer_hello,
    check_listener_hello, dialer_hello, hello_proof, is_nonce, listener_hello,
    refusal_from)
from foxnode.limits import TokenBucket
from foxnode.protocol import CLOSE_NORMAL, FoxClientFactory
from foxnode.store import BOOTSTRAP, EXCHANGE, HANDSHAKE

if TYPE_CHECKING:
    from foxnode.node import Node

log = logs.logger(__name__)

#: addresses waiting for a probe at most (each came with an inbound peer)
MAX_UNPROVEN = 256


class PeerListener(TypingProtocol):
    """What hears of peer links coming and going."""

    def peer_up(self, conn: Any) -> None: ...

    def peer_down(self, conn: Any) -> None: ...


class DialRefused(Exception):
    """``dial()`` of an address whose state allows no dial (one is in
    flight, it is connected, it is this node)."""


class PeerManager:
    """The node's peers: it dials, answers ``hello`` and ``exchange``
    (``ops``), and keeps ``peers``, node id -> the one live, handshaken
    connection to that node."""

    def __init__(self, node: "Node", config: PeerConfig | None = None,
                 listeners: Iterable[PeerListener] = (),
                 jitter: Callable[[], float] | None = None) -> None:
        self.node = node
        self.reactor = node.reactor
        self.store = node.store
        self.config = config or PeerConfig()
        self.listeners: list[PeerListener] = list(listeners)
        self.peers: dict[str, Any] = {}
        #: every address's dial lifecycle (dialing.py)
        self.book = DialBook()
        #: the draws of link emulation (links.py): jitter and loss
        self._link_rng = random.Random()
        # ``jitter``: what is added to each retry delay (tests fix it).
        rng = jitter or (lambda: random.uniform(0, self.config.backoff_initial))
        self._backoff = backoffPolicy(
            initialDelay=self.config.backoff_initial, maxDelay=self.config.backoff_max,
            factor=2.0, jitter=rng)
        self._dial_tokens = TokenBucket(self.config.dial_rate, max(1.0, self.config.dial_rate),
                                        self.reactor.seconds)
        self._soon: Any = None
        #: addresses inbound peers advertised, to be proven by a probe (in
        #: order), and the probes in flight. A probe is not a step of the
        #: address's dial lifecycle: the node behind it is connected (it
        #: dialed us), and the probe only checks its claim.
        self._unproven: dict[str, None] = {}
        self._probes: dict[str, Deferred] = {}
        self.running = False
        self.ops = {"hello": self.op_hello, "exchange": self.op_exchange}
        #: ``--static-peer`` addresses: dialed apart from the others
        self._static = set(self.config.static)
        self.operator_ops = {"unregister": self.op_unregister, "links": self.op_links}
        #: port ranges this node neither dials nor keeps dialed links to:
        #: an emulated partition (``links`` op), until healed
        self.blocked: tuple[tuple[int, int], ...] = ()
        #: (the store's generation, endpoint -> the node ids its pinned records name)
        self._pins: tuple[int, dict[str, frozenset[str]]] = (-1, {})

    # -- lifecycle (service.py's PeerService) -------------------------------------

    def start(self) -> None:
        now = self.reactor.seconds()
        for record in self.store.records():
            if record.is_self:
                self.book.mark_self(record.addr, now)
        self.running = True

    def stop(self) -> None:
        self.running = False
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        for dial in self.book.in_flight():
            if dial.conn is not None:
                dial.conn.close(CLOSE_NORMAL, "node shutting down")
            if dial.attempt is not None:
                dial.attempt.cancel()
        for probe in list(self._probes.values()):
            probe.cancel()

    def dials_in_flight(self) -> int:
        return len(self.book.in_flight()) + len(self._probes)

    def tick_soon(self) -> None:
        """Run a dial round as soon as the reactor is free (something changed)."""
        if self.running and (self._soon is None or not self._soon.active()):
            self._soon = self.reactor.callLater(0, self.dial_round)

    def addresses_added(self, addrs: list[str]) -> None:
        self._pins = (-1, {})  # an operator's pin may have come with them
        self.tick_soon()

    # -- who is connected ----------------------------------------------------------

    def outbound(self) -> int:
        """Outbound peers held to ``max_outbound`` (static peers are not)."""
        return sum(1 for c in self.peers.values() if c.direction == "out" and not self._is_static(c))

    def _is_static(self, conn: Any) -> bool:
        """Whether ``conn`` is a link to a static peer, whichever side
        dialed it: of the two links of a simultaneous dial, the one kept
        may be the peer's own (its node id tells)."""
        if conn.fox_state.get("dial_addr") in self._static:
            return True
        return conn.node_id is not None and conn.node_id in self._static_ids()

    def _static_ids(self) -> set[str]:
        ids = set()
        for addr in self._static:
            if self.blocked and self._blocked(addr):
                continue
            record = self.store.get(addr)
            pinned = address.parse(addr).node_id
            ids.update(i for i in (pinned, record.node_id if record else None) if i)
        return ids

    def kind(self, conn: Any) -> str | None:
        """``static`` (``--static-peer``), ``trusted`` (``--trusted-peer``) or None."""
        if self._is_static(conn):
            return "static"
        if conn.node_id in self.config.trusted_peers:
            return "trusted"
        return None

    def inbound(self) -> int:
        """Inbound links that take a slot of ``--max-inbound`` (a static
        peer's takes none, as its outbound one takes none of the outbound)."""
        return sum(1 for c in self.peers.values() if c.direction == "in" and not self._is_static(c))

    def peer_states(self, limit: int = 500) -> list[dict[str, Any]]:
        """Known addresses with their dial state, for ``info`` (the page)."""
        now = self.reactor.seconds()
        out = []
        for r in self.store.records()[:limit]:
            entry = {"addr": r.addr, "state": self.book.label(r.addr, r.failures), "node_id": r.node_id,
                     "source": r.source, "failures": r.failures, "last_error": r.last_error,
                     "kind": "static" if r.addr in self._static else
                             "trusted" if r.node_id in self.config.trusted_peers else None}
            dial = self.book.get(r.addr)
            if dial.state is State.BACKOFF and dial.retry_at > now:
                entry["retry_in"] = round(dial.retry_at - now, 1)
            out.append(entry)
        return out

    # -- dialing ---------------------------------------------------------------------

    def dial_round(self) -> None:
        """One round of the scheduler: backoffs that ended go back to idle,
        then as many dials as the bounds allow, then probes."""
        if not self.running:
            return
        now = self.reactor.seconds()
        self.book.retry_due(now)
        self._dial_static(now)
        ordinary = [d for d in self.book.in_flight() if d.addr not in self._static]
        free = min(self.config.max_outbound - self.outbound() - len(ordinary),
                   self.config.max_dialing - len(ordinary) - len(self._probes))
        if free > 0 and self._dial_tokens.ready():
            # Decided before scanning the store: a register flood asks for a
            # round often, and the periodic round comes back for what waits.
            seen = (Seen(r.addr, r.node_id, r.source == BOOTSTRAP or r.verified, r.failures)
                    for r in self.store.records() if not r.is_self and r.addr not in self._static
                    and not (self.blocked and self._blocked(r.addr)))
            for pick in choose(self.book, seen, set(self.peers), free):
                if not self._dial_tokens.take():
                    break
                try:
                    # Outcomes are logged and recorded by dial() itself.
                    self.dial(pick.addr).addErrback(lambda f: None)
                except Exception:
                    # Never let one address stop the scheduler.
                    log.failure("cannot dial {addr}", addr=pick.addr)
                    self.book.on(pick.addr, Event.FAILED, now, retry_at=now + self.config.backoff_max)
        self._probe_some()

    def _dial_static(self, now: float) -> None:
        """Dial every static peer that is idle (its backoff over) and whose
        node is not connected another way: outside every bound but its own
        backoff, as the operator asked for exactly these."""
        for addr in self._static:
            if self.blocked and self._blocked(addr):
                continue
            record = self.store.get(addr)
            if self.book.state(addr) is not State.IDLE or (record is not None and record.node_id in self.peers):
                continue
            try:
                self.dial(addr).addErrback(lambda f: None)
            except Exception:
                log.failure("cannot dial static peer {addr}", addr=addr)
                self.book.on(addr, Event.FAILED, now, retry_at=now + self.config.backoff_max)

    def sweep(self) -> None:
        """Forget addresses that failed for too long (bootstrap ones never),
        and the dial records of addresses the store dropped (run every
        ``sweep_interval``)."""
        now = self.reactor.seconds()
        c = self.config
        for r in self.store.records():
            if not expired(r.failures, r.source == BOOTSTRAP, r.verified, r.last_handshake or r.added, now,
                           c.forget_after, c.forget_verified_after):
                continue
            if self.book.on(r.addr, Event.FORGET, now):
                self.store.remove(r.addr)
                log.info("forgot peer {addr}: failing since {since:.0f}s ({error})", addr=r.addr,
                         since=now - (r.last_handshake or r.added), error=r.last_error)
        self.book.keep_only(self.store.__contains__)

    def _probe_some(self) -> None:
        """Probe addresses inbound peers advertised, within the dial bounds
        (concurrent dials, dial rate) but outside ``max_outbound``: a probe
        closes as soon as it has its answer."""
        for addr in list(self._unproven):
            if self.dials_in_flight() >= self.config.max_dialing:
                return
            record = self.store.get(addr)
            if record is None or record.dialed or record.is_self:
                del self._unproven[addr]
                continue
            if addr in self._probes or self.book.state(addr) in IN_FLIGHT:
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

    def pins_of(self, addr: str) -> frozenset[str]:
        """The node ids a dial of ``addr`` may meet (empty: any): its own
        pin, or, when it has none, the pin of every stored record of the
        same endpoint (``address.endpoint``) that the operator gave (a
        bootstrap address, or registered by a ``--trusted`` client). Such a
        pin guards what it names, not only its own record: an unpinned twin,
        learned from peers or registered by a stranger, is held to it too,
        or it would reach whatever node answers there. A stranger's pin
        guards only itself: anyone may register one, and it must not bar
        the node from an endpoint it reaches."""
        parsed = address.parse(addr)
        if parsed.node_id:
            return frozenset([parsed.node_id])
        generation, pins = self._pins
        if generation != self.store.generation:
            # Rebuilt once per change of the address set; only pinned
            # addresses (a '#', a cheap test) are parsed for it.
            found: dict[str, set[str]] = {}
            for stored in self.store.addresses():
                if "#" in stored:
                    record = self.store.get(stored)
                    if record is None or not (record.operator or record.source == BOOTSTRAP):
                        continue
                    try:
                        found.setdefault(address.endpoint(stored), set()).add(address.parse(stored).node_id)
                    except address.InvalidAddress:
                        continue
            pins = {key: frozenset(ids) for key, ids in found.items()}
            self._pins = (self.store.generation, pins)
        return pins.get(address.endpoint(addr), frozenset())

    def _blocked(self, addr: str) -> bool:
        try:
            port = address.parse(addr).port
        except address.InvalidAddress:
            return False
        return any(low <= port <= high for low, high in self.blocked)

    def op_links(self, conn: Any, args: Any) -> Any:
        """``{"block": [[low port, high port], ...]}``: an emulated
        partition: the node stops dialing peers on those ports and closes
        the links it dialed to them (the other side closes the rest, when
        told the same); ``{"block": []}`` heals it, and the node dials
        again at once. Operator op; the emulation's other figures are the
        node's options."""
        ranges = args.get("block") if isinstance(args, dict) else None
        if not isinstance(ranges, list) or len(ranges) > 1000 or not all(
                isinstance(r, list) and len(r) == 2 and all(type(p) is int for p in r)
                and 1 <= r[0] <= r[1] <= 65535 for r in ranges):
            return codec.bad_args("links", '"block": give a list of [low port, high port] (at most 1000)')
        self.blocked = tuple((low, high) for low, high in ranges)
        closed = 0
        for peer in list(self.peers.values()):
            dialed = peer.fox_state.get("dial_addr")
            if self.blocked and dialed is not None and self._blocked(dialed):
                peer.close(CLOSE_NORMAL, "partitioned (link emulation)")
                closed += 1
        self.tick_soon()
        return codec.ok({"block": [list(r) for r in self.blocked], "closed": closed})

    def links_info(self) -> dict[str, Any] | None:
        """What ``info`` says of the link emulation, or None without one."""
        c = self.config.links
        if c.is_plain() and not self.blocked:
            return None
        return {"emulation": links.EMULATION, "blocked": [list(r) for r in self.blocked], "default": links.describe(c.default),
                "rules": [{"ports": [low, high], **links.describe(s)} for low, high, s in c.rules]}

    def dial(self, addr: str, probe: bool = False) -> Deferred:
        """Connect to ``addr`` and say hello; fires with the connection or
        fails with the reason. Bookkeeping (the dial record, the store) is
        done here. A ``probe`` only proves who listens there: it closes
        once answered and fires with the connection closing."""
        now = self.reactor.seconds()
        parsed = address.parse(addr)
        state = self.book.state(addr)
        if probe and addr in self._probes:
            return fail(DialRefused(f"{addr} is being probed already"))
        if not probe and not self.book.on(addr, Event.DIAL, now):
            return fail(DialRefused(f"{addr} is {state.value}: not dialed"))
        self.node.metrics.dials.labels("started").inc()
        c = self.node.config
        factory = FoxClientFactory(parsed.dial_url, self.node, self.reactor,
                                   max_message_size=c.max_message_size, send_queue=c.send_queue,
                                   max_in_flight=c.max_in_flight,
                                   max_depth=c.max_depth, ping_interval=c.ping_interval,
                                   ping_timeout=c.ping_timeout, open_timeout=self.config.dial_timeout)
        pins = self.pins_of(addr)
        endpoint = endpoint_for(self.reactor, parsed, self.config.trust_roots, self.config.dial_timeout)
        endpoint = links.wrap_endpoint(endpoint, self.config.links, parsed.port, self.reactor, self._link_rng)
        log.debug("dialing {addr}", addr=addr)
        d = endpoint.connect(factory)
        dial = self.book.get(addr)
        if probe:
            self._probes[addr] = d
        else:
            dial.attempt = d

        def opened(proto: Any) -> Deferred:
            proto.fox_state["dial_addr"] = addr
            if not probe:
                dial.conn = proto
            return proto.when_opened().addCallback(self._say_hello, addr, probe, pins)

        d.addCallback(opened)
        d.addTimeout(self.config.dial_timeout * 3, self.reactor)
        d.addCallbacks(self._dialed, self._dial_failed, errbackArgs=(addr, probe))
        d.addBoth(self._dial_done, addr, probe)
        return d

    def _dial_done(self, result: Any, addr: str, probe: bool) -> Any:
        if probe:
            self._probes.pop(addr, None)
        self.tick_soon()
        return result

    def _say_hello(self, proto: Any, addr: str, probe: bool, pins: frozenset[str]) -> Deferred:
        if not probe:
            self.book.on(addr, Event.OPENED, self.reactor.seconds())
        listener_nonce, listener_id = proto.server_nonce, proto.server_node_id
        if not is_nonce(listener_nonce) or not identity.is_node_id(listener_id):
            proto.close(CLOSE_CODES[BAD_HELLO], BAD_HELLO)
            raise HandshakeRefused(BAD_HELLO, "the upgrade response lacks a nonce or node id "
                                              f"(a node older than protocol {PROTOCOL_VERSION}?)")
        if pins and listener_id not in pins:
            # The hello's proof binds the listener to the id it named here,
            # so this one check holds for the whole handshake.
            proto.close(CLOSE_CODES[WRONG_NODE], WRONG_NODE)
            named = ", ".join(sorted(p[:12] for p in pins))
            raise HandshakeRefused(WRONG_NODE, f"{addr}: its endpoint is pinned to node {named}, "
                                               f"but node {listener_id[:12]} answered")
        nonce = os.urandom(16).hex()
        args = dialer_hello(self.node.identity, self.node.config.network, listener_nonce, listener_id,
                            nonce, **self._about_me())
        if probe:
            args["probe"] = True
        d = proto.request("hello", args, timeout=self.config.dial_timeout)
        d.addCallback(self._hello_answered, proto, addr, nonce, probe)
        return d

    def _about_me(self) -> dict[str, Any]:
        c = self.node.config
        return {"advertise": c.advertise, "port": self.node.listen_port, "secure": c.secure}

    def _hello_answered(self, reply: codec.Reply, proto: Any, addr: str, nonce: str, probe: bool) -> Any:
        if not reply.ok():
            refusal = refusal_from(reply)
            if refusal.code == TOO_MANY_PEERS and isinstance(reply.response, dict):
                self._learn(proto, reply.response.get("peers"), "a full peer")
            proto.close(CLOSE_CODES.get(refusal.code, CLOSE_NORMAL), refusal.code)
            raise refusal
        try:
            remote = check_listener_hello(reply.response, self.node.config.network, self.node.node_id,
                                          proto.server_nonce, proto.server_node_id, nonce)
        except HandshakeRefused as refusal:
            proto.close(CLOSE_CODES[refusal.code], refusal.code)
            raise
        if probe:
            self._proven(addr, remote["node_id"])
            proto.close(CLOSE_NORMAL, "probe answered")
            return proto
        self._admit(proto, remote, addr)
        return proto

    def _proven(self, addr: str, node_id: str) -> None:
        """``addr`` led to ``node_id``, in a handshake this node dialed."""
        now = self.reactor.seconds()
        self.store.update(addr, node_id=node_id, last_handshake=now, last_dialed=now,
                          last_seen=now, failures=0, last_error=None)

    def _dialed(self, proto: Any) -> Any:
        self.node.metrics.dials.labels("connected").inc()
        return proto

    def _dial_failed(self, failure: Any, addr: str, probe: bool) -> Any:
        dial = self.book.get(addr)
        if dial.conn is not None and dial.conn.node_id is None:
            # Timed out or refused mid-handshake: don't leave the socket behind.
            dial.conn.close(CLOSE_NORMAL, "handshake failed")
        if not self.running:  # cancelled by stop(): says nothing of the address
            if not probe:
                self.book.on(addr, Event.CANCELLED, self.reactor.seconds())
        elif probe:
            self._probe_failed(failure, addr)
        else:
            self._record_failure(failure, addr)
        return failure

    def _probe_failed(self, failure: Any, addr: str) -> None:
        """The address an inbound peer advertised did not prove it: counted
        against the address (which a full store then evicts first)."""
        self.node.metrics.dials.labels("failed").inc()
        record = self.store.get(addr)
        if record is not None:
            self.store.update(addr, failures=record.failures + 1, last_error=_why(failure.value))

    def _record_failure(self, failure: Any, addr: str) -> None:
        record = self.store.get(addr)
        error = failure.value
        refusal = error if isinstance(error, HandshakeRefused) else None
        why = _why(error)
        self.node.metrics.dials.labels(why if refusal is not None else "failed").inc()
        now = self.reactor.seconds()
        if refusal is not None and refusal.code == SELF:
            self.book.on(addr, Event.IS_SELF, now)
            if record is not None:
                self.store.update(addr, is_self=True, node_id=self.node.node_id, last_error="this node itself")
            log.info("{addr} is this node itself; it will not be dialed again", addr=addr)
            return
        if refusal is not None and refusal.code in (DUPLICATE, TOO_MANY_PEERS):
            # Not the address's fault: come back later, without counting a failure.
            self.book.on(addr, Event.TURNED_AWAY, now,
                         retry_at=now + (refusal.retry_after or self.config.backoff_max))
            if record is not None:
                self.store.update(addr, last_error=refusal.code)
                if record.node_id in self.peers:
                    # Turned away because the node behind it is connected to
                    # us already (it dialed us): connected, not backing off.
                    self.book.on(addr, Event.INBOUND, now)
            return
        failures = (record.failures if record is not None else 0) + 1
        delay = self._backoff(failures - 1)
        self.book.on(addr, Event.FAILED, now, retry_at=now + delay)
        if record is not None:
            self.store.update(addr, failures=failures, last_error=why)
            log.info("dial {addr} failed ({why}); attempt {n}, next in {delay:.1f}s",
                     addr=addr, why=why, n=failures, delay=delay)

    # -- the handshake, listening side --------------------------------------------------

    def op_hello(self, conn: Any, args: Any) -> codec.Reply:
        if conn.direction != "in":
            return codec.forbidden("hello is sent by the dialing node")
        if conn.node_id is not None:
            return codec.forbidden("hello was already said on this connection")
        my_nonce = getattr(conn, "handshake_nonce", "")
        try:
            remote = check_dialer_hello(args, self.node.config.network, self.node.node_id, my_nonce)
            addr = self._remote_address(conn, remote)
            if not remote.get("probe"):
                self._check_admission(conn, remote)
        except HandshakeRefused as refusal:
            log.info("refused peer from {host}: {code} ({text})", host=conn.remote_host,
                     code=refusal.code, text=refusal.text)
            self.node.metrics.disconnects.labels(refusal.code).inc()
            # Close after the reply has gone out.
            self.reactor.callLater(0, conn.close, CLOSE_CODES[refusal.code], refusal.code)
            reply = refusal.reply()
            if refusal.code == TOO_MANY_PEERS:
                # Turned away, a node whose only bootstrap we are would know
                # no one: tell it where else to go.
                reply.response["peers"] = self.sample_for(conn)
            return reply
        response = listener_hello(self.node.identity, self.node.config.network, my_nonce, remote,
                                  **self._about_me())
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

    def _check_admission(self, conn: Any, remote: dict[str, Any]) -> None:
        existing = self.peers.get(remote["node_id"])
        if existing is not None and self._winner(existing, conn, remote["node_id"]) is existing:
            raise HandshakeRefused(DUPLICATE, "already connected to this node",
                                   retry_after=self.config.backoff_max)
        if (existing is None and self.inbound() >= self.config.max_inbound
                and remote["node_id"] not in self.config.trusted_peers
                and remote["node_id"] not in self._static_ids()):
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

    # -- a connection becomes a peer, and goes ---------------------------------------------

    def _admit(self, conn: Any, remote: dict[str, Any], addr: str | None) -> None:
        remote_id = remote["node_id"]
        existing = self.peers.get(remote_id)
        if existing is not None and existing is not conn:
            if self._winner(existing, conn, remote_id) is existing:
                conn.close(CLOSE_CODES[DUPLICATE], DUPLICATE)
                raise HandshakeRefused(DUPLICATE, "already connected to this node",
                                       retry_after=self.config.backoff_max)
            log.info("replacing connection to {peer} by the one both sides keep", peer=remote_id[:12])
            existing.close(CLOSE_CODES[DUPLICATE], DUPLICATE)
            self._drop_peer(existing)
            self._addresses_closed(existing, DUPLICATE)
        conn.node_id = remote_id
        dial_addr = conn.fox_state.get("dial_addr")
        conn.peer_addr = dial_addr or addr
        self.peers[remote_id] = conn
        self.node.metrics.peer_connections.labels(conn.direction).inc()
        now = self.reactor.seconds()
        if dial_addr is not None:
            self._proven(dial_addr, remote_id)
            self.book.on(dial_addr, Event.HANDSHAKEN, now)
        if (addr is not None and addr != dial_addr and self._shareable_from(conn, addr)
                and not self.store.is_unregistered(addr)):
            self.store.add([addr], HANDSHAKE, durable=False)
            record = self.store.get(addr)
            if record is not None and not record.dialed:
                # Only the peer's claim: noted (so that it is not dialed
                # while connected), and proven by a probe of our own before
                # it is handed on. An address already proven is not a
                # stranger's to rename.
                self.store.update(addr, node_id=remote_id, last_seen=now)
                self._want_proof(addr)
            if record is not None:
                self.book.on(addr, Event.INBOUND, now)
        log.info("peer {peer} connected ({direction}, {addr})", peer=remote_id[:12],
                 direction=conn.direction, addr=conn.peer_addr)
        for listener in self.listeners:
            listener.peer_up(conn)
        # Learn the remote's peers now, then every exchange_interval.
        self.reactor.callLater(0, self.exchange_with, conn)

    def _shareable_from(self, conn: Any, addr: str) -> bool:
        try:
            parsed = address.parse(addr)
        except address.InvalidAddress:
            return False
        # An outside peer claiming a loopback address would have us dial ourselves.
        return not parsed.is_loopback or address.is_loopback_host(conn.remote_host)

    def _drop_peer(self, conn: Any) -> None:
        if conn.node_id is not None and self.peers.get(conn.node_id) is conn:
            del self.peers[conn.node_id]
            self.node.metrics.peer_connections.labels(conn.direction).dec()
            for listener in self.listeners:
                listener.peer_down(conn)

    def connection_lost(self, conn: Any, code: int | None, reason: str | None) -> None:
        """Any connection of the node closed (the node tells us)."""
        if conn.node_id is None or self.peers.get(conn.node_id) is not conn:
            return
        self._drop_peer(conn)
        why = CODE_OF_CLOSE.get(code or 0) or (f"closed {code}" if code else "connection lost")
        if reason and code not in CODE_OF_CLOSE:
            why += f": {reason}"
        self.node.metrics.disconnects.labels(CODE_OF_CLOSE.get(code or 0, "closed")).inc()
        log.info("peer {peer} disconnected ({direction}, {addr}): {why}", peer=conn.node_id[:12],
                 direction=conn.direction, addr=conn.peer_addr, why=why)
        self._addresses_closed(conn, why)
        self.tick_soon()

    def _addresses_closed(self, conn: Any, why: str) -> None:
        """The peer link over ``conn`` is gone: its addresses back off
        briefly (jittered, as for a first retry)."""
        now = self.reactor.seconds()
        for addr in {conn.fox_state.get("dial_addr"), conn.peer_addr} - {None}:
            self.book.on(addr, Event.CLOSED, now, retry_at=now + self._backoff(0))
            if addr in self.store:
                self.store.update(addr, last_seen=now, last_error=why)

    # -- the operator takes an address back ------------------------------------------------

    def op_unregister(self, conn: Any, args: Any) -> Any:
        """Forget addresses: out of the store (a 200 once the file no longer
        holds them), their connection closed, their dial cancelled, and not
        taken again from other nodes until registered again. Every address
        is checked before anything changes."""
        if not isinstance(args, dict) or "addr" not in args:
            return codec.bad_args("unregister", '"addr" is missing: give an address or a list of them')
        given = args["addr"] if isinstance(args["addr"], list) else [args["addr"]]
        if not given:
            return codec.bad_args("unregister", '"addr" is an empty list')
        if len(given) > self.node.config.max_register_addrs:
            return codec.bad_args("unregister", f'"addr": more than {self.node.config.max_register_addrs} addresses')
        wanted: dict[str, str] = {}  # what each given address reaches -> as given
        for value in given:
            try:
                wanted.setdefault(address.endpoint(value), value)
            except address.InvalidAddress as e:
                shown = value if isinstance(value, str) else type(value).__name__
                return codec.bad_args("unregister", f'"addr": {str(shown)[:100]!r} is not an address ({e}); '
                                                    "nothing was unregistered")
        # Every stored spelling of what is named goes: pinned or not, any
        # case of the host, with a query or without.
        removed, found = [], set()
        for stored in self.store.addresses():
            key = address.endpoint(stored)
            if key in wanted:
                removed.append(stored)
                found.add(key)
        unknown = [addr for key, addr in wanted.items() if key not in found]
        for addr in removed:
            self._forget_address(addr)
        response = {"removed": removed, "unknown": unknown}
        if not removed:
            return codec.ok(response)

        def written(outcome: Any) -> codec.Reply:
            if isinstance(outcome, Failure):
                return codec.unavailable(f"Peer store could not write the change ({outcome.value}); "
                                         "the addresses are forgotten now, but may come back after a "
                                         "crash. Unregister them again to confirm.")
            return codec.ok(response)

        return self.store.unregister(removed).addBoth(written)

    def _forget_address(self, addr: str) -> None:
        self._static.discard(addr)
        self._unproven.pop(addr, None)
        dial = self.book.get(addr)
        if dial.conn is not None:
            dial.conn.close(CLOSE_NORMAL, "unregistered by the operator")
        if dial.attempt is not None:
            dial.attempt.cancel()
        for conn in list(self.peers.values()):
            if addr in (conn.fox_state.get("dial_addr"), conn.peer_addr):
                conn.close(CLOSE_NORMAL, "unregistered by the operator")
        probe = self._probes.get(addr)
        if probe is not None:
            probe.cancel()
        self.book.forget(addr)
        log.info("unregistered {addr}", addr=addr)

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
        for r in self.store.records():
            if r.is_self or not r.dialed or r.failures or r.node_id == conn.node_id:
                continue
            if not remote_is_loopback and address.parse(r.addr).is_loopback:
                continue
            good.append(r.addr)
        if self.node.config.advertise and self.node.config.advertise not in good:
            good.append(self.node.config.advertise)
        return random.sample(good, min(len(good), self.config.exchange_sample))

    def exchange_round(self) -> None:
        """Ask every peer for addresses (run every ``exchange_interval``)."""
        for conn in list(self.peers.values()):
            self.exchange_with(conn)

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
        store = self.store
        room = None
        learned = []
        for addr in offered[: self.config.exchange_sample]:
            # On a settled network nearly every offer is known already:
            # that is told by the text alone, before parsing (which is most
            # of a large devnet's peer-exchange work).
            if isinstance(addr, str) and addr in store:
                continue
            if room is None:
                room = self.config.exchange_cap - sum(1 for r in store.records() if r.source == EXCHANGE)
            if len(learned) >= room:
                break
            try:
                parsed = address.parse(addr)
            except address.InvalidAddress:
                continue
            if (parsed.url in store or store.is_unregistered(parsed.url)
                    or not self._shareable_from(conn, parsed.url)):
                continue
            learned.append(parsed.url)
        if learned:
            result = store.add(learned, EXCHANGE, durable=False)
            log.info("learned {n} addresses from {peer}", n=len(result.accepted), peer=who)
            self.tick_soon()

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


def _why(error: BaseException) -> str:
    """A dial's failure in a few words: a refusal's code, or the error's first line."""
    if isinstance(error, HandshakeRefused):
        return error.code
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
