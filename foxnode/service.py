"""The running node: the one place its parts are built and connected, and
the service tree that starts and stops them.

``build`` makes the node, the peer manager, gossip and the web site from
their configs, the opened peer store and the identity, and connects them
explicitly: the node's ops and events tables, the peer manager's listeners
(peer up/down), the node's typed references. Nothing wires itself.

``NodeService`` is a ``MultiService``; its children are everything the
node does over time, each started and stopped by twistd's service tree:

- the listening port (``StreamServerEndpointService``), first, so that the
  node knows its port before it dials anyone;
- ``StoreService``: the peer store's lazy writes (learned addresses and
  bookkeeping; registers are written at once), every ``flush_delay``;
- ``PeerService``: the dial rounds (every ``tick``), the peer exchanges
  (every ``--exchange-interval``) and the sweep that forgets failing
  addresses, each a ``TimerService``;
- ``GossipService``: the sweep of expired ids and cached envelopes, and
  the sweep of polled filters not polled for ``filter_timeout`` (filters.py);
- ``HistoryService``, when the node keeps a message store (history.py):
  the sweep of expired envelopes; at stop, catch-up ends and the store's
  last transaction is committed and the file closed.

The key store (keys.py), when given, serves its ops as operator ops.
Plugins (pluginhost.py) come last: their ops join the table (never
replacing one), their validators become gossip's ``screen``.

Stopping: the children stop (no new connections, dials cancelled), then
every connection closes (their closes update the store), then the store's
journal is folded into the peers file and the key store's last write
waited for, side by side, then the file locks are released.

The clock: every part reads time only through the reactor handed to
``build`` (``reactor.seconds()``), so tests hand in a ``Clock``.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from typing import Any, Callable, Iterator, Sequence

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from foxnode import locks, logs
from foxnode.catchup import Catchup
from foxnode.config import (GossipConfig, HistoryConfig, KeyConfig, NodeConfig, PeerConfig, PluginConfig,
                            StoreConfig, WebConfig)
from foxnode.filters import Filters
from foxnode.gossip import Gossip
from foxnode.history import History
from foxnode.identity import Identity
from foxnode.keys import KeyStore
from foxnode.metrics import NodeMetrics
from foxnode.msgstore import MessageStore
from foxnode.node import Node
from foxnode.peers import PeerManager
from foxnode.pluginhost import Plugin, PluginError, PluginHost, load as load_plugins
from foxnode.protocol import FoxServerFactory
from foxnode.store import CLOSE_TIMEOUT, PeerStore
from foxnode.web import make_site

log = logs.logger(__name__)


@attrs.frozen
class Configs:
    """Everything a node is told, part by part (tap.py makes it from the options)."""

    node: NodeConfig = NodeConfig()
    peers: PeerConfig = PeerConfig()
    gossip: GossipConfig = GossipConfig()
    web: WebConfig = WebConfig()
    keys: KeyConfig = KeyConfig()
    store: StoreConfig = StoreConfig()
    history: HistoryConfig = HistoryConfig()
    plugins: PluginConfig = PluginConfig()


def _timer(step: float, call: Callable[[], Any], clock: Any, parent: service.MultiService) -> None:
    timer = TimerService(step, call)
    timer.clock = clock
    timer.setServiceParent(parent)


class PeerService(service.MultiService):
    """The peer manager's activity over time."""

    def __init__(self, peers: PeerManager, clock: Any) -> None:
        super().__init__()
        self.peers = peers
        c = peers.config
        _timer(c.tick, peers.dial_round, clock, self)
        _timer(c.exchange_interval, peers.exchange_round, clock, self)
        _timer(c.sweep_interval, peers.sweep, clock, self)

    def startService(self) -> None:
        self.peers.start()
        super().startService()

    def stopService(self) -> Deferred:
        self.peers.stop()
        return super().stopService()


class StoreService(TimerService):
    """The peer store's lazy writes (learned addresses, bookkeeping), every
    ``flush_delay`` seconds; its last write is the node's stop's
    (``NodeService.stopService``), after the connections have closed."""

    def __init__(self, store: PeerStore, clock: Any) -> None:
        super().__init__(store.flush_delay, store.flush)
        self.clock = clock


class GossipService(service.MultiService):
    """Gossip's sweeps and the filters'; at stop, its graft timers are
    cancelled and the filters ended."""

    def __init__(self, gossip: Gossip, clock: Any, filters: Filters | None = None) -> None:
        super().__init__()
        self.gossip = gossip
        self.filters = filters
        _timer(gossip.config.sweep_interval, gossip.sweep, clock, self)
        if filters is not None:
            _timer(filters.config.filter_sweep_interval, filters.sweep, clock, self)

    def stopService(self) -> Deferred:
        self.gossip.stop()
        if self.filters is not None:
            self.filters.stop()
        return super().stopService()


