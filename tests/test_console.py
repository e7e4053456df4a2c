"""``foxnode attach``, driven through a pseudo-terminal as a person would:
typing, Tab completion, an event arriving mid-line, history, Ctrl-D."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from foxnode import client
from foxnode.console import ARG_KEYS, BadLine, Console, RequestCompleter, parse_line, show_peers
from foxnode.testing import start_node

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]|\r")


class Terminal:
    """A child process on a pseudo-terminal; what it shows, escapes removed."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        close_fds=True, start_new_session=True)
        os.close(slave)
        self.shown = ""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.shown += _ANSI.sub("", data.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float = 20.0, since: int = 0) -> int:
        """Read until ``pattern`` shows after position ``since``; its end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.shown[since:])
            if m:
                return since + m.end()
            self.read(0.1)
            if self.process.poll() is not None:
                self.read(0.2)
                m = re.search(pattern, self.shown[since:])
                if m:
                    return since + m.end()
                break
        raise AssertionError(f"{pattern!r} not shown; the terminal shows:\n{self.shown[since:][-3000:]}")

    def finish(self, timeout: float = 20.0) -> int | None:
        """Read (so that the child never blocks writing) until it exits."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        return self.process.poll()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self.master)


def attach(url: str, history: Path) -> Terminal:
    foxnode = Path(sys.executable).parent / "foxnode"
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "200", "LINES": "50"}
    return Terminal([str(foxnode), "attach", url, "--history", str(history)], env)


def test_lines_parse_as_requests_or_say_why_not():
    assert parse_line("peers") == ("peers", None)
    assert parse_line(' register {"addr": "ws://127.3.0.1:9/ws"}') == ("register", {"addr": "ws://127.3.0.1:9/ws"})
    assert parse_line('{"op": "time"}') == ("time", None)
    for bad in ('register {"addr": ', '{"op": 7}', "{nope", 'time [1,'):
        with pytest.raises(BadLine):
            parse_line(bad)


