"""The listening side reads whole small text frames itself (frames.py,
``--frames own``) and leaves the rest to Autobahn. That must not be
observable: for random streams of frames, cut at random places, the bytes
written, the messages delivered, the handler's calls and the final state
are the same as with Autobahn reading everything (``--frames autobahn``).

In-process, over a ``StringTransport``: no sockets, so thousands of cuts
take seconds. The wire itself is tested in test_attacks.py.
"""

from __future__ import annotations

import base64
import os
import random
import struct

import orjson
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from foxnode import codec
from foxnode import frames
from foxnode.protocol import FoxServerFactory, FoxServerOwnFrames

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
BAD_UTF8 = [b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff", b"\xe2\x82"]
GOOD_TEXT = ["é", "€", "\U0001F600", "\uffff", "\U0010ffff", "a"]
HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def frame(op, payload=b"", *, fin=True, rsv=0, mask=True, form=None):
    n = len(payload)
    form = form or (7 if n < 126 else 16 if n < 65536 else 64)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | op])
    m = 0x80 if mask else 0
    head += (bytes([m | n]) if form == 7 else bytes([m | 126]) + struct.pack("!H", n) if form == 16
             else bytes([m | 127]) + struct.pack("!Q", n))
    if mask:
        key = os.urandom(4)
        payload = bytes(a ^ b for a, b in zip(payload, key * (n // 4 + 1)))
        head += key
    return head + payload


class Handler:
    """Answers at once, later (a Deferred), or closes/fails/drops from inside onMessage."""
    def __init__(self): self.log, self.later = [], []
    def connection_opened(self, conn): pass
    def handle_event(self, conn, ev): self.log.append(("event", ev.name))
    def rate_refused(self, conn, bucket): return codec.Reply(429, "slow")
    def message_refused(self, conn, reply): self.log.append(("refused", reply.status))
    def connection_lost(self, conn, code, reason): self.log.append(("lost", code, reason))
    def handle_request(self, conn, req):
        self.log.append((req.op, req.id, conn.state))
        if req.op == "close": conn.close(4000, "bye")
        elif req.op == "fail": conn._fail_connection(1011, "fail")
        elif req.op == "drop": conn.dropConnection(abort=True)
        elif req.op == "later":
            d = Deferred(); self.later.append(d); return d
        return codec.Reply(200, "OK", req.id)


def stream(rng, limit):
    def req(i, op="time"):
        return orjson.dumps({"op": op, "id": i, "pad": "é" * rng.choice([0, 0, 5, 70])})
    out = []
    for i in range(rng.randint(1, 25)):
        k = rng.randrange(9)
        if k < 3: out.append(frame(TEXT, req(i)))
        elif k == 3: out.append(frame(TEXT, b""))
        elif k == 4:
            b = req(i); c = rng.randint(0, len(b))
            out += [frame(TEXT, b[:c], fin=False), frame(PING, b"p"), frame(CONT, b[c:])]
        elif k == 5: out.append(frame(rng.choice([BINARY, PING, PONG]), req(i)[:100]))
        elif k == 6: out.append(frame(TEXT, b" " * rng.choice([125, 126, limit - 1, limit])))
        elif k == 7: out.append(frame(TEXT, "".join(rng.choices(GOOD_TEXT, k=9)).encode()))
        else: out.append(frame(TEXT, req(i, rng.choice(["close", "fail", "drop", "later", "time"]))))
    bad = [frame(TEXT, rng.choice(BAD_UTF8)), frame(TEXT, b"{}", mask=False), frame(TEXT, b"{}", rsv=4),
           frame(TEXT, b"{}", form=16), frame(TEXT, b"{}", form=64), frame(TEXT, b" " * (limit + 1)),
           frame(CONT, b"x"), frame(0xB, b""), frame(CLOSE, b"\x03\xe8")]
    if rng.random() < 0.6:
        out.insert(rng.randint(0, len(out)), rng.choice(bad))
    data = b"".join(out)
    if rng.random() < 0.15:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def run(chunks, limit, frame_limit, path=frames.OWN):
    h = Handler()
    f = FoxServerFactory(h, Clock(), max_message_size=limit, frames=path)
    f.setProtocolOptions(maxFramePayloadSize=frame_limit)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(p, FoxServerOwnFrames) == (path == frames.OWN)
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(HANDSHAKE)
    assert t.value().startswith(b"HTTP/1.1 101")
    t.clear()
    written = []
    for c in chunks:
        p.dataReceived(c)
        written.append(t.value()); t.clear()
    for d in h.later:
        d.callback(codec.Reply(200, "OK", "later"))
    written.append(t.value())
    return written, h.log, p.state, p.failedByMe, t.disconnecting, getattr(p, "localCloseCode", None)


@pytest.mark.parametrize("seeds", [range(0, 150), range(150, 300)])
def test_own_frame_reading_matches_autobahn(seeds):
    for seed in seeds:
        rng = random.Random(seed)
        limit = rng.choice([125, 126, 300])
        frame_limit = rng.choice([0, limit, limit // 2])
        chunks = stream(rng, limit)
        fast = run(chunks, limit, frame_limit, frames.OWN)
        assert fast == run(chunks, limit, frame_limit, frames.AUTOBAHN), f"seed {seed}: {len(chunks)} pieces"
