"""``foxnode attach URL``: an interactive console on a node, as geth's
console is for the lab's Ethereum sessions.

A line is a request, typed as ``op {json args}`` (``register {"addr":
"ws://127.0.0.1:9001/ws"}``), as a bare op (``peers``), or as the whole
request object (``{"op": "time"}``); the reply is printed as indented
JSON with its status. Lines starting with a dot are the console's own:
``.help`` lists the node's ops (asked of the node, so a plugin's ops
appear too), ``.peers`` shows the live peers as geth's ``admin.peers``
does, ``.info`` the node, ``.exit`` (or Ctrl-D) leaves. Events the node
pushes (gossip messages of a ``subscribe``) are printed as they arrive,
above the line being typed, which stays as it was.

How: the reactor keeps the main thread, as for every ``foxnode`` command;
prompt_toolkit's line editor runs in a thread of its own, and
``patch_stdout`` lets both print without breaking the line under edit.
Requests go to the reactor with ``blockingCallFromThread``. History is
kept across sessions in a file (``--history``, default
``~/.foxnode_history``); Tab completes op names, then argument keys.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Iterable

import orjson
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.threads import blockingCallFromThread

from foxnode import codec

DEFAULT_HISTORY = "~/.foxnode_history"
PROMPT = "foxnode> "

#: The argument keys of the ops PROTOCOL.md names, for completion, as
#: PROTOCOL.md spells them (tests/test_console.py holds them to it); ``peers``'
#: ``cursor`` and ``info``'s ``detail`` are the README's. Ops the node serves
#: beyond these (a plugin's) complete by name only.
ARG_KEYS: dict[str, tuple[str, ...]] = {
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
COMMANDS = (".help", ".peers", ".info", ".exit")


class BadLine(ValueError):
    """A line that is not a request; ``str()`` says why (nothing is sent)."""


def parse_line(line: str) -> tuple[str, Any]:
    """``(op, args)`` of a typed request; raises ``BadLine``."""
    text = line.strip()
    if text.startswith("{"):
        try:
            request = json.loads(text)
        except ValueError as e:
            raise BadLine(f"not JSON: {e}") from None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise BadLine('a request object needs "op": a string')
        return request["op"], request.get("args")
    op, _, rest = text.partition(" ")
    rest = rest.strip()
    if not rest:
        return op, None
    try:
        return op, json.loads(rest)
    except ValueError as e:
        raise BadLine(f"the args after {op!r} are not JSON: {e}") from None


def show_reply(reply: codec.Reply) -> str:
    head = f"{reply.status}" + (f" {reply.error}" if reply.error else "")
    if reply.response is None:
        return head
    return head + "\n" + orjson.dumps(reply.response, option=orjson.OPT_INDENT_2).decode()


def show_event(event: codec.Event) -> str:
    return f"<- {event.name} " + orjson.dumps(event.body).decode()


def show_peers(info: dict[str, Any]) -> str:
    """The live peers, one block each, as geth's ``admin.peers`` lists them."""
    peers = info.get("connected") or []
    if not peers:
        return "no peers connected"
    blocks = []
    for p in peers:
        lines = [f"id:        {p.get('node_id')}", f"address:   {p.get('addr')}",
                 f"direction: {'inbound' if p.get('direction') == 'in' else 'outbound'}"]
        if p.get("kind"):
            lines.append(f"kind:      {p['kind']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


class RequestCompleter(Completer):
    """Op names for the first word (``ops()`` gives them, from the node),
    then the op's argument keys as JSON strings."""

    def __init__(self, ops: Callable[[], Iterable[str]]) -> None:
        self._ops = ops

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        before = document.text_before_cursor
        if " " not in before.lstrip():
            word = before.lstrip()
            for name in sorted(set(self._ops()) | set(COMMANDS)):
                if name.startswith(word):
                    yield Completion(name, start_position=-len(word))
            return
        op = before.split(None, 1)[0]
        word = document.get_word_before_cursor(WORD=True)
        fragment = word.lstrip('{, ')
        start = -len(fragment)
        for key in ARG_KEYS.get(op, ()):
            quoted = f'"{key}": '
            if quoted.startswith(fragment) and f'"{key}"' not in before:
                yield Completion(quoted, start_position=start, display=key)


class Console:
    """One session on one connection; ``run`` returns when the user leaves."""

    def __init__(self, reactor: Any, conn: Any, url: str, history: str | None = DEFAULT_HISTORY,
                 timeout: float = 10.0, output: Callable[[str], None] = print) -> None:
        self.reactor = reactor
        self.conn = conn
        self.url = url
        self.timeout = timeout
        self._print = output
        self._ops: list[str] = []
        self._lock = threading.Lock()
        path = os.path.expanduser(history) if history else None
        self.history = FileHistory(path) if path else InMemoryHistory()

    # -- on the reactor's thread -------------------------------------------------

    def event_arrived(self, event: codec.Event) -> None:
        self._print(show_event(event))

    def _request(self, op: str, args: Any) -> Any:
        return self.conn.request(op, args, timeout=self.timeout)

    # -- on the console's thread -------------------------------------------------

    def ask(self, op: str, args: Any = None) -> codec.Reply:
        return blockingCallFromThread(self.reactor, self._request, op, args)

    def ops(self) -> list[str]:
        return self._ops

    def _try_ask(self, op: str, args: Any = None) -> codec.Reply | None:
        """``ask``, or None once one line said why no reply came (a timeout,
        the connection gone): nothing the node does ends the session with
        a traceback."""
        if not self.conn.fox_open:
            self._print("no reply: the connection is closed")
            return None
        try:
            return self.ask(op, args)
        except DeferredTimeout:
            self._print(f"no reply: the node did not answer {op!r} within {self.timeout:g} s")
        except Exception as e:
            self._print(f"no reply: {type(e).__name__}: {e}")
        return None

    def _learn_ops(self, reply: codec.Reply) -> bool:
        """Keep the ops an ``info`` reply lists; whether it listed them."""
        if reply.ok() and isinstance(reply.response, dict):
            self._ops = [o for o in reply.response.get("ops") or [] if isinstance(o, str)]
            return True
        return False

    def handle(self, line: str) -> bool:
        """Do one typed line; False: the user leaves (or the connection is gone)."""
        text = line.strip()
        if not text:
            return True
        if text in (".exit", ".quit"):
            return False
        if text in (".help", ".peers", ".info"):
            reply = self._try_ask("info")
            if reply is None:
                return self.conn.fox_open
            if text == ".help":
                self._print("ops of this node: " + " ".join(sorted(self._ops))
                            if self._learn_ops(reply) else "the node did not say its ops: " + show_reply(reply))
                self._print("type: op {json args}, or a request object {\"op\": ...}; "
                            ".peers, .info, .exit (or Ctrl-D)")
            elif text == ".peers" and reply.ok() and isinstance(reply.response, dict):
                self._print(show_peers(reply.response))
            else:
                self._print(show_reply(reply))
            return True
        if text.startswith("."):
            self._print(f"unknown command {text.split()[0]}: .help lists what there is")
            return True
        try:
            op, args = parse_line(text)
        except BadLine as e:
            self._print(f"not sent: {e}")
            return True
        reply = self._try_ask(op, args)
        if reply is None:
            return self.conn.fox_open
        self._print(show_reply(reply))
        return True

    def run(self, prompt_input: Any = None, prompt_output: Any = None) -> None:
        """The read-eval-print loop, in the calling (not the reactor's) thread."""
        reply = self._try_ask("info")
        if reply is not None:
            self._learn_ops(reply)
        session: PromptSession = PromptSession(
            history=self.history, completer=RequestCompleter(self.ops), complete_while_typing=False,
            input=prompt_input, output=prompt_output)
        self._print(f"attached to {self.url}; .help lists the ops, Ctrl-D leaves")
        with patch_stdout(raw=True):
            while self.conn.fox_open:
                try:
                    line = session.prompt(PROMPT)
                except EOFError:
                    break
                except KeyboardInterrupt:
                    continue  # as a shell does: the line is dropped
                if not self.handle(line):
                    break


async def run_attach(reactor: Any, opts: Any) -> None:
    """``foxnode attach``: connect, then hand the terminal to the console."""
    from twisted.internet.threads import deferToThreadPool

    from foxnode import cli, client

    url, timeout = opts.url, opts.timeout
    box: dict[str, Console] = {}

    def on_event(event: codec.Event) -> None:
        if "console" in box:
            box["console"].event_arrived(event)

    try:
        _, opened = cli.open_connection(reactor, url, client.Listener(on_event), cafile=opts.cafile,
                                        timeout=timeout, max_message_size=opts.max_message_size)
        opened.addTimeout(timeout, reactor)
        proto = await opened
    except Exception as e:
        raise cli.Failed(cli.EXIT_USAGE, cli.describe_failure(e, url, timeout)) from None
    console = box["console"] = Console(reactor, proto, url, history=opts.history, timeout=timeout)
    try:
        await deferToThreadPool(reactor, reactor.getThreadPool(), console.run)
    finally:
        await cli._close(reactor, proto)
