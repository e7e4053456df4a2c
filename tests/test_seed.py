"""The "Seed replies (exact)" table of PROTOCOL.md, over a real socket.

Every case runs twice: with foxnode's own client (``foxnode.client``) and
with an independent one, the ``websockets`` library, whose asyncio client
runs in a worker thread so that the reactor keeps serving the node. Replies
are compared as whole JSON objects, so a missing or extra key fails.

Every address used here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredQueue, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from foxnode import client, codec
from foxnode.testing import LOOPBACK, running_node, wait_for

REPLY_TIMEOUT = 5.0

#: Sent after every frame under test: since replies come in request order,
#: every reply before the probe's belongs to the frame under test, and a
#: frame the node stays silent on shows as no reply rather than a timeout.
PROBE_ID = "__probe__"
PROBE = json.dumps({"op": "time", "id": PROBE_ID}).encode()

LAB_ADDR = "ws://localhost:9000/ws"

CANNOT_PARSE = {"status": 500, "error": "Cannot parse request message.", "response": None}
NOT_SUPPORTED = {"status": 500, "error": "Message body is not supported.", "response": None}
MISSING_ADDR = {
    "status": 500,
    "error": 'Operation "register" requires the following "args": "addr"',
    "response": None,
}


def unknown_op(op: str) -> dict:
    return {"status": 404, "error": f'Operation "{op}" is not supported.', "response": None}


def peers_reply(*addrs: str) -> dict:
    return {"status": 200, "error": "OK", "response": {"peers": list(addrs)}}


def accepted_reply(accepted: list, rejected: list = ()) -> dict:
    return {"status": 202, "error": "Accepted",
            "response": {"accepted": list(accepted), "rejected": list(rejected)}}


def with_id(reply: dict, rid: Any) -> dict:
    return {**reply, "id": rid}


class _TimeResponse:
    """Matches the ``response`` of ``time``: a float of about now and the
    local zone abbreviation, nothing else."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, dict)
            and set(other) == {"time", "time_zone"}
            and type(other["time"]) is float
            and abs(other["time"] - time.time()) < 60
            and other["time_zone"] == time.strftime("%Z")
        )

    def __repr__(self) -> str:
        return f"<time response: float near {time.time():.0f}, time_zone {time.strftime('%Z')!r}>"


TIME_RESPONSE = _TimeResponse()
TIME_REPLY = {"status": 200, "error": "OK", "response": TIME_RESPONSE}


# -- frames --------------------------------------------------------------------

def T(text: str) -> tuple[bytes, bool]:
    """A text frame."""
    return text.encode("utf-8"), False


def J(value: Any) -> tuple[bytes, bool]:
    """A text frame holding ``value`` as JSON."""
    return T(json.dumps(value, ensure_ascii=False))


def B(data: bytes) -> tuple[bytes, bool]:
    """A binary frame."""
    return data, True


# -- the two clients -------------------------------------------------------------

def _decode_reply(raw: bytes | str) -> Any:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


async def _close_fox(proto: Any) -> None:
    proto.close()
    await proto.when_closed()


async def fox_session(reactor: Any, url: str, frames: list[tuple[bytes, bool]]) -> list[list]:
    """Send each frame with foxnode's client, then the probe; return, per
    frame, the replies that came before the probe's."""
    proto = await client.connect(reactor, url)
    inbox: DeferredQueue = DeferredQueue()
    # Take every frame raw: the client's own dispatch would hide ids.
    proto.onMessage = lambda payload, is_binary: inbox.put((payload, is_binary))
    results = []
    try:
        for payload, binary in frames:
            proto.sendMessage(payload, isBinary=binary)
            proto.sendMessage(PROBE, isBinary=False)
            replies = []
            while True:
                d = inbox.get()
                d.addTimeout(REPLY_TIMEOUT, reactor)
                raw, is_binary = await d
                assert not is_binary, f"reply came in a binary frame: {raw!r}"
                reply = _decode_reply(raw)
                if isinstance(reply, dict) and reply.get("id") == PROBE_ID:
                    assert reply["status"] == 200, reply
                    break
                replies.append(reply)
            results.append(replies)
    finally:
        await _close_fox(proto)
    return results


