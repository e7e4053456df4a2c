"""The Autobahn WebSocket protocols, server and client.

They are thin: each frame goes through the codec and becomes a call on a
*handler* (the node, or a plain client); what the handler returns becomes a
frame. Both directions of every connection can carry requests, replies and
events, so a node that dialed a peer answers that peer's requests over the
same socket, exactly as the listening side does.

Replies leave in request order, even when a later request (``time``) is
answered before an earlier one (a ``register`` waiting for the disk).
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import Any, Protocol as TypingProtocol

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, fail
from twisted.python.failure import Failure

from foxnode import codec, logs
from foxnode import frames as _frames
from foxnode.config import HANDSHAKE_TIMEOUT, MAX_DEPTH, MAX_IN_FLIGHT, MAX_MESSAGE_SIZE, SEND_QUEUE, NodeConfig, default

NONCE_HEADER = "X-Foxnode-Nonce"
#: The listener's node id, beside its nonce: the dialer's proof names the
#: node it means to greet, so it cannot be relayed to another (peers.py).
NODE_ID_HEADER = "X-Foxnode-Node-Id"
_UNLIMITED = 1 << 62
INTERNAL_ERROR = codec.Reply(500, "Internal error; the node logged it.")

#: Close codes an application may send: 1000, or the private range
#: 4000-4999 for foxnode's reasons (Autobahn keeps 1001-1015 for itself).
CLOSE_NORMAL = 1000
CLOSE_SHUTDOWN = 4000
CLOSE_RATE_LIMIT = 4008
CLOSE_TOO_SLOW = 4009



class ConnectionHandler(TypingProtocol):
    """What a protocol calls; the node implements it, and so does a client."""

    def connection_opened(self, conn: "FoxConnection") -> None: ...

    def handle_request(self, conn: "FoxConnection", request: codec.Request) -> Any: ...

    def handle_event(self, conn: "FoxConnection", event: codec.Event) -> None: ...

    def rate_refused(self, conn: "FoxConnection", bucket: Any) -> codec.Reply: ...

    def event_refused(self, conn: "FoxConnection", bucket: Any) -> None: ...

    def message_refused(self, conn: "FoxConnection", reply: codec.Reply) -> None: ...

    def connection_lost(self, conn: "FoxConnection", code: int | None, reason: str | None) -> None: ...


class RequestFailed(Exception):
    """A request whose connection closed before its reply came."""


class FoxConnection:
    """The part the server and client protocols share (a mixin on top of
    Autobahn's protocol classes)."""

    _log = logs.logger(__name__)  # Autobahn owns ``.log``
    direction = "?"
    #: Shown in logs and ``info``; set by the node once a peer said hello.
    node_id: str | None = None
    #: The address other nodes dial to reach the remote (peers only).
    peer_addr: str | None = None
    #: The handler's rate limit for this connection (a TokenBucket), if any,
    #: while it is a client; and the budget of its requests and events once
    #: it said hello (a peer).
    rate_bucket: Any = None
    peer_bucket: Any = None
    #: Set by the node when the connection opens: it comes from the node's
    #: operator (``--trusted``).
    trusted: bool = False

    def _fox_init(self) -> None:
        self._pending: dict[str, Deferred] = {}
        self._next_request = 0
        self._replies: deque = deque()
        self._lost_reported = False
        self.fox_open = False
        self._open_waiters: list[Deferred] = []
        self._close_waiters: list[Deferred] = []
        self._closed_result: tuple | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: free-form per-connection state for the handler (rate limits, peer info)
        self.fox_state: dict[str, Any] = {}
        # Backpressure: the transport pauses us when its buffer is full; until
        # it resumes, frames wait here, up to ``send_queue`` bytes.
        self._paused = False
        self._backlog: deque = deque()
        self._backlog_bytes = 0
        self.dropped = 0
        # Requests in flight: at ``factory.max_in_flight`` replies not yet
        # sent, the socket is not read (what was read waits, unparsed, in
        # Autobahn's buffer) until half of them are out.
        self._reading_held = False
        self._release_call: Any = None

    def _become_producer(self) -> None:
        transport = self.transport
        if getattr(transport, "producer", None) is not None:
            # twisted.web's HTTPChannel stays registered after the WebSocket
            # takeover; the WebSocket protocol is the producer from now on.
            transport.unregisterProducer()
        try:
            transport.registerProducer(self, True)
        except RuntimeError:
            self._log.debug("no backpressure on {t}", t=transport)

    # IPushProducer, driven by the transport's write buffer.
    # Reading goes on while paused (TLS pauses its producer during the
    # handshake, which must read to finish): the backlog's bound is what
    # stops a reader that never reads, by dropping pushes or closing.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._backlog and not self._paused and self.can_send():
            frame = self._backlog.popleft()
            self._backlog_bytes -= len(frame)
            self._send_text(frame)

    def stopProducing(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

    # -- what the handler uses -------------------------------------------------

    @property
    def handler(self) -> ConnectionHandler:
        return self.factory.handler

    @property
    def remote_host(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    @property
    def remote_port(self) -> int:
        return getattr(self.transport.getPeer(), "port", 0)

    @property
    def local_host(self) -> str:
        return getattr(self.transport.getHost(), "host", "?")

    def describe(self) -> str:
        who = self.node_id[:12] if self.node_id else "client"
        return f"{who}@{self.remote_host}:{self.remote_port} ({self.direction})"

    def when_opened(self) -> Deferred:
        """Fires with this protocol once the WebSocket is open, or fails
        with ``RequestFailed`` if it closes before."""
        d: Deferred = Deferred()
        if self.fox_open:
            d.callback(self)
        elif self._closed_result is not None:
            d.errback(RequestFailed(f"connection closed before it opened ({self.close_code}: {self.close_reason})"))
        else:
            self._open_waiters.append(d)
        return d

    def when_closed(self) -> Deferred:
        """Fires with ``(was_open, code, reason)`` once the connection is gone."""
        d: Deferred = Deferred()
        if self._closed_result is not None:
            d.callback(self._closed_result)
        else:
            self._close_waiters.append(d)
        return d

    def request(self, op: str, args: Any = None, timeout: float | None = 30.0) -> Deferred:
        """Send a request; the Deferred fires with its ``codec.Reply``."""
        self._next_request += 1
        rid = f"r{self._next_request}"
        frame = codec.encode_request(op, args, rid)
        if len(frame) > self.send_limit:
            return fail(RequestFailed(f"request {op!r} of {len(frame)} bytes is over the "
                                      f"message size limit of {self.send_limit} bytes"))
        d: Deferred = Deferred()
        self._pending[rid] = d
        if timeout is not None:
            d.addTimeout(timeout, self.factory.reactor)
            d.addErrback(self._forget, rid)
        self.send_frame(frame)
        return d

    def _forget(self, failure: Failure, rid: str) -> Failure:
        self._pending.pop(rid, None)
        return failure

    def _send_text(self, payload: bytes) -> None:
        self.sendMessage(payload, isBinary=False)

    @property
    def send_limit(self) -> int:
        """The largest message this side sends: its own --max-message-size,
        which is also the default limit of the receiving side."""
        return self.maxMessagePayloadSize or _UNLIMITED

    def has_room(self) -> bool:
        """Whether a frame sent now goes out at once, not into the queue:
        paced senders (history replays, catch-up) wait otherwise."""
        return self.can_send() and not self._paused and not self._backlog

    def can_send(self) -> bool:
        # Autobahn's own state: a closing connection refuses new messages.
        return self.fox_open and self.state == self.STATE_OPEN

    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        """Send one message, or queue it while the reader is slow. A full
        queue drops a ``droppable`` frame (a push; counted in ``dropped``)
        and otherwise closes the connection: a reply must never be lost."""
        if not self.can_send():
            return False
        if len(frame) > self.send_limit:
            # The receiver would fail the connection (1009) on it. Replies
            # never get here (``_reply_frame`` turns them into an error).
            self.dropped += 1
            self._log.info("{conn}: not sent, a frame of {n} bytes is over the message size limit "
                           "({limit})", conn=self.describe(), n=len(frame), limit=self.send_limit)
            return False
        if not self._paused and not self._backlog:
            self._send_text(frame)
            return True
        if self._backlog_bytes + len(frame) > self.factory.send_queue:
            if droppable:
                self.dropped += 1
                return False
            self._log.info("{conn}: send queue full, closing", conn=self.describe())
            self.close(CLOSE_TOO_SLOW, "send queue full: read faster")
            return False
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        return True

    def close(self, code: int = CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close with a close frame; the reason is at most 123 bytes of UTF-8."""
        if reason is not None:
            reason = reason.encode("utf-8")[:123].decode("utf-8", "ignore")
        if self._reading_held and self._release_call is None:
            # The close handshake must be read, held requests or not.
            self._release_call = self.factory.reactor.callLater(0, self._release_reading)
        if self.can_send():
            self.sendClose(code, reason)
        elif not self.fox_open:
            self.dropConnection(abort=True)

    # -- Autobahn callbacks ------------------------------------------------------

    def onOpen(self) -> None:
        self.fox_open = True
        try:
            self.handler.connection_opened(self)
        except Exception:
            self._log.failure("connection_opened failed for {conn}", conn=self.describe())
            self.close(CLOSE_SHUTDOWN, "internal error")
            return
        if self.fox_open:
            waiters, self._open_waiters = self._open_waiters, []
            for d in waiters:
                d.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # A client's every message is charged, before the parse it costs,
        # to the rate the handler set (none for the node's operator). A
        # peer's are charged to its own budget once parsed, so that a
        # request can be told 429 and an event dropped.
        peer = self.node_id is not None
        if not peer:
            bucket = self.rate_bucket
            if bucket is not None and not bucket.take():
                self._queue_reply(self.handler.rate_refused(self, bucket), *codec.request_id_of(payload))
                return
        try:
            message = codec.decode(payload, self.factory.max_depth)
        except codec.CodecError as e:
            if peer and not self._peer_charge(None):
                return
            self.handler.message_refused(self, e.reply)
            if e.event is not None and not (self.direction == "in" and not peer):
                return  # a peer's push: no reply to a push
            if e.has_id is not None:
                has_id, rid = e.has_id, e.rid
            else:
                has_id, rid = (False, None) if e.reply is codec.PARSE_ERROR else codec.request_id_of(payload)
            self._queue_reply(e.reply, has_id, rid)
            return
        if peer and type(message) is not codec.Response and not self._peer_charge(message):
            return
        if type(message) is codec.Request:
            try:
                result = self.handler.handle_request(self, message)
            except Exception:
                self._log.failure("op {op} failed for {conn}", op=message.op, conn=self.describe())
                result = INTERNAL_ERROR
            if (type(result) is codec.Reply and not self._replies and not self._backlog
                    and not self._paused and self.state == self.STATE_OPEN):
                # The common case, taken without detours: an immediate
                # reply, nothing ahead of it, a reader keeping up.
                self._send_text(self._reply_frame(result, message.has_id, message.id))
                return
            self._queue_reply(result, message.has_id, message.id)
        elif self.direction == "in" and self.node_id is None:
            # A plain client sent a reply- or event-shaped body: the lab's
            # node answered any object without a string "op" like this.
            self.handler.message_refused(self, codec.BODY_ERROR)
            self._queue_reply(codec.BODY_ERROR, *codec.request_id_of(payload))
        elif isinstance(message, codec.Response):
            waiting = self._pending.pop(message.id, None) if isinstance(message.id, str) else None
            if waiting is not None:
                waiting.callback(message.reply)
            else:
                self._log.debug("{conn}: reply to no request ({id!r})", conn=self.describe(), id=message.id)
        else:
            try:
                self.handler.handle_event(self, message)
            except Exception:
                self._log.failure("event {event} failed for {conn}", event=message.name, conn=self.describe())

    def _peer_charge(self, message: Any) -> bool:
        """Charge one message of a peer to its budget; False: over it, and
        answered (a request: 429) or dropped (an event, a bad message)."""
        bucket = self.peer_bucket
        if bucket is None or bucket.take():
            return True
        if type(message) is codec.Request:
            self._queue_reply(self.handler.rate_refused(self, bucket), message.has_id, message.id)
        else:
            self.handler.event_refused(self, bucket)
        return False

    def _reply_frame(self, reply: codec.Reply, has_id: bool, rid: Any) -> bytes:
        """The frame of a reply, never over the limit the receiver has."""
        frame = codec.encode_reply(reply, has_id, rid)
        limit = self.send_limit
        if len(frame) <= limit:
            return frame
        self._log.info("{conn}: a reply of {n} bytes is over the message size limit ({limit})",
                       conn=self.describe(), n=len(frame), limit=limit)
        refusal = codec.Reply(413, f"Reply too large: {len(frame)} bytes, over the node's "
                                   f"--max-message-size of {limit} bytes.")
        frame = codec.encode_reply(refusal, has_id, rid)
        # An id of nearly the limit's size cannot come back either.
        return frame if len(frame) <= limit else codec.encode_reply(refusal)

    def _queue_reply(self, result: Any, has_id: bool, rid: Any) -> None:
        if not isinstance(result, Deferred) and not self._replies:
            self.send_frame(self._reply_frame(result, has_id, rid))
            return
        slot = [None]
        self._replies.append(slot)
        if len(self._replies) >= self.factory.max_in_flight:
            self._hold_reading()
        if isinstance(result, Deferred):
            result.addBoth(self._reply_ready, slot, has_id, rid)
        else:
            self._reply_ready(result, slot, has_id, rid)

    def _reply_ready(self, reply: Any, slot: list, has_id: bool, rid: Any) -> None:
        if isinstance(reply, Failure):
            self._log.failure("request failed for {conn}", reply, conn=self.describe())
            reply = INTERNAL_ERROR
        slot[0] = self._reply_frame(reply, has_id, rid)
        while self._replies and self._replies[0][0] is not None:
            self.send_frame(self._replies.popleft()[0])
        if (self._reading_held and self._release_call is None
                and len(self._replies) <= self.factory.max_in_flight // 2):
            # Later, not from inside the reply that may be running in onMessage.
            self._release_call = self.factory.reactor.callLater(0, self._release_reading)

    # -- backpressure on requests --------------------------------------------------

    def _hold_reading(self) -> None:
        if not self._reading_held:
            self._reading_held = True
            self.transport.pauseProducing()

    def _release_reading(self) -> None:
        call, self._release_call = self._release_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._reading_held:
            return
        self._reading_held = False
        if self.transport is None:
            return
        self.transport.resumeProducing()
        if self.data:
            # What was read before the hold, in the order it came.
            self.consumeData()

    def processData(self) -> bool:
        # Autobahn's frame loop: while requests are held, frames already
        # read stay in its buffer, unparsed.
        if self._reading_held and self.state == self.STATE_OPEN:
            return False
        return super().processData()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        was_open, self.fox_open = self.fox_open, False
        self.close_code = code
        self.close_reason = reason
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(RequestFailed(f"connection closed ({code}: {reason})"))
        self._replies.clear()
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        waiters, self._open_waiters = self._open_waiters, []
        for d in waiters:
            d.errback(RequestFailed(f"connection closed before it opened ({code}: {reason})"))
        if not self._lost_reported:
            self._lost_reported = True
            try:
                self.handler.connection_lost(self, code, reason)
            except Exception:
                self._log.failure("connection_lost failed for {conn}", conn=self.describe())
        self._closed_result = (was_open, code, reason)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(self._closed_result)


class FoxServerProtocol(FoxConnection, WebSocketServerProtocol):
    """The listening side, every frame read and written by Autobahn
    (``--frames autobahn``); ``FoxServerOwnFrames`` is the fast path."""

    direction = "in"

    def connectionMade(self) -> None:
        self._fox_init()
        self.handshake_nonce = os.urandom(16).hex()
        super().connectionMade()
        self._become_producer()

    def onConnect(self, request: Any) -> tuple[None, dict[str, str]]:
        refusal = self.handler.admit(self) if hasattr(self.handler, "admit") else None
        if refusal is not None:
            raise ConnectionDeny(503, refusal)
        # A fresh nonce in the upgrade response lets a dialing node prove
        # its identity in its very first message (see peers.py).
        headers = {NONCE_HEADER: self.handshake_nonce}
        node_id = getattr(self.handler, "node_id", None)
        if isinstance(node_id, str):
            headers[NODE_ID_HEADER] = node_id
        return None, headers


class FoxServerOwnFrames(_frames.OwnFrames, FoxServerProtocol):
    """The listening side with the node's own frame reader and writer
    (frames.py) for small whole text frames, Autobahn's for the rest
    (``--frames own``, the default)."""


class FoxClientProtocol(FoxConnection, WebSocketClientProtocol):
    direction = "out"
    server_nonce: str | None = None
    server_node_id: str | None = None

    def connectionMade(self) -> None:
        self._fox_init()
        super().connectionMade()
        self._become_producer()

    def onConnect(self, response: Any) -> None:
        self.server_nonce = response.headers.get(NONCE_HEADER.lower())
        self.server_node_id = response.headers.get(NODE_ID_HEADER.lower())


def _apply_options(factory: Any, max_message_size: int, ping_interval: float, ping_timeout: float,
                   open_timeout: float) -> None:
    factory.setProtocolOptions(
        maxFramePayloadSize=max_message_size,
        maxMessagePayloadSize=max_message_size,
        # Idle and half-open connections are found by pings, not by TCP.
        # Autobahn's timers fire on whole seconds, rounded down, so a pong
        # gets one second more than asked, never less.
        autoPingInterval=max(1, math.ceil(ping_interval)),
        autoPingTimeout=max(1, math.ceil(ping_timeout)) + 1,
        openHandshakeTimeout=open_timeout,
        closeHandshakeTimeout=2,
        # Always say why with a close frame (1007 for bad UTF-8, 1009 for
        # too big), rather than just dropping the TCP connection.
        failByDrop=False,
        utf8validateIncoming=True,
        tcpNoDelay=True,
    )


_PING_INTERVAL = default(NodeConfig, "ping_interval")
_PING_TIMEOUT = default(NodeConfig, "ping_timeout")


class FoxServerFactory(WebSocketServerFactory):
    protocol = FoxServerProtocol
    noisy = False

    def __init__(self, handler: ConnectionHandler, reactor: Any, *,
                 max_message_size: int = MAX_MESSAGE_SIZE, ping_interval: float = _PING_INTERVAL,
                 ping_timeout: float = _PING_TIMEOUT, open_timeout: float = HANDSHAKE_TIMEOUT,
                 send_queue: int = SEND_QUEUE, max_depth: int = MAX_DEPTH,
                 max_connections: int = 0, max_in_flight: int = MAX_IN_FLIGHT,
                 frames: str = _frames.OWN) -> None:
        super().__init__(reactor=reactor)
        #: The frame path this factory's connections take (``--frames``):
        #: ``own`` only where this Autobahn has what frames.py needs.
        self.frames = _frames.effective(frames)
        self.protocol = FoxServerOwnFrames if self.frames == _frames.OWN else FoxServerProtocol
        self.handler = handler
        self.reactor = reactor
        self.send_queue = send_queue
        self.max_depth = max_depth
        self.max_in_flight = max_in_flight
        _apply_options(self, max_message_size, ping_interval, ping_timeout, open_timeout)
        self.setProtocolOptions(
            # Origins are checked before the upgrade reaches Autobahn (web.py,
            # --allowed-origin), so Autobahn lets every one through.
            allowedOrigins=["*"],
            allowNullOrigin=True,
            # No compression: a small compressed frame must not inflate to megabytes.
            perMessageCompressionAccept=lambda offers: None,
            # Autobahn answers 503 to WebSocket upgrades beyond this many.
            maxConnections=max_connections,
        )


class FoxClientFactory(WebSocketClientFactory):
    protocol = FoxClientProtocol
    # One factory per dial: "Starting factory" lines would drown the log.
    noisy = False

    def __init__(self, url: str, handler: ConnectionHandler, reactor: Any, *,
                 max_message_size: int = MAX_MESSAGE_SIZE, ping_interval: float = _PING_INTERVAL,
                 ping_timeout: float = _PING_TIMEOUT, open_timeout: float = HANDSHAKE_TIMEOUT,
                 send_queue: int = SEND_QUEUE, max_depth: int = MAX_DEPTH,
                 headers: dict[str, str] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        super().__init__(url, reactor=reactor, headers=headers or {})
        self.handler = handler
        self.reactor = reactor
        self.send_queue = send_queue
        self.max_depth = max_depth
        self.max_in_flight = max_in_flight
        _apply_options(self, max_message_size, ping_interval, ping_timeout, open_timeout)


__all__ = [
    "ConnectionHandler", "FoxConnection", "FoxServerProtocol", "FoxServerOwnFrames", "FoxClientProtocol",
    "FoxServerFactory", "FoxClientFactory", "RequestFailed", "DeferredTimeout",
]
