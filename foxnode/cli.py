"""The ``foxnode`` command: ask a node something, watch its gossip, or run
a whole network of nodes on this machine.

    foxnode call ws://127.0.0.1:9000/ws peers
    foxnode call ws://127.0.0.1:9000/ws register '{"addr": "ws://127.0.0.1:9001/ws"}'
    foxnode watch ws://127.0.0.1:9000/ws news blocks
    foxnode call ws://127.0.0.1:9000/ws publish '{"topic": "t", "payload": 1}' --key KEYID
    foxnode watch ws://127.0.0.1:9000/ws t --key KEYID
    foxnode devnet --nodes 3

Exit codes are the same for every subcommand: 0 success, 1 the node said
no (an error status, a dropped connection, a node that died), 2 the command
could not do its job at all (bad usage, node unreachable, no reply in time).
Failures are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import time
from typing import IO, Any, Callable
from urllib.parse import urlsplit

import orjson
from twisted.internet import error as net_error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError as DeferredTimeout,
    ensureDeferred,
)
from twisted.internet.task import deferLater, react

from foxnode import __version__, address, client, codec, crypto, links
from foxnode.config import NodeConfig, default
from foxnode.protocol import CLOSE_NORMAL, FoxClientFactory, FoxClientProtocol, RequestFailed

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

LOOPBACK = "127.0.0.1"


class Failed(SystemExit):
    """Ends the command: ``message`` goes to stderr, ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


