"""The ``foxnode`` command as a user runs it: a real process, its stdout,
its stderr and its exit code.

``call`` talks to an in-process node; ``watch`` to a fake node written here
(it answers ``subscribe`` and pushes events when told); ``devnet`` starts
real ``twistd`` children. Every address is on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from foxnode import cli, launch
from foxnode import devnet as fox_devnet
from foxnode.testing import LOOPBACK, free_port, sleep, start_node, wait_for

FOXNODE = [sys.executable, "-m", "foxnode.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


# -- running the command ----------------------------------------------------------


class _Collect(ProcessProtocol):
    """A child's stdout lines and stderr as they come, and its exit code."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred = Deferred()
        self.code: int | None = None

    @property
    def lines(self) -> list[str]:
        return [line for line in self.out.decode().split("\n")[:-1]]

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.code = reason.value.exitCode
        if self.code is None:  # killed by a signal
            self.code = -reason.value.signal
        self.ended.callback(self.code)


def spawn(reactor, *args: str) -> _Collect:
    proto = _Collect()
    proto.transport = reactor.spawnProcess(proto, sys.executable, FOXNODE + list(args), env=ENV)
    return proto


async def run(reactor, *args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """``foxnode ARGS`` without blocking the reactor (the node under test
    may be in this process); fires with (exit code, stdout, stderr)."""
    proto = spawn(reactor, *args)
    await wait_for(reactor, lambda: proto.code is not None, timeout=timeout, what=f"foxnode {args}")
    return proto.code, proto.out.decode(), proto.err.decode()


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- usage ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["call"], ["watch"], ["devnet"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: foxnode")


@pytest.mark.parametrize("argv, says", [
    ([], "required: COMMAND"),
    (["call", "http://127.0.0.1:9000/ws", "peers"], "not a node address"),
    (["call", "ws://127.0.0.1:9000/ws", "register", "{addr"], "is not JSON"),
    (["call", "ws://127.0.0.1:9000/ws"], "required: OP"),
    (["call", "--timeout", "0", "ws://127.0.0.1:9000/ws", "peers"], "give seconds from 0.1 to 86400"),
    (["watch", "ws://127.0.0.1:9000/ws"], "required: TOPIC"),
    (["devnet", "--nodes", "0"], "give a whole number from 1 to 1000"),
    (["devnet", "--base-port", "65535", "--nodes", "2"], "past 65535"),
])
def test_usage_errors_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert says in one_line(capsys.readouterr().err)


def test_parsing_of_urls_ids_and_args():
    assert cli.node_url("ws://127.0.0.1:9000") == "ws://127.0.0.1:9000/ws"
    assert cli.node_url("ws://localhost:9000/other") == "ws://localhost:9000/other"
    assert cli.request_id("7") == 7
    assert cli.request_id("abc") == "abc"
    assert cli.request_id('"7"') == "7"
    assert cli.request_id("true") == "true"
    assert cli.json_value('{"addr": ["ws://127.0.0.1:1/ws"]}') == {"addr": ["ws://127.0.0.1:1/ws"]}


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("foxnode")
    assert script.exists(), "pip install did not create the foxnode console script"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("foxnode ")


# -- call -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_prints_the_reply_and_exit_codes(reactor, node_dir):
    node = await start_node(reactor, node_dir)
    try:
        code, out, err = await run(reactor, "call", node.url, "time")
        assert (code, err) == (0, "")
        reply = json.loads(out)
        assert reply["status"] == 200 and reply["error"] == "OK"
        assert set(reply["response"]) == {"time", "time_zone"}
        assert "id" not in reply and out.count("\n") == 1

        # ARGS-JSON, and a URL without a path means /ws.
        args = json.dumps({"addr": ["ws://127.0.0.1:9/ws", "nope"]})
        code, out, err = await run(reactor, "call", f"ws://{LOOPBACK}:{node.port}", "register", args)
        assert code == 0
        reply = json.loads(out)
        assert reply["status"] == 202
        assert reply["response"]["accepted"] == ["ws://127.0.0.1:9/ws"]
        assert [r["addr"] for r in reply["response"]["rejected"]] == ["nope"]

        # --id is sent as given and echoed; --pretty indents.
        code, out, _ = await run(reactor, "call", "--id", "7", "--pretty", node.url, "peers")
        assert code == 0
        assert out.startswith("{\n  ")
        reply = json.loads(out)
        assert reply["id"] == 7
        assert "ws://127.0.0.1:9/ws" in reply["response"]["peers"]
        code, out, _ = await run(reactor, "call", "--id", "abc", node.url, "time")
        assert json.loads(out)["id"] == "abc"

        # An error status: the reply on stdout, exit 1, one line on stderr.
        code, out, err = await run(reactor, "call", node.url, "nope")
        assert code == 1
        assert json.loads(out) == {"status": 404, "error": 'Operation "nope" is not supported.', "response": None}
        assert one_line(err) == 'foxnode call: 404 Operation "nope" is not supported.'
        code, out, err = await run(reactor, "call", node.url, "register")
        assert code == 1 and json.loads(out)["status"] == 500
    finally:
        await node.stop()


def test_key_to_and_sign_set_the_args_of_call():
    def parsed(*argv):
        opts = cli.parser().parse_args(["call", "ws://127.0.0.1:9/ws", *argv])
        return cli.args_with_options(opts), opts.args

    pub = "ab" * 64
    assert cli.public_key(pub) == pub
    assert parsed("publish", "--key", "k1") == (None, {"key": "k1"})
    assert parsed("publish", '{"topic": "t", "payload": 1}', "--to", pub, "--sign", "s") == (
        None, {"topic": "t", "payload": 1, "to": pub, "sign": "s"})
    assert parsed("publish", '{"key": "k1"}', "--key", "k1") == (None, {"key": "k1"})  # the same: fine
    (option, why), _ = parsed("publish", '{"key": "k2"}', "--key", "k1")
    assert option == "--key" and '"key" another value' in why
    (option, why), _ = parsed("publish", "[1]", "--sign", "s")
    assert option == "--sign" and "must be an object" in why
    assert parsed("time") == (None, None)  # no option: args as given


@pytest.mark.parametrize("argv, says", [
    (["call", "ws://127.0.0.1:9/ws", "publish", '{"key": "a"}', "--key", "b"],
     'foxnode call: argument --key: ARGS-JSON gives "key" another value'),
    (["call", "ws://127.0.0.1:9/ws", "publish", "7", "--to", "ab" * 64],
     "foxnode call: argument --to: ARGS-JSON must be an object"),
    (["watch", "ws://127.0.0.1:9/ws", "t", "--to", "ab" * 64], "foxnode watch: argument --to: not for watch"),
    (["watch", "ws://127.0.0.1:9/ws", "t", "--sign", "k"], "foxnode watch: argument --sign: not for watch"),
])
def test_key_options_that_cannot_apply_exit_2_naming_the_option(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert one_line(capsys.readouterr().err).startswith(says)


@pytest_twisted.ensureDeferred
async def test_a_message_published_with_key_reaches_watch_with_key_decrypted(reactor, node_dir):
    node = await start_node(reactor, node_dir)
    watches = []
    try:
        code, out, err = await run(reactor, "call", node.url, "newkey", '{"type": "sym"}')
        assert code == 0, err
        key = json.loads(out)["response"]["id"]
        keyed = spawn(reactor, "watch", node.url, "t", "--key", key)
        plain = spawn(reactor, "watch", node.url, "t")
        watches += [keyed, plain]
        for w in watches:
            await wait_for(reactor, lambda w=w: b"subscribed" in w.err, what="watch to subscribe")
        code, out, err = await run(reactor, "call", node.url, "publish", '{"topic":"t","payload":1}', "--key", key)
        assert code == 0, err
        assert json.loads(out)["status"] == 202
        code, out, err = await run(reactor, "call", node.url, "publish", '{"topic":"t","payload":2}')
        assert code == 0, err
        await wait_for(reactor, lambda: keyed.lines and plain.lines, what="the messages")
        await sleep(reactor, 0.5)  # room for anything that should not come
        [line] = keyed.lines
        m = json.loads(line)
        assert m["payload"] == 1 and m["encrypted"] == "sym" and m["topic"] == "t"
        assert [json.loads(line)["payload"] for line in plain.lines] == [2]
    finally:
        for w in watches:
            if w.code is None:
                w.transport.signalProcess("INT")
                await w.ended
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_call_unreachable_node_exits_2(reactor):
    url = f"ws://{LOOPBACK}:{free_port()}/ws"
    code, out, err = await run(reactor, "call", url, "peers")
    assert (code, out) == (2, "")
    assert "connection refused" in one_line(err)


@pytest_twisted.ensureDeferred
async def test_call_wrong_path_exits_2(reactor, node_dir):
    node = await start_node(reactor, node_dir)
    try:
        code, out, err = await run(reactor, "call", f"ws://{LOOPBACK}:{node.port}/nothere", "peers")
        assert (code, out) == (2, "")
        assert "404" in one_line(err)
    finally:
        await node.stop()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foxnode test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_call_over_wss_with_cafile(reactor, node_dir):
    key, cert = _self_signed(node_dir)
    listen = f"ssl:0:interface={LOOPBACK}:privateKey={key}:certKey={cert}"
    node = await start_node(reactor, node_dir, "--listen", listen)
    url = f"wss://{LOOPBACK}:{node.port}/ws"
    try:
        code, out, err = await run(reactor, "call", "--cafile", str(cert), url, "time")
        assert (code, err) == (0, "")
        assert json.loads(out)["status"] == 200
        # Without --cafile the self-signed certificate is not trusted.
        code, out, err = await run(reactor, "call", "--timeout", "5", url, "time")
        assert (code, out) == (2, "")
        assert "certificate verify failed" in one_line(err) and "--cafile" in err
        code, out, err = await run(reactor, "call", "--cafile", str(node_dir / "missing.pem"), url, "time")
        assert code == 2 and "missing.pem" in one_line(err)
    finally:
        await node.stop()


# -- a fake node for watch ------------------------------------------------------------


class FakeNodeProtocol(WebSocketServerProtocol):
    """Answers ``subscribe`` as PROTOCOL.md says (or refuses it), never
    answers ``silent``, and pushes whatever the test hands to ``push``."""

    def onOpen(self) -> None:
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        request = json.loads(payload)
        self.factory.requests.append(request)
        op = request.get("op")
        if op == "silent":
            return
        if op == "subscribe" and not self.factory.refuse:
            reply = {"status": 200, "error": "OK", "response": {"topics": request["args"]["topics"]}}
        else:
            reply = {"status": 404, "error": f'Operation "{op}" is not supported.', "response": None}
        if "id" in request:
            reply["id"] = request["id"]
        self.sendMessage(json.dumps(reply).encode())

    def push(self, body: dict) -> None:
        self.sendMessage(json.dumps(body).encode())

    def onClose(self, wasClean, code, reason) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)


class FakeNode:
    def __init__(self, reactor, refuse: bool = False) -> None:
        self.factory = WebSocketServerFactory()
        self.factory.protocol = FakeNodeProtocol
        self.factory.connections = []
        self.factory.requests = []
        self.factory.refuse = refuse
        self.reactor = reactor
        self.port = reactor.listenTCP(0, self.factory, interface=LOOPBACK)

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port.getHost().port}/ws"

    def subscribed(self) -> bool:
        return any(r.get("op") == "subscribe" for r in self.factory.requests)

    def push(self, body: dict) -> None:
        for conn in self.factory.connections:
            conn.push(body)

    async def stop(self) -> None:
        for conn in list(self.factory.connections):
            conn.dropConnection(abort=True)
        await wait_for(self.reactor, lambda: not self.factory.connections, what="fake node connections to close")
        await self.port.stopListening()


def message(n: int, topic: str = "news") -> dict:
    return {"event": "message", "id": f"m{n}", "topic": topic, "payload": {"n": n, "text": "ü"},
            "origin": "ab" * 32}


@pytest_twisted.ensureDeferred
async def test_watch_prints_each_message_as_it_arrives_until_ctrl_c(reactor):
    fake = FakeNode(reactor)
    try:
        watch = spawn(reactor, "watch", fake.url, "news", "blocks")
        await wait_for(reactor, fake.subscribed, what="watch to subscribe")
        subscribe = [r for r in fake.factory.requests if r["op"] == "subscribe"][0]
        assert subscribe["args"] == {"topics": ["news", "blocks"]}

        fake.push(message(1))
        fake.push({"event": "peer", "node_id": "cd" * 32})  # not a message: not printed
        await wait_for(reactor, lambda: len(watch.lines) >= 1, what="the first message line")
        # Printed as it arrives, not when the command ends.
        fake.push(message(2, "blocks"))
        await wait_for(reactor, lambda: len(watch.lines) >= 2, what="the second message line")
        assert [json.loads(line) for line in watch.lines] == [message(1), message(2, "blocks")]

        watch.transport.signalProcess("INT")
        assert await watch.ended == 0
        assert "Traceback" not in watch.err.decode()
        assert len(watch.lines) == 2
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_watch_exits_1_when_the_connection_drops(reactor):
    fake = FakeNode(reactor)
    try:
        watch = spawn(reactor, "watch", fake.url, "news")
        await wait_for(reactor, fake.subscribed, what="watch to subscribe")
        await wait_for(reactor, lambda: b"subscribed" in watch.err, what="watch to say it subscribed")
        fake.push(message(1))
        await wait_for(reactor, lambda: watch.lines, what="a message line")
        for conn in fake.factory.connections:
            conn.sendClose(4000, "node shutting down")
        assert await watch.ended == 1
        err = watch.err.decode().strip().splitlines()
        assert "Traceback" not in watch.err.decode()
        assert "closed" in err[-1] and "node shutting down" in err[-1]
        assert [json.loads(line) for line in watch.lines] == [message(1)]
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_watch_refused_subscribe_exits_1_and_unreachable_exits_2(reactor):
    fake = FakeNode(reactor, refuse=True)
    try:
        code, out, err = await run(reactor, "watch", fake.url, "news")
        assert (code, out) == (1, "")
        assert "404" in one_line(err)
    finally:
        await fake.stop()
    code, out, err = await run(reactor, "watch", f"ws://{LOOPBACK}:{free_port()}/ws", "news")
    assert (code, out) == (2, "")
    assert "connection refused" in one_line(err)


@pytest_twisted.ensureDeferred
async def test_call_without_reply_times_out_with_exit_2(reactor):
    fake = FakeNode(reactor)
    try:
        started = time.monotonic()
        code, out, err = await run(reactor, "call", "--timeout", "1", fake.url, "silent")
        assert (code, out) == (2, "")
        assert "no reply" in one_line(err)
        assert time.monotonic() - started < 10
    finally:
        await fake.stop()


# -- devnet -------------------------------------------------------------------------


class Devnet:
    """``foxnode devnet`` as a child process, its stdout read line by line."""

    def __init__(self, directory: Path, base_port: int, *extra: str, nodes: int = 3) -> None:
        self.process = subprocess.Popen(
            FOXNODE + ["devnet", "--nodes", str(nodes), "--base-port", str(base_port),
                       "--dir", str(directory), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 30.0, fail: str | None = None) -> re.Match:
        """Read lines until one matches ``pattern``; fail early on one
        matching ``fail``, or at the end of the output."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "\n".join(self.lines))
            if line is None:
                raise AssertionError(f"devnet ended before {pattern!r}:\n" + "\n".join(self.lines)
                                     + "\n" + self.process.stderr.read())
            self.lines.append(line)
            if fail and re.search(fail, line):
                raise AssertionError(f"{line!r} came instead of {pattern!r}:\n" + "\n".join(self.lines))
            match = re.search(pattern, line)
            if match:
                return match

    def addresses(self, count: int) -> dict[str, tuple[str, str, str]]:
        found = {}
        for _ in range(count):
            m = self.expect(r"^(node-\d+)\s+(ws://\S+)\s+(http://\S+)\s+id ([0-9a-f]{64})$")
            found[m[1]] = (m[2], m[3], m[4])
        return found

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are free now."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        if not any(fox_devnet.port_in_use(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def healthz(page: str) -> dict:
    with urllib.request.urlopen(f"{page}healthz", timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())


def refused(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) != 0


def test_devnet_starts_serves_stops_and_restarts_with_the_same_ids(tmp_path):
    directory, base = tmp_path / "devnet", free_ports(3)
    net = Devnet(directory, base, "--connect-timeout", "1")
    try:
        net.expect(r"^nodes up: 3/3$")
        nodes = net.addresses(3)
        assert sorted(nodes) == ["node-0", "node-1", "node-2"]
        for i in range(3):
            ws, page, node_id = nodes[f"node-{i}"]
            assert ws == f"ws://{LOOPBACK}:{base + i}/ws"
            assert page == f"http://{LOOPBACK}:{base + i}/"
            health = healthz(page)
            assert health["status"] == "ok" and health["node_id"] == node_id
        assert len({node_id for _, _, node_id in nodes.values()}) == 3
        assert net.stop(signal.SIGINT) == 0
        assert net.lines[-1] == f"devnet stopped; data kept in {directory}"
        assert all(refused(base + i) for i in range(3)), "a node still listens"
    finally:
        net.kill()
    for i in range(3):
        node_dir = directory / f"node-{i}"
        assert (node_dir / "node.key").is_file()
        assert "Server Shut Down." in (node_dir / "twistd.log").read_text()

    # Again on the same directory: the same nodes (ids), stopped by SIGTERM.
    again = Devnet(directory, base, "--connect-timeout", "1")
    try:
        assert again.addresses(3) == nodes
        assert again.stop(signal.SIGTERM) == 0
        assert again.lines[-1].startswith("devnet stopped")
    finally:
        again.kill()


def test_devnet_refuses_a_busy_port(tmp_path):
    import socket

    base = free_ports(2)
    with socket.socket() as busy:
        busy.bind((LOOPBACK, base + 1))
        busy.listen()
        result = subprocess.run(FOXNODE + ["devnet", "--nodes", "2", "--base-port", str(base),
                                           "--dir", str(tmp_path / "devnet")],
                                capture_output=True, text=True, env=ENV, timeout=30)
    assert result.returncode == 2
    assert f"port {base + 1} (node-1)" in one_line(result.stderr)
    assert result.stdout == ""


def test_devnet_reports_every_node_connected(tmp_path):
    """Passes once the peer network connects nodes (peers.py): every node
    of the devnet gets at least one live peer connection."""
    net = Devnet(tmp_path / "devnet", free_ports(3), "--connect-timeout", "20")
    try:
        net.addresses(3)
        net.expect(r"^all 3 nodes connected$", timeout=25, fail=r"^not connected after")
        counts = re.findall(r"node-\d+ (\d+)", [l for l in net.lines if l.startswith("live peer")][-1])
        assert len(counts) == 3 and all(int(c) >= 1 for c in counts)
        assert net.stop(signal.SIGINT) == 0
    finally:
        net.kill()


def test_devnet_stops_when_a_node_fails_to_start(tmp_path):
    directory, base = tmp_path / "devnet", free_ports(2)
    (directory / "node-1").mkdir(parents=True)
    (directory / "node-1" / "peers.json").write_text("{not json")
    result = subprocess.run(FOXNODE + ["devnet", "--nodes", "2", "--base-port", str(base),
                                       "--dir", str(directory)],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 1, result.stdout
    assert "a node failed to start" in one_line(result.stderr)
    assert re.search(r"^node-1 exited with code \d+; log ", result.stdout, re.M), result.stdout
    assert "peers.json" in result.stdout  # the tail of its log says why
    assert result.stdout.rstrip().endswith(f"devnet stopped; data kept in {directory}")
    assert refused(base), "node-0 still listens"
    assert (directory / "node-1" / "peers.json").read_text() == "{not json"


@pytest_twisted.ensureDeferred
async def test_devnet_kills_a_node_that_ignores_sigterm(reactor, tmp_path):
    import io

    out = io.StringIO()
    net = fox_devnet.Devnet(reactor, tmp_path, 1, 9000, "foxchain", out=out)
    stubborn = launch.launch(reactor, [sys.executable, "-c",
                                       "import signal, sys, time\n"
                                       "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                       "print('ready', flush=True)\n"
                                       "time.sleep(60)\n"], log_path=tmp_path / "stubborn.log")
    await wait_for(reactor, lambda: "ready" in stubborn.log(), what="the stubborn child to ignore SIGTERM")
    net.nodes[0].process = stubborn
    started = time.monotonic()
    await net.stop(timeout=0.5)
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert "node-0 did not stop within 0.5s; killing it" in out.getvalue()
    assert out.getvalue().splitlines()[-1] == f"devnet stopped; data kept in {tmp_path}"


async def test_watch_since_prints_what_the_node_kept_then_what_comes_and_call_since_pages_history(
        reactor, node_dir):
    node = await start_node(reactor, node_dir)
    watches = []
    try:
        for n in (1, 2):
            code, out, err = await run(reactor, "call", node.url, "publish", '{"topic":"t","payload":%d}' % n)
            assert code == 0 and json.loads(out)["status"] == 202, err
        code, out, err = await run(reactor, "call", node.url, "history", '{"topics":["t"]}', "--since", "10m")
        assert code == 0, err
        reply = json.loads(out)
        assert [m["payload"] for m in reply["response"]["messages"]] == [1, 2]
        assert reply["response"]["cursor"] is None
        code, out, err = await run(reactor, "call", node.url, "history", '{"topics":["t"]}',
                                   "--since", str(time.time() + 60))
        assert code == 0 and json.loads(out)["response"]["messages"] == [], err
        watch = spawn(reactor, "watch", node.url, "t", "--since", "1h")
        watches.append(watch)
        await wait_for(reactor, lambda: len(watch.lines) >= 2, what="the kept messages")
        code, out, err = await run(reactor, "call", node.url, "publish", '{"topic":"t","payload":3}')
        assert code == 0, err
        await wait_for(reactor, lambda: len(watch.lines) >= 3, what="the new message")
        await sleep(reactor, 0.3)
        assert [json.loads(line)["payload"] for line in watch.lines] == [1, 2, 3]
    finally:
        for w in watches:
            if w.code is None:
                w.transport.signalProcess("KILL")
                await w.ended
        await node.stop()
