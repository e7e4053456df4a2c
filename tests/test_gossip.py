"""Gossip in one reactor: every subscriber on every node gets every
message of its topics exactly once; bad envelopes are refused."""

import time

import pytest_twisted

from foxnode import client, codec, identity
from foxnode.gossip import CACHE_ENTRY_BYTES, CLOSE_ABUSE, Envelope
from foxnode.testing import connect_as_peer, sleep, start_node, wait_for


class Inbox:
    def __init__(self):
        self.messages = []

    def __call__(self, event):
        if event.name == "message":
            self.messages.append(event.body)

    def ids(self):
        return [m["id"] for m in self.messages]


async def subscribe(reactor, node, *topics):
    inbox = Inbox()
    conn = await client.connect(reactor, node.url, on_event=inbox)
    reply = await conn.request("subscribe", {"topics": list(topics)})
    assert reply.status == 200, reply
    return conn, inbox


async def publish(reactor, node, topic, payload):
    reply = await client.call(reactor, node.url, "publish", {"topic": topic, "payload": payload})
    assert reply.status == 202, reply
    return reply.response["id"]


async def stop_all(nodes, conns=()):
    for c in conns:
        c.close()
    for n in nodes:
        await n.stop()


def received_copies(nodes):
    total = 0
    for n in nodes:
        m = n.node.metrics.gossip_received
        total += m.labels("accepted")._value.get() + m.labels("duplicate")._value.get()
    return total


async def run_network(reactor, nodes, publishers_every=3, batches=2, per_batch=5):
    """Subscribe on every node (topic t, and a listener of topic u), publish
    on t and u from various nodes, and check exact-once delivery."""
    conns, t_inboxes, u_inboxes = [], [], []
    for n in nodes:
        c, inbox = await subscribe(reactor, n, "t")
        conns.append(c)
        t_inboxes.append(inbox)
        c, inbox = await subscribe(reactor, n, "u")
        conns.append(c)
        u_inboxes.append(inbox)
    expected_t, expected_u = [], []
    copies = []
    for batch in range(batches):
        before = received_copies(nodes)
        for i in range(per_batch):
            src = nodes[(i * publishers_every + batch) % len(nodes)]
            expected_t.append(await publish(reactor, src, "t", {"batch": batch, "i": i}))
            expected_u.append(await publish(reactor, src, "u", f"other {batch} {i}"))
        await wait_for(reactor, lambda: all(len(b.messages) >= len(expected_t) for b in t_inboxes)
                       and all(len(b.messages) >= len(expected_u) for b in u_inboxes),
                       timeout=20, what="every subscriber to get every message")
        await sleep(reactor, 0.3)  # time for any extra copy to show up
        copies.append((received_copies(nodes) - before) / (2 * per_batch * len(nodes)))
    for inbox in t_inboxes:
        assert sorted(inbox.ids()) == sorted(expected_t), "not exactly once"
        assert {m["topic"] for m in inbox.messages} == {"t"}
    for inbox in u_inboxes:
        assert sorted(inbox.ids()) == sorted(expected_u)
    return conns, copies


@pytest_twisted.ensureDeferred
async def test_chain_of_eight_nodes_delivers_every_message_once(reactor, tmp_path):
    # One outbound and one inbound slot each: the network stays a chain, so
    # messages must cross up to seven hops.
    limits = ("--max-outbound", "1", "--max-inbound", "1")
    nodes = [await start_node(reactor, tmp_path / "n0", *limits)]
    for i in range(1, 8):
        nodes.append(await start_node(reactor, tmp_path / f"n{i}", *limits, "--peer", nodes[-1].url))
    conns = []
    try:
        await wait_for(reactor, lambda: all(len(n.node.live_peers()) == (1 if n in (nodes[0], nodes[-1]) else 2)
                                            for n in nodes), timeout=20, what="the chain to form")
        conns, copies = await run_network(reactor, nodes)
        # On a chain every link is on the tree: exactly one copy per node.
        assert copies[-1] <= 1.0
    finally:
        await stop_all(nodes, conns)


