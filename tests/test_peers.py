"""The peer network in one reactor: dialing, handshake, one connection per
pair, peer exchange. Every address is on loopback."""

import os

import pytest_twisted
from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ServerEndpoint

from foxnode import client, identity
from foxnode import PROTOCOL_VERSION
from foxnode.peers import BAD_PROOF, CLOSE_CODES, DIALER, DUPLICATE, WRONG_NETWORK, hello_proof
import pytest

from foxnode.dialing import State, Seen, choose
from foxnode.peers import DialRefused
from foxnode.testing import FakeConnection, start_node, wait_for

FAST = ("--exchange-interval", "0.5")


async def start_many(reactor, tmp_path, count, *extra, bootstrap_first=True):
    first = await start_node(reactor, tmp_path / "n0", *FAST, *extra)
    nodes = [first]
    for i in range(1, count):
        args = ("--peer", first.url) if bootstrap_first else ()
        nodes.append(await start_node(reactor, tmp_path / f"n{i}", *FAST, *args, *extra))
    return nodes


async def stop_all(nodes):
    for n in nodes:
        await n.stop()


def live_ids(running):
    return sorted(p["node_id"] for p in running.node.live_peers())


def assert_one_connection_per_pair(nodes):
    ids = {n.node.node_id for n in nodes}
    for n in nodes:
        peers = n.node.live_peers()
        assert n.node.node_id not in {p["node_id"] for p in peers}, "connected to itself"
        assert len({p["node_id"] for p in peers}) == len(peers), "two connections to one node"
        assert {p["node_id"] for p in peers} <= ids


def links_agree(nodes):
    """Both ends agree on every link, each seeing it from its own side. A
    moment after a simultaneous dial they may not yet (one side has admitted
    the winner, the other has not read that reply), so callers wait for it."""
    for a in nodes:
        for p in a.node.live_peers():
            b = next(n for n in nodes if n.node.node_id == p["node_id"])
            back = [q for q in b.node.live_peers() if q["node_id"] == a.node.node_id]
            if len(back) != 1 or {back[0]["direction"], p["direction"]} != {"in", "out"}:
                return False
    return True


