"""Plugins between twistd processes on loopback: a plugin file given with
``--plugin`` answers its op, a failing op is a 500 and the node serves on;
a plugin that does not import stops the start in one line; a validator at
B stops a message published at A, so that neither B's subscriber nor C,
which hears only from B, gets it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest_twisted

from foxnode import client
from foxnode.testing import LOOPBACK, serving_node, sleep, stop_all

BIN = Path(sys.executable).parent

PLUGIN = """
    from foxnode.plugin import op, validator, OpError

    @op("greet")
    def greet(ctx, args):
        if "name" not in args:
            raise OpError(400, 'Operation "greet" requires "name".')
        return {"greeting": "hi " + args["name"], "node": ctx.node_id}

    @op("boom")
    def boom(ctx, args):
        return {}["missing"]

    @validator("blocks")
    def only_numbered(ctx, message):
        return isinstance(message["payload"], dict) and "number" in message["payload"]
"""


def write_plugin(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest_twisted.ensureDeferred
async def test_a_plugin_file_answers_and_its_failure_is_a_500(reactor, tmp_path):
    path = write_plugin(tmp_path, "lab", PLUGIN)
    node = await serving_node(reactor, tmp_path / "n", "--plugin", path)
    try:
        info = (await client.call(reactor, node.url, "info")).response
        assert info["plugins"] == ["time", "lab"]
        assert {"greet", "boom", "time"} <= set(info["ops"])
        reply = await client.call(reactor, node.url, "greet", {"name": "fox"})
        assert (reply.status, reply.response) == (200, {"greeting": "hi fox", "node": info["node_id"]})
        refused = await client.call(reactor, node.url, "greet")
        assert (refused.status, refused.error) == (400, 'Operation "greet" requires "name".')
        failed = await client.call(reactor, node.url, "boom")
        assert (failed.status, failed.error, failed.response) == (
            500, 'Plugin "lab" failed in operation "boom"; the node\'s log says why.', None)
        # The node serves on, the lab's time as ever.
        t = await client.call(reactor, node.url, "time")
        assert t.status == 200 and set(t.response) == {"time", "time_zone"}
        assert (await client.call(reactor, node.url, "greet", {"name": "again"})).status == 200
        log = node.log()
        assert "plugin lab: op boom raised KeyError: 'missing' (lab.py, line 12); replied 500" in log, log
        assert "Traceback" not in log
    finally:
        stop_all([node])


def test_a_plugin_that_does_not_import_stops_the_start_in_one_line(tmp_path):
    path = write_plugin(tmp_path, "broken", "from foxnode.plugin import op\n\nimport no_such_module_here\n")
    result = subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "foxnode", "--listen", f"tcp:0:interface={LOOPBACK}",
         "--peers-file", str(tmp_path / "peers.json"), "--data-dir", str(tmp_path), "--plugin", path],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert out.strip().splitlines() == [
        f"foxnode: cannot start: --plugin {path}: cannot import it: ModuleNotFoundError: "
        "No module named 'no_such_module_here' (broken.py, line 3)"], out
    # Refused before anything was locked or made.
    assert not (tmp_path / "node.key").exists() and not (tmp_path / "peers.json").exists()


async def _connected(reactor, url: str, count: int) -> list:
    deadline = time.monotonic() + 30
    while True:
        live = (await client.call(reactor, url, "info")).response["connected"]
        if len(live) >= count:
            return live
        assert time.monotonic() < deadline, f"{url}: {len(live)} peers, not {count}"
        await sleep(reactor, 0.3)


@pytest_twisted.ensureDeferred
async def test_a_validator_at_b_stops_what_a_published_before_b_and_c(reactor, tmp_path):
    path = write_plugin(tmp_path, "lab", PLUGIN)
    # A line A - B - C: A dials nobody, C only B (not A, learned by exchange).
    a = await serving_node(reactor, tmp_path / "a", "--max-outbound", "0")
    b = await serving_node(reactor, tmp_path / "b", "--peer", a.url, "--plugin", path)
    c = await serving_node(reactor, tmp_path / "c", "--peer", b.url, "--max-outbound", "1")
    conns = []
    try:
        await _connected(reactor, b.url, 2)
        assert len(await _connected(reactor, a.url, 1)) == 1
        assert len(await _connected(reactor, c.url, 1)) == 1
        got: dict[str, list] = {"b": [], "c": []}
        for name, node in (("b", b), ("c", c)):
            conn = await client.connect(reactor, node.url,
                                        on_event=lambda e, name=name: got[name].append(e.body["payload"]))
            conns.append(conn)
            assert (await conn.request("subscribe", {"topics": ["blocks"]})).status == 200
        for payload in ({"no": "number"}, "nothing", {"number": 2}):
            assert (await client.call(reactor, a.url, "publish",
                                      {"topic": "blocks", "payload": payload})).status == 202
        deadline = time.monotonic() + 15
        while got["c"] != [{"number": 2}] or got["b"] != [{"number": 2}]:
            assert time.monotonic() < deadline, got
            await sleep(reactor, 0.2)
        await sleep(reactor, 1)  # nothing else comes
        assert got == {"b": [{"number": 2}], "c": [{"number": 2}]}
        # Published at B itself, it is refused outright.
        refused = await client.call(reactor, b.url, "publish", {"topic": "blocks", "payload": "x"})
        assert (refused.status, refused.error) == (
            400, 'Refused by the validator of plugin "lab" for topic "blocks"; nothing was published.')
        metrics = (await client_http(reactor, b.http + "/metrics")).decode()
        assert 'foxnode_validator_refused_total{plugin="lab"} 3.0' in metrics, metrics
    finally:
        for conn in conns:
            conn.close()
        stop_all([c, b, a])


async def client_http(reactor, url: str) -> bytes:
    import urllib.request

    from twisted.internet.threads import deferToThreadPool

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    return await deferToThreadPool(reactor, reactor.getThreadPool(), fetch)


@pytest_twisted.ensureDeferred
async def test_ctx_ask_calls_another_nodes_op_and_its_refusal_is_an_op_error(reactor, tmp_path):
    import pytest

    from foxnode import pluginhost
    from foxnode.plugin import OpError

    node = await serving_node(reactor, tmp_path / "n", "--plugin", "chain")
    try:
        info = await pluginhost._ask(reactor, node.url, "info", None, 5)
        assert "chain" in info["plugins"]
        # A pinned address is dialled without its pin.
        head = await pluginhost._ask(reactor, f"{node.url}#{info['node_id']}", "chain", {"recent": 0}, 5)
        assert head["height"] == 0
        with pytest.raises(OpError) as caught:
            await pluginhost._ask(reactor, node.url, "block", {"height": 9}, 5)
        assert caught.value.status == 404 and "No block at height 9" in caught.value.message
    finally:
        stop_all([node])
