"""SIGHUP to a real ``twistd -n foxnode``: the node goes on serving; with
``--logfile`` it reopens the log file (after logrotate moved it away, a new
one appears and gets the new lines); SIGTERM still ends it with its normal
shutdown. Every address is on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from foxnode.testing import NodeProcess, spawn_node

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(directory: Path, *twistd_options: str) -> NodeProcess:
    # What twistd writes to its standard output (nothing, with --logfile).
    return spawn_node(directory, twistd_options=twistd_options, log_path=directory / "output", timeout=30)


def answers(node: NodeProcess) -> None:
    """The node answers over HTTP and over its WebSocket."""
    with urllib.request.urlopen(f"{node.http}/healthz", timeout=10) as reply:
        assert reply.status == 200
    call = subprocess.run([str(BIN / "foxnode"), "call", node.url, "time"], env=ENV,
                          capture_output=True, text=True, timeout=30)
    assert call.returncode == 0, call.stderr


def eventually(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stops_cleanly(node: NodeProcess, log: Path) -> None:
    code = node.stop()
    # twistd ends a SIGTERM'd run by raising SIGTERM on itself again.
    assert code in (0, -signal.SIGTERM), node.log()
    text = log.read_text()
    assert "Received SIGTERM, shutting down." in text
    assert "Server Shut Down." in text
    assert "Traceback" not in text


def test_sighup_on_standard_output_changes_nothing(tmp_path):
    node = start(tmp_path)
    try:
        node.process.send_signal(signal.SIGHUP)
        eventually(lambda: "SIGHUP" in node.log(), "the node to say it got SIGHUP")
        assert node.process.poll() is None, node.log()
        answers(node)
        said = [line for line in node.log().splitlines() if "SIGHUP" in line]
        assert len(said) == 1 and "the node goes on" in said[0], said
    finally:
        stops_cleanly(node, node.log_path)


def test_sighup_reopens_the_log_file_after_it_was_moved(tmp_path):
    log = tmp_path / "foxnode.log"
    node = start(tmp_path, "--logfile", str(log))
    try:
        eventually(lambda: "listening on port" in log.read_text(), "the node to log its start")
        moved = tmp_path / "foxnode.log.1"
        log.rename(moved)
        node.process.send_signal(signal.SIGHUP)
        eventually(lambda: log.exists() and "SIGHUP: reopened the log file" in log.read_text(),
                   "a new log file")
        assert node.process.poll() is None, moved.read_text()
        old = moved.read_text()
        assert "listening on port" in old
        answers(node)
        # The request's line reaches the new file, not the moved one.
        eventually(lambda: "GET /healthz" in log.read_text(), "the new file to get the request's line")
        assert moved.read_text() == old
        # Again: a second rotation works as the first.
        log.rename(tmp_path / "foxnode.log.2")
        node.process.send_signal(signal.SIGHUP)
        eventually(log.exists, "a second new log file")
    finally:
        stops_cleanly(node, log)
    assert node.log() == "", "nothing goes to the terminal when there is a log file"