@pytest_twisted.ensureDeferred
async def test_dense_twenty_node_network_delivers_once_with_few_copies(reactor, tmp_path):
    nodes = [await start_node(reactor, tmp_path / "n0", "--exchange-interval", "0.5")]
    for i in range(1, 20):
        nodes.append(await start_node(reactor, tmp_path / f"n{i}", "--exchange-interval", "0.5",
                                      "--peer", nodes[0].url))
    conns = []
    try:
        await wait_for(reactor, lambda: all(len(n.node.live_peers()) >= 4 for n in nodes),
                       timeout=30, what="a dense network")
        # The first batches spread over every link until duplicates prune
        # the extra ones; by the last the tree has settled.
        conns, copies = await run_network(reactor, nodes, batches=4)
        degree = sum(len(n.node.live_peers()) for n in nodes) / len(nodes)
        print(f"average degree {degree:.1f}, copies per node per message by batch: {copies}")
        # Flooding would send about `degree` copies to every node; once the
        # eager tree settles, about one.
        assert copies[-1] <= 1.5 < degree
    finally:
        await stop_all(nodes, conns)


def forged_envelope(signer, origin=None, created=None, ttl=60, payload="x", topic="t"):
    """An envelope with a correct id, signed by ``signer`` but claiming ``origin``."""
    from foxnode.gossip import _canonical, _signed_part
    import hashlib

    origin = origin or signer.node_id
    created = round(time.time(), 3) if created is None else created
    nonce = "00" * 8
    mid = hashlib.sha256(_canonical(origin, topic, payload, created, ttl, nonce)).hexdigest()
    return {"id": mid, "origin": origin, "topic": topic, "payload": payload, "created": created,
            "ttl": ttl, "nonce": nonce, "sig": signer.sign(_signed_part(mid))}


