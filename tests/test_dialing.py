"""The dial lifecycle (dialing.py) and the peer manager driving it, with no
sockets: the table on its own, then whole nodes on a MemoryNetwork whose
clock moves only when the test says."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st

from foxnode import codec, identity
from foxnode.config import PeerConfig
from foxnode.dialing import (FAILING_AFTER, IN_FLIGHT, TRANSITIONS, DialBook, Event, Seen, State,
                             choose, expired)
from foxnode.gossip import Gossip
from foxnode.metrics import NodeMetrics
from foxnode.service import Configs
from foxnode.testing import FakeConnection, MemoryNetwork, memory_node

S, E = State, Event


# -- the table -----------------------------------------------------------------------------

def book_in(state: State, addr: str = "a") -> DialBook:
    """A book with ``addr`` in ``state``, reached through the table itself."""
    book = DialBook()
    path = {
        S.IDLE: [], S.DIALING: [E.DIAL], S.HANDSHAKING: [E.DIAL, E.OPENED],
        S.CONNECTED: [E.DIAL, E.OPENED, E.HANDSHAKEN], S.BACKOFF: [E.DIAL, E.FAILED],
        S.SELF: [E.DIAL, E.OPENED, E.IS_SELF], S.FORGOTTEN: [E.DIAL, E.FAILED, E.FORGET],
    }[state]
    for event in path:
        assert book.on(addr, event, 0.0, retry_at=100.0)
    assert book.state(addr) is (S.IDLE if state is S.FORGOTTEN else state)
    return book


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_pair_goes_where_the_table_says_or_nowhere(state, event):
    if state is S.FORGOTTEN:
        return  # a forgotten address has no record: it is idle again if seen anew
    book = book_in(state)
    went = book.on("a", event, 5.0, retry_at=7.0)
    expected = TRANSITIONS.get((state, event))
    assert went == (expected is not None)
    after = book.state("a")
    if expected is None:
        assert after is state
    else:
        # A forgotten or idle address leaves the book: it reads as idle.
        assert after is (S.IDLE if expected is S.FORGOTTEN else expected)
        if expected is S.BACKOFF:
            assert book.get("a").retry_at == 7.0


def test_the_only_ways_into_connected_are_a_handshake_or_the_node_dialing_us():
    into = {event for (state, event), to in TRANSITIONS.items() if to is S.CONNECTED}
    assert into == {E.HANDSHAKEN, E.INBOUND}
    # and nothing leaves self: the node never dials itself again
    assert not [e for (s, e) in TRANSITIONS if s is S.SELF]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(list(Event)),
                          st.floats(0, 50)), max_size=60))
def test_any_sequence_of_events_keeps_the_book_consistent(steps):
    book = DialBook()
    now = 0.0
    for addr, event, delay in steps:
        now += 1.0
        before = book.state(addr)
        book.on(addr, event, now, retry_at=now + delay)
        after = book.state(addr)
        assert after is TRANSITIONS.get((before, event), before) or (
            after is S.IDLE and TRANSITIONS.get((before, event)) is S.FORGOTTEN)
        book.retry_due(now)
        # The book holds no idle (or forgotten) records: it stays within
        # the addresses that are doing something.
        assert all(d.state not in (S.IDLE, S.FORGOTTEN) for d in book)
        assert all(d.retry_at > now for d in book if d.state is S.BACKOFF)
        assert all(d.attempt is None and d.conn is None for d in book if d.state not in IN_FLIGHT)


def test_choose_picks_only_idle_addresses_of_unconnected_nodes_best_first():
    book = DialBook()
    for addr, events in {"dialing": [E.DIAL], "backoff": [E.DIAL, E.FAILED],
                         "self": [E.DIAL, E.OPENED, E.IS_SELF]}.items():
        for e in events:
            book.on(addr, e, 0.0, retry_at=10.0)
    seen = [Seen("dialing", None, True, 0), Seen("backoff", None, True, 0), Seen("self", None, True, 0),
            Seen("connected-node", "n1", True, 0), Seen("bad", None, False, 5),
            Seen("good", None, True, 0), Seen("unproven", None, False, 0)]
    picked = [s.addr for s in choose(book, seen, connected_ids={"n1"}, limit=10)]
    assert picked == ["good", "unproven", "bad"]
    assert [s.addr for s in choose(book, seen, {"n1"}, limit=1)] == ["good"]
    assert choose(book, seen, {"n1"}, limit=0) == []
    # Once its backoff is over, an address is a candidate again.
    book.retry_due(10.0)
    assert "backoff" in [s.addr for s in choose(book, seen, {"n1"}, limit=10)]


def test_expired_forgets_only_failing_non_bootstrap_addresses_after_their_time():
    hour, day = 3600.0, 86400.0
    assert not expired(0, False, False, 0.0, 10 * day, hour, day)  # never failed
    assert not expired(9, True, False, 0.0, 10 * day, hour, day)  # bootstrap
    assert not expired(9, False, False, 0.0, hour - 1, hour, day)
    assert expired(9, False, False, 0.0, hour + 1, hour, day)
    assert not expired(9, False, True, 0.0, hour + 1, hour, day)  # verified: a day
    assert expired(9, False, True, 0.0, day + 1, hour, day)


def test_the_page_calls_an_address_failing_after_three_failures_in_backoff():
    book = book_in(S.BACKOFF)
    assert book.label("a", FAILING_AFTER - 1) == "backoff"
    assert book.label("a", FAILING_AFTER) == "failing"
    assert book_in(S.CONNECTED).label("a", 9) == "connected"


# -- the peer manager on a memory network ---------------------------------------------------

def configs(**peers) -> Configs:
    return Configs(peers=PeerConfig(**peers))


def test_a_failing_address_backs_off_growing_capped_and_is_forgotten(tmp_path):
    net = MemoryNetwork()
    node = memory_node(net, tmp_path / "a", configs(backoff_max=8.0, forget_after=120.0))
    try:
        peers, store = node.node.peers, node.node.store
        dead = net.url(net.port())  # nothing listens there
        store.add([dead], "register")
        attempts = []

        def dials() -> int:
            return sum(1 for c in net.reactor.tcpClients if c[1] == int(dead.split(":")[2].split("/")[0]))

        seen = 0
        for _ in range(800):
            net.advance(0.25)
            if dials() > seen:
                seen = dials()
                attempts.append(net.reactor.seconds())
            if store.get(dead) is None:
                break
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        # Growing, then capped at backoff_max (plus at most one jitter and a step).
        assert gaps[0] < 3 and gaps[3] > gaps[1] > gaps[0], gaps
        assert max(gaps) <= 8.0 + 1.0 + 0.5, gaps
        # Forgotten once it failed for longer than forget_after, by the sweep.
        assert store.get(dead) is None and peers.book.state(dead) is S.IDLE
        assert 120 <= net.reactor.seconds() <= 120 + PeerConfig().sweep_interval + 1
        assert len(peers.book) == 0
    finally:
        node.stopService()


def test_a_bootstrap_address_is_never_forgotten_and_keeps_being_retried(tmp_path):
    net = MemoryNetwork()
    node = memory_node(net, tmp_path / "a", configs(backoff_max=4.0, forget_after=10.0))
    try:
        boot = net.url(net.port())
        node.node.store.add([boot], "bootstrap")
        net.advance(60)
        record = node.node.store.get(boot)
        assert record is not None and record.failures > 5
        before = len(net.reactor.tcpClients)
        net.advance(10)
        assert len(net.reactor.tcpClients) > before
    finally:
        node.stopService()


def test_two_nodes_connect_then_back_off_and_reconnect_when_one_returns(tmp_path):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b_id = identity.Identity.generate()
    b = memory_node(net, tmp_path / "b", ident=b_id)
    b_port = b.node.listen_port
    url = net.url(b_port)
    try:
        a.node.store.add([url], "register")
        a.node.peers.tick_soon()
        net.advance(0.5)
        assert a.node.peers.book.state(url) is S.CONNECTED
        assert [p["node_id"] for p in a.node.live_peers()] == [b_id.node_id]
        b.stopService()
        net.advance(0.1)
        assert a.node.peers.book.state(url) in (S.BACKOFF, S.DIALING, S.HANDSHAKING)
        assert a.node.live_peers() == []
        # b comes back on the same port with the same key: a finds it again.
        net.advance(5)
        b = memory_node(net, tmp_path / "b2", ident=b_id, port=b_port)
        net.advance(10)
        assert a.node.peers.book.state(url) is S.CONNECTED
        assert [p["node_id"] for p in a.node.live_peers()] == [b_id.node_id]
    finally:
        a.stopService()
        b.stopService()


def test_the_node_dialing_itself_ends_in_self_and_never_again(tmp_path):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    own = net.url(a.node.listen_port).replace("127.0.0.1", "localhost")
    try:
        # localhost is dialed by name: the memory network routes by port.
        a.node.store.add([own], "register")
        a.node.peers.tick_soon()
        net.advance(1)
        assert a.node.peers.book.state(own) is S.SELF and a.node.store.get(own).is_self
        before = len(net.reactor.tcpClients)
        net.advance(120)
        assert len(net.reactor.tcpClients) == before
    finally:
        a.stopService()


# -- Plumtree per connection ------------------------------------------------------------------

def test_a_replacing_connection_starts_eager_whatever_the_old_one_was():
    from twisted.internet.task import Clock

    gossip = Gossip(Clock(), identity.Identity.generate(), NodeMetrics())
    peer = identity.Identity.generate().node_id
    old = FakeConnection("in", peer)
    gossip.peer_up(old)
    gossip.on_prune(old, codec.Event("prune", {}))
    assert gossip.links[old].lazy
    # The pair's duplicate rule replaces it with a connection the other way.
    new = FakeConnection("out", peer)
    gossip.peer_up(new)
    gossip.peer_down(old)
    assert not gossip.links[new].lazy and old not in gossip.links
    # A message published now goes whole over the new link.
    gossip.accept(attrs_envelope(gossip), sender=None)
    assert [e.name for e in new.events()] == ["gossip"]


def test_one_announcer_cannot_fill_the_awaited_ids(tmp_path):
    # Ids announced over lazy links are awaited (and grafted for) up to
    # cache_capacity; a peer announcing made-up ids, 1,000 an event, kept
    # the table full, and every honest announcement was passed over: the
    # tree could no longer be repaired. Each link now has its share.
    from twisted.internet.task import Clock
    import os

    gossip = Gossip(Clock(), identity.Identity.generate(), NodeMetrics())
    attacker = FakeConnection("in", identity.Identity.generate().node_id)
    honest = FakeConnection("in", identity.Identity.generate().node_id)
    gossip.peer_up(attacker)
    gossip.peer_up(honest)
    capacity = gossip.config.cache_capacity
    for _ in range(capacity // 1000 + 2):
        gossip.on_ihave(attacker, codec.Event("ihave", {"ids": [os.urandom(32).hex() for _ in range(1000)]}))
    wanted = os.urandom(32).hex()
    gossip.on_ihave(honest, codec.Event("ihave", {"ids": [wanted]}))
    assert wanted in gossip.missing
    assert len(gossip.missing) <= capacity
    # Grafted for, then given up: the attacker's share comes back.
    for _ in range(2):
        gossip.reactor.advance(gossip.config.graft_timeout * 2 + 0.1)
    assert gossip.missing == {}
    gossip.on_ihave(attacker, codec.Event("ihave", {"ids": [os.urandom(32).hex() for _ in range(1000)]}))
    assert len(gossip.missing) == 1000


def attrs_envelope(gossip: Gossip):
    from foxnode.gossip import Envelope

    return Envelope.create(gossip.signer, "t", {"n": 1}, 60, gossip.reactor.seconds())


# -- pinned addresses (PROTOCOL.md "Peer management") ------------------------------------------

def test_a_pinned_address_connects_only_to_the_node_it_names(tmp_path):
    from foxnode import address
    from foxnode.handshake import CLOSE_CODES, WRONG_NODE

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    try:
        url = net.url(b.node.listen_port)
        someone_else = identity.Identity.generate().node_id
        wrong, right = address.pinned(url, someone_else), address.pinned(url, b.node.node_id)
        a.node.store.add([wrong], "register")
        a.node.peers.tick_soon()
        net.advance(0.5)
        record = a.node.store.get(wrong)
        assert record.failures == 1 and record.last_error == WRONG_NODE
        assert a.node.peers.book.state(wrong) is S.BACKOFF
        assert a.node.live_peers() == [] and b.node.live_peers() == []
        assert a.node.metrics.dials.labels(WRONG_NODE)._value.get() == 1
        assert CLOSE_CODES[WRONG_NODE] == 4012
        # The same host and port pinned to the node that is there: a peer.
        a.node.store.add([right], "register")
        a.node.peers.tick_soon()
        net.advance(0.5)
        assert a.node.peers.book.state(right) is S.CONNECTED
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
    finally:
        a.stopService()
        b.stopService()


@pytest.mark.parametrize("source", ["exchange", "register"])
def test_a_pin_guards_its_endpoint_not_only_its_own_record(tmp_path, source):
    # The operator pinned b's endpoint to another node; a stranger (peer
    # exchange, or a register) brings the same endpoint unpinned. Its dial
    # must meet the pin's check too, not reach whichever node answers.
    from foxnode import address
    from foxnode.handshake import WRONG_NODE

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    try:
        url = net.url(b.node.listen_port)
        expected = identity.Identity.generate().node_id
        register(a, address.pinned(url, expected), operator=True)
        a.node.store.add([url], source)
        a.node.peers.tick_soon()
        net.advance(0.5)
        assert a.node.live_peers() == [] and b.node.live_peers() == []
        twin = a.node.store.get(url)
        assert twin.failures == 1 and twin.last_error == WRONG_NODE
        assert a.node.peers.book.state(url) is S.BACKOFF
        # Pinned to the node that is there: the twin reaches it.
        register(a, address.pinned(url, b.node.node_id), operator=True)
        a.node.peers.book.retry_due(a.node.reactor.seconds() + 3600)
        a.node.peers.tick_soon()
        net.advance(0.5)
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
    finally:
        a.stopService()
        b.stopService()


def register(node_service, addr, operator):
    """``register`` of ``addr`` by the operator (a trusted client) or a stranger."""
    conn = FakeConnection(remote_host="127.0.0.1" if operator else "192.0.2.7")
    conn.trusted = operator
    reply = node_service.node.op_register(conn, {"addr": addr})
    got = []
    reply.addBoth(got.append)
    assert got[0].status == 202 and got[0].response["accepted"] == [addr], got


def test_a_strangers_pin_guards_only_itself(tmp_path):
    # Anyone may register a pinned address: one naming a node that is not
    # there must not bar this node from the endpoint, reached unpinned.
    from foxnode import address
    from foxnode.handshake import WRONG_NODE

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    try:
        url = net.url(b.node.listen_port)
        bogus = address.pinned(url, identity.Identity.generate().node_id)
        register(a, bogus, operator=False)
        register(a, url, operator=False)
        assert a.node.peers.pins_of(url) == frozenset()
        a.node.peers.tick_soon()
        net.advance(0.5)
        assert a.node.store.get(bogus).last_error == WRONG_NODE
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
        # The operator registering that same pin makes it guard the endpoint.
        register(a, bogus, operator=True)
        assert a.node.store.get(bogus).operator
        assert a.node.peers.pins_of(url) == {address.parse(bogus).node_id}
    finally:
        a.stopService()
        b.stopService()


def test_a_pin_guards_every_spelling_of_its_endpoint(tmp_path):
    from foxnode import address

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    try:
        expected = identity.Identity.generate().node_id
        register(a, address.pinned("ws://127.0.0.1:80/ws", expected), operator=True)
        for twin in ("ws://127.0.0.1/ws", "ws://127.0.0.1:80/ws?x=1"):
            assert a.node.peers.pins_of(twin) == {expected}
        # Another endpoint, and an address with a pin of its own, are held to theirs.
        assert a.node.peers.pins_of("ws://127.0.0.1:81/ws") == frozenset()
        other = identity.Identity.generate().node_id
        assert a.node.peers.pins_of(address.pinned("ws://127.0.0.1/ws", other)) == {other}
    finally:
        a.stopService()


def test_info_gives_the_node_its_own_pinned_address(tmp_path):
    from foxnode import address

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    try:
        info = a.node.info(FakeConnection(remote_host="127.0.0.1"))
        parsed = address.parse(info["address"])
        assert parsed.node_id == a.node.node_id and parsed.dial_url == info["listen"]
        assert {"register", "peers", "hello", "publish"} <= set(info["ops"])
    finally:
        a.stopService()


@pytest.mark.parametrize("fragment", ["f", "AB" * 32, "ab" * 31, "ab" * 33, "ab" * 32 + "#x", ""])
def test_register_refuses_a_fragment_that_is_not_a_node_id(tmp_path, fragment):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    try:
        reply = a.node.op_register(FakeConnection(), {"addr": f"ws://127.3.0.1:9/ws#{fragment}"})
        reply = reply.result if hasattr(reply, "result") else reply
        assert reply.status == 202 and reply.response["accepted"] == []
        assert "node id" in reply.response["rejected"][0]["reason"]
        assert len(a.node.store) == 0
    finally:
        a.stopService()


# -- static and trusted peers ---------------------------------------------------------------------

def test_a_static_peer_is_kept_connected_outside_max_outbound(tmp_path):
    net = MemoryNetwork()
    b_id = identity.Identity.generate()
    b = memory_node(net, tmp_path / "b", ident=b_id)
    b_port = b.node.listen_port
    url = net.url(b_port)
    ordinary = memory_node(net, tmp_path / "c")
    a = memory_node(net, tmp_path / "a", configs(max_outbound=0, static=(url,)))
    try:
        a.node.store.add([url], "bootstrap")  # as tap.makeService stores them
        a.node.store.add([net.url(ordinary.node.listen_port)], "register")
        net.advance(2)
        # No outbound slot at all, yet the static peer is connected, and
        # only it: the registered address waits for a slot.
        assert [(p["node_id"], p["kind"]) for p in a.node.live_peers()] == [(b_id.node_id, "static")]
        kinds = {p["addr"]: p["kind"] for p in a.node.peers.peer_states()}
        assert kinds[url] == "static" and kinds[net.url(ordinary.node.listen_port)] is None
        # Gone, it is dialed again and again (with backoff), and never forgotten.
        b.stopService()
        net.advance(200)
        assert a.node.store.get(url).failures > 3 and url in a.node.store
        b = memory_node(net, tmp_path / "b2", ident=b_id, port=b_port)
        net.advance(70)
        assert [p["node_id"] for p in a.node.live_peers()] == [b_id.node_id]
    finally:
        for n in (a, b, ordinary):
            n.stopService()


def test_a_static_address_known_before_becomes_a_bootstrap_one(tmp_path):
    from foxnode.store import BOOTSTRAP, load

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    url = "ws://127.3.0.1:9/ws"
    try:
        a.node.store.add([url], "register")
        # What tap.makeService does with --peer and --static-peer at start.
        a.node.store.add([url], BOOTSTRAP, durable=False, revive=True)
        assert a.node.store.get(url).source == BOOTSTRAP
        a.node.store.commit()
        assert {r.addr: r.source for r in load(tmp_path / "a" / "peers.json")} == {url: BOOTSTRAP}
    finally:
        a.stopService()


def test_a_static_peer_is_static_whichever_side_dialed_the_link_kept(tmp_path):
    from foxnode import address

    net = MemoryNetwork()
    b_id, c_id = identity.Identity.generate(), identity.Identity.generate()
    url = "ws://127.3.0.1:9/ws"
    pinned = address.pinned("ws://127.3.0.2:9/ws", c_id.node_id)
    a = memory_node(net, tmp_path / "a", configs(max_inbound=0, static=(url, pinned)))
    try:
        a.node.store.add([url, pinned], "bootstrap")
        a.node.store.update(url, node_id=b_id.node_id)  # as a handshake once showed
        # Of two links dialed at once both sides keep the one the greater
        # id dialed: it may be the static peer's own, coming in. Still a
        # static peer, taking no inbound slot, and admitted with none free;
        # so is the node a static address pins, never seen before.
        for ident in (b_id, c_id):
            conn = FakeConnection(direction="in", node_id=ident.node_id)
            a.node.peers._check_admission(conn, {"node_id": ident.node_id})
            a.node.peers.peers[ident.node_id] = conn
            assert a.node.peers.kind(conn) == "static"
        assert a.node.peers.inbound() == 0
        stranger = identity.Identity.generate().node_id
        with pytest.raises(Exception, match="inbound peers"):
            a.node.peers._check_admission(FakeConnection(direction="in", node_id=stranger), {"node_id": stranger})
    finally:
        a.node.peers.peers.clear()
        a.stopService()


def test_a_trusted_peer_is_admitted_when_the_node_is_full(tmp_path):
    from foxnode.handshake import TOO_MANY_PEERS

    net = MemoryNetwork()
    dialer_id, stranger_id = identity.Identity.generate(), identity.Identity.generate()
    full = memory_node(net, tmp_path / "full", configs(max_inbound=0, trusted_peers=frozenset({dialer_id.node_id})))
    url = net.url(full.node.listen_port)
    stranger = memory_node(net, tmp_path / "s", ident=stranger_id)
    dialer = memory_node(net, tmp_path / "d", ident=dialer_id)
    try:
        for n in (stranger, dialer):
            n.node.store.add([url], "register")
            n.node.peers.tick_soon()
        net.advance(1)
        assert stranger.node.store.get(url).last_error == TOO_MANY_PEERS
        assert stranger.node.live_peers() == []
        assert [(p["node_id"], p["kind"]) for p in full.node.live_peers()] == [(dialer_id.node_id, "trusted")]
    finally:
        for n in (full, stranger, dialer):
            n.stopService()


# -- unregister ---------------------------------------------------------------------------------

def _call(node, op, args, trusted=True):
    from foxnode import protocol  # noqa: F401  (the request path: node.handle_request)

    conn = FakeConnection(remote_host="127.0.0.1")
    conn.trusted = trusted
    result = node.handle_request(conn, codec.Request(op, args, None, False))
    if hasattr(result, "addCallback"):
        box = []
        result.addBoth(box.append)
        assert box, "the reply did not come"
        result = box[0]
    return result


def test_unregister_forgets_closes_and_never_takes_it_back_from_peers(tmp_path):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    url = net.url(b.node.listen_port)
    try:
        assert _call(a.node, "register", {"addr": url}).status == 202
        net.advance(0.5)
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
        from foxnode.store import load

        assert url in {r.addr for r in load(tmp_path / "a" / "peers.json")}
        unknown = "ws://127.3.0.1:9/ws"
        reply = _call(a.node, "unregister", {"addr": [url, unknown]})
        assert reply.status == 200 and reply.response == {"removed": [url], "unknown": [unknown]}
        # Durable: the files (the peers file and its journal) no longer hold it.
        from foxnode.store import load

        assert url not in {r.addr for r in load(tmp_path / "a" / "peers.json")}
        net.advance(0.5)
        assert a.node.live_peers() == [] and b.node.live_peers() == []
        assert url not in a.node.store and a.node.peers.book.state(url) is S.IDLE
        # A peer handing it back (exchange, or its hello) does not bring it back ...
        a.node.peers._learn(FakeConnection(remote_host="127.0.0.1"), [url], "a peer")
        assert url not in a.node.store
        port = b.node.listen_port

        def dials_of_b() -> int:
            return sum(1 for c in net.reactor.tcpClients if c[1] == port)

        before = dials_of_b()
        net.advance(120)
        # (b may dial a meanwhile: a's address is b's to keep.)
        assert dials_of_b() == before, "an unregistered address was dialed"
        assert url not in a.node.store
        # ... registering it again does.
        assert _call(a.node, "register", {"addr": url}).status == 202
        net.advance(1)
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
    finally:
        a.stopService()
        b.stopService()


def test_unregister_takes_every_spelling_and_no_spelling_comes_back(tmp_path):
    from foxnode import address

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    url = net.url(b.node.listen_port)
    try:
        pinned = address.pinned(url, b.node.node_id)
        for spelling in (pinned, url + "?from=exchange"):
            a.node.store.add([spelling], "register")
        # The operator names it plainly (and pinned to someone else): both
        # stored spellings go.
        reply = _call(a.node, "unregister", {"addr": [url, url + "#" + "cd" * 32]})
        assert reply.status == 200 and reply.response == {"removed": [pinned, url + "?from=exchange"],
                                                          "unknown": []}, reply
        # Handed back in any spelling, by exchange or by hello: not taken.
        peer = FakeConnection(remote_host="127.0.0.1")
        a.node.peers._learn(peer, [url, pinned, url + "?x", url + "#" + "ef" * 32], "a peer")
        assert a.node.store.addresses() == []
        net.advance(60)
        # Never dialed again (b, which a dialed, may dial in: its own choice).
        assert a.node.store.addresses() == []
        assert all(p["direction"] == "in" for p in a.node.live_peers())
    finally:
        a.stopService()
        b.stopService()


@pytest.mark.parametrize("args", [None, {}, {"addr": []}, {"addr": 7}, {"addr": ["ws://127.3.0.1:9/ws", "nope"]},
                                  {"addr": "ws://127.3.0.1:9/ws#f"}, {"addr": ["ws://127.3.0.1:9/ws"] * 101}])
def test_unregister_of_bad_input_says_which_and_changes_nothing(tmp_path, args):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    try:
        kept = "ws://127.3.0.1:9/ws"
        a.node.store.add([kept], "register")
        reply = _call(a.node, "unregister", args)
        assert reply.status == 400 and '"unregister"' in reply.error and '"addr"' in reply.error, reply
        assert kept in a.node.store
    finally:
        a.stopService()


def test_unregister_is_for_the_operator_only(tmp_path):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    try:
        kept = "ws://127.3.0.1:9/ws"
        a.node.store.add([kept], "register")
        reply = _call(a.node, "unregister", {"addr": kept}, trusted=False)
        assert reply.status == 403 and reply.error == 'Operation "unregister" is only for trusted clients.'
        assert kept in a.node.store
    finally:
        a.stopService()
