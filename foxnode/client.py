"""A small client API over the client protocol: ``call`` one op, or
``connect`` and keep the connection for several calls and events.

    d = call(reactor, "ws://127.0.0.1:9000/ws", "peers")
    d.addCallback(lambda reply: print(reply.status, reply.response))
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString

from foxnode import address, codec
from foxnode.protocol import FoxClientFactory, FoxClientProtocol


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def endpoint_for(reactor: Any, addr: address.PeerAddress, trust_roots: str | None = None,
                 timeout: float = 10.0, bind_address: str | None = None) -> Any:
    """A client endpoint reaching ``addr``: TCP for ws://, TLS verifying the
    server's certificate (system trust, or the PEM file ``trust_roots``)
    for wss://."""
    host = _escape(addr.host)
    desc = f"tcp:{host}:{addr.port}:timeout={int(max(1, timeout))}"
    if addr.secure:
        desc = f"tls:{host}:{addr.port}:timeout={int(max(1, timeout))}"
        if trust_roots:
            desc += f":trustRoots={_escape(trust_roots)}"
    if bind_address:
        desc += f":bindAddress={_escape(bind_address)}"
    return clientFromString(reactor, desc)


class _Client:
    """The handler of a plain client connection: it answers no ops and
    hands events (gossip deliveries) to ``on_event``."""

    def __init__(self, on_event: Callable[[codec.Event], None] | None) -> None:
        self.on_event = on_event

    def connection_opened(self, conn: FoxClientProtocol) -> None:
        pass

    def handle_request(self, conn: FoxClientProtocol, request: codec.Request) -> codec.Reply:
        return codec.not_found_op(request.op)

    def handle_event(self, conn: FoxClientProtocol, event: codec.Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def connection_lost(self, conn: FoxClientProtocol, code: int | None, reason: str | None) -> None:
        pass


def connect(reactor: Any, url: str, on_event: Callable[[codec.Event], None] | None = None,
            trust_roots: str | None = None, timeout: float = 10.0,
            max_message_size: int = 1 << 20) -> Deferred:
    """Open a WebSocket connection; fires with the open ``FoxClientProtocol``
    (use ``.request(op, args)`` and ``.close()`` on it)."""
    addr = address.parse(url)
    factory = FoxClientFactory(url, _Client(on_event), reactor, open_timeout=timeout,
                               max_message_size=max_message_size)
    d = endpoint_for(reactor, addr, trust_roots, timeout).connect(factory)
    d.addCallback(lambda proto: proto.when_opened())
    return d


def call(reactor: Any, url: str, op: str, args: Any = None, timeout: float = 10.0,
         trust_roots: str | None = None) -> Deferred:
    """Connect, send one request, close; fires with the ``codec.Reply``."""
    d = connect(reactor, url, trust_roots=trust_roots, timeout=timeout)

    def send(proto: FoxClientProtocol) -> Deferred:
        r = proto.request(op, args, timeout=timeout)

        def done(result: Any) -> Any:
            proto.close()
            return proto.when_closed().addCallback(lambda _: result)

        return r.addBoth(done)

    return d.addCallback(send)
