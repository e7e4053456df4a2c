"""foxchain (foxnode.plugins.chain) on a devnet of twistd processes, as
``foxnode devnet --plugin chain`` starts it (five nodes for the fork): two
nodes mining at once fork and converge on the branch with more work; a node
started late syncs to the head, and again when it comes back after missing
blocks; an invalid block, published at a node or injected by a node that does
not run the plugin, goes nowhere."""

from __future__ import annotations

import io
import random
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred

from foxnode import client
from foxnode.devnet import Devnet, port_in_use
from foxnode.plugins.chain import TOPIC
from foxnode.plugins.chain import block as blocks
from foxnode.testing import serving_node, sleep, stop_all


def free_ports(count: int) -> int:
    for _ in range(100):
        base = random.randrange(20000, 60000)
        if not any(port_in_use(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


@asynccontextmanager
async def devnet(reactor: Any, directory, count: int) -> AsyncIterator[Devnet]:
    net = Devnet(reactor, directory, count, free_ports(count), "foxchain", out=io.StringIO(),
                 plugins=("chain",))
    net.prepare()
    net.start()
    try:
        await net.wait_up(30)
        await net.wait_connected(30)
        assert not net.unconnected(), net.out.getvalue()
        yield net
    finally:
        await net.stop()


async def call(reactor, url: str, op: str, args: Any = None) -> Any:
    reply = await client.call(reactor, url, op, args)
    assert reply.status == 200, (op, args, reply.status, reply.error)
    return reply.response


async def heads(reactor, urls: list[str]) -> list[dict]:
    return [await call(reactor, u, "chain", {"recent": 0}) for u in urls]


async def converged(reactor, urls: list[str], timeout: float = 20.0, height: int | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = await heads(reactor, urls)
        if len({h["hash"] for h in got}) == 1 and (height is None or got[0]["height"] >= height):
            return got[0]
        assert time.monotonic() < deadline, got
        await sleep(reactor, 0.3)


@pytest_twisted.ensureDeferred
async def test_two_nodes_mining_at_once_fork_and_converge_on_more_work(reactor, tmp_path):
    async with devnet(reactor, tmp_path / "devnet", 5) as net:
        urls = [n.url for n in net.nodes]
        # Info lists the plugin; every node starts at the same genesis block.
        assert "chain" in (await call(reactor, urls[0], "info"))["plugins"]
        assert {h["hash"] for h in await heads(reactor, urls)} == {blocks.GENESIS["hash"]}
        fork = None
        for _ in range(5):
            # node-1 and node-2 mine at once; node-2's block proves more work.
            results = await DeferredList([
                ensureDeferred(call(reactor, urls[1], "mine", {"data": "one", "difficulty": 12})),
                ensureDeferred(call(reactor, urls[2], "mine", {"data": "two", "difficulty": 13}))],
                fireOnOneErrback=True, consumeErrors=True)
            one, two = (r["block"] for _, r in results)
            if one["height"] == two["height"]:
                fork = one, two
                break
            await converged(reactor, urls)
        assert fork is not None, "no two blocks at one height in five rounds"
        one, two = fork
        head = await converged(reactor, urls)
        # The branch with more work wins everywhere; the other is kept, off the best chain.
        assert head["hash"] == two["hash"], (head, one, two)
        for url in urls:
            # The losing block may still be on its way (over a lazy link, a
            # graft away) when the heads agree: it arrives, and stays off.
            deadline = time.monotonic() + 10
            while (reply := await client.call(reactor, url, "block", {"hash": one["hash"]})).status == 404:
                assert time.monotonic() < deadline, f"{url} never got the losing block"
                await sleep(reactor, 0.2)
            assert reply.status == 200 and reply.response["best"] is False, reply
            assert (await call(reactor, url, "block", {"height": two["height"]}))["hash"] == two["hash"]
        # node-1 mines on from the winner: the chain grows from the converged head.
        grown = (await call(reactor, urls[1], "mine", {"data": "three", "difficulty": 12}))["block"]
        assert grown["prev"] == two["hash"]
        head = await converged(reactor, urls, height=grown["height"])
        assert head["hash"] == grown["hash"]


@pytest_twisted.ensureDeferred
async def test_a_node_started_late_syncs_to_the_head(reactor, tmp_path):
    async with devnet(reactor, tmp_path / "devnet", 3) as net:
        urls = [n.url for n in net.nodes]
        for i in range(6):
            await call(reactor, urls[i % 3], "mine", {"data": {"n": i}, "difficulty": 10})
            await converged(reactor, urls, height=i + 1)
        head = (await heads(reactor, urls[:1]))[0]
        assert head["height"] == 6
        late = await serving_node(reactor, tmp_path / "late", "--peer", urls[0], "--plugin", "chain",
                                  "--network", "foxchain")
        try:
            synced = await converged(reactor, [urls[0], late.url], timeout=30)
            assert synced["hash"] == head["hash"] and synced["work"] == head["work"]
            recent = await call(reactor, late.url, "chain", {"recent": 7})
            assert [b["height"] for b in recent["blocks"]] == [6, 5, 4, 3, 2, 1, 0]
            # And it takes part: a block it mines reaches the others.
            mined = (await call(reactor, late.url, "mine", {"difficulty": 10}))["block"]
            assert (await converged(reactor, urls + [late.url], height=7))["hash"] == mined["hash"]
            # Stopped, it misses three blocks; back, it has them, on top of what it kept.
            late.stop()
            for i in range(3):
                await call(reactor, urls[1], "mine", {"data": {"while away": i}, "difficulty": 10})
            await converged(reactor, urls, height=10)
            late = await serving_node(reactor, tmp_path / "late", "--peer", urls[0], "--plugin", "chain",
                                      "--network", "foxchain")
            back = await converged(reactor, urls + [late.url], timeout=30, height=10)
            assert back["height"] == 10
        finally:
            stop_all([late])


def forged(parent: dict, **change: Any) -> dict:
    """A block on ``parent`` that fails one rule (``change``), its hash and
    proof of work right."""
    b = {**blocks.mine(parent, "forged", int(time.time()), blocks.MIN_DIFFICULTY), **change}
    for nonce in range(1 << 20):
        b["nonce"] = nonce
        b["hash"] = blocks.block_hash(b)
        if blocks.meets(b["hash"], b["difficulty"]):
            return b
    raise AssertionError("no nonce")


def bad_pow(prev: dict) -> dict:
    b = blocks.mine(prev, "lazy", int(time.time()), 8)
    b["difficulty"] = 24
    for nonce in range(1000):  # a nonce whose hash has fewer than 24 zero bits
        b["nonce"] = nonce
        b["hash"] = blocks.block_hash(b)
        if not blocks.meets(b["hash"], 24):
            return b
    raise AssertionError("unreachable")


@pytest_twisted.ensureDeferred
async def test_an_invalid_block_goes_nowhere(reactor, tmp_path):
    async with devnet(reactor, tmp_path / "devnet", 3) as net:
        urls = [n.url for n in net.nodes]
        # A node without the plugin, beside node-0: it forwards whatever it is given.
        plain = await serving_node(reactor, tmp_path / "plain", "--peer", urls[0], "--network", "foxchain")
        seen: list = []
        conn = await client.connect(reactor, urls[2], on_event=lambda e: seen.append(e.body["payload"]))
        try:
            assert (await conn.request("subscribe", {"topics": [TOPIC]})).status == 200
            deadline = time.monotonic() + 20
            while not (await call(reactor, plain.url, "info"))["connected"]:
                assert time.monotonic() < deadline
                await sleep(reactor, 0.3)
            genesis = blocks.GENESIS
            bad = {
                "bad pow": bad_pow(genesis),
                "bad hash": {**blocks.mine(genesis, "x", int(time.time()), 8), "hash": "ab" * 32},
                "bad height": forged(genesis, height=5),
                "unknown prev": forged(genesis, prev="cd" * 32),
                "far future": forged(genesis, time=int(time.time()) + 10 ** 6),
                "not a block": {"height": 1},
            }
            for what, b in bad.items():
                reply = await client.call(reactor, plain.url, "publish", {"topic": TOPIC, "payload": b})
                assert reply.status == 202, (what, reply.error)
            # Published at a node that runs the plugin, it is refused outright.
            refused = await client.call(reactor, urls[1], "publish", {"topic": TOPIC, "payload": bad["bad pow"]})
            assert refused.status == 400 and 'validator of plugin "chain"' in refused.error
            # A good block, sent the same way after them, goes everywhere.
            good = blocks.mine(genesis, "good", int(time.time()), 10)
            reply = await client.call(reactor, plain.url, "publish", {"topic": TOPIC, "payload": good})
            assert reply.status == 202
            head = await converged(reactor, urls, height=1)
            assert head["hash"] == good["hash"]
            await sleep(reactor, 1)
            assert seen == [good]
            for url in urls:
                for what, b in bad.items():
                    if "hash" in b:
                        reply = await client.call(reactor, url, "block", {"hash": b["hash"]})
                        assert reply.status == 404, (url, what)
            logged = "".join(n.log_path.read_text() for n in net.nodes)
            assert "foxchain: refused block at height 1 from node" in logged
            assert "the proof of work does not hold" in logged
            assert "Traceback" not in logged
        finally:
            conn.close()
            stop_all([plain])


def test_a_ledger_file_that_is_not_one_stops_the_start_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from foxnode.testing import LOOPBACK

    ledger = tmp_path / "plugins" / "chain" / "chain.sqlite"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"this is not a database\n" * 200)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", "foxnode",
         "--listen", f"tcp:0:interface={LOOPBACK}", "--peers-file", str(tmp_path / "peers.json"),
         "--data-dir", str(tmp_path), "--plugin", "chain"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1, out
    assert len(out) == 1 and out[0].startswith(
        f"foxnode: cannot start: --plugin chain: its service chain_service raised LedgerError: {ledger}: "
        "not a foxchain ledger (file is not a database)"), out
    # The file is left as it was.
    assert ledger.read_bytes() == b"this is not a database\n" * 200
