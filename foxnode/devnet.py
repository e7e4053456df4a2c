"""``foxnode devnet``: N nodes on 127.0.0.1 that form one network, started,
watched and stopped through the process launcher (``foxnode.launch``).

    foxnode devnet --nodes 3
    foxnode devnet --nodes 5 --plugin chain     # every node loads the plugin

Each node is a ``twistd foxnode`` child with its own data directory DIR/node-i
(key, peers file, log) and port BASE+i; nodes 1..N-1 bootstrap from node 0.
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
from typing import IO, Any

import attrs
from twisted.internet.defer import DeferredList, ensureDeferred

from foxnode import client, launch
from foxnode.cli import EXIT_ERROR, EXIT_USAGE, Failed, _say, _sleep
from foxnode.launch import LOOPBACK, exit_text, log_tail


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
    exit_reported: bool = False
    #: the devnet's own connection to the node, kept open for polling
    #: (one connection, rather than one per poll in the node's log)
    conn: Any = None

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
        return self.directory / "twistd.log"

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
                 poll_interval: float = 0.5, plugins: tuple[str, ...] = ()) -> None:
        self.reactor = reactor
        self.directory = directory
        self.network = network
        self.debug = debug
        self.out = out or sys.stdout
        self.poll_interval = poll_interval
        #: ``--plugin`` values every node is started with
        self.plugins = tuple(plugins)
        self.nodes = [DevNode(i, base_port + i, directory / f"node-{i}") for i in range(count)]
        self._lock: int | None = None

    def say(self, line: str) -> None:
        _say(self.out, line)

    def options(self, node: DevNode) -> list[str]:
        """The foxnode options of ``node`` beyond its port and directory."""
        extra = ["--network", self.network]
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

    def start(self) -> None:
        last = self.nodes[-1].port
        self.say(f"foxnode devnet: {len(self.nodes)} node(s) on {LOOPBACK}, ports {self.nodes[0].port}-{last}, "
                 f"network {self.network!r}, data in {self.directory}")
        for node in self.nodes:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            # A session of its own: Ctrl-C reaches the devnet only, which
            # then stops every node in order.
            node.process = launch.launch_node(
                self.reactor, node.directory, *self.options(node), port=node.port,
                log_path=node.log_path, new_session=True,
                banner=f"=== foxnode devnet: {node.name} starting at {stamp} ===")
            self.say(f"{node.name}: starting (pid {node.process.pid}), log {node.log_path}")

    async def _info(self, node: DevNode, timeout: float = 2.0) -> dict | None:
        """The node's ``info``, or None when it does not answer."""
        try:
            if node.conn is None or not node.conn.fox_open:
                node.conn = None
                node.conn = await client.connect(self.reactor, node.url, timeout=timeout)
            reply = await node.conn.request("info", timeout=timeout)
        except Exception:
            if node.conn is not None:
                node.conn.close()
                node.conn = None
            return None
        if reply.ok() and isinstance(reply.response, dict):
            return reply.response
        return None

    def _exited(self, during_start: bool) -> list[DevNode]:
        gone = [n for n in self.nodes if n.process is not None and not n.running() and not n.exit_reported]
        for node in gone:
            node.exit_reported = True
            tail = log_tail(node.log_path)
            extra = "" if during_start else " (the others keep running)"
            self.say(f"{node.name} {exit_text(node.process.returncode)}{extra}; log {node.log_path}"
                     + (f"\n{tail}" if tail else ""))
        return gone

    async def wait_up(self, timeout: float) -> None:
        """Wait until the launcher sees every node serve, and learn each
        node's id from its ``info``."""
        def served(_: Any, node: DevNode) -> None:
            node.serving = True

        for node in self.nodes:
            # An exit or a timeout is seen below, from the node's state.
            node.process.serving(timeout).addCallbacks(served, lambda _: None, callbackArgs=(node,))
        deadline = self.reactor.seconds() + timeout
        up = 0
        self.say(f"nodes up: 0/{len(self.nodes)}")
        while True:
            if self._exited(during_start=True):
                raise Failed(EXIT_ERROR, "a node failed to start; see its log above")
            waiting = [n for n in self.nodes if n.serving and n.node_id is None]
            results = await DeferredList([ensureDeferred(self._info(n)) for n in waiting])
            for node, (_, info) in zip(waiting, results):
                if info is not None:
                    node.node_id = str(info.get("node_id"))
                    node.connected = len(info.get("connected") or [])
            now_up = sum(1 for n in self.nodes if n.node_id is not None)
            if now_up != up:
                up = now_up
                self.say(f"nodes up: {up}/{len(self.nodes)}")
            if up == len(self.nodes):
                return
            if self.reactor.seconds() > deadline:
                late = ", ".join(n.name for n in self.nodes if n.node_id is None)
                raise Failed(EXIT_ERROR, f"not up after {timeout:g}s: {late}; see their logs in {self.directory}")
            await _sleep(self.reactor, 0.2)

    def show_addresses(self) -> None:
        width = max(len(n.name) for n in self.nodes)
        for node in self.nodes:
            self.say(f"{node.name:<{width}}  {node.url}  {node.page}  id {node.node_id}")

    # -- watch ---------------------------------------------------------------------

    async def _poll_connections(self) -> bool:
        """Ask every running node for its live peer connections; True when
        the counts changed."""
        alive = [n for n in self.nodes if n.running()]
        results = await DeferredList([ensureDeferred(self._info(n)) for n in alive])
        changed = False
        for node, (_, info) in zip(alive, results):
            count = None if info is None else len(info.get("connected") or [])
            if count != node.connected:
                node.connected, changed = count, True
        for node in self.nodes:
            if not node.running() and node.connected is not None:
                node.connected, changed = None, True
        return changed

    def show_connections(self) -> None:
        parts = []
        for node in self.nodes:
            if not node.running():
                parts.append(f"{node.name} down")
            else:
                parts.append(f"{node.name} {'?' if node.connected is None else node.connected}")
        self.say("live peer connections: " + ", ".join(parts))

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
                names = ", ".join(n.name for n in self.unconnected())
                self.say(f"not connected after {timeout:g}s: {names}; the devnet keeps running "
                         f"(see the logs in {self.directory})")
                return
            await _sleep(self.reactor, self.poll_interval)

    async def monitor(self, interval: float = 2.0) -> None:
        """Keep showing changes (connections, nodes that exit) until stopped."""
        all_connected = not self.unconnected()
        while True:
            await _sleep(self.reactor, interval)
            self._exited(during_start=False)
            if not any(n.running() for n in self.nodes):
                raise Failed(EXIT_ERROR, "every node has exited")
            if len(self.nodes) > 1 and await self._poll_connections():
                self.show_connections()
                now = not self.unconnected()
                if now and not all_connected:
                    self.say(f"all {len(self.nodes)} nodes connected")
                all_connected = now

    # -- stop ----------------------------------------------------------------------

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, wait up to ``timeout``, SIGKILL the rest."""
        for node in self.nodes:
            if node.conn is not None:
                node.conn.close()
                node.conn = None
        running = [n for n in self.nodes if n.running()]
        if running:
            self.say(f"stopping {len(running)} node(s)")

            def killing(node: DevNode) -> None:
                self.say(f"{node.name} did not stop within {timeout:g}s; killing it")

            stopped = DeferredList([n.process.stop(timeout, on_kill=lambda n=n: killing(n))
                                    for n in running])
            # A node stuck where even SIGKILL cannot end it must not hang us.
            stopped.addTimeout(timeout + 5, self.reactor)
            try:
                await stopped
            except Exception:
                pass
            for node in running:
                code = node.process.returncode
                # twistd ends a SIGTERM'd run by re-raising the signal on itself.
                if code not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                    self.say(f"{node.name} {exit_text(code)}; log {node.log_path}")
            self.say(f"devnet stopped; data kept in {self.directory}")
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


async def run_devnet(reactor: Any, opts: argparse.Namespace) -> None:
    net = Devnet(reactor, Path(opts.dir).absolute(), opts.nodes, opts.base_port, opts.network,
                 debug=opts.debug, plugins=tuple(getattr(opts, "plugin", ()) or ()))
    net.prepare()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: ensureDeferred(net.stop(opts.stop_timeout)))
    # A closed terminal stops the devnet as Ctrl-C does (the nodes are in
    # sessions of their own and would not notice).
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reactor.stop))
    net.start()
    await net.wait_up(opts.start_timeout)
    net.show_addresses()
    await net.wait_connected(opts.connect_timeout)
    net.say("Ctrl-C stops the devnet.")
    await net.monitor()