def _ws_options() -> dict:
    return dict(open_timeout=REPLY_TIMEOUT, close_timeout=REPLY_TIMEOUT, compression=None)


def ws_session(url: str, frames: list[tuple[bytes, bool]]) -> Any:
    """The same as ``fox_session`` with the ``websockets`` library, in a thread."""

    async def run() -> list[list]:
        async with ws_connect(url, **_ws_options()) as ws:
            results = []
            for payload, binary in frames:
                await ws.send(payload, text=not binary)
                await ws.send(PROBE, text=True)
                replies = []
                while True:
                    raw = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)
                    assert isinstance(raw, str), f"reply came in a binary frame: {raw!r}"
                    reply = _decode_reply(raw)
                    if isinstance(reply, dict) and reply.get("id") == PROBE_ID:
                        assert reply["status"] == 200, reply
                        break
                    replies.append(reply)
                results.append(replies)
            return results

    return deferToThread(asyncio.run, run())


@pytest.fixture(params=["foxnode-client", "websockets"])
def session(request, reactor):
    """``await session(url, frames)``: the replies to each frame, sent one
    after the other on one connection, by one of the two clients."""
    if request.param == "foxnode-client":
        return lambda url, frames: ensureDeferred(fox_session(reactor, url, frames))
    return ws_session


def one_reply_each(results: list[list]) -> list:
    assert all(len(r) == 1 for r in results), f"not exactly one reply per request: {results}"
    return [r[0] for r in results]


# -- the lab session ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_lab_session_in_order(reactor, node_dir, session):
    # The requests exactly as the lab's WebSocket test page sent them.
    frames = [
        T('{\n  "op": "peers"\n}'),
        T('{\n  "op": "register",\n  "args": {\n    "addr": "ws://localhost:9000/ws"\n  }\n}'),
        T('{\n  "op": "peers"\n}'),
        T('{\n  "op": "time"\n}'),
    ]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [
        {"status": 200, "error": "OK", "response": {"peers": []}},
        {"status": 202, "error": "Accepted", "response": {"accepted": [LAB_ADDR], "rejected": []}},
        {"status": 200, "error": "OK", "response": {"peers": [LAB_ADDR]}},
        {"status": 200, "error": "OK", "response": TIME_RESPONSE},
    ]