@pytest_twisted.ensureDeferred
async def test_tampered_forged_expired_future_and_replayed_envelopes_are_refused(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    sub, inbox = await subscribe(reactor, node, "t")
    told = []
    peer = await connect_as_peer(reactor, node.url,
                                 on_event=lambda e: told.append(e.body) if e.name == "rejected" else None)
    me = peer.fox_state["identity"]
    try:
        def send(env):
            peer.send_frame(codec.encode_event("gossip", envelope=env))

        good = Envelope.create(me, "t", {"n": 1}, 60, time.time()).to_json()
        send(good)
        await wait_for(reactor, lambda: len(inbox.messages) == 1, what="the good envelope")
        assert inbox.messages[0]["origin"] == me.node_id

        send(good)  # replayed
        # A copy of a seen envelope with another payload is dropped as the
        # duplicate its id says it is; a tampered new one fails its id check.
        send(dict(good, payload={"n": 2}))
        fresh = Envelope.create(me, "t", {"n": 3}, 60, time.time()).to_json()
        send(dict(fresh, payload={"n": 4}))
        victim = identity.Identity.generate()
        send(forged_envelope(me, origin=victim.node_id))
        send(forged_envelope(me, created=round(time.time() - 100, 3), ttl=10))  # expired
        send(forged_envelope(me, created=round(time.time() + 3600, 3)))  # from the future
        send(forged_envelope(me, payload="y" * (70 * 1024)))  # over the size limit
        await wait_for(reactor, lambda: len(told) >= 5, what="the node to say why it refused")
        reasons = " | ".join(t["reason"] for t in told)
        for word in ("tampered", "forged", "expired", "future", "payload"):
            assert word in reasons
        await sleep(reactor, 0.2)
        assert len(inbox.messages) == 1, "a refused or replayed envelope was delivered"
        received = node.node.metrics.gossip_received
        assert received.labels("duplicate")._value.get() == 2
        assert received.labels("forged")._value.get() == 1
        assert received.labels("tampered")._value.get() == 1

        # A peer that keeps sending garbage is disconnected.
        for _ in range(40):
            send(forged_envelope(me, origin=victim.node_id))
        was_open, code, reason = await peer.when_closed()
        assert code == CLOSE_ABUSE
    finally:
        sub.close()
        peer.close()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_subscribe_and_publish_validate_their_args(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    conn = await client.connect(reactor, node.url)
    try:
        # A missing argument is the client's fault: 400 naming it (PROTOCOL: never a 500).
        assert (await conn.request("publish", {"topic": "t"})).status == 400
        assert (await conn.request("publish", {"topic": 5, "payload": 1})).status == 400
        assert (await conn.request("publish", {"topic": "t", "payload": 1, "ttl": 0})).status == 400
        big = "x" * (65 * 1024)
        assert (await conn.request("publish", {"topic": "t", "payload": big})).status == 400
        assert (await conn.request("subscribe", {})).status == 400
        assert (await conn.request("subscribe", {"topics": [1]})).status == 400
        reply = await conn.request("subscribe", {"topics": ["a", "b"]})
        assert reply.status == 200 and reply.response["topics"] == ["a", "b"]
        assert isinstance(reply.response["subscription"], str)  # PROTOCOL.md: the reply adds it
        reply = await conn.request("unsubscribe", {"topics": ["a"]})
        assert reply.status == 200 and reply.response == {"topics": ["b"]}
        # An unsubscribed topic is no longer delivered.
        got = []
        other = await client.connect(reactor, node.url, on_event=got.append)
        await other.request("subscribe", {"topics": ["a"]})
        await conn.request("publish", {"topic": "a", "payload": 1})
        await wait_for(reactor, lambda: got, what="delivery to the other subscriber")
        other.close()
    finally:
        conn.close()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_slow_subscriber_does_not_stall_others_and_memory_stays_bounded(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n", "--send-queue", "200000", "--rate", "5000", "--burst", "5000")
    slow, _ = await subscribe(reactor, node, "t")
    fast, inbox = await subscribe(reactor, node, "t")
    publisher = await client.connect(reactor, node.url)
    try:
        slow.transport.pauseProducing()  # the slow one stops reading
        payload = "z" * 60_000
        count = 300  # 18 MB in all: far more than socket buffers and the queue
        for i in range(count):
            reply = await publisher.request("publish", {"topic": "t", "payload": [i, payload]})
            assert reply.status == 202
        await wait_for(reactor, lambda: len(inbox.messages) == count, timeout=30,
                       what="the fast subscriber to get everything")
        server_side = [c for c in node.node.connections if "t" in c.fox_state.get("topics", ())
                       and c.remote_port == slow.transport.getHost().port]
        assert len(server_side) == 1
        assert server_side[0]._backlog_bytes <= 200_000
        dropped = node.node.metrics.send_dropped.labels("subscriber")._value.get()
        assert dropped > 0
    finally:
        slow.transport.resumeProducing()
        for c in (slow, fast, publisher):
            c.close()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_the_envelope_cache_is_bounded_in_bytes(reactor, tmp_path):
    import attrs

    node = await start_node(reactor, tmp_path / "n", "--rate", "5000", "--burst", "5000")
    gossip = node.node.gossip
    gossip.config = attrs.evolve(gossip.config, cache_bytes=1_000_000)
    conn = await client.connect(reactor, node.url)
    try:
        for i in range(60):  # 60 messages of 50 kB: 3 MB of envelopes
            reply = await conn.request("publish", {"topic": "t", "payload": [i, "p" * 50_000]})
            assert reply.status == 202
        held = sum(len(entry.frame) + CACHE_ENTRY_BYTES for entry in gossip.cache.values())
        assert held == gossip._cache_bytes <= 1_000_000
        assert 0 < len(gossip.cache) < 60
    finally:
        conn.close()
        await node.stop()
