"""History and catch-up under attack: a peer that abuses the catch-up
exchange, a client that abuses history and ``since``."""

from __future__ import annotations

import time

from foxnode import client, codec
from foxnode.testing import connect_as_peer, sleep, start_node, wait_for


async def publish(conn, n, topic="t", **extra):
    reply = await conn.request("publish", {"topic": topic, "payload": {"n": n}, **extra})
    assert reply.status == 202, reply
    return reply.response["id"]


def _pushed(got):
    return [env["id"] for e in got if e.name == "sync_push" for env in e.body["envelopes"]]


async def test_a_peer_cannot_have_its_lists_and_wants_answered_again_and_again(reactor, tmp_path):
    # An amplifier: a few bytes of sync_have or sync_want, and the node
    # would push its whole bucket back, as often as the peer liked.
    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    got = []
    peer = None
    try:
        ids = [await publish(conn, n) for n in range(20)]
        peer = await connect_as_peer(reactor, a.url, on_event=lambda e: got.append(e))
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        theirs = next(e for e in got if e.name == "sync").body["buckets"]
        buckets = [b for b, _, _ in theirs]
        # An honest answer: the peer holds nothing, so it lists (nothing).
        peer.send_frame(codec.encode_event("sync", buckets=[]))
        for b in buckets:
            peer.send_frame(codec.encode_event("sync_have", bucket=b, ids=[], last=True))
        await wait_for(reactor, lambda: len(_pushed(got)) >= 20)
        await sleep(reactor, 0.3)
        assert sorted(_pushed(got)) == sorted(ids)
        # Then the same lists again, a bucket never compared, and wants
        # for what the node never listed: none of it is answered.
        for _ in range(5):
            for b in buckets:
                peer.send_frame(codec.encode_event("sync_have", bucket=b, ids=[], last=True))
            peer.send_frame(codec.encode_event("sync_have", bucket=buckets[0] - 1, ids=[], last=True))
            peer.send_frame(codec.encode_event("sync_want", ids=ids))
        await sleep(reactor, 0.5)
        assert len(_pushed(got)) == 20, len(_pushed(got))
    finally:
        conn.close()
        if peer is not None:
            peer.close()
        await a.stop()


class _Reader:
    """A subscriber's connection that reads everything at once."""

    def __init__(self):
        self.fox_state = {}
        self.frames = []

    def send_frame(self, frame, droppable=False):
        self.frames.append(frame)
        return True

    def has_room(self):
        return True

    def can_send(self):
        return True

    def ids(self):
        import orjson
        return [orjson.loads(f)["id"] for f in self.frames]


async def test_a_since_subscription_made_while_a_publish_is_on_its_way_gets_it_once(reactor, tmp_path):
    # The publish is kept (and so replayed) before it is delivered live:
    # a subscription made between the two must not get it both ways.
    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        gossip = a.node.gossip
        before = await publish(conn, 0)
        reader = _Reader()
        d = gossip.op_publish(reader, {"topic": "t", "payload": {"n": 1}})
        gossip.add_subscription(reader, ["t"], None, None, 0.0, since=0)
        reply = await d
        assert reply.status == 202
        after = await publish(conn, 2)
        await wait_for(reactor, lambda: after in reader.ids())
        await sleep(reactor, 0.2)
        assert reader.ids() == [before, reply.response["id"], after]
    finally:
        conn.close()
        await a.stop()


async def test_a_store_that_cannot_be_read_is_a_503_for_history_and_since_and_the_node_goes_on(
        reactor, tmp_path, monkeypatch):
    import sqlite3

    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    events = []
    sub = await client.connect(reactor, a.url, on_event=lambda e: events.append(e.body))
    try:
        await publish(conn, 0)
        store = a.node.gossip.history.store

        def fails(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "page", fails)
        reply = await conn.request("history", {"topics": ["t"]})
        assert reply.status == 503, reply
        assert "message store" in reply.error
        # A since replay that cannot read goes live rather than hold forever.
        assert (await sub.request("subscribe", {"topics": ["t"], "since": 0})).status == 200
        await sleep(reactor, 0.2)
        monkeypatch.undo()
        live = await publish(conn, 1)
        await wait_for(reactor, lambda: any(e.get("id") == live for e in events))
        assert (await conn.request("history", {"topics": ["t"]})).status == 200
    finally:
        conn.close()
        sub.close()
        await a.stop()


