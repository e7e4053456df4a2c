"""Test doubles and helpers others can reuse: start real nodes in this
process on loopback, or as ``twistd`` processes, and wait for conditions.

Every address these helpers use is on 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks

from foxnode import tap

LOOPBACK = "127.0.0.1"


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
    """A ``twistd -n foxnode`` child process on loopback."""

    process: subprocess.Popen
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


def twistd_command(directory: Path, port: int, *extra: str) -> list[str]:
    # The twistd script installed beside this Python, as a user would run it.
    twistd = Path(sys.executable).parent / "twistd"
    return [
        str(twistd), "--nodaemon", "--pidfile=", "foxnode",
        "--listen", f"tcp:{port}:interface={LOOPBACK}",
        "--peers-file", str(directory / "peers.json"),
        "--data-dir", str(directory),
        *extra,
    ]


def spawn_node(directory: Path, *extra: str, port: int | None = None,
               wait: bool = True, timeout: float = 20.0) -> NodeProcess:
    """Start ``twistd -n foxnode`` in a child process and wait until its
    /healthz answers (or it exits, which raises with its log)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = directory / "twistd.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            twistd_command(directory, port, *extra),
            stdout=log_file, stderr=subprocess.STDOUT, cwd=directory,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    node = NodeProcess(process, port, directory, log_path)
    if wait:
        wait_until_serving(node, timeout)
    return node


def wait_until_serving(node: NodeProcess, timeout: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"foxnode exited with {node.process.returncode}:\n{node.log()}")
        try:
            with urllib.request.urlopen(f"{node.http}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    node.kill()
    raise RuntimeError(f"foxnode did not serve within {timeout}s:\n{node.log()}")


def stop_all(nodes: Iterable[NodeProcess]) -> None:
    for n in nodes:
        try:
            n.stop()
        except Exception:  # already gone; we only tidy up
            n.kill()


@inlineCallbacks
def connect_as_peer(reactor: Any, url: str, ident: Any = None, network: str = "foxchain",
                    on_event: Callable[[Any], None] | None = None, port: int | None = None,
                    nonce: str | None = None, advertise: str | None = None) -> Any:
    """Connect to a node and complete a real ``hello`` as a peer with
    identity ``ident`` (a fresh one by default) and dialer nonce ``nonce``
    (a fresh one by default); fires with the open client protocol, whose
    ``node_id`` is the node's and whose ``fox_state["hello"]`` is the
    node's hello reply. For tests that play a (possibly misbehaving) peer."""
    from foxnode import PROTOCOL_VERSION, client, identity
    from foxnode.peers import DIALER, LISTENER, hello_proof

    ident = ident or identity.Identity.generate()
    conn = yield client.connect(reactor, url, on_event=on_event)
    nonce = nonce or os.urandom(16).hex()
    listener_nonce, listener_id = conn.server_nonce or "", conn.server_node_id or ""
    args = {
        "node_id": ident.node_id, "network": network, "version": PROTOCOL_VERSION,
        "nonce": nonce,
        "signature": ident.sign(hello_proof(DIALER, network, listener_nonce, nonce, ident.node_id,
                                            listener_id)),
    }
    if port is not None:
        args["port"] = port
    if advertise is not None:
        args["advertise"] = advertise
    reply = yield conn.request("hello", args)
    if reply.status != 200:
        conn.close()
        raise RuntimeError(f"hello refused: {reply.status} {reply.error} {reply.response}")
    proof = hello_proof(LISTENER, network, listener_nonce, nonce, ident.node_id, listener_id)
    if (reply.response.get("node_id") != listener_id
            or not identity.verify(listener_id, reply.response.get("signature"), proof)):
        conn.close()
        raise RuntimeError(f"the node's hello reply does not prove its id: {reply.response}")
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
