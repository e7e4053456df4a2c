"""Test doubles and helpers others can reuse.

Socket-free: ``MemoryNetwork`` (Twisted's memory reactor with a clock, nodes
joined by in-memory transports; ``advance`` moves time), ``memory_node``,
``connected_pair``, ``FakeConnection`` and ``InlineWriter``: node logic
tested with no socket, no thread and no wall clock. With sockets: real nodes
in this process on loopback (``start_node``) or as ``twistd`` processes
(``spawn_node``, on launch.py), and waiting for conditions.

Every address these helpers use is on 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks

from foxnode import frames, launch, tap
from foxnode.config import NodeConfig, default

LOOPBACK = "127.0.0.1"
#: ``FOXNODE_FRAMES=autobahn pytest`` runs the suite with every node and
#: server factory these helpers make on Autobahn's frame code (frames.py).
FRAMES_ENV = "FOXNODE_FRAMES"


def frames_under_test() -> str:
    """The ``--frames`` value of the nodes the tests make: ``FOXNODE_FRAMES``,
    or ``own``. A bad value is a ValueError naming it."""
    value = os.environ.get(FRAMES_ENV, frames.OWN)
    try:
        return frames.parse_option(value)
    except ValueError as e:
        raise ValueError(f"{FRAMES_ENV}={e}") from None


def frames_options() -> list[str]:
    """``--frames`` for a node's command line, as ``FOXNODE_FRAMES`` asks;
    nothing by default, so that the command lines are a user's. Put them
    before the test's own options: a test's own ``--frames`` wins."""
    choice = frames_under_test()
    return [] if choice == frames.OWN else ["--frames", choice]


def sleep(reactor: Any, seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@inlineCallbacks
def wait_for(reactor: Any, condition: Callable[[], Any], timeout: float = 10.0,
             interval: float = 0.02, what: str | Callable[[], str] = "condition") -> Any:
    """Poll ``condition`` until truthy; raise AssertionError after ``timeout``.
    ``what`` (or what it returns, when a function) says what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what() if callable(what) else what}")
        yield sleep(reactor, interval)


class _OnLoopback:
    port: int

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@attrs.define
class RunningNode(_OnLoopback):
    """A node started in this process by ``start_node``."""

    service: tap.NodeService
    directory: Path

    @property
    def node(self) -> Any:
        return self.service.node

    @property
    def port(self) -> int:
        return self.service.node.listen_port

    @inlineCallbacks
    def stop(self) -> Any:
        if self.service.running:
            yield self.service.stopService()
        reactor = self.service.reactor
        yield wait_for(reactor, lambda: not self.node.connections, timeout=10,
                       what=lambda: f"connections of node on port {self.port} to close "
                                    f"({[_debug(c) for c in self.node.connections]})")


def _debug(c: Any) -> str:
    t = c.transport
    return (f"{c.describe()} state={c.state} paused={c._paused} "
            f"cht={getattr(c, 'closeHandshakeTimeoutCall', None)} "
            f"disc={getattr(t, 'disconnecting', '?')}/{getattr(t, 'disconnected', '?')} "
            f"reading={t in c.factory.reactor.getReaders() if hasattr(c.factory.reactor, 'getReaders') else '?'}")


def node_options(directory: Path, *extra: str, port: int = 0) -> tap.Options:
    options = tap.Options()
    options.parseOptions([
        "--listen", f"tcp:{port}:interface={LOOPBACK}",
        "--peers-file", str(directory / "peers.json"),
        "--data-dir", str(directory),
        *frames_options(),
        *extra,
    ])
    return options


@inlineCallbacks
def start_node(reactor: Any, directory: Path, *extra: str, port: int = 0) -> Any:
    """Build a node exactly as ``twistd foxnode`` does, start it on loopback
    and fire with a ``RunningNode`` once it listens."""
    directory.mkdir(parents=True, exist_ok=True)
    service = tap.makeService(node_options(directory, *extra, port=port), reactor)
    service.startService()
    yield service.when_listening()
    return RunningNode(service, directory)


@contextlib.asynccontextmanager
async def running_node(reactor: Any, directory: Path, *extra: str) -> AsyncIterator[RunningNode]:
    """``async with running_node(reactor, dir) as node:`` stops it after."""
    node = await start_node(reactor, directory, *extra)
    try:
        yield node
    finally:
        await node.stop()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for subprocess nodes)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@attrs.define
