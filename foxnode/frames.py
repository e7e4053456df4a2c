"""The node's own WebSocket frame reader and writer: a fast path beside
Autobahn's, for the listening side.

Nearly every client message is one small, whole, masked text frame, and
nearly every reply one small text frame; Autobahn's general frame machine
costs more per message than the node's work on a ``time`` request. Here
such frames are read and written directly, and everything else (partial or
fragmented frames, control frames, bad UTF-8, oversized frames, protocol
violations, compression) is left to Autobahn, unchanged, from the first byte
not taken. tests/test_frame_reading.py and test_frame_writing.py check the
two paths cannot be told apart; tests/test_frame_switch.py checks the same
over a socket, and the whole suite runs both ways (``FOXNODE_FRAMES``).

The fast path reads Autobahn's private attributes. They are named in
``AUTOBAHN_INSIDES`` and looked for once, at import, on a real open Autobahn
protocol. If any is missing, the fast path is off for the whole process and
a warning names what is missing and the Autobahn version: the node then
runs on Autobahn's own path, slower but correct. (It does not refuse to
start: the fast path buys speed only, never behaviour, so an Autobahn
upgrade must not take nodes down; setup.cfg bounds Autobahn to the versions
the tests passed with, and test_frame_switch.py fails when the check does.)

``--frames autobahn`` (``parse_option``) turns the fast path off on purpose.

Autobahn's debug lines. Every connection Autobahn makes pretty-prints its
options and transport for a debug line (``pformat`` in
autobahn.websocket.protocol) whether or not debug lines are written: a
sixth of a 1000-node devnet's CPU while its links come up. ``quiet_pformat``
puts a lazy stand-in there, which formats only when a line is written, so
``--debug`` shows the same lines. It changes no behaviour, so it applies
with either ``--frames``.
"""

from __future__ import annotations

import base64
import functools
import pprint
from typing import Any

import autobahn
import txaio
import autobahn.websocket.protocol as _autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from foxnode import logs

log = logs.logger(__name__)

#: ``--frames`` values: the node's fast path, or Autobahn's frame code alone.
OWN = "own"
AUTOBAHN = "autobahn"
CHOICES = (OWN, AUTOBAHN)

#: Every attribute of Autobahn's open server protocol the fast path reads
#: or calls (its frame parser's state, its options as copied onto the
#: protocol, its ping timer), beyond the public ``sendMessage``.
AUTOBAHN_INSIDES = (
    "STATE_OPEN", "state", "data", "current_frame", "inside_message", "_perMessageCompress",
    "applyMask", "logOctets", "logFrames", "autoPingTimeoutCall", "autoPingRestartOnAnyTraffic",
    "_cancelAutoPingTimeoutCall", "maxFramePayloadSize", "maxMessagePayloadSize",
)

_PROBE_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + base64.b64encode(b"foxnode-frames!!") +
                  b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def missing_insides() -> tuple[str, ...]:
    """The names of ``AUTOBAHN_INSIDES`` an open Autobahn server protocol lacks.

    Most are instance attributes set while a connection opens, so they are
    looked for on one: opened in memory (a ``StringTransport``, a ``Clock``,
    never the global reactor, which must not be installed by an import).
    """
    clock = Clock()
    factory = WebSocketServerFactory(reactor=clock)
    # Autobahn's timers go through txaio's loop, which, unset, imports (and
    # so installs) the global reactor: lend it the clock meanwhile, or
    # importing foxnode would install the default reactor under twistd's
    # --reactor and under any program that installs its own later.
    lent, txaio.config.loop = txaio.config.loop, clock
    # The Twisted protocol foxnode's is built on (the factory's default is
    # Autobahn's framework-neutral one).
    factory.protocol = WebSocketServerProtocol
    protocol = factory.buildProtocol(None)
    try:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(_PROBE_UPGRADE)
        if getattr(protocol, "state", None) != getattr(protocol, "STATE_OPEN", object()):
            # Not open: its attributes say nothing; count the state as missing.
            return tuple(dict.fromkeys(("state", *(n for n in AUTOBAHN_INSIDES if not hasattr(protocol, n)))))
        return tuple(n for n in AUTOBAHN_INSIDES if not hasattr(protocol, n))
    except Exception as e:  # an Autobahn that cannot even be opened this way
        return (f"an in-memory connection ({type(e).__name__}: {e})",)
    finally:
        try:
            protocol.dropConnection(abort=True)
        except Exception:
            pass
        txaio.config.loop = lent