@pytest_twisted.ensureDeferred
async def test_lab_session_with_the_client_api(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        assert await client.call(reactor, node.url, "peers") == codec.Reply(200, "OK", {"peers": []})
        proto = await client.connect(reactor, node.url)
        try:
            assert await proto.request("register", {"addr": LAB_ADDR}) == codec.Reply(
                202, "Accepted", {"accepted": [LAB_ADDR], "rejected": []})
            assert await proto.request("peers") == codec.Reply(200, "OK", {"peers": [LAB_ADDR]})
            reply = await proto.request("time")
        finally:
            await _close_fox(proto)
        assert (reply.status, reply.error) == (200, "OK")
        assert reply.response == TIME_RESPONSE
        # Another connection sees the same store.
        assert await client.call(reactor, node.url, "peers") == codec.Reply(200, "OK", {"peers": [LAB_ADDR]})


# -- malformed requests ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_not_json(reactor, node_dir, session):
    frames = [T("hello"), T("{"), T('{"op": "peers"'), T(""), T("{'op': 'peers'}"),
              T('{"op": "peers"} trailing'), T("[1, 2,]")]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [CANNOT_PARSE] * len(frames)


@pytest_twisted.ensureDeferred
async def test_json_that_is_not_an_object(reactor, node_dir, session):
    frames = [T("42"), T("null"), T("[]"), T('"x"'), T("true"), T("1.5"),
              T('[{"op": "peers"}]'), T('"{\\"op\\": \\"peers\\"}"')]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [NOT_SUPPORTED] * len(frames)


@pytest_twisted.ensureDeferred
async def test_object_without_a_string_op(reactor, node_dir, session):
    frames = [J({}), J({"args": {"addr": "ws://127.3.0.1:9/ws"}}), J({"OP": "peers"}),
              J({"op": None}), J({"op": 42}), J({"op": True}), J({"op": ["peers"]}),
              J({"op": {"name": "peers"}})]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [NOT_SUPPORTED] * len(frames)


@pytest_twisted.ensureDeferred
async def test_reply_or_event_shaped_object_from_a_client_is_not_supported(reactor, node_dir, session):
    # No string op, so by the seed table: 500 "Message body is not supported."
    # (the original node answered any object without "op" so).
    frames = [J({"status": 200, "error": "OK"}),
              J({"status": 200, "error": "OK", "response": None, "id": "r1"}),
              J({"event": "message", "topic": "t", "payload": 1})]
    async with running_node(reactor, node_dir) as node:
        results = await session(node.url, frames)
    assert results == [[NOT_SUPPORTED], [with_id(NOT_SUPPORTED, "r1")], [NOT_SUPPORTED]]


@pytest_twisted.ensureDeferred
async def test_unknown_op(reactor, node_dir, session):
    ops = ["X", "Peers", "", "注册", 'say "hi"', "register ", "time\n"]
    frames = [J({"op": op}) for op in ops] + [J({"op": "X", "args": {"addr": "ws://127.3.0.1:9/ws"}})]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
        assert replies == [unknown_op(op) for op in ops] + [unknown_op("X")]
        # Nothing was registered by the unknown op carrying an addr.
        assert node.node.store.addresses() == []


@pytest_twisted.ensureDeferred
async def test_register_without_addr(reactor, node_dir, session):
    frames = [
        J({"op": "register"}),
        J({"op": "register", "args": {}}),
        J({"op": "register", "args": {"address": "ws://127.3.0.1:9/ws"}}),
        J({"op": "register", "args": {"ADDR": "ws://127.3.0.1:9/ws"}}),
        # args that are not an object
        J({"op": "register", "args": "ws://127.3.0.1:9/ws"}),
        J({"op": "register", "args": "addr"}),
        J({"op": "register", "args": ["addr"]}),
        J({"op": "register", "args": ["ws://127.3.0.1:9/ws"]}),
        J({"op": "register", "args": 42}),
        J({"op": "register", "args": None}),
        J({"op": "register", "args": True}),
    ]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames + [J({"op": "peers"})]))
    assert replies == [MISSING_ADDR] * len(frames) + [peers_reply()]


@pytest_twisted.ensureDeferred
async def test_register_mixed_valid_and_invalid_addresses(reactor, node_dir, session):
    valid = ["ws://127.3.0.1:9/ws", "wss://localhost:9443/ws", "ws://127.255.255.254:65535/ws",
             "ws://127.3.0.2/ws"]
    invalid_strings = ["http://127.3.0.1:9/ws", "127.3.0.1:9", "ws://", "ftp://localhost/",
                       "ws://127.3.0.1:99999/ws", "ws://127.3.0.1:9/ws with space", ""]
    invalid_others = [42, None, {"addr": "ws://127.3.0.3:9/ws"}, ["ws://127.3.0.4:9/ws"]]
    addrs = [valid[0], invalid_strings[0], 42, valid[1], *invalid_strings[1:], None, valid[2],
             *invalid_others[2:], valid[3]]
    frames = [
        J({"op": "register", "args": {"addr": addrs}}),
        J({"op": "peers"}),
        # A single invalid string: the seed answered 202 and stored nothing.
        J({"op": "register", "args": {"addr": "http://localhost:9000/ws"}}),
        # An empty list: nothing to take, as the seed did.
        J({"op": "register", "args": {"addr": []}}),
        # Known again, and twice in one list: still listed once.
        J({"op": "register", "args": {"addr": [valid[0], valid[0]]}}),
        J({"op": "peers"}),
    ]
    async with running_node(reactor, node_dir) as node:
        first, peers, single, empty, again, peers_again = one_reply_each(await session(node.url, frames))

    assert set(first) == {"status", "error", "response"}
    assert (first["status"], first["error"]) == (202, "Accepted")
    assert set(first["response"]) == {"accepted", "rejected"}
    assert first["response"]["accepted"] == valid
    rejected = first["response"]["rejected"]
    assert len(rejected) == len(invalid_strings) + len(invalid_others)
    for entry in rejected:
        assert set(entry) == {"addr", "reason"}, entry
        assert isinstance(entry["reason"], str) and entry["reason"].strip(), entry
    # Strings come back as given, in the order given.
    assert [e["addr"] for e in rejected if e["addr"] in invalid_strings] == invalid_strings
    assert sorted(peers["response"]["peers"]) == sorted(valid)
    assert peers == peers_reply(*peers["response"]["peers"])

    assert single["status"] == 202 and single["error"] == "Accepted"
    assert single["response"]["accepted"] == []
    assert [e["addr"] for e in single["response"]["rejected"]] == ["http://localhost:9000/ws"]

    assert empty == accepted_reply([])

    assert (again["status"], again["error"]) == (202, "Accepted")
    assert set(again["response"]["accepted"]) == {valid[0]}
    assert again["response"]["rejected"] == []
    assert sorted(peers_again["response"]["peers"]) == sorted(valid)


