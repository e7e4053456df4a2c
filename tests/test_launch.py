"""The process launcher (foxnode.launch): real ``twistd foxnode`` children
that serve, fail to start and stop; a child that ignores SIGTERM; and the
same decisions on a fake clock. Every address is on 127.0.0.0/8."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from foxnode import client, launch
from foxnode.testing import LOOPBACK, free_port, spawn_node, wait_for

IGNORES_SIGTERM = ("import signal, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "print('ignoring SIGTERM', flush=True)\n"
                   "time.sleep(60)\n")


def reaped(pid: int) -> bool:
    """No process (and no zombie) of ours has ``pid`` any more."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    else:
        return False
    return not Path(f"/proc/{pid}").exists()


def test_the_twistd_command_listens_on_loopback_only(tmp_path: Path) -> None:
    command = launch.twistd_command(tmp_path, 9123, "--network", "lab", twistd_options=["--umask", "022"])
    at = command.index("foxnode")
    assert command[at - 4:at] == ["--nodaemon", "--pidfile=", "--umask", "022"]
    assert command[at + 1:] == ["--listen", "tcp:9123:interface=127.0.0.1",
                                "--peers-file", str(tmp_path / "peers.json"),
                                "--data-dir", str(tmp_path), "--network", "lab"]


@pytest_twisted.ensureDeferred
async def test_a_node_starts_serves_and_stops(reactor, tmp_path: Path) -> None:
    port = free_port()
    node = launch.launch_node(reactor, tmp_path / "node", "--network", "lab", port=port,
                              banner="=== a test node ===")
    try:
        await node.serving(timeout=30)
        assert node.running
        reply = await client.call(reactor, f"ws://{LOOPBACK}:{port}/ws", "info")
        assert reply.status == 200 and reply.response["network"] == "lab"
    finally:
        code = await node.stop(timeout=10)
    # twistd ends a SIGTERM'd run by re-raising the signal on itself.
    assert code in (0, -signal.SIGTERM), node.log()
    assert node.returncode == code and not node.running
    log = node.log()
    assert log.startswith("=== a test node ===\n")
    assert "Server Shut Down." in log
    assert reaped(node.pid)


@pytest_twisted.ensureDeferred
async def test_a_node_whose_port_is_taken_says_why_in_one_line(reactor, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        node = launch.launch_node(reactor, tmp_path / "node", port=port)
        with pytest.raises(launch.NodeExited) as caught:
            await node.serving(timeout=30)
    error = caught.value
    assert error.code == 1 == node.returncode
    assert error.why == (f"foxnode: cannot start: {LOOPBACK}:{port} is in use "
                         f"(--listen tcp:{port}:interface={LOOPBACK})")
    assert "Traceback" not in node.log()
    assert launch.start_error(node.log()) == error.why
    assert reaped(node.pid)


@pytest_twisted.ensureDeferred
async def test_stop_kills_a_child_that_ignores_sigterm(reactor, tmp_path: Path) -> None:
    child = launch.launch(reactor, [sys.executable, "-c", IGNORES_SIGTERM], log_path=tmp_path / "child.log")
    await wait_for(reactor, lambda: "ignoring SIGTERM" in child.log(), timeout=20,
                   what="the child to ignore SIGTERM")
    killed = []
    code = await child.stop(timeout=0.5, on_kill=lambda: killed.append(reactor.seconds()))
    assert code == -signal.SIGKILL
    assert launch.exit_text(code) == "was killed by SIGKILL"
    assert len(killed) == 1
    assert reaped(child.pid)


@pytest_twisted.ensureDeferred
async def test_a_new_session_child_keeps_its_pid_and_leads_its_session(reactor, tmp_path: Path) -> None:
    child = launch.launch(reactor, [sys.executable, "-c",
                                    "import os, time; print(os.getpid(), os.getsid(0), flush=True); "
                                    "time.sleep(60)"],
                          log_path=tmp_path / "child.log", new_session=True)
    try:
        await wait_for(reactor, lambda: child.log().strip(), timeout=20, what="the child to say its ids")
        pid, sid = map(int, child.log().split())
        assert pid == sid == child.pid != os.getsid(0)
    finally:
        assert await child.stop(timeout=5) == -signal.SIGTERM
    assert reaped(child.pid)


@pytest_twisted.ensureDeferred
async def test_the_blocking_side_from_a_thread(reactor, tmp_path: Path) -> None:
    """spawn_node, as synchronous tests use it, from a thread while the
    reactor turns: the reactor reaps, the thread sees the end."""
    node = await deferToThread(spawn_node, tmp_path / "node")
    assert await deferToThread(node.stop) in (0, -signal.SIGTERM)
    assert reaped(node.process.pid)


def test_the_blocking_side_without_the_reactor_turning(tmp_path: Path) -> None:
    """From a synchronous test (the reactor does not turn meanwhile): the
    child reaps itself."""
    node = spawn_node(tmp_path / "node")
    assert node.process.poll() is None
    assert node.stop() in (0, -signal.SIGTERM)
    assert reaped(node.process.pid)
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        with pytest.raises(launch.NodeExited, match="is in use"):
            spawn_node(tmp_path / "other", port=busy.getsockname()[1])


# -- on a fake clock ------------------------------------------------------------------


class FakeTransport:
    pid = 4242

    def __init__(self) -> None:
        self.signals: list[int] = []

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)


