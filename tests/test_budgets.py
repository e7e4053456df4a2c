"""Who is held to which budget (issue 11, items 5 and 9): a peer's
requests and events are budgeted whatever its key; the node's operator
(``--trusted``, loopback by default) is not rate-limited or capped per IP;
and a connection whose replies wait (a hung disk) is not read further.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from foxnode import client, codec
from foxnode.protocol import CLOSE_RATE_LIMIT
from foxnode.testing import connect_as_peer, sleep, start_node, wait_for

from test_attacks import OUTSIDER, TEXT, Raw, frame, upgraded

SMALL_PEER_BUDGET = ("--peer-rate", "5", "--peer-burst", "10")


async def _flood(conn: Any, count: int, body: bytes) -> list[dict]:
    """Send ``count`` copies of ``body`` without waiting; the replies that
    came before the node closed the connection."""
    got: list[dict] = []
    on_message = conn.onMessage
    conn.onMessage = lambda payload, binary: got.append(orjson.loads(payload)) if b'"status"' in payload \
        else on_message(payload, binary)
    for _ in range(count):
        conn.sendMessage(body)
    await conn.when_closed().addTimeout(10, conn.factory.reactor)
    return got


@pytest_twisted.ensureDeferred
async def test_a_peer_flooding_requests_is_told_429_then_closed(reactor, node_dir):
    # Loopback is trusted here (the default): saying hello still makes it a
    # peer, and peers are budgeted.
    running = await start_node(reactor, node_dir, *SMALL_PEER_BUDGET)
    try:
        peer = await connect_as_peer(reactor, running.url)
        replies = await _flood(peer, 300, b'{"op": "time"}')
        statuses = [r["status"] for r in replies]
        assert 200 in statuses and 429 in statuses, statuses
        assert peer.close_code == CLOSE_RATE_LIMIT, peer.close_code
        assert len(replies) < 300
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_peer_flooding_events_is_dropped_counted_and_closed(reactor, node_dir):
    running = await start_node(reactor, node_dir, *SMALL_PEER_BUDGET)
    metrics = running.node.metrics.registry
    try:
        peer = await connect_as_peer(reactor, running.url)
        await _flood(peer, 300, b'{"event": "ihave", "ids": []}')
        assert peer.close_code == CLOSE_RATE_LIMIT, peer.close_code
        dropped = metrics.get_sample_value("foxnode_peer_events_rate_limited_total")
        assert dropped and dropped >= 1
        # Bad envelopes count against the same budget.
        peer = await connect_as_peer(reactor, running.url)
        await _flood(peer, 300, b'{"event": "gossip", "envelope": {"payload": NaN}}')
        assert peer.close_code == CLOSE_RATE_LIMIT, peer.close_code
        await wait_for(reactor, lambda: not running.node.connections)
    finally:
        await running.stop()


def _pipeline_times(port: int, count: int) -> list[tuple[int, Any]]:
    with upgraded(port, timeout=30) as raw:
        raw.send(b"".join(frame(TEXT, orjson.dumps({"op": "time", "id": i})) for i in range(count)))
        return [(m["status"], m.get("id")) for m in (raw.read_message() for _ in range(count))]


@pytest_twisted.ensureDeferred
async def test_a_trusted_client_pipelining_thousands_gets_them_all(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    try:
        got = await deferToThread(_pipeline_times, running.port, 5000)
        assert got == [(200, i) for i in range(5000)]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_trusted_clients_are_not_capped_per_ip(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--max-per-ip", "2")
    try:
        conns = [await client.connect(reactor, running.url) for _ in range(6)]
        assert all(c.fox_open for c in conns)
        for c in conns:
            c.close()
            await c.when_closed()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_an_outsider_is_limited_before_and_after_hello(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--rate", "5", "--burst", "10",
                               *SMALL_PEER_BUDGET, *OUTSIDER)
    try:
        conn = await client.connect(reactor, running.url)
        replies = await _flood(conn, 300, b'{"op": "time"}')
        assert 429 in [r["status"] for r in replies] and conn.close_code == CLOSE_RATE_LIMIT
        # A fresh key is no free pass.
        peer = await connect_as_peer(reactor, running.url)
        replies = await _flood(peer, 300, b'{"op": "time"}')
        assert 429 in [r["status"] for r in replies] and peer.close_code == CLOSE_RATE_LIMIT
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_outsiders_are_capped_per_ip(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--max-per-ip", "2", *OUTSIDER)
    try:
        def three() -> list:
            raws = [Raw(running.port) for _ in range(3)]  # kept open meanwhile
            statuses = [r.upgrade() for r in raws]
            for r in raws:
                r.close()
            return statuses

        statuses = await deferToThread(three)
        assert statuses == [101, 101, 503], statuses
    finally:
        await running.stop()


# -- a hung disk: requests in flight are bounded ------------------------------------------------

class HungCommits:
    """Makes a store's writes never complete until ``release``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.real = store.commit
        self.waiting: list[Deferred] = []
        store.commit = self.commit

    def commit(self) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def release(self) -> None:
        if self.store.commit == self.commit:
            self.store.commit = self.real
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            self.real().chainDeferred(d)