@pytest_twisted.ensureDeferred
async def test_peers_and_time_ignore_args(reactor, node_dir, session):
    frames = [J({"op": "peers", "args": {"addr": "ws://127.3.0.1:9/ws"}}),
              J({"op": "time", "args": [1, 2]}), J({"op": "peers", "args": None})]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [peers_reply(), TIME_REPLY, peers_reply()]


# -- ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", ["req-1", 0, 2.5, 9007199254740993, ""])
@pytest_twisted.ensureDeferred
async def test_id_is_echoed_on_every_kind_of_reply(reactor, node_dir, session, rid):
    addr = "ws://127.3.0.1:9/ws"
    cases = [
        (J({"op": "peers", "id": rid}), peers_reply()),
        (J({"op": "time", "id": rid}), TIME_REPLY),
        (J({"id": rid, "op": "register", "args": {"addr": addr}}), accepted_reply([addr])),
        (J({"op": "peers", "id": rid}), peers_reply(addr)),
        (J({"op": "register", "id": rid}), MISSING_ADDR),
        (J({"op": "register", "args": "x", "id": rid}), MISSING_ADDR),
        (J({"op": "X", "id": rid}), unknown_op("X")),
        (J({"id": rid}), NOT_SUPPORTED),
        (J({"op": 42, "id": rid}), NOT_SUPPORTED),
        (J({"op": None, "args": {}, "id": rid}), NOT_SUPPORTED),
        (B(json.dumps({"op": "peers", "id": rid}).encode()), peers_reply(addr)),
        (B(json.dumps({"op": "nope", "id": rid}).encode()), unknown_op("nope")),
    ]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, [frame for frame, _ in cases]))
    assert replies == [with_id(expected, rid) for _, expected in cases]
    for reply in replies:
        # the same type, too: 0 is not 0.0 nor False
        assert type(reply["id"]) is type(rid)


@pytest_twisted.ensureDeferred
async def test_no_id_key_without_an_id(reactor, node_dir, session):
    frames = [J({"op": "peers"}), J({"op": "time"}), J({"op": "X"}), J({"op": "register"}),
              J({}), T("nope"), J({"op": "register", "args": {"addr": "ws://127.3.0.1:9/ws"}})]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    for reply in replies:
        assert set(reply) == {"status", "error", "response"}, reply


# -- binary frames and UTF-8 ------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_binary_frames(reactor, node_dir, session):
    addr = "ws://127.3.0.9:9/ws"
    frames = [
        B(b'{"op": "peers"}'),
        B(json.dumps({"op": "register", "args": {"addr": addr}}).encode()),
        B(b'{\n  "op": "peers"\n}'),
        B('{"op": "注册"}'.encode("utf-8")),
        B(b"42"),
        B(b"not json"),
        # not UTF-8
        B(b"\xff\xfe{\x00}\x00"),
        B(b'{"op": "\xff"}'),
        B('{"op": "peers"}'.encode("utf-16")),
        B(b""),
    ]
    async with running_node(reactor, node_dir) as node:
        replies = one_reply_each(await session(node.url, frames))
    assert replies == [
        peers_reply(),
        accepted_reply([addr]),
        peers_reply(addr),
        unknown_op("注册"),
        NOT_SUPPORTED,
        CANNOT_PARSE,
        CANNOT_PARSE,
        CANNOT_PARSE,
        CANNOT_PARSE,
        CANNOT_PARSE,
    ]