class HistoryService(service.MultiService):
    """The message store's sweep; at stop, catch-up ends and the store closes."""

    def __init__(self, history: History, catchup: Catchup, clock: Any) -> None:
        super().__init__()
        self.history = history
        self.catchup = catchup
        _timer(history.config.sweep_interval, history.sweep, clock, self)

    def stopService(self) -> Deferred:
        self.catchup.stop()
        return super().stopService()


def build(reactor: Any, configs: Configs, store: PeerStore, identity: Identity,
          endpoint: Any, listen: str = "", file_locks: list[locks.FileLock] | None = None,
          metrics: NodeMetrics | None = None, keys: KeyStore | None = None,
          messages: MessageStore | None = None,
          plugins: Sequence[Plugin] | None = None) -> "NodeService":
    """The node and its parts, connected, as a service ready to start;
    without ``keys`` (a key store opened on the data directory), the node
    serves no key ops; without ``messages`` (a message store), no history.
    ``plugins`` are loaded already (tap.py loads them before it opens the
    node's files); None: load ``configs.plugins``' here. A plugin's op that
    the node serves already is a ``PluginError``."""
    node = Node(reactor, configs.node, identity, store, metrics)
    gossip = Gossip(reactor, identity, node.metrics, configs.gossip, keys=keys)
    gossip.payload_depth = configs.node.max_depth - 2  # the frame, the envelope
    peers = PeerManager(node, configs.peers, listeners=[gossip])
    node.peers, node.gossip = peers, gossip
    node.serve(peers.ops)
    node.serve(peers.operator_ops, operator=True)
    node.serve(gossip.ops)
    filters = Filters(reactor, gossip, node.metrics, configs.gossip)
    node.serve(filters.ops)
    node.hear(gossip.events)
    history = catchup = None
    if messages is not None:
        history = History(reactor, messages, gossip, node.metrics, configs.history)
        catchup = Catchup(reactor, gossip, history, identity.node_id, node.metrics, configs.history,
                          budget=(configs.node.peer_rate, configs.node.peer_burst))
        node.serve(history.ops)
        node.hear(catchup.events)
    if keys is not None:
        # Keys are secrets: only the node's operator makes, reads or deletes them.
        node.serve(keys.ops, operator=True)
    # Last: a plugin adds ops, it never replaces one.
    host = PluginHost(reactor, load_plugins(configs.plugins.modules) if plugins is None else plugins,
                      node.node_id, configs.plugins, request=node.handle_request, peers=node.live_peers,
                      metrics=node.metrics)
    taken = sorted(set(host.ops) & set(node.op_names()))
    if taken:
        raise PluginError(f"{host.owners[taken[0]].origin}: op \"{taken[0]}\" is one of the node's own")
    node.serve(host.ops)
    node.plugins = host.names
    gossip.screen = host.screen
    c = configs.node
    ws_factory = FoxServerFactory(
        node, reactor, max_message_size=c.max_message_size, send_queue=c.send_queue,
        max_depth=c.max_depth, ping_interval=c.ping_interval, ping_timeout=c.ping_timeout,
        open_timeout=c.handshake_timeout, max_connections=c.max_connections,
        max_in_flight=c.max_in_flight, frames=c.frames)
    site = make_site(node, ws_factory, configs.web)
    node_service = NodeService(reactor, node, endpoint, site, listen=listen, file_locks=file_locks,
                               keys=keys, history=history)
    StoreService(store, reactor).setServiceParent(node_service)
    PeerService(peers, reactor).setServiceParent(node_service)
    GossipService(gossip, reactor, filters).setServiceParent(node_service)
    if history is not None and catchup is not None:
        HistoryService(history, catchup, reactor).setServiceParent(node_service)
    # Last again: what plugins do over time starts after the node's parts, stops before them.
    for plugin_service in host.services():
        plugin_service.setServiceParent(node_service)
    return node_service


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """Wraps the configured endpoint to learn the port it really bound
    (``tcp:0`` in tests, or whatever systemd handed over)."""

    def __init__(self, endpoint: Any, on_listening: Any) -> None:
        self._endpoint = endpoint
        self._on_listening = on_listening

    def listen(self, factory: Any) -> Deferred:
        return self._endpoint.listen(factory).addCallback(self._on_listening)


class CannotStart(Exception):
    """The node cannot listen; the message is the whole story, in one line
    (already logged: twistd's top level should add no traceback to it)."""


