"""The peer network as separate twistd processes on loopback: what a user
sees when running five nodes bootstrapped from one."""

import pytest_twisted

from foxnode import client
from foxnode.testing import spawn_node, stop_all

FAST = ("--exchange-interval", "1")


async def info(reactor, node):
    reply = await client.call(reactor, node.url, "info")
    assert reply.status == 200
    return reply.response


async def snapshot(reactor, nodes):
    result = {}
    for n in nodes:
        try:
            result[n.url] = await info(reactor, n)
        except Exception:
            result[n.url] = None
    return result


@pytest_twisted.ensureDeferred
async def test_five_twistd_nodes_kill9_restart_and_a_foreign_network(reactor, tmp_path):
    nodes = [spawn_node(tmp_path / "n0", *FAST)]
    try:
        for i in range(1, 5):
            nodes.append(spawn_node(tmp_path / f"n{i}", *FAST, "--peer", nodes[0].url))
        foreign = spawn_node(tmp_path / "foreign", *FAST, "--network", "elsewhere",
                             "--peer", nodes[0].url, "--peer", nodes[3].url)
        urls = {n.url for n in nodes}
        state = {}

        async def converged():
            state.update(await snapshot(reactor, nodes))
            for n in nodes:
                i = state[n.url]
                if i is None:
                    return False
                peers = (await client.call(reactor, n.url, "peers")).response["peers"]
                if not (urls - {n.url}) <= set(peers):
                    return False
                if len(i["connected"]) < 2:
                    return False
            return True

        await wait_until(reactor, converged, timeout=40, what="5 nodes to learn every address and connect")
        ids = {n.url: state[n.url]["node_id"] for n in nodes}
        for n in nodes:
            connected = [p["node_id"] for p in state[n.url]["connected"]]
            assert len(connected) == len(set(connected)), "a pair connected twice"
            assert ids[n.url] not in connected, "connected to itself"
            assert set(connected) <= set(ids.values())

        # kill -9 one node: it drops out of everyone's connections ...
        victim = nodes[2]
        victim_id = ids[victim.url]
        victim.kill()

        async def dropped():
            s = await snapshot(reactor, [n for n in nodes if n is not victim])
            return all(victim_id not in [p["node_id"] for p in i["connected"]] for i in s.values())

        await wait_until(reactor, dropped, timeout=30, what="the killed node to drop out")

        # ... and comes back under the same id, and the others reconnect.
        nodes[2] = spawn_node(victim.directory, *FAST, port=victim.port)
        back = await info(reactor, nodes[2])
        assert back["node_id"] == victim_id

        async def reconnected():
            s = await snapshot(reactor, [n for n in nodes if n is not nodes[2]])
            linked = sum(victim_id in [p["node_id"] for p in i["connected"]] for i in s.values())
            return linked >= 2

        await wait_until(reactor, reconnected, timeout=40, what="others to reconnect to the restarted node")

        # Nobody ever connected to the node of another network.
        foreign_info = await info(reactor, foreign)
        assert foreign_info["connected"] == []
        s = await snapshot(reactor, nodes)
        for i in s.values():
            assert foreign_info["node_id"] not in [p["node_id"] for p in i["connected"]]
        assert "wrong-network" in foreign.log()
    finally:
        stop_all(nodes + ([foreign] if "foreign" in locals() else []))


async def wait_until(reactor, check, timeout, what):
    import time

    from foxnode.testing import sleep

    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(reactor, 0.5)
