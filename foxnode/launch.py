"""The one process launcher: start ``twistd foxnode`` (or any command) as a
child on loopback, know when it serves, learn how it ended, stop it.

    node = launch_node(reactor, directory, "--network", "lab", port=9000)
    await node.serving(timeout=20)      # /healthz answered 200
    ...
    code = await node.stop(timeout=10)  # SIGTERM, then SIGKILL

The child is spawned with ``reactor.spawnProcess``; its stdout and stderr go
straight to its log file (so the node keeps logging if we die), and its end
arrives as ``processEnded`` (``when_ended()`` fires with the exit code). A node is *serving* when its ``/healthz``
answers 200; a node that exits first fails ``serving`` with ``NodeExited``,
which carries its exit code and the one line saying why
(``foxnode: cannot start: ...``).

``foxnode devnet``, the test helpers (``foxnode.testing``) and the
benchmarks (``bench/run.py``) all start nodes here. Code that cannot wait
on the reactor (synchronous tests, the benchmark driver) uses the same
object's blocking methods (``wait_serving``, ``wait``, ``stop_blocking``),
which reap the child themselves when the reactor is not turning for them.

Every address used here is on 127.0.0.0/8.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python import threadable
from twisted.python.failure import Failure

LOOPBACK = "127.0.0.1"

#: how often ``serving`` asks /healthz while a node comes up
PROBE_INTERVAL = 0.05


# -- the command ------------------------------------------------------------------


def twistd() -> list[str]:
    """The command that runs ``twistd`` of this Python (``python -m twisted``
    is ``twist``, which takes other options)."""
    script = Path(sys.executable).with_name("twistd")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; "
                                  "from twisted.scripts.twistd import run; run()"]


def twistd_command(directory: Path, port: int, *extra: str,
                   twistd_options: Sequence[str] = ()) -> list[str]:
    """``twistd --nodaemon --pidfile= [twistd_options] foxnode`` on
    127.0.0.1:``port``, with its peers file and data in ``directory``, then
    ``extra`` foxnode options."""
    return [
        *twistd(), "--nodaemon", "--pidfile=", *twistd_options, "foxnode",
        "--listen", f"tcp:{port}:interface={LOOPBACK}",
        "--peers-file", str(Path(directory) / "peers.json"),
        "--data-dir", str(directory),
        *extra,
    ]


def host_command(directory: Path, nodes: int, first: int, base_port: int, *node_args: str,
                 bootstrap: str = "first", twistd_options: Sequence[str] = ()) -> list[str]:
    """``twistd --nodaemon --pidfile= foxnode-host``: ``nodes`` nodes from
    index ``first``, node g on 127.0.0.1:``base_port``+g with its data in
    ``directory``/node-g, each given the foxnode options ``node_args``."""
    return [
        *twistd(), "--nodaemon", "--pidfile=", *twistd_options, "foxnode-host",
        "--nodes", str(nodes), "--first", str(first), "--base-port", str(base_port),
        "--dir", str(directory), "--bootstrap", bootstrap, "--", *node_args,
    ]


def node_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours (PYTHONPATH included, so the child
    imports the same foxnode) with unbuffered output, so its log is current."""
    return {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1"}


#: Runs the rest of its command line in a session of its own (``setsid``):
#: Ctrl-C at our terminal then reaches us only, and we stop the child in order.
_NEW_SESSION = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


# -- how it went --------------------------------------------------------------------


def health_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}/healthz"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers_health(port: int, timeout: float = 1.0) -> bool:
    """One look: does the node on ``port`` answer /healthz with 200? (It
    blocks up to ``timeout``; the launcher runs it in a thread.)"""
    try:
        with _NO_PROXY.open(health_url(port), timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def exit_text(code: int | None) -> str:
    """``exited with code 1``, ``was killed by SIGKILL``."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def exit_code(reason: Failure) -> int:
    """``processEnded``'s reason as subprocess says it: the exit status, or
    minus the signal that ended the process."""
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return -value.signal
        return value.exitCode if value.exitCode is not None else -1
    if isinstance(value, ProcessDone):
        return 0
    return -1


def start_error(log: str) -> str | None:
    """The line in which a node said why it could not start, if it did."""
    for line in reversed(log.splitlines()):
        at = line.find("foxnode: cannot start: ")
        if at >= 0:
            return line[at:].strip()
    return None


class NodeExited(RuntimeError):
    """The child ended before it served."""

    def __init__(self, code: int, why: str | None, log: str) -> None:
        super().__init__(f"foxnode {exit_text(code)}{': ' + why if why else ''}\n{log}")
        self.code = code
        self.why = why
        self.log = log


class NotServing(RuntimeError):
    """The child runs but did not serve in time."""


def log_tail(path: Path, lines: int = 5, indent: str = "    ") -> str:
    """The last ``lines`` lines of a log, indented, from its last 8 KiB."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode("utf-8", "replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(indent + line for line in text[-lines:])


# -- the child ----------------------------------------------------------------------


class Launched(ProcessProtocol):
    """One child: its pid, its log, its end (``ended`` fires with the exit
    code as ``returncode`` says it), and ways to stop it. Its blocking
    methods have ``subprocess.Popen``'s names (``poll``, ``wait``,
    ``send_signal``, ``kill``) for code written against Popen."""

    def __init__(self, reactor: Any, port: int | None, directory: Path, log_path: Path,
                 args: Sequence[str] = ()) -> None:
        self.reactor = reactor
        #: the command line, as Popen's ``args``
        self.args = list(args)
        self.port = port
        self.directory = directory
        self.log_path = log_path
        self.returncode: int | None = None
        self._ended_waiters: list[Deferred] = []
        self.transport: Any = None
        self._pid = 0

    # -- events --------------------------------------------------------------

    def processEnded(self, reason: Failure) -> None:
        self.returncode = exit_code(reason)
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(self.returncode)

    # -- state ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def running(self) -> bool:
        return self.returncode is None

    def when_ended(self) -> Deferred:
        """A new Deferred (one per caller) firing with the exit code, from
        ``processEnded``."""
        if self.returncode is not None:
            return succeed(self.returncode)
        d: Deferred = Deferred()
        self._ended_waiters.append(d)
        return d

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- signals -------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Signal the child, unless it has ended already."""
        if self.returncode is None:
            try:
                self.transport.signalProcess(sig)
            except (ProcessExitedAlready, ProcessLookupError):
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM, as Popen's (``stop`` also waits, and escalates)."""
        self.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0, on_kill: Callable[[], None] | None = None) -> Deferred:
        """SIGTERM; after ``timeout`` seconds without an end, ``on_kill()``
        and SIGKILL. Fires with the exit code."""
        ended = self.when_ended()
        if self.returncode is not None:
            return ended
        self.send_signal(signal.SIGTERM)

        def escalate() -> None:
            if self.returncode is None:
                if on_kill is not None:
                    on_kill()
                self.kill()

        call = self.reactor.callLater(timeout, escalate)

        def done(code: Any) -> Any:
            if call.active():
                call.cancel()
            return code

        return ended.addBoth(done)

    # -- serving -------------------------------------------------------------

    def serving(self, timeout: float = 20.0,
                probe: Callable[[int], Deferred] | None = None) -> Deferred:
        """Fires when /healthz answers 200; fails with ``NodeExited`` when
        the child ends first, ``NotServing`` after ``timeout``."""
        return ensureDeferred(self._serving(timeout, probe or self._probe))

    def _probe(self, port: int) -> Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), answers_health, port)

    async def _serving(self, timeout: float, probe: Callable[[int], Deferred]) -> None:
        assert self.port is not None, "a child without a port cannot serve"
        deadline = self.reactor.seconds() + timeout
        while True:
            if self.returncode is not None:
                raise self._exited()
            if await probe(self.port):
                return
            if self.returncode is not None:
                raise self._exited()
            if self.reactor.seconds() > deadline:
                raise NotServing(f"foxnode did not serve on port {self.port} within {timeout:g}s:\n{self.log()}")
            await deferLater(self.reactor, PROBE_INTERVAL)

    def _exited(self) -> NodeExited:
        log = self.log()
        return NodeExited(self.returncode if self.returncode is not None else -1, start_error(log), log)

    # -- the blocking side ---------------------------------------------------

    def _reactor_reaps(self) -> bool:
        """True when the reactor runs in another thread and will deliver
        ``processEnded`` by itself; otherwise we reap the child ourselves."""
        return bool(self.reactor.running) and not threadable.isInIOThread()

    def poll(self) -> int | None:
        if self.returncode is None and not self._reactor_reaps():
            self.transport.reapProcess()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child ends; ``subprocess.TimeoutExpired`` (as
        Popen's) after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def stop_blocking(self, timeout: float = 10.0) -> int:
        """``stop``, blocking: SIGTERM, SIGKILL after ``timeout``."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait(30)

    def wait_serving(self, timeout: float = 20.0) -> None:
        """``serving``, blocking; kills the child when it does not serve."""
        assert self.port is not None, "a child without a port cannot serve"
        wait_serving(self, self.port, self.log, timeout)


def wait_serving(process: Any, port: int, log: Callable[[], str], timeout: float = 20.0) -> None:
    """Block until the node on ``port`` serves (/healthz answers 200), as
    ``Launched.serving`` waits; ``process`` is a ``Launched`` or anything
    with Popen's ``poll``, ``kill`` and ``wait``. A child that ends first
    raises ``NodeExited``; one that does not serve in time is killed, and
    ``NotServing`` raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            text = log()
            raise NodeExited(code, start_error(text), text)
        if answers_health(port):
            return
        time.sleep(PROBE_INTERVAL)
    process.kill()
    process.wait(30)
    raise NotServing(f"foxnode did not serve on port {port} within {timeout:g}s:\n{log()}")


def launch(reactor: Any, command: Sequence[str], *, log_path: Path, port: int | None = None,
           directory: Path | None = None, cwd: Path | None = None, env: dict[str, str] | None = None,
           new_session: bool = False, banner: str | None = None) -> Launched:
    """Spawn ``command`` with stdin from /dev/null and stdout and stderr
    appended to ``log_path`` (after ``banner``, a line, if given); with
    ``new_session``, in a session of its own. ``port`` is where it will
    serve; ``cwd`` defaults to ``directory``, that to the log's."""
    directory = Path(directory) if directory is not None else Path(log_path).parent
    cwd = Path(cwd) if cwd is not None else directory
    argv = list(command)
    if new_session:
        argv = [sys.executable, "-c", _NEW_SESSION, *argv]
    child = Launched(reactor, port, directory, Path(log_path), command)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        if banner is not None:
            os.write(log_fd, (banner.rstrip("\n") + "\n").encode())
        spawn = reactor.spawnProcess
        args = (child, argv[0], argv)
        kwargs = dict(env=node_env() if env is None else env, path=str(cwd),
                      childFDs={0: null_fd, 1: log_fd, 2: log_fd})
        if reactor.running and not threadable.isInIOThread():
            from twisted.internet.threads import blockingCallFromThread

            transport = blockingCallFromThread(reactor, spawn, *args, **kwargs)
        else:
            transport = spawn(*args, **kwargs)
    finally:
        os.close(log_fd)
        os.close(null_fd)
    child.transport = transport
    child._pid = transport.pid
    return child


def launch_node(reactor: Any, directory: Path, *extra: str, port: int,
                twistd_options: Sequence[str] = (), log_path: Path | None = None,
                env: dict[str, str] | None = None, new_session: bool = False,
                banner: str | None = None) -> Launched:
    """``twistd foxnode`` on 127.0.0.1:``port`` with its data in
    ``directory`` (made if missing) and its log in ``directory/twistd.log``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return launch(reactor, twistd_command(directory, port, *extra, twistd_options=twistd_options),
                  log_path=log_path or directory / "twistd.log", port=port, directory=directory,
                  env=env, new_session=new_session, banner=banner)


def launch_host(reactor: Any, directory: Path, nodes: int, first: int, base_port: int,
                *node_args: str, log_path: Path, bootstrap: str = "first",
                env: dict[str, str] | None = None, new_session: bool = False,
                banner: str | None = None) -> Launched:
    """``twistd foxnode-host``: ``nodes`` nodes in one process (host.py).
    It serves once its last node's /healthz answers: every node of a host
    binds its port before the reactor turns, so then all of them listen."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return launch(reactor, host_command(directory, nodes, first, base_port, *node_args, bootstrap=bootstrap),
                  log_path=log_path, port=base_port + first + nodes - 1, directory=directory,
                  env=env, new_session=new_session, banner=banner)
