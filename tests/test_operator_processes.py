"""The operator's controls (PROTOCOL.md "Peer management") between twistd
processes on loopback: unregister, pinned addresses, static and trusted
peers, as an operator would use them with ``foxnode call``.

The same behaviours are tested socket-free, step by step, in
test_dialing.py; here only what separate processes show: the file a
killed node comes back with, what the other node sees, redialing across a
restart."""

from __future__ import annotations

import time

import pytest_twisted

from foxnode import address, client
from foxnode.handshake import TOO_MANY_PEERS, WRONG_NODE
from foxnode.testing import sleep, spawn_node, stop_all

#: exchanges every second, so that what a peer knows reaches the node soon;
#: a failing address is retried within a second or two.
FAST = ("--exchange-interval", "1", "--max-backoff", "1")


async def call(reactor, node, op, args=None):
    return await client.call(reactor, node.url, op, args)


async def info(reactor, node, detail=False):
    reply = await call(reactor, node, "info", {"detail": detail})
    assert reply.status == 200, reply
    return reply.response


async def connected_ids(reactor, node):
    """Node ids of the node's live peers, either direction."""
    return {p["node_id"] for p in (await info(reactor, node))["connected"]}


async def wait_until(reactor, check, timeout, what):
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(reactor, 0.25)


