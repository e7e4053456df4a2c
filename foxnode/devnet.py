"""``foxnode devnet``: N nodes on 127.0.0.1 that form one network, started,
watched and stopped through the process launcher (``foxnode.launch``).

    foxnode devnet --nodes 3
    foxnode devnet --nodes 5 --plugin chain     # every node loads the plugin

Each node has its own data directory DIR/node-i (key, peers file) and port
BASE+i. Up to ``AUTO_PACK`` nodes, each is a ``twistd foxnode`` child (its
log DIR/node-i/twistd.log) and nodes 1..N-1 bootstrap from node 0; above,
or with ``--per-process K``, K nodes share one ``twistd foxnode-host``
process (host.py; its log DIR/host-j.log), and node i bootstraps from node
(i-1)//2, so that the network is connected before any peer exchange. A host
process that dies takes only its nodes down; the others go on, and their
peers notice.
The devnet serves a live page of the whole network (devnetpage.py) on
127.0.0.1, ``--page-port`` (default BASE-1); its receive times come from
the one connection the watcher keeps to each node, subscribed to the page's
topic. The watcher asks at most ``IN_FLIGHT`` nodes at a time, each every
``watch_interval`` seconds once the devnet is up.
Progress goes to stdout, one line per change; failures end the command as
every ``foxnode`` subcommand does (``cli.Failed``: one line on stderr, exit
code 1 or 2).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

import attrs
import orjson
from twisted.internet.defer import DeferredList, ensureDeferred

from foxnode import client, launch, links
from foxnode.cli import EXIT_ERROR, EXIT_USAGE, Failed, _say, _sleep
from foxnode.launch import LOOPBACK, exit_text, log_tail
from foxnode.storefiles import write_atomically


#: Above this many nodes, a devnet packs nodes into host processes.
AUTO_PACK = 30
#: Nodes per host process when packing is automatic.
PER_PROCESS = 50
#: Above this many nodes, the live peer connections are shown as a summary.
SHOW_EACH = 20
#: The most ``info`` requests the watcher has in flight at once: a thousand
#: at once would queue up in the nodes' listen backlogs and the devnet's CPU.
IN_FLIGHT = 100


def watch_interval(nodes: int) -> float:
    """Seconds between two looks at one node once the devnet is up: 2 s,
    longer above 400 nodes, so that the watcher asks about 200 nodes a second
    at most."""
    return max(2.0, nodes / 200)


def per_process(nodes: int, asked: int | None) -> int:
    """Nodes per process: as asked, else 1 up to ``AUTO_PACK`` nodes and
    ``PER_PROCESS`` above."""
    if asked is not None:
        return asked
    return 1 if nodes <= AUTO_PACK else PER_PROCESS


@attrs.define
class DevHost:
    """One ``twistd foxnode-host`` child running nodes ``first``..``last``."""

    index: int
    first: int
    last: int
    log_path: Path
    process: launch.Launched | None = None

    @property
    def name(self) -> str:
        return f"host-{self.index}"

    @property
    def span(self) -> str:
        return f"node-{self.first}" if self.first == self.last else f"node-{self.first}..node-{self.last}"


@attrs.define
class DevNode:
    """One node of a devnet: a ``twistd foxnode`` child on loopback."""

    index: int
    port: int
    directory: Path
    process: launch.Launched | None = None
    #: set once the launcher saw the node serve
    serving: bool = False
    node_id: str | None = None
    #: live peer connections at the last look (None: not asked yet)
    connected: int | None = None
    #: the devnet nodes it has a live peer connection with, by index, at
    #: the last look (the ``connected`` list of its ``info``)
    peers: tuple[int, ...] = ()
    exit_reported: bool = False
    #: the devnet's own connection to the node, kept open for polling
    #: (one connection, rather than one per poll in the node's log)
    conn: Any = None
    #: the host process the node runs in (None: a twistd foxnode of its own)
    host: DevHost | None = None

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def page(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.host.log_path if self.host is not None else self.directory / "twistd.log"

    def running(self) -> bool:
        return self.process is not None and self.process.running


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        # As twistd binds: SO_REUSEADDR, so connections of a previous run
        # lingering in TIME_WAIT do not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class Devnet:
    """N ``twistd foxnode`` children on 127.0.0.1, each with its own data
    directory DIR/node-i (key, peers file, log) and port base+i; nodes 1..N-1
    bootstrap from node 0. Progress goes to ``out``, one line per change."""

    def __init__(self, reactor: Any, directory: Path, count: int, base_port: int,
                 network: str, *, debug: bool = False, out: IO[str] | None = None,
                 poll_interval: float = 0.5, per_process: int = 1, node_options: tuple[str, ...] = (),
                 plugins: tuple[str, ...] = (),
                 on_event: Callable[[DevNode, Any], None] | None = None,
                 topics: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.directory = directory
        self.network = network
        self.debug = debug
        self.out = out or sys.stdout
        self.poll_interval = poll_interval
        self.base_port = base_port
        #: foxnode options every node is given (link emulation, ...)
        self.node_options = list(node_options)
        #: ``--plugin`` values every node is started with
        self.plugins = tuple(plugins)
        self.nodes = [DevNode(i, base_port + i, directory / f"node-{i}") for i in range(count)]
        #: the host processes (none when every node runs in its own process)
        self.hosts: list[DevHost] = []
        self.per_process = per_process
        #: how long one host process may take to serve
        self.host_timeout = 60.0
        if per_process > 1:
            for j, first in enumerate(range(0, count, per_process)):
                last = min(first + per_process, count) - 1
                host = DevHost(j, first, last, directory / f"host-{j}.log")
                self.hosts.append(host)
                for node in self.nodes[first:last + 1]:
                    node.host = host
        # Asking a thousand nodes every half second would keep the machine
        # busy: while they connect, about 200 a second at most (then
        # watch_interval, the same).
        self.poll_interval = max(poll_interval, count / 200)
        self._lock: int | None = None
        self._last_summary = ""
        #: set once stop began: the watch says no more
        self.stopping = False
        #: what the devnet's connection to each node subscribes to, and who
        #: hears its events (the devnet page's receive times): the one
        #: connection per node the watcher keeps, no second one
        self.topics = tuple(topics)
        self.on_event = on_event
        #: grows whenever a node goes up or down or its peers change, so that
        #: a reader (the devnet page) sees a change without comparing
        self.version = 0

    def say(self, line: str) -> None:
        _say(self.out, line)

    def options(self, node: DevNode) -> list[str]:
        """The foxnode options of ``node`` beyond its port and directory."""
        extra = ["--network", self.network, *self.node_options]
        if node.index > 0:
            extra += ["--peer", self.nodes[0].url]
        if self.debug:
            extra.append("--debug")
        for spec in self.plugins:
            extra += ["--plugin", spec]
        return extra

    # -- start --------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the directory and the ports before starting anything."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.directory / "devnet.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise Failed(EXIT_USAGE, f"cannot use {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise Failed(EXIT_USAGE, f"{self.directory} is in use by another foxnode devnet") from None
        for node in self.nodes:
            if port_in_use(node.port):
                raise Failed(EXIT_USAGE, f"port {node.port} ({node.name}) on {LOOPBACK} is in use; "
                                         "a devnet of an earlier run may still be up, or choose --base-port")

    def host_options(self) -> list[str]:
        """The foxnode options every node of a host process is given."""
        return (["--network", self.network, *self.node_options] + (["--debug"] if self.debug else [])
                + [option for spec in self.plugins for option in ("--plugin", spec)])

    def processes(self) -> list[tuple[str, launch.Launched]]:
        """(name, process) of every child started, one per process."""
        if self.hosts:
            return [(h.name, h.process) for h in self.hosts if h.process is not None]
        return [(n.name, n.process) for n in self.nodes if n.process is not None]

    def start(self) -> None:
        last = self.nodes[-1].port
        packed = (f", {len(self.hosts)} process(es) of up to {self.per_process} nodes"
                  if self.hosts else "")
        self.say(f"foxnode devnet: {len(self.nodes)} node(s) on {LOOPBACK}, ports {self.nodes[0].port}-{last}, "
                 f"network {self.network!r}, data in {self.directory}{packed}")
        if self.hosts:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._launch_ready()
            return
        for node in self.nodes:
            self.relaunch(node)

    def _needs(self, host: DevHost) -> set[int]:
        """The other hosts running the first peers (node (i-1)//2) of ``host``'s nodes."""
        return {((i - 1) // 2) // self.per_process for i in range(max(1, host.first), host.last + 1)} - {host.index}

    def _launch_ready(self) -> None:
        """Launch every host whose nodes' first peers all serve already:
        then no first dial is refused into a growing backoff, and the
        processes come up in waves (1, 2, 4, ...) rather than all at once
        on the cores."""
        if self.stopping:
            return
        serving = {h.index for h in self.hosts if self.nodes[h.first].serving}
        for host in self.hosts:
            if host.process is None and self._needs(host) <= serving:
                self.relaunch(host)

                def served(_: Any, host: DevHost = host) -> None:
                    for node in self.nodes[host.first:host.last + 1]:
                        node.serving = True
                    self._launch_ready()

                # A host that does not serve is seen by wait_up, from its exit or the time.
                host.process.serving(self.host_timeout).addCallbacks(served, lambda _: None)

    def relaunch(self, what: DevHost | DevNode) -> None:
        """Start a host process or a node (again: its data is kept)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if isinstance(what, DevHost):
            host = what
            # A session of its own: Ctrl-C reaches the devnet only, which
            # then stops every node in order.
            host.process = launch.launch_host(
                self.reactor, self.directory, host.last - host.first + 1, host.first, self.base_port,
                *self.host_options(), log_path=host.log_path, bootstrap="tree", new_session=True,
                banner=f"=== foxnode devnet: {host.name} ({host.span}) starting at {stamp} ===")
            for node in self.nodes[host.first:host.last + 1]:
                node.process, node.exit_reported = host.process, False
            self.say(f"{host.name}: starting {host.span} (pid {host.process.pid}), log {host.log_path}")
            return
        node = what
        node.process = launch.launch_node(
            self.reactor, node.directory, *self.options(node), port=node.port,
            log_path=node.log_path, new_session=True,
            banner=f"=== foxnode devnet: {node.name} starting at {stamp} ===")
        node.exit_reported = False
        self.say(f"{node.name}: starting (pid {node.process.pid}), log {node.log_path}")

    async def _info(self, node: DevNode, timeout: float = 2.0) -> dict | None:
        """The node's ``info``, or None when it does not answer."""
        try:
            if node.conn is None or not node.conn.fox_open:
                node.conn = None
                node.conn = await self._connect(node, timeout)
            reply = await node.conn.request("info", timeout=timeout)
        except Exception:
            if node.conn is not None:
                node.conn.close()
                node.conn = None
            return None
        if reply.ok() and isinstance(reply.response, dict):
            return reply.response
        return None

    async def _connect(self, node: DevNode, timeout: float) -> Any:
        """The devnet's connection to ``node``, subscribed to ``topics``."""
        on_event = None if self.on_event is None else (lambda event: self.on_event(node, event))
        conn = await client.connect(self.reactor, node.url, timeout=timeout, on_event=on_event)
        if self.topics:
            try:
                reply = await conn.request("subscribe", {"topics": list(self.topics)}, timeout=timeout)
            except Exception:
                conn.close()
                raise
            if not reply.ok():
                conn.close()
                raise RuntimeError(f"{node.name} refused the subscription: {reply.error}")
        return conn

    def peers_of(self, info: dict) -> tuple[int, ...]:
        """The devnet nodes in an ``info``'s ``connected`` list, by index:
        by node id, or by the port of its address when the id is not known."""
        by_id = {n.node_id: n.index for n in self.nodes if n.node_id is not None}
        found = set()
        for peer in info.get("connected") or []:
            if not isinstance(peer, dict):
                continue
            index = by_id.get(peer.get("node_id"))
            if index is None:
                try:
                    index = int(str(peer["addr"]).rsplit(":", 1)[1].split("/")[0]) - self.base_port
                except (KeyError, ValueError, IndexError):
                    continue
            if 0 <= index < len(self.nodes):
                found.add(index)
        return tuple(sorted(found))

    def _exited(self, during_start: bool) -> list[DevNode]:
        if self.hosts:
            return self._hosts_exited(during_start)
        gone = [n for n in self.nodes if n.process is not None and not n.running() and not n.exit_reported]
        for node in gone:
            node.exit_reported = True
            tail = log_tail(node.log_path)
            extra = "" if during_start else " (the others keep running)"
            self.say(f"{node.name} {exit_text(node.process.returncode)}{extra}; log {node.log_path}"
                     + (f"\n{tail}" if tail else ""))
        return gone

    def _hosts_exited(self, during_start: bool) -> list[DevNode]:
        gone: list[DevNode] = []
        for host in self.hosts:
            nodes = self.nodes[host.first:host.last + 1]
            if host.process is None or host.process.running or nodes[0].exit_reported:
                continue
            for node in nodes:
                node.exit_reported = True
            gone += nodes
            tail = log_tail(host.log_path)
            extra = "" if during_start else " (the others keep running)"
            self.say(f"{host.name} ({host.span}) {exit_text(host.process.returncode)}{extra}; log {host.log_path}"
                     + (f"\n{tail}" if tail else ""))
        return gone

    async def wait_up(self, timeout: float) -> None:
        """Wait until the launcher sees every node serve, and learn each
        node's id from its ``info``."""
        def served(_: Any, node: DevNode) -> None:
            node.serving = True

        # An exit or a timeout is seen below, from the node's state; hosts
        # are marked serving as they are launched, one after another (start).
        if not self.hosts:
            for node in self.nodes:
                node.process.serving(timeout).addCallbacks(served, lambda _: None, callbackArgs=(node,))
        deadline = self.reactor.seconds() + timeout
        up = 0
        self.say(f"nodes up: 0/{len(self.nodes)}")
        while True:
            if self._exited(during_start=True):
                raise Failed(EXIT_ERROR, "a node failed to start; see its log above")
            # A few hundred at a time: a thousand connections at once would
            # queue up in the listen backlogs.
            waiting = [n for n in self.nodes if n.serving and n.node_id is None][:200]
            results = await DeferredList([ensureDeferred(self._info(n)) for n in waiting])
            for node, (_, info) in zip(waiting, results):
                if info is not None:
                    node.node_id = str(info.get("node_id"))
                    node.connected = len(info.get("connected") or [])
                    node.peers = self.peers_of(info)
                    self.version += 1
            now_up = sum(1 for n in self.nodes if n.node_id is not None)
            if now_up != up:
                up = now_up
                self.say(f"nodes up: {up}/{len(self.nodes)}")
            if up == len(self.nodes):
                return
            if self.reactor.seconds() > deadline:
                late = _names([n for n in self.nodes if n.node_id is None])
                raise Failed(EXIT_ERROR, f"not up after {timeout:g}s: {late}; see their logs in {self.directory}")
            await _sleep(self.reactor, 0.2)

    def show_addresses(self) -> None:
        """One line per node (its URL, page and id), the first ``SHOW_EACH``
        of a large devnet; all of them in DIR/nodes.json."""
        listing = [{"name": n.name, "url": n.url, "page": n.page, "node_id": n.node_id,
                    "process": n.host.name if n.host is not None else n.name} for n in self.nodes]
        write_atomically(self.directory / "nodes.json", orjson.dumps(listing, option=orjson.OPT_INDENT_2))
        width = max(len(n.name) for n in self.nodes)
        for node in self.nodes[:SHOW_EACH]:
            self.say(f"{node.name:<{width}}  {node.url}  {node.page}  id {node.node_id}")
        if len(self.nodes) > SHOW_EACH:
            self.say(f"... and {len(self.nodes) - SHOW_EACH} more: every node in {self.directory / 'nodes.json'}")

    # -- watch ---------------------------------------------------------------------

    async def _poll_connections(self, spread: float = 0.0) -> bool:
        """Ask every running node for its live peer connections, at most
        ``IN_FLIGHT`` at a time, the batches spread over ``spread`` seconds;
        True when the counts changed."""
        alive = [n for n in self.nodes if n.running()]
        batches = [alive[at:at + IN_FLIGHT] for at in range(0, len(alive), IN_FLIGHT)]
        changed = False
        for k, batch in enumerate(batches):
            if k and spread:
                await _sleep(self.reactor, spread / len(batches))
            results = await DeferredList([ensureDeferred(self._info(n)) for n in batch])
            for node, (_, info) in zip(batch, results):
                count = None if info is None else len(info.get("connected") or [])
                peers = () if info is None else self.peers_of(info)
                if peers != node.peers:
                    node.peers = peers
                    self.version += 1
                if count != node.connected:
                    node.connected, changed = count, True
                    self.version += 1
        for node in self.nodes:
            if not node.running() and (node.connected is not None or node.peers):
                node.connected, node.peers, changed = None, (), True
                self.version += 1
        return changed

    def show_connections(self) -> None:
        if len(self.nodes) > SHOW_EACH:
            summary = self.connection_summary()
            if summary != self._last_summary:
                self._last_summary = summary
                self.say("live peer connections: " + summary)
            return
        parts = []
        for node in self.nodes:
            if not node.running():
                parts.append(f"{node.name} down")
            else:
                parts.append(f"{node.name} {'?' if node.connected is None else node.connected}")
        self.say("live peer connections: " + ", ".join(parts))

    def connection_summary(self) -> str:
        """``37/40 nodes with a peer, 3 down; peers per node: min 1, median 6, max 24``."""
        down = [n for n in self.nodes if not n.running()]
        counts = sorted(n.connected for n in self.nodes if n.running() and n.connected is not None)
        with_peer = sum(1 for c in counts if c)
        unknown = len(self.nodes) - len(down) - len(counts)
        text = f"{with_peer}/{len(self.nodes)} nodes with a peer"
        if down:
            text += f", {len(down)} down"
        if unknown:
            text += f", {unknown} not answering"
        if counts:
            text += f"; peers per node: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}"
        return text

    def unconnected(self) -> list[DevNode]:
        return [n for n in self.nodes if not n.connected]

    async def wait_connected(self, timeout: float) -> None:
        """Show the live peer connections until every node has one, or
        until ``timeout``; then say which nodes are not connected."""
        if len(self.nodes) == 1:
            self.say("a single node: no peers to connect to")
            return
        deadline = self.reactor.seconds() + timeout
        self.show_connections()
        while True:
            self._exited(during_start=False)
            if await self._poll_connections():
                self.show_connections()
            if not self.unconnected():
                self.say(f"all {len(self.nodes)} nodes connected")
                return
            if self.reactor.seconds() > deadline:
                names = _names(self.unconnected())
                self.say(f"not connected after {timeout:g}s: {names}; the devnet keeps running "
                         f"(see the logs in {self.directory})")
                return
            await _sleep(self.reactor, self.poll_interval)

    async def monitor(self, interval: float | None = None) -> None:
        """Keep showing changes (connections, nodes that exit) until stopped,
        looking at each node every ``interval`` (default ``watch_interval``)."""
        if interval is None:
            interval = watch_interval(len(self.nodes))
        all_connected = not self.unconnected()
        while True:
            # Half the interval asleep, half spreading the requests out.
            await _sleep(self.reactor, interval / 2)
            if self._exited(during_start=False):
                self.version += 1
            if not any(n.running() for n in self.nodes):
                raise Failed(EXIT_ERROR, "every node has exited")
            if self.stopping:
                return
            if len(self.nodes) > 1 and await self._poll_connections(interval / 2) and not self.stopping:
                self.show_connections()
                now = not self.unconnected()
                if now and not all_connected:
                    self.say(f"all {len(self.nodes)} nodes connected")
                all_connected = now

    # -- stop ----------------------------------------------------------------------

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, wait up to ``timeout``, SIGKILL the rest."""
        self.stopping = True
        for node in self.nodes:
            if node.conn is not None:
                node.conn.close()
                node.conn = None
        running = [n for n in self.nodes if n.running()]
        if running:
            processes = [(name, p) for name, p in self.processes() if p.running]
            self.say(f"stopping {len(running)} node(s)"
                     + (f" in {len(processes)} process(es)" if self.hosts else ""))

            def killing(name: str) -> None:
                self.say(f"{name} did not stop within {timeout:g}s; killing it")

            stopped = DeferredList([p.stop(timeout, on_kill=lambda name=name: killing(name))
                                    for name, p in processes])
            # A node stuck where even SIGKILL cannot end it must not hang us.
            stopped.addTimeout(timeout + 5, self.reactor)
            try:
                await stopped
            except Exception:
                pass
            for name, process in processes:
                code = process.returncode
                # twistd ends a SIGTERM'd run by re-raising the signal on itself.
                if code not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                    self.say(f"{name} {exit_text(code)}; log {process.log_path}")
            self.say(f"devnet stopped; data kept in {self.directory}")
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def start_timeout(given: float | None, nodes: int) -> float:
    """``--start-timeout``, or 30 s and a tenth of a second per node above
    300 (host processes start one after another)."""
    return given if given is not None else max(30.0, nodes / 10)


def link_options(latency: str | None, loss: str | None, bandwidth: str | None) -> tuple[str, ...]:
    """The nodes' ``--link-*`` options for the devnet's ``--latency``,
    ``--loss`` and ``--bandwidth`` (already checked)."""
    out: list[str] = []
    for option, value in (("--link-latency", latency), ("--link-loss", loss), ("--link-bandwidth", bandwidth)):
        if value is not None:
            out += [option, value]
    return tuple(out)


def _names(nodes: list[DevNode], most: int = 10) -> str:
    """``node-3, node-7`` (and how many more)."""
    shown = ", ".join(n.name for n in nodes[:most])
    return shown + (f" and {len(nodes) - most} more" if len(nodes) > most else "")


def page_port(given: int | None, base_port: int) -> int:
    """``--page-port``: as given (0: no page), else the port below the nodes'
    when it is free, else any free port."""
    if given is not None:
        return given
    if base_port > 1024 and not port_in_use(base_port - 1):
        return base_port - 1
    return -1  # a free one, chosen when listening


async def serve_page(reactor: Any, net: Devnet, spreads: Any, port: int) -> Any:
    """Serve the devnet page (foxnode.devnetpage); its listening port."""
    from foxnode import devnetpage

    page = devnetpage.DevnetPage(net, spreads)
    try:
        listening = await devnetpage.listen(reactor, page, max(0, port))
    except Exception as e:
        raise Failed(EXIT_USAGE, f"cannot serve the devnet page on {LOOPBACK}:{port}: {e}; "
                                 "choose another --page-port, or 0 for none") from None
    net.say(f"devnet page: http://{LOOPBACK}:{listening.getHost().port}/")
    return page, listening


async def run_devnet(reactor: Any, opts: argparse.Namespace) -> None:
    from foxnode import devnetpage

    port = page_port(getattr(opts, "page_port", 0), opts.base_port)
    # The page's receive times come from the connections the watcher keeps,
    # subscribed to the page's topic: one connection per node, as before.
    spreads = devnetpage.Spreads(reactor) if port else None
    net = Devnet(reactor, Path(opts.dir).absolute(), opts.nodes, opts.base_port, opts.network,
                 debug=opts.debug, per_process=per_process(opts.nodes, opts.per_process),
                 node_options=link_options(opts.latency, opts.loss, opts.bandwidth),
                 plugins=tuple(getattr(opts, "plugin", ()) or ()),
                 on_event=spreads.on_event if spreads else None,
                 topics=(devnetpage.TOPIC,) if spreads else ())
    if net.node_options:
        net.say(f"links: {' '.join(net.node_options)} (emulated in each node's connections, "
                f"no root: {links.EMULATION})")
    net.prepare()
    if spreads is not None:
        page, listening = await serve_page(reactor, net, spreads, port)

        def close_page() -> Any:
            page.close()
            return listening.stopListening()

        reactor.addSystemEventTrigger("before", "shutdown", close_page)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(net.stop(opts.stop_timeout)))
    # A closed terminal stops the devnet as Ctrl-C does (the nodes are in
    # sessions of their own and would not notice).
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reactor.stop))
    net.start()
    await net.wait_up(start_timeout(opts.start_timeout, opts.nodes))
    net.show_addresses()
    await net.wait_connected(opts.connect_timeout)
    net.say("Ctrl-C stops the devnet.")
    await net.monitor()