def _fill(node, n, topic="t"):
    """``n`` envelopes straight into a node's store, as gossip keeps them."""
    from foxnode import identity
    from foxnode.gossip import Envelope

    gossip = node.node.gossip
    signer = identity.Identity.generate()
    now = time.time()
    ids = []
    for i in range(n):
        envelope = Envelope.create(signer, topic, {"n": i}, 3600, now - n + i)
        assert gossip.history.record(envelope, gossip._encode(envelope)[1])
        ids.append(envelope.id)
    gossip.history.commit()
    return ids


async def test_a_filter_with_since_on_a_long_history_gets_it_oldest_first_at_the_pace_it_polls(reactor, tmp_path):
    # Not the whole store read in one turn, all but the last 1000 dropped.
    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        ids = _fill(a, 2500)
        reply = await conn.request("filter", {"topics": ["t"], "since": 0})
        assert reply.status == 200, reply
        filter_id = reply.response["filter"]
        got, dropped = [], 0
        for _ in range(200):
            await sleep(reactor, 0.1)
            polled = (await conn.request("poll", {"filter": filter_id})).response
            got += [m["id"] for m in polled["messages"]]
            dropped += polled["dropped"]
            if len(got) >= len(ids):
                break
        assert dropped == 0
        assert got == ids
    finally:
        conn.close()
        await a.stop()


def _steps(store, call):
    """SQLite's virtual-machine steps (in thousands) that ``call`` costs."""
    counted = [0]

    def tick():
        counted[0] += 1
        return 0

    store._db.set_progress_handler(tick, 1000)
    try:
        call()
    finally:
        store._db.set_progress_handler(None, 0)
    return counted[0]


def test_a_history_page_costs_the_page_not_the_store(tmp_path):
    # Topics with nothing in them beside a busy one, or a cursor deep in a
    # long topic: a client's request must not scan the whole store.
    import math

    from foxnode.msgstore import STORE_FILE, MessageStore

    store = MessageStore.open(str(tmp_path / STORE_FILE), 1 << 40)
    n = 20_000
    for i in range(n):
        store.add(f"{i:064x}", "busy", 1000.0 + i, 1e12, b"{}")
    store.add(f"{n:064x}", "quiet", 1000.0 + n / 2, 1e12, b"{}")
    store.commit()
    first = _steps(store, lambda: store.page(["busy"], 0, math.inf, 0, limit=100))
    deep = _steps(store, lambda: store.page(["busy"], 0, math.inf, 0, after=(1000.0 + n - 200, 0), limit=100))
    empty = _steps(store, lambda: store.page(["nothing", "nothing else"], 0, math.inf, 0, limit=100))
    mixed = store.page(["quiet", "nothing"], 0, math.inf, 0, limit=100)
    assert [r.topic for r in mixed] == ["quiet"]
    both = store.page(["busy", "quiet"], 1000.0 + n / 2 - 2, math.inf, 0, limit=4)
    assert [(r.topic, r.created) for r in both] == [("busy", 1000.0 + n / 2 - 2), ("busy", 1000.0 + n / 2 - 1),
                                                   ("busy", 1000.0 + n / 2), ("quiet", 1000.0 + n / 2)]
    assert deep <= 3 * first + 5, (first, deep)
    assert empty <= 5, empty
    store.close()


