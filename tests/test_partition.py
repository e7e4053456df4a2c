"""A network partition: six ``twistd foxnode`` processes, each in a Linux
network namespace of its own, on one virtual switch. The network is cut in
two ({1,2,3} | {4,5,6}); each side must keep working on its own. Then it
is healed; the nodes must reconnect across the cut and gossip must reach
every node again.

It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's ``ip``
(Debian: ``apt-get install iproute2``); without them it skips and says why.

The topology lives entirely inside namespaces this test creates, under
names holding its pid (``foxpart-<pid>-...``)::

    foxpart-<pid>-sw:  bridge br0 (and br1, used only while cut)
                       ports p1..p6: one end of each veth pair
    foxpart-<pid>-nK:  eth0 (the other end), 10.213.7.K/24, and lo

Both ends of every veth pair are created directly in these namespaces, so
nothing is added to, or routed through, the host's own namespace, and the
10.213.7.0/24 traffic never leaves them. The test process cannot reach
those addresses itself; it runs its clients inside each node's namespace
(``ip netns exec``): ``foxnode watch`` as the node's subscriber, ``foxnode
call`` to publish, and a small polling client that asks ``info`` and
``peers``. Everything is undone at the end, pass or fail: processes
stopped, links and namespaces deleted.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foxnode.testing import frames_options

SUBNET = "10.213.7"
PORT = 9000
NODES = (1, 2, 3, 4, 5, 6)
SIDE_A = (1, 2, 3)
SIDE_B = (4, 5, 6)
TOPIC = "p"
PREFIX = "foxpart-"
# Fast failure detection, so a cut shows within seconds (whole seconds:
# Autobahn's ping timers are).
FAST = ("--ping-interval", "1", "--ping-timeout", "1",
        "--exchange-interval", "1", "--handshake-timeout", "2")
# Every wait is bounded by this.
WAIT = 40.0
# How long to keep watching after a message has arrived where it should,
# for copies arriving twice or on the wrong side of the cut.
SETTLE = 3.0

BIN = Path(sys.executable).parent

# The polling client run in each node's namespace: one request per line
# of stdin (``[op, args]``), one reply per line of stdout, over a plain
# WebSocket client (``websockets``, as an outside client would talk).
AGENT = """
import json, sys
from websockets.sync.client import connect
url = sys.argv[1]
for line in sys.stdin:
    op, args = json.loads(line)
    try:
        with connect(url, open_timeout=5, close_timeout=1) as ws:
            ws.send(json.dumps({"op": op, "args": args}))
            reply = json.loads(ws.recv(timeout=5))
    except Exception as e:
        reply = {"agent_error": repr(e)}
    print(json.dumps(reply), flush=True)
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# -- can this machine do it? -------------------------------------------------------