def _send_requests(port: int, count: int, pieces: int) -> Raw:
    raw = Raw(port, timeout=30)
    assert raw.upgrade() == 101
    stream = b"".join(
        frame(TEXT, orjson.dumps({"op": "register", "id": i,
                                  "args": {"addr": f"ws://127.3.{i // 250}.{i % 250 + 1}:9/ws"}})
              if i % 2 == 0 else orjson.dumps({"op": "time", "id": i}))
        for i in range(count))
    # Cut anywhere, so that frames are split across reads as well.
    step = len(stream) // pieces + 1
    for start in range(0, len(stream), step):
        raw.send(stream[start:start + step])
        time.sleep(0.01)
    return raw


@pytest_twisted.ensureDeferred
async def test_replies_waiting_for_a_hung_disk_stop_the_reading(reactor, node_dir):
    bound, count = 16, 4000
    running = await start_node(reactor, node_dir, "--max-in-flight", str(bound))
    node = running.node
    hung = HungCommits(node.store)
    handled: list[int] = []
    handle = node.handle_request

    def counted(conn: Any, request: codec.Request) -> Any:
        handled.append(request.id)
        return handle(conn, request)

    node.handle_request = counted
    raw = None
    try:
        raw = await deferToThread(_send_requests, running.port, count, 7)
        await wait_for(reactor, lambda: hung.waiting and len(handled) >= bound)
        await sleep(reactor, 0.5)
        (conn,) = node.connections
        # The node stopped at the bound, and reads no more: what it read
        # and did not handle waits, unparsed, bounded by one read or so.
        assert len(handled) <= bound + 1, len(handled)
        assert len(conn._replies) <= bound
        assert len(conn.data) <= 2 * 65536
        assert conn.transport not in reactor.getReaders()
        hung.release()

        def read_all() -> list[tuple[int, Any]]:
            return [(m["status"], m["id"]) for m in (raw.read_message() for _ in range(count))]

        got = await deferToThread(read_all)
        assert got == [(202 if i % 2 == 0 else 200, i) for i in range(count)]
        assert handled == list(range(count))
    finally:
        hung.release()  # or stopping would wait for the hung write
        if raw is not None:
            raw.close()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_operator_ops_are_for_trusted_clients_only(reactor, node_dir, tmp_path):
    """An op added as an operator op answers the operator and 403s anyone
    else, also a peer that said hello or a binary frame."""
    calls: list[Any] = []

    def secret(conn: Any, args: Any) -> codec.Reply:
        calls.append(args)
        return codec.ok({"secret": True})

    outsider_node = await start_node(reactor, node_dir, *OUTSIDER)
    operator_node = await start_node(reactor, tmp_path / "operator")
    try:
        for running in (outsider_node, operator_node):
            running.node.serve({"secret": secret}, operator=True)
        conn = await client.connect(reactor, outsider_node.url)
        reply = await conn.request("secret", {})
        assert (reply.status, reply.error) == (403, 'Operation "secret" is only for trusted clients.')
        conn.sendMessage(b'{"op": "secret", "id": "b"}', isBinary=True)
        peer = await connect_as_peer(reactor, outsider_node.url)
        reply_as_peer = await peer.request("secret", {})
        assert reply_as_peer.status == 403
        assert calls == []
        # The operator (loopback, trusted by default) is served.
        trusted = await client.connect(reactor, operator_node.url)
        reply = await trusted.request("secret", {"x": 1})
        assert reply.status == 200 and calls == [{"x": 1}]
        for c in (conn, peer, trusted):
            c.close()
    finally:
        await outsider_node.stop()
        await operator_node.stop()
