"""The listening side writes its text frames itself
(``frames.OwnFrames._send_text``, ``--frames own``); the bytes must be Autobahn's own, byte
for byte, for every length form, and where it falls back to Autobahn
(compression, a paused reader's backlog) it must still be Autobahn's.
In-process, over a ``StringTransport``, as tests/test_frame_reading.py.
"""

from __future__ import annotations

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflate
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from foxnode import frames
from foxnode.frames import AUTOBAHN_INSIDES
from foxnode.protocol import FoxServerFactory, FoxServerOwnFrames

from test_frame_reading import HANDSHAKE, Handler

SIZES = [0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537, 300_000]
LIMIT = 1 << 20


def opened(limit: int = LIMIT, path: str = frames.OWN):
    f = FoxServerFactory(Handler(), Clock(), max_message_size=limit, frames=path)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(HANDSHAKE)
    assert t.value().startswith(b"HTTP/1.1 101")
    t.clear()
    return p, t


def autobahn_bytes(payloads: list[bytes], compress: bool = False) -> bytes:
    p, t = opened()
    if compress:
        p._perMessageCompress = PerMessageDeflate(True, False, False, 15, 15, 8)
    for payload in payloads:
        WebSocketServerProtocol.sendMessage(p, payload, isBinary=False)
    return t.value()


def body(n: int) -> bytes:
    # Multi-byte UTF-8 too: the length is in bytes, not characters.
    text = ("é€😀a" * (n // 10 + 1)).encode()
    return text[:n].decode("utf-8", "ignore").encode().ljust(n, b" ")


@pytest.mark.parametrize("n", SIZES)
def test_own_frame_writing_matches_autobahn(n):
    payload = body(n)
    assert len(payload) == n
    p, t = opened()
    p._send_text(payload)
    assert t.value() == autobahn_bytes([payload])
    t.clear()
    assert p.send_frame(payload) is True
    assert t.value() == autobahn_bytes([payload])


def test_autobahn_has_what_the_own_frames_use():
    # On the node's own protocol too, not only on the import check's probe.
    p, _ = opened()
    assert frames.MISSING == ()
    assert isinstance(p, FoxServerOwnFrames) and p.factory.frames == frames.OWN
    assert [name for name in AUTOBAHN_INSIDES if not hasattr(p, name)] == []


def test_own_frames_can_be_switched_off():
    payloads = [body(n) for n in SIZES]
    p, t = opened(path=frames.AUTOBAHN)
    assert not isinstance(p, FoxServerOwnFrames)
    for payload in payloads:
        p._send_text(payload)
    assert t.value() == autobahn_bytes(payloads)


def test_compression_falls_back_to_autobahn():
    payloads = [body(n) for n in SIZES]
    p, t = opened()
    p._perMessageCompress = PerMessageDeflate(True, False, False, 15, 15, 8)
    for payload in payloads:
        p._send_text(payload)
    assert t.value() == autobahn_bytes(payloads, compress=True)


def test_backlog_of_a_paused_reader_is_written_as_autobahn_would():
    payloads = [body(n) for n in SIZES]
    p, t = opened()
    p.pauseProducing()
    for payload in payloads:
        assert p.send_frame(payload) is True
    assert t.value() == b""
    p.resumeProducing()
    assert t.value() == autobahn_bytes(payloads)


@pytest.mark.parametrize("n", [125, 126, 65535, 65536])
def test_nothing_over_the_limit_is_written(n):
    # Autobahn refuses to send over its limit (PayloadExceededError); the
    # node's writer refuses too, and says so by returning False.
    p, t = opened(limit=n - 1)
    assert p.send_frame(body(n)) is False
    assert t.value() == b"" and p.dropped == 1
    assert p.send_frame(body(n - 1)) is True
    assert t.value() == autobahn_bytes([body(n - 1)])
