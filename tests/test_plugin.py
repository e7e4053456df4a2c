"""The twistd plugin as a user meets it: ``twistd foxnode --help`` from
outside the source tree, a real ``twistd -n foxnode`` process stopped by
SIGTERM, the parsed ``tap.Options``, and the node's identity.

Every address used here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError

from foxnode import client, launch, tap
from foxnode.identity import is_node_id
from foxnode.testing import LOOPBACK, NodeProcess, free_port, running_node, wait_until_serving

TWISTD = str(Path(sys.executable).with_name("twistd"))
SOURCE_TREE = Path(__file__).resolve().parent.parent

#: Every option of PROTOCOL.md's "Running" table: (long, short).
PROTOCOL_OPTIONS = [
    ("--port", "-p"),
    ("--listen", None),
    ("--peers-file", None),
    ("--data-dir", None),
    ("--peer", None),
    ("--advertise", None),
    ("--network", None),
    ("--debug", None),
]

DEFAULTS = {
    "port": 9000,
    "listen": "tcp:9000",
    "peers-file": "peers.json",
    "data-dir": ".",
    "peer": [],
    "static-peer": [],
    "trusted-peer": [],
    "advertise": None,
    "network": "foxchain",
    "debug": 0,
    # beyond PROTOCOL.md
    "max-register-addrs": 100,
    "max-message-size": 1 << 20,
    "max-depth": 64,
    "rate": 50.0,
    "burst": 100.0,
    "peer-rate": 1000.0,
    "peer-burst": 5000.0,
    "max-in-flight": 64,
    "max-connections": 1000,
    "max-per-ip": 32,
    "ping-interval": 30,
    "ping-timeout": 15,
    "handshake-timeout": 10.0,
    "max-peers": 10_000,
    "max-outbound": 8,
    "max-inbound": 24,
    "max-dialing": 4,
    "dial-rate": 4.0,
    "exchange-interval": 30.0,
    "max-backoff": 60.0,
    "max-payload": 65536,
    "max-ttl": 3600,
    "min-pow": 0.0,
    "send-queue": 1 << 20,
    "max-store-bytes": 256 << 20,
    "cafile": None,
    "link-latency": None,
    "link-loss": None,
    "link-bandwidth": None,
    "link-rule": [],
    "trusted": [],
    "allowed-origin": [],
    "allowed-host": [],
    "max-http": 128,
    "max-http-per-ip": 16,
    "frames": "own",
    "plugin": [],
}


def _outside_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def run_twistd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    assert not Path(cwd).resolve().is_relative_to(SOURCE_TREE)
    return subprocess.run([TWISTD, *args], cwd=cwd, env=_outside_env(),
                          capture_output=True, text=True, timeout=60)


# -- the plugin, as installed --------------------------------------------------------

@pytest.mark.parametrize("args", [["foxnode", "--help"], ["-n", "foxnode", "--help"]],
                         ids=["twistd-foxnode-help", "twistd-n-foxnode-help"])
def test_help_lists_every_option_of_the_protocol(tmp_path, args):
    result = run_twistd(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for long, short in PROTOCOL_OPTIONS:
        assert re.search(rf"(^|[\s,]){re.escape(long)}([=\s]|$)", out, re.MULTILINE), f"{long} missing:\n{out}"
        if short:
            assert re.search(rf"{re.escape(short)}, {re.escape(long)}\b", out), f"{short} missing:\n{out}"
    # the defaults of PROTOCOL.md are shown
    for default in ("9000", "peers.json", "foxchain"):
        assert f"[default: {default}]" in re.sub(r"\s+", " ", out), f"default {default} not shown:\n{out}"
    assert "repeatable" in out.lower()


def test_twistd_lists_the_plugin_from_outside_the_tree(tmp_path):
    result = run_twistd(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+foxnode\s", result.stdout, re.MULTILINE), result.stdout


def _twistd_node(directory: Path, *extra: str) -> NodeProcess:
    """``twistd -n foxnode`` started from ``directory`` (outside the tree)."""
    from twisted.internet import reactor

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "twistd.log"
    # A user's own command line (relative paths), through the launcher.
    process = launch.launch(reactor, [TWISTD, "-n", "--pidfile=", "foxnode",
                                      "--listen", f"tcp:{port}:interface={LOOPBACK}",
                                      "--peers-file", "peers.json", "--data-dir", ".", *extra],
                            log_path=log_path, port=port, directory=directory,
                            env=launch.node_env(_outside_env()))
    node = NodeProcess(process, port, directory, log_path)
    wait_until_serving(node, timeout=30)
    return node


def _get_json(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers.get("content-type", ""), orjson.loads(r.read())


def _stop(node: NodeProcess) -> int:
    node.process.send_signal(signal.SIGTERM)
    try:
        return node.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        node.kill()
        raise AssertionError(f"foxnode did not stop on SIGTERM:\n{node.log()}") from None


@pytest_twisted.ensureDeferred
async def test_twistd_serves_and_stops_on_sigterm(reactor, tmp_path):
    directory = tmp_path / "node"
    node = await deferToThread(_twistd_node, directory)
    proto = None
    try:
        status, ctype, health = await deferToThread(_get_json, f"{node.http}/healthz")
        assert status == 200 and ctype.startswith("application/json")
        assert health["status"] == "ok" and is_node_id(health["node_id"])

        # A client is connected and has registered when the signal comes.
        proto = await client.connect(reactor, node.url)
        reply = await proto.request("register", {"addr": "ws://127.7.0.1:9/ws"})
        assert reply.status == 202
        closed = proto.when_closed()
        code = await deferToThread(_stop, node)
        was_open, close_code, _ = await closed
    finally:
        if proto is not None:
            proto.close()
        if node.process.poll() is None:
            node.kill()
    # Stock twistd ends an orderly SIGTERM shutdown by re-raising the signal
    # (exit status 143 in a shell), which systemd counts as a clean stop.
    assert code in (0, -signal.SIGTERM), node.log()
    log = node.log()
    assert "Server Shut Down." in log, log
    assert "Traceback" not in log, log
    # The client was told with a close frame (1006 means the TCP just died).
    assert was_open and close_code is not None and close_code != 1006, close_code
    # The peers file is where --peers-file said, relative to the cwd.
    assert "ws://127.7.0.1:9/ws" in (directory / "peers.json").read_text()
    assert stat.S_IMODE((directory / "node.key").stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_node_id_is_stable_across_twistd_restarts(reactor, tmp_path):
    directory = tmp_path / "node"
    ids = []
    for _ in range(2):
        node = await deferToThread(_twistd_node, directory)
        try:
            _, _, health = await deferToThread(_get_json, f"{node.http}/healthz")
            info = await client.call(reactor, node.url, "info")
        finally:
            await deferToThread(_stop, node)
        assert health["node_id"] == info.response["node_id"]
        ids.append(health["node_id"])
    assert ids[0] == ids[1]
    assert is_node_id(ids[0])


# -- Options ------------------------------------------------------------------------

def parse(*args: str) -> dict:
    options = tap.Options()
    options.parseOptions(list(args))
    return dict(options)


def test_defaults():
    assert parse() == DEFAULTS


def test_every_option_of_the_protocol_parses():
    assert parse(
        "--port", "9100",
        "--peers-file", "/var/lib/foxnode/peers.json",
        "--data-dir", "/var/lib/foxnode",
        "--peer", "ws://127.0.0.2:9000/ws",
        "--peer", "wss://localhost:9443/ws",
        "--advertise", "wss://localhost:9443/ws",
        "--network", "labnet",
        "--debug",
    ) == {
        **DEFAULTS,
        "port": 9100,
        "listen": "tcp:9100",
        "peers-file": "/var/lib/foxnode/peers.json",
        "data-dir": "/var/lib/foxnode",
        "peer": ["ws://127.0.0.2:9000/ws", "wss://localhost:9443/ws"],
        "advertise": "wss://localhost:9443/ws",
        "network": "labnet",
        "debug": 1,
    }


def test_static_and_trusted_peers_parse():
    node = "AB" * 32
    options = tap.Options()
    options.parseOptions(["--static-peer", "ws://127.0.0.2:9000/ws", "--static-peer",
                          "ws://127.0.0.3:9000/ws#" + "cd" * 32, "--trusted-peer", node])
    assert options["static-peer"] == ["ws://127.0.0.2:9000/ws", "ws://127.0.0.3:9000/ws#" + "cd" * 32]
    assert options["trusted-peer"] == [node.lower()]
    peers = options.configs().peers
    assert peers.static == tuple(options["static-peer"])
    assert peers.trusted_peers == {node.lower()}


def test_listen_endpoint():
    assert parse("--listen", "tcp:9000:interface=127.0.0.1", "-p", "9001") == {
        **DEFAULTS, "port": 9001, "listen": "tcp:9000:interface=127.0.0.1"}
    assert parse("--listen", "systemd:domain=INET:index=0")["listen"] == "systemd:domain=INET:index=0"


@pytest.mark.parametrize("args", [["--port", "9000"], ["-p", "9000"], ["--port=9000"], []])
def test_bare_port_becomes_a_tcp_endpoint(args):
    assert parse(*args)["listen"] == "tcp:9000"
    assert parse(*args)["port"] == 9000


def test_port_zero_and_others():
    assert parse("-p", "0")["listen"] == "tcp:0"
    assert parse("-p", "3000")["listen"] == "tcp:3000"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/ws", "127.0.0.1:9000", "ws://", "ws://127.0.0.1:99999/ws",
    "ws://127.0.0.1:9000/ws#frag", "ws://user@127.0.0.1:9000/ws", "ws://127.0.0.1 :9000/ws", "",
])
@pytest.mark.parametrize("option", ["--peer", "--advertise"])
def test_bad_peer_or_advertise_is_a_usage_error(option, url):
    with pytest.raises(UsageError) as info:
        parse(option, url)
    assert option in str(info.value)


@pytest.mark.parametrize("args", [["--port", "nine"], ["--port", "65536"], ["--port", "-1"],
                                  ["--network", ""], ["--bogus"]])
def test_other_bad_options_are_usage_errors(args):
    with pytest.raises(UsageError):
        parse(*args)


# -- identity -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_node_id_is_stable_across_restarts_and_key_is_private(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        first = node.node.node_id
        info = await client.call(reactor, node.url, "info")
        assert info.response["node_id"] == first
    key = node_dir / "node.key"
    assert key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    original = key.read_bytes()

    async with running_node(reactor, node_dir) as node:
        assert node.node.node_id == first
        info = await client.call(reactor, node.url, "info")
        assert info.response["node_id"] == first
    assert key.read_bytes() == original
    assert is_node_id(first)


@pytest_twisted.ensureDeferred
async def test_different_data_dirs_have_different_ids(reactor, tmp_path):
    async with running_node(reactor, tmp_path / "a") as a, running_node(reactor, tmp_path / "b") as b:
        assert a.node.node_id != b.node.node_id