#: What this Autobahn lacks of ``AUTOBAHN_INSIDES``: empty, or the fast
#: path is off in this process (``effective`` says ``autobahn``).
MISSING: tuple[str, ...] = missing_insides()
if MISSING:
    log.warn("Autobahn {version} lacks {missing}, which foxnode's own frame reader and writer "
             "use: frames are read and written by Autobahn alone (slower); foxnode was tested "
             "with the Autobahn versions setup.cfg allows",
             version=autobahn.__version__, missing=", ".join(MISSING))


def parse_option(value: str) -> str:
    """A ``--frames`` value (``own`` or ``autobahn``, any case) as one of
    ``CHOICES``; anything else is a ValueError saying what to give."""
    choice = value.strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{value!r}: give {' or '.join(CHOICES)}")
    return choice


def effective(choice: str) -> str:
    """The path a connection asked to take ``choice`` really takes: the
    fast path only where this Autobahn has all it needs."""
    choice = parse_option(choice)
    return AUTOBAHN if MISSING else choice


class OwnFrames:
    """The fast path, a mixin before foxnode's server protocol in the MRO
    (``FoxServerOwnFrames`` in protocol.py). The protocol below it is
    Autobahn's ``WebSocketServerProtocol`` plus foxnode's ``onMessage`` and
    ``_reading_held`` (set while requests are held back: frames then stay
    in Autobahn's buffer, unparsed)."""

    def _send_text(self: Any, payload: bytes) -> None:
        # A server's text frame is a fixed header and the payload as is
        # (RFC 6455 5.2: FIN and opcode 1, the length, no mask), written
        # while the connection is plainly open (no compression is ever
        # negotiated, see FoxServerFactory); anything else is Autobahn's.
        if self.state != self.STATE_OPEN or self._perMessageCompress is not None:
            self.sendMessage(payload, isBinary=False)
            return
        n = len(payload)
        if n < 126:
            header = bytes((0x81, n))
        elif n < 0x10000:
            header = b"\x81\x7e" + n.to_bytes(2, "big")
        else:
            header = b"\x81\x7f" + n.to_bytes(8, "big")
        self.transport.write(header + payload)

    def dataReceived(self: Any, data: bytes) -> None:
        # Taken here only while the connection is plainly open with nothing
        # of Autobahn's half-read; the rest goes to Autobahn unchanged.
        # Autobahn's bookkeeping that foxnode does not use is skipped for
        # the frames taken: traffic statistics, tracked timings and
        # "message" observers.
        if (self.state == self.STATE_OPEN and not self.data and self.current_frame is None
                and not self._reading_held
                and not self.inside_message and self._perMessageCompress is None
                and self.applyMask and not self.logOctets and not self.logFrames):
            data = self._take_text_frames(data)
            if not data:
                return
        super().dataReceived(data)

    def _take_text_frames(self: Any, data: bytes) -> bytes:
        """Deliver the whole small text frames at the start of ``data``;
        return what is left for Autobahn."""
        limit = self._payload_limit
        start, end = 0, len(data)
        while end - start >= 6 and data[start] == 0x81:  # FIN, no RSV, text
            n = data[start + 1] - 0x80  # negative: unmasked, Autobahn refuses it
            if 0 <= n < 126:
                head = start + 6
            elif n == 126 and end - start >= 8:
                n = int.from_bytes(data[start + 2:start + 4], "big")
                head = start + 8
                if n < 126:
                    break  # not the minimal length encoding: a violation
            else:
                break
            stop = head + n
            if stop > end or n > limit:
                break
            mask = data[head - 4:head]
            payload = (int.from_bytes(data[head:stop], "big")
                       ^ int.from_bytes((mask * ((n >> 2) + 1))[:n], "big")).to_bytes(n, "big")
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # Autobahn fails the connection (1007)
            start = stop
            if self.autoPingTimeoutCall is not None and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.onMessage(payload, False)
            if self.state != self.STATE_OPEN or self._reading_held:
                break  # the rest waits in Autobahn's buffer
        return data[start:] if start else data

    @functools.cached_property
    def _payload_limit(self: Any) -> int:
        # Read once: Autobahn copies the factory's options onto the protocol
        # when the connection is made, before any frame can arrive, and
        # foxnode never changes a connection's limits afterwards.
        limits = [x for x in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if x > 0]
        return min(limits, default=0xFFFF)


class _Pretty:
    """``pprint.pformat(value)``, made when the log line is written."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)

    __repr__ = __str__


def quiet_pformat() -> None:
    """Autobahn's debug-only ``pformat`` made lazy (see the module's text)."""
    if getattr(_autobahn_protocol, "pformat", None) is pprint.pformat:
        _autobahn_protocol.pformat = _Pretty


quiet_pformat()

__all__ = ["OWN", "AUTOBAHN", "CHOICES", "AUTOBAHN_INSIDES", "MISSING", "OwnFrames",
           "effective", "missing_insides", "parse_option"]