def skip_unless_namespaces_work() -> None:
    """Skip, saying why, unless we can create a namespace, a bridge and a
    veth pair in it, and run a command inside it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip (Debian: apt-get install iproute2)")
    for tool in ("twistd", "foxnode"):
        if not (BIN / tool).is_file():
            pytest.skip(f"no {tool} script beside {sys.executable}")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (ip netns add: {made.stderr.strip()})")
    try:
        for what, args in (
            ("a bridge", ("link", "add", "br0", "type", "bridge")),
            ("a veth pair", ("link", "add", "v0", "type", "veth", "peer", "name", "v1")),
        ):
            tried = ip("-n", probe, *args, check=False)
            if tried.returncode != 0:
                pytest.skip(f"cannot create {what} in a namespace (kernel module missing?): "
                            f"{tried.stderr.strip()}")
        ran = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True,
                             timeout=30)
        if ran.returncode != 0:
            pytest.skip(f"cannot run a command in a namespace (ip netns exec: {ran.stderr.strip()})")
    finally:
        ip("netns", "del", probe, check=False)


def remove_stale_namespaces() -> None:
    """Namespaces of an earlier run of this test that was killed before it
    could tidy up: its process is gone and nothing runs in them any more."""
    for name in namespaces():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-.*", name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if not ip("netns", "pids", name, check=False).stdout.strip():
            ip("netns", "del", name, check=False)


# -- the lab: namespaces, links, processes -----------------------------------------------


class Lab:
    """The namespaces, links and processes of one run; ``close`` undoes
    all of it, whatever state it is in."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.created: list[str] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.watchers: dict[int, subprocess.Popen] = {}
        self.agents: dict[int, subprocess.Popen] = {}
        self._files: list = []

    def ns(self, k: int) -> str:
        return f"{self.tag}-n{k}"

    @staticmethod
    def addr(k: int) -> str:
        return f"{SUBNET}.{k}"

    def url(self, k: int) -> str:
        return f"ws://{self.addr(k)}:{PORT}/ws"

    def in_ns(self, k: int, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k), *command]

    def add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        sw = self.switch
        self.add_namespace(sw)
        for bridge in ("br0", "br1"):
            ip("-n", sw, "link", "add", bridge, "type", "bridge")
            ip("-n", sw, "link", "set", bridge, "up")
        for k in NODES:
            self.add_namespace(self.ns(k))
            # Both ends made where they belong: p<k> in the switch, eth0 in the node's namespace.
            ip("-n", sw, "link", "add", f"p{k}", "type", "veth", "peer", "name", "eth0",
               "netns", self.ns(k))
            ip("-n", sw, "link", "set", f"p{k}", "master", "br0")
            ip("-n", sw, "link", "set", f"p{k}", "up")
            ip("-n", self.ns(k), "addr", "add", f"{self.addr(k)}/24", "dev", "eth0")
            ip("-n", self.ns(k), "link", "set", "eth0", "up")

    def move(self, ks: tuple[int, ...], bridge: str) -> None:
        for k in ks:
            ip("-n", self.switch, "link", "set", f"p{k}", "master", bridge)

    def _open(self, name: str) -> object:
        f = open(self.directory / name, "wb")
        self._files.append(f)
        return f

    def start_node(self, k: int, *extra: str) -> None:
        data = self.directory / f"n{k}"
        data.mkdir(parents=True, exist_ok=True)
        command = self.in_ns(
            k, str(BIN / "twistd"), "--nodaemon", "--pidfile=", "foxnode",
            "--listen", f"tcp:{PORT}:interface={self.addr(k)}",
            "--peers-file", str(data / "peers.json"), "--data-dir", str(data),
            *frames_options(), *FAST, *extra)
        log = self._open(f"n{k}/twistd.log")
        # ip netns exec execs the command: this pid is twistd's own.
        self.nodes[k] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start_watcher(self, k: int) -> None:
        command = self.in_ns(k, str(BIN / "foxnode"), "watch", "--timeout", "10", self.url(k), TOPIC)
        self.watchers[k] = subprocess.Popen(command, stdout=self._open(f"watch{k}.out"),
                                            stderr=self._open(f"watch{k}.err"))

    def watcher_ready(self, k: int) -> bool:
        if self.watchers[k].poll() is not None:
            raise AssertionError(f"foxnode watch on node {k} exited {self.watchers[k].returncode}: "
                                 f"{(self.directory / f'watch{k}.err').read_text()}")
        return "subscribed" in (self.directory / f"watch{k}.err").read_text()

    def received(self, k: int) -> list[str]:
        """The ids of the messages node k's subscriber has printed so far."""
        text = (self.directory / f"watch{k}.out").read_text()
        lines = text.split("\n")[:-1]  # the last piece is an unfinished line, or ""
        return [json.loads(line)["id"] for line in lines if line.strip()]

    def start_agent(self, k: int) -> None:
        """A small client living in node k's namespace for the polling: one
        process for the whole test rather than one per question."""
        env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
        self.agents[k] = subprocess.Popen(
            self.in_ns(k, sys.executable, "-u", "-c", AGENT, self.url(k)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._open(f"agent{k}.err"),
            text=True, env=env)

    def ask(self, ks: tuple[int, ...], op: str, args: object = None) -> dict[int, dict | None]:
        """Ask each of ``ks`` at once (through its agent); each node's
        reply, or None when it gave none."""
        for k in ks:
            self.agents[k].stdin.write(json.dumps([op, args]) + "\n")
            self.agents[k].stdin.flush()
        replies: dict[int, dict | None] = {}
        deadline = time.monotonic() + 15
        for k in ks:
            out = self.agents[k].stdout
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            line = out.readline() if ready else ""
            if not line:
                raise AssertionError(f"the agent in node {k}'s namespace did not answer: "
                                     f"{(self.directory / f'agent{k}.err').read_text()}")
            reply = json.loads(line)
            replies[k] = reply if "status" in reply else None
        return replies

    def call(self, k: int, op: str, args: object = None) -> dict:
        """``foxnode call`` in node k's namespace, as a user would run it."""
        command = self.in_ns(k, str(BIN / "foxnode"), "call", "--timeout", "10", self.url(k), op)
        if args is not None:
            command.append(json.dumps(args))
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"foxnode call {op} on node {k}: {done.returncode} {done.stderr}"
        return json.loads(done.stdout)

    def check_alive(self) -> None:
        for k, p in self.nodes.items():
            if p.poll() is not None:
                raise AssertionError(f"node {k} exited {p.returncode}:\n{self.log_tail(k)}")

    def log_tail(self, k: int, lines: int = 25) -> str:
        try:
            text = (self.directory / f"n{k}" / "twistd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for p in self.agents.values():
            try:
                p.stdin.close()  # the agent's end of input: it exits
            except OSError:
                pass
        procs = [*self.agents.values(), *self.watchers.values(), *self.nodes.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for p in self.agents.values():
            p.stdout.close()
        for f in self._files:
            f.close()
        # Deleting one end of a veth pair deletes both; deleting a namespace
        # nothing runs in any more destroys it with whatever is left in it.
        if self.switch in self.created:
            for k in NODES:
                ip("-n", self.switch, "link", "del", f"p{k}", check=False)
        for name in reversed(self.created):
            ip("netns", "del", name, check=False)
        self.created.clear()


@pytest.fixture
def lab(tmp_path):
    skip_unless_namespaces_work()
    remove_stale_namespaces()
    lab = Lab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
        left = [n for n in namespaces() if n.startswith(lab.tag)]
        assert not left, f"namespaces left behind: {left}"


# -- what the nodes say ----------------------------------------------------------------


def wait_until(lab: Lab, check, what: str, timeout: float = WAIT, detail=lambda: "") -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        lab.check_alive()
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{detail()}")
        time.sleep(0.3)


class View:
    """Who each node says it is connected to, by node number."""

    def __init__(self, lab: Lab, ids: dict[int, str]) -> None:
        self.lab = lab
        self.number = {node_id: k for k, node_id in ids.items()}
        self.links: dict[int, list[int | str] | None] = {}

    def refresh(self) -> None:
        for k, reply in self.lab.ask(NODES, "info").items():
            if reply is None or reply.get("status") != 200:
                self.links[k] = None
                continue
            peers = [self.number.get(p["node_id"], p["node_id"]) for p in reply["response"]["connected"]]
            assert len(peers) == len(set(peers)), f"node {k} holds two connections to one node: {peers}"
            assert k not in peers, f"node {k} is connected to itself"
            self.links[k] = peers

    def connected(self, group: tuple[int, ...]) -> bool:
        """Every node of ``group`` answers and has a connection, and the
        links among them join them all (a connected graph)."""
        if any(not self.links.get(k) for k in group):
            return False
        reached, todo = {group[0]}, [group[0]]
        while todo:
            k = todo.pop()
            for j in group:
                if j not in reached and (j in self.links[k] or k in self.links[j]):
                    reached.add(j)
                    todo.append(j)
        return reached == set(group)

    def across(self) -> list[tuple[int, int | str]]:
        """Live links from one side of the cut to the other (or to unknown nodes)."""
        out = []
        for k, peers in self.links.items():
            other = SIDE_B if k in SIDE_A else SIDE_A
            out += [(k, p) for p in peers or [] if p in other or not isinstance(p, int)]
        return out

    def __str__(self) -> str:
        return "connections: " + ", ".join(f"{k}->{self.links.get(k)}" for k in NODES)


def publish(lab: Lab, k: int, payload: object) -> str:
    reply = lab.call(k, "publish", {"topic": TOPIC, "payload": payload})
    assert reply["status"] == 202, f"publish on node {k}: {reply}"
    return reply["response"]["id"]


def expect_delivery(lab: Lab, what: str, **messages: tuple[str, tuple[int, ...]]) -> float:
    """Each message (``name=(id, nodes)``) reaches the subscriber of every
    node in ``nodes`` exactly once, and no other node's; returns how long
    they took to arrive."""
    def arrived() -> bool:
        return all(mid in lab.received(k) for mid, to in messages.values() for k in to)

    def counts(mid: str) -> dict[int, int]:
        return {k: lab.received(k).count(mid) for k in NODES}

    took = wait_until(lab, arrived, what, detail=lambda: "copies per node: " + "; ".join(
        f"{name} {counts(mid)}" for name, (mid, _) in messages.items()))
    time.sleep(SETTLE)
    for name, (mid, to) in messages.items():
        expected = {k: 1 if k in to else 0 for k in NODES}
        assert counts(mid) == expected, f"{name}: copies per node {counts(mid)}, expected {expected}"
    return took


# -- the test ------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_six_nodes_survive_a_partition_and_heal(lab):
    timings = {}
    for k in NODES:
        lab.start_node(k, *(() if k == 1 else ("--peer", lab.url(1))))
    for k in NODES:
        lab.start_agent(k)

    replies: dict[int, dict | None] = {}

    def all_answer() -> bool:
        replies.update(lab.ask(NODES, "info"))
        return all(r is not None and r.get("status") == 200 for r in replies.values())

    wait_until(lab, all_answer, "all six nodes to answer info",
               detail=lambda: "\n".join(f"node {k}:\n{lab.log_tail(k)}" for k in NODES))
    ids = {k: replies[k]["response"]["node_id"] for k in NODES}
    assert len(set(ids.values())) == 6
    view = View(lab, ids)
    urls = {k: lab.url(k) for k in NODES}

    def joined() -> bool:
        view.refresh()
        if not view.connected(NODES):
            return False
        # Every node knows every other's address, so that either side,
        # once cut off, can still find its own members.
        known = lab.ask(NODES, "peers")
        return all(r is not None and set(urls.values()) - {urls[k]} <= set(r["response"]["peers"])
                   for k, r in known.items())

    timings["join"] = wait_until(lab, joined, "the six nodes to form one connected network",
                                 detail=lambda: str(view))

    for k in NODES:
        lab.start_watcher(k)
    wait_until(lab, lambda: all(lab.watcher_ready(k) for k in NODES), "every subscriber to subscribe")

    first = publish(lab, 1, {"phase": "before the cut"})
    timings["before"] = expect_delivery(lab, "a message before the cut to reach all six",
                                        before=(first, NODES))

    # The cut: the switch ports of side B move to a second bridge. Frames
    # between the sides are then silently lost, as when a real switch or
    # link fails: no RST, no ICMP, no local error (a blackhole route would
    # fail sends at once, which is gentler). Only the nodes' own pings can
    # tell that the connections across are dead.
    cut_at = time.monotonic()
    lab.move(SIDE_B, "br1")

    def split() -> bool:
        view.refresh()
        return not view.across() and view.connected(SIDE_A) and view.connected(SIDE_B)

    timings["cut"] = wait_until(
        lab, split, "no connection across the cut, each side connected within itself",
        detail=lambda: f"{view}\nacross: {view.across()}")
    print(f"cut detected after {time.monotonic() - cut_at:.1f}s")

    on_a = publish(lab, 2, {"phase": "cut", "side": "A"})
    on_b = publish(lab, 5, {"phase": "cut", "side": "B"})
    timings["sides"] = expect_delivery(lab, "each side's message to reach its own side",
                                       side_a=(on_a, SIDE_A), side_b=(on_b, SIDE_B))
    # Hold the cut until every node has failed again and again to dial each
    # node across it (foxnode then calls the address "failing" and backs
    # its retries off), so that the heal is a recovery from backoff, not
    # from a moment's outage.
    dials: dict[int, dict[str, tuple]] = {}

    def given_up() -> bool:
        for k, reply in lab.ask(NODES, "info", {"detail": True}).items():
            if reply is None:
                return False
            dials[k] = {p["addr"]: (p["state"], p["failures"])
                        for p in reply["response"].get("peers", [])}
        return all(dials[k].get(urls[j], ("?", 0))[0] == "failing"
                   for k in NODES for j in (SIDE_B if k in SIDE_A else SIDE_A))

    timings["failing"] = wait_until(lab, given_up, "every node to mark the other side failing",
                                    detail=lambda: "\n".join(f"{k}: {dials.get(k)}" for k in NODES))
    # Still cut: the sides did not find each other meanwhile.
    view.refresh()
    assert not view.across(), f"a connection across the cut: {view.across()}"
    assert view.connected(SIDE_A) and view.connected(SIDE_B), str(view)

    # Heal: side B's ports back on the one bridge.
    heal_at = time.monotonic()
    lab.move(SIDE_B, "br0")

    def healed() -> bool:
        view.refresh()
        return view.connected(NODES) and bool(view.across())

    timings["heal"] = wait_until(lab, healed, "the nodes to reconnect across the healed cut",
                                 detail=lambda: str(view))
    print(f"reconnected {time.monotonic() - heal_at:.1f}s after the heal: {view}")

    last = publish(lab, 6, {"phase": "after the heal"})
    timings["after"] = expect_delivery(lab, "a message after the heal to reach all six",
                                       after=(last, NODES))

    # No subscriber ever saw any message twice.
    for k in NODES:
        got = lab.received(k)
        assert len(got) == len(set(got)), f"node {k}'s subscriber got a message twice: {got}"
    for k in NODES:
        assert lab.watchers[k].poll() is None, f"node {k}'s subscriber stopped"
    print("timings: " + ", ".join(f"{name} {t:.1f}s" for name, t in timings.items()))
