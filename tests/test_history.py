"""History and catch-up (PROTOCOL.md "History and catch-up"), between
nodes in this process on real loopback sockets: ``history`` pages and
``subscribe`` with ``since`` under concurrent publishes, sealed history,
and a node that was away catching up from its peer."""

from __future__ import annotations

import time

from foxnode import client, codec, identity
from foxnode.gossip import Envelope
from foxnode.testing import connect_as_peer, sleep, start_node, wait_for


async def publish(conn, n, topic="t", **extra):
    reply = await conn.request("publish", {"topic": topic, "payload": {"n": n}, **extra})
    assert reply.status == 202, reply
    return reply.response["id"]


async def all_history(conn, limit=7, **args):
    """Every page of ``history``, following the cursor."""
    got, cursor, pages = [], None, 0
    while True:
        reply = await conn.request("history", {"topics": ["t"], "limit": limit, "cursor": cursor, **args})
        assert reply.status == 200, reply
        got += reply.response["messages"]
        cursor = reply.response["cursor"]
        pages += 1
        if cursor is None:
            return got, pages


async def test_history_pages_oldest_first_and_neither_repeat_nor_skip_under_concurrent_publishes(
        reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, node.url)
    try:
        before = [await publish(conn, n) for n in range(40)]
        await publish(conn, 999, topic="other")
        publisher = await client.connect(reactor, node.url)
        ids, cursor, pages = [], None, 0
        n = 100
        while True:
            reply = await conn.request("history", {"topics": ["t"], "limit": 6, "cursor": cursor})
            assert reply.status == 200, reply
            ids += [m["id"] for m in reply.response["messages"]]
            for m in reply.response["messages"]:
                assert m["event"] == "message" and m["topic"] == "t" and "subscription" not in m
            cursor = reply.response["cursor"]
            pages += 1
            # Meanwhile others publish, between every two pages.
            for _ in range(3):
                await publish(publisher, n)
                n += 1
            if cursor is None or pages > 100:
                break
        assert len(ids) == len(set(ids)), "a message on two pages"
        assert set(before) <= set(ids), "a message skipped"
        assert ids[:40] == before, "not oldest first"
        got, _ = await all_history(conn)
        times = [m["created"] for m in got]
        assert times == sorted(times)
        assert len(got) == 40 + (n - 100)
        # A time range: only what was created in it, either end included.
        mid = got[10]["created"], got[20]["created"]
        ranged, _ = await all_history(conn, since=mid[0], until=mid[1])
        assert ranged and all(mid[0] <= m["created"] <= mid[1] for m in ranged)
        assert {m["id"] for m in got if mid[0] <= m["created"] <= mid[1]} == {m["id"] for m in ranged}
        bad = await conn.request("history", {"topics": ["t"], "cursor": "h1:" + "A" * 20})
        assert bad.status == 400 and '"cursor"' in bad.error
        publisher.close()
    finally:
        conn.close()
        await node.stop()


async def test_subscribe_since_replays_then_goes_live_with_no_gap_and_no_duplicate(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "a")
    pub = await client.connect(reactor, node.url)
    events = []
    sub = await client.connect(reactor, node.url, on_event=lambda e: events.append(e.body))
    try:
        stored = [await publish(pub, n) for n in range(300)]
        start = time.time() - 3600
        # Publishes keep coming while the subscription is made and replayed.
        live = []
        publishing = [pub.request("publish", {"topic": "t", "payload": {"n": 1000 + i}}) for i in range(200)]
        reply = await sub.request("subscribe", {"topics": ["t"], "since": start})
        assert reply.status == 200, reply
        for d in publishing:
            r = await d
            assert r.status == 202
            live.append(r.response["id"])
        more = [await publish(pub, 5000 + n) for n in range(20)]
        everything = stored + live + more
        await wait_for(reactor, lambda: len(events) >= len(everything), timeout=20)
        await sleep(reactor, 0.3)
        got = [e["id"] for e in events if e.get("event") == "message"]
        assert len(got) == len(set(got)), "a duplicate"
        assert set(got) == set(everything), "a gap"
        assert got[:300] == stored, "the stored ones first, oldest first"
        assert all(e["subscription"] == reply.response["subscription"] for e in events)
        # since in the future: only live ones.
        later = []
        sub2 = await client.connect(reactor, node.url, on_event=lambda e: later.append(e.body))
        assert (await sub2.request("subscribe", {"topics": ["t"], "since": time.time() + 3600})).status == 200
        last = await publish(pub, 9)
        await wait_for(reactor, lambda: later)
        assert [e["id"] for e in later] == [last]
        sub2.close()
    finally:
        pub.close()
        sub.close()
        await node.stop()


