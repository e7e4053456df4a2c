"""Gossip across eight twistd processes in a chain, each bootstrapped only
from its predecessor: what a user sees, with real processes on loopback."""

import time

import pytest_twisted

from foxnode import client
from foxnode.testing import sleep, spawn_node, stop_all, wait_for


@pytest_twisted.ensureDeferred
async def test_eight_twistd_nodes_in_a_chain_deliver_each_message_once(reactor, tmp_path):
    nodes = []
    subscribers = []
    try:
        for i in range(8):
            extra = ("--peer", nodes[-1].url) if nodes else ()
            nodes.append(spawn_node(tmp_path / f"n{i}", "--exchange-interval", "2", *extra))
        inboxes = []
        for n in nodes:
            inbox = []
            conn = await client.connect(reactor, n.url,
                                        on_event=lambda e, box=inbox: box.append(e.body))
            reply = await conn.request("subscribe", {"topics": ["chain"]})
            assert reply.status == 200
            subscribers.append(conn)
            inboxes.append(inbox)

        async def all_connected():
            for n in nodes:
                info = (await client.call(reactor, n.url, "info")).response
                if not info["connected"]:
                    return False
            return True

        deadline = time.monotonic() + 30
        while not await all_connected():
            assert time.monotonic() < deadline, "the chain did not connect"
            await sleep(reactor, 0.3)

        sent = []
        for i, src in enumerate([0, 7, 3, 5, 1, 6]):
            started = time.monotonic()
            reply = await client.call(reactor, nodes[src].url, "publish",
                                      {"topic": "chain", "payload": {"n": i, "from": src}})
            assert reply.status == 202
            sent.append(reply.response["id"])
            # Noise on another topic, which no subscriber here listens to.
            noise = await client.call(reactor, nodes[(src + 1) % 8].url, "publish",
                                      {"topic": "noise", "payload": i})
            assert noise.status == 202
            await wait_for(reactor, lambda: all(len(b) >= len(sent) for b in inboxes), timeout=10,
                           what=f"message {i} to reach every node")
            print(f"message {i} from node {src}: every node in {time.monotonic() - started:.3f}s")
        await sleep(reactor, 1.0)  # room for any late duplicate
        for k, inbox in enumerate(inboxes):
            assert sorted(m["id"] for m in inbox) == sorted(sent), f"node {k} not exactly once"
            assert {m["topic"] for m in inbox} == {"chain"}
            assert all(m["event"] == "message" and len(m["origin"]) == 64 for m in inbox)
    finally:
        for c in subscribers:
            c.close()
        stop_all(nodes)
