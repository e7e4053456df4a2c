"""Attacks on a running node over raw sockets and as a misbehaving client
or peer: malformed WebSocket frames and upgrades, floods, storms, dead and
half-open connections. After each, the node answers ``time`` on a fresh
connection and holds no connection of the attacker.

Blocking socket code runs in a worker thread (``deferToThread``), so the
reactor keeps serving the in-process node meanwhile. One test attacks a
real ``twistd`` process and watches its log and its memory.

Every address here is on 127.0.0.0/8 or ``localhost``; registered
addresses (which the node dials) use 127.3.0.0/16, port 9, where nothing
listens.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import random
import socket
import struct
import time
from typing import Any, Iterator

import orjson
import pytest
import pytest_twisted
from twisted.internet.defer import DeferredQueue, gatherResults
from twisted.internet.threads import deferToThread

from foxnode import address, client
from foxnode.store import load
from foxnode.testing import LOOPBACK, connect_as_peer, sleep, spawn_node, start_node, wait_for

TIMEOUT = 5.0
#: Makes 127.0.0.1 an outsider: limits are for clients other than the
#: node's operator (loopback, by default).
OUTSIDER = ("--trusted", "127.9.9.9/32")
TRACEBACK_SIGNS = ("Traceback", "Error(", 'File "', "Unhandled")

# WebSocket opcodes
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- a raw WebSocket client, blocking (run it in a thread) ------------------------------

def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None) -> bytes:
    """One frame, built by hand: any length field, rsv bits, mask or not."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 1 << 16:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        k = int.from_bytes((key * (len(payload) // 4 + 1))[: len(payload)], "big") if payload else 0
        payload = (int.from_bytes(payload, "big") ^ k).to_bytes(len(payload), "big") if payload else b""
        head += key
    return head + payload


def upgrade_request(path: str = "/ws", key: str | None = "", version: str | None = "13",
                    extra: str = "", method: str = "GET") -> bytes:
    if key == "":
        key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}", "Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


