"""Property-based fuzzing (hypothesis) of what strangers control: the codec,
peer addresses, and every op of the node with arbitrary ``args``.

Properties:

- ``codec.decode`` on any bytes, or on any JSON document, either gives a
  Request, Response or Event whose fields have the promised types, or
  raises ``codec.CodecError`` carrying a reply; never anything else.
- ``address.parse`` on any text either gives a ``PeerAddress`` obeying every
  rule (ws/wss, a host, a port in 1..65535, no user info, no fragment,
  bounded length, the authority exactly host[:port]) that round-trips and
  that the dialer (Autobahn's URL parser) reads the same way, or raises
  ``InvalidAddress`` with a reason.
- every op through ``Node.handle_request``, with any ``args``, gives a
  ``codec.Reply`` (or a Deferred of one) with an int status and a str
  error, never raises, leaves only valid addresses in the store, and
  forgets the connection once it is lost.

Hypothesis runs in a worker thread; each example's request is handled in
the reactor thread (``blockingCallFromThread``), so the store's writes
(which use the reactor's thread pool) really happen.

Every address here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

import orjson
import pytest
import pytest_twisted
from autobahn.websocket.util import parse_url
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread

from foxnode import address, codec, tap
from foxnode.config import MAX_DEPTH
from foxnode.testing import FakeConnection, node_options

FUZZ = settings(max_examples=300, deadline=None, derandomize=False,
                suppress_health_check=list(HealthCheck))

# -- strategies -------------------------------------------------------------------

#: Text hypothesis would not think of by itself, and that has broken parsers.
ODD_TEXT = [
    "", " ", "\x00", "\t\n", "\u202e", "\ufeff", "\u200b", "\u2028", "\U0001F98A",
    "ﬀ", "İ", "ß", "𝟗", "٩", "null", "true", "[]", "{}", "\\", '"', "%00", "%25",
    "ws://127.3.0.1:9/ws", "wss://localhost:9443/ws", "ws://[::ffff:127.3.0.1]:9/ws", "ws://127.3.0.1:0/ws",
    "ws://user@127.3.0.1:9/ws", "ws://127.3.0.1:9/ws#frag", "ws://127.3.0.1:99999/ws",
    "http://127.3.0.1:9/ws", "ws://", "ws://:9/ws", "ws://[::ffff:127.3.0.1]x:9/ws", "x" * 300,
    "ws://127.3.0.1:9/" + "a" * 300,
]
HUGE_INTS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**100)]

texts = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT))
#: JSON as the wire can carry it (what orjson gives back for a frame).
wire_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), texts,
)
#: And beyond: huge ints, NaN and infinities, lone surrogates; what an
#: in-process caller of an op could hand it.
any_scalars = st.one_of(
    wire_scalars, st.integers(), st.sampled_from(HUGE_INTS), st.floats(),
    st.text(st.characters(codec=None, categories=["Cs", "Co", "Cc", "Zs"]), max_size=5),
)


def json_values(scalars):
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.dictionaries(st.one_of(texts, st.sampled_from(["addr", "topic", "topics", "payload",
                                                              "ttl", "detail", "node_id", "id"])),
                            inner, max_size=6),
        ),
        max_leaves=25,
    )


wire_json = json_values(wire_scalars)
any_json = json_values(any_scalars)

#: ``args`` shaped like what each op expects, with each field fuzzed, so the
#: fuzzer gets past the first check of every op.
def shaped_requests(values):
    addrs = st.one_of(
        st.builds(lambda a, b, p: f"ws://127.3.{a}.{b}:{p}/ws", st.integers(0, 255), st.integers(1, 254),
                  st.integers(-2, 70000)),
        st.sampled_from(ODD_TEXT),
        values,
    )
    topics = st.one_of(texts, values)
    return st.one_of(
        st.tuples(st.just("register"),
                  st.fixed_dictionaries({"addr": st.one_of(addrs, st.lists(addrs, max_size=60))})),
        st.tuples(st.just("publish"),
                  st.fixed_dictionaries({"topic": topics, "payload": values},
                                        optional={"ttl": st.one_of(st.integers(-5, 5000), values)})),
        st.tuples(st.sampled_from(["subscribe", "unsubscribe"]),
                  st.fixed_dictionaries({"topics": st.one_of(topics, st.lists(topics, max_size=80))})),
        st.tuples(st.just("info"), st.fixed_dictionaries({"detail": st.one_of(st.just(True), values)})),
        st.tuples(st.just("hello"), st.fixed_dictionaries(
            {"node_id": st.one_of(st.just("ab" * 32), values),
             "network": st.one_of(st.just("foxchain"), values),
             "version": st.one_of(st.just(1), values),
             "signature": st.one_of(st.just("00" * 64), values)},
            optional={"nonce": values, "advertise": addrs, "port": st.one_of(st.integers(), values)})),
    )


OPS = ["register", "peers", "time", "info", "hello", "exchange", "publish", "subscribe",
       "unsubscribe", "no-such-op", "", "Register"]


# -- (a) the codec ----------------------------------------------------------------------

def check_decoded(message) -> None:
    assert isinstance(message, (codec.Request, codec.Response, codec.Event)), message
    # Whatever is taken can be sent on unchanged: nothing in it that JSON
    # (and orjson) cannot carry back.
    assert codec.unsendable(list(message)) is None, message
    if isinstance(message, codec.Request):
        assert isinstance(message.op, str)
        if message.has_id:
            assert isinstance(message.id, (str, int, float)) and not isinstance(message.id, bool)
        else:
            assert message.id is None
    elif isinstance(message, codec.Response):
        assert type(message.reply.status) is int
        assert isinstance(message.reply.error, str)
    else:
        assert isinstance(message.name, str) and isinstance(message.body, dict)


def check_codec_error(error: codec.CodecError) -> None:
    reply = error.reply
    assert isinstance(reply, codec.Reply)
    assert type(reply.status) is int and 400 <= reply.status <= 599
    assert isinstance(reply.error, str) and reply.error
    # The error reply itself must be sendable, with the id it names.
    codec.encode_reply(reply)
    if error.has_id:
        assert codec.unsendable(error.rid) is None
        orjson.dumps(error.rid)


def decode_checked(payload: bytes, max_depth: int = MAX_DEPTH) -> None:
    try:
        message = codec.decode(payload, max_depth)
    except codec.CodecError as e:
        check_codec_error(e)
    else:
        check_decoded(message)


@FUZZ
@given(st.binary(max_size=300))
@example(b"\xff\xfe{}")
@example(b'{"op": "time"}\xc3\x28')
@example(b'{"op": "\xed\xa0\x80"}')
@example(b'{"op":"x","id":' + b"9" * 400 + b"}")
@example(b"[" * 5000)
@example(b"{}" * 10)
@example(b"\x00")
def test_decode_arbitrary_bytes(data):
    decode_checked(data)


def _message_shaped(draw_value):
    keys = st.sampled_from(["op", "args", "id", "status", "error", "response", "event", "x"])
    return st.dictionaries(keys, draw_value, max_size=6)


@FUZZ
@given(st.one_of(any_json, _message_shaped(any_json)), st.integers(1, 100))
@example({"op": "time", "id": float("nan")}, 64)
@example({"op": "time", "id": 2**70}, 64)
@example({"status": 2**70, "error": None}, 64)
@example({"op": "x", "args": "\ud800"}, 64)
@example({"event": "message", "op": None}, 64)
def test_decode_arbitrary_json(value, max_depth):
    # Through the stdlib's encoder, which writes what orjson would refuse
    # (NaN, huge integers, lone surrogates as escapes) as well as normal JSON.
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        try:
            payload = text.encode("utf-8")
        except UnicodeEncodeError:
            payload = text.encode("utf-8", "surrogatepass")
        decode_checked(payload, max_depth)


@FUZZ
@given(st.integers(1, 40), st.integers(0, 80))
def test_decode_depth_limit_is_exact(max_depth, depth):
    # A request nested ``depth`` levels in all (the message object is 1).
    args = 1
    for i in range(depth - 1):
        args = [args] if i % 2 else {"k": args}
    message = {"op": "time", "args": args, "id": "d"} if depth else {"op": "time", "id": "d"}
    payload = orjson.dumps(message)
    if max(depth, 1) <= max_depth:
        assert codec.decode(payload, max_depth) == codec.Request("time", message.get("args"), "d", True)
    else:
        with pytest.raises(codec.CodecError) as e:
            codec.decode(payload, max_depth)
        assert e.value.reply.status == 400 and str(max_depth) in e.value.reply.error
        # and the error reply can still be matched by its id
        assert codec.request_id_of(payload) == (True, "d")


# -- (b) addresses --------------------------------------------------------------------------

_AUTHORITY_END = re.compile(r"[/?#\\]")


def check_accepted(url: str, p: address.PeerAddress) -> None:
    """Every rule, checked without urllib, for an address parse accepted."""
    assert isinstance(p, address.PeerAddress)
    assert p.url == url
    assert len(url) <= address.MAX_ADDRESS_LENGTH
    assert url.startswith(("ws://", "wss://"))
    assert p.secure == url.startswith("wss://")
    assert not any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url)
    # A fragment only as a pinned node id (PROTOCOL.md "Peer management").
    if "#" in url:
        fragment = url.split("#", 1)[1]
        assert re.fullmatch("[0-9a-f]{64}", fragment) and p.node_id == fragment, "a fragment was accepted"
        url = p.dial_url
    assert "#" not in url
    rest = url.split("://", 1)[1]
    authority = _AUTHORITY_END.split(rest, 1)[0]
    assert "@" not in authority, "user info was accepted"
    assert p.host, "no host"
    assert 1 <= p.port <= 65535
    # The authority is exactly the host and maybe a port: nothing else.
    shown = f"[{p.host}]" if ":" in p.host else p.host
    m = re.fullmatch(re.escape(shown) + r"(?::([0-9]+))?", authority, re.IGNORECASE)
    assert m is not None, f"authority {authority!r} is not host[:port] for host {p.host!r}"
    if m.group(1) is not None:
        assert int(m.group(1)) == p.port
    else:
        assert p.port == (443 if p.secure else 80)
    # Round trip: the same text parses to the same address, and the address
    # rebuilt from its parts to the same place.
    assert address.parse(p.url) == p
    again = address.parse(f"{'wss' if p.secure else 'ws'}://{shown}:{p.port}{p.path}")
    assert (again.host, again.port, again.secure) == (p.host.lower(), p.port, p.secure) or \
        (again.host, again.port, again.secure) == (p.host, p.port, p.secure)
    # The dialer (FoxClientFactory) parses with Autobahn: it must agree,
    # or an address the store took could never be dialed.
    secure, host, port, *_ = parse_url(url)
    assert (secure, host, port) == (p.secure, p.host, p.port)


def parse_checked(url) -> address.PeerAddress | None:
    try:
        p = address.parse(url)
    except address.InvalidAddress as e:
        assert str(e).strip(), f"no reason given for rejecting {url!r}"
        return None
    check_accepted(url, p)
    return p


SCHEMES = ["ws://"] * 6 + ["wss://"] * 3 + ["http://", "WS://", "ws:/", "ws:", "wss:///", "", "ws ://",
                                         "ws://ws://"]
USERINFO = [""] * 12 + ["user@", "u:p@", "@", ":@", "127.3.0.1@", "%40@"]
HOSTS = ["127.3.0.1", "127.0.0.1", "localhost", "localhost.", "LOCALHOST", "[::ffff:127.3.0.1]", "::ffff:127.3.0.1", "[::1",
         "[::ffff:127.3.0.1]x", "[127.0.0.1]", "[v1.fe]", "", "-localhost", "localhost-", "local_host", "localhost..", "127.1", "127.3.0.1.",
         "ﬀ", "l" * 64, ("localhost." * 30)[:255], "[::ffff:127.0.0.1]", "[::ffff:127.3.0.1%25lo]", "%31%32%37.0.0.1"]
PORTS = st.one_of(
    st.just(""), st.just(":"), st.integers(-5, 70000).map(lambda n: f":{n}"),
    st.sampled_from([":0", ":09", ":000009", ":+9", ": 9", ":9 ", ":٩", ":9:9", ":65535", ":65536",
                     ":99999999999999999999", ":0x10", ":-1", ":1_0"]),
)
PATHS = st.one_of(st.just(""), st.just("/ws"), st.text(max_size=12).map(lambda t: "/" + t),
                  st.sampled_from(["/ws?x=1", "?q", "/a@b", "\\@127.3.0.1/", "/%00", "//"]))
FRAGMENTS = st.sampled_from([""] * 6 + ["#", "#frag", "#@x"])

url_shaped = st.builds(lambda *parts: "".join(parts), st.sampled_from(SCHEMES), st.sampled_from(USERINFO),
                       st.one_of(st.sampled_from(HOSTS), texts), PORTS, PATHS, FRAGMENTS)


@FUZZ
@given(st.one_of(st.text(max_size=300), url_shaped))
@example("ws://127.3.0.1:9/ws")
@example("ws://[::ffff:127.3.0.1]x/ws")
@example("ws://[::ffff:127.3.0.1]x:9/ws")
@example("wss://localhost/ws")
def test_parse_address_text(url):
    parse_checked(url)


@FUZZ
@given(url_shaped)
@example("ws://[::ffff:127.3.0.1]x:9/ws")
@example("wss://127.3.0.1:9\\@127.3.0.2/ws")
def test_parse_url_shaped_addresses(url):
    p = parse_checked(url)
    # What makes an address bad is found, whatever else is in it.
    if "#" in url or not url.startswith(("ws://", "wss://")) or len(url) > address.MAX_ADDRESS_LENGTH:
        assert p is None, f"accepted {url!r}"


@FUZZ
@given(any_json)
def test_parse_non_text_values(value):
    assume(not isinstance(value, str))
    with pytest.raises(address.InvalidAddress) as e:
        address.parse(value)
    assert str(e.value)


@FUZZ
@given(st.one_of(
    st.text(alphabet="0123456789.x\u0663", max_size=20),
    st.lists(st.integers(0, 300).map(str), min_size=3, max_size=5).map(".".join),
    st.lists(st.text(alphabet="0123456789", min_size=1, max_size=4), min_size=4, max_size=4).map(".".join),
))
@example("127.0.0.1")
@example("127.0.0.01")
@example("256.0.0.1")
@example("1.2.3.4.")
@example("\u0663.2.3.4")
@example("127.0.0.\u0663")
def test_ipv4_hosts_are_taken_exactly_as_ipaddress_takes_them(host):
    # parse() checks dotted quads with a pattern, not ipaddress: the two
    # must agree on every host that is not a plain host name.
    try:
        ipaddress.IPv4Address(host)
        expected = True
    except ValueError:
        expected = False
    try:
        address.parse(f"ws://{host}:9/ws")
        taken = True
    except address.InvalidAddress:
        taken = False
    numeric = address._NUMERIC_LABEL.match(host.lower().rstrip(".").rsplit(".", 1)[-1])
    if expected or numeric or not host.isascii():
        # (host names are ASCII; one ending in a number is an IPv4 address)
        assert taken == expected, host


def test_well_formed_addresses_are_accepted():
    for url in ["ws://127.3.0.1:9/ws", "wss://localhost:9443/ws", "ws://[::ffff:127.3.0.1]:9/ws",
                "ws://127.255.255.254:65535/ws", "ws://127.3.0.1/ws", "ws://localhost:1",
                "ws://127.3.0.1:9/ws?x=1"]:
        assert parse_checked(url) is not None, url


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.000.000.001",
                                  "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"])
def test_an_address_dialled_as_loopback_is_known_as_loopback(host):
    # These all reach 127.0.0.1 when dialed (inet_aton, IPv4-mapped IPv6).
    # The node refuses loopback addresses from non-loopback peers
    # (peers.py _shareable_from); an alias that slips through that check
    # would have a remote peer make the node dial its own loopback services.
    url = f"ws://{host}:9/ws"
    try:
        p = address.parse(url)
    except address.InvalidAddress:
        return
    assert p.is_loopback, f"{url} dials 127.0.0.1 but is not seen as loopback"


# -- (c) every op with arbitrary args ------------------------------------------------------




TRACEBACK_SIGNS = ("Traceback", "Error(", 'File "', "Exception")


def check_reply(reply, args, wire: bool) -> None:
    assert isinstance(reply, codec.Reply), f"not a Reply: {reply!r}"
    assert type(reply.status) is int and 100 <= reply.status <= 599, reply
    assert isinstance(reply.error, str) and reply.error, reply
    assert not any(s in reply.error for s in TRACEBACK_SIGNS), reply.error
    if wire:
        # Whatever came from the wire must be answerable on the wire.
        frame = codec.encode_reply(reply, True, "fuzz")
        back = codec.decode(frame)
        assert isinstance(back, codec.Response) and back.reply.status == reply.status


def check_store(node, before: set[str] = frozenset()) -> None:
    store = node.store
    assert len(store) <= store.max_peers
    for addr in set(store.addresses()) - before:
        check_accepted(addr, address.parse(addr))


async def one_request(node, op, args, direction, peer_id, wire):
    conn = FakeConnection(direction, peer_id)
    before = set(node.store.addresses())
    node.connection_opened(conn)
    try:
        try:
            result = node.handle_request(conn, codec.Request(op, args))
        except Exception as e:  # the property under test: reported with its input
            raise AssertionError(f"{op}({args!r:.300}) raised {e!r}") from e
        if isinstance(result, Deferred):
            result = await result
        check_reply(result, args, wire)
        check_store(node, before)
        if op == "register" and result.status == 202:
            given_addrs = args["addr"] if isinstance(args["addr"], list) else [args["addr"]]
            response = result.response
            assert len(response["accepted"]) + len(response["rejected"]) == len(given_addrs), \
                "every address given is either accepted or rejected, once"
            for entry in response["rejected"]:
                assert isinstance(entry["reason"], str) and entry["reason"], entry
            for addr in response["accepted"]:
                assert address.parse(addr).url == addr
    finally:
        node.connection_lost(conn, 1000, None)
        # Each example starts from the same store, so that a failure
        # found is a failure reproduced (and shrunk).
        for addr in set(node.store.addresses()) - before:
            node.store.remove(addr)
    # Nothing of the connection is left behind.
    assert conn not in node.connections
    assert all(conn not in subs for subs in node.gossip.subscribers.values())
    assert conn not in node.peers.peers.values()
    return result


@pytest.fixture
def fuzz_node(tmp_path, reactor):
    service = tap.makeService(node_options(tmp_path, "--max-peers", "20",
                                           "--max-register-addrs", "30"), reactor)
    yield service.node


def _run_examples(reactor, node, args_strategy, wire: bool, max_examples: int, examples=()):
    ops = st.sampled_from(OPS)
    sides = st.sampled_from([("in", None), ("in", "cd" * 32), ("out", None), ("out", "ef" * 32)])

    requests = st.one_of(st.tuples(ops, args_strategy), shaped_requests(args_strategy))

    def run(request, side):
        op, args = request
        if wire:
            args = _wire(args)
        reply = blockingCallFromThread(reactor, lambda: ensureDeferred(one_request(node, op, args, *side, wire)))
        event(f"{op} -> {reply.status}")

    for request in examples:
        run = example(request=request, side=("in", None))(run)
    settings(FUZZ, max_examples=max_examples)(given(requests, sides)(run))()


def _wire(value):
    """The value as a frame would carry it: orjson's reading of its JSON."""
    try:
        return orjson.loads(json.dumps(value, allow_nan=False))
    except (ValueError, orjson.JSONDecodeError):
        return None


@pytest_twisted.ensureDeferred
async def test_every_op_with_wire_args(reactor, fuzz_node):
    try:
        await deferToThread(_run_examples, reactor, fuzz_node, wire_json, True, 400, [
            ("register", {"addr": ["ws://127.3.0.1:9/ws", "ws://[::ffff:127.3.0.1]x:9/ws"]}),
            ("register", {"addr": [f"ws://127.3.1.{i}:9/ws" for i in range(1, 41)]}),
        ])
    finally:
        await fuzz_node.close_connections()
        await fuzz_node.store.close()
    check_store(fuzz_node)


@pytest_twisted.ensureDeferred
async def test_every_op_with_any_python_args(reactor, fuzz_node):
    # Beyond what a frame can carry: huge ints, NaN, lone surrogates. The
    # ops are plain methods (node.py) and must hold for in-process callers.
    try:
        await deferToThread(_run_examples, reactor, fuzz_node, any_json, False, 300, [
            ("publish", {"topic": "t", "payload": 2**64}),
            ("publish", {"topic": "\ud800", "payload": 1}),
        ])
    finally:
        await fuzz_node.close_connections()
        await fuzz_node.store.close()
    check_store(fuzz_node)
