"""What gossip really holds in memory. In one process, measured with
tracemalloc: the cache keeps frames, never decoded payloads, and each
structure stays within the bytes gossip.py states for it. From outside: a
twistd node flooded by a peer with envelopes whose payloads are as costly
to hold decoded as a payload of --max-payload bytes can be (tens of
thousands of tiny JSON containers each), while a subscriber reads every
delivery."""

import gc
import os
import time
import tracemalloc
from pathlib import Path

import attrs
import orjson
import pytest_twisted

from foxnode import client, codec
from foxnode.gossip import CACHE_ENTRY_BYTES, Envelope, GossipConfig
from foxnode.testing import connect_as_peer, sleep, spawn_node, start_node, wait_for

MAX_PAYLOAD = 64 * 1024  # the node's default --max-payload
MESSAGES = 640
#: what the node may grow by under the flood: its cache is 32 MiB of frames
GROWTH_BOUND = 150 * 1024 * 1024
#: envelopes sent before the node's size is taken as the baseline
WARM_UP = 20
#: peer gossip is paced at this many envelopes per second at most, in
#: batches, each delivered before the next goes (see PACE_BATCH)
PACE_RATE = 40.0
PACE_BATCH = 10


def rss(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def costly_payload(i: int) -> object:
    """A payload just under MAX_PAYLOAD bytes of JSON made of as many empty
    containers as fit: some 20,000 Python objects when decoded. Three
    shapes (a list of objects, an object of objects, a list of lists), so
    that no one container type is all that is checked."""
    shape = i % 3
    if shape == 0:
        items = (MAX_PAYLOAD - 40) // 3  # "{}," each
        return [{"i": i}] + [{} for _ in range(items)]
    if shape == 1:
        # '"k12345":{},' is 12 bytes; keys are short and distinct
        items = (MAX_PAYLOAD - 40) // 12
        payload = {f"k{n:05d}": {} for n in range(items)}
        payload["i"] = i
        return payload
    items = (MAX_PAYLOAD - 40) // 3  # "[]," each
    return [[i]] + [[] for _ in range(items)]


def payload_index(payload: object) -> int:
    if isinstance(payload, dict):
        return payload["i"]
    return payload[0]["i"] if isinstance(payload[0], dict) else payload[0][0]


@pytest_twisted.ensureDeferred
async def test_a_flood_of_costly_payloads_keeps_the_node_within_its_memory_bound(reactor, tmp_path):
    for i in range(3):
        assert len(orjson.dumps(costly_payload(i))) <= MAX_PAYLOAD
    node = spawn_node(tmp_path / "n")
    sub = peer = grafter = None
    try:
        # The subscriber checks each delivery as it comes and keeps only
        # the index, so that this process does not hold 800 payloads.
        delivered: dict[str, int] = {}
        wrong: list[str] = []

        def on_message(event):
            if event.name != "message":
                return
            body = event.body
            i = payload_index(body["payload"])
            if body["payload"] != costly_payload(i) or body["topic"] != "flood":
                wrong.append(body["id"])
            delivered[body["id"]] = i

        sub = await client.connect(reactor, node.url, on_event=on_message)
        assert (await sub.request("subscribe", {"topics": ["flood"]})).status == 200
        peer = await connect_as_peer(reactor, node.url)
        me = peer.fox_state["identity"]
        sent: list[str] = []
        started = time.monotonic()

        async def flood(upto: int):
            while len(sent) < upto:
                batch = []
                for _ in range(min(PACE_BATCH, upto - len(sent))):
                    env = Envelope.create(me, "flood", costly_payload(len(sent)), 600, time.time())
                    peer.send_frame(codec.encode_event("gossip", envelope=env.to_json()))
                    sent.append(env.id)
                    batch.append(env.id)
                await wait_for(reactor, lambda: all(m in delivered for m in batch), timeout=60,
                               what=lambda: f"delivery of envelopes up to {len(sent)} "
                                            f"({len(delivered)} delivered)")
                # Not faster than PACE_RATE on average, whatever the node takes.
                ahead = len(sent) / PACE_RATE - (time.monotonic() - started)
                if ahead > 0:
                    await sleep(reactor, ahead)

        await flood(WARM_UP)
        baseline = rss(node.process.pid)
        peak = baseline
        while len(sent) < MESSAGES:
            await flood(len(sent) + 50)
            peak = max(peak, rss(node.process.pid))
        await sleep(reactor, 1.0)
        final = rss(node.process.pid)
        peak = max(peak, final)
        mib = 1024 * 1024
        print(f"node RSS: baseline {baseline / mib:.0f} MiB after {WARM_UP} envelopes, "
              f"peak {peak / mib:.0f} MiB, final {final / mib:.0f} MiB after {MESSAGES}")
        assert not wrong, f"{len(wrong)} deliveries differ from what was sent"
        assert sorted(delivered) == sorted(sent), "not every envelope delivered once"
        assert peak - baseline < GROWTH_BOUND, (
            f"node grew by {(peak - baseline) / mib:.0f} MiB, over {GROWTH_BOUND / mib:.0f} MiB")

        # Grafts are still answered: the newest envelopes from the cache,
        # the oldest ones, evicted from it (32 MiB holds some 500 of
        # these), from the message store on disk, after them.
        answers: list[dict] = []
        grafter = await connect_as_peer(
            reactor, node.url,
            on_event=lambda e: answers.append(e.body["envelope"]) if e.name == "gossip" else None)
        wanted = [sent[0], sent[-300], sent[-2], sent[-1]]
        grafter.send_frame(codec.encode_event("graft", ids=wanted))
        await wait_for(reactor, lambda: len(answers) >= len(wanted), timeout=20, what="the answers to a graft")
        assert [a["id"] for a in answers] == wanted[1:] + wanted[:1], "grafts not answered, cache first"
        for envelope in answers:
            assert Envelope.from_json(envelope, GossipConfig(), time.time()).id == envelope["id"]
            assert envelope["payload"] == costly_payload(sent.index(envelope["id"]))
            assert envelope["origin"] == me.node_id
    finally:
        for conn in (sub, peer, grafter):
            if conn is not None:
                conn.close()
        node.stop()



def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest_twisted.ensureDeferred
async def test_the_cache_keeps_frames_and_no_decoded_payload(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    gossip = node.node.gossip
    peer = await connect_as_peer(reactor, node.url)
    me = peer.fox_state["identity"]
    count = 30
    # Made before the measure starts: only what the node keeps counts.
    frames = [codec.encode_event("gossip", envelope=Envelope.create(
        me, "t", costly_payload(i), 600, time.time()).to_json()) for i in range(count)]
    tracemalloc.start()
    try:
        before = traced()
        for n, frame in enumerate(frames, 1):
            # One at a time: 30 of them would overflow this side's send queue.
            peer.send_frame(frame)
            await wait_for(reactor, lambda: len(gossip.cache) == n, timeout=30,
                           what=lambda: f"the node to accept envelope {n}")
        await sleep(reactor, 0.2)
        kept = traced() - before
        # Decoded, these payloads are some 1.5 MB each: 45 MB in all.
        assert kept < gossip._cache_bytes + count * 1024 + 512 * 1024, (
            f"the node keeps {kept} bytes for {gossip._cache_bytes} bytes of cache")
        assert all(type(entry.frame) is bytes for entry in gossip.cache.values())
    finally:
        tracemalloc.stop()
        peer.close()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_seen_ids_and_cache_entries_cost_the_stated_bytes(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    gossip = node.node.gossip
    me = node.node.identity
    count = 5000
    envelopes = [Envelope.create(me, "t", i, 600, time.time()) for i in range(count)]
    tracemalloc.start()
    try:
        before = traced()
        for envelope in envelopes:
            gossip.accept(envelope, None)
        del envelopes, envelope
        kept = traced() - before
        assert len(gossip.seen) == len(gossip.cache) == count
        print(f"per message: {kept / count:.0f} bytes kept, {gossip._cache_bytes / count:.0f} "
              f"charged by the cache")
        # The cache's charge covers its entries (CACHE_ENTRY_BYTES each
        # beside the frame); gossip.py states some 230 bytes for a seen id.
        assert kept <= gossip._cache_bytes + count * 256
    finally:
        tracemalloc.stop()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_announced_ids_cost_the_stated_bytes_and_must_be_ids(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    gossip = node.node.gossip
    peer = await connect_as_peer(reactor, node.url)
    capacity = gossip.config.cache_capacity
    try:
        # What is not an id as envelopes have them is not awaited: each key
        # held is 64 ASCII characters, whatever an announcer sends.
        odd = ["\u00e9" * 64, "\U0001f98a" * 64, "A" * 64, "0" * 63, 5, None, ["0" * 64]]
        tracemalloc.start()
        before = traced()
        for start in range(0, capacity + 1000, 1000):
            ids = [os.urandom(32).hex() for _ in range(1000)]
            peer.send_frame(codec.encode_event("ihave", ids=odd + ids))
        await wait_for(reactor, lambda: len(gossip.missing) == capacity, timeout=20,
                       what="the node to await announced ids")
        kept = traced() - before
        tracemalloc.stop()
        assert all(len(m) == 64 and m.isascii() for m in gossip.missing)
        print(f"{kept / capacity:.0f} bytes per awaited id")
        assert kept / capacity <= 1024
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        peer.close()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_announcers_of_an_awaited_id_are_live_peers_only(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "n")
    gossip = node.node.gossip
    # No graft while peers come and go: each new one only adds itself.
    gossip.config = attrs.evolve(gossip.config, graft_timeout=60.0)
    message_id = os.urandom(32).hex()
    peers = node.node.peers.peers
    try:
        for _ in range(6):
            peer = await connect_as_peer(reactor, node.url)
            peer.send_frame(codec.encode_event("ihave", ids=[message_id]))
            await wait_for(reactor, lambda: peer.fox_state["identity"].node_id
                           in [a.conn.node_id for a in gossip.missing.get(message_id, (None, []))[1]],
                           what="the node to note the announcer")
            announcers = gossip.missing[message_id][1]
            assert {a.conn for a in announcers} <= set(peers.values()), (
                f"{len(announcers)} announcers listed, {len(peers)} of them connected")
            peer.close()
            await wait_for(reactor, lambda: not peers, what="the peer to leave")
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_slow_subscribers_queue_holds_what_it_counts(reactor, tmp_path):
    queue = 200_000
    node = await start_node(reactor, tmp_path / "n", "--send-queue", str(queue))
    gossip = node.node.gossip
    me = node.node.identity
    slow = await client.connect(reactor, node.url)
    try:
        assert (await slow.request("subscribe", {"topics": ["t"]})).status == 200
        slow.transport.pauseProducing()  # it stops reading
        port = slow.transport.getHost().port
        server_side = [c for c in node.node.connections if c.remote_port == port][0]
        # Small messages, more than loopback's socket buffers take, and
        # some hundreds of frames in the queue.
        count = 8000
        # No cache, so that what is measured is the queue's.
        gossip.config = attrs.evolve(gossip.config, cache_capacity=0)
        envelopes = [Envelope.create(me, "t", [i, "x" * 500], 600, time.time()) for i in range(count)]
        tracemalloc.start()
        before = traced()
        for i, envelope in enumerate(envelopes):
            gossip.accept(envelope, None)
            if i % 100 == 0:
                await sleep(reactor, 0)  # the transport writes what it can
        del envelope
        envelopes.clear()
        gossip.seen.clear()
        assert not gossip.cache
        kept = traced() - before
        tracemalloc.stop()
        held = server_side._backlog_bytes
        assert node.node.metrics.send_dropped.labels("subscriber")._value.get() > 0, "queue never full"
        print(f"the queue counts {held} bytes in {len(server_side._backlog)} frames; "
              f"the node keeps {kept} bytes")
        # What the socket took is gone from the process; what is queued
        # costs its count and a few bytes per frame, not 4 KiB each (nor
        # does the transport's own buffer, some 64 KiB, count for much).
        assert held <= queue
        assert kept < 1.25 * queue + 256 * 1024
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        slow.transport.resumeProducing()
        slow.close()
        await node.stop()
