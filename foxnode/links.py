"""Link emulation in the node's own connection path: latency with jitter,
loss and bandwidth on the peer connections a node dials, with no root and
on any system ("wrapper" emulation; Linux's netem is the exact kernel's).

Where: ``wrap_endpoint`` wraps the client endpoint of every dial
(peers.py), so the one connection between two nodes is shaped once, at the
node that dialed it, in both directions: what it sends waits before it
reaches the socket, what it receives waits before the protocol sees it.
Connections the node accepts (from clients, the devnet, a browser) are not
shaped: the dialing side shapes a peer link for both.

How, per direction (``Pipe``), for a chunk of ``n`` bytes written at ``now``:

- bandwidth: it leaves once the chunks before it have, ``n / bandwidth``
  seconds after it starts leaving;
- latency and jitter: it arrives ``latency`` plus a uniform draw from
  ``[-jitter, +jitter]`` (never below zero) after it left;
- loss: a TCP stream loses no bytes, it retransmits them: each of the
  chunk's segments (``SEGMENT`` bytes) is lost with probability ``loss``,
  and a lost one arrives one retransmission timeout later (TCP's: at least
  ``min_rto``, 0.2 s as Linux's, and twice the round trip), doubling for
  each loss again; the chunk arrives with its latest segment;
- order: a chunk never arrives before the one written before it (TCP does
  not reorder), so a jittered chunk holds back those behind it.

Time is the reactor's (``callLater``, ``seconds``), so tests run it on a
``Clock``; the draws come from the ``random.Random`` handed in.
"""

from __future__ import annotations

import collections
import math
import random
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from foxnode.config import LinkConfig, LinkShape

#: A TCP segment's payload on a link of the usual MTU (1500, minus headers).
SEGMENT = 1448
#: The name runs and reports give this emulation.
EMULATION = "wrapper"


# -- the figures, as the command line writes them ---------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps|b|kb|mb|gb)?\s*$", re.I)
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
               "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}
#: Longest latency or jitter taken: more is a typo.
MAX_DELAY = 60.0


def parse_duration(text: str) -> float:
    """``40ms``, ``0.5s``, ``250us`` (a bare number is milliseconds, as
    netem's) to seconds; ``ValueError`` saying why."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r}: give a duration such as 40ms (not negative)")
    value = float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[m[2]]
    if not (math.isfinite(value) and value <= MAX_DELAY):
        raise ValueError(f"{text!r}: at most {MAX_DELAY:g}s")
    return value


def parse_latency(text: str) -> tuple[float, float]:
    """``40ms`` or ``40ms:10ms`` (latency:jitter) to seconds."""
    latency, colon, jitter = text.partition(":")
    return parse_duration(latency), parse_duration(jitter) if colon else 0.0


def parse_loss(text: str) -> float:
    """``1%`` or ``0.01`` to a fraction, below 1 (a link that loses every
    segment never delivers)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"{text!r}: give a share such as 1% or 0.01") from None
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"{text!r}: give a share from 0 to below 100%")
    return value