async def test_a_slow_reader_gets_its_whole_replay_at_its_own_pace(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "a", "--send-queue", "4096")
    pub = await client.connect(reactor, node.url)
    events = []
    sub = await client.connect(reactor, node.url, on_event=lambda e: events.append(e.body))
    try:
        # More than the kernel's socket buffers hold, so the node must wait.
        stored = [await publish(pub, "x" * 20_000) for _ in range(400)]
        sub.transport.pauseProducing()  # the reader stops reading for a while
        reply = sub.request("subscribe", {"topics": ["t"], "since": 0})
        await sleep(reactor, 1.0)
        sub.transport.resumeProducing()
        assert (await reply).status == 200
        await wait_for(reactor, lambda: len(events) >= 400, timeout=30)
        assert [e["id"] for e in events] == stored
        assert node.node.metrics.send_dropped.labels("subscriber")._value.get() == 0
    finally:
        pub.close()
        sub.close()
        await node.stop()


async def test_history_with_a_key_opens_what_it_opens_and_nothing_else(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, node.url)
    try:
        key = (await conn.request("newkey", {"type": "sym"})).response["id"]
        other = (await conn.request("newkey", {"type": "sym"})).response["id"]
        plain = await publish(conn, 1)
        sealed = await publish(conn, 2, key=key)
        await publish(conn, 3, key=other)
        with_key = (await conn.request("history", {"topics": ["t"], "key": key})).response["messages"]
        assert [(m["id"], m["payload"], m["encrypted"]) for m in with_key] == [(sealed, {"n": 2}, "sym")]
        without = (await conn.request("history", {"topics": ["t"]})).response["messages"]
        assert [m["id"] for m in without] == [plain]
        # What the store holds is the envelope as it travelled: no plaintext of a sealed one.
        raw = b"".join(p.read_bytes() for p in (tmp_path / "a").glob("messages.sqlite*"))
        assert b'"n":2' not in raw and b'"n":1' in raw
    finally:
        conn.close()
        await node.stop()


