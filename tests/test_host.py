"""Several real nodes per process (``twistd foxnode-host``, host.py), and
``foxnode devnet`` packing nodes into such processes: every node its own
identity, data directory, port and store; a dead process takes only its
nodes down, and the others' peers notice.

Every address used here is on 127.0.0.1.
"""

from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.python.usage import UsageError

from foxnode import client, devnet, host, launch
from foxnode.testing import LOOPBACK, sleep, wait_for

HOST_DEFAULTS = {"nodes": 1, "first": 0, "base-port": 9000, "dir": "devnet", "bootstrap": "first"}


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are free now."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        if not any(devnet.port_in_use(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def parse(*args: str) -> host.Options:
    options = host.Options()
    options.parseOptions(list(args))
    return options


def test_the_host_options_and_their_defaults():
    options = parse()
    assert {k: options[k] for k in HOST_DEFAULTS} == HOST_DEFAULTS
    assert options.node_args == []
    assert set(options) - {"help", "version"} == set(HOST_DEFAULTS)


def test_each_node_is_given_its_own_port_directory_and_first_peer(tmp_path):
    options = parse("--nodes", "4", "--first", "10", "--base-port", "20000", "--dir", str(tmp_path),
                    "--bootstrap", "tree", "--", "--network", "lab", "--max-outbound", "3")
    assert list(options.indexes()) == [10, 11, 12, 13]
    node = options.node_options(12)
    assert node["listen"] == f"tcp:20012:interface={LOOPBACK}"
    assert node["data-dir"] == str(tmp_path / "node-12")
    assert node["peers-file"] == str(tmp_path / "node-12" / "peers.json")
    assert node["network"] == "lab" and node["max-outbound"] == 3
    assert node["peer"] == [f"ws://{LOOPBACK}:20005/ws"]  # (12-1)//2
    assert [host.bootstrap_of(i, "first") for i in (0, 1, 7)] == [None, 0, 0]
    assert [host.bootstrap_of(i, "tree") for i in (0, 1, 2, 7)] == [None, 0, 0, 3]
    assert host.bootstrap_of(7, "none") is None


@pytest.mark.parametrize("args, named", [
    (["--nodes", "0"], "--nodes 0"),
    (["--nodes", "1001"], "--nodes 1001"),
    (["--base-port", "65535", "--nodes", "2"], "past 65535"),
    (["--bootstrap", "ring"], "--bootstrap ring"),
    (["--dir", ""], "--dir"),
    (["--", "--port", "9000"], "--port"),
    (["--", "--listen=tcp:9000"], "--listen"),
    (["--", "--data-dir", "x"], "--data-dir"),
    (["--", "--peers-file", "x"], "--peers-file"),
    (["--", "--advertise", "ws://127.0.0.1:9/ws"], "--advertise"),
    (["--", "--max-outbound", "-1"], "node option --max-outbound -1"),
    (["--", "--bogus"], "bogus"),
])
def test_bad_host_options_are_refused_naming_them(args, named):
    with pytest.raises(UsageError, match=named.replace("(", r"\(")):
        parse(*args)


@pytest_twisted.ensureDeferred
async def test_a_host_runs_real_nodes_each_with_its_own_identity_and_files(reactor, tmp_path):
    base = free_ports(3)
    options = parse("--nodes", "3", "--base-port", str(base), "--dir", str(tmp_path),
                    "--bootstrap", "tree", "--", "--network", "hosted")
    service = host.makeService(options, reactor)
    service.startService()
    try:
        ids = []
        for i in range(3):
            conn = await client.connect(reactor, f"ws://{LOOPBACK}:{base + i}/ws", timeout=5)
            try:
                info = (await conn.request("info")).response
            finally:
                conn.close()
            assert info["network"] == "hosted"
            ids.append(info["node_id"])
            assert (tmp_path / f"node-{i}" / "node.key").is_file()
        assert len(set(ids)) == 3
        nodes = [s.node for s in service.nodes]
        await wait_for(reactor, lambda: all(n.live_peers() for n in nodes), timeout=20,
                       what="every node a live peer")
    finally:
        await service.stopService()
    # Every node folded its own store and let go of its locks.
    for i in range(3):
        assert (tmp_path / f"node-{i}" / "peers.json").is_file()
    again = host.makeService(parse("--nodes", "3", "--base-port", str(base), "--dir", str(tmp_path)), reactor)
    again.startService()
    await again.stopService()


