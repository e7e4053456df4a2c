"""What the node sends back: only values JSON can carry (issue 11, item
2), only frames within --max-message-size (item 3), and replies in order
however a request was cut by TCP. Over real sockets on loopback.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from foxnode import client, codec, identity
from foxnode.gossip import Envelope
from foxnode.store import REGISTER
from foxnode.testing import connect_as_peer, sleep, start_node, wait_for

from test_attacks import BINARY, TEXT, Raw, frame, upgraded

#: Request bodies JSON allows and Python's json reads, holding a value the
#: node cannot send back, and the id the 400 must echo (None: no id).
UNSENDABLE = {
    "NaN in args": (b'{"op": "time", "id": "a", "args": {"x": NaN}}', "a"),
    "Infinity in payload": (b'{"op": "publish", "id": 1, "args": {"topic": "t", "payload": Infinity}}', 1),
    "-Infinity": (b'{"op": "time", "id": 2, "args": [-Infinity]}', 2),
    "1e999": (b'{"op": "register", "id": 3, "args": {"addr": 1e999}}', 3),
    "NaN id": (b'{"op": "time", "id": NaN}', None),
    "1e999 id": (b'{"op": "time", "id": -1e999}', None),
    "surrogate id": (b'{"op": "time", "id": "\\ud800"}', None),
    "surrogate op": (b'{"op": "\\ud800", "id": 4}', 4),
    "surrogate address": (b'{"op": "register", "id": 5, "args": {"addr": "ws://127.3.0.1:9/\\udc00"}}', 5),
    "surrogate topic": (b'{"op": "subscribe", "id": 6, "args": {"topics": ["\\ud83d"]}}', 6),
    "surrogate payload": (b'{"op": "publish", "id": 7, "args": {"topic": "t", "payload": "\\udfff"}}', 7),
    "surrogate key": (b'{"op": "publish", "id": 8, "args": {"topic": "t", "payload": {"\\ud800": 1}}}', 8),
}


def _one_reply_then_time(port: int, body: bytes, opcode: int, split: bool) -> list[Any]:
    with upgraded(port) as raw:
        data = frame(opcode, body) + frame(TEXT, b'{"op": "time", "id": "after"}')
        if split:
            # The value cut across TCP segments: the node sees a part of
            # the frame first, which its own reader leaves to Autobahn's.
            assert len(body) < 126  # a 6-byte head: masked, 7-bit length
            cut = 6 + (body.index(b"\\u") + 3 if b"\\u" in body else len(body) // 2)
            for piece in (data[:cut], data[cut:]):
                raw.send(piece)
                time.sleep(0.05)
        else:
            raw.send(data)
        return [raw.read_message(), raw.read_message()]


@pytest_twisted.ensureDeferred
async def test_unsendable_values_get_one_400_and_the_connection_goes_on(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    try:
        for case, (body, rid) in UNSENDABLE.items():
            for opcode in (TEXT, BINARY):
                for split in (False, True):
                    where = f"{case}, {'binary' if opcode == BINARY else 'text'}, {'split' if split else 'whole'}"
                    bad, after = await deferToThread(_one_reply_then_time, running.port, body, opcode, split)
                    assert bad["status"] == 400 and "JSON cannot carry back" in bad["error"], (where, bad)
                    assert bad.get("id") == rid and ("id" in bad) == (rid is not None), (where, bad)
                    assert after["status"] == 200 and after["id"] == "after", (where, after)
        # Nothing of it was stored or published.
        assert codec.unsendable(running.node.store.addresses()) is None
        assert not running.node.gossip.cache
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_reply_that_cannot_be_encoded_is_an_error_not_a_wedge(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    later: list[Deferred] = []

    def deferred_op(conn: Any, args: Any) -> Deferred:
        d: Deferred = Deferred()
        later.append(d)
        return d

    node = running.node
    # In-process ops can build what no wire request can: the writer must hold.
    node.serve({"surrogate": lambda conn, args: codec.ok({"x": "\ud800"})})
    node.serve({"bigint": lambda conn, args: codec.ok(2 ** 70)})
    node.serve({"object": lambda conn, args: codec.Reply(400, "odd", object())})
    node.serve({"later": deferred_op})
    try:
        conn = await client.connect(reactor, running.url)
        replies = [conn.request(op) for op in ("surrogate", "bigint", "object", "later", "time")]
        await wait_for(reactor, lambda: later)
        later[0].callback(codec.ok("\udfff"))
        got = [await r for r in replies]
        assert [r.status for r in got] == [500, 500, 500, 500, 200], got
        assert all("could not be encoded" in r.error for r in got[:4]), got
        conn.close()
        await conn.when_closed()
    finally:
        await running.stop()


# -- gossip ----------------------------------------------------------------------------

def _envelope_text(ident: identity.Identity, topic: str, payload: Any, raw_payload: bytes | None) -> bytes:
    """A gossip event, signed; ``raw_payload`` replaces the payload's JSON
    text after signing (the id covers what orjson makes of it: null)."""
    env = Envelope.create(ident, topic, payload, 60, time.time())
    text = codec.encode_event("gossip", envelope=env.to_json())
    if raw_payload is not None:
        text = text.replace(b'"payload":' + orjson.dumps(payload), b'"payload":' + raw_payload, 1)
    return text


@pytest.mark.parametrize("raw_payload", [b"NaN", b"Infinity", b"-1e999", b'"\\ud800"', b'{"\\udc00": 1}'])
@pytest_twisted.ensureDeferred
async def test_unsendable_envelope_is_refused_at_the_first_node(reactor, tmp_path, raw_payload):
    # first <- second: the attacker is a peer of the first node only.
    first = await start_node(reactor, tmp_path / "first")
    second = await start_node(reactor, tmp_path / "second", "--peer", first.url)
    subscribers = []
    try:
        await wait_for(reactor, lambda: len(first.node.peers.peers) == 1 and len(second.node.peers.peers) == 1)
        for running in (first, second):
            got: list = []
            sub = await client.connect(reactor, running.url, on_event=lambda e, got=got: got.append(e.body))
            assert (await sub.request("subscribe", {"topics": ["t"]})).status == 200
            subscribers.append((sub, got))
        attacker_id = identity.Identity.generate()
        attacker = await connect_as_peer(reactor, first.url, attacker_id)
        honest_link = second.node.peers.peers[first.node.node_id]
        attacker.sendMessage(_envelope_text(attacker_id, "t", None, raw_payload))
        # Then a good one from the same peer, which must arrive everywhere.
        attacker.sendMessage(_envelope_text(attacker_id, "t", {"good": 1}, None))
        await wait_for(reactor, lambda: all(got for _, got in subscribers), what="the good envelope")
        await sleep(reactor, 0.3)
        for _, got in subscribers:
            assert [m["payload"] for m in got] == [{"good": 1}], got
        # The honest link is the same connection, and the attacker's too.
        assert second.node.peers.peers.get(first.node.node_id) is honest_link and honest_link.fox_open
        assert attacker.fox_open
        attacker.close()
        await attacker.when_closed()
    finally:
        for sub, _ in subscribers:
            sub.close()
            await sub.when_closed()
        await second.stop()
        await first.stop()


# -- frames within the limit ------------------------------------------------------------

def _full_store_addresses(n: int = 10_000, length: int = 256) -> list[str]:
    out = []
    for i in range(n):
        head = f"ws://127.3.{i // 250}.{i % 250 + 1}:9/"
        out.append(head + "p" * (length - len(head)))
    return out


async def _fill(running: Any, addrs: list[str]) -> None:
    store = running.node.store
    for i in range(0, len(addrs), 1000):
        await store.add(addrs[i:i + 1000], REGISTER).durable
    assert len(store) == len(addrs)


def _measure(conn: Any) -> list[int]:
    """Sizes of every message ``conn`` receives."""
    sizes: list[int] = []
    on_message = conn.onMessage

    def measured(payload: bytes, is_binary: bool) -> None:
        sizes.append(len(payload))
        on_message(payload, is_binary)

    conn.onMessage = measured
    return sizes


@pytest_twisted.ensureDeferred
async def test_peers_of_a_full_store_comes_in_pages_within_the_limit(reactor, node_dir):
    limit = 1 << 20
    running = await start_node(reactor, node_dir)
    try:
        addrs = _full_store_addresses()
        assert len(orjson.dumps(addrs)) > 2 * limit
        await _fill(running, addrs)
        # The client reads at the node's own limit: any bigger frame fails it (1009).
        conn = await client.connect(reactor, running.url, max_message_size=limit)
        sizes = _measure(conn)
        seen: list[str] = []
        reply = await conn.request("peers")
        pages = 1
        while True:
            assert reply.status == 200, reply
            seen += reply.response["peers"]
            if "next" not in reply.response:
                break
            assert set(reply.response) == {"peers", "next"}
            reply = await conn.request("peers", {"cursor": reply.response["next"]})
            pages += 1
        assert sorted(seen) == sorted(addrs) and len(seen) == len(set(seen))
        assert 3 <= pages <= 4, pages
        assert max(sizes) <= limit
        # A cursor of the wrong type is a 400 naming it.
        bad = await conn.request("peers", {"cursor": 5})
        assert bad.status == 400 and "cursor" in bad.error
        # info's detail is bounded too.
        detail = await conn.request("info", {"detail": True})
        assert detail.status == 200 and max(sizes) <= limit
        conn.close()
        await conn.when_closed()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_ordinary_store_keeps_the_seeds_exact_peers_reply(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    try:
        addrs = _full_store_addresses(1000)
        await _fill(running, addrs)
        reply = await client.call(reactor, running.url, "peers")
        assert reply.status == 200 and set(reply.response) == {"peers"}
        assert reply.response["peers"] == running.node.store.addresses()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_foxnode_client_reads_what_a_node_with_a_larger_limit_sends(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--max-message-size", str(4 << 20))
    try:
        await _fill(running, _full_store_addresses())
        reply = await client.call(reactor, running.url, "peers")  # the client's default limit
        assert reply.status == 200 and len(reply.response["peers"]) == 10_000
        assert "next" not in reply.response
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_no_frame_over_the_limit_leaves_the_node(reactor, node_dir):
    limit = 64 * 1024
    running = await start_node(reactor, node_dir, "--max-message-size", str(limit))
    node = running.node
    later: list[Deferred] = []
    node.serve({"big": lambda conn, args: codec.ok("x" * limit)})
    node.serve({"big-later": lambda conn, args: later.append(Deferred()) or later[-1]})
    try:
        await _fill(running, _full_store_addresses(3000))
        sub_events: list = []
        sub = await client.connect(reactor, running.url, max_message_size=limit,
                                   on_event=lambda e: sub_events.append(e.body))
        sizes = _measure(sub)
        assert (await sub.request("subscribe", {"topics": ["t"]})).status == 200
        conn = await client.connect(reactor, running.url, max_message_size=limit)
        sizes += _measure(conn)
        # A reply too large (now, or later behind another) becomes a 413.
        replies = [conn.request("big"), conn.request("big-later"), conn.request("time")]
        await wait_for(reactor, lambda: later)
        later[0].callback(codec.ok(["y" * 100] * 1000))
        got = [await r for r in replies]
        assert [r.status for r in got] == [413, 413, 200], got
        assert "--max-message-size" in got[0].error
        # A page of peers and the detail of info fit.
        peers = await conn.request("peers")
        assert peers.status == 200 and "next" in peers.response
        detail = await conn.request("info", {"detail": True})
        assert detail.status == 200 and detail.response.get("truncated") is True
        # A message whose request fit but whose event would not is not pushed.
        def dropped() -> float:
            return node.metrics.registry.get_sample_value(
                "foxnode_send_dropped_total", {"kind": "subscriber"}) or 0

        dropped_before = dropped()
        payload = "z" * (limit - 120)
        reply = await conn.request("publish", {"topic": "t", "payload": payload})
        assert reply.status == 202, reply
        await wait_for(reactor, lambda: dropped() > dropped_before,
                       what="the oversized push counted as dropped")
        assert (await conn.request("publish", {"topic": "t", "payload": "small"})).status == 202
        await wait_for(reactor, lambda: sub_events, what="the small message")
        assert [e["payload"] for e in sub_events] == ["small"]
        assert sub.fox_open and conn.fox_open
        assert max(sizes) <= limit, max(sizes)
        for c in (sub, conn):
            c.close()
            await c.when_closed()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_foxnode_call_reads_what_its_node_sends(reactor, node_dir):
    from test_cli import run

    running = await start_node(reactor, node_dir, "--max-message-size", str(4 << 20))
    try:
        addrs = _full_store_addresses()
        await _fill(running, addrs)
        code, out, err = await run(reactor, "call", running.url, "peers", timeout=60)
        assert (code, err) == (0, "")
        assert json.loads(out)["response"]["peers"] == running.node.store.addresses()
        # Told to read less than the node sends, it fails with one line.
        code, out, err = await run(reactor, "call", "--max-message-size", "100000", running.url, "peers")
        assert code == 2 and err.count("\n") == 1, (code, err)
        # And a request over its own limit is not sent.
        code, out, err = await run(reactor, "call", "--max-message-size", "100", running.url, "register",
                                   json.dumps({"addr": "ws://127.3.0.1:9/" + "a" * 200}))
        assert code == 2 and "--max-message-size" in err, (code, err)
    finally:
        await running.stop()