def fake_child(clock: Clock, tmp_path: Path) -> tuple[launch.Launched, FakeTransport]:
    child = launch.Launched(clock, 9, tmp_path, tmp_path / "log")
    transport = FakeTransport()
    child.makeConnection(transport)
    return child, transport


def test_stop_escalates_on_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    child, transport = fake_child(clock, tmp_path)
    codes: list[int] = []
    killed: list[float] = []
    child.stop(timeout=10, on_kill=lambda: killed.append(clock.seconds())).addCallback(codes.append)
    assert transport.signals == [signal.SIGTERM]
    clock.advance(9.9)
    assert transport.signals == [signal.SIGTERM] and not killed
    clock.advance(0.1)
    assert transport.signals == [signal.SIGTERM, signal.SIGKILL] and killed == [10.0]
    child.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
    assert codes == [-signal.SIGKILL]
    assert not clock.getDelayedCalls()


def test_a_child_that_stops_in_time_is_not_killed(tmp_path: Path) -> None:
    clock = Clock()
    child, transport = fake_child(clock, tmp_path)
    codes: list[int] = []
    child.stop(timeout=10).addCallback(codes.append)
    clock.advance(1)
    child.processEnded(Failure(ProcessDone(0)))
    assert codes == [0]
    assert not clock.getDelayedCalls()
    assert transport.signals == [signal.SIGTERM]
    # Stopping what has ended sends nothing and answers at once.
    child.stop().addCallback(codes.append)
    assert codes == [0, 0] and transport.signals == [signal.SIGTERM]


def test_serving_asks_until_the_node_answers_and_times_out_on_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    child, _ = fake_child(clock, tmp_path)
    answers = iter([False, False, True])
    served: list = []
    child.serving(timeout=5, probe=lambda port: succeed(next(answers))).addBoth(served.append)
    assert not served
    clock.advance(launch.PROBE_INTERVAL)
    clock.advance(launch.PROBE_INTERVAL)
    assert served == [None]

    late, _ = fake_child(clock, tmp_path)
    failed: list = []
    late.serving(timeout=1, probe=lambda port: succeed(False)).addErrback(failed.append)
    clock.pump([launch.PROBE_INTERVAL] * 25)
    assert failed and failed[0].check(launch.NotServing)


def test_serving_fails_when_the_child_exits_first(tmp_path: Path) -> None:
    clock = Clock()
    child, _ = fake_child(clock, tmp_path)
    (tmp_path / "log").write_text("2026 [foxnode.service#critical] foxnode: cannot start: no good\n")
    failed: list = []
    child.serving(timeout=5, probe=lambda port: succeed(False)).addErrback(failed.append)
    child.processEnded(Failure(ProcessTerminated(exitCode=1)))
    clock.advance(launch.PROBE_INTERVAL)
    assert failed and failed[0].check(launch.NodeExited)
    assert (failed[0].value.code, failed[0].value.why) == (1, "foxnode: cannot start: no good")