async def stays(reactor, check, seconds, what):
    """``check`` holds all through ``seconds`` (several dial and exchange
    rounds of the nodes under test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await check(), what
        await sleep(reactor, 0.25)


@pytest_twisted.ensureDeferred
async def test_unregister_forgets_for_good_across_a_kill(reactor, tmp_path):
    b = spawn_node(tmp_path / "b", *FAST)
    c = spawn_node(tmp_path / "c", *FAST)
    nodes = [b, c]
    try:
        # B knows C, and would hand C's address to anyone who asks.
        assert (await call(reactor, b, "register", {"addr": c.url})).status == 202
        a = spawn_node(tmp_path / "a", *FAST, "--peer", b.url)
        nodes.append(a)
        ids = {n.url: (await info(reactor, n))["node_id"] for n in nodes}

        async def a_with_c():
            return ids[c.url] in await connected_ids(reactor, a)

        await wait_until(reactor, a_with_c, 30, "A to learn C from B and connect")

        # Bad input first: nothing changes, the error names what is wrong.
        for bad in ("garbage", ["ws://127.3.0.1:9/ws", 42], "ws://127.3.0.1:9/ws#abc"):
            reply = await call(reactor, a, "unregister", {"addr": bad})
            assert reply.status == 400 and '"addr"' in reply.error, reply
        assert c.url in (await call(reactor, a, "peers")).response["peers"]

        unknown = "ws://127.3.0.1:9/ws"
        reply = await call(reactor, a, "unregister", {"addr": [c.url, unknown]})
        assert (reply.status, reply.response) == (200, {"removed": [c.url], "unknown": [unknown]})

        async def a_without_c():
            # Unregister forgets an address, it does not ban a node (as geth's
            # admin.removePeer): C, which knows A, may dial in. A itself
            # never dials C again, nor stores its address.
            dialed = {p["node_id"] for p in (await info(reactor, a))["connected"] if p["direction"] == "out"}
            return ids[c.url] not in dialed and c.url not in (await call(reactor, a, "peers")).response["peers"]

        # Closed at once; B offers C again at every exchange, and A does not
        # take it.
        await wait_until(reactor, a_without_c, 10, "the connection A-C to close")
        await stays(reactor, a_without_c, 4, "A took C back")

        # A 200 meant on disk: killed at once, A comes back without C, and
        # still does not take it from B.
        a.kill()
        nodes[-1] = a = spawn_node(a.directory, *FAST, port=a.port)
        assert c.url not in (await call(reactor, a, "peers")).response["peers"]
        await wait_until(reactor, lambda: _has(reactor, a, ids[b.url]), 30, "A to reconnect to B")
        await stays(reactor, a_without_c, 4, "A took C back after a restart")

        # Registered again by the operator: dialed again.
        assert (await call(reactor, a, "register", {"addr": c.url})).status == 202
        await wait_until(reactor, a_with_c, 30, "A to dial C once registered again")
    finally:
        stop_all(nodes)


async def _has(reactor, node, node_id):
    return node_id in await connected_ids(reactor, node)


@pytest_twisted.ensureDeferred
async def test_a_pinned_address_reaches_only_the_node_it_names(reactor, tmp_path):
    a = spawn_node(tmp_path / "a", *FAST)
    b = spawn_node(tmp_path / "b", *FAST)
    try:
        b_info, a_id = await info(reactor, b), (await info(reactor, a))["node_id"]
        # info's "address" is B's own, pinned: pasted into A, it reaches B.
        pinned = address.parse(b_info["address"])
        assert pinned.node_id == b_info["node_id"] and pinned.dial_url == b.url
        wrong = address.pinned(b.url, a_id)  # B's host and port, another node's id

        # A pin that is not a node id: rejected, with the reason, as register
        # rejects any bad address (PROTOCOL.md), and nothing is stored.
        reply = await call(reactor, a, "register", {"addr": b.url + "#" + "ab" * 31})
        assert reply.status == 202 and reply.response["accepted"] == [], reply
        assert "node id" in reply.response["rejected"][0]["reason"], reply
        assert (await call(reactor, a, "peers")).response["peers"] == []

        assert (await call(reactor, a, "register", {"addr": wrong})).status == 202

        async def refused():
            states = {p["addr"]: p for p in (await info(reactor, a, detail=True))["peers"]}
            return wrong in states and states[wrong]["last_error"] == WRONG_NODE

        await wait_until(reactor, refused, 20, "A's dial of the wrong pin to fail")
        await stays(reactor, lambda: _none_connected(reactor, a, b), 2, "connected behind a wrong pin")

        assert (await call(reactor, a, "register", {"addr": b_info["address"]})).status == 202
        await wait_until(reactor, lambda: _has(reactor, a, b_info["node_id"]), 20, "A to reach B by its pin")
    finally:
        stop_all([a, b])


async def _none_connected(reactor, *nodes):
    for n in nodes:
        if await connected_ids(reactor, n):
            return False
    return True


@pytest_twisted.ensureDeferred
async def test_a_static_peer_stays_connected_outside_max_outbound_and_across_its_restart(reactor, tmp_path):
    b = spawn_node(tmp_path / "b", *FAST)
    a = spawn_node(tmp_path / "a", *FAST, "--max-outbound", "0", "--static-peer", b.url)
    nodes = [a, b]
    try:
        b_id = (await info(reactor, b))["node_id"]

        async def static_link():
            return [(p["node_id"], p["kind"]) for p in (await info(reactor, a))["connected"]] == [(b_id, "static")]

        await wait_until(reactor, static_link, 20, "A to connect to its static peer with no outbound slot")
        detail = {p["addr"]: p for p in (await info(reactor, a, detail=True))["peers"]}
        assert detail[b.url]["kind"] == "static"

        # Killed and back on its port: redialed, with no operator.
        b.kill()
        await wait_until(reactor, lambda: _none_connected(reactor, a), 20, "A to notice B is gone")
        await sleep(reactor, 3)  # a few failed dials, each backing off
        nodes[1] = b = spawn_node(b.directory, *FAST, port=b.port)
        await wait_until(reactor, static_link, 30, "A to redial its static peer")
    finally:
        stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_a_trusted_peer_is_admitted_by_a_full_node(reactor, tmp_path):
    friend = spawn_node(tmp_path / "friend", *FAST)
    stranger = spawn_node(tmp_path / "stranger", *FAST)
    nodes = [friend, stranger]
    try:
        friend_id = (await info(reactor, friend))["node_id"]
        full = spawn_node(tmp_path / "full", *FAST, "--max-inbound", "0", "--trusted-peer", friend_id)
        nodes.append(full)
        for n in (stranger, friend):
            assert (await call(reactor, n, "register", {"addr": full.url})).status == 202

        async def admitted():
            return [(p["node_id"], p["kind"]) for p in (await info(reactor, full))["connected"]] == [
                (friend_id, "trusted")]

        await wait_until(reactor, admitted, 20, "the full node to admit its trusted peer")

        async def turned_away():
            states = {p["addr"]: p for p in (await info(reactor, stranger, detail=True))["peers"]}
            return states.get(full.url, {}).get("last_error") == TOO_MANY_PEERS

        await wait_until(reactor, turned_away, 20, "the stranger to be turned away")
        assert await connected_ids(reactor, stranger) == set()
    finally:
        stop_all(nodes)