async def test_a_long_listing_is_paced_and_does_not_overflow_the_send_queue(reactor, tmp_path):
    # Two sides with many envelopes each in the same minutes (a healed
    # partition): the one that lists sends more ids than a send queue
    # holds, and must not be cut off for it, nor cut its peer off.
    a = await start_node(reactor, tmp_path / "a")
    got = []
    peer = None
    try:
        history = a.node.gossip.history
        now = time.time()
        n = 30_000
        for i in range(n):
            message_id = f"{i:064x}"
            created = now - 100 + i * 90 / n
            history.store.add(message_id, "t", created, created + 3000, b"{}")
            history._count(message_id, created, +1)
        history.commit()
        peer = await connect_as_peer(reactor, a.url, on_event=lambda e: got.append(e))
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        theirs = next(e for e in got if e.name == "sync").body["buckets"]
        # The peer holds one more in each of those minutes: a lists.
        peer.send_frame(codec.encode_event("sync", buckets=[[b, c + 1, "00" * 16] for b, c, _ in theirs]))

        def listed():
            return sum(len(e.body["ids"]) for e in got if e.name == "sync_have")

        await wait_for(reactor, lambda: listed() >= n or not peer.fox_open, timeout=20)
        assert listed() == n
        assert peer.fox_open and peer.state == peer.STATE_OPEN
    finally:
        if peer is not None:
            peer.close()
        await a.stop()


class _Stalled(_Reader):
    """A subscriber's connection that reads nothing for now."""

    def has_room(self):
        return False


async def test_held_live_events_are_bounded_per_connection_not_per_subscription(reactor, tmp_path):
    # 64 since subscriptions on one connection that does not read would
    # each hold max_held_bytes of live events: 64 MiB for one client.
    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        gossip = a.node.gossip
        await publish(conn, 0)
        reader = _Stalled()
        subs = [gossip.add_subscription(reader, ["t"], None, None, 0.0, since=0) for _ in range(8)]
        await sleep(reactor, 0.1)
        for n in range(120):
            await publish(conn, "x" * 20_000)
        await sleep(reactor, 0.2)
        held = sum(s.held_bytes for s in subs)
        assert all(s.held for s in subs)
        assert held <= gossip.config.max_held_bytes + 8 * 21_000, held
    finally:
        conn.close()
        await a.stop()


async def test_a_history_that_leaves_everything_out_reads_a_bounded_number_of_bytes(reactor, tmp_path,
                                                                                    monkeypatch):
    # min_pow that nothing reaches, on a topic of large messages: each
    # request must not decode thousands of 60 KB envelopes.
    from foxnode import identity
    from foxnode.gossip import Envelope
    from foxnode.history import History

    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        gossip = a.node.gossip
        signer = identity.Identity.generate()
        now = time.time()
        for i in range(300):
            envelope = Envelope.create(signer, "t", "x" * 60_000, 3600, now - 300 + i)
            gossip.history.record(envelope, gossip._encode(envelope)[1])
        gossip.history.commit()
        read = []
        original = History._event

        def counting(self, row, *args):
            read.append(len(row.envelope))
            return original(self, row, *args)

        monkeypatch.setattr(History, "_event", counting)
        reply = await conn.request("history", {"topics": ["t"], "min_pow": 1e9})
        assert reply.status == 200 and reply.response["messages"] == []
        assert sum(read) <= 8 * gossip.history.config.page_bytes + 70_000, sum(read)
        # The cursor says there is more to look through; followed, it ends.
        cursor, pages = reply.response["cursor"], 1
        assert cursor is not None
        while cursor is not None and pages < 100:
            reply = await conn.request("history", {"topics": ["t"], "min_pow": 1e9, "cursor": cursor})
            assert reply.status == 200 and reply.response["messages"] == []
            cursor, pages = reply.response["cursor"], pages + 1
        assert cursor is None and len(read) == 300
    finally:
        conn.close()
        await a.stop()


async def test_a_forged_cursor_is_a_400_or_a_page_never_a_500(reactor, tmp_path):
    import base64

    import orjson

    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        await publish(conn, 0)
        for position in ([1.0, 2**64 - 1], [1.0, 2**63], [1e308, 1], [-1e308, 0]):
            cursor = "h1:" + base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")
            reply = await conn.request("history", {"topics": ["t"], "cursor": cursor})
            assert reply.status in (200, 400), (position, reply)
            if reply.status == 400:
                assert '"cursor"' in reply.error
    finally:
        conn.close()
        await a.stop()


