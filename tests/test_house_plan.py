"""The house plan holds: the parts do not wire themselves, node logic reads
no clock of its own, and every default is written once."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from twisted.internet.task import Clock

import foxnode
from foxnode import config, identity, service, tap
from foxnode.gossip import Gossip
from foxnode.metrics import NodeMetrics
from foxnode.node import Node
from foxnode.peers import PeerManager
from foxnode.store import PeerStore

PACKAGE = Path(foxnode.__file__).parent
#: The modules of node logic: they take the time from the reactor handed in.
LOGIC = ["node", "peers", "dialing", "handshake", "gossip", "store", "peerindex", "storewriter",
         "storefiles", "web", "limits", "service", "protocol", "frames",
         "codec", "identity", "address", "metrics", "keys", "crypto", "filters",
         "msgstore", "history", "catchup", "plugin", "pluginhost", "plugins/time",
         "plugins/chain/__init__", "plugins/chain/block", "plugins/chain/ledger", "links"]
WALL_CLOCK = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow"),
              ("date", "today"), ("time", "localtime"), ("time", "gmtime")}


def calls_in(module: str) -> list[tuple[str, str, int]]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            out.append((name, node.func.attr, node.lineno))
    return out


@pytest.mark.parametrize("module", LOGIC)
def test_node_logic_never_reads_the_wall_clock(module):
    found = []
    for owner, attr, line in calls_in(module):
        if (owner, attr) not in WALL_CLOCK:
            continue
        if (owner, attr) == ("time", "localtime") and module == "plugins/time":
            continue  # formats the reactor's time as a zone name (the time op); reads no clock
        found.append(f"{module}.py:{line}: {owner}.{attr}()")
    assert not found, found


@pytest.mark.parametrize("module", LOGIC)
def test_node_logic_never_takes_the_clock_another_way(module):
    """Nor by importing a clock function by name, nor by importing the
    global reactor (whose ``seconds()`` is the wall clock): the reactor the
    part was given is its only clock."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module in ("time", "datetime") and names & {"time", "time_ns", "localtime", "gmtime",
                                                                 "datetime", "date"}:
                found.append(f"{module}.py:{node.lineno}: from {node.module} import {sorted(names)}")
            if node.module == "twisted.internet" and "reactor" in names:
                found.append(f"{module}.py:{node.lineno}: imports the global reactor")
        elif isinstance(node, ast.Import) and any(a.name == "twisted.internet.reactor" for a in node.names):
            found.append(f"{module}.py:{node.lineno}: imports the global reactor")
    assert not found, found


def test_the_parts_do_not_wire_themselves(tmp_path):
    clock = Clock()
    store = PeerStore(clock, tmp_path / "peers.json")
    node = Node(clock, config.NodeConfig(), identity.Identity.generate(), store)
    ops, events = sorted(node.op_names()), dict(node._events)
    peers = PeerManager(node)
    gossip = Gossip(clock, node.identity, NodeMetrics())
    # Made, but not connected: only service.build connects them.
    # (the lab's time is a plugin's, which build serves: plugins/time.py)
    assert sorted(node.op_names()) == ops == ["info", "peers", "register"]
    assert node._events == events == {}
    assert node.peers is None and node.gossip is None and peers.listeners == []
    # build does, explicitly.
    built = service.build(clock, service.Configs(), store, node.identity, endpoint=None)
    assert built.node.peers.listeners == [built.node.gossip]
    assert {"hello", "exchange", "publish", "subscribe", "unsubscribe", "time"} <= set(built.node.op_names())
    assert built.node.plugins == ["time"] and built.node.gossip.screen is None
    assert set(built.node._events) == set(gossip.events)


def test_the_service_tree_holds_every_timer(tmp_path):
    from twisted.application.internet import TimerService

    clock = Clock()
    store = PeerStore(clock, tmp_path / "peers.json")
    built = service.build(clock, service.Configs(), store, identity.Identity.generate(), endpoint=None)

    def walk(svc):
        yield svc
        for child in getattr(svc, "services", []):
            yield from walk(child)

    timers = {t.call[0].__name__ for t in walk(built) if isinstance(t, TimerService)}
    assert {"dial_round", "exchange_round", "sweep", "flush"} <= timers
    assert all(t.clock is clock for t in walk(built) if isinstance(t, TimerService))


def test_the_stores_lazy_writes_are_the_service_trees(tmp_path):
    from foxnode.store import EXCHANGE, load
    from foxnode.testing import InlineWriter

    clock = Clock()
    path = tmp_path / "peers.json"
    store = PeerStore(clock, path, runner=InlineWriter())
    store.add(["ws://127.3.0.1:9/ws"], EXCHANGE, durable=False)
    # The store alone schedules nothing ...
    assert clock.getDelayedCalls() == []
    assert load(path) == []
    # ... the node's StoreService writes it, on the clock it was given.
    service.StoreService(store, clock).startService()
    clock.advance(store.flush_delay)
    assert [r.addr for r in load(path)] == ["ws://127.3.0.1:9/ws"]


def test_every_option_default_is_the_configs_own():
    options = tap.Options()
    options.parseOptions([])
    made = options.configs()
    assert made.node == config.NodeConfig()
    assert made.peers == config.PeerConfig()
    assert made.gossip == config.GossipConfig()
    assert made.web == config.WebConfig()
    assert made.store == config.StoreConfig()
    assert made.keys == config.KeyConfig()


def test_no_config_class_is_defined_outside_config_py():
    import foxnode.gossip
    import foxnode.node
    import foxnode.peers
    import foxnode.web

    for module in (foxnode.node, foxnode.peers, foxnode.gossip, foxnode.web):
        for name, value in vars(module).items():
            if name.endswith("Config") and inspect.isclass(value):
                assert value.__module__ == "foxnode.config", f"{module.__name__}.{name}"


def test_one_ipv6_64_is_one_client_for_websocket_connections_too(tmp_path):
    """The HTTP gate counts an IPv6 client by its /64; so does the
    WebSocket admission: a host cycling through its /64 gets no more."""
    from foxnode.testing import FakeConnection
    from foxnode.web import HTTPGate

    clock = Clock()
    # Nothing trusted: loopback is held to the cap like anyone.
    node = Node(clock, config.NodeConfig(max_per_ip=3, trusted=()), identity.Identity.generate(),
                PeerStore(clock, tmp_path / "peers.json"))
    hosts = [f"2001:db8:1:2::{i:x}" for i in range(1, 6)]
    verdicts = [node.admit(FakeConnection(remote_host=h)) for h in hosts]
    assert verdicts[:3] == [None, None, None]
    assert all(v and "2001:db8:1:2::/64" in v for v in verdicts[3:]), verdicts
    # Another /64 is another client ...
    assert node.admit(FakeConnection(remote_host="2001:db8:1:3::1")) is None
    # ... and an IPv4-mapped address is its IPv4 address.
    for _ in range(3):
        assert node.admit(FakeConnection(remote_host="::ffff:127.9.0.1")) is None
    assert "too many connections" in node.admit(FakeConnection(remote_host="127.9.0.1"))
    assert HTTPGate.client_key("2001:db8:1:2::99") == "2001:db8:1:2::/64"
