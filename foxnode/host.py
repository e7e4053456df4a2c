"""``twistd foxnode-host``: K real nodes in one process, on one reactor.

    twistd -n foxnode-host --nodes 50 --first 100 --base-port 9000 --dir devnet \\
        -- --network lab --peer ws://127.0.0.1:9000/ws

Node g (``first`` <= g < ``first + nodes``) is the very node ``twistd
foxnode`` runs (tap.py's options, files and locks, service.build), with its
own identity, data directory DIR/node-g (key, peers file, key store, locks)
and port BASE-PORT+g on 127.0.0.1; they share the reactor, the log and one
writer thread for their peer stores. What follows ``--`` are the options of
``twistd foxnode`` that every node of the host is given; what makes one node
itself (``--port``, ``--listen``, ``--data-dir``, ``--peers-file``,
``--advertise``) is the host's to set and refused there.

``--bootstrap`` says whom a node dials first, besides any ``--peer``:
``first``, node 0 (as ``foxnode devnet`` always did); ``tree``, node
(g-1)//2, so that a large network is connected before any peer exchange;
``none``, only the ``--peer`` given.

Readiness: every node's port is bound before the reactor turns (twistd
starts the service tree first), so once any node's ``/healthz`` answers,
all of them listen; the launcher asks the last one's. A node that cannot
start stops the host's start in one line, as ``twistd foxnode`` does.

Every address here is on 127.0.0.1.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.python import usage

from foxnode import tap
from foxnode.launch import LOOPBACK
from foxnode.storewriter import ThreadRunner

#: Most nodes one host process runs.
MAX_NODES = 1000
BOOTSTRAPS = ("first", "tree", "none")
#: Options of ``twistd foxnode`` that make a node itself: the host's to set.
PER_NODE = ("--port", "-p", "--listen", "--data-dir", "--peers-file", "--advertise")


def node_port(base_port: int, index: int) -> int:
    return base_port + index


def node_url(base_port: int, index: int) -> str:
    return f"ws://{LOOPBACK}:{node_port(base_port, index)}/ws"


def bootstrap_of(index: int, how: str) -> int | None:
    """The node that node ``index`` dials first, or None."""
    if index == 0 or how == "none":
        return None
    return 0 if how == "first" else (index - 1) // 2


class SharedRunner:
    """One writer thread for every peer store of the process: a store's
    ``stop`` leaves it running for the others; the host stops it last."""

    def __init__(self, runner: ThreadRunner) -> None:
        self._runner = runner

    def run(self, write: Any, *args: Any) -> Deferred:
        return self._runner.run(write, *args)

    def stop(self) -> None:
        pass


def _whole(option: str, low: int, high: int) -> Any:
    return tap.Bounded(option, int, low, high)


class Options(usage.Options):
    synopsis = "--nodes K [--first I] [--base-port P] [--dir DIR] [-- NODE-OPTIONS]"
    longdesc = ("Run K foxnode nodes in one process, sharing one reactor: node g has its data in "
                "DIR/node-g and listens on 127.0.0.1:P+g. NODE-OPTIONS, after --, are options of "
                "twistd foxnode given to every node (twistd foxnode --help lists them).")
    optParameters = [
        ["nodes", "n", 1, "How many nodes this process runs.", _whole("nodes", 1, MAX_NODES)],
        ["first", None, 0, "The index of this process's first node.", _whole("first", 0, 65534)],
        ["base-port", None, 9000, "Node g listens on 127.0.0.1:BASE-PORT+g.", _whole("base-port", 1, 65535)],
        ["dir", None, "devnet", "Node g keeps its data in DIR/node-g."],
        ["bootstrap", None, "first", "Whom each node dials first besides --peer: first (node 0), "
                                     "tree (node (g-1)//2) or none."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.node_args: list[str] = []

    def parseArgs(self, *args: str) -> None:
        self.node_args = list(args)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise SystemExit(f"twistd foxnode-host: {e} (twistd foxnode-host --help lists the options)") from None

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir: give a directory")
        if self["bootstrap"] not in BOOTSTRAPS:
            raise usage.UsageError(f"--bootstrap {self['bootstrap']}: give one of {', '.join(BOOTSTRAPS)}")
        last = self["first"] + self["nodes"] - 1
        if node_port(self["base-port"], last) > 65535:
            raise usage.UsageError(f"--base-port {self['base-port']}: node {last}'s port "
                                   f"{node_port(self['base-port'], last)} is past 65535")
        for arg in self.node_args:
            name = arg.split("=", 1)[0]
            if name in PER_NODE:
                raise usage.UsageError(f"{name}: each node's own; the host sets it (--base-port, --dir)")
        # Every node's options, checked now: one line before anything starts.
        self.node_options(self["first"])

    def indexes(self) -> range:
        return range(self["first"], self["first"] + self["nodes"])

    def node_directory(self, index: int) -> str:
        return os.path.join(self["dir"], f"node-{index}")

    def node_options(self, index: int) -> tap.Options:
        directory = self.node_directory(index)
        args = [*self.node_args,
                "--listen", f"tcp:{node_port(self['base-port'], index)}:interface={LOOPBACK}",
                "--data-dir", directory, "--peers-file", os.path.join(directory, "peers.json")]
        parent = bootstrap_of(index, self["bootstrap"])
        if parent is not None:
            args += ["--peer", node_url(self["base-port"], parent)]
        options = tap.Options()
        try:
            options.parseOptions(args)
        except usage.UsageError as e:
            raise usage.UsageError(f"node option {e}") from None
        return options


class HostService(service.MultiService):
    """The nodes of one process; at stop, every node stops (side by side),
    then the shared writer thread ends."""

    def __init__(self, runner: ThreadRunner) -> None:
        super().__init__()
        self.runner = runner

    @property
    def nodes(self) -> list[Any]:
        return list(self)

    def stopService(self) -> Deferred:
        return super().stopService().addBoth(self._stopped)

    def _stopped(self, result: Any) -> Any:
        self.runner.stop()
        return result


def _more_files() -> None:
    """K nodes hold K listening sockets, their connections and files: take
    the hard limit of open files, as far as the soft one may go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass


def makeService(config: Options, reactor: Any = None) -> HostService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    _more_files()
    runner = ThreadRunner(reactor, name="foxnode-host-writer")
    shared = SharedRunner(runner)
    host = HostService(runner)
    for index in config.indexes():
        os.makedirs(config.node_directory(index), exist_ok=True)
        node = tap.makeService(config.node_options(index), reactor, runner=shared)
        node.setName(f"node-{index}")
        node.setServiceParent(host)
    return host
