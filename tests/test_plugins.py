"""Plugins without sockets (PROTOCOL.md "Plugins"): loading them, their
ops (sync, Deferred, ``async def``; OpError, a raise, what is not JSON, a
slow one), the ctx they get, and their validators, on local publishes and
on envelopes received from a peer, nodes on a MemoryNetwork."""

from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from foxnode import codec, pluginhost, service
from foxnode.config import PeerConfig
from foxnode.plugin import Ctx, OpError, op, validator
from foxnode.pluginhost import PluginError
from foxnode.testing import FakeConnection, MemoryNetwork, memory_node


def reply_of(result, reactor):
    if isinstance(result, codec.Reply):
        return result
    got = []
    result.addBoth(got.append)
    if not got:
        reactor.advance(0)  # a publish answers once its turn's commit (the message store's) is done
    assert got, "the op's Deferred has not fired"
    return got[0]


def ask(node_service, op_name, args=None, conn=None):
    conn = conn or FakeConnection()
    conn.trusted = node_service.node.is_trusted(conn)
    return reply_of(node_service.node.handle_request(conn, codec.Request(op_name, args)), node_service.reactor)


def wire(reply):
    """The reply as a client reads it."""
    return codec.loads(codec.encode_reply(reply))


@pytest.fixture
def logged():
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def plugin_file(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


OPS = """
    from twisted.internet.defer import succeed
    from foxnode.plugin import op, OpError

    @op("greet")
    def greet(ctx, args):
        if "name" not in args:
            raise OpError(400, 'Operation "greet" requires "name".')
        return {"greeting": "hi " + args["name"]}

    @op("later")
    def later(ctx, args):
        return succeed({"later": True})

    @op("coro")
    async def coro(ctx, args):
        reply = await succeed(41)
        return {"answer": reply + 1}

    @op("refused_later")
    async def refused_later(ctx, args):
        raise OpError(409, "not now")

    @op("boom")
    def boom(ctx, args):
        return 1 / 0

    @op("boom_later")
    async def boom_later(ctx, args):
        raise KeyError("gone")

    @op("not_json")
    def not_json(ctx, args):
        return {"set": {1, 2}}

    @op("slow")
    def slow(ctx, args):
        ctx.reactor.advance(2)  # the node's clock moves while the op holds the reactor
        return {}

    @op("slow_later")
    async def slow_later(ctx, args):
        await succeed(None)
        ctx.reactor.advance(3)  # after an await: still the reactor's time
        return {}

    @op("exits")
    def exits(ctx, args):
        raise SystemExit(3)

    @op("whoami")
    def whoami(ctx, args):
        return {"node_id": ctx.node_id, "now": ctx.now(), "peers": ctx.peers(), "name": ctx.name}

    @op("keep")
    def keep(ctx, args):
        path = ctx.data_dir
        with open(path + "/kept.txt", "w") as f:
            f.write("x")
        return {"dir": path}

    @op("announce")
    async def announce(ctx, args):
        return await ctx.publish("news", {"n": args["n"]})

    @op("bad_publish")
    async def bad_publish(ctx, args):
        try:
            await ctx.publish("", 1)
        except OpError as e:
            return {"status": e.status, "error": e.message}

    @op("past")
    async def past(ctx, args):
        try:
            return await ctx.history(topics=["news"])
        except OpError as e:
            return {"status": e.status, "error": e.message}
"""


@pytest.fixture
def net():
    return MemoryNetwork()


@pytest.fixture
def node(net, tmp_path):
    path = plugin_file(tmp_path, "demo", OPS)
    built = memory_node(net, tmp_path / "node", plugins=[path])
    yield built
    built.stopService()


# -- loading -------------------------------------------------------------------

def test_foxnode_own_time_loads_by_default_and_once(tmp_path):
    ep = SimpleNamespace(name="time", value="foxnode.plugins.time", module="foxnode.plugins.time",
                         load=lambda: pytest.fail("loaded twice"))
    plugins = pluginhost.load(["foxnode.plugins.time"], entry_points=[ep])
    assert [p.name for p in plugins] == ["time"]
    assert [m.name for m, _ in plugins[0].ops] == ["time"]


def test_a_file_and_a_module_load_named_for_them(tmp_path):
    path = plugin_file(tmp_path, "greeter", OPS)
    names = [p.name for p in pluginhost.load([path, "foxnode.plugins.time"])]
    assert names == ["time", "greeter"]


def test_an_entry_point_loads(tmp_path, monkeypatch):
    path = plugin_file(tmp_path, "installed_demo", 'from foxnode.plugin import op\n'
                                                   '@op("installed")\ndef f(ctx, args):\n    return 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    ep = SimpleNamespace(name="demo", value="installed_demo", module="installed_demo",
                         load=lambda: importlib.import_module("installed_demo"))
    plugins = pluginhost.load([], entry_points=[ep])
    assert [p.name for p in plugins] == ["time", "demo"]
    assert os.path.exists(path)


@pytest.mark.parametrize("source, says", [
    ("import no_such_module_of_anyones\n",
     "--plugin {path}: cannot import it: ModuleNotFoundError: No module named 'no_such_module_of_anyones' "
     "(bad.py, line 1)"),
    ("def f(:\n", "--plugin {path}: cannot import it: SyntaxError: "),
    ("x = 1\n\nraise SystemExit('no')\n", "--plugin {path}: cannot import it: SystemExit: no (bad.py, line 3)"),
    ("x = 1\n", "--plugin {path}: marks no op and no validator"),
    ('from foxnode.plugin import op\n@op("time")\ndef t(ctx, args):\n    return 1\n',
     '--plugin {path}: op "time" is served by plugin "time" already'),
    ('from foxnode.plugin import op\n@op("a")\ndef f(ctx, args):\n    return 1\n'
     '@op("a")\ndef g(ctx, args):\n    return 2\n', '--plugin {path}: serves op "a" twice'),
])
def test_a_plugin_that_cannot_load_is_one_line(tmp_path, source, says):
    path = plugin_file(tmp_path, "bad", source)
    with pytest.raises(PluginError) as caught:
        pluginhost.load([path])
    message = str(caught.value)
    assert message.startswith(says.format(path=path)), message
    assert "\n" not in message


@pytest.mark.parametrize("spec, says", [
    ("", "give a dotted module name"), ("a b", "give a dotted module name"), ("1x", "give a dotted"),
    ("missing.py", "no such file"), ("some/dir", "give a dotted module name or a path to a .py file"),
])
def test_a_plugin_spec_is_checked_before_import(spec, says):
    assert says in pluginhost.check_spec(spec)


def test_two_plugins_of_one_name_are_refused(tmp_path):
    one = plugin_file(tmp_path, "same", 'from foxnode.plugin import op\n@op("a")\ndef f(ctx, a):\n    return 1\n')
    (tmp_path / "other").mkdir()
    two = plugin_file(tmp_path / "other", "same", 'from foxnode.plugin import op\n@op("b")\ndef f(ctx, a):\n'
                                                  '    return 1\n')
    with pytest.raises(PluginError, match='another plugin is named "same"'):
        pluginhost.load([one, two])


def test_an_op_the_node_serves_itself_is_refused(net, tmp_path):
    path = plugin_file(tmp_path, "takeover", 'from foxnode.plugin import op\n@op("publish")\n'
                                             'def f(ctx, a):\n    return 1\n')
    with pytest.raises(PluginError, match=f'--plugin {path}: op "publish" is one of the node\'s own'):
        memory_node(net, tmp_path / "n", plugins=[path])


def test_decorators_check_their_arguments():
    with pytest.raises(ValueError):
        op("")
    with pytest.raises(ValueError):
        validator("")
    with pytest.raises(ValueError):
        OpError(200, "fine")


# -- ops -------------------------------------------------------------------------

def test_info_lists_the_plugins(node):
    assert ask(node, "info").response["plugins"] == ["time", "demo"]


def test_an_op_answers_200_with_what_it_returns(node):
    assert wire(ask(node, "greet", {"name": "fox"})) == {
        "status": 200, "error": "OK", "response": {"greeting": "hi fox"}}


def test_op_error_is_the_reply(node):
    assert wire(ask(node, "greet", {})) == {
        "status": 400, "error": 'Operation "greet" requires "name".', "response": None}


def test_args_that_are_not_an_object_are_refused_and_none_is_empty(node):
    assert ask(node, "greet", [1]).status == 400
    assert 'Operation "greet" has invalid "args"' in ask(node, "greet", "x").error
    assert ask(node, "greet", None).error == 'Operation "greet" requires "name".'


def test_deferred_and_async_ops(node):
    assert wire(ask(node, "later"))["response"] == {"later": True}
    assert wire(ask(node, "coro"))["response"] == {"answer": 42}
    assert wire(ask(node, "refused_later")) == {"status": 409, "error": "not now", "response": None}


@pytest.mark.parametrize("name, why", [("boom", "raised ZeroDivisionError: division by zero (demo.py, line "),
                                       ("boom_later", "raised KeyError: 'gone' (demo.py, line "),
                                       ("not_json", "returned what is not JSON TypeError: "),
                                       ("exits", "raised SystemExit: 3 (demo.py, line ")])
def test_a_failing_op_is_a_500_naming_the_plugin_and_a_log_line(node, logged, name, why):
    reply = wire(ask(node, name))
    assert reply == {"status": 500, "error": f'Plugin "demo" failed in operation "{name}"; '
                                             "the node's log says why.", "response": None}
    assert "Traceback" not in str(reply)
    line, = [x for x in logged if x.startswith(f"plugin demo: op {name}")]
    assert why in line, line
    assert "\n" not in line
    # The node goes on.
    assert ask(node, "greet", {"name": "again"}).status == 200
    assert node.node.metrics.plugin_errors.labels("demo", "op")._value.get() == 1


def test_an_op_holding_the_reactor_is_named_in_a_warning(node, logged):
    assert ask(node, "slow").status == 200
    line, = [x for x in logged if "held the reactor" in x]
    assert line.startswith("plugin demo: op slow held the reactor for 2.00 s (more than 0.5 s)"), line
    assert ask(node, "slow_later").status == 200
    assert any(x.startswith("plugin demo: op slow_later held the reactor for 3.00 s") for x in logged), logged


def test_the_ctx_gives_the_node_id_the_clock_the_peers_and_a_directory(node, tmp_path):
    got = wire(ask(node, "whoami"))["response"]
    assert got == {"node_id": node.node.node_id, "now": node.reactor.seconds(), "peers": [], "name": "demo"}
    kept = wire(ask(node, "keep"))["response"]["dir"]
    assert kept == str(tmp_path / "node" / "plugins" / "demo")
    assert (tmp_path / "node" / "plugins" / "demo" / "kept.txt").read_text() == "x"


def test_the_ctx_holds_nothing_else():
    ctx = Ctx("p", "ab" * 32, None, "/nonexistent", lambda op, args: Deferred(), lambda: [])
    public = {n for n in dir(ctx) if not n.startswith("_")}
    assert public == {"name", "node_id", "reactor", "log", "data_dir", "now", "peers", "publish", "history",
                      "ask"}
    with pytest.raises(AttributeError):
        ctx.node = object()


def test_ctx_publish_publishes_and_refusals_are_op_errors(net, node):
    sub = FakeConnection()
    assert ask(node, "subscribe", {"topics": ["news"]}, sub).status == 200
    reply = wire(ask(node, "announce", {"n": 7}))
    assert reply["status"] == 200 and set(reply["response"]) == {"id", "pow"}
    net.advance(0.1)
    assert [e.body["payload"] for e in sub.events() if isinstance(e, codec.Event)] == [{"n": 7}]
    refused = wire(ask(node, "bad_publish"))["response"]
    assert refused["status"] == 400 and '"topic"' in refused["error"]


def test_ctx_history_asks_the_nodes_history(net, node):
    assert wire(ask(node, "announce", {"n": 1}))["status"] == 200
    net.advance(0.1)
    got = wire(ask(node, "past"))["response"]
    assert [m["payload"] for m in got["messages"]] == [{"n": 1}]


def test_ctx_history_is_a_404_where_the_node_keeps_none(tmp_path):
    from twisted.internet.task import Clock

    from foxnode import identity
    from foxnode.config import PluginConfig
    from foxnode.store import PeerStore

    clock = Clock()
    path = plugin_file(tmp_path, "demo", OPS)
    built = service.build(clock, service.Configs(plugins=PluginConfig(modules=(path,), data_dir=str(tmp_path))),
                          PeerStore(clock, tmp_path / "peers.json"), identity.Identity.generate(), endpoint=None)
    got = wire(ask(built, "past"))["response"]
    assert got == {"status": 404, "error": 'Operation "history" is not supported.'}


def test_time_is_the_seeds_reply(node):
    node.reactor.advance(1_700_000_000.25)
    frame = codec.encode_reply(ask(node, "time", [1, "ignored"]))
    zone = __import__("time").strftime("%Z", __import__("time").localtime(1_700_000_000.25))
    assert frame == b'{"status":200,"error":"OK","response":{"time":1700000000.25,"time_zone":"' + \
        zone.encode() + b'"}}'


# -- validators --------------------------------------------------------------------

VALIDATORS = """
    from foxnode.plugin import validator

    @validator("blocks")
    def only_numbered(ctx, message):
        return isinstance(message["payload"], dict) and "number" in message["payload"]

    @validator("fragile")
    def fragile(ctx, message):
        return message["payload"]["must"] > 0

    @validator("sloppy")
    def sloppy(ctx, message):
        if message["payload"]:
            return True  # forgot the other case: None refuses

    @validator("seen")
    def seen(ctx, message):
        ctx.log.info("saw {m}", m=sorted(message))
        return True
"""


def linked(net, *nodes):
    """A line of nodes: each registers the next and they connect."""
    for a, b in zip(nodes, nodes[1:]):
        a.node.store.add([net.url(b.node.listen_port)], "register")
        a.node.peers.addresses_added([net.url(b.node.listen_port)])
    for _ in range(100):
        net.advance(0.2)
        if all(n.node.live_peers() for n in nodes) and len(nodes[1].node.live_peers()) == min(2, len(nodes) - 1):
            return
    raise AssertionError("the nodes did not connect")


def messages(conn):
    return [e.body["payload"] for e in conn.events() if isinstance(e, codec.Event) and e.name == "message"]


def test_a_local_publish_a_validator_refuses_is_a_400(net, tmp_path, logged):
    path = plugin_file(tmp_path, "rules", VALIDATORS)
    built = memory_node(net, tmp_path / "n", plugins=[path])
    try:
        sub = FakeConnection()
        ask(built, "subscribe", {"topics": ["blocks", "fragile", "sloppy", "seen"]}, sub)
        assert ask(built, "publish", {"topic": "blocks", "payload": {"number": 1}}).status == 202
        refused = ask(built, "publish", {"topic": "blocks", "payload": "no number"})
        assert (refused.status, refused.error) == (
            400, 'Refused by the validator of plugin "rules" for topic "blocks"; nothing was published.')
        assert ask(built, "publish", {"topic": "fragile", "payload": {}}).status == 400
        assert ask(built, "publish", {"topic": "sloppy", "payload": 0}).status == 400
        assert ask(built, "publish", {"topic": "seen", "payload": 0}).status == 202
        assert ask(built, "publish", {"topic": "other", "payload": 0}).status == 202
        net.advance(0.1)
        assert messages(sub) == [{"number": 1}, 0]
        assert any(line.startswith("plugin rules: validator of topic fragile raised KeyError: 'must' "
                                   "(rules.py, line ") for line in logged), logged
        assert any("validator of topic sloppy returned None, not True or False" in x for x in logged)
        assert any("saw ['created', 'encrypted', 'from', 'id', 'origin', 'payload', 'pow', 'topic']" in x
                   for x in logged)
        assert built.node.metrics.validator_refused.labels("rules")._value.get() == 3
        assert built.node.metrics.plugin_errors.labels("rules", "validator")._value.get() == 1
    finally:
        built.stopService()


def test_a_validator_stops_a_received_message_at_its_node(net, tmp_path):
    """A publishes; B's validator refuses: B's subscriber does not get it
    and C, behind B, never sees it either. What B passes reaches C."""
    path = plugin_file(tmp_path, "rules", VALIDATORS)
    # A line: A dials B only, B dials C, C dials nobody (nor A, learned by exchange).
    a = memory_node(net, tmp_path / "a", service.Configs(peers=PeerConfig(max_outbound=1)))
    b = memory_node(net, tmp_path / "b", plugins=[path])
    c = memory_node(net, tmp_path / "c", service.Configs(peers=PeerConfig(max_outbound=0)))
    try:
        linked(net, a, b, c)
        net.advance(5)
        assert [p["node_id"] for p in a.node.live_peers()] == [b.node.node_id]
        assert [p["node_id"] for p in c.node.live_peers()] == [b.node.node_id]
        subs = {}
        for name, n in (("a", a), ("b", b), ("c", c)):
            subs[name] = FakeConnection()
            assert ask(n, "subscribe", {"topics": ["blocks"]}, subs[name]).status == 200
        assert ask(a, "publish", {"topic": "blocks", "payload": {"no": "number"}}).status == 202
        assert ask(a, "publish", {"topic": "blocks", "payload": {"number": 2}}).status == 202
        net.advance(2)
        assert messages(subs["a"]) == [{"no": "number"}, {"number": 2}]
        assert messages(subs["b"]) == [{"number": 2}]
        assert messages(subs["c"]) == [{"number": 2}]
        assert b.node.metrics.gossip_received.labels("validator")._value.get() == 1
        assert b.node.metrics.validator_refused.labels("rules")._value.get() == 1
    finally:
        for n in (a, b, c):
            n.stopService()


def test_a_sealed_message_reaches_a_validator_without_its_payload(net, tmp_path):
    path = plugin_file(tmp_path, "rules", VALIDATORS)
    built = memory_node(net, tmp_path / "n", plugins=[path])
    try:
        key = ask(built, "newkey", {"type": "sym"}).response["id"]
        # only_numbered sees payload None: it cannot read the message, so it refuses it
        assert ask(built, "publish", {"topic": "blocks", "payload": {"number": 1}, "key": key}).status == 400
        signer = ask(built, "newkey", {"type": "asym"}).response
        assert ask(built, "publish", {"topic": "blocks", "payload": {"number": 1},
                                      "sign": signer["id"]}).status == 202
    finally:
        built.stopService()


def test_no_validators_leave_gossip_unscreened(node):
    assert node.node.gossip.screen is None


def test_a_validator_screens_what_catch_up_brings_too(net, tmp_path):
    """Published at A while B was not linked: what B catches up on is asked
    about as gossip is, so B keeps and delivers only what its validator passes."""
    path = plugin_file(tmp_path, "rules", VALIDATORS)
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b", plugins=[path])
    try:
        ask(a, "publish", {"topic": "blocks", "payload": {"no": "number"}})
        ask(a, "publish", {"topic": "blocks", "payload": {"number": 3}})
        net.advance(0.5)
        linked(net, b, a)
        net.advance(10)
        kept = wire(ask(b, "history", {"topics": ["blocks"]}))["response"]["messages"]
        assert [m["payload"] for m in kept] == [{"number": 3}]
        assert b.node.metrics.validator_refused.labels("rules")._value.get() == 1
    finally:
        a.stopService()
        b.stopService()


def test_setup_cfg_names_foxnodes_own_plugins_as_entry_points():
    """What pluginhost loads by default is what an install declares, so
    the two never load one module twice nor miss one."""
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    declared = [tuple(part.strip() for part in line.split("="))
                for line in cfg["options.entry_points"][pluginhost.GROUP].strip().splitlines()]
    assert tuple(declared) == pluginhost.DEFAULTS


def test_an_entry_points_name_must_be_fit_for_a_directory(tmp_path):
    ep = SimpleNamespace(name="../escape", value="foxnode.plugins.time", module="elsewhere",
                         load=lambda: __import__("foxnode.plugins.time", fromlist=["x"]))
    with pytest.raises(PluginError, match="the name '../escape' is not a plugin's"):
        pluginhost.load([], entry_points=[ep])


def test_ctx_peers_are_the_live_peer_connections(net, node, tmp_path):
    other = memory_node(net, tmp_path / "other")
    try:
        linked(net, node, other)
        peers = wire(ask(node, "whoami"))["response"]["peers"]
        assert [(p["node_id"], p["direction"]) for p in peers] == [(other.node.node_id, "out")]
        assert set(peers[0]) == {"node_id", "addr", "direction"}
    finally:
        other.stopService()


SERVICE = """
    from twisted.application.service import Service
    from foxnode.plugin import op, service

    started = []

    class Ticker(Service):
        def __init__(self, ctx):
            self.ctx = ctx

        def startService(self):
            super().startService()
            started.append(self.ctx.name)

        def stopService(self):
            super().stopService()
            started.append("stopped")

    @service
    def ticker(ctx):
        return Ticker(ctx)
"""


def test_a_plugins_service_joins_the_node_tree_last(tmp_path):
    import sys

    net = MemoryNetwork()
    path = plugin_file(tmp_path, "ticking", SERVICE)
    node = memory_node(net, tmp_path / "n", plugins=[path])
    module = sys.modules["foxnode_plugin_ticking"]
    assert module.started == ["ticking"]
    assert type(node.services[-1]).__name__ == "Ticker"
    node.stopService()
    assert module.started == ["ticking", "stopped"]


@pytest.mark.parametrize("body, says", [
    ("raise ValueError('no room')", "its service broken raised ValueError: no room"),
    ("return 3", "its service broken returned int, not an IService"),
])
def test_a_service_that_cannot_be_made_stops_the_build(tmp_path, body, says):
    path = plugin_file(tmp_path, "svc", f"""
        from foxnode.plugin import service

        @service
        def broken(ctx):
            {body}
    """)
    with pytest.raises(PluginError) as caught:
        memory_node(MemoryNetwork(), tmp_path / "n", plugins=[path])
    assert str(caught.value).startswith(f"--plugin {path}: {says}"), str(caught.value)


def test_a_shipped_plugin_is_named_by_its_short_name():
    loaded = pluginhost.load(["chain"])
    assert [(p.name, p.module.__name__) for p in loaded] == [
        ("time", "foxnode.plugins.time"), ("chain", "foxnode.plugins.chain")]
    # time is loaded once, however it is asked for
    assert [p.name for p in pluginhost.load(["time"])] == ["time"]
    assert pluginhost.shipped("nosuchplugin") is None and pluginhost.shipped("a.b") is None


def test_ctx_ask_is_the_hosts_and_settles_replies_as_op_errors():
    from twisted.internet.defer import succeed

    asked = []

    def fake_ask(addr, op_name, args, timeout):
        asked.append((addr, op_name, args, timeout))
        return succeed({"ok": True})

    ctx = Ctx("p", "ab" * 32, None, "/nonexistent", lambda op, args: Deferred(), lambda: [], fake_ask)
    got = []
    ctx.ask("ws://127.0.0.1:9/ws", "chain", {"recent": 0}, timeout=2).addCallback(got.append)
    assert got == [{"ok": True}] and asked == [("ws://127.0.0.1:9/ws", "chain", {"recent": 0}, 2)]
    failed = []
    pluginhost._ask(None, "not an address", "info", None, 1).addErrback(failed.append)
    assert failed, "an address that does not parse fails the Deferred"
