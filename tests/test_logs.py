"""Logs: one line per meaningful event, and JSON lines for log collectors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest_twisted

from foxnode import client
from foxnode.testing import free_port, frames_options, start_node, wait_until_serving, NodeProcess


@pytest_twisted.ensureDeferred
async def test_twistd_writes_json_lines_with_logger_option(reactor, tmp_path):
    port = free_port()
    twistd = Path(sys.executable).parent / "twistd"
    out = tmp_path / "stdout.jsonl"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", "--logger", "foxnode.logs.json_observer",
             "foxnode", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--data-dir", str(tmp_path), "--peers-file", str(tmp_path / "peers.json"), *frames_options()],
            stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    node = NodeProcess(proc, port, tmp_path, out)
    try:
        wait_until_serving(node)
        reply = await client.call(reactor, node.url, "register", {"addr": "ws://127.3.0.1:9/ws"})
        assert reply.status == 202
    finally:
        node.stop()
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
