"""``foxnode experiment run FILE``: an experiment as a file, run on a devnet,
its figures written to a report folder.

A scenario (TOML) names the network, a timeline and what to keep::

    [network]
    nodes = 40             # 2 to 1000
    per_process = 20       # nodes per process (default: as foxnode devnet)
    latency = "40ms:10ms"  # emulated on every peer link (links.py), optional
    loss = "1%"            # optional
    bandwidth = "1mbit"    # optional
    warmup = 35            # seconds to wait, once every node has a peer, before t = 0

    [[timeline]]
    at = 0                 # seconds after every node has a peer
    action = "publish"     # publish, kill, restart
    count = 20
    rate = 2               # messages per second

    [[timeline]]
    at = 15
    action = "kill"
    share = 0.2            # of the processes (all their nodes), at random

    [[timeline]]
    at = 25
    action = "restart"     # what was killed

    [[timeline]]
    at = 30
    action = "partition"   # nodes 0..k-1 | k..N-1, k = split x N: no link between
    split = 0.5

    [[timeline]]
    at = 40
    action = "heal"

    [[timeline]]
    at = 45
    action = "churn"       # kill a share every 10 s, restart it 5 s later
    share = 0.1
    every = 10
    duration = 30

    [measure]
    settle = 10            # seconds to wait for deliveries after the last event
    plots = true           # PNG plots (needs matplotlib)

Everything is checked before anything starts: an unknown key, an
impossible size, a negative latency end the command in one line naming it.

The report folder holds ``report.json`` (the scenario, which emulation ran,
every message: where and when it was published, when each node got it; the
delivery over time; copies of each envelope a node received per message;
peer connections per node) and, with plots, ``delivery.png``,
``copies.png``, ``latency.png`` and ``connections.png``. Ctrl-C stops every
node and writes what was measured so far, marked ``"interrupted": true``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import IO, Any

import attrs
import orjson
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.python.failure import Failure

from foxnode import client, devnet, links
from foxnode.cli import EXIT_USAGE, Failed, _say, _sleep
from foxnode.launch import LOOPBACK
from foxnode.storefiles import write_atomically

ACTIONS = ("publish", "kill", "restart", "partition", "heal", "churn")
NETWORK_KEYS = {"nodes", "per_process", "base_port", "name", "latency", "loss", "bandwidth", "seed", "warmup"}
EVENT_KEYS = {"publish": {"at", "action", "count", "rate", "topic"},
              "kill": {"at", "action", "share"},
              "restart": {"at", "action"},
              "partition": {"at", "action", "split"},
              "heal": {"at", "action"},
              "churn": {"at", "action", "share", "every", "duration"}}
MEASURE_KEYS = {"settle", "plots"}
TOP_KEYS = {"network", "timeline", "measure"}
#: The longest an experiment's timeline may run, in seconds.
MAX_AT = 86_400


#: seconds at the end of a warm-up (of at least twice this) over which
#: the idle network's CPU is measured
IDLE_WINDOW = 10.0


class ScenarioError(ValueError):
    """What is wrong with a scenario, in one line naming the key."""


@attrs.frozen
class Event:
    at: float
    action: str
    count: int = 0
    rate: float = 1.0
    topic: str = "experiment"
    share: float = 0.0
    #: churn: a kill every ``every`` seconds, its restart half-way to the next, for ``duration``
    every: float = 0.0
    duration: float = 0.0


@attrs.frozen
class Scenario:
    nodes: int
    per_process: int | None = None
    base_port: int = 9000
    name: str = "experiment"
    latency: str | None = None
    loss: str | None = None
    bandwidth: str | None = None
    seed: int = 1
    #: seconds between every node having a peer and the timeline's start
    #: (peer exchange runs every 30 s: a network that had one is meshed)
    warmup: float = 0.0
    timeline: tuple[Event, ...] = ()
    settle: float = 10.0
    plots: bool = True

    def node_options(self) -> tuple[str, ...]:
        return devnet.link_options(self.latency, self.loss, self.bandwidth)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _unknown(table: dict, known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ScenarioError(f"{where}{key}: unknown key (known: {', '.join(sorted(known))})")


def _number(table: dict, key: str, where: str, low: float, high: float, whole: bool = False,
            default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise ScenarioError(f"{where}{key}: missing")
        return default
    value = table[key]
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        raise ScenarioError(f"{where}{key} = {value!r}: give {kind} from {low:g} to {high:g}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ScenarioError(f"{where}{key} = {value!r}: give {kind} from {low:g} to {high:g}")
    return value


def _figure(table: dict, key: str, where: str, parse: Any) -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str):
        raise ScenarioError(f"{where}{key} = {value!r}: give a string, e.g. \"40ms:10ms\", \"1%\", \"1mbit\"")
    try:
        parse(value)
    except ValueError as e:
        raise ScenarioError(f"{where}{key} = {e}") from None
    return value


def parse_scenario(data: dict) -> Scenario:
    """A scenario from its parsed TOML, or ``ScenarioError`` naming the fault."""
    _unknown(data, TOP_KEYS, "")
    net = data.get("network")
    if not isinstance(net, dict):
        raise ScenarioError("network: missing (a [network] table with nodes = N)")
    _unknown(net, NETWORK_KEYS, "network.")
    nodes = _number(net, "nodes", "network.", 2, 1000, whole=True)
    per_process = _number(net, "per_process", "network.", 1, 1000, whole=True, default=0) or None
    base_port = _number(net, "base_port", "network.", 1, 65535, whole=True, default=9000)
    if base_port + nodes - 1 > 65535:
        raise ScenarioError(f"network.base_port = {base_port}: {nodes} nodes run past port 65535")
    name = net.get("name", "experiment")
    if not (isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable()):
        raise ScenarioError(f"network.name = {name!r}: give a name of 1 to 64 printable characters")
    latency = _figure(net, "latency", "network.", links.parse_latency)
    loss = _figure(net, "loss", "network.", links.parse_loss)
    bandwidth = _figure(net, "bandwidth", "network.", links.parse_rate)
    seed = _number(net, "seed", "network.", 0, 2**31, whole=True, default=1)
    warmup = _number(net, "warmup", "network.", 0, 3600, default=0.0)
    timeline = data.get("timeline", [])
    if not isinstance(timeline, list):
        raise ScenarioError("timeline: give a list of [[timeline]] tables")
    events = []
    for i, ev in enumerate(timeline):
        where = f"timeline[{i}]."
        if not isinstance(ev, dict):
            raise ScenarioError(f"timeline[{i}]: give a table")
        action = ev.get("action")
        if action not in ACTIONS:
            raise ScenarioError(f"{where}action = {action!r}: give one of {', '.join(ACTIONS)}")
        _unknown(ev, EVENT_KEYS[action], where)
        at = _number(ev, "at", where, 0, MAX_AT)
        if action == "publish":
            topic = ev.get("topic", "experiment")
            if not (isinstance(topic, str) and 0 < len(topic) <= 128 and topic.isprintable()):
                raise ScenarioError(f"{where}topic = {topic!r}: give a topic of 1 to 128 printable characters")
            events.append(Event(at, action, count=_number(ev, "count", where, 1, 100_000, whole=True),
                                rate=_number(ev, "rate", where, 0.01, 1000), topic=topic))
        elif action == "kill":
            events.append(Event(at, action, share=_number(ev, "share", where, 0.001, 1)))
        elif action == "churn":
            events.append(Event(at, action, share=_number(ev, "share", where, 0.001, 1),
                                every=_number(ev, "every", where, 1, 3600),
                                duration=_number(ev, "duration", where, 1, MAX_AT)))
        elif action == "partition":
            events.append(Event(at, action, share=_number(ev, "split", where, 0.001, 0.999, default=0.5)))
        else:
            events.append(Event(at, action))
    measure = data.get("measure", {})
    if not isinstance(measure, dict):
        raise ScenarioError("measure: give a [measure] table")
    _unknown(measure, MEASURE_KEYS, "measure.")
    settle = _number(measure, "settle", "measure.", 0, 3600, default=10.0)
    plots = measure.get("plots", True)
    if not isinstance(plots, bool):
        raise ScenarioError(f"measure.plots = {plots!r}: give true or false")
    return Scenario(nodes=nodes, per_process=per_process, base_port=base_port, name=name, latency=latency,
                    loss=loss, bandwidth=bandwidth, seed=seed, warmup=float(warmup),
                    timeline=tuple(sorted(events, key=lambda e: e.at)), settle=float(settle), plots=plots)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; ``ScenarioError`` in one line."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ScenarioError(f"cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"not TOML: {e}") from None
    scenario = parse_scenario(data)
    if scenario.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ScenarioError("measure.plots = true, but matplotlib is not installed "
                                "(pip install matplotlib, or plots = false)") from None
    return scenario


# -- the run ------------------------------------------------------------------------------


class Run:
    """One experiment on one devnet, its measurements as it goes."""

    def __init__(self, reactor: Any, scenario: Scenario, data_dir: Path, report_dir: Path,
                 out: IO[str] | None = None) -> None:
        self.reactor = reactor
        self.scenario = scenario
        self.report_dir = report_dir
        self.out = out or sys.stdout
        self.rng = random.Random(scenario.seed)
        per = devnet.per_process(scenario.nodes, scenario.per_process)
        self.net = devnet.Devnet(reactor, data_dir, scenario.nodes, scenario.base_port, scenario.name,
                                 out=self.out, per_process=per, node_options=scenario.node_options())
        #: message id -> {"origin", "sent", "topic", "expected", "got": {node index: seconds}}
        self.messages: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.t0: float | None = None
        self.killed: list[Any] = []
        self.subscribers: dict[int, Any] = {}
        self.copies_before: dict[int, float] = {}
        self.finished = False
        self._finishing: Deferred | None = None
        #: the first node of group B while partitioned, else None
        self.split: int | None = None
        #: snapshots of the peer graph (node index -> linked node indexes),
        #: taken when the timeline starts and after each change of the network
        self.graphs: list[dict[int, list[int]]] = []
        self.memory: dict[str, Any] | None = None
        #: cores the node processes used idle (the warm-up's last
        #: IDLE_WINDOW seconds) and over the timeline, and what one message
        #: cost beyond idle
        self.cpu: dict[str, Any] = {}
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self.interrupted = False

    def say(self, line: str) -> None:
        _say(self.out, line)

    def now(self) -> float:
        return self.reactor.seconds() - (self.t0 or self.reactor.seconds())

    # -- subscribers -----------------------------------------------------

    def _on_event(self, index: int, event: Any) -> None:
        if event.name != "message":
            return
        msg = self.messages.get(event.body.get("id"))
        if msg is not None:
            msg["got"].setdefault(index, self.now())

    async def subscribe(self, nodes: list[devnet.DevNode]) -> None:
        topics = sorted({e.topic for e in self.scenario.timeline if e.action == "publish"}) or ["experiment"]

        async def one(node: devnet.DevNode) -> None:
            conn = await client.connect(self.reactor, node.url, timeout=10,
                                        on_event=lambda ev, i=node.index: self._on_event(i, ev))
            reply = await conn.request("subscribe", {"topics": topics}, timeout=10)
            if not reply.ok():
                raise Failed(1, f"{node.name} refused the subscription: {reply.error}")
            self.subscribers[node.index] = conn

        for at in range(0, len(nodes), 100):
            await DeferredList([ensureDeferred(one(n)) for n in nodes[at:at + 100]], consumeErrors=True)

    # -- the timeline ----------------------------------------------------

    def alive(self) -> list[devnet.DevNode]:
        return [n for n in self.net.nodes if n.running() and n.index in self.subscribers]

    async def _snapshot_later(self, delay: float) -> None:
        await _sleep(self.reactor, delay)
        if not self.finished:
            await self.snapshot()

    async def publish(self, event: Event) -> None:
        for i in range(event.count):
            nodes = self.alive()
            if nodes:
                node = self.rng.choice(nodes)
                sent = self.now()
                try:
                    reply = await self.subscribers[node.index].request(
                        "publish", {"topic": event.topic, "payload": {"seq": i, "from": node.index}}, timeout=10)
                except Exception:
                    reply = None
                if reply is not None and reply.ok():
                    self.messages[reply.response["id"]] = {
                        "origin": node.index, "sent": sent, "topic": event.topic,
                        "expected": len(nodes), "got": {}, "partitioned": self.split is not None,
                        "graph": len(self.graphs) - 1}
            await _sleep(self.reactor, 1 / event.rate)

    def _processes(self) -> list[tuple[Any, list[devnet.DevNode]]]:
        if self.net.hosts:
            return [(h, self.net.nodes[h.first:h.last + 1]) for h in self.net.hosts]
        return [(n, [n]) for n in self.net.nodes]

    async def kill(self, event: Event) -> None:
        running = [(p, nodes) for p, nodes in self._processes() if nodes[0].running()]
        count = max(1, round(len(running) * event.share))
        chosen = self.rng.sample(running, min(count, len(running)))
        for proc, nodes in chosen:
            proc.process.kill()
            for n in nodes:
                conn = self.subscribers.pop(n.index, None)
                if conn is not None:
                    conn.close()
            self.killed.append((proc, nodes))
        for proc, _ in chosen:
            await proc.process.when_ended()
        down = sum(len(nodes) for _, nodes in chosen)
        self.say(f"t={self.now():.1f}s: killed {len(chosen)} process(es), {down} node(s)")
        self.events.append({"t": self.now(), "action": "kill", "nodes": [n.index for _, ns in chosen for n in ns]})

    async def restart(self, event: Event) -> None:
        again, self.killed = self.killed, []
        for proc, nodes in again:
            self.net.relaunch(proc)
        for proc, nodes in again:
            try:
                await proc.process.serving(60)
            except Exception as e:
                self.say(f"t={self.now():.1f}s: {proc.name} did not come back: {e}".splitlines()[0])
                continue
            await self.subscribe(nodes)
            if self.split is not None:
                await self._tell_links(nodes)  # a restarted node is on its side still
        back = [n.index for _, ns in again for n in ns]
        self.say(f"t={self.now():.1f}s: restarted {len(back)} node(s)")
        self.events.append({"t": self.now(), "action": "restart", "nodes": back})

    def _block_for(self, index: int) -> list[list[int]]:
        """The ports node ``index`` must not link to: the other group's."""
        if self.split is None:
            return []
        base, n = self.scenario.base_port, self.scenario.nodes
        if index < self.split:
            return [[base + self.split, base + n - 1]]
        return [[base, base + self.split - 1]]

    async def _tell_links(self, nodes: list[devnet.DevNode]) -> None:
        async def one(node: devnet.DevNode) -> None:
            conn = self.subscribers.get(node.index)
            if conn is not None:
                await conn.request("links", {"block": self._block_for(node.index)}, timeout=10)

        for at in range(0, len(nodes), 100):
            await DeferredList([ensureDeferred(one(n)) for n in nodes[at:at + 100]], consumeErrors=True)

    async def partition(self, event: Event) -> None:
        self.split = max(1, min(self.scenario.nodes - 1, round(self.scenario.nodes * event.share)))
        await self._tell_links(self.alive())
        self.say(f"t={self.now():.1f}s: partitioned node-0..node-{self.split - 1} | "
                 f"node-{self.split}..node-{self.scenario.nodes - 1}")
        self.events.append({"t": self.now(), "action": "partition", "split": self.split})

    async def heal(self, event: Event) -> None:
        self.split = None
        await self._tell_links(self.alive())
        self.say(f"t={self.now():.1f}s: healed the partition")
        self.events.append({"t": self.now(), "action": "heal"})

    async def snapshot(self) -> None:
        """The peer graph as the nodes' ``info`` shows it now."""
        base = self.scenario.base_port
        graph: dict[int, list[int]] = {}
        nodes = [n for n in self.net.nodes if n.running()]

        async def one(node: devnet.DevNode) -> None:
            info = await self.net._info(node, timeout=10)
            if info is None:
                return
            linked = []
            for peer in info.get("connected") or []:
                try:
                    linked.append(int(peer["addr"].rsplit(":", 1)[1].split("/")[0]) - base)
                except (KeyError, ValueError, IndexError, AttributeError):
                    pass
            graph[node.index] = linked

        for at in range(0, len(nodes), 100):
            await DeferredList([ensureDeferred(one(n)) for n in nodes[at:at + 100]], consumeErrors=True)
        # A link either side reports is a link.
        for a, bs in list(graph.items()):
            for b in bs:
                if b in graph and a not in graph[b]:
                    graph[b].append(a)
        self.graphs.append(graph)

    def measure_memory(self) -> None:
        """Resident memory of the node processes, in all and per node."""
        total = 0
        pids = {p.pid for _, p in self.net.processes() if p.running}
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        self.memory = {"processes": len(pids), "rss_total_mib": round(total / 2**20, 1),
                       "rss_per_node_mib": round(total / 2**20 / self.scenario.nodes, 3)}
        self.say(f"memory: {self.memory['rss_total_mib']} MiB in {len(pids)} process(es), "
                 f"{self.memory['rss_per_node_mib']:.2f} MiB per node")

    async def churn(self, event: Event) -> None:
        """Kill a share of the processes, restart them half-way to the next
        kill, again and again for ``duration`` seconds."""
        start = self.now()
        for k in range(max(1, int(event.duration // event.every))):
            await _sleep(self.reactor, max(0.0, start + k * event.every - self.now()))
            await self.kill(event)
            await _sleep(self.reactor, max(0.0, start + (k + 0.5) * event.every - self.now()))
            await self.restart(event)

    async def run(self) -> None:
        s = self.scenario
        net = self.net
        net.prepare()
        emulation = f"links emulated ({links.EMULATION}): {' '.join(s.node_options())}" if s.node_options() \
            else "no link emulation"
        self.say(f"experiment: {s.nodes} nodes, {emulation}; report in {self.report_dir}")
        net.start()
        started = time.monotonic()
        await net.wait_up(max(60.0, s.nodes * 0.2))  # hosts start one after another
        net.show_addresses()
        await net.wait_connected(60)
        self.startup = time.monotonic() - started
        if s.warmup:
            self.say(f"warming up for {s.warmup:g}s (peer exchange meshes the network)")
            if s.warmup >= 2 * IDLE_WINDOW:
                # The last part of it measures what the network costs idle.
                await _sleep(self.reactor, s.warmup - IDLE_WINDOW)
                before = self.cpu_seconds()
                await _sleep(self.reactor, IDLE_WINDOW)
                after = self.cpu_seconds()
                self.cpu["idle_cores"] = round(
                    sum(after.get(p, t) - t for p, t in before.items()) / IDLE_WINDOW, 3)
            else:
                await _sleep(self.reactor, s.warmup)
        await self.subscribe(net.nodes)
        self.copies_before = await self.copies()
        self.measure_memory()
        await self.snapshot()
        self.t0 = self.reactor.seconds()
        self._cpu_start = self.cpu_seconds()
        self._cpu_last = dict(self._cpu_start)
        sampling = ensureDeferred(self._sample_cpu())
        sampling.addErrback(lambda f: f.trap(CancelledError))
        self.say(f"t=0: timeline starts ({len(s.timeline)} event(s))")
        background = []
        for event in s.timeline:
            wait = event.at - self.now()
            if wait > 0:
                await _sleep(self.reactor, wait)
            if event.action == "publish":
                self.say(f"t={self.now():.1f}s: publishing {event.count} message(s) at {event.rate:g}/s")
                self.events.append({"t": self.now(), "action": "publish", "count": event.count})
                background.append(ensureDeferred(self.publish(event)))
            elif event.action == "kill":
                await self.kill(event)
            elif event.action == "partition":
                await self.partition(event)
            elif event.action == "heal":
                await self.heal(event)
            elif event.action == "churn":
                self.say(f"t={self.now():.1f}s: churn for {event.duration:g}s")
                await self.churn(event)
            else:
                await self.restart(event)
            if event.action != "publish":
                # The peers' reaction first (closes seen, redials), then the graph.
                ensureDeferred(self._snapshot_later(2.0))
        if background:
            await DeferredList(background)
        self.say(f"t={self.now():.1f}s: settling for {s.settle:g}s")
        await _sleep(self.reactor, s.settle)
        self._cpu_last.update(self.cpu_seconds())
        sampling.cancel()
        used = sum(self._cpu_last[p] - t for p, t in self._cpu_start.items())
        self.cpu["timeline_seconds"] = round(self.now(), 1)
        self.cpu["timeline_cores"] = round(used / max(self.now(), 1e-9), 3)
        published = len(self.messages)
        if self.cpu.get("idle_cores") is not None and published:
            self.cpu["per_message_cpu_seconds"] = round(
                max(0.0, used - self.cpu["idle_cores"] * self.now()) / published, 3)
        self.say("cpu of the node processes: " + ", ".join(f"{k} {v}" for k, v in self.cpu.items()))

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time (user and system) of each running node process, by pid."""
        found = {}
        tick = os.sysconf("SC_CLK_TCK")
        for _, process in self.net.processes():
            if not process.running:
                continue
            try:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()
                found[process.pid] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass  # not Linux, or just gone
        return found

    async def _sample_cpu(self) -> None:
        # A killed process's time is what it had at its last sample.
        while True:
            await _sleep(self.reactor, 2.0)
            self._cpu_last.update(self.cpu_seconds())

    # -- measuring -------------------------------------------------------

    async def copies(self) -> dict[int, float]:
        """Envelopes each running node has received from peers (accepted and duplicate)."""
        from twisted.web.client import Agent, readBody

        agent = Agent(self.reactor)
        found: dict[int, float] = {}

        async def one(node: devnet.DevNode) -> None:
            reply = await agent.request(b"GET", f"http://{LOOPBACK}:{node.port}/metrics".encode())
            body = (await readBody(reply)).decode()
            total = 0.0
            for line in body.splitlines():
                if line.startswith("foxnode_gossip_envelopes_received_total{") and (
                        'outcome="accepted"' in line or 'outcome="duplicate"' in line):
                    total += float(line.rsplit(" ", 1)[1])
            found[node.index] = total

        nodes = [n for n in self.net.nodes if n.running()]
        for at in range(0, len(nodes), 100):
            await DeferredList([ensureDeferred(one(n)) for n in nodes[at:at + 100]], consumeErrors=True)
        return found

    def hops(self, graph: int, origin: int) -> dict[int, int]:
        """Hop counts from ``origin`` in peer graph number ``graph`` (breadth first)."""
        if graph < 0 or graph >= len(self.graphs):
            return {}
        g = self.graphs[graph]
        dist, frontier = {origin: 0}, [origin]
        while frontier:
            nxt = []
            for a in frontier:
                for b in g.get(a, ()):
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        nxt.append(b)
            frontier = nxt
        return dist

    def figures(self, copies_after: dict[int, float]) -> dict[str, Any]:
        msgs = sorted(self.messages.items(), key=lambda kv: kv[1]["sent"])
        one_way = links.parse_latency(self.scenario.latency)[0] if self.scenario.latency else 0.0
        by_hops: list[tuple[int, float]] = []
        best: dict[str, Any] = {}
        for mid, m in msgs:
            dist = self.hops(m["graph"], m["origin"])
            far = [dist[i] for i in m["got"] if i in dist]
            best[mid] = max(far) if far else None
            by_hops += [(dist[i], t - m["sent"]) for i, t in m["got"].items() if i in dist and i != m["origin"]]
        if len(by_hops) > 20_000:
            by_hops = random.Random(0).sample(by_hops, 20_000)
        delivered = sum(len(m["got"]) for _, m in msgs)
        expected = sum(m["expected"] for _, m in msgs)
        latencies = sorted(t - m["sent"] for _, m in msgs for t in m["got"].values())
        timeline = sorted(t for _, m in msgs for t in m["got"].values())
        # Copies: envelopes received from peers per node and message, at the
        # nodes that neither died nor restarted meanwhile (their counters ran throughout).
        steady = [i for i in copies_after if i in self.copies_before]
        received = sum(copies_after[i] - self.copies_before[i] for i in steady)
        reached = sum(1 for _, m in msgs for i in m["got"] if i in steady and i != m["origin"])
        per_node = {i: (copies_after[i] - self.copies_before[i]) / max(1, len(msgs)) for i in steady}
        # Phases: the messages between one change of the network and the next.
        marks = [e for e in self.events if e["action"] != "publish"]
        phases = []
        for k in range(len(marks) + 1):
            start = marks[k - 1]["t"] if k else float("-inf")
            end = marks[k]["t"] if k < len(marks) else float("inf")
            inside = [(mid, m) for mid, m in msgs if start <= m["sent"] < end]
            if not inside:
                continue
            lasts = sorted(max(m["got"].values()) - m["sent"] for _, m in inside if m["got"])
            bests = sorted(best[mid] * one_way for mid, _ in inside if best[mid] is not None)
            phases.append({
                "after": marks[k - 1]["action"] if k else "start", "messages": len(inside),
                "delivery": sum(len(m["got"]) for _, m in inside) / max(1, sum(m["expected"] for _, m in inside)),
                "last_node_latency_median": lasts[len(lasts) // 2] if lasts else None,
                "best_possible_median": bests[len(bests) // 2] if bests else None,
            })
        return {
            "messages": len(msgs),
            "phases": phases,
            "memory": self.memory,
            "cpu": self.cpu,
            "link_latency": one_way,
            "latency_by_hops": by_hops,
            "delivery": delivered / expected if expected else None,
            "latency": {"median": latencies[len(latencies) // 2] if latencies else None,
                        "p99": latencies[int(len(latencies) * 0.99)] if latencies else None,
                        "max": latencies[-1] if latencies else None},
            "copies_per_node_per_message": received / reached if reached else None,
            "copies_per_node": per_node,
            "deliveries_over_time": timeline,
            "expected_deliveries": expected,
            "connections_per_node": {n.index: n.connected for n in self.net.nodes},
            "per_message": [{"id": mid, "origin": m["origin"], "sent": m["sent"], "expected": m["expected"],
                             "delivered": len(m["got"]), "partitioned": m["partitioned"],
                             "hops": best[mid],
                             "best": best[mid] * one_way if best[mid] is not None else None,
                             "last": max(m["got"].values()) - m["sent"] if m["got"] else None}
                            for mid, m in msgs],
        }

    def finish(self, interrupted: bool) -> Deferred:
        """Write the report (partial when interrupted), then stop every node;
        every caller (the run's end, Ctrl-C's shutdown) waits for the one finish."""
        if self._finishing is None:
            self.finished = True
            self._finishing = ensureDeferred(self._finish(interrupted))
        d: Deferred = Deferred()

        def relay(result: Any) -> None:
            (d.errback if isinstance(result, Failure) else d.callback)(result)

        self._finishing.addBoth(relay)
        return d

    async def _finish(self, interrupted: bool) -> None:
        self.interrupted = interrupted
        try:
            try:
                copies_after = await self.copies() if not interrupted else {}
                await self.net._poll_connections()
            except Exception:
                copies_after = {}
            self.write_report(copies_after)
        finally:
            for conn in self.subscribers.values():
                conn.close()
            await self.net.stop()

    def write_report(self, copies_after: dict[int, float]) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        figures = self.figures(copies_after)
        report = {"scenario": self.scenario.as_dict(),
                  "links": {"emulation": links.EMULATION if self.scenario.node_options() else None,
                            "options": list(self.scenario.node_options())},
                  "interrupted": self.interrupted,
                  "startup_seconds": getattr(self, "startup", None),
                  "events": self.events, **figures}
        write_atomically(self.report_dir / "report.json",
                         orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        self.say(f"report: {self.report_dir / 'report.json'}: {figures['messages']} message(s), delivery "
                 + (f"{figures['delivery']:.1%}" if figures["delivery"] is not None else "-")
                 + (f", copies per node per message {figures['copies_per_node_per_message']:.2f}"
                    if figures["copies_per_node_per_message"] is not None else "")
                 + (" (interrupted: partial)" if self.interrupted else ""))
        write_network_page(self.report_dir / "network.html", self.scenario.nodes, self.graphs,
                           self.page_messages())
        self.say(f"the network, and each message spreading: {self.report_dir / 'network.html'}")
        for ph in figures["phases"]:
            self.say(f"  after {ph['after']}: {ph['messages']} message(s), delivery {ph['delivery']:.1%}"
                     + (f", last node median {ph['last_node_latency_median']:.3f}s" if ph["last_node_latency_median"] is not None else "")
                     + (f" (best possible {ph['best_possible_median']:.3f}s)" if ph["best_possible_median"] is not None else ""))
        if self.scenario.plots:
            plot(report, self.report_dir)
            self.say(f"plots: {', '.join(PLOTS)} in {self.report_dir}")


    def page_messages(self, most: int = 60) -> list[dict[str, Any]]:
        """The messages network.html can show spreading: up to ``most``,
        spread over the run."""
        msgs = sorted(self.messages.items(), key=lambda kv: kv[1]["sent"])
        step = max(1, len(msgs) // most)
        return [{"id": mid, "origin": m["origin"], "sent": round(m["sent"], 3), "graph": m["graph"],
                 "got": {str(i): round(t - m["sent"], 4) for i, t in m["got"].items()}}
                for mid, m in msgs[::step][:most]]


PLOTS = ("delivery.png", "copies.png", "latency.png", "connections.png")

#: The experiment's network page: the whole network on one canvas, nodes in
#: rings by their hop count from the message's origin, the message's arrival
#: animated by colour. The drawing is static/network.js, the devnet's live
#: page's too, inlined so that the page is one file that needs nothing else.
_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>foxnode experiment: the network</title>
<style>body{font:14px sans-serif;margin:1em}canvas{border:1px solid #ccc}#bar{margin:.5em 0}</style>
</head><body>
<h1>The network, and a message spreading</h1>
<div id="bar">message <select id="msg"></select>
<button id="play">play</button> <input id="t" type="range" min="0" max="1000" value="1000" style="width:300px">
<span id="at"></span></div>
<canvas id="c" width="900" height="900"></canvas>
<p>Each dot is a node, in rings by its hop count from the node that published (the centre);
grey lines are live peer links; a node turns orange when the message reaches it; red: down or never reached.</p>
<script id="data" type="application/json">DATA</script>
<script>NETWORK_JS</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const c = document.getElementById('c'), g = c.getContext('2d');
const layer = new FoxNet.LinkLayer(c.width, c.height);
const sel = document.getElementById('msg'), slider = document.getElementById('t'), at = document.getElementById('at');
D.messages.forEach((m, i) => { const o = document.createElement('option'); o.value = i;
  o.textContent = `${i + 1}: at ${m.sent}s from node-${m.origin}, ${Object.keys(m.got).length}/${D.nodes} nodes`;
  sel.appendChild(o); });
let pos = null, msg = null, last = 1, playing = null;
function layout(m) {
  const graph = D.graphs[m.graph] || {}, pairs = [];
  for (const a in graph) for (const b of graph[a]) if (+a < b) pairs.push([+a, b]);
  const links = FoxNet.flatten(pairs);
  pos = FoxNet.rings(D.nodes, FoxNet.adjacency(D.nodes, links), m.origin, c.width, c.height).pos;
  layer.draw(pos, links, () => draw(slider.value / 1000));
}
function draw(frac) {
  g.clearRect(0, 0, c.width, c.height); g.drawImage(layer.canvas, 0, 0);
  const now = frac * last; at.textContent = `${now.toFixed(3)} s after publishing`;
  const alive = D.graphs[msg.graph] || {}, C = FoxNet.COLOURS;
  FoxNet.drawNodes(g, pos, D.nodes, (i) => { const t = msg.got[i];
    return i === msg.origin ? C.origin : (t !== undefined && t <= now) ? C.reached
      : (!(i in alive) || t === undefined) ? C.down : C.waiting; });
}
function choose() { msg = D.messages[+sel.value]; if (!msg) return;
  last = Math.max(0.001, ...Object.values(msg.got)); layout(msg); draw(slider.value / 1000); }
sel.onchange = choose; slider.oninput = () => draw(slider.value / 1000);
document.getElementById('play').onclick = () => { cancelAnimationFrame(playing); const start = performance.now();
  const tick = (t) => { const f = Math.min(1, (t - start) / 3000); slider.value = f * 1000; draw(f);
    if (f < 1) playing = requestAnimationFrame(tick); }; playing = requestAnimationFrame(tick); };
choose();
</script></body></html>
"""


def write_network_page(path: Path, nodes: int, graphs: list[dict[int, list[int]]],
                       messages: list[dict[str, Any]]) -> None:
    """network.html: the whole network and the messages spreading, in one
    file that needs nothing else (its data and its drawing code inline)."""
    data = orjson.dumps({"nodes": nodes, "graphs": graphs, "messages": messages},
                        option=orjson.OPT_NON_STR_KEYS).decode()
    drawing = (resources.files("foxnode") / "static" / "network.js").read_text()
    # Inline JSON and script in script elements: no "</" may end them early.
    path.write_text(_PAGE.replace("NETWORK_JS", drawing.replace("</", "<\\/"))
                    .replace("DATA", data.replace("</", "<\\/")))


def plot(report: dict[str, Any], directory: Path) -> None:
    """The report's four figures as PNG files (matplotlib, without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    times = report["deliveries_over_time"]
    expected = report["expected_deliveries"] or 1
    ax.step(times, [(i + 1) / expected for i in range(len(times))], where="post")
    for ev in report["events"]:
        if ev["action"] != "publish":
            ax.axvline(ev["t"], color="grey", linestyle="--")
            ax.text(ev["t"], 0.02, ev["action"], rotation=90, color="grey")
    ax.set_xlabel("seconds since the timeline started")
    ax.set_ylabel("share of expected deliveries")
    ax.set_ylim(0, 1.05)
    ax.set_title("Delivery over time")
    save(fig, "delivery.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    per_node = list(report["copies_per_node"].values())
    ax.hist(per_node, bins=30)
    ax.set_xlabel("envelopes received per message")
    ax.set_ylabel("nodes")
    ax.set_title(f"Copies per node per message (mean {report['copies_per_node_per_message'] or 0:.2f})")
    save(fig, "copies.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    points = report["latency_by_hops"]
    if points:
        ax.scatter([h for h, _ in points], [t for _, t in points], s=4, alpha=0.3, label="a delivery")
        top = max(h for h, _ in points)
        if report["link_latency"]:
            ax.plot([0, top], [0, top * report["link_latency"]], color="red",
                    label="best possible: hops x link latency")
        ax.legend()
    ax.set_xlabel("hops from the publishing node (shortest path in the peer graph)")
    ax.set_ylabel("seconds until delivered")
    ax.set_title("Latency against hop count")
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    conns = [c for c in report["connections_per_node"].values() if c is not None]
    ax.hist(conns, bins=range(0, max(conns, default=1) + 2))
    ax.set_xlabel("live peer connections")
    ax.set_ylabel("nodes")
    ax.set_title("Connections per node (at the end)")
    save(fig, "connections.png")


async def run_experiment(reactor: Any, opts: argparse.Namespace) -> None:
    try:
        scenario = load_scenario(opts.file)
    except ScenarioError as e:
        raise Failed(EXIT_USAGE, f"{opts.file}: {e}") from None
    stem = Path(opts.file).stem
    report_dir = Path(opts.out or f"{stem}-report").absolute()
    data_dir = Path(opts.dir or f"{stem}-nodes").absolute()
    run = Run(reactor, scenario, data_dir, report_dir)
    reactor.addSystemEventTrigger("before", "shutdown", run.finish, True)
    try:
        await run.run()
    except BaseException:
        await run.finish(interrupted=True)
        raise
    await run.finish(interrupted=False)
