"""The node's one HTTP port: ``/`` page, ``/ws`` WebSocket, ``/healthz``,
``/metrics`` and the page's static files.

Two guards stand in front of every path (PROTOCOL.md "Who may do what"):

- *Browsers.* A ``Host`` that names neither an address of the node, nor
  ``localhost``, nor an ``--allowed-host`` gets 403 on every path, so a page
  whose name was rebound to the node's address (DNS rebinding) reads and
  does nothing. An upgrade to ``/ws`` with an ``Origin`` other than the
  node's own page (or an ``--allowed-origin``) gets 403, so a page on another
  site cannot drive the node through its visitor's browser. Requests without
  ``Origin`` (scripts, other nodes) are served.
- *Slow clients.* Each HTTP request must arrive whole within a deadline that
  its bytes do not extend, and connections not yet upgraded to WebSocket are
  capped per client address and in all, so a slowloris cannot use up the
  node's file descriptors.
"""

from __future__ import annotations

import html
import ipaddress
import math
import re
from collections import Counter
from importlib import resources
from typing import Any, Union

import attrs
import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.web import pages
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from foxnode import address, limits, logs
from foxnode.config import WebConfig
from foxnode.node import Node, is_trusted_host
from foxnode.protocol import FoxServerFactory

STATIC = resources.files("foxnode") / "static"
log = logs.logger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
#: A host as names compare: a lower-case name without its trailing dot, or
#: an IP address (an IPv4-mapped IPv6 address counts as its IPv4 address).
HostKey = Union[str, IPAddress]