class NodeProcess(_OnLoopback):
    """A ``twistd -n foxnode`` child process on loopback. ``process`` is the
    launcher's ``launch.Launched`` (or a ``subprocess.Popen`` of a test that
    runs a command of its own): either has ``pid``, ``poll``, ``wait``,
    ``send_signal`` and ``kill``."""

    process: Any
    port: int
    directory: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)


def twistd_command(directory: Path, port: int, *extra: str,
                   twistd_options: Sequence[str] = ()) -> list[str]:
    """The command of the nodes these helpers spawn: the launcher's
    ``twistd --nodaemon --pidfile= foxnode`` on loopback, with the
    ``--frames`` of ``FOXNODE_FRAMES`` before the test's own options."""
    return launch.twistd_command(directory, port, *frames_options(), *extra,
                                 twistd_options=twistd_options)


def spawn_node(directory: Path, *extra: str, port: int | None = None,
               wait: bool = True, timeout: float = 20.0,
               twistd_options: Sequence[str] = (), log_path: Path | None = None) -> NodeProcess:
    """Start ``twistd -n foxnode`` in a child process (the launcher's) and
    wait until its /healthz answers (or it exits, which raises with its
    log). Synchronous, for tests that are: it can be called from a test,
    from a thread (``deferToThread``) or with the reactor waiting on it.
    ``twistd_options`` go before ``foxnode``; the child's output goes to
    ``log_path`` (``directory/twistd.log``)."""
    from twisted.internet import reactor

    node = _launch(reactor, Path(directory), extra, port or free_port(), twistd_options, log_path)
    if wait:
        wait_until_serving(node, timeout)
    return node


async def serving_node(reactor: Any, directory: Path, *extra: str, port: int | None = None,
                       timeout: float = 20.0, twistd_options: Sequence[str] = (),
                       log_path: Path | None = None) -> NodeProcess:
    """``spawn_node`` for async tests: waits on the reactor, not blocking it."""
    node = _launch(reactor, Path(directory), extra, port or free_port(), twistd_options, log_path)
    try:
        await node.process.serving(timeout)
    except launch.NotServing:
        node.process.kill()
        await node.process.when_ended()
        raise
    return node


def _launch(reactor: Any, directory: Path, extra: Sequence[str], port: int,
            twistd_options: Sequence[str] = (), log_path: Path | None = None) -> NodeProcess:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = log_path or directory / "twistd.log"
    child = launch.launch(reactor, twistd_command(directory, port, *extra, twistd_options=twistd_options),
                          log_path=log_path, port=port, directory=directory)
    return NodeProcess(child, port, directory, log_path)


def wait_until_serving(node: NodeProcess, timeout: float = 20.0) -> None:
    """Block until ``node`` serves, as the launcher knows it (/healthz 200);
    raises ``launch.NodeExited`` or ``launch.NotServing`` (RuntimeErrors)."""
    launch.wait_serving(node.process, node.port, node.log, timeout)


def stop_all(nodes: Iterable[NodeProcess]) -> None:
    for n in nodes:
        try:
            n.stop()
        except Exception:  # already gone; we only tidy up
            n.kill()


@inlineCallbacks
def connect_as_peer(reactor: Any, url: str, ident: Any = None, network: str = default(NodeConfig, "network"),
                    on_event: Callable[[Any], None] | None = None, port: int | None = None,
                    nonce: str | None = None, advertise: str | None = None) -> Any:
    """Connect to a node and complete a real ``hello`` as a peer with
    identity ``ident`` (a fresh one by default) and dialer nonce ``nonce``
    (a fresh one by default); fires with the open client protocol, whose
    ``node_id`` is the node's and whose ``fox_state["hello"]`` is the
    node's hello reply. For tests that play a (possibly misbehaving) peer."""
    from foxnode import client, handshake, identity

    ident = ident or identity.Identity.generate()
    conn = yield client.connect(reactor, url, on_event=on_event)
    nonce = nonce or os.urandom(16).hex()
    listener_nonce, listener_id = conn.server_nonce or "", conn.server_node_id or ""
    # The node's own handshake functions: what it sends and checks, exactly.
    args = handshake.dialer_hello(ident, network, listener_nonce, listener_id, nonce,
                                  advertise=advertise, port=port)
    reply = yield conn.request("hello", args)
    if reply.status != 200:
        conn.close()
        raise RuntimeError(f"hello refused: {reply.status} {reply.error} {reply.response}")
    try:
        handshake.check_listener_hello(reply.response, network, ident.node_id, listener_nonce,
                                       listener_id, nonce)
    except handshake.HandshakeRefused as e:
        conn.close()
        raise RuntimeError(f"the node's hello reply does not prove its id ({e}): {reply.response}")
    conn.node_id = reply.response["node_id"]
    conn.fox_state["identity"] = ident
    conn.fox_state["hello"] = reply.response
    return conn