def test_the_devnet_packs_nodes_into_processes():
    assert devnet.per_process(30, None) == 1
    assert devnet.per_process(31, None) == devnet.PER_PROCESS
    assert devnet.per_process(1000, 20) == 20
    net = devnet.Devnet(None, Path("/nonexistent"), 45, 20000, "x", per_process=20)
    assert [(h.first, h.last) for h in net.hosts] == [(0, 19), (20, 39), (40, 44)]
    assert net.nodes[44].host is net.hosts[2] and net.nodes[44].log_path == net.hosts[2].log_path
    assert devnet.Devnet(None, Path("/nonexistent"), 3, 20000, "x").hosts == []
    # Hosts start in waves: each once the hosts of its nodes' first peers serve.
    big = devnet.Devnet(None, Path("/nonexistent"), 1000, 9000, "x", per_process=50)
    assert [sorted(big._needs(h)) for h in big.hosts[:5]] == [[], [0], [0, 1], [1], [1, 2]]
    assert all(max(big._needs(h), default=-1) < h.index for h in big.hosts)
    assert devnet.start_timeout(None, 1000) == 100 and devnet.start_timeout(None, 40) == 30
    assert devnet.start_timeout(5, 1000) == 5


async def _live_peers(reactor, net: devnet.Devnet, node: devnet.DevNode) -> list[int]:
    """The ports of ``node``'s live peer connections."""
    info = await net._info(node)
    assert info is not None, f"{node.name} does not answer"
    return [int(c["addr"].rsplit(":", 1)[1].split("/")[0]) for c in info["connected"]]


@pytest_twisted.ensureDeferred
async def test_a_devnet_of_40_nodes_in_2_processes_and_one_process_dying(reactor, tmp_path):
    out = io.StringIO()
    base = free_ports(40)
    net = devnet.Devnet(reactor, tmp_path / "devnet", 40, base, "packed", out=out, per_process=20)
    net.prepare()
    try:
        net.start()
        await net.wait_up(60)
        net.show_addresses()
        await net.wait_connected(60)
        text = out.getvalue()
        assert "all 40 nodes connected" in text, text
        assert "2 process(es) of up to 20 nodes" in text
        assert all(n.connected for n in net.nodes)
        assert len({n.node_id for n in net.nodes}) == 40
        assert (tmp_path / "devnet" / "nodes.json").is_file()
        # Every node's own data directory, key and peers file.
        for n in net.nodes:
            assert (n.directory / "node.key").is_file()

        # The second host dies: its nodes only; the others notice.
        second = net.hosts[1]
        second.process.kill()
        await second.process.when_ended()
        net._exited(during_start=False)
        assert "host-1 (node-20..node-39) was killed by SIGKILL (the others keep running)" in out.getvalue()
        dead = set(range(base + 20, base + 40))
        assert all(not n.running() for n in net.nodes[20:]) and all(n.running() for n in net.nodes[:20])

        async def nobody_sees_the_dead() -> bool:
            seen = await DeferredList([ensureDeferred(_live_peers(reactor, net, n)) for n in net.nodes[:20]])
            return all(ok and not (set(ports) & dead) for ok, ports in seen)

        deadline = reactor.seconds() + 30
        while not await nobody_sees_the_dead():
            assert reactor.seconds() < deadline, "a node still lists a peer of the dead process"
            await sleep(reactor, 0.5)
        for n in net.nodes[:20]:
            assert n.running() and await _live_peers(reactor, net, n), f"{n.name} lost every peer"
    finally:
        await net.stop(10)
    assert all(not p.running for _, p in net.processes())
    assert out.getvalue().splitlines()[-1] == f"devnet stopped; data kept in {tmp_path / 'devnet'}"


def test_foxnode_devnet_packs_above_30_nodes_and_emulates_links(tmp_path):
    """The command as a user types it: 31 nodes go into one host process
    by default, every node gets a peer, --latency reaches every node."""
    import re
    import subprocess
    import sys
    import urllib.request

    import orjson

    base = free_ports(31)
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("foxnode")), "devnet", "--nodes", "31", "--base-port", str(base),
         "--dir", str(tmp_path / "devnet"), "--latency", "20ms", "--connect-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(("all 31 nodes connected", "not connected after")):
                break
        text = "\n".join(lines)
        assert "all 31 nodes connected" in text, text
        assert "1 process(es) of up to 50 nodes" in text
        assert "links: --link-latency 20ms" in text
        assert re.search(r"^host-0: starting node-0\.\.node-30 \(pid \d+\)", text, re.M), text
        with urllib.request.urlopen(f"http://{LOOPBACK}:{base + 30}/healthz", timeout=5) as r:
            assert r.status == 200
        listing = orjson.loads((tmp_path / "devnet" / "nodes.json").read_bytes())
        assert len(listing) == 31 and {n["process"] for n in listing} == {"host-0"}
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
        assert process.returncode == 0, rest
        assert rest.rstrip().endswith(f"devnet stopped; data kept in {tmp_path / 'devnet'}")
    finally:
        if process.poll() is None:
            # SIGTERM, not SIGKILL: the devnet stops its nodes (in sessions of their own) first.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
