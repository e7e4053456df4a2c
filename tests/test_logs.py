"""Logs: one line per meaningful event, and JSON lines for log collectors."""

import json

import pytest_twisted

from foxnode import client
from foxnode.testing import serving_node, start_node


@pytest_twisted.ensureDeferred
async def test_twistd_writes_json_lines_with_logger_option(reactor, tmp_path):
    out = tmp_path / "stdout.jsonl"
    node = await serving_node(reactor, tmp_path, twistd_options=["--logger", "foxnode.logs.json_observer"],
                              log_path=out)
    try:
        reply = await client.call(reactor, node.url, "register", {"addr": "ws://127.3.0.1:9/ws"})
        assert reply.status == 202
    finally:
        await node.process.stop()
    events = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    namespaces = {e.get("log_namespace") for e in events}
    assert "foxnode.tap" in namespaces
    assert any(e.get("log_namespace") == "foxnode.node" and e.get("host") == "127.0.0.1"
               for e in events), "a JSON line for the client connection, with its fields"


@pytest_twisted.ensureDeferred
async def test_meaningful_events_are_logged(reactor, tmp_path):
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    a = await start_node(reactor, tmp_path / "a")
    b = await start_node(reactor, tmp_path / "b", "--peer", a.url)
    try:
        from foxnode.testing import wait_for

        await wait_for(reactor, lambda: a.node.live_peers(), what="a peer connection")
        await b.stop()
        await wait_for(reactor, lambda: not a.node.live_peers(), what="the disconnect")
    finally:
        await a.stop()
        globalLogPublisher.removeObserver(seen.append)
    formats = [e.get("log_format", "") for e in seen]
    assert any(f.startswith("peer {peer} connected") for f in formats)
    assert any(f.startswith("peer {peer} disconnected") for f in formats)
    assert any("client connected from" in f for f in formats)