class Raw:
    """A TCP connection to the node, spoken to byte by byte."""

    def __init__(self, port: int, timeout: float = TIMEOUT, source: str | None = None) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_http(self) -> tuple[int | None, str]:
        """The status and head of an HTTP response; (None, "") if closed first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None, self.buf.decode("latin-1")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        text = head.decode("latin-1")
        return int(text.split(" ", 2)[1]), text

    def upgrade(self, **kw: Any) -> int | None:
        self.send(upgrade_request(**kw))
        status, _ = self.read_http()
        return status

    def read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self.read_exact(2)
        assert not b1 & 0x80, "the server masked a frame"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self.read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self.read_exact(8))
        return bool(b0 & 0x80), b0 & 0x0F, self.read_exact(n)

    def read_message(self) -> Any:
        """The next text message as JSON, answering pings on the way."""
        while True:
            fin, op, payload = self.read_frame()
            if op == PING:
                self.send(frame(PONG, payload))
                continue
            assert op == TEXT and fin, (op, payload)
            return json.loads(payload)

    def read_close(self) -> int | None:
        """Read until the server's close frame; its code, or None if the
        connection ended without one (dropped)."""
        try:
            while True:
                _, op, payload = self.read_frame()
                if op == CLOSE:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        except (EOFError, socket.timeout, OSError):
            return None

    def request(self, message: Any) -> Any:
        self.send(frame(TEXT, orjson.dumps(message)))
        return self.read_message()

    def closed_by_peer(self, within: float) -> bool:
        """True once the server ends the connection, reading whatever comes."""
        self.sock.settimeout(within)
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                if not self._fill():
                    return True
                self.buf = b""
        except socket.timeout:
            return False
        except OSError:
            return True
        return False

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@contextlib.contextmanager
def upgraded(port: int, **kw: Any) -> Iterator[Raw]:
    """A raw connection past its WebSocket upgrade, closed after use."""
    raw = Raw(port, **kw)
    try:
        assert raw.upgrade() == 101
        yield raw
    finally:
        raw.close()


def raw_call(port: int, message: Any) -> Any:
    """One request on a fresh raw WebSocket connection (blocking)."""
    with upgraded(port) as raw:
        return raw.request(message)


def check_time_reply(reply: Any) -> None:
    assert reply["status"] == 200 and reply["error"] == "OK", reply
    assert isinstance(reply["response"]["time"], float)
    assert abs(reply["response"]["time"] - time.time()) < 60
    assert reply["response"]["time_zone"] == time.strftime("%Z")


async def still_serving(reactor: Any, running: Any) -> None:
    """The node answers ``time`` on a fresh connection, and holds no
    connection of the attack any longer."""
    reply = await client.call(reactor, running.url, "time", timeout=TIMEOUT)
    assert reply.status == 200 and reply.error == "OK", reply
    assert abs(reply.response["time"] - time.time()) < 60
    await wait_for(reactor, lambda: not running.node.connections, timeout=10,
                   what=lambda: f"the attacker's connections to close ({len(running.node.connections)} left)")


def no_traceback(text: str) -> bool:
    return not any(sign in text for sign in TRACEBACK_SIGNS)


# -- malformed frames ------------------------------------------------------------------

BIG = b'{"op": "time", "pad": "' + b"x" * 5000 + b'"}'
BAD_FRAMES = {
    "text not UTF-8": ([frame(TEXT, b'{"op": "time", "x": "\xff\xfe"}')], {1007}),
    "text with a UTF-16 surrogate encoded": ([frame(TEXT, b'{"op": "\xed\xa0\x80"}')], {1007}),
    "bad UTF-8 across fragments": ([frame(TEXT, b'{"op": "\xc3', fin=False), frame(CONT, b'\x28"}')], {1007}),
    "length field of 2^62": ([frame(TEXT, length=1 << 62)], {1009, None}),
    "length field of 2^63 (illegal)": ([frame(TEXT, length=1 << 63)], {1002, 1009, None}),
    "frame over --max-message-size": ([frame(TEXT, BIG)], {1009}),
    "message over --max-message-size in fragments": (
        [frame(TEXT, BIG[:2000], fin=False), frame(CONT, BIG[2000:4000], fin=False), frame(CONT, BIG[4000:])],
        {1009}),
    "unmasked client frame": ([frame(TEXT, b'{"op": "time"}', mask=False)], {1002}),
    "reserved bit 1": ([frame(TEXT, b'{"op": "time"}', rsv=4)], {1002}),
    "reserved bit 2": ([frame(TEXT, b'{"op": "time"}', rsv=2)], {1002}),
    "reserved bit 3": ([frame(TEXT, b'{"op": "time"}', rsv=1)], {1002}),
    "reserved data opcode 3": ([frame(0x3, b"x")], {1002}),
    "reserved data opcode 7": ([frame(0x7, b"x")], {1002}),
    "reserved control opcode 0xB": ([frame(0xB, b"x")], {1002}),
    "reserved control opcode 0xF": ([frame(0xF, b"")], {1002}),
    "continuation without a start": ([frame(CONT, b'{"op": "time"}')], {1002}),
    "new message inside a fragmented one": (
        [frame(TEXT, b'{"op": ', fin=False), frame(TEXT, b'"time"}')], {1002}),
    "fragmented ping": ([frame(PING, b"x", fin=False)], {1002}),
    "ping over 125 bytes": ([frame(PING, b"p" * 126)], {1002}),
    # A bad close frame: the client itself is closing, so Autobahn takes it
    # as the end of the closing handshake and may drop without a close frame.
    "close code 999": ([frame(CLOSE, struct.pack("!H", 999))], {1002, None}),
    "close with one byte": ([frame(CLOSE, b"\x03")], {1002, None}),
    "close reason not UTF-8": ([frame(CLOSE, struct.pack("!H", 1000) + b"\xff")], {1007, None}),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
@pytest_twisted.ensureDeferred
async def test_malformed_frame_closes_with_its_code(reactor, node_dir, case):
    frames, codes = BAD_FRAMES[case]
    running = await start_node(reactor, node_dir, "--max-message-size", "4096")
    try:
        def attack() -> tuple[Any, int | None]:
            with upgraded(running.port) as raw:
                # The connection works before the attack...
                first = raw.request({"op": "time", "id": 1})
                for f in frames:
                    raw.send(f)
                return first, raw.read_close()

        first, code = await deferToThread(attack)
        check_time_reply({k: v for k, v in first.items() if k != "id"})
        assert code in codes, f"{case}: closed with {code}, expected one of {codes}"
        await still_serving(reactor, running)
    finally:
        await running.stop()


# -- the node's own reading of whole small text frames (frames.py) -------------------
#
# The listening side takes whole, small, masked text frames itself and
# leaves everything else to Autobahn; a stream of frames must be answered
# the same however TCP cuts it, with both paths taking turns.

def _mixed_stream(limit: int) -> tuple[bytes, list[int]]:
    """Frames of every kind the two paths share, and the request ids their
    replies must carry, in order."""
    def req(i: int, pad: int = 0) -> bytes:
        body = {"op": "time", "id": i}
        if pad:
            body["pad"] = "é" * pad  # two bytes each, so frames can end mid-character
        return orjson.dumps(body)

    parts: list[bytes] = []
    ids: list[int] = []
    for i in range(40):
        kind = i % 8
        if kind == 1:  # 126-byte length form
            parts.append(frame(TEXT, req(i, pad=150)))
        elif kind == 2:  # fragmented, with a ping between the fragments
            body = req(i, pad=20)
            parts += [frame(TEXT, body[:7], fin=False), frame(PING, b"hi"), frame(CONT, body[7:])]
        elif kind == 3:  # binary: the lab's node read it as text
            parts.append(frame(BINARY, req(i)))
        elif kind == 4:  # exactly at --max-message-size
            body = req(i)
            parts.append(frame(TEXT, body[:-1] + b" " * (limit - len(body)) + b"}"))
        elif kind == 5:
            parts.append(frame(PONG, b"unsolicited"))
            parts.append(frame(TEXT, req(i)))
        else:
            parts.append(frame(TEXT, req(i)))
        ids.append(i)
    return b"".join(parts), ids


def _read_ids(raw: Raw, count: int) -> list[Any]:
    ids = []
    while len(ids) < count:
        fin, op, payload = raw.read_frame()
        if op in (PING, PONG):
            assert op == PONG and payload == b"hi", (op, payload)
            continue
        assert op == TEXT and fin, (op, payload)
        reply = json.loads(payload)
        assert reply["status"] == 200, reply
        ids.append(reply["id"])
    return ids


@pytest.mark.parametrize("split", ["whole", "bytes", "random"])
@pytest_twisted.ensureDeferred
async def test_frames_are_answered_in_order_however_tcp_cuts_them(reactor, node_dir, split):
    limit = 4096
    running = await start_node(reactor, node_dir, "--max-message-size", str(limit), "--burst", "1000")
    stream, ids = _mixed_stream(limit)
    try:
        def talk() -> list[Any]:
            with upgraded(running.port) as raw:
                raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if split == "whole":
                    raw.send(stream)
                else:
                    rng = random.Random(7)
                    at = 0
                    while at < len(stream):
                        n = 1 if split == "bytes" else rng.randint(1, 300)
                        raw.send(stream[at:at + n])
                        at += n
                        if split == "bytes" and at % 97 == 0:
                            time.sleep(0.001)  # let some pieces arrive alone
                return _read_ids(raw, len(ids))

        assert await deferToThread(talk) == ids
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest.mark.parametrize("bad, code", [
    (frame(TEXT, b'{"op": "time", "x": "\xff"}'), 1007),
    (frame(TEXT, b'{"op": "time"}', mask=False), 1002),
    (frame(TEXT, b'{"op": "time"}', rsv=4), 1002),
    (frame(TEXT, b'{"op": "time", "pad": "' + b"x" * 4100 + b'"}'), 1009),
    # a 16-bit length field holding a length that fits in 7 bits
    (b"\x81\xfe\x00\x0e" + frame(TEXT, b'{"op": "time"}')[2:], 1002),
])
@pytest_twisted.ensureDeferred
async def test_bad_frame_after_good_ones_in_one_segment(reactor, node_dir, bad, code):
    # The good frames before it are answered; the bad one closes the
    # connection with Autobahn's code, as it would alone.
    running = await start_node(reactor, node_dir, "--max-message-size", "4096")
    try:
        def attack() -> tuple[list[Any], int | None]:
            with upgraded(running.port) as raw:
                good = b"".join(frame(TEXT, orjson.dumps({"op": "time", "id": i})) for i in range(3))
                raw.send(good + bad + frame(TEXT, b'{"op": "time", "id": 99}'))
                return _read_ids(raw, 3), raw.read_close()

        answered, closed = await deferToThread(attack)
        assert answered == [0, 1, 2]
        assert closed == code
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_truncated_frame_then_disconnect(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    try:
        def attack(reset: bool) -> None:
            raw = Raw(running.port)
            assert raw.upgrade() == 101
            # A header announcing 1000 bytes, then 10 of them, then gone.
            raw.send(frame(TEXT, b"{" + b" " * 999)[:16])
            raw.close(reset=reset)

        for reset in (False, True):
            await deferToThread(attack, reset)
            await still_serving(reactor, running)
        def cut_header() -> None:
            # A header cut in the middle of its 64-bit extended length.
            raw = Raw(running.port)
            assert raw.upgrade() == 101
            raw.send(frame(TEXT, b"x" * 70000)[:5])
            raw.close()

        await deferToThread(cut_header)
        await still_serving(reactor, running)
        # And an upgrade request cut short.
        await deferToThread(lambda: (lambda r: (r.send(upgrade_request()[:30]), r.close()))(Raw(running.port)))
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_peer_that_vanishes_mid_message(reactor, tmp_path):
    running = await start_node(reactor, tmp_path / "node")
    try:
        peer = await connect_as_peer(reactor, running.url, port=9)
        await wait_for(reactor, lambda: running.node.peers.peers, what="the peer to be admitted")
        # Half of a gossip event, then the TCP connection is gone.
        half = frame(TEXT, orjson.dumps({"event": "gossip", "envelope": {"id": "0" * 64, "x": "y" * 500}}))
        peer.transport.write(half[: len(half) // 2])
        peer.transport.abortConnection()
        await wait_for(reactor, lambda: not running.node.peers.peers, what="the peer to be forgotten")
        assert running.node.live_peers() == []
        await still_serving(reactor, running)
    finally:
        await running.stop()


# -- malformed upgrades ---------------------------------------------------------------------

BAD_UPGRADES = {
    "binary garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
    "text garbage": b"HELLO THERE\r\n\r\n",
    "no Sec-WebSocket-Key": upgrade_request(key=None),
    "Sec-WebSocket-Key not base64": upgrade_request(key="not base64 !!"),
    "Sec-WebSocket-Key of 8 bytes": upgrade_request(key=base64.b64encode(b"12345678").decode()),
    "no Sec-WebSocket-Version": upgrade_request(version=None),
    "Sec-WebSocket-Version 99": upgrade_request(version="99"),
    "Sec-WebSocket-Version not a number": upgrade_request(version="thirteen"),
    "POST upgrade": upgrade_request(method="POST"),
    "upgrade on another path": upgrade_request(path="/nope"),
    "a 64 KB header": upgrade_request(extra="X-Junk: " + "j" * 65536 + "\r\n"),
    "a thousand headers": upgrade_request(extra="".join(f"X-H{i}: v\r\n" for i in range(1000))),
}


@pytest.mark.parametrize("case", list(BAD_UPGRADES))
@pytest_twisted.ensureDeferred
async def test_malformed_upgrade_gets_an_http_4xx(reactor, node_dir, case):
    running = await start_node(reactor, node_dir)
    try:
        def attack() -> tuple[int | None, str]:
            raw = Raw(running.port)
            try:
                raw.send(BAD_UPGRADES[case])
                return raw.read_http()
            finally:
                raw.close()

        status, head = await deferToThread(attack)
        if case == "a 64 KB header":
            # Refused while the client still sends: the 400 may be lost to a reset.
            assert status is None or 400 <= status <= 499, f"{case}: {status} {head[:200]!r}"
        else:
            assert status is not None and 400 <= status <= 499, f"{case}: {status} {head[:200]!r}"
        assert no_traceback(head)
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest.mark.parametrize("partial", [b"", b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
@pytest_twisted.ensureDeferred
async def test_upgrade_that_never_completes_is_closed(reactor, node_dir, partial):
    # Slowloris: a TCP connection that never finishes its opening handshake
    # must not hold a socket longer than --handshake-timeout (plus slack).
    running = await start_node(reactor, node_dir, "--handshake-timeout", "1")
    try:
        def attack() -> bool:
            raw = Raw(running.port)
            try:
                raw.send(partial)
                return raw.closed_by_peer(within=6)
            finally:
                raw.close()

        assert await deferToThread(attack), "the node kept an unfinished upgrade open for 6 s"
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest.mark.parametrize("interval, timeout", [("1", "1"), ("2", "1")])
@pytest_twisted.ensureDeferred
async def test_client_that_answers_pings_is_kept(reactor, node_dir, interval, timeout):
    # The other side of the half-open test: short ping settings must not
    # cut off a client whose pongs come back within milliseconds.
    running = await start_node(reactor, node_dir, "--ping-interval", interval, "--ping-timeout", timeout)
    try:
        proto = await client.connect(reactor, running.url)
        try:
            started = reactor.seconds()
            while reactor.seconds() - started < 3:
                assert proto.fox_open, f"dropped after {reactor.seconds() - started:.2f} s: " \
                                       f"{proto.close_code} {proto.close_reason}"
                reply = await proto.request("time", timeout=TIMEOUT)
                assert reply.status == 200
                await sleep(reactor, 0.1)
        finally:
            proto.close()
            await proto.when_closed()
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_client_that_keeps_sending_is_alive_without_pongs(reactor, node_dir):
    # Any frame from the client shows it is there (Autobahn restarts the
    # ping timeout on any traffic), also the ones the node reads itself.
    running = await start_node(reactor, node_dir, "--ping-interval", "1", "--ping-timeout", "1")
    try:
        def talk() -> int:
            with upgraded(running.port) as raw:
                answered = 0
                started = time.monotonic()
                while time.monotonic() - started < 4:
                    raw.send(frame(TEXT, b'{"op": "time"}'))
                    while True:  # pings are read and never answered
                        _, op, payload = raw.read_frame()
                        assert op != CLOSE, f"closed after {time.monotonic() - started:.1f} s: {payload!r}"
                        if op == TEXT:
                            break
                    answered += 1
                    time.sleep(0.2)
                return answered

        assert await deferToThread(talk) >= 10
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_half_open_connection_is_closed_by_pings(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--ping-interval", "1", "--ping-timeout", "1")
    try:
        def open_one() -> Raw:
            raw = Raw(running.port)
            assert raw.upgrade() == 101
            return raw

        raw = await deferToThread(open_one)
        # Now the client neither reads nor writes: pings go unanswered.
        started = reactor.seconds()
        try:
            await wait_for(reactor, lambda: not running.node.connections, timeout=8,
                           what="the node to close a connection that answers no ping")
            assert reactor.seconds() - started < 6
            assert await deferToThread(raw.closed_by_peer, 2), "the socket is still open"
        finally:
            raw.close()
        await still_serving(reactor, running)
    finally:
        await running.stop()


# -- storms and floods ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_storm_of_connections_that_all_drop_at_once(reactor, node_dir):
    count = 300
    running = await start_node(reactor, node_dir, "--max-per-ip", str(count + 10))
    try:
        def connect_all() -> list[Raw]:
            conns = []
            for i in range(count):
                # From several loopback addresses, as a crowd would come.
                raw = Raw(running.port, source=f"127.0.{i % 3}.{2 + i % 50}")
                raw.send(upgrade_request())
                conns.append(raw)
            for raw in conns:
                assert raw.read_http()[0] == 101
            return conns

        conns = await deferToThread(connect_all)
        await wait_for(reactor, lambda: len(running.node.connections) == count,
                       what=lambda: f"{count} connections (have {len(running.node.connections)})")
        assert running.node.health()["connections"] == count

        def drop_all() -> None:
            for i, raw in enumerate(conns):
                raw.close(reset=bool(i % 2))

        await deferToThread(drop_all)
        await wait_for(reactor, lambda: not running.node.connections, timeout=10,
                       what=lambda: f"the storm's connections to go ({len(running.node.connections)} left)")
        assert running.service.site.ws_factory.countConnections == 0
        await still_serving(reactor, running)
    finally:
        await running.stop()


def nested(depth: int, kind: str = "list") -> bytes:
    """JSON text nested ``depth`` levels deep."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