def _say(stream: IO[str], line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def _sleep(reactor: Any, seconds: float) -> Deferred:
    return deferLater(reactor, seconds)


# -- talking to a node ------------------------------------------------------------


def node_url(text: str) -> str:
    """A node's WebSocket URL from the command line; ``ws://host:port``
    without a path means the node's endpoint, ``/ws``."""
    if text.startswith(("ws://", "wss://")) and urlsplit(text).path == "":
        text += "/ws"
    try:
        return address.parse(text).url
    except address.InvalidAddress as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node address: {e}") from None


def json_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from None


def request_id(text: str) -> str | int | float:
    """``--id 7`` sends the number 7, ``--id abc`` the string "abc" and
    ``--id '"7"'`` the string "7"."""
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: an id of printable characters, please")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    return text


def endpoint(reactor: Any, url: str, cafile: str | None, timeout: float) -> Any:
    """The client endpoint for ``url``. ``cafile`` (wss:// only) is a PEM
    file (one or more CA certificates) or a directory of them; without it
    the system's trust store decides."""
    addr = address.parse(url)
    if cafile and not os.path.exists(cafile):
        raise Failed(EXIT_USAGE, f"--cafile {cafile}: no such file or directory")
    try:
        return client.endpoint_for(reactor, addr, cafile if addr.secure else None, timeout)
    except client.TrustError as e:
        raise Failed(EXIT_USAGE, f"--cafile {e}") from None


class _OneCallProtocol(FoxClientProtocol):
    """Sends one request exactly as the user gave it (their own ``id`` of
    any JSON type, or none) and takes the first reply: replies come in
    request order, so with one request sent, the first one is ours. It
    fires ``factory.reply`` with the reply object as it came on the wire."""

    #: set once the request is on its way; only then does a close fail it
    sent = False

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        waiting = self.factory.reply
        if not waiting.called:
            try:
                message = codec.decode(payload)
            except codec.CodecError:
                message = None
            if isinstance(message, codec.Response):
                waiting.callback(codec.loads(payload))
                return
        super().onMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        waiting = self.factory.reply
        if self.sent and not waiting.called:
            waiting.errback(RequestFailed(f"connection closed before the reply ({code}: {reason})"))


def open_connection(reactor: Any, url: str, handler: Any, *, cafile: str | None = None,
                    timeout: float = client.TIMEOUT, protocol: type | None = None,
                    max_message_size: int = client.CLIENT_MAX_MESSAGE) -> tuple[Any, Deferred]:
    """Dial ``url``; returns the factory and a Deferred firing with the open protocol."""
    factory = FoxClientFactory(url, handler, reactor, open_timeout=timeout,
                               max_message_size=max_message_size)
    if protocol is not None:
        factory.protocol = protocol
    d = endpoint(reactor, url, cafile, timeout).connect(factory)
    d.addCallback(lambda proto: proto.when_opened())
    return factory, d


def describe_failure(exc: BaseException, url: str, timeout: float) -> str:
    """One line saying why ``url`` could not be reached or gave no reply."""
    if isinstance(exc, (DeferredTimeout, net_error.TimeoutError)):
        return f"no reply from {url} within {timeout:g}s"
    if isinstance(exc, net_error.ConnectionRefusedError):
        return f"cannot connect to {url}: connection refused (is the node running?)"
    if isinstance(exc, net_error.DNSLookupError):
        return f"cannot connect to {url}: cannot resolve the host name"
    if isinstance(exc, net_error.ConnectError):
        why = str(exc).strip().rstrip(".")
        return f"cannot connect to {url}: {why or type(exc).__name__}"
    if isinstance(exc, RequestFailed):
        # "connection closed before it opened (1006: ... ("<Autobahn's reason>"))"
        quoted = re.search(r'\("(.*)"\)', str(exc))
        why = quoted.group(1) if quoted else str(exc)
        if why.startswith("SSL error:"):
            why = why.removeprefix("SSL error:").replace("(in )", "").strip()
            return f"TLS with {url} failed: {why} (a node with a self-signed certificate needs --cafile)"
        if "before it opened" in str(exc):
            return f"no WebSocket at {url}: {why}"
        return f"{url}: {why}"
    module = type(exc).__module__ or ""
    if module.startswith("OpenSSL") or "SSL" in type(exc).__name__:
        return f"TLS with {url} failed: {exc} (a node with a self-signed certificate needs --cafile)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{url}: {type(exc).__name__}{': ' + text if text else ''}"


def _shutdown_trigger(reactor: Any, callback: Callable[[], Any]) -> Callable[[], None]:
    """Run ``callback`` when the reactor begins to stop (Ctrl-C, SIGTERM);
    returns a function that removes the trigger again."""
    handle = reactor.addSystemEventTrigger("before", "shutdown", callback)
    return lambda: reactor.removeSystemEventTrigger(handle)


async def _close(reactor: Any, proto: Any, wait: float = 3.0) -> None:
    if proto is None:
        return
    proto.close(CLOSE_NORMAL)
    closed = proto.when_closed()
    closed.addTimeout(wait, reactor)
    try:
        await closed
    except Exception:
        proto.dropConnection(abort=True)


def _write_json(value: Any, pretty: bool = False) -> None:
    option = orjson.OPT_INDENT_2 if pretty else 0
    sys.stdout.buffer.write(orjson.dumps(value, option=option) + b"\n")
    sys.stdout.buffer.flush()


async def run_call(reactor: Any, opts: argparse.Namespace) -> None:
    url, timeout = opts.url, opts.timeout
    proto_box: list[Any] = []

    async def exchange() -> dict:
        factory, opened = open_connection(reactor, url, client.Listener(), cafile=opts.cafile,
                                          timeout=timeout, protocol=_OneCallProtocol,
                                          max_message_size=opts.max_message_size)
        factory.reply = Deferred()
        proto = await opened
        proto_box.append(proto)
        request = codec.encode_request(opts.op, opts.args, opts.id)
        if len(request) > proto.send_limit:
            raise Failed(EXIT_USAGE, f"the request is {len(request)} bytes, over --max-message-size "
                                     f"({opts.max_message_size})")
        proto.send_frame(request)
        proto.sent = True
        return await factory.reply

    attempt = ensureDeferred(exchange())
    attempt.addTimeout(timeout, reactor)
    untrigger = _shutdown_trigger(reactor, attempt.cancel)
    try:
        reply = await attempt
    except CancelledError:
        raise Failed(EXIT_INTERRUPTED, "interrupted") from None
    except Failed:
        raise
    except Exception as e:
        raise Failed(EXIT_USAGE, describe_failure(e, url, timeout)) from None
    finally:
        untrigger()
        if proto_box:
            await _close(reactor, proto_box[0])
    _write_json(reply, opts.pretty)
    status = reply.get("status")
    if not (isinstance(status, int) and 200 <= status < 300):
        raise Failed(EXIT_ERROR, f"{status} {reply.get('error', '')}".rstrip())


# -- watch -------------------------------------------------------------------------


async def run_watch(reactor: Any, opts: argparse.Namespace) -> None:
    url, timeout = opts.url, opts.timeout
    state = {"stopping": False, "proto": None}

    def on_event(event: codec.Event) -> None:
        if event.name != "message" or state["stopping"]:
            return
        try:
            _write_json(event.body)
        except BrokenPipeError:
            # The reader went away (``| head -3``): that is a normal end.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            state["stopping"] = True
            reactor.callLater(0, reactor.stop)

    def stop() -> Deferred | None:
        state["stopping"] = True
        proto = state["proto"]
        if proto is not None:
            return ensureDeferred(_close(reactor, proto, wait=2.0))
        return None

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    try:
        _, opened = open_connection(reactor, url, client.Listener(on_event), cafile=opts.cafile,
                                    timeout=timeout, max_message_size=opts.max_message_size)
        opened.addTimeout(timeout, reactor)
        proto = state["proto"] = await opened
        subscribe: dict[str, Any] = {"topics": opts.topics}
        if opts.key is not None:
            subscribe["key"] = opts.key
        if opts.since is not None:
            subscribe["since"] = opts.since
        reply = await proto.request("subscribe", subscribe, timeout=timeout)
    except Failed:
        raise
    except Exception as e:
        if state["stopping"]:
            return
        raise Failed(EXIT_USAGE, describe_failure(e, url, timeout)) from None
    if not reply.ok():
        await _close(reactor, proto)
        raise Failed(EXIT_ERROR, f"{url} refused to subscribe: {reply.status} {reply.error}".rstrip())
    _say(sys.stderr, f"foxnode watch: subscribed to {', '.join(opts.topics)} on {url}; Ctrl-C stops")
    _, code, reason = await proto.when_closed()
    if state["stopping"]:
        return
    why = f"{code}: {reason}" if reason else f"{code}"
    raise Failed(EXIT_ERROR, f"the connection to {url} closed ({why})")


# -- command line ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: scripts read stderr too.
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


#: No wait of the command needs more than a day; more is a typo (or "inf").
DAY = 86_400.0


def _seconds(low: float) -> Callable[[str], float]:
    """A timeout: a finite number of seconds from ``low`` to a day."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (math.isfinite(value) and low <= value <= DAY):
            raise argparse.ArgumentTypeError(f"{text!r}: give seconds from {low:g} to {DAY:g}")
        return value

    return parse


def _count(high: int, low: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from {low} to {high}")
        return value

    return parse


def text(what: str, longest: int = 256) -> Callable[[str], str]:
    """A name that goes on the wire (an op, a topic, a network): JSON cannot
    carry the lone surrogates that undecodable bytes on the command line
    become, and control characters would garble the node's log."""
    def parse(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"give a {what}")
        if not value.isprintable():
            raise argparse.ArgumentTypeError(f"{value!r}: a {what} of printable characters, please")
        if len(value) > longest:
            raise argparse.ArgumentTypeError(f"a {what} of at most {longest} characters, please")
        return value

    return parse


def public_key(value: str) -> str:
    """``--to``: a public key as ``newkey``/``getkey`` show it."""
    if crypto.parse_public_key(value) is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a public key: give the {2 * crypto.PUBLIC_KEY_SIZE} hex digits of an asym "
            'key\'s "public_key"')
    return value