def test_completion_offers_ops_then_their_argument_keys():
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    completer = RequestCompleter(lambda: ["register", "peers", "greet"])

    def offered(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert offered("re") == ["register"]
    assert offered("g") == ["greet"]  # a plugin's op, as the node lists it
    assert offered("register {") == ['"addr": ']
    assert offered('register {"addr": "x"}') == []
    assert offered(".he") == [".help"]


#: The argument keys of each op, as PROTOCOL.md names them (its node ops and
#: "Additions of the second round"); peers' cursor and info's detail are the
#: README's.
PROTOCOL_ARG_KEYS = {
    "register": ("addr",),
    "unregister": ("addr",),
    "peers": ("cursor",),
    "info": ("detail",),
    "publish": ("topic", "payload", "ttl", "key", "to", "sign", "pow", "pow_time"),
    "subscribe": ("topics", "key", "from", "min_pow", "since"),
    "unsubscribe": ("topics", "subscription"),
    "newkey": ("type", "password"),
    "addkey": ("type", "key", "private_key"),
    "getkey": ("id", "secret"),
    "delkey": ("id",),
    "filter": ("topics", "key", "from", "min_pow", "since"),
    "poll": ("filter", "limit"),
    "unfilter": ("filter",),
    "history": ("topics", "since", "until", "limit", "cursor", "key", "from", "min_pow"),
}


def test_completion_offers_the_argument_keys_protocol_names():
    assert ARG_KEYS == PROTOCOL_ARG_KEYS
    protocol = Path(__file__).resolve().parents[2] / "shared" / "PROTOCOL.md"
    if not protocol.exists():
        pytest.skip(f"{protocol} is not here to check the keys against")
    text = protocol.read_text()
    readme_only = {("peers", "cursor"), ("info", "detail")}
    for op, keys in ARG_KEYS.items():
        assert f"`{op}`" in text, op
        for key in keys:
            if (op, key) not in readme_only:
                assert f'"{key}"' in text or f"`{key}`" in text, (op, key)


class SilentConnection:
    """A connection whose node never answers: every request times out."""

    fox_open = True

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def request(self, op, args=None, timeout=None):
        return Deferred().addTimeout(timeout, self.reactor)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_console_commands_without_a_reply_say_one_line_and_go_on(reactor):
    shown: list[str] = []
    console = Console(reactor, SilentConnection(reactor), "ws://127.0.0.1:9/ws", history=None,
                      timeout=0.1, output=shown.append)
    for line in (".help", ".peers", ".info", "peers"):
        shown.clear()
        assert await deferToThread(console.handle, line) is True, line
        assert len(shown) == 1 and shown[0].startswith("no reply: the node did not answer"), (line, shown)


class ClosingConnection:
    """A connection the node closes while a request is under way."""

    fox_open = True

    def request(self, op, args=None, timeout=None):
        from twisted.internet.defer import fail

        from foxnode.protocol import RequestFailed

        self.fox_open = False
        return fail(RequestFailed("connection closed (4000: node shutting down)"))


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_console_commands_whose_connection_closes_under_way_leave_cleanly(reactor):
    for line in (".help", ".peers", ".info", "peers"):
        shown: list[str] = []
        console = Console(reactor, ClosingConnection(), "ws://127.0.0.1:9/ws", history=None,
                          output=shown.append)
        assert await deferToThread(console.handle, line) is False, line
        assert shown == ["no reply: RequestFailed: connection closed (4000: node shutting down)"], (line, shown)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_console_commands_after_the_node_stopped_leave_cleanly(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "node")
    proto = await client.connect(reactor, node.url)
    shown: list[str] = []
    console = Console(reactor, proto, node.url, history=None, timeout=5, output=shown.append)
    try:
        assert await deferToThread(console.handle, ".peers") is True
        assert shown == ["no peers connected"]
    finally:
        await node.stop()
    await proto.when_closed()
    for line in (".peers", ".info", ".help", "peers"):
        shown.clear()
        # One line, and the session ends (False), as it does for a request.
        assert await deferToThread(console.handle, line) is False, line
        assert shown == ["no reply: the connection is closed"], (line, shown)


def test_peers_read_like_admin_peers():
    shown = show_peers({"connected": [{"node_id": "ab" * 32, "addr": "ws://127.3.0.1:9/ws",
                                       "direction": "out", "kind": "static"}]})
    assert shown.splitlines() == [f"id:        {'ab' * 32}", "address:   ws://127.3.0.1:9/ws",
                                  "direction: outbound", "kind:      static"]
    assert show_peers({"connected": []}) == "no peers connected"


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_a_console_session_through_a_pseudo_terminal(reactor, tmp_path):
    node = await start_node(reactor, tmp_path / "node")
    history = tmp_path / "history"
    term = attach(node.url, history)
    try:
        await deferToThread(term.wait_for, r"foxnode>")
        # Tab completes the op's name from what the node serves.
        term.type("ti\t")
        await deferToThread(term.wait_for, r"foxnode>\s*time")
        term.type("\r")
        at = await deferToThread(term.wait_for, r'200 OK\s*\{\s*"time": [0-9.]+')
        # A request with JSON args, and its pretty reply.
        term.type('subscribe {"topics": ["news"]}\r')
        at = await deferToThread(term.wait_for, r'200 OK\s*\{\s*"topics": \[\s*"news"\s*\]', since=at)
        # Half a line typed, then a message arrives: it is shown, and the
        # half line is still there to finish.
        term.type("pe")
        await deferToThread(term.read, 0.5)
        reply = await client.call(reactor, node.url, "publish", {"topic": "news", "payload": {"n": 42}})
        assert reply.status == 202
        at = await deferToThread(term.wait_for, r'<- message .*"payload":\{"n":42\}', since=at)
        term.type("ers\r")
        at = await deferToThread(term.wait_for, r'200 OK\s*\{\s*"peers": \[', since=at)
        # Not JSON: said, nothing sent, the console goes on.
        term.type("register {oops\r")
        at = await deferToThread(term.wait_for, r"not sent: the args after 'register' are not JSON", since=at)
        term.type(".help\r")
        at = await deferToThread(term.wait_for, r"ops of this node: .*register.*time", since=at)
        # Ctrl-D leaves, with exit status 0.
        term.type("\x04")
        code = await deferToThread(term.finish)
        assert code == 0, term.shown[-2000:]
    finally:
        term.close()
    # History survives the session: the next one recalls the last line with Up.
    assert "register {oops" in history.read_text()
    term = attach(node.url, history)
    try:
        await deferToThread(term.wait_for, r"foxnode>")
        mark = len(term.shown)
        term.type("\x1b[A")
        await deferToThread(term.wait_for, r"\.help", since=mark)
        # Ctrl-D on a line with text deletes, as in a shell: Ctrl-C drops
        # the line first.
        term.type("\x03")
        await deferToThread(term.wait_for, r"foxnode>", since=mark + 5)
        term.type("\x04")
        assert await deferToThread(term.finish) == 0, term.shown[-2000:]
    finally:
        term.close()
        await node.stop()