def parse_rate(text: str) -> float:
    """``1mbit``, ``100kbit``, ``125000`` (bytes per second) to bytes per second."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"{text!r}: give a rate such as 1mbit or 100kbit")
    value = float(m[1]) * _RATE_UNITS[(m[2] or "b").lower()]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{text!r}: give at least 8bit (one byte per second)")
    return value


def parse_shape(text: str) -> LinkShape:
    """``latency=40ms:10ms,loss=1%,bandwidth=1mbit`` (any of them)."""
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r}: give key=value (latency, loss, bandwidth)")
        if key == "latency":
            fields["latency"], fields["jitter"] = parse_latency(value)
        elif key == "loss":
            fields["loss"] = parse_loss(value)
        elif key == "bandwidth":
            fields["bandwidth"] = parse_rate(value)
        else:
            raise ValueError(f"{key!r}: not a link figure (latency, loss, bandwidth)")
    return LinkShape(**fields)


def parse_rule(text: str) -> tuple[int, int, LinkShape]:
    """``9000-9499=latency=40ms,loss=1%``: the shape of links to peers on
    those ports (one port: ``9000=...``)."""
    ports, sep, shape = text.partition("=")
    low, _, high = ports.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"{text!r}: give PORT-PORT=latency=...,loss=...,bandwidth=...") from None
    if not (sep and 1 <= lo <= hi <= 65535):
        raise ValueError(f"{text!r}: give PORT-PORT=latency=...,loss=...,bandwidth=... (ports 1 to 65535)")
    return lo, hi, parse_shape(shape)


def describe(shape: LinkShape) -> dict[str, Any]:
    """The shape as ``info`` and reports show it."""
    return {"latency": shape.latency, "jitter": shape.jitter, "loss": shape.loss,
            "bandwidth": shape.bandwidth}


# -- one direction ----------------------------------------------------------------------


class Pipe:
    """One direction of a shaped link: chunks in, chunks out to ``deliver``
    at their time, in order."""

    def __init__(self, clock: Any, shape: LinkShape, deliver: Callable[[bytes], None],
                 rng: random.Random, min_rto: float) -> None:
        self.clock = clock
        self.shape = shape
        self.deliver = deliver
        self.rng = rng
        self.rto = max(min_rto, 2 * (2 * shape.latency + 2 * shape.jitter))
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._call: Any = None
        #: when the last chunk has left (bandwidth), and is due (order)
        self._free = 0.0
        self._last_due = 0.0
        self._then: list[Callable[[], None]] = []

    @property
    def pending(self) -> int:
        return len(self._queue)

    def due(self, size: int, now: float) -> float:
        """When a chunk of ``size`` bytes written at ``now`` arrives."""
        s = self.shape
        left = now
        if s.bandwidth:
            left = max(now, self._free) + size / s.bandwidth
            self._free = left
        delay = s.latency
        if s.jitter:
            delay = max(0.0, delay + self.rng.uniform(-s.jitter, s.jitter))
        if s.loss:
            late = 0.0
            for _ in range(max(1, math.ceil(size / SEGMENT))):
                extra, rto = 0.0, self.rto
                while self.rng.random() < s.loss and extra < MAX_DELAY:
                    extra += rto
                    rto *= 2
                late = max(late, extra)
            delay += late
        due = max(left + delay, self._last_due)
        self._last_due = due
        return due

    def send(self, data: bytes) -> None:
        now = self.clock.seconds()
        self._queue.append((self.due(len(data), now), data))
        self._schedule(now)

    def then(self, call: Callable[[], None]) -> None:
        """``call()`` once every chunk sent so far is delivered."""
        if not self._queue:
            call()
        else:
            self._then.append(call)

    def stop(self) -> None:
        """Drop what is in flight (the connection is gone)."""
        self._queue.clear()
        self._then.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, now: float) -> None:
        if self._call is None and self._queue:
            self._call = self.clock.callLater(max(0.0, self._queue[0][0] - now), self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        while self._queue and self._queue[0][0] <= now:
            self.deliver(self._queue.popleft()[1])
        if self._queue:
            self._schedule(now)
        else:
            then, self._then = self._then, []
            for call in then:
                call()


# -- the connection ---------------------------------------------------------------------


class ShapedProtocol(ProtocolWrapper):
    """The wrapped protocol's transport, delayed both ways."""

    def makeConnection(self, transport: Any) -> None:
        f = self.factory
        self.outgoing = Pipe(f.clock, f.shape, transport.write, f.rng, f.min_rto)
        self.incoming = Pipe(f.clock, f.shape, self._received, f.rng, f.min_rto)
        self._lost = False
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        if data and not self._lost:
            self.outgoing.send(bytes(data))

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        # After what was written: a close frame must not overtake the data.
        self.disconnecting = 1
        self.outgoing.then(self.transport.loseConnection)

    def abortConnection(self) -> None:
        self.outgoing.stop()
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.incoming.send(data)

    def _received(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self._lost = True
        self.outgoing.stop()
        # What arrived before the end is delivered before it.
        self.incoming.then(lambda: ProtocolWrapper.connectionLost(self, reason))


class ShapedFactory(WrappingFactory):
    protocol = ShapedProtocol
    # One is made per dial: "Starting factory" lines would be most of a
    # large devnet's log.
    noisy = False

    def __init__(self, wrapped: Any, clock: Any, shape: LinkShape, rng: random.Random,
                 min_rto: float) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.shape = shape
        self.rng = rng
        self.min_rto = min_rto


class ShapedEndpoint:
    """A client endpoint whose connections are shaped; ``connect`` fires
    with the wrapped protocol, as the endpoint it wraps would."""

    def __init__(self, endpoint: Any, clock: Any, shape: LinkShape, rng: random.Random,
                 min_rto: float) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.shape = shape
        self.rng = rng
        self.min_rto = min_rto

    def connect(self, factory: Any) -> Deferred:
        wrapper = ShapedFactory(factory, self.clock, self.shape, self.rng, self.min_rto)
        return self.endpoint.connect(wrapper).addCallback(lambda p: p.wrappedProtocol)


def wrap_endpoint(endpoint: Any, config: LinkConfig | None, port: int, clock: Any,
                  rng: random.Random) -> Any:
    """``endpoint`` (a dial to a peer on ``port``), shaped as ``config``
    says, or as it is when the link has no shape."""
    shape = None if config is None else config.shape_for(port)
    if shape is None or shape.is_plain():
        return endpoint
    return ShapedEndpoint(endpoint, clock, shape, rng, config.min_rto)
