"""The node's HTTP side: ``/`` (the page), ``/healthz`` and ``/metrics``,
fetched over a real socket with ``twisted.web.client.Agent``.

Every address used here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import html
from typing import Any

import orjson
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from foxnode import client
from foxnode.testing import running_node, wait_for

TIMEOUT = 10.0




class _Body(Protocol):
    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


async def get(reactor: Any, url: str) -> tuple[int, dict[str, str], bytes]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        d = Agent(reactor, pool=pool).request(b"GET", url.encode())
        d.addTimeout(TIMEOUT, reactor)
        response = await d
        done: Deferred = Deferred()
        response.deliverBody(_Body(done))
        body = await done
        headers = {k.decode().lower(): v[-1].decode()
                   for k, v in response.headers.getAllRawHeaders()}
        return response.code, headers, body
    finally:
        await pool.closeCachedConnections()


async def register(reactor: Any, url: str, addrs: list[str]) -> None:
    reply = await client.call(reactor, url, "register", {"addr": addrs})
    assert reply.status == 202, reply
    assert reply.response["accepted"] == addrs, reply


# -- / ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_page_shows_node_id_network_and_known_peers(reactor, node_dir):
    peers = ["ws://127.8.0.1:9000/ws", "wss://localhost:9443/ws"]
    async with running_node(reactor, node_dir, "--network", "labnet") as node:
        code, headers, body = await get(reactor, node.http + "/")
        assert code == 200
        assert headers["content-type"].startswith("text/html")
        page = body.decode("utf-8")
        assert node.node.node_id in page
        assert "labnet" in page
        assert "FOXCHAIN" in page
        for a in peers:
            assert a not in page

        await register(reactor, node.url, peers)
        code, _, body = await get(reactor, node.http + "/")
        page = body.decode("utf-8")
        assert code == 200
        for a in peers:
            assert html.escape(a) in page, f"{a} not on the page"


@pytest_twisted.ensureDeferred
async def test_page_escapes_what_strangers_registered(reactor, node_dir):
    hostile = "ws://127.8.0.2:9000/ws?x=<script>alert(1)</script>"
    async with running_node(reactor, node_dir) as node:
        reply = await client.call(reactor, node.url, "register", {"addr": hostile})
        assert reply.status == 202
        if reply.response["accepted"] != [hostile]:
            # Rejecting such an address outright is fine too.
            assert [r["addr"] for r in reply.response["rejected"]] == [hostile]
        code, _, body = await get(reactor, node.http + "/")
    page = body.decode("utf-8")
    assert code == 200
    assert "<script>alert(1)</script>" not in page
    if reply.response["accepted"]:
        assert html.escape(hostile) in page


# -- /healthz -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_healthz(reactor, node_dir):
    async with running_node(reactor, node_dir, "--network", "labnet") as node:
        code, headers, body = await get(reactor, node.http + "/healthz")
        assert code == 200
        assert headers["content-type"].startswith("application/json")
        health = orjson.loads(body)
        assert health["status"] == "ok"
        assert health["node_id"] == node.node.node_id
        assert health["network"] == "labnet"
        assert health["peers"]["known"] == 0
        assert health["peers"]["connected"] == 0
        assert {"known", "connected", "inbound", "outbound"} <= set(health["peers"])

        await register(reactor, node.url, [f"ws://127.8.1.{i}:9000/ws" for i in range(1, 4)])
        code, _, body = await get(reactor, node.http + "/healthz")
    health = orjson.loads(body)
    assert code == 200
    assert health["peers"]["known"] == 3


# -- /metrics ---------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest_twisted.ensureDeferred
async def test_metrics(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        proto = await client.connect(reactor, node.url)
        try:
            replies = await gatherResults([
                proto.request("time"),
                proto.request("time"),
                proto.request("peers"),
                proto.request("register", {"addr": ["ws://127.8.2.1:9000/ws", "ws://127.8.2.2:9000/ws"]}),
                proto.request("no-such-op"),
            ])
        finally:
            proto.close()
            await proto.when_closed()
        assert [r.status for r in replies] == [200, 200, 200, 202, 404]
        code, headers, body = await get(reactor, node.http + "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode("utf-8")
    assert "foxnode_requests_total" in text
    found = samples(text)
    requests = {dict(labels)["op"] + "/" + dict(labels)["status"]: value
                for (name, labels), value in found.items() if name == "foxnode_requests_total"}
    assert requests.get("time/200") == 2, requests
    assert requests.get("peers/200") == 1, requests
    assert requests.get("register/202") == 1, requests
    assert sum(v for k, v in requests.items() if k.endswith("/404")) == 1, requests
    # a client inventing op names must not grow the label set
    assert not any("no-such-op" in k for k in requests), requests

    assert found[("foxnode_peer_store_size", ())] == 2
    write_count = [v for (name, _), v in found.items()
                   if name.startswith("foxnode_peer_store_write") and name.endswith("_count")]
    write_sum = [v for (name, _), v in found.items()
                 if name.startswith("foxnode_peer_store_write") and name.endswith("_sum")]
    assert write_count and write_count[0] >= 1, sorted(n for n, _ in found)
    assert write_sum and write_sum[0] > 0


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        code, _, _ = await get(reactor, node.http + "/no/such/page")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_metrics_count_bad_messages(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        conn = await client.connect(reactor, node.url)
        try:
            for frame in (b"not json", b"42", b'{"status": 200}'):
                conn.sendMessage(frame)
            await wait_for(reactor, lambda: node.node.metrics.bad_messages._value.get() == 3,
                           what="three bad messages counted")
        finally:
            conn.close()
            await conn.when_closed()