def _metric(node, name, **labels):
    value = node.node.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_node_that_was_away_catches_up_and_a_third_gets_it_through_it(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    b_dir = tmp_path / "b"
    b = await start_node(reactor, b_dir, "--peer", a.url)
    conn = await client.connect(reactor, a.url)
    try:
        await wait_for(reactor, lambda: b.node.peers.connected_count() if hasattr(b.node.peers, "connected_count")
                       else b.node.gossip.links)
        first = [await publish(conn, n) for n in range(5)]
        await wait_for(reactor, lambda: b.node.gossip.history.store.count == 5)
        await b.stop()
        # While b is away, 500 pass at a.
        missed = [await publish(conn, 100 + n) for n in range(500)]
        b = await start_node(reactor, b_dir, "--peer", a.url)
        c = await start_node(reactor, tmp_path / "c", "--peer", b.url, "--max-outbound", "1")
        started = reactor.seconds()
        bconn = await client.connect(reactor, b.url)
        await wait_for(reactor, lambda: b.node.gossip.history.store.count == 505, timeout=30)
        got, _ = await all_history(bconn, limit=1000)
        assert [m["id"] for m in got] == first + missed
        assert reactor.seconds() - started < 15
        assert _metric(b, "foxnode_catchup_envelopes_total", peer=a.node.node_id[:16]) == 500
        assert _metric(b, "foxnode_history_messages") == 505
        # Not everything was sent again: a pushed what b lacked, about once.
        assert _metric(a, "foxnode_gossip_envelopes_received_total", outcome="duplicate") == 0
        sent = _metric(a, "foxnode_catchup_bytes_total", direction="sent")
        stored = sum(len(r.envelope) for r in a.node.gossip.history.rows(missed))
        assert stored <= sent < stored * 1.3, (sent, stored)
        # c, which knows only b, gets it all too.
        await wait_for(reactor, lambda: c.node.gossip.history.store.count == 505, timeout=30)
        bconn.close()
        await c.stop()
        # A reconnect with nothing new to say costs a summary each way.
        before = _metric(a, "foxnode_catchup_bytes_total", direction="sent")
        await b.stop()
        b = await start_node(reactor, b_dir, "--peer", a.url)
        await wait_for(reactor, lambda: b.node.gossip.links)
        await sleep(reactor, 0.5)
        assert _metric(a, "foxnode_catchup_bytes_total", direction="sent") - before < 2000
    finally:
        conn.close()
        await a.stop()
        await b.stop()


async def test_pushes_that_were_not_asked_for_or_are_forged_go_nowhere(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    events = []
    sub = await client.connect(reactor, a.url, on_event=lambda e: events.append(e.body))
    await sub.request("subscribe", {"topics": ["t"]})
    peer_id = identity.Identity.generate()
    got = []
    peer = await connect_as_peer(reactor, a.url, ident=peer_id, on_event=lambda e: got.append(e))
    try:
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        good = Envelope.create(peer_id, "t", {"n": 1}, 60, time.time())
        # Not asked for: a has listed nothing of ours.
        peer.send_frame(codec.encode_event("sync_push", envelopes=[good.to_json()]))
        await sleep(reactor, 0.3)
        assert a.node.gossip.history.store.count == 0 and not events
        # Asked for (a lists its empty bucket when we claim more), but tampered.
        bucket = int(good.created // 60)
        peer.send_frame(codec.encode_event("sync", buckets=[[bucket, 2, "ff" * 16]]))
        await wait_for(reactor, lambda: any(e.name == "sync_have" for e in got))
        tampered = dict(good.to_json(), payload={"n": 2})
        peer.send_frame(codec.encode_event("sync_push", envelopes=[tampered, good.to_json(), good.to_json()]))
        await wait_for(reactor, lambda: a.node.gossip.history.store.count == 1)
        await sleep(reactor, 0.3)
        assert [e["payload"] for e in events if e.get("event") == "message"] == [{"n": 1}], "once, the good one"
        assert any(e.name == "rejected" for e in got)
    finally:
        sub.close()
        peer.close()
        await a.stop()


async def test_catch_up_keeps_within_the_peers_budget_and_still_gets_everything(reactor, tmp_path):
    budget = ("--peer-rate", "200", "--peer-burst", "300")
    a = await start_node(reactor, tmp_path / "a", *budget)
    b_dir = tmp_path / "b"
    b = await start_node(reactor, b_dir, "--peer", a.url, *budget)
    conn = await client.connect(reactor, a.url)
    try:
        await wait_for(reactor, lambda: b.node.gossip.links)
        await b.stop()
        missed = [await publish(conn, n) for n in range(600)]
        b = await start_node(reactor, b_dir, "--peer", a.url, *budget)
        started = reactor.seconds()
        await wait_for(reactor, lambda: b.node.gossip.history.store.count == 600, timeout=30)
        took = reactor.seconds() - started
        for node in (a, b):
            assert _metric(node, "foxnode_peer_events_rate_limited_total") == 0
        # 600 envelopes at 90% of 200 a second, 270 at once: paced, not flooded.
        assert took >= (600 - 270) / 180 * 0.8, took
        assert {r.id for r in b.node.gossip.history.rows(missed)} == set(missed)
    finally:
        conn.close()
        await a.stop()
        await b.stop()


async def test_a_summary_of_impossible_minutes_gets_no_lists(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a")
    got = []
    peer = await connect_as_peer(reactor, a.url, on_event=lambda e: got.append(e))
    try:
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        now_bucket = int(time.time() // 60)
        far = [[now_bucket - 10_000 - i, 5, "ab" * 16] for i in range(5000)]
        far += [[now_bucket + 100 + i, 5, "ab" * 16] for i in range(5000)]
        peer.send_frame(codec.encode_event("sync", buckets=far))
        await sleep(reactor, 0.5)
        assert not [e for e in got if e.name == "sync_have"]
    finally:
        peer.close()
        await a.stop()