def _quiet_about_cannot_start(previous: Callable) -> Callable:
    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if not issubclass(kind, CannotStart):
            previous(kind, value, tb)

    return hook


def why_not_listening(error: BaseException, listen: str) -> str:
    """One line for an error from listening on ``listen``."""
    if isinstance(error, CannotListenError):
        cause = error.socketError
        where = f"{error.interface}:{error.port}" if error.interface else f"port {error.port}"
        number = getattr(cause, "errno", None)
        if number == errno.EADDRINUSE:
            return f"{where} is in use (--listen {listen})"
        if number == errno.EACCES:
            return f"no permission to listen on {where} (--listen {listen})"
        if number == errno.EADDRNOTAVAIL:
            return f"{error.interface} is not an address of this machine (--listen {listen})"
        text = getattr(cause, "strerror", None) or str(cause)
        return f"cannot listen on {where}: {text} (--listen {listen})"
    if isinstance(error, CannotStart):
        return str(error)
    return f"--listen {listen}: {str(error).rstrip('.') or type(error).__name__}"


class NodeService(service.MultiService):
    """The running node: its listening port and its long-lived parts."""

    #: what SIGHUP does, set by tap.makeService under twistd
    hangup: Any = None

    def __init__(self, reactor: Any, node: Node, endpoint: Any, site: Any, listen: str = "",
                 file_locks: list[locks.FileLock] | None = None, keys: KeyStore | None = None,
                 history: History | None = None) -> None:
        super().__init__()
        #: closed at stop, after the connections (their last messages kept)
        self.history = history
        self.reactor = reactor
        self.node = node
        self.site = site
        #: closed at stop, beside the peer store
        self.keys = keys
        self.listen = listen
        #: held until the node has stopped (locks.py)
        self.file_locks = file_locks or []
        self.port: Any = None
        self._listening: list[Deferred] = []
        endpoint = _ReportingEndpoint(endpoint, self._bound)
        listener = StreamServerEndpointService(endpoint, site)
        # Fail twistd's start when the port cannot be bound, rather than log and idle.
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def _bound(self, port: Any) -> Any:
        if getattr(port.getHost(), "port", None) is None:
            port.stopListening()
            raise CannotStart(f"--listen {self.listen}: the node needs a TCP port "
                              "(tcp:, ssl: or systemd:domain=INET)")
        self.port = port
        self.node.listen_port = port.getHost().port
        log.info("foxnode {node_id} listening on port {port}, network {network!r}",
                 node_id=self.node.node_id, port=self.node.listen_port, network=self.node.config.network)
        waiters, self._listening = self._listening, []
        for d in waiters:
            d.callback(port)
        return port

    def when_listening(self) -> Deferred:
        if self.port is not None:
            return succeed(self.port)
        d: Deferred = Deferred()
        self._listening.append(d)
        return d

    def privilegedStartService(self) -> None:
        with self._listening_or_saying_why():
            super().privilegedStartService()

    def startService(self) -> None:
        for lock in self.file_locks:
            lock.note_pid()  # twistd may have forked into the background since
        with self._listening_or_saying_why():
            super().startService()
        if self.hangup is not None:
            self.hangup.install()

    @contextlib.contextmanager
    def _listening_or_saying_why(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            line = f"foxnode: cannot start: {why_not_listening(e, self.listen)}"
            log.critical("{line}", line=line)
            # twistd removes its pid file and tells a daemon's parent, then
            # lets the error end the process: without a traceback.
            sys.excepthook = _quiet_about_cannot_start(sys.excepthook)
            raise CannotStart(line) from None

    def stopService(self) -> Deferred:
        if self.hangup is not None:
            self.hangup.uninstall()
        # Children first (the port, dialing, sweeps), then the connections,
        # whose closes update the store; then the store's last write.
        stopped = super().stopService()
        d = DeferredList([stopped, self.node.close_connections()], consumeErrors=True)
        d.addBoth(self._close_stores)
        return d.addBoth(self._release)

    def _close_stores(self, _: Any) -> Deferred:
        # Side by side, each within its timeout: a hung disk holds the
        # shutdown once, not once per file. Both end before the locks go.
        if self.history is not None:
            try:
                self.history.close()
            except Exception as e:  # sqlite3.Error: said, and the rest still closes
                log.error("message store: the last commit failed at stop: {why}", why=e)
        closing = [self.node.store.close(timeout=CLOSE_TIMEOUT)]
        if self.keys is not None:
            closing.append(self.keys.close(timeout=CLOSE_TIMEOUT))
        return DeferredList(closing, consumeErrors=True)

    def _release(self, _: Any) -> None:
        for lock in self.file_locks:
            lock.release()