@attrs.frozen
class TestCA:
    """A certificate authority made for one test, and a server certificate
    it signed for loopback names."""

    ca_cert: Path
    server_key: Path
    server_cert: Path

    def listen(self, port: int = 0, interface: str = LOOPBACK) -> str:
        """A ``--listen`` endpoint string serving TLS with the server certificate."""
        return f"ssl:{port}:interface={interface}:privateKey={self.server_key}:certKey={self.server_cert}"


def make_test_ca(directory: Path, hosts: Iterable[str] = ("localhost", LOOPBACK)) -> TestCA:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foxnode test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foxnode test node")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    result = TestCA(directory / "ca.pem", directory / "server-key.pem", directory / "server-cert.pem")
    result.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    result.server_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    result.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return result


# -- socket-free doubles ---------------------------------------------------------------
#
# For node logic whose subject is time and order, not the wire: nodes on a
# ``MemoryNetwork`` share one ``MemoryReactorClock``; their dials go over
# in-memory transports (twisted.test.iosim) to the node listening at that
# port, or fail as refused; time passes only when the test says
# (``network.advance``). Autobahn's own timers (opening and closing
# handshake, pings) run on the global reactor (txaio's), in real time, as
# they would with sockets.


class FakeConnection:
    """A connection as the node's parts see one (the attributes ops and
    handlers touch); records what it was asked to send and close."""

    local_host = LOOPBACK
    remote_port = 40000
    peer_addr: str | None = None
    trusted = False

    def __init__(self, direction: str = "in", node_id: str | None = None,
                 remote_host: str = LOOPBACK) -> None:
        self.direction = direction
        self.node_id = node_id
        self.remote_host = remote_host
        self.fox_state: dict = {}
        self.fox_open = True
        self.handshake_nonce = os.urandom(16).hex()
        self.closed: list[tuple[int, str | None]] = []
        self.sent: list[bytes] = []

    def describe(self) -> str:
        return f"fake@{self.remote_host} ({self.direction})"

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append((code, reason))
        self.fox_open = False

    #: the largest frame it sends (a real connection's --max-message-size)
    send_limit = 1 << 20

    def has_room(self) -> bool:
        return self.can_send()

    def can_send(self) -> bool:
        return self.fox_open

    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        assert isinstance(frame, bytes)
        self.sent.append(frame)
        return True

    def events(self) -> list[Any]:
        """What was sent, decoded."""
        from foxnode import codec

        return [codec.decode(f) for f in self.sent]


class InlineWriter:
    """Runs the peer store's writes in the calling thread at once (hand it
    in as ``PeerStore(..., runner=InlineWriter())``): with a memory reactor
    there is no thread to come back from."""

    def run(self, write: Callable[..., None], *args: Any) -> Deferred:
        from twisted.internet.defer import fail, succeed

        try:
            result = write(*args)
        except BaseException:
            return fail()
        return succeed(result)

    def stop(self) -> None:
        pass


@attrs.define(eq=False)
class _MemoryPort:
    network: "MemoryNetwork"
    port: int
    factory: Any

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", LOOPBACK, self.port)

    def stopListening(self) -> Deferred:
        from twisted.internet.defer import succeed

        self.network.listening.pop(self.port, None)
        return succeed(None)


@attrs.define(eq=False)
class MemoryServerEndpoint:
    """A server endpoint on a ``MemoryNetwork`` (``listen`` as Twisted's do)."""

    network: "MemoryNetwork"
    port: int

    def listen(self, factory: Any) -> Deferred:
        from twisted.internet.defer import succeed

        factory.doStart()
        self.network.listening[self.port] = factory
        return succeed(_MemoryPort(self.network, self.port, factory))


