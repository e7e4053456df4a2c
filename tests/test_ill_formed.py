"""Every op of a live node, every argument missing or of the wrong type,
over a real socket, as a plain client and as a peer that said hello: a 4xx
naming the argument (or the seed's exact 500 for ``register`` without
``addr``, or a 2xx where the value is valid), the connection answering on,
and no traceback in the node's log. Ill-formed gossip events too.

The ops walked are the ones the node's op table holds: an op added
without a line in ``SPECS`` fails the test.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
import orjson
import pytest_twisted
from twisted.internet.defer import DeferredQueue
from twisted.logger import formatEvent, globalLogPublisher

from foxnode import PROTOCOL_VERSION, client, identity
from foxnode.gossip import Envelope
from foxnode.peers import DIALER, hello_proof
from foxnode.testing import connect_as_peer, start_node

TIMEOUT = 10.0
ABSENT = object()
#: values every argument is tried with
VARIANTS: dict[str, Any] = {
    "absent": ABSENT, "null": None, "false": False, "true": True, "zero": 0, "number": 42,
    "float": 1.5, "negative": -1, "huge number": 10**18, "huge float": 1e308,
    "string": "x", "empty string": "", "odd string": "\x00 \u00fc \U0001f98a \u202e ../ %s {}",
    "huge string": "x" * 100_000, "address": "ws://127.3.0.1:9/ws", "hex": "ab" * 32,
    "list": [1, "a"], "empty list": [], "list of strings": ["t1", "t2"],
    "object": {"a": 1}, "empty object": {},
}
#: what ``args`` itself is tried with, besides objects
ARGS_VARIANTS = {k: v for k, v in VARIANTS.items() if not isinstance(v, dict)}


def _str(limit: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and 0 < len(v) <= limit


def _topics(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    return isinstance(items, list) and all(isinstance(t, str) and 0 < len(t) <= 128 for t in items)


def _port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


@attrs.frozen
class Spec:
    """How one op takes its args: each field's validity, which are required,
    whether args may be left out, and who may call it."""

    fields: dict[str, Callable[[Any], bool]] = {}
    required: frozenset = frozenset()
    #: args are ignored altogether (the seed's peers and time)
    ignores_args: bool = False
    #: roles refused whatever the args ("client": a plain client, "peer")
    refused_to: frozenset = frozenset()
    #: seed: args not an object or without a required field -> this exact 500
    seed_500: str | None = None
    #: fields that name something the node may not know (a key id): a
    #: value well-formed by this test but unknown gets a 4xx saying so,
    #: which names the value, not the field
    unknown: dict[str, Callable[[Any], bool]] = {}


def _password(v: Any) -> bool:
    try:
        return isinstance(v, str) and 0 < len(v.encode("utf-8")) <= 1024
    except UnicodeEncodeError:
        return False


def _hex32(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v)


def _amount(high: float) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and 0 <= v <= high and v != float("inf"))


def _key_id(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 128


SPECS: dict[str, Spec] = {
    "register": Spec({"addr": lambda v: True}, frozenset({"addr"}),
                     seed_500='Operation "register" requires the following "args": "addr"'),
    "peers": Spec(ignores_args=True),
    "time": Spec(ignores_args=True),
    "info": Spec({"detail": lambda v: isinstance(v, bool)}),
    "exchange": Spec(ignores_args=True, refused_to=frozenset({"client"})),
    # "key", "sign": no variant is a key id of the node's; "to": none is a public key (128 hex)
    "publish": Spec({"topic": _str(128), "payload": lambda v: len(orjson.dumps(v)) <= 64 * 1024,
                     "ttl": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 3600,
                     "key": lambda v: False, "to": lambda v: False, "sign": lambda v: False,
                     "pow": _amount(float("inf")), "pow_time": _amount(10)},
                    frozenset({"topic", "payload"}), unknown={"key": _key_id, "sign": _key_id}),
    "subscribe": Spec({"topics": lambda v: _topics(v) and len(v if isinstance(v, list) else [v]) <= 64,
                       "key": lambda v: False, "from": lambda v: False, "min_pow": _amount(float("inf")),
                       "since": _amount(float("inf"))},
                      frozenset({"topics"}), unknown={"key": _key_id}),
    # "subscription" beside "topics" is refused, naming it
    "unsubscribe": Spec({"topics": _topics, "subscription": lambda v: False}, frozenset({"topics"})),
    # what subscribe takes; "poll" and "unfilter" take the id it replies with
    "filter": Spec({"topics": lambda v: _topics(v) and len(v if isinstance(v, list) else [v]) <= 64,
                    "key": lambda v: False, "from": lambda v: False, "min_pow": _amount(float("inf")),
                    "since": _amount(float("inf"))},
                   frozenset({"topics"}), unknown={"key": _key_id}),
    # what subscribe filters by, a time range and a page; no variant is a cursor of the node's
    "history": Spec({"topics": lambda v: _topics(v) and len(v if isinstance(v, list) else [v]) <= 64,
                     "key": lambda v: False, "from": lambda v: False, "min_pow": _amount(float("inf")),
                     "since": _amount(float("inf")), "until": _amount(float("inf")),
                     "limit": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
                     "cursor": lambda v: v is None},
                    frozenset({"topics"}), unknown={"key": _key_id}),
    "poll": Spec({"filter": lambda v: False,
                  "limit": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1},
                 frozenset({"filter"}), unknown={"filter": lambda v: isinstance(v, str)}),
    "unfilter": Spec({"filter": lambda v: False}, frozenset({"filter"}),
                     unknown={"filter": lambda v: isinstance(v, str)}),
    # an operator op: a client on loopback is the operator by default
    "unregister": Spec({"addr": lambda v: v == "ws://127.3.0.1:9/ws"}, frozenset({"addr"})),
    # an emulated partition (links.py, peers.py): port ranges, [] heals
    "links": Spec({"block": lambda v: isinstance(v, list) and len(v) <= 1000 and all(
        isinstance(r, list) and len(r) == 2 and all(_port(p) for p in r) and r[0] <= r[1] for r in v)},
        frozenset({"block"})),
    # operator ops too; no variant is a key id of the node's (ids are random)
    "newkey": Spec({"type": lambda v: v == "sym", "password": _password}, frozenset({"type"})),
    "addkey": Spec({"type": lambda v: v == "sym", "key": _hex32,
                    "private_key": lambda v: False},  # not with "type": "sym"
                   frozenset({"type", "key"})),
    "getkey": Spec({"id": lambda v: False, "secret": lambda v: isinstance(v, bool)}, frozenset({"id"}),
                   unknown={"id": _key_id}),
    "delkey": Spec({"id": lambda v: False}, frozenset({"id"}), unknown={"id": _key_id}),
    "hello": Spec({
        "node_id": identity.is_node_id, "network": lambda v: v == "foxchain",
        "version": lambda v: v == PROTOCOL_VERSION and not isinstance(v, bool),
        "nonce": lambda v: isinstance(v, str) and 16 <= len(v) <= 128 and all(c in "0123456789abcdefABCDEF" for c in v),
        "signature": lambda v: False,  # no variant is the right signature
        "port": _port, "secure": lambda v: isinstance(v, bool),
        "advertise": lambda v: v == "ws://127.3.0.1:9/ws",
        "agent": lambda v: isinstance(v, str) and len(v) <= 256,
        "probe": lambda v: isinstance(v, bool),  # a probe is answered, then closed
    }, frozenset({"node_id", "network", "version", "nonce", "signature"}), refused_to=frozenset({"peer"})),
}
VALID_ARGS = {
    "register": {"addr": "ws://127.3.0.1:9/ws"},
    "peers": {}, "time": {}, "info": {}, "exchange": {},
    "publish": {"topic": "t", "payload": {"n": 1}, "ttl": 60},
    "subscribe": {"topics": ["t"]}, "unsubscribe": {"topics": ["t"]},
    "filter": {"topics": ["t"]}, "history": {"topics": ["t"]},
    # poll: {"filter": <a filter the walk makes first>}
    "unregister": {"addr": "ws://127.3.0.1:9/ws"},
    "links": {"block": []},
    "newkey": {"type": "sym", "password": "pw"},
    "addkey": {"type": "sym", "key": "ab" * 32},
    # getkey and delkey: {"id": <a key the walk makes first>}
}


def cases(op: str) -> list[tuple[str, Any]]:
    """(what, args) pairs for one op: args not an object, then each field
    of valid args absent or replaced by each variant."""
    spec = SPECS[op]
    out: list[tuple[str, Any]] = [(f"args {name}", value) for name, value in ARGS_VARIANTS.items()]
    for field in spec.fields:
        for name, value in VARIANTS.items():
            out.append((f"{field} {name}", (field, value)))
    return out


def expected(op: str, role: str, args: Any, varied: str | None, value: Any) -> tuple[str, str]:
    """("2xx" | "4xx" | "seed"), and the text the error must name."""
    spec = SPECS[op]
    if role in spec.refused_to:
        return "4xx", ""
    if spec.ignores_args:
        return "2xx", ""
    if not isinstance(args, dict):
        if spec.seed_500:
            return "seed", ""
        if (args is None or args is ABSENT) and not spec.required:
            return "2xx", ""
        return "4xx", "args"
    if varied is not None and value is ABSENT:
        if varied in spec.required:
            return ("seed", "") if spec.seed_500 else ("4xx", varied)
        return "2xx", ""
    if varied is not None and not spec.fields[varied](value):
        if varied in spec.unknown and spec.unknown[varied](value):
            return "4xx", "is not known"
        return "4xx", varied
    if op == "hello":
        return "4xx", "signature"  # made valid only where a test signs it (below)
    return "2xx", ""


class LogWatch:
    def __init__(self) -> None:
        self.bad: list[str] = []

    def __call__(self, event: dict) -> None:
        text = formatEvent(event) or ""
        if "log_failure" in event or "Traceback" in text or "Unhandled" in text:
            failure = event.get("log_failure")
            self.bad.append(f"{text[:300]} {failure.getTraceback()[-800:] if failure else ''}")


async def session(reactor: Any, url: str, peer: bool) -> tuple[Any, DeferredQueue]:
    proto = await (connect_as_peer(reactor, url) if peer else client.connect(reactor, url))
    inbox: DeferredQueue = DeferredQueue()
    proto.onMessage = lambda payload, is_binary: inbox.put(orjson.loads(payload))
    return proto, inbox


async def ask(reactor: Any, proto: Any, inbox: DeferredQueue, op: str, args: Any, rid: int) -> Any:
    body = {"op": op, "id": rid}
    if args is not ABSENT:
        body["args"] = args
    proto.sendMessage(orjson.dumps(body))
    while True:
        d = inbox.get()
        d.addTimeout(TIMEOUT, reactor)
        message = await d
        if "status" in message and message.get("id") == rid:
            return message
        # events (gossip deliveries, exchange requests of the node) pass by


def build(op: str, case: Any, base: dict[str, Any]) -> tuple[Any, str | None, Any]:
    if not isinstance(case, tuple):
        return case, None, None
    field, value = case
    args = dict(base)
    if value is ABSENT:
        args.pop(field, None)
    else:
        args[field] = value
    return args, field, value


def check(problems: list, where: str, reply: Any, want: str, names: str, op: str) -> None:
    status, error = reply.get("status"), reply.get("error")
    if not isinstance(status, int) or not isinstance(error, str):
        problems.append(f"{where}: {reply!r:.200}")
    elif want == "seed":
        if status != 500 or error != SPECS[op].seed_500:
            problems.append(f"{where}: want the seed's 500, got {status} {error!r:.200}")
    elif want == "2xx":
        if not 200 <= status < 300:
            problems.append(f"{where}: want 2xx, got {status} {error!r:.200}")
    elif not 400 <= status < 500:
        problems.append(f"{where}: want 4xx, got {status} {error!r:.200}")
    elif names and names not in error:
        problems.append(f"{where}: {status} {error!r:.200} does not name {names!r}")


async def hello_case(reactor: Any, url: str, case: Any) -> tuple[Any, DeferredQueue, Any, str | None, Any, bool]:
    """A hello on a fresh connection: valid but for the one varied field,
    signed over the values as sent (where they are strings)."""
    ident = identity.Identity.generate()
    proto, inbox = await session(reactor, url, peer=False)
    base = {"node_id": ident.node_id, "network": "foxchain", "version": PROTOCOL_VERSION,
            "nonce": os.urandom(16).hex(), "port": 9}
    args, field, value = build("hello", case, base)
    signed = False
    if isinstance(args, dict) and field != "signature":
        nonce, node_id = args.get("nonce"), args.get("node_id")
        if isinstance(nonce, str) and isinstance(node_id, str):
            proof = hello_proof(DIALER, "foxchain", proto.server_nonce, nonce, node_id, proto.server_node_id)
            args["signature"] = ident.sign(proof)
            signed = node_id == ident.node_id
    return proto, inbox, args, field, value, signed


@pytest_twisted.ensureDeferred
async def test_every_op_every_ill_formed_argument_gets_a_4xx_naming_it(reactor, node_dir):
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    # The walk sends a few hundred requests as a peer: its budget lifted.
    running = await start_node(reactor, node_dir, "--rate", "100000", "--burst", "100000",
                               "--peer-rate", "100000", "--peer-burst", "100000",
                               "--exchange-interval", "3600")
    problems: list[str] = []
    conns = []
    try:
        ops = sorted(running.node._ops)
        assert set(ops) == set(SPECS), f"ops without a spec here: {set(ops) - set(SPECS)}"
        made = await client.call(reactor, running.url, "newkey", {"type": "asym"})
        assert made.status == 200, made
        filtered = await client.call(reactor, running.url, "filter", {"topics": ["t"]})
        assert filtered.status == 200, filtered
        valid = {**VALID_ARGS, "getkey": {"id": made.response["id"]}, "delkey": {"id": made.response["id"]},
                 "poll": {"filter": filtered.response["filter"]}}
        rid = 0
        for role in ("client", "peer"):
            proto, inbox = await session(reactor, running.url, peer=role == "peer")
            conns.append(proto)
            for op in ops:
                if op == "hello" and role == "client":
                    continue  # each on its own connection, below
                for what, case in cases(op):
                    rid += 1
                    args, field, value = build(op, case, valid.get(op, {}))
                    want, names = expected(op, role, args, field, value)
                    reply = await ask(reactor, proto, inbox, op, args, rid)
                    check(problems, f"{role} {op}({what})", reply, want, names, op)
                # The connection still answers.
                rid += 1
                reply = await ask(reactor, proto, inbox, "time", ABSENT, rid)
                if reply["status"] != 200:
                    problems.append(f"{role} after {op}: time got {reply!r:.200}")
        # hello from a plain client: one connection each, as a refused hello
        # ends its connection by design (with the refusal's close code).
        for what, case in cases("hello"):
            proto, inbox, args, field, value, signed = await hello_case(reactor, running.url, case)
            want, names = expected("hello", "client", args, field, value)
            if want == "4xx" and names == "signature" and signed:
                want, names = "2xx", ""
            rid += 1
            reply = await ask(reactor, proto, inbox, "hello", args, rid)
            check(problems, f"client hello({what})", reply, want, names, "hello")
            proto.close()
            await proto.when_closed()
        assert problems == [], "\n".join(problems[:60]) + f"\n({len(problems)} problems)"
        # The node still serves a fresh connection.
        reply = await client.call(reactor, running.url, "time")
        assert reply.status == 200
        assert watch.bad == [], "\n".join(watch.bad[:10])
    finally:
        for c in conns:
            if c.fox_open:
                c.close()
        await running.stop()
        globalLogPublisher.removeObserver(watch)


@pytest_twisted.ensureDeferred
async def test_ill_formed_gossip_events_raise_nothing(reactor, node_dir):
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    running = await start_node(reactor, node_dir, "--exchange-interval", "3600")
    try:
        me = identity.Identity.generate()
        good = Envelope.create(me, "t", {"n": 1}, 60, __import__("time").time()).to_json()
        frames: list[bytes] = []
        for value in VARIANTS.values():
            if value is ABSENT:
                continue
            frames.append(orjson.dumps({"event": "gossip", "envelope": value}))
            for field in good:
                frames.append(orjson.dumps({"event": "gossip", "envelope": {**good, field: value}}))
            for name, key in (("ihave", "ids"), ("graft", "ids"), ("rejected", "id"), ("rejected", "reason"),
                              ("prune", "ids")):
                frames.append(orjson.dumps({"event": name, key: value}))
                frames.append(orjson.dumps({"event": name, key: [value]}))
        # What orjson may not encode again: integers over 64 bits (a 401-digit
        # one reaches the node as a Python int), 1e999, NaN.
        head = orjson.dumps({k: v for k, v in good.items() if k != "payload"})[:-1]
        for raw in (b"18446744073709551616", b"1" + b"0" * 400, b"[-1" + b"0" * 400 + b"]", b"1e999",
                    b"-1e999", b"NaN", b"[18446744073709551616]"):
            frames.append(b'{"event": "gossip", "envelope": ' + head + b', "payload": ' + raw + b"}}")
            frames.append(b'{"event": "gossip", "envelope": ' + head.replace(b'"ttl":60', b'"ttl":' + raw)
                          + b', "payload": 1}}')
        sent = 0
        while sent < len(frames):
            # A peer sending bad envelopes is disconnected after a while: go on with a new one.
            proto = await connect_as_peer(reactor, running.url)
            while sent < len(frames) and proto.fox_open:
                proto.sendMessage(frames[sent])
                sent += 1
                if sent % 10 == 0 and proto.fox_open:
                    try:  # paced by replies, so that the node reads as we send
                        await proto.request("time", timeout=TIMEOUT)
                    except Exception:
                        pass  # closed meanwhile for the bad envelopes
            if proto.fox_open:
                proto.close()
            await proto.when_closed()
        reply = await client.call(reactor, running.url, "time")
        assert reply.status == 200
        assert watch.bad == [], "\n".join(watch.bad[:10])
    finally:
        await running.stop()
        globalLogPublisher.removeObserver(watch)