def _not_for_watch(option: str, why: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        raise argparse.ArgumentTypeError(f"not for watch: {why}; {option} is for foxnode call URL publish")

    return parse


#: call's options that set a field of the request's args (PROTOCOL.md
#: "Private, signed and paid-for messages"): option -> (dest, field)
ARGS_OPTIONS = {"--key": ("key", "key"), "--to": ("to", "to"), "--sign": ("sign", "sign"),
                "--since": ("since", "since")}

_AGO = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def since_time(value: str) -> float:
    """``--since``: a time in unix seconds, or how long ago (``90s``,
    ``10m``, ``2h``, ``1d``), for subscribe, filter, history and watch."""
    number, unit = (value[:-1], value[-1]) if value[-1:] in _AGO else (value, None)
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount < 0:
        raise argparse.ArgumentTypeError(
            f"{value!r}: give a time in unix seconds, or how long ago: 90s, 10m, 2h, 1d")
    return amount if unit is None else max(0.0, time.time() - amount * _AGO[unit])


def args_with_options(opts: argparse.Namespace) -> tuple[str, str] | None:
    """``call``'s ``--key``/``--to``/``--sign``/``--since`` put into its args (absent:
    ``{}``); (option, why) when they cannot be."""
    given = {option: getattr(opts, dest) for option, (dest, _) in ARGS_OPTIONS.items()
             if getattr(opts, dest) is not None}
    if not given:
        return None
    args = {} if opts.args is None else opts.args
    for option, value in given.items():
        field = ARGS_OPTIONS[option][1]
        if not isinstance(args, dict):
            return option, f"ARGS-JSON must be an object to take \"{field}\", not {orjson.dumps(args).decode()[:60]}"
        if field in args and args[field] != value:
            return option, (f"ARGS-JSON gives \"{field}\" another value ({orjson.dumps(args[field]).decode()[:60]}); "
                            "give it once")
    opts.args = dict(args, **{ARGS_OPTIONS[o][1]: v for o, v in given.items()})
    return None


def ca_path(value: str) -> str:
    if not value or not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value!r}: no such file or directory")
    return value