async def session(reactor: Any, url: str) -> tuple[Any, DeferredQueue]:
    """A foxnode client connection whose incoming frames land, raw, in a queue."""
    proto = await client.connect(reactor, url)
    inbox: DeferredQueue = DeferredQueue()
    proto.onMessage = lambda payload, is_binary: inbox.put(orjson.loads(payload))
    return proto, inbox


async def next_reply(reactor: Any, inbox: DeferredQueue) -> Any:
    d = inbox.get()
    d.addTimeout(TIMEOUT, reactor)
    return await d


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_gets_an_error_and_the_connection_stays(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--max-depth", "16")
    try:
        proto, inbox = await session(reactor, running.url)
        try:
            for body in (nested(10_000), nested(10_000, "object"), nested(1_000_000)[:600_000],
                         b'{"op": "time", "args": ' + nested(10_000) + b"}"):
                proto.sendMessage(body)
                reply = await next_reply(reactor, inbox)
                assert 400 <= reply["status"] <= 599 and reply["error"], reply
                assert no_traceback(reply["error"])
                proto.sendMessage(b'{"op": "time"}')
                check_time_reply(await next_reply(reactor, inbox))
            # Exactly at --max-depth: fine; one more: refused, with the id.
            at_limit = b'{"op": "time", "id": "a", "args": ' + nested(15) + b"}"
            over = b'{"op": "time", "id": "b", "args": ' + nested(16) + b"}"
            proto.sendMessage(at_limit)
            reply = await next_reply(reactor, inbox)
            assert reply.pop("id") == "a"
            check_time_reply(reply)
            proto.sendMessage(over)
            reply = await next_reply(reactor, inbox)
            assert reply["status"] == 400 and "16" in reply["error"] and reply["id"] == "b", reply
            proto.sendMessage(b'{"op": "time"}')
            check_time_reply(await next_reply(reactor, inbox))
        finally:
            proto.close()
            await proto.when_closed()
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_flood_of_registrations_stays_within_max_peers(reactor, node_dir):
    max_peers, per_request, conns_n, requests_n, addrs_n = 50, 20, 4, 10, 30
    running = await start_node(reactor, node_dir, "--max-peers", str(max_peers),
                               "--max-register-addrs", str(per_request))
    store = running.node.store
    sizes = []
    add = store.add

    def watched_add(*a: Any, **kw: Any) -> Any:
        result = add(*a, **kw)
        sizes.append(len(store))
        return result

    store.add = watched_add
    try:
        conns = [await client.connect(reactor, running.url) for _ in range(conns_n)]
        pending = []
        for c, conn in enumerate(conns):
            for r in range(requests_n):
                addrs = [f"ws://127.3.{c * requests_n + r}.{j + 1}:9/ws" for j in range(addrs_n)]
                d = conn.request("register", {"addr": addrs}, timeout=20)
                pending.append((addrs, d))
        replies = await gatherResults([d for _, d in pending])
        for conn in conns:
            conn.close()
            await conn.when_closed()

        # The bound holds, in memory and on disk...
        assert max(sizes) <= max_peers, f"the store held {max(sizes)} addresses"
        assert len(store) <= max_peers
        for addr in store.addresses():
            address.parse(addr)
        await store.commit()
        # (the peers file and its journal together; load refuses more than max_peers too)
        on_disk = load(node_dir / "peers.json", max_peers=10 * max_peers)
        assert 0 < len(on_disk) <= max_peers
        await store.fold()
        in_file = orjson.loads((node_dir / "peers.json").read_bytes())["peers"]
        assert sorted(in_file) == sorted(r.addr for r in on_disk)
        await still_serving(reactor, running)
        # ...and every request got its 202, accounting for each address:
        # the ones over --max-register-addrs, or that the store could not
        # take, are in ``rejected`` with the reason. A flood is no reason
        # to tell a client the store is unavailable.
        problems = [(r.status, r.error) for r in replies if r.status != 202]
        assert problems == [], f"{len(problems)} of {len(replies)} registers: {problems[0]}"
        for (addrs, _), reply in zip(pending, replies):
            accepted, rejected = reply.response["accepted"], reply.response["rejected"]
            assert sorted(accepted + [e["addr"] for e in rejected]) == sorted(addrs)
            over = [e for e in rejected if str(per_request) in e["reason"]]
            assert [e["addr"] for e in over] == addrs[per_request:], rejected
            assert len(accepted) <= per_request
    finally:
        await running.stop()


async def flood(reactor: Any, running: Any, body: bytes, count: int) -> tuple[list, Any]:
    proto, inbox = await session(reactor, running.url)
    for _ in range(count):
        proto.sendMessage(body)
    was_open, code, reason = await proto.when_closed().addTimeout(10, reactor)
    replies = []
    while inbox.pending:
        replies.append(inbox.pending.pop(0))
    return replies, code


@pytest_twisted.ensureDeferred
async def test_request_flood_over_the_rate_is_told_to_wait_then_closed(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--rate", "5", "--burst", "10", *OUTSIDER)
    try:
        replies, code = await flood(reactor, running, b'{"op": "time"}', 200)
        statuses = [r["status"] for r in replies]
        assert 200 in statuses and 429 in statuses, statuses
        limited = [r for r in replies if r["status"] == 429]
        assert all("retry after" in r["error"] for r in limited), limited[0]
        assert code == 4008, f"closed with {code}"
        assert len(replies) < 200
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest.mark.parametrize("body", [b"not json at all", b"42", b'{"event": "x"}'])
@pytest_twisted.ensureDeferred
async def test_flood_of_bad_messages_is_rate_limited_too(reactor, node_dir, body):
    # Each bad message costs the node a parse (up to --max-message-size
    # bytes) and a reply: it counts against --rate like any request.
    running = await start_node(reactor, node_dir, "--rate", "5", "--burst", "10", *OUTSIDER)
    try:
        proto, inbox = await session(reactor, running.url)
        for _ in range(200):
            proto.sendMessage(body)
        await sleep(reactor, 1.0)
        replies = list(inbox.pending)
        statuses = [r["status"] for r in replies]
        closed = proto.close_code
        if proto.fox_open:
            proto.close()
        await proto.when_closed()
        assert 429 in statuses or closed == 4008, \
            f"200 bad messages at --rate 5: {len(replies)} replies, none 429, closed with {closed}"
        await still_serving(reactor, running)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_connections_over_max_per_ip_and_max_connections_get_503(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--max-per-ip", "2", "--max-connections", "4", *OUTSIDER)
    try:
        def attack() -> list:
            kept, statuses = [], []
            for source in ["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.3"]:
                raw = Raw(running.port, source=source)
                status = raw.upgrade()
                statuses.append(status)
                if status == 101:
                    kept.append(raw)
                else:
                    raw.close()
            # One goes; there is room for one more from 127.0.0.1.
            kept.pop(0).close()
            time.sleep(0.3)
            again = Raw(running.port)
            statuses.append(again.upgrade())
            kept.append(again)
            for raw in kept:
                raw.close()
            return statuses

        statuses = await deferToThread(attack)
        # 3rd from .1: per IP; 6th: all four places taken.
        assert statuses == [101, 101, 503, 101, 101, 503, 101], statuses
        await still_serving(reactor, running)
    finally:
        await running.stop()


# -- wrong argument types for every op ---------------------------------------------------------

BAD_ARGS = [None, True, False, 0, -1, 2**64, 1.5, "", "x", "x" * 5000, [], [None], [[["deep"]]], {},
            {"": None}, {"addr": None}, {"topic": 1}, {"topics": 1}, {"topics": [1]},
            {"topic": "", "payload": 1}, {"topic": "t", "payload": 1, "ttl": "60"},
            {"topic": "t", "payload": 1, "ttl": 10**9}, {"topic": ["t"], "payload": None},
            {"node_id": 1, "network": None, "version": "1"}, {"detail": "yes"}]
OPS = ["register", "peers", "time", "info", "hello", "exchange", "publish", "subscribe", "unsubscribe",
       "no-such-op"]
#: ops that take no args: they answer whatever args come
IGNORE_ARGS = {"peers", "time"}


@pytest_twisted.ensureDeferred
async def test_wrong_argument_types_for_every_op_get_a_clear_error(reactor, node_dir):
    running = await start_node(reactor, node_dir, "--rate", "1000", "--burst", "1000")
    problems = []
    try:
        shared, inbox = await session(reactor, running.url)
        for op in OPS:
            for args in BAD_ARGS:
                body = orjson.dumps({"op": op, "args": args, "id": 7}) if args != 2**64 else \
                    b'{"op": "%s", "args": 18446744073709551616, "id": 7}' % op.encode()
                if op == "hello":
                    # A refused hello ends its connection: one each.
                    proto, box = await session(reactor, running.url)
                else:
                    proto, box = shared, inbox
                proto.sendMessage(body)
                reply = await next_reply(reactor, box)
                if proto is not shared:
                    if proto.fox_open:
                        proto.close()
                    await proto.when_closed()
                where = f"{op}({args!r:.60})"
                if set(reply) != {"status", "error", "response", "id"} or reply["id"] != 7:
                    problems.append(f"{where}: reply shape {reply!r:.200}")
                    continue
                status, error = reply["status"], reply["error"]
                if not isinstance(status, int) or not isinstance(error, str) or not error.strip():
                    problems.append(f"{where}: {reply!r:.200}")
                elif not no_traceback(error) or error == "Internal error; the node logged it.":
                    problems.append(f"{where}: internal error {error!r:.200}")
                elif op == "info":
                    # optional args: fine as an object without a bad "detail"
                    fine = args is None or isinstance(args, dict) and "detail" not in args
                    if status != (200 if fine else 400):
                        problems.append(f"{where}: {status} {error}")
                elif op in IGNORE_ARGS:
                    if status != 200:
                        problems.append(f"{where}: {status} {error}")
                elif op == "register" and isinstance(args, dict) and "addr" in args:
                    # addr given but not an address: the seed's 202, each one rejected
                    if status != 202 or reply["response"]["accepted"] or not all(
                            e["reason"] for e in reply["response"]["rejected"]):
                        problems.append(f"{where}: {reply!r:.200}")
                elif not 400 <= status <= 599:
                    problems.append(f"{where}: {status} {error}")
        shared.close()
        await shared.when_closed()
        assert problems == []
        assert running.node.store.addresses() == []
        await still_serving(reactor, running)
    finally:
        await running.stop()


# -- a real twistd process under a mix of all of the above --------------------------------------

def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


#: Addresses no node may store: user info, fragment, ports out of range, not
#: ws, junk after the host, whitespace, too long.
MALFORMED = ["ws://u@127.3.0.1:9/ws", "ws://127.3.0.1:9/ws#f", "ws://127.3.0.1:0/ws",
             "ws://127.3.0.1:65536/ws", "http://127.3.0.1:9/ws", "ws://[::ffff:127.3.0.1]x:9/ws", "ws://127.3.0.1:9/w s",
             "ws://127.3.0.1:9/" + "a" * 300, "ws://:9/ws", "ws://127.3.0.1:9\\@127.3.0.2/ws"]


def _attack_round(port: int, worker: int, round_no: int, stored_malformed: list) -> None:
    """One of each kind of attack, against a node in another process.
    Malformed addresses a register reply says it took go to ``stored_malformed``."""
    def quietly(fn: Any) -> None:
        try:
            fn()
        except (OSError, EOFError, AssertionError, ValueError):
            # The node may (rightly) cut an attacker off mid-way.
            pass

    def bad_frame(f: bytes, wait: bool = True) -> Any:
        def go() -> None:
            raw = Raw(port, timeout=3)
            try:
                if raw.upgrade() == 101:
                    raw.send(f)
                    if wait:
                        raw.read_close()
            finally:
                raw.close(reset=True)
        return go

    def bad_upgrade(data: bytes) -> Any:
        def go() -> None:
            raw = Raw(port, timeout=3)
            try:
                raw.send(data)
                raw.read_http()
            finally:
                raw.close()
        return go

    def register_flood() -> None:
        with upgraded(port, timeout=5) as raw:
            for r in range(3):
                addrs = [f"ws://127.3.{(worker * 7 + round_no + r) % 256}.{j + 1}:9/ws" for j in range(40)]
                # The first within --max-register-addrs with every malformed kind; then over it.
                addrs = MALFORMED + addrs[:15] if r == 0 else addrs
                raw.send(frame(TEXT, orjson.dumps({"op": "register", "args": {"addr": addrs}})))
            for _ in range(3):
                reply = raw.read_message()
                if reply["status"] == 202:
                    stored_malformed.extend(set(MALFORMED) & set(reply["response"]["accepted"]))

    def request_flood() -> None:
        raw = Raw(port, timeout=3)
        try:
            assert raw.upgrade() == 101
            raw.send(b"".join(frame(TEXT, b'{"op": "time"}') for _ in range(100)))
            raw.read_close()
        finally:
            raw.close(reset=True)

    def storm() -> None:
        conns = []
        try:
            for _ in range(40):
                raw = Raw(port, timeout=3)
                raw.send(upgrade_request())
                conns.append(raw)
        finally:
            for i, raw in enumerate(conns):
                raw.close(reset=bool(i % 2))

    def deep() -> None:
        with upgraded(port, timeout=3) as raw:
            raw.send(frame(TEXT, nested(10_000)))
            raw.read_message()
            raw.send(frame(TEXT, b'{"op": "publish", "args": {"topic": 5, "payload": null}}'))
            raw.read_message()

    for f in [frame(TEXT, b"\xff\xfe"), frame(TEXT, length=1 << 62), frame(TEXT, BIG * 20),
              frame(TEXT, b"{}", mask=False), frame(0x3, b"x"), frame(CONT, b"x")]:
        quietly(bad_frame(f))
    # truncated: half a frame, then gone
    quietly(bad_frame(frame(TEXT, b'{"op": "time", "x": ' + b"1" * 300)[:40], wait=False))
    for data in list(BAD_UPGRADES.values())[:6]:
        quietly(bad_upgrade(data))
    for attack in (register_flood, request_flood, storm, deep):
        quietly(attack)


def test_twistd_node_survives_a_mix_of_attacks(tmp_path):
    node = spawn_node(tmp_path / "node", "--max-peers", "50", "--max-register-addrs", "30",
                      "--max-message-size", "65536", "--rate", "20", "--burst", "40",
                      "--max-per-ip", "200", "--ping-interval", "2", "--ping-timeout", "2",
                      "--handshake-timeout", "2", *OUTSIDER)
    try:
        check_time_reply(raw_call(node.port, {"op": "time"}))
        before = rss_kb(node.process.pid)
        deadline = time.monotonic() + 5.0
        stored_malformed: list = []

        def attacker(worker: int) -> int:
            rounds = 0
            while time.monotonic() < deadline and node.process.poll() is None:
                _attack_round(node.port, worker, rounds, stored_malformed)
                rounds += 1
            return rounds

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            rounds = sum(pool.map(attacker, range(6)))
        time.sleep(1.0)
        assert node.process.poll() is None, f"the node died:\n{node.log()[-3000:]}"
        check_time_reply(raw_call(node.port, {"op": "time"}))
        peers = raw_call(node.port, {"op": "peers"})["response"]["peers"]
        assert 0 < len(peers) <= 50
        after = rss_kb(node.process.pid)
        print(f"RSS {before} kB -> {after} kB after {rounds} rounds")
        assert after - before < 50 * 1024, f"RSS grew from {before} kB to {after} kB in {rounds} rounds"
        log = node.log()
        assert "Unhandled Error" not in log and "Traceback" not in log, log[-5000:]
        assert rounds >= 12
        assert set(MALFORMED) & set(peers) == set(), "malformed addresses were stored"
        assert set(stored_malformed) == set(), "register accepted malformed addresses"
    finally:
        code = node.stop()
    # Stock twistd ends an orderly SIGTERM shutdown by re-raising the signal.
    assert code in (0, -15), node.log()[-3000:]
    assert "Server Shut Down." in node.log()