DEFAULT_PORTS = {"http": 80, "https": 443}
#: What a Host header (or an origin's authority) may be: a name or dotted
#: address, or a bracketed IPv6 address, and an optional port. No user
#: info, no spaces, no percent-escapes, no IPv6 zone: anything else is junk.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::([0-9]{1,5}))?")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def host_key(host: str) -> HostKey | None:
    """The one spelling of a host name or IP address (an IPv6 address
    bracketed or not) that hosts compare by; None for what is neither."""
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif host.endswith("."):
        # "localhost." is localhost: DNS names end in an implied dot.
        host = host[:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if bracketed and ip.version != 6:
            return None
        return getattr(ip, "ipv4_mapped", None) or ip
    name = host.lower()
    return name if not bracketed and _NAME.fullmatch(name) else None


def split_authority(text: str) -> tuple[HostKey, int | None] | None:
    """``(host, port or None)`` of a Host header's value; None for junk."""
    m = _AUTHORITY.fullmatch(text)
    if m is None:
        return None
    key = host_key(m[1])
    if key is None:
        return None
    port = None if m[2] is None else int(m[2])
    if port is not None and not 1 <= port <= 65535:
        return None
    return key, port


@attrs.frozen
class Origin:
    """A web origin (RFC 6454): scheme, host and port, the port filled in
    for http and https."""

    scheme: str
    host: HostKey
    port: int | None

    @classmethod
    def parse(cls, text: str) -> "Origin | None":
        m = _ORIGIN.fullmatch(text)
        if m is None:
            return None
        authority = split_authority(m[2])
        if authority is None:
            return None
        scheme = m[1].lower()
        host, port = authority
        return cls(scheme, host, DEFAULT_PORTS.get(scheme) if port is None else port)


class _QuietLog:
    """One line per kind of refusal every ``every`` seconds: a flood of
    refusals is counted in the next line, not copied into the log."""

    def __init__(self, clock: Any, every: float = 10.0) -> None:
        self._clock = clock
        self._every = every
        self._last: dict[str, float] = {}
        self._unsaid: Counter[str] = Counter()

    def info(self, kind: str, text: str, **fields: Any) -> None:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < self._every:
            self._unsaid[kind] += 1
            return
        self._last[kind] = now
        unsaid = self._unsaid.pop(kind, 0)
        if unsaid:
            text += " ({unsaid} more like it in the last {every:g} s)"
        log.info(text, unsaid=unsaid, every=self._every, **fields)


class BrowserPolicy:
    """Which ``Host`` and ``Origin`` headers the node serves."""

    def __init__(self, node: Node, config: WebConfig) -> None:
        self.config = config
        names: set[HostKey] = {"localhost", *config.allowed_hosts}
        if node.config.advertise:
            advertised = host_key(address.parse(node.config.advertise).host)
            if advertised is not None:
                names.add(advertised)
        self._names = frozenset(names)

    def host_refusal(self, request: Any) -> tuple[str | None, tuple[HostKey, int | None] | None]:
        """``(why not, None)`` for a request whose Host is not the node's,
        else ``(None, (host, port))``."""
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if not values:
            return "A Host header is required.", None
        if len(values) > 1:
            return "Give one Host header, not several.", None
        text = values[0].decode("latin-1")
        authority = split_authority(text) if text.isascii() else None
        if authority is None:
            return f"Host {_shown(text)} is not a host name or address.", None
        key = authority[0]
        if key in self._names or key == _local_address(request):
            return None, authority
        return (f"Host {_shown(text)} does not name this node "
                "(its addresses, localhost, --allowed-host)."), None

    def origin_refusal(self, request: Any, authority: tuple[HostKey, int | None] | None = None) -> str | None:
        """Why a ``/ws`` request's Origin may not open a WebSocket; None if
        it may. Old drafts of the protocol sent ``Sec-WebSocket-Origin``
        instead: every origin a request names must pass."""
        headers = request.requestHeaders
        given = (headers.getRawHeaders(b"origin") or []) + (headers.getRawHeaders(b"sec-websocket-origin") or [])
        if not given or self.config.any_origin:
            return None
        if authority is None:
            refusal, authority = self.host_refusal(request)
            if refusal is not None:
                return refusal
        for raw in given:
            text = raw.decode("latin-1")
            origin = Origin.parse(text) if text.isascii() else None
            if origin is None or not self._origin_allowed(origin, authority):
                return (f"Origin {_shown(text)} is not this node's page "
                        "(nor an --allowed-origin): a page on another site may not use it.")
        return None

    def _origin_allowed(self, origin: Origin, authority: tuple[HostKey, int | None]) -> bool:
        if origin in self.config.allowed_origins:
            return True
        # The node's own page: served from the very Host this request names.
        host, port = authority
        if origin.scheme not in DEFAULT_PORTS or origin.host != host:
            return False
        return origin.port == (DEFAULT_PORTS[origin.scheme] if port is None else port)


def _local_address(request: Any) -> HostKey | None:
    """The node's address this request came in on."""
    host = getattr(request.getHost(), "host", None)
    return host_key(host) if isinstance(host, str) else None


def _shown(text: str) -> str:
    return orjson.dumps(text[:100]).decode()


def _refusal_body(status: int, reason: str) -> bytes:
    # As a WebSocket reply is shaped, so that scripts read both alike.
    return orjson.dumps({"status": status, "error": reason, "response": None})


class Refusal(Resource):
    """Answers any method with ``status`` and a JSON body saying why."""

    isLeaf = True

    def __init__(self, status: int, reason: str) -> None:
        super().__init__()
        self.status = status
        self.reason = reason

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return _refusal_body(self.status, self.reason)


# -- slow clients -----------------------------------------------------------------------

class HTTPGate:
    """Counts HTTP connections not yet upgraded to WebSocket, per client
    address and in all."""

    def __init__(self, config: WebConfig, trusted: tuple) -> None:
        self.config = config
        self.trusted = trusted
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    @staticmethod
    def client_key(host: str) -> str:
        return limits.client_key(host)

    def admit(self, host: str) -> tuple[str | None, str | None]:
        """``(why not, None)``, or ``(None, key)`` having counted the
        connection; ``key`` (None for the operator) is what ``release`` takes."""
        if self.total >= self.config.max_http:
            return f"too many HTTP connections (--max-http {self.config.max_http})", None
        key = None if is_trusted_host(host, self.trusted) else self.client_key(host)
        if key is not None:
            if self.per_ip[key] >= self.config.max_http_per_ip:
                return (f"too many HTTP connections from {key} "
                        f"(--max-http-per-ip {self.config.max_http_per_ip})"), None
            self.per_ip[key] += 1
        self.total += 1
        return None, key

    def release(self, key: str | None) -> None:
        self.total -= 1
        if key is not None:
            self.per_ip[key] -= 1
            if not self.per_ip[key]:
                del self.per_ip[key]


class NodeChannel(HTTPChannel):
    """An HTTP connection to the node, held to the gate's caps and to a
    deadline per request: from the connection's first byte (or the end of
    the previous response) to the last byte of the request, however slowly
    the bytes come. Twisted's own timeout restarts on every byte."""

    #: seconds a closing connection may take to flush before it is cut
    abort_after = 2.0
    _counted = False
    _gate_key: str | None = None
    _refused = False
    _deadline: Any = None
    _abort: Any = None

    def connectionMade(self) -> None:
        site = self.site
        peer = getattr(self.transport.getPeer(), "host", "?")
        refusal, self._gate_key = site.gate.admit(peer)
        if refusal is not None:
            self._refused = True
            site.quiet.info("cap", "refused an HTTP connection from {peer}: {why}", peer=peer, why=refusal)
            self.transport.write(_plain_response(503, "Service Unavailable", refusal))
            self.transport.loseConnection()
            return
        self._counted = True
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Armed before Twisted replays what a pipelining client sent ahead:
        # a whole next request disarms it at once.
        if self.persistent:
            self._arm()
        super().requestDone(request)

    def upgraded(self) -> None:
        """The connection became a WebSocket: Autobahn holds it from now on
        (its own handshake and ping timeouts), and it leaves the HTTP count."""
        self._disarm()
        self._leave_gate()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None
        self._leave_gate()
        super().connectionLost(reason)

    def _leave_gate(self) -> None:
        if self._counted:
            self._counted = False
            self.site.gate.release(self._gate_key)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(self.site.config.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        self.site.quiet.info("deadline", "closed an HTTP connection from {peer}: no whole request "
                             "within {timeout:g} s", peer=getattr(transport.getPeer(), "host", "?"),
                             timeout=self.site.config.request_timeout)
        self.loseConnection()
        # A client that reads nothing keeps unsent bytes in the buffer, and
        # the close waits for them: cut it after a moment.
        self._abort = self.callLater(self.abort_after, self._cut)

    def _cut(self) -> None:
        self._abort = None
        if self.transport is not None:
            self.transport.abortConnection()


def _plain_response(status: int, phrase: str, reason: str) -> bytes:
    body = _refusal_body(status, reason)
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


#: Bytes of a request body the node reads at most: it serves GETs, and
#: nothing it serves reads a body; without a bound, twisted.web spools any
#: body (chunked, or announced as large) to a temporary file on disk.
MAX_REQUEST_BODY = 64 * 1024


class NodeRequest(Request):
    """A request whose Host must name the node before anything is served,
    and whose body is bounded (``MAX_REQUEST_BODY``)."""

    _body_bytes = 0
    _body_refused = False

    def gotLength(self, length: int | None) -> None:
        # Always in memory: a chunked body (None) would go to a file.
        super().gotLength(0 if length is None else min(length, MAX_REQUEST_BODY))
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body(f"announced {length} bytes")

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_REQUEST_BODY:
            self._refuse_body(f"sent over {MAX_REQUEST_BODY} bytes")
            return
        super().handleContentChunk(data)

    def _refuse_body(self, why: str) -> None:
        self._body_refused = True
        transport = self.channel.transport
        self.channel.site.quiet.info("body", "refused HTTP request body from {peer}: {why}",
                                     peer=getattr(self.getClientAddress(), "host", "?"), why=why)
        body = orjson.dumps({"status": 413, "error": f"Request body too large: at most "
                                                     f"{MAX_REQUEST_BODY} bytes.", "response": None})
        transport.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()

    def process(self) -> None:
        if self._body_refused:
            return  # answered and closed when the body grew too large
        site = self.channel.site
        refusal, self.authority = site.policy.host_refusal(self)
        if refusal is None:
            super().process()
            return
        self.site = site
        site.quiet.info("host", "refused HTTP request from {peer}: {why}",
                        peer=getattr(self.getClientAddress(), "host", "?"), why=refusal)
        self.render(Refusal(403, refusal))


# -- the pages ------------------------------------------------------------------------

class NodeWebSocket(WebSocketResource):
    """``/ws``, refused to pages of other sites."""

    def __init__(self, factory: FoxServerFactory, policy: BrowserPolicy, quiet: _QuietLog) -> None:
        super().__init__(factory)
        self._policy = policy
        self._quiet = quiet

    def render(self, request: Any) -> Any:
        refusal = self._policy.origin_refusal(request, getattr(request, "authority", None))
        if refusal is not None:
            self._quiet.info("origin", "refused WebSocket from {peer}: {why}",
                             peer=getattr(request.getClientAddress(), "host", "?"), why=refusal)
            return Refusal(403, refusal).render(request)
        channel = request.channel
        result = super().render(request)
        if channel.transport is None and hasattr(channel, "upgraded"):
            channel.upgraded()  # Autobahn took the connection over
        return result


class NodePage(Resource):
    """The FOXCHAIN page of the lab, grown into a view of the node. The
    first paint is rendered here (readable without JavaScript); the script
    keeps it live over the node's own WebSocket."""

    isLeaf = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self.template = (STATIC / "index.html").read_text("utf-8")

    def render_GET(self, request: Any) -> bytes:
        node = self.node
        peers = "".join(
            f"<li><code>{html.escape(a)}</code></li>" for a in node.store.addresses()[:200]
        ) or "<li class=empty>none yet</li>"
        page = (
            self.template
            .replace("{{node_id}}", html.escape(node.node_id))
            .replace("{{network}}", html.escape(node.config.network))
            .replace("{{version}}", html.escape(node.info()["version"]))
            .replace("{{peer_count}}", str(len(node.store)))
            .replace("{{peers}}", peers)
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return page.encode("utf-8")


class Health(Resource):
    isLeaf = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps(self.node.health())


class Root(Resource):
    def getChild(self, path: bytes, request: Any) -> Resource:
        return pages.notFound("No such page", "foxnode serves /, /ws, /healthz and /metrics.")


class NodeSite(Site):
    """The site with its guards: the gate counts its connections, the
    policy checks each request's Host (and Origin, at /ws)."""

    protocol = NodeChannel
    requestFactory = NodeRequest

    def __init__(self, root: Resource, node: Node, ws_factory: FoxServerFactory,
                 config: WebConfig) -> None:
        # Twisted's idle timeout stays as a second line behind the deadline.
        super().__init__(root, timeout=config.request_timeout, reactor=node.reactor)
        self.config = config
        self.policy = BrowserPolicy(node, config)
        self.gate = HTTPGate(config, node.config.trusted)
        self.quiet = _QuietLog(node.reactor.seconds)
        # Tests and tools reach the WebSocket factory through the site.
        self.ws_factory = ws_factory
        self.displayTracebacks = False
        self.noisy = False


def make_site(node: Node, ws_factory: FoxServerFactory, config: WebConfig | None = None) -> NodeSite:
    if config is None:
        config = WebConfig(request_timeout=node.config.handshake_timeout)
    root = Root()
    site = NodeSite(root, node, ws_factory, config)
    root.putChild(b"", NodePage(node))
    root.putChild(b"ws", NodeWebSocket(ws_factory, site.policy, site.quiet))
    root.putChild(b"healthz", Health(node))
    # Imported here: the module imports (so installs) the global reactor,
    # which an import of foxnode must leave to twistd's --reactor.
    from prometheus_client.twisted import MetricsResource

    root.putChild(b"metrics", MetricsResource(registry=node.metrics.registry))
    static = File(str(STATIC))
    static.indexNames = []
    root.putChild(b"static", static)
    return site
