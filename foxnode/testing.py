"""Test doubles and helpers others can reuse: start real nodes in this
process on loopback, or as ``twistd`` processes, and wait for conditions.

Every address these helpers use is on 127.0.0.0/8.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

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
             interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``condition`` until truthy; raise AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(reactor, interval)


@attrs.define
class RunningNode:
    """A node started in this process by ``start_node``."""

    service: tap.NodeService
    directory: Path

    @property
    def node(self) -> Any:
        return self.service.node

    @property
    def port(self) -> int:
        return self.service.node.listen_port

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @inlineCallbacks
    def stop(self) -> Any:
        if self.service.running:
            yield self.service.stopService()
        reactor = self.service.reactor
        yield wait_for(reactor, lambda: not self.node.connections, timeout=10,
                       what=f"connections of node on port {self.port} to close")


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


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for subprocess nodes)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@attrs.define
class NodeProcess:
    """A ``twistd -n foxnode`` child process on loopback."""

    process: subprocess.Popen
    port: int
    directory: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

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