class MemoryNetwork:
    """Nodes on one memory reactor with a clock, and the wires between them."""

    def __init__(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        #: port -> the factory listening there
        self.listening: dict[int, Any] = {}
        self._pumps: list[Any] = []
        self._handled = 0
        self._next_port = 20000
        self._client_port = 40000

    def port(self) -> int:
        self._next_port += 1
        return self._next_port

    def url(self, port: int) -> str:
        return f"ws://{LOOPBACK}:{port}/ws"

    def pump(self) -> None:
        """Connect the dials made since, then move bytes until nothing moves."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure
        from twisted.test import iosim

        moved = True
        while moved:
            moved = False
            while self._handled < len(self.reactor.tcpClients):
                host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._handled]
                connector = self.reactor.connectors[self._handled]
                self._handled += 1
                moved = True
                server_factory = self.listening.get(port)
                if server_factory is None:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError(host, port)))
                    continue
                self._client_port += 1
                client_addr = IPv4Address("TCP", LOOPBACK, self._client_port)
                server_addr = IPv4Address("TCP", host, port)
                server = server_factory.buildProtocol(client_addr)
                client = factory.buildProtocol(server_addr)
                server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_addr,
                                                peerAddress=client_addr)
                client_io = iosim.FakeTransport(client, isServer=False, hostAddress=client_addr,
                                                peerAddress=server_addr)
                self._pumps.append(iosim.connect(server, server_io, client, client_io, greet=False))
            for pump in list(self._pumps):
                if pump.pump():
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass on the clock, pumping between steps."""
        self.pump()
        steps = max(1, round(seconds / step))
        for _ in range(steps):
            self.reactor.advance(seconds / steps)
            self.pump()


def memory_node(network: MemoryNetwork, directory: Path, configs: Any = None,
                ident: Any = None, port: int | None = None, plugins: Sequence[str] = ()) -> Any:
    """A node built by ``service.build`` on ``network``, started and
    listening at ``port`` (a fresh one by default); its peer store, its
    key store and its message store are real files in ``directory``, the
    first two written inline, and so is what its plugins keep.
    ``plugins``: what ``--plugin`` takes (dotted module names, paths to .py
    files), loaded besides foxnode's own."""
    from foxnode import identity, service
    from foxnode.keys import KEY_FILE, KeyStore
    from foxnode.store import PeerStore

    directory.mkdir(parents=True, exist_ok=True)
    store = PeerStore.open(network.reactor, directory / "peers.json", runner=InlineWriter())
    configs = configs or service.Configs()
    configs = attrs.evolve(configs, plugins=attrs.evolve(
        configs.plugins, modules=configs.plugins.modules + tuple(str(p) for p in plugins),
        data_dir=str(directory)))
    keys = KeyStore.open(network.reactor, directory / KEY_FILE, configs.keys)
    keys._writer = InlineWriter()
    port = port or network.port()
    if frames_under_test() != frames.OWN:
        configs = attrs.evolve(configs, node=attrs.evolve(configs.node, frames=frames_under_test()))
    from foxnode.msgstore import STORE_FILE, MessageStore

    messages = MessageStore.open(str(directory / STORE_FILE), configs.history.max_store_bytes)
    node_service = service.build(network.reactor, configs, store,
                                 ident or identity.Identity.generate(),
                                 MemoryServerEndpoint(network, port), keys=keys, messages=messages)
    node_service.startService()
    network.pump()
    return node_service


def connected_pair(server_handler: Any, client_handler: Any, reactor: Any,
                   url: str = f"ws://{LOOPBACK}:9/ws") -> tuple[Any, Any, Any]:
    """A server and a client protocol of foxnode's (``FoxServerProtocol``,
    ``FoxClientProtocol``) joined by an in-memory wire, the opening
    handshake done; returns them and the ``IOPump`` that moves their bytes
    (``pump.flush()``)."""
    from twisted.internet.address import IPv4Address
    from twisted.test import iosim

    from foxnode.protocol import FoxClientFactory, FoxServerFactory

    server_addr = IPv4Address("TCP", LOOPBACK, 9)
    client_addr = IPv4Address("TCP", LOOPBACK, 40000)
    server = FoxServerFactory(server_handler, reactor, frames=frames_under_test()).buildProtocol(client_addr)
    client = FoxClientFactory(url, client_handler, reactor).buildProtocol(server_addr)
    pump = iosim.connect(server, iosim.FakeTransport(server, True, server_addr, client_addr),
                         client, iosim.FakeTransport(client, False, client_addr, server_addr))
    pump.flush()
    return server, client, pump
