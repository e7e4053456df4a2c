"""Private, signed and paid-for messages (PROTOCOL.md) between twistd
processes on loopback: sealed with a password's key on one node and opened
with the same password's key on another, sealed to a public key, signed,
with proof of work; each subscription receives only what its key opens,
from whom it asked, with the work it asked for; a node with ``--min-pow``
refuses what is below it."""

from __future__ import annotations

import time

import pytest_twisted

from foxnode import client
from foxnode.testing import sleep, spawn_node, stop_all, wait_for


async def call(reactor, node, op, args=None):
    reply = await client.call(reactor, node.url, op, args)
    return reply


async def made(reactor, node, args):
    reply = await call(reactor, node, "newkey", args)
    assert reply.status == 200, reply
    return reply.response


@pytest_twisted.ensureDeferred
async def test_sealed_signed_and_paid_for_messages_reach_only_who_may_read_them(reactor, tmp_path):
    a = spawn_node(tmp_path / "a", "--exchange-interval", "2")
    b = spawn_node(tmp_path / "b", "--exchange-interval", "2", "--peer", a.url)
    c = spawn_node(tmp_path / "c", "--exchange-interval", "2", "--peer", a.url, "--min-pow", "1000000")
    nodes = [a, b, c]
    conns = []
    try:
        deadline = time.monotonic() + 30
        while True:
            connected = [(await call(reactor, n, "info")).response["connected"] for n in nodes]
            if all(connected) and len(connected[0]) == 2:
                break
            assert time.monotonic() < deadline, "the nodes did not connect"
            await sleep(reactor, 0.3)
        assert (await call(reactor, c, "info")).response["min_pow"] == 1_000_000

        ka = (await made(reactor, a, {"type": "sym", "password": "lab topic"}))["id"]
        kb = (await made(reactor, b, {"type": "sym", "password": "lab topic"}))["id"]
        wrong = (await made(reactor, b, {"type": "sym"}))["id"]
        signer = await made(reactor, a, {"type": "asym"})
        reader = await made(reactor, b, {"type": "asym"})
        stranger = await made(reactor, b, {"type": "asym"})

        inboxes: dict[str, list] = {}

        async def subscribe(node, name, **filters):
            inbox = inboxes[name] = []
            conn = await client.connect(reactor, node.url, on_event=lambda e: inbox.append(e.body))
            conns.append(conn)
            reply = await conn.request("subscribe", {"topics": ["lab"], **filters})
            assert reply.status == 200, reply
            return reply.response["subscription"]

        subs = {
            "sym": await subscribe(b, "sym", key=kb),
            "sym-too": await subscribe(b, "sym-too", key=kb),
            "plain": await subscribe(b, "plain"),
            "wrong": await subscribe(b, "wrong", key=wrong),
            "asym": await subscribe(b, "asym", key=reader["id"]),
            "from-signer": await subscribe(b, "from-signer", key=kb, **{"from": [signer["public_key"]]}),
            "from-other": await subscribe(b, "from-other", key=kb, **{"from": [stranger["public_key"]]}),
            "much-work": await subscribe(b, "much-work", key=kb, min_pow=1e12),
            "c-plain": await subscribe(c, "c-plain"),
        }

        sealed = await call(reactor, a, "publish", {"topic": "lab", "payload": {"secret": 1}, "ttl": 30,
                                                    "key": ka, "sign": signer["id"], "pow": 1.0})
        assert sealed.status == 202 and sealed.response["pow"] >= 1.0, sealed
        to = await call(reactor, a, "publish", {"topic": "lab", "payload": {"for": "reader"}, "ttl": 30,
                                                "to": reader["public_key"]})
        assert to.status == 202, to
        plain = await call(reactor, a, "publish", {"topic": "lab", "payload": {"plain": 3}, "ttl": 30})
        assert plain.status == 202, plain

        await wait_for(reactor, lambda: inboxes["sym"] and inboxes["asym"] and inboxes["plain"]
                       and inboxes["from-signer"], timeout=15, what="the messages to reach node B")
        await sleep(reactor, 1.0)  # room for anything that should not come
        [m] = inboxes["sym"]
        assert m["payload"] == {"secret": 1} and m["id"] == sealed.response["id"]
        assert m["from"] == signer["public_key"] and m["encrypted"] == "sym"
        assert m["subscription"] == subs["sym"] and m["pow"] == sealed.response["pow"]
        assert m["origin"] == (await call(reactor, a, "info")).response["node_id"]
        [m] = inboxes["asym"]
        assert m["payload"] == {"for": "reader"} and m["from"] is None and m["encrypted"] == "asym"
        [m] = inboxes["plain"]
        assert m["payload"] == {"plain": 3} and m["encrypted"] is None and m["from"] is None
        assert [m["id"] for m in inboxes["from-signer"]] == [sealed.response["id"]]
        for nothing in ("wrong", "from-other", "much-work", "c-plain"):
            assert inboxes[nothing] == [], nothing

        # A node's own minimum holds for its own publishers too.
        low = await call(reactor, c, "publish", {"topic": "lab", "payload": 1})
        assert low.status == 400 and '"pow"' in low.error, low

        # Unsubscribing by id ends that subscription only.
        first = conns[0]
        reply = await first.request("unsubscribe", {"subscription": subs["sym"]})
        assert reply.status == 200, reply
        again = await call(reactor, a, "publish", {"topic": "lab", "payload": 4, "key": ka, "ttl": 30})
        assert again.status == 202
        await wait_for(reactor, lambda: len(inboxes["sym-too"]) == 2, timeout=15,
                       what="the second message to the other subscription of that key")
        await sleep(reactor, 0.5)
        assert len(inboxes["sym"]) == 1
        assert inboxes["sym-too"][1]["payload"] == 4 and inboxes["sym-too"][1]["from"] is None
    finally:
        for conn in conns:
            conn.close()
        stop_all(nodes)
