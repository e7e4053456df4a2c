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
