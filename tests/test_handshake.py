"""Attacks on the ``hello`` handshake, performed with real sockets against
nodes in this process: an attacker who relays one node's nonce to another
and its signature back, who makes a node dial it and passes that node's
proof on, or who replays a captured hello or hello reply. Each proof must
be refused with 4003 (bad-proof), leave nothing behind (no store record,
no peer entry), and the real node must connect afterwards.

Also peer exchange: a node hands on only the addresses it dialed itself.

Every address here is on loopback; the fake ones use 127.3.0.0/16, port 9.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ServerEndpoint

from foxnode import PROTOCOL_VERSION, client, codec, identity
from foxnode.peers import BAD_PROOF, CLOSE_CODES, DIALER, LISTENER, hello_proof
from foxnode.protocol import NODE_ID_HEADER, NONCE_HEADER, FoxServerFactory, FoxServerProtocol
from foxnode.testing import LOOPBACK, connect_as_peer, start_node, wait_for

NETWORK = "foxchain"
TIMEOUT = 10.0


# -- the attacker's listener --------------------------------------------------------------

class TrapProtocol(FoxServerProtocol):
    def onConnect(self, request: Any) -> tuple[None, dict[str, str]]:
        # Whatever nonce and node id the attack needs, not its own.
        return None, dict(self.factory.handler.headers)


class Trap:
    """A WebSocket listener the attacker runs for a node to dial: it answers
    the upgrade with ``headers`` and keeps each hello it receives; the hello
    is answered with ``answer(args)`` (by default a refusal, so that the
    dialer gives up at once)."""

    node_id = None

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.hellos: DeferredQueue = DeferredQueue()
        self.answer = lambda args: codec.forbidden("no")
        self.port: Any = None
        self.conns: set = set()

    async def listen(self, reactor: Any) -> "Trap":
        factory = FoxServerFactory(self, reactor)
        factory.protocol = TrapProtocol
        self.port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(factory)
        return self

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port.getHost().port}/ws"

    async def close(self) -> None:
        for c in list(self.conns):
            c.close()
        await self.port.stopListening()

    # the handler's side
    def admit(self, conn: Any) -> None:
        return None

    def connection_opened(self, conn: Any) -> None:
        self.conns.add(conn)

    def handle_request(self, conn: Any, request: codec.Request) -> Any:
        if request.op != "hello":
            return codec.not_found_op(request.op)
        self.hellos.put(request.args)
        return self.answer(request.args)

    def handle_event(self, conn: Any, event: Any) -> None:
        pass

    def rate_refused(self, conn: Any, bucket: Any) -> codec.Reply:
        return codec.too_many("slow down")

    def message_refused(self, conn: Any, reply: codec.Reply) -> None:
        pass

    def connection_lost(self, conn: Any, code: Any, reason: Any) -> None:
        self.conns.discard(conn)


async def next_hello(reactor: Any, trap: Trap) -> Any:
    d = trap.hellos.get()
    d.addTimeout(TIMEOUT, reactor)
    return await d


async def make_dial(reactor: Any, dialer: Any, url: str) -> list:
    """``dialer`` dials ``url``; the outcome is kept, never raised."""
    outcome: list = []
    d = dialer.node.peers.dial(url)
    d.addBoth(outcome.append)
    return outcome


# -- what must hold after every attack ---------------------------------------------------

def snapshot(target: Any) -> dict[str, Any]:
    return {r.addr: (r.node_id, r.last_handshake, r.last_dialed, r.failures)
            for r in target.node.store.records()}


async def say_hello_as(reactor: Any, url: str, args: dict[str, Any]) -> tuple[codec.Reply, int | None]:
    """Send ``args`` as a hello on a fresh connection; the reply and the close code."""
    conn = await client.connect(reactor, url)
    reply = await conn.request("hello", args, timeout=TIMEOUT)
    return reply, await close_code(conn, reply)


async def close_code(conn: Any, reply: codec.Reply) -> int | None:
    """The code the node closed ``conn`` with after a refused hello; an
    accepted one (the attack worked) is closed here, so that the test fails
    on the reply instead of waiting."""
    if reply.status == 200:
        conn.close()
    _, code, _ = await conn.when_closed()
    return code


def assert_refused_as_bad_proof(reply: codec.Reply, code: int | None) -> None:
    assert reply.status == 403, reply
    assert reply.response["code"] == BAD_PROOF, reply
    assert code == CLOSE_CODES[BAD_PROOF]


async def assert_nothing_recorded(reactor: Any, target: Any, before: dict, victim_id: str) -> None:
    await wait_for(reactor, lambda: all(c.node_id is None for c in target.node.connections),
                   what="the attacker's connections to end")
    assert victim_id not in target.node.peers.peers
    assert snapshot(target) == before
    assert all(r.node_id != victim_id for r in target.node.store.records())


async def assert_real_node_connects(reactor: Any, real: Any, target: Any) -> None:
    """The impersonated node dials the target for real, and is taken."""
    result = await real.node.peers.dial(target.url)
    assert result.node_id == target.node.node_id
    await wait_for(reactor, lambda: real.node.node_id in target.node.peers.peers,
                   what="the real node to be the target's peer")


async def two_nodes(reactor: Any, tmp_path: Any) -> tuple[Any, Any]:
    # --exchange-interval long: no background chatter in the logs and stores.
    lone = await start_node(reactor, tmp_path / "l", "--exchange-interval", "3600")
    target = await start_node(reactor, tmp_path / "c", "--exchange-interval", "3600")
    return lone, target


# -- (a) the listener's signature relayed as a dialer's ---------------------------------------

@pytest_twisted.ensureDeferred
async def test_listener_signature_relayed_to_another_node_is_refused(reactor, tmp_path):
    lone, target = await two_nodes(reactor, tmp_path)
    l_id = lone.node.node_id
    try:
        before = snapshot(target)
        attacker = identity.Identity.generate()
        for round_ in range(2):
            # The attacker opens a connection to C, and takes C's nonce ...
            to_c = await client.connect(reactor, target.url)
            n_c = to_c.server_nonce
            # ... hands it to L as its own dialer nonce, so that L's hello
            # reply signs it ...
            to_l = await connect_as_peer(reactor, lone.url, attacker, nonce=n_c)
            l_reply = to_l.fox_state["hello"]
            to_l.close()
            # ... and says hello to C as L with L's signature, every way the
            # values could be lined up.
            dialer_nonce = [n_c, to_l.server_nonce][round_]
            args = {"node_id": l_id, "network": NETWORK, "version": PROTOCOL_VERSION,
                    "nonce": dialer_nonce, "port": lone.port, "signature": l_reply["signature"]}
            reply = await to_c.request("hello", args, timeout=TIMEOUT)
            assert_refused_as_bad_proof(reply, await close_code(to_c, reply))
        await assert_nothing_recorded(reactor, target, before, l_id)
        await assert_real_node_connects(reactor, lone, target)
    finally:
        await lone.stop()
        await target.stop()


# -- (b) a node made to dial the attacker, its dialer proof passed on -------------------------

@pytest_twisted.ensureDeferred
async def test_dialer_proof_taken_by_a_trap_is_refused_by_the_node_it_names(reactor, tmp_path):
    lone, target = await two_nodes(reactor, tmp_path)
    l_id = lone.node.node_id
    trap = await Trap().listen(reactor)
    attacker = identity.Identity.generate()
    try:
        before = snapshot(target)
        # The trap names itself (or a made-up node, or L itself) beside C's nonce.
        for named in (attacker.node_id, "ab" * 32, l_id):
            to_c = await client.connect(reactor, target.url)
            trap.headers = {NONCE_HEADER: to_c.server_nonce, NODE_ID_HEADER: named}
            await make_dial(reactor, lone, trap.url)
            l_hello = await next_hello(reactor, trap)
            assert l_hello["node_id"] == l_id
            reply = await to_c.request("hello", l_hello, timeout=TIMEOUT)
            assert_refused_as_bad_proof(reply, await close_code(to_c, reply))
        # A trap that names no node gets no hello at all.
        to_c = await client.connect(reactor, target.url)
        trap.headers = {NONCE_HEADER: to_c.server_nonce}
        outcome = await make_dial(reactor, lone, trap.url)
        await wait_for(reactor, lambda: outcome, what="L's dial of the trap to end")
        assert trap.hellos.pending == []
        to_c.close()
        await assert_nothing_recorded(reactor, target, before, l_id)
        await assert_real_node_connects(reactor, lone, target)
    finally:
        await trap.close()
        await lone.stop()
        await target.stop()


# -- (c) replays ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_replayed_hello_and_hello_reply_are_refused(reactor, tmp_path):
    lone, target = await two_nodes(reactor, tmp_path)
    l_id, c_id = lone.node.node_id, target.node.node_id
    trap = await Trap().listen(reactor)
    try:
        before = snapshot(target)
        # A hello L really made for C (for the nonce of one connection to C,
        # naming C), captured and never used there ...
        first = await client.connect(reactor, target.url)
        trap.headers = {NONCE_HEADER: first.server_nonce, NODE_ID_HEADER: c_id}
        await make_dial(reactor, lone, trap.url)
        captured = await next_hello(reactor, trap)
        first.close()
        # ... replayed on new connections, twice.
        for _ in range(2):
            reply, code = await say_hello_as(reactor, target.url, captured)
            assert_refused_as_bad_proof(reply, code)
        await assert_nothing_recorded(reactor, target, before, l_id)

        # A reply C really signed (for the attacker's own hello), replayed
        # to L when L dials the trap: L refuses it, and records no peer.
        attacker = identity.Identity.generate()
        to_c = await connect_as_peer(reactor, target.url, attacker)
        c_reply = to_c.fox_state["hello"]
        trap.headers = {NONCE_HEADER: to_c.server_nonce, NODE_ID_HEADER: c_id}
        to_c.close()
        trap.answer = lambda args: codec.ok(c_reply)
        outcome = await make_dial(reactor, lone, trap.url)
        await next_hello(reactor, trap)
        await wait_for(reactor, lambda: outcome, what="L's dial of the trap to end")
        assert getattr(outcome[0].value, "code", None) == BAD_PROOF
        assert c_id not in lone.node.peers.peers
        assert all(r.node_id != c_id for r in lone.node.store.records())
        await assert_real_node_connects(reactor, lone, target)
    finally:
        await trap.close()
        await lone.stop()
        await target.stop()


def test_proofs_differ_in_every_value_they_bind():
    values = [NETWORK, "aa" * 16, "bb" * 16, "cc" * 32, "dd" * 32]
    base = hello_proof(DIALER, *values)
    assert hello_proof(LISTENER, *values) != base
    for i in range(len(values)):
        changed = list(values)
        changed[i] = "ee" * (16 if i in (1, 2) else 32) if i else "other"
        assert hello_proof(DIALER, *changed) != base
    # No value runs into the next: moving a character across a boundary
    # changes the message.
    assert hello_proof(DIALER, NETWORK, "aa" * 16 + "b", "b" * 31, "cc" * 32, "dd" * 32) != base


# -- peer exchange hands on only what this node dialed itself ---------------------------------

async def exchanged(reactor: Any, conn: Any) -> list[str]:
    reply = await conn.request("exchange", timeout=TIMEOUT)
    assert reply.status == 200, reply
    return reply.response["peers"]


@pytest_twisted.ensureDeferred
async def test_exchange_hands_on_only_addresses_this_node_dialed(reactor, tmp_path):
    from foxnode.testing import free_port

    node = await start_node(reactor, tmp_path / "n", "--exchange-interval", "3600")
    real = inbound = None
    conns = []
    try:
        # Peers whose hellos advertise addresses nobody listens at.
        fake_advertised = "ws://127.3.0.1:9/ws"
        dead_port = free_port()
        conns.append(await connect_as_peer(reactor, node.url, advertise=fake_advertised))
        conns.append(await connect_as_peer(reactor, node.url, port=dead_port))
        fake_from_port = f"ws://{LOOPBACK}:{dead_port}/ws"
        store = node.node.store
        await wait_for(reactor, lambda: fake_advertised in store and fake_from_port in store,
                       what="the advertised addresses to be noted")
        # The node tried them itself (a probe) and found nobody.
        await wait_for(reactor, lambda: all(store.get(a).failures for a in (fake_advertised, fake_from_port)),
                       what="the probes of the fake addresses to fail")
        third = await connect_as_peer(reactor, node.url)
        conns.append(third)
        offered = await exchanged(reactor, third)
        assert fake_advertised not in offered and fake_from_port not in offered
        # Nor in the refusal of a full node.
        node.node.peers.config = node.node.peers.config.__class__(max_inbound=0)
        for_refused = node.node.peers.sample_for(third)
        assert fake_advertised not in for_refused and fake_from_port not in for_refused
        node.node.peers.config = node.node.peers.config.__class__()

        # An address the node dialed successfully is handed on ...
        real = await start_node(reactor, tmp_path / "r", "--exchange-interval", "3600")
        store.add([real.url], "register")
        await node.node.peers.dial(real.url)
        # ... and so is an inbound peer's address, once the node's own probe
        # of it met that peer.
        inbound = await start_node(reactor, tmp_path / "i", "--exchange-interval", "3600",
                                   "--peer", node.url)
        await wait_for(reactor, lambda: (store.get(inbound.url) is not None
                                         and store.get(inbound.url).dialed),
                       what="the inbound peer's address to be proven by a probe")
        assert store.get(inbound.url).node_id == inbound.node.node_id
        assert inbound.node.node_id in node.node.peers.peers  # the probe did not replace it
        offered = await exchanged(reactor, third)
        assert real.url in offered and inbound.url in offered
        assert fake_advertised not in offered and fake_from_port not in offered
    finally:
        for c in conns:
            c.close()
        for n in (inbound, real, node):
            if n is not None:
                await n.stop()