async def test_a_disk_full_while_evicting_is_a_503_for_publish_not_a_500(reactor, tmp_path, monkeypatch):
    import sqlite3

    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    try:
        await publish(conn, 0)
        store = a.node.gossip.history.store

        def full():
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store, "evict", full)
        monkeypatch.setattr(store, "max_bytes", 1)
        reply = await conn.request("publish", {"topic": "t", "payload": {"n": 1}})
        assert reply.status == 503, reply
        assert "message store" in reply.error
        assert (await conn.request("info", {})).status == 200
    finally:
        conn.close()
        await a.stop()


async def test_wants_from_a_peer_that_does_not_read_queue_no_more_than_the_push_queue(reactor, tmp_path):
    import attrs

    a = await start_node(reactor, tmp_path / "a")
    got = []
    peer = None
    try:
        catchup = a.node.gossip.catchup
        catchup.config = attrs.evolve(catchup.config, max_push_queue=10)
        peer = await connect_as_peer(reactor, a.url, on_event=lambda e: got.append(e))
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        (conn, sync), = catchup.syncs.items()
        conn.has_room = lambda: False  # the peer reads nothing more
        for _ in range(200):
            peer.send_frame(codec.encode_event("sync_want", ids=[]))
        await sleep(reactor, 0.5)
        assert len(sync.queue) <= 11, len(sync.queue)
    finally:
        if peer is not None:
            peer.close()
        await a.stop()


async def test_a_filter_with_since_replays_on_a_node_with_payloads_larger_than_a_filter_holds(reactor, tmp_path):
    a = await start_node(reactor, tmp_path / "a", "--max-payload", str(1 << 20))
    conn = await client.connect(reactor, a.url)
    try:
        ids = [await publish(conn, n) for n in range(3)]
        filter_id = (await conn.request("filter", {"topics": ["t"], "since": 0})).response["filter"]
        got = []
        for _ in range(20):
            await sleep(reactor, 0.1)
            got += [m["id"] for m in (await conn.request("poll", {"filter": filter_id})).response["messages"]]
            if len(got) >= 3:
                break
        assert got == ids
    finally:
        conn.close()
        await a.stop()


async def test_a_list_is_answered_once_per_round_that_called_for_it_even_when_it_comes_late(reactor, tmp_path):
    # The peer's second summary can arrive before its first round's list
    # (lists are paced): each round's list is answered, and no more.
    a = await start_node(reactor, tmp_path / "a")
    conn = await client.connect(reactor, a.url)
    got = []
    peer = None
    try:
        ids = [await publish(conn, n) for n in range(5)]
        peer = await connect_as_peer(reactor, a.url, on_event=lambda e: got.append(e))
        await wait_for(reactor, lambda: any(e.name == "sync" for e in got))
        buckets = [b for b, _, _ in next(e for e in got if e.name == "sync").body["buckets"]]
        peer.send_frame(codec.encode_event("sync", buckets=[]))
        await wait_for(reactor, lambda: a.node.gossip.catchup.syncs and
                       next(iter(a.node.gossip.catchup.syncs.values())).answered)
        peer.send_frame(codec.encode_event("sync", buckets=[]))  # another round
        await wait_for(reactor, lambda: sum(e.name == "sync" for e in got) >= 2)
        for _ in range(3):
            for b in buckets:
                peer.send_frame(codec.encode_event("sync_have", bucket=b, ids=[], last=True))
        await wait_for(reactor, lambda: len(_pushed(got)) >= 10)
        await sleep(reactor, 0.3)
        assert sorted(_pushed(got)) == sorted(ids * 2)
    finally:
        conn.close()
        if peer is not None:
            peer.close()
        await a.stop()
