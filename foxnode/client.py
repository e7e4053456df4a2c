"""A small client API over the client protocol: ``call`` one op, or
``connect`` and keep the connection for several calls and events.

    d = call(reactor, "ws://127.0.0.1:9000/ws", "peers")
    d.addCallback(lambda reply: print(reply.status, reply.response))
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS

from foxnode import address, codec
from foxnode.protocol import FoxClientFactory, FoxClientProtocol


#: The largest message a client reads by default: far above what a node
#: sends (its --max-message-size, 1 MiB by default), so that a client never
#: fails a connection on a reply its node was allowed to send.
#: Seconds a client waits to connect (and for a reply) unless told otherwise.
TIMEOUT = 10.0
CLIENT_MAX_MESSAGE = 64 << 20


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class TrustError(ValueError):
    """A CA file or directory that cannot be used; the message says why."""


@functools.lru_cache(maxsize=8)
def load_trust_root(cafile: str) -> Any:
    """The CA certificates of ``cafile``, a PEM file of one or more
    certificates or a directory of such files, as a Twisted trust root."""
    path = Path(cafile)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    certs = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise TrustError(f"{f}: {e.strerror}") from None
        for block in data.split(_PEM_MARKER)[1:]:
            try:
                certs.append(ssl.Certificate.loadPEM(_PEM_MARKER + block))
            except Exception as e:  # OpenSSL says little; which file matters
                raise TrustError(f"{f}: not a PEM certificate ({e})") from None
    if not certs:
        raise TrustError(f"{cafile}: no PEM certificate in it")
    return ssl.trustRootFromCertificates(certs)


_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def endpoint_for(reactor: Any, addr: address.PeerAddress, trust_roots: str | None = None,
                 timeout: float = TIMEOUT, bind_address: str | None = None) -> Any:
    """A client endpoint reaching ``addr``: TCP for ws://; for wss://, TLS
    verifying the server's certificate and host name against the system's
    trust store, or against the CA certificates of ``trust_roots``."""
    if not addr.secure:
        desc = f"tcp:{_escape(addr.host)}:{addr.port}:timeout={int(max(1, timeout))}"
        if bind_address:
            desc += f":bindAddress={_escape(bind_address)}"
        return clientFromString(reactor, desc)
    trust = load_trust_root(trust_roots) if trust_roots else None
    options = ssl.optionsForClientTLS(addr.host, trustRoot=trust)
    bind = (bind_address, 0) if bind_address else None
    return wrapClientTLS(options, HostnameEndpoint(reactor, addr.host, addr.port,
                                                   timeout=timeout, bindAddress=bind))


class Listener:
    """The handler of a plain client connection: it answers no ops and
    hands events (gossip deliveries) to ``on_event``."""

    def __init__(self, on_event: Callable[[codec.Event], None] | None = None) -> None:
        self.on_event = on_event

    def connection_opened(self, conn: FoxClientProtocol) -> None:
        pass

    def rate_refused(self, conn: FoxClientProtocol, bucket: Any) -> codec.Reply:
        return codec.too_many("Too many messages.")  # unused: a client sets no rate

    def event_refused(self, conn: FoxClientProtocol, bucket: Any) -> None:
        pass  # unused: a client sets no budget

    def message_refused(self, conn: FoxClientProtocol, reply: codec.Reply) -> None:
        pass

    def handle_request(self, conn: FoxClientProtocol, request: codec.Request) -> codec.Reply:
        return codec.not_found_op(request.op)

    def handle_event(self, conn: FoxClientProtocol, event: codec.Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def connection_lost(self, conn: FoxClientProtocol, code: int | None, reason: str | None) -> None:
        pass


def connect(reactor: Any, url: str, on_event: Callable[[codec.Event], None] | None = None,
            trust_roots: str | None = None, timeout: float = TIMEOUT,
            max_message_size: int = CLIENT_MAX_MESSAGE) -> Deferred:
    """Open a WebSocket connection; fires with the open ``FoxClientProtocol``
    (use ``.request(op, args)`` and ``.close()`` on it). ``max_message_size``
    bounds what it reads, and what it sends."""
    addr = address.parse(url)
    factory = FoxClientFactory(url, Listener(on_event), reactor, open_timeout=timeout,
                               max_message_size=max_message_size)
    d = endpoint_for(reactor, addr, trust_roots, timeout).connect(factory)
    d.addCallback(lambda proto: proto.when_opened())
    return d


def call(reactor: Any, url: str, op: str, args: Any = None, timeout: float = TIMEOUT,
         trust_roots: str | None = None, max_message_size: int = CLIENT_MAX_MESSAGE) -> Deferred:
    """Connect, send one request, close; fires with the ``codec.Reply``."""
    d = connect(reactor, url, trust_roots=trust_roots, timeout=timeout,
                max_message_size=max_message_size)

    def send(proto: FoxClientProtocol) -> Deferred:
        r = proto.request(op, args, timeout=timeout)

        def done(result: Any) -> Any:
            proto.close()
            return proto.when_closed().addCallback(lambda _: result)

        return r.addBoth(done)

    return d.addCallback(send)