def history_file(value: str) -> str:
    """Where the console keeps typed lines: '' for nowhere, else a file in a
    directory that exists, checked now rather than at the first line typed."""
    if not value:
        return value
    if not value.isprintable():
        raise argparse.ArgumentTypeError(f"{value!r}: a file name of printable characters, please")
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{value!r} is a directory, not a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise argparse.ArgumentTypeError(f"{value!r}: no such directory")
    return value


def directory(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("give a directory")
    return value


def _checked(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argument checked by ``parse`` and kept as written (the nodes parse it again)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 1..65535")
    return value


def _page_port(text: str) -> int:
    """A port, or 0 for none."""
    return 0 if text.strip() == "0" else _port(text)


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="foxnode",
        description="Talk to foxnode nodes, or run a network of them on this machine. "
                    "A node itself runs under twistd: twistd -n foxnode --help.",
    )
    top.add_argument("--version", action="version", version=f"foxnode {__version__}")
    top.add_argument("--debug", dest="debug_log", action="store_true",
                     help="log what Twisted and Autobahn do to stderr (goes before COMMAND)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    call = sub.add_parser(
        "call", help="send one request to a node and print the reply",
        description="Send one request to a node and print its reply as JSON. Exit code 0 on a 2xx "
                    "status, 1 on an error status, 2 when the node cannot be reached or does not reply.",
        epilog="example: foxnode call --pretty ws://127.0.0.1:9000/ws info",
    )
    call.add_argument("url", type=node_url, metavar="URL",
                      help="the node's WebSocket address, e.g. ws://127.0.0.1:9000/ws (no path: /ws)")
    call.add_argument("op", type=text("op", 64), metavar="OP", help="the operation, e.g. peers, time, info, register")
    call.add_argument("args", nargs="?", type=json_value, default=None, metavar="ARGS-JSON",
                      help="the request's args as JSON, e.g. '{\"addr\": \"ws://127.0.0.1:9001/ws\"}'")
    call.add_argument("--id", type=request_id, default=None,
                      help="send the request with this id (a number if it reads as one, else a string; "
                           "'\"7\"' for the string 7); the reply echoes it")
    call.add_argument("--pretty", action="store_true", help="indent the JSON")
    call.add_argument("--key", type=text("key id", 128), metavar="KEYID",
                      help='set the args\' "key": for publish, encrypt with this sym key of the node\'s; '
                           "for subscribe, filter, history, receive what this key opens")
    call.add_argument("--to", type=public_key, metavar="PUBKEY",
                      help='set the args\' "to": for publish, encrypt to this public key (hex)')
    call.add_argument("--sign", type=text("key id", 128), metavar="KEYID",
                      help='set the args\' "sign": for publish, sign with this asym key of the node\'s')
    call.add_argument("--since", type=since_time, metavar="TIME",
                      help='set the args\' "since": for subscribe, filter and history, the stored messages '
                           "from this time on (unix seconds, or how long ago: 90s, 10m, 2h, 1d)")

    watch = sub.add_parser(
        "watch", help="print the gossip messages of some topics as they arrive",
        description="Subscribe to topics and print each message the node pushes as one JSON line, "
                    "until Ctrl-C (exit 0) or the connection drops (exit 1).",
        epilog="example: foxnode watch ws://127.0.0.1:9000/ws news blocks | jq .payload",
    )
    watch.add_argument("url", type=node_url, metavar="URL", help="the node's WebSocket address")
    watch.add_argument("topics", nargs="+", type=text("topic"), metavar="TOPIC", help="a topic to receive")
    watch.add_argument("--key", type=text("key id", 128), metavar="KEYID",
                       help="receive only the messages this key of the node's opens (a sym key, or an asym "
                            "key for messages sent to it), decrypted; without it, only unencrypted ones")
    watch.add_argument("--since", type=since_time, metavar="TIME",
                       help="first print the messages the node kept from this time on (unix seconds, or "
                            "how long ago: 90s, 10m, 2h, 1d), then the new ones as they arrive")
    watch.add_argument("--to", type=_not_for_watch("--to", "a subscription sends nothing"), metavar="PUBKEY",
                       help="refused: a subscription encrypts nothing (use foxnode call URL publish ... --to)")
    watch.add_argument("--sign", type=_not_for_watch("--sign", "a subscription signs nothing"), metavar="KEYID",
                       help="refused: a subscription signs nothing (use foxnode call URL publish ... --sign)")

    attach = sub.add_parser(
        "attach", help="an interactive console on a node",
        description="Type requests to a node and read its replies, as geth's console: "
                    "'op {json args}' or a whole request object per line; events the node pushes "
                    "are shown as they arrive. .help lists the node's ops; Ctrl-D leaves.",
        epilog="example: foxnode attach ws://127.0.0.1:9000/ws",
    )
    attach.add_argument("url", type=node_url, metavar="URL", help="the node's WebSocket address")
    attach.add_argument("--history", type=history_file, default="~/.foxnode_history", metavar="FILE",
                        help="where typed lines are kept across sessions (default: %(default)s; "
                             "'' keeps none)")

    for p in (call, watch, attach):
        p.add_argument("--timeout", type=_seconds(0.1), default=client.TIMEOUT, metavar="SECONDS",
                       help="give up connecting (and, for call, waiting for the reply) after this long "
                            "(default: %(default)s)")
        p.add_argument("--max-message-size", type=_count(1 << 30, low=1024), default=client.CLIENT_MAX_MESSAGE,
                       metavar="BYTES",
                       help="largest message to read from the node, and to send (default: %(default)s; "
                            "a node sends at most its own --max-message-size, 1 MiB by default)")
        p.add_argument("--cafile", type=ca_path, metavar="PEM",
                       help="for wss://: trust the CA certificate(s) in this PEM file (or directory) "
                            "instead of the system's, e.g. for a node with a self-signed certificate")

    devnet = sub.add_parser(
        "devnet", help="run N nodes on 127.0.0.1 that form one network",
        description="Start N nodes on 127.0.0.1, each with its own data directory "
                    "DIR/node-i and port BASE-PORT+i, every node after the first bootstrapping from "
                    "node-0 (above 30 nodes, or with --per-process, K nodes share one process, "
                    "twistd foxnode-host, and node i bootstraps from node (i-1)//2). Shows the nodes coming up and their live peer connections, prints each "
                    "node's addresses, and keeps running until Ctrl-C or SIGTERM, which stop the nodes. "
                    "DIR is kept: running again reuses it, so the nodes keep their ids and peers.",
    )
    devnet.add_argument("--nodes", "-n", type=_count(1000), default=3, metavar="N",
                        help="how many nodes (default: %(default)s)")
    devnet.add_argument("--per-process", type=_count(1000), default=None, metavar="K",
                        help="run K nodes in each process (twistd foxnode-host), sharing its reactor "
                             "(default: 1 up to 30 nodes, 50 above)")
    devnet.add_argument("--base-port", type=_port, default=9000, metavar="P",
                        help="node i listens on P+i (default: %(default)s)")
    devnet.add_argument("--page-port", type=_page_port, default=None, metavar="P",
                        help="serve the devnet page (every node, every live link, a message spreading) "
                             "on http://127.0.0.1:P/ (default: the port below --base-port, or any free "
                             "one when that is in use; 0: no page)")
    devnet.add_argument("--dir", type=directory, default="devnet", metavar="DIR",
                        help="where the nodes keep their data (default: ./%(default)s)")
    devnet.add_argument("--network", type=text("network name", 64), default=default(NodeConfig, "network"),
                        metavar="NAME",
                        help="the network name every node is given (default: %(default)s)")
    devnet.add_argument("--start-timeout", type=_seconds(1), default=None, metavar="SECONDS",
                        help="how long nodes may take to come up (default: 30, or 0.1 per node above 300)")
    devnet.add_argument("--connect-timeout", type=_seconds(1), default=30.0, metavar="SECONDS",
                        help="how long to wait for every node to have a live peer connection before "
                             "saying which have none (default: %(default)s)")
    devnet.add_argument("--stop-timeout", type=_seconds(1), default=10.0, metavar="SECONDS",
                        help="how long a node may take to stop before it is killed (default: %(default)s)")
    devnet.add_argument("--latency", type=_checked(links.parse_latency), metavar="DELAY[:JITTER]",
                        help="emulate this one-way latency (with jitter) on every peer link, e.g. 40ms:10ms "
                             "(in the nodes' own connections; no root needed)")
    devnet.add_argument("--loss", type=_checked(links.parse_loss), metavar="SHARE",
                        help="emulate this share of lost TCP segments on every peer link, e.g. 1%% "
                             "(each costs a retransmission's delay)")
    devnet.add_argument("--bandwidth", type=_checked(links.parse_rate), metavar="RATE",
                        help="emulate this bandwidth on every peer link, e.g. 1mbit")
    devnet.add_argument("--debug", action="store_true", help="run the nodes with --debug logging")
    devnet.add_argument("--plugin", type=_plugin_spec, action="append", default=[], metavar="P",
                        help="a plugin every node loads: a dotted module name, a .py file, or the name "
                             "of one shipped with foxnode (chain); repeatable")

    experiment = sub.add_parser(
        "experiment", help="run an experiment from a scenario file on a devnet, and write its report",
        description="foxnode experiment run FILE: start the network FILE (TOML) names, run its "
                    "timeline (publish, kill, restart, partition, heal), and write the figures (report.json) and plots "
                    "(PNG) to a report folder. Ctrl-C stops every node and keeps the partial report.",
    )
    experiment.add_argument("action", choices=["run"], metavar="ACTION", help="run")
    experiment.add_argument("file", type=scenario_file, metavar="FILE", help="the scenario (TOML)")
    experiment.add_argument("--out", type=directory, metavar="DIR",
                            help="the report folder (default: ./FILE's name-report)")
    experiment.add_argument("--dir", type=directory, metavar="DIR",
                            help="where the nodes keep their data (default: ./FILE's name-nodes)")
    return top


def scenario_file(value: str) -> str:
    """A scenario, checked whole before anything starts (experiment.py)."""
    from foxnode.experiment import ScenarioError, load_scenario

    if not value:
        raise argparse.ArgumentTypeError("give a scenario file")
    try:
        load_scenario(value)
    except ScenarioError as e:
        raise argparse.ArgumentTypeError(f"{value}: {e}") from None
    return value


async def run_experiment(reactor: Any, opts: argparse.Namespace) -> None:
    from foxnode.experiment import run_experiment as experiment

    await experiment(reactor, opts)


def _plugin_spec(value: str) -> str:
    """A ``--plugin`` value as the nodes take it (a file: its absolute
    path, since each node runs in its own directory)."""
    from foxnode import pluginhost

    wrong = pluginhost.check_spec(value)
    if wrong:
        raise argparse.ArgumentTypeError(f"{value!r}: {wrong}")
    return os.path.abspath(value) if pluginhost._is_file(value) else value


async def run_devnet(reactor: Any, opts: argparse.Namespace) -> None:
    # foxnode.devnet builds on this module (Failed, the exit codes).
    from foxnode.devnet import run_devnet as devnet

    await devnet(reactor, opts)


async def run_attach(reactor: Any, opts: argparse.Namespace) -> None:
    # prompt_toolkit is imported by the one command that needs it.
    from foxnode.console import run_attach as attach

    await attach(reactor, opts)


_RUNNERS = {"call": run_call, "watch": run_watch, "devnet": run_devnet, "attach": run_attach,
            "experiment": run_experiment}


async def _run(reactor: Any, opts: argparse.Namespace) -> None:
    try:
        await _RUNNERS[opts.command](reactor, opts)
    except Failed as e:
        _say(sys.stderr, f"foxnode {opts.command}: {e.message}")
        raise SystemExit(e.code) from None
    except SystemExit:
        raise
    except BaseException as e:  # a bug of ours: still one line, not a traceback
        _say(sys.stderr, f"foxnode {opts.command}: internal error: {type(e).__name__}: {e}")
        raise SystemExit(EXIT_USAGE) from None


def _begin_logging(debug: bool) -> None:
    """Twisted prints some failures (an unhandled error in a Deferred) to
    stderr as tracebacks; the command says what went wrong in one line
    instead, and shows Twisted's and Autobahn's log only with --debug."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    observers = [textFileLogObserver(sys.stderr)] if debug else [lambda event: None]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


def main(argv: list[str] | None = None) -> None:
    opts = parser().parse_args(argv)
    if opts.command == "call":
        wrong = args_with_options(opts)
        if wrong is not None:
            parser().exit(EXIT_USAGE, f"foxnode call: argument {wrong[0]}: {wrong[1]} (see foxnode call --help)\n")
    _begin_logging(opts.debug_log)
    if opts.command == "devnet" and opts.base_port + opts.nodes - 1 > 65535:
        parser().exit(EXIT_USAGE, f"foxnode devnet: ports {opts.base_port}..{opts.base_port + opts.nodes - 1} "
                                  "run past 65535; choose a lower --base-port\n")
    if opts.command == "devnet" and opts.page_port and opts.base_port <= opts.page_port < opts.base_port + opts.nodes:
        parser().exit(EXIT_USAGE, f"foxnode devnet: --page-port {opts.page_port} is a node's port "
                                  f"({opts.base_port}..{opts.base_port + opts.nodes - 1}); choose another\n")
    # A command started in the background by a non-interactive shell (a CI
    # job, a script's "&") inherits SIGINT ignored, and then Twisted does
    # not take it over: Ctrl-C and kill -INT must still stop us cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    react(_run, (opts,))


if __name__ == "__main__":
    # ``python -m foxnode.cli``: run the one foxnode.cli module that
    # foxnode.devnet imports too, so that both raise and catch one Failed.
    from foxnode.cli import main as _main

    _main()