@pytest_twisted.ensureDeferred
async def test_six_nodes_find_each_other_from_one_bootstrap(reactor, tmp_path):
    nodes = await start_many(reactor, tmp_path, 6)
    try:
        everyone = {n.url for n in nodes}

        def all_known():
            # Every node knows every other node's address (it learned them by
            # exchange or from their handshakes) ...
            return all(everyone - {n.url} <= set(n.node.store.addresses()) for n in nodes)

        await wait_for(reactor, all_known, timeout=20, what="every node to know every address")
        # ... and holds live connections to several others, none twice.
        await wait_for(reactor, lambda: all(len(n.node.live_peers()) >= 3 for n in nodes),
                       timeout=20, what="each node to hold 3+ live connections")
        assert_one_connection_per_pair(nodes)
        await wait_for(reactor, lambda: links_agree(nodes), what="both ends to agree on every link")
        # info tells the same story.
        reply = await client.call(reactor, nodes[0].url, "info")
        assert {p["node_id"] for p in reply.response["connected"]} == set(live_ids(nodes[0]))
    finally:
        await stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_simultaneous_dial_keeps_exactly_one_connection(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a", *FAST)
    b = await start_node(reactor, tmp_path / "b", *FAST)
    try:
        # Both learn the other at the same moment and dial at once.
        a.node.store.add([b.url], "register")
        b.node.store.add([a.url], "register")
        da = a.node.peers.dial(b.url)
        db = b.node.peers.dial(a.url)
        for d in (da, db):
            d.addErrback(lambda f: None)
        await wait_for(reactor, lambda: len(a.node.live_peers()) == 1 and len(b.node.live_peers()) == 1,
                       what="one connection each")
        # Let any loser finish closing; still exactly one, the same one.
        await wait_for(reactor, lambda: not a.node.peers.dials_in_flight() and not b.node.peers.dials_in_flight(), what="dials over")
        await wait_for(reactor, lambda: links_agree([a, b]), what="both ends to agree on the link")
        assert len(a.node.live_peers()) == 1 and len(b.node.live_peers()) == 1
        assert_one_connection_per_pair([a, b])
        winner_dialer = max(a.node.node_id, b.node.node_id)
        out_side = a if a.node.live_peers()[0]["direction"] == "out" else b
        assert out_side.node.node_id == winner_dialer
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_node_never_dials_itself_again(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    try:
        own = a.url.replace("127.0.0.1", "localhost")
        reply = await client.call(reactor, a.url, "register", {"addr": own})
        assert reply.status == 202
        await wait_for(reactor, lambda: a.node.store.get(own).is_self, what="address marked as self")
        assert a.node.live_peers() == []
        # The lab's view is unchanged: the address stays listed.
        reply = await client.call(reactor, a.url, "peers")
        assert own in reply.response["peers"]
        peers = a.node.peers
        assert peers.book.state(own) is State.SELF
        # Whatever time passes, the scheduler never picks it again.
        reactor_later = reactor.seconds() + 3600
        peers.book.retry_due(reactor_later)
        seen = [Seen(r.addr, r.node_id, True, r.failures) for r in a.node.store.records()]
        assert own not in [s.addr for s in choose(peers.book, seen, set(), 10)]
        # Nor can anyone make it dial it outright.
        with pytest.raises(DialRefused):
            await peers.dial(own)
    finally:
        await a.stop()


@pytest_twisted.ensureDeferred
async def test_nodes_of_another_network_never_connect(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    other = await start_node(reactor, tmp_path / "o", "--network", "other", "--peer", a.url)
    try:
        await wait_for(reactor, lambda: (other.node.store.get(a.url).last_error == WRONG_NETWORK),
                       what="the dial to be refused for the network")
        assert a.node.live_peers() == [] and other.node.live_peers() == []
        assert a.node.metrics.disconnects.labels(WRONG_NETWORK)._value.get() >= 1
    finally:
        await stop_all([a, other])


@pytest_twisted.ensureDeferred
async def test_hello_with_a_bad_proof_is_refused_and_closed(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    try:
        conn = await client.connect(reactor, a.url)
        forger = identity.Identity.generate()
        victim = identity.Identity.generate()
        nonce = os.urandom(16).hex()
        args = {
            "node_id": victim.node_id, "network": "foxchain", "version": PROTOCOL_VERSION,
            "nonce": nonce, "port": 9,
            # signed by someone else than the node id it claims
            "signature": forger.sign(hello_proof(DIALER, "foxchain", conn.server_nonce, nonce,
                                                victim.node_id, conn.server_node_id)),
        }
        reply = await conn.request("hello", args)
        assert reply.status == 403
        assert reply.response["code"] == BAD_PROOF
        was_open, code, reason = await conn.when_closed()
        assert code == CLOSE_CODES[BAD_PROOF]
        assert a.node.live_peers() == []
    finally:
        await a.stop()


@pytest_twisted.ensureDeferred
async def test_peer_that_never_completes_the_handshake_times_out(reactor, tmp_path):
    # A server that accepts TCP and then says nothing at all.
    class Silent(protocol.Protocol):
        pass

    factory = protocol.Factory.forProtocol(Silent)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    silent_url = f"ws://127.0.0.1:{port.getHost().port}/ws"
    a = await start_node(reactor, tmp_path / "a")
    try:
        a.node.peers.config = a.node.peers.config.__class__(dial_timeout=1.0)
        a.node.store.add([silent_url], "register")
        await wait_for(reactor, lambda: a.node.store.get(silent_url).failures >= 1, timeout=15,
                       what="the silent peer's dial to fail")
        record = a.node.store.get(silent_url)
        assert record.last_error and record.node_id is None
        assert a.node.live_peers() == []
        # It is retried later, not hammered.
        dial = a.node.peers.book.get(silent_url)
        assert dial.state is State.BACKOFF and dial.retry_at > reactor.seconds()
    finally:
        await a.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_second_connection_to_a_connected_node_is_refused(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    b = await start_node(reactor, tmp_path / "b", "--peer", a.url)
    try:
        await wait_for(reactor, lambda: len(a.node.live_peers()) == 1, what="b connected to a")
        # b dials a again through another name of the same node.
        other_name = a.url.replace("127.0.0.1", "localhost")
        b.node.store.add([other_name], "register")
        d = b.node.peers.dial(other_name)
        failure = None
        try:
            await d
        except Exception as e:
            failure = e
        assert getattr(failure, "code", None) == DUPLICATE
        assert len(a.node.live_peers()) == 1 and len(b.node.live_peers()) == 1
    finally:
        await stop_all([a, b])


@pytest_twisted.ensureDeferred
async def test_loopback_addresses_are_not_handed_to_remote_peers(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    try:
        store = a.node.store
        store.add(["ws://127.0.0.9:9000/ws", "ws://localhost:9001/ws"], "register")
        for addr in store.addresses():
            store.update(addr, last_handshake=1.0, last_dialed=1.0, node_id="cd" * 32)
        peers = a.node.peers
        assert sorted(peers.sample_for(FakeConnection(node_id="ab" * 32, remote_host="127.0.0.1"))) == sorted(store.addresses())
        assert peers.sample_for(FakeConnection(node_id="ab" * 32, remote_host="peer-elsewhere")) == []
        # Nor are loopback addresses taken from a remote peer's exchange.
        assert not peers._shareable_from(FakeConnection(node_id="ab" * 32, remote_host="peer-elsewhere"), "ws://127.0.0.9:9000/ws")
        assert peers._shareable_from(FakeConnection(node_id="ab" * 32, remote_host="127.0.0.1"), "ws://127.0.0.9:9000/ws")
    finally:
        await a.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_turned_away_by_a_full_bootstrap_learns_where_else_to_go(reactor, tmp_path):
    from foxnode.peers import TOO_MANY_PEERS

    full = await start_node(reactor, tmp_path / "full", "--max-inbound", "1")
    first = await start_node(reactor, tmp_path / "first", "--peer", full.url)
    late = None
    try:
        await wait_for(reactor, lambda: full.node.live_peers(), what="the bootstrap's one inbound peer")
        late = await start_node(reactor, tmp_path / "late", "--peer", full.url)
        # Refused by its only bootstrap, it still finds the network through
        # the addresses that came with the refusal.
        await wait_for(reactor, lambda: late.node.live_peers(), timeout=15,
                       what="the late node to connect somewhere")
        assert late.node.store.get(full.url).last_error == TOO_MANY_PEERS
        assert {p["node_id"] for p in late.node.live_peers()} == {first.node.node_id}
    finally:
        for n in (late, first, full):
            if n is not None:
                await n.stop()