BAD_UTF8_TEXT = b'{"op": "\xff\xfe"}'


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_closes_with_1007_foxnode_client(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        proto = await client.connect(reactor, node.url)
        try:
            proto.sendMessage(BAD_UTF8_TEXT, isBinary=False)
            d = proto.when_closed()
            d.addTimeout(REPLY_TIMEOUT, reactor)
            was_open, code, _reason = await d
        finally:
            proto.close()
        assert was_open
        assert code == 1007
        await wait_for(reactor, lambda: not node.node.connections, timeout=5,
                       what="the node to drop the connection")


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_closes_with_1007_websockets(reactor, node_dir):
    async def run(url: str) -> Any:
        async with ws_connect(url, **_ws_options()) as ws:
            await ws.send(BAD_UTF8_TEXT, text=True)
            try:
                reply = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)
            except ConnectionClosed as e:
                return e.rcvd
            return f"got a reply instead of a close: {reply!r}"

    async with running_node(reactor, node_dir) as node:
        close = await deferToThread(asyncio.run, run(node.url))
        assert close is not None, "connection ended without a close frame"
        assert not isinstance(close, str), close
        assert close.code == 1007


def _raw_invalid_utf8(port: int) -> tuple[list[tuple[int, bytes]], bool]:
    """Open a WebSocket by hand, send one masked text frame that is not
    UTF-8, echo the server's close frame; return the frames received
    (opcode, payload) and whether the server then closed the TCP connection."""
    s = socket.create_connection((LOOPBACK, port), timeout=REPLY_TIMEOUT)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((
            f"GET /ws HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, f"connection closed during the upgrade: {buf!r}"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

        def masked(opcode: int, payload: bytes) -> bytes:
            mask = os.urandom(4)
            assert len(payload) < 126
            return (bytes([0x80 | opcode, 0x80 | len(payload)]) + mask
                    + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

        s.sendall(masked(0x1, BAD_UTF8_TEXT))
        frames: list[tuple[int, bytes]] = []
        eof = False
        while not eof:
            # parse whole frames out of buf
            while len(buf) >= 2:
                opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
                assert not buf[1] & 0x80, "server frames must not be masked"
                if length == 126:
                    if len(buf) < 4:
                        break
                    length, offset = int.from_bytes(buf[2:4], "big"), 4
                elif length == 127:
                    if len(buf) < 10:
                        break
                    length, offset = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < offset + length:
                    break
                frames.append((opcode, buf[offset:offset + length]))
                buf = buf[offset + length:]
                if opcode == 0x8:
                    s.sendall(masked(0x8, frames[-1][1][:2]))
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                break
            if chunk:
                buf += chunk
            else:
                eof = True
        return frames, eof
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_closes_with_1007_raw_socket(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        frames, eof = await deferToThread(_raw_invalid_utf8, node.port)
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert frames and frames[-1][0] == 0x8, f"no close frame: {frames}"
        assert len(closes) == 1
        assert int.from_bytes(closes[0][:2], "big") == 1007
        assert eof, "the node did not close the TCP connection after the close handshake"
        await wait_for(reactor, lambda: not node.node.connections, timeout=5,
                       what="the node to drop the connection")


# -- pipelining ----------------------------------------------------------------------------

PIPELINE = 50


def _pipeline_requests() -> list[Any]:
    """50 requests: register, time and peers in turn, with an unknown op
    and a frame that is not JSON now and then (errors are answered at once,
    registers only after the disk: the order must hold all the same)."""
    requests: list[Any] = []
    for i in range(PIPELINE):
        if i % 10 == 9:
            requests.append("this is not JSON")
            continue
        if i % 10 == 7:
            requests.append({"op": "nope", "id": i})
            continue
        kind = ("register", "time", "peers")[i % 3]
        request: dict[str, Any] = {"op": kind, "id": i}
        if kind == "register":
            request["args"] = {"addr": f"ws://127.3.{i}.1:9/ws"}
        requests.append(request)
    return requests


def _frame(request: Any) -> str:
    return request if isinstance(request, str) else json.dumps(request)


def _check_pipeline(requests: list[Any], replies: list[Any]) -> None:
    expected_ids = [None if isinstance(r, str) else r["id"] for r in requests]
    assert [r.get("id") for r in replies] == expected_ids, "replies out of request order"
    registered: list[str] = []
    for request, reply in zip(requests, replies):
        if isinstance(request, str):
            assert reply == CANNOT_PARSE
            continue
        rid = request["id"]
        if request["op"] == "register":
            addr = request["args"]["addr"]
            assert reply == with_id(accepted_reply([addr]), rid)
            registered.append(addr)
        elif request["op"] == "time":
            assert reply == with_id(TIME_REPLY, rid)
        elif request["op"] == "nope":
            assert reply == with_id(unknown_op("nope"), rid)
        else:
            assert set(reply) == {"status", "error", "response", "id"}
            assert (reply["status"], reply["error"]) == (200, "OK")
            # a later request sees what earlier ones on the connection registered
            assert set(registered) <= set(reply["response"]["peers"]), (rid, reply)


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_come_in_request_order_websockets(reactor, node_dir):
    requests = _pipeline_requests()

    async def run(url: str) -> list:
        async with ws_connect(url, **_ws_options()) as ws:
            for request in requests:
                await ws.send(_frame(request))
            return [json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)) for _ in requests]

    async with running_node(reactor, node_dir) as node:
        replies = await deferToThread(asyncio.run, run(node.url))
        writes = node.node.store.writes
    _check_pipeline(requests, replies)
    assert writes >= 1


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_come_in_request_order_foxnode_client_raw(reactor, node_dir):
    requests = _pipeline_requests()
    async with running_node(reactor, node_dir) as node:
        proto = await client.connect(reactor, node.url)
        inbox: DeferredQueue = DeferredQueue()
        proto.onMessage = lambda payload, is_binary: inbox.put(payload)
        try:
            for request in requests:
                proto.sendMessage(_frame(request).encode(), isBinary=False)
            replies = []
            for _ in requests:
                d = inbox.get()
                d.addTimeout(REPLY_TIMEOUT, reactor)
                replies.append(_decode_reply(await d))
        finally:
            await _close_fox(proto)
    _check_pipeline(requests, replies)


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_with_the_client_api(reactor, node_dir):
    requests = [r for r in _pipeline_requests() if not isinstance(r, str)]
    async with running_node(reactor, node_dir) as node:
        proto = await client.connect(reactor, node.url)
        arrived: list[int] = []
        try:
            ds = []
            for i, request in enumerate(requests):
                d = proto.request(request["op"], request.get("args"), timeout=REPLY_TIMEOUT)
                # callbacks fire as each reply arrives, so this is arrival order
                d.addCallback(lambda reply, i=i: (arrived.append(i), reply)[1])
                ds.append(d)
            replies = await gatherResults(ds, consumeErrors=True)
        finally:
            await _close_fox(proto)
    assert arrived == list(range(len(requests)))
    for request, reply in zip(requests, replies):
        if request["op"] == "nope":
            assert reply == codec.Reply(404, 'Operation "nope" is not supported.', None)
        elif request["op"] == "register":
            assert reply == codec.Reply(202, "Accepted", {"accepted": [request["args"]["addr"]], "rejected": []})
        elif request["op"] == "time":
            assert (reply.status, reply.error, reply.response) == (200, "OK", TIME_RESPONSE)
        else:
            assert (reply.status, reply.error) == (200, "OK")
            assert set(reply.response) == {"peers"}
