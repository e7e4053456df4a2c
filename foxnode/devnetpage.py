"""The devnet's live page: the whole network in a browser, served by the
``foxnode devnet`` process on loopback (``--page-port``).

    GET  /           the page (static/devnet.html, devnet.js; its worker, which
                     reads /events and lays out, devnet-worker.js; the drawing
                     static/network.js)
    GET  /state      JSON: every node (up or down, its id), every live peer
                     link, the last few messages and when each node got them
    GET  /events     the same as Server-Sent Events: ``graph`` when a node or
                     link changed, ``spread`` when a message reached a node
    POST /publish    {"node": i} (or {} for a node at random): publish one
                     message on the page's topic there; 202 {"id", "node"}

What the page shows comes from what the devnet already does: the nodes and
links from the ``info`` its watcher polls, the receive times from the one
connection it keeps to each node, subscribed to ``TOPIC``. Everything is
bounded: the last ``KEEP`` messages, ``MAX_STREAMS`` open streams, bodies of
``MAX_BODY`` bytes; a bad request gets a 4xx in JSON, never a traceback.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from importlib import resources
from typing import Any

import attrs
import orjson
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from foxnode import logs
from foxnode.launch import LOOPBACK

STATIC = resources.files("foxnode") / "static"
log = logs.logger(__name__)

#: The topic the page publishes on, and the devnet's connections subscribe to.
TOPIC = "devnet-page"
#: Messages whose receive times are kept (the oldest is forgotten).
KEEP = 5
#: Open event streams at once; more get 503.
MAX_STREAMS = 8
#: The largest request body read.
MAX_BODY = 4096
#: Seconds between two looks for a change to push to the streams: a
#: spreading message is shown in steps of this, and a thousand receive
#: times cost one event, not a thousand.
PUSH_EVERY = 0.25
#: Seconds between two comments on an idle stream, so that a browser or
#: proxy does not take it for dead.
KEEPALIVE = 15.0


@attrs.define
class Spread:
    """One message on ``TOPIC``: where and when it was published (None until
    the publish's reply, which may come after the first deliveries), and
    when each node first got it (reactor seconds)."""

    id: str
    origin: int | None = None
    sent: float | None = None
    got: dict[int, float] = attrs.Factory(dict)

    def as_dict(self) -> dict[str, Any]:
        start = self.sent if self.sent is not None else min(self.got.values(), default=0.0)
        return {"id": self.id, "origin": self.origin, "sent": self.sent,
                "got": {str(i): round(max(0.0, t - start), 4) for i, t in self.got.items()}}


class Spreads:
    """The last ``keep`` messages on ``TOPIC`` and each node's first receive
    time of each; fed by the devnet's connections' events."""

    def __init__(self, clock: Any, keep: int = KEEP) -> None:
        self.clock = clock
        self.keep = keep
        self.messages: OrderedDict[str, Spread] = OrderedDict()
        #: grows with every change, for the streams to notice
        self.version = 0

    def _get(self, mid: str) -> Spread:
        spread = self.messages.get(mid)
        if spread is None:
            spread = self.messages[mid] = Spread(mid)
            while len(self.messages) > self.keep:
                self.messages.popitem(last=False)
        return spread

    def published(self, mid: str, origin: int, sent: float) -> None:
        spread = self._get(mid)
        spread.origin, spread.sent = origin, sent
        self.version += 1

    def on_event(self, node: Any, event: Any) -> None:
        """An event on the devnet's connection to ``node`` (a DevNode)."""
        body = event.body if isinstance(event.body, dict) else {}
        if event.name != "message" or body.get("topic") != TOPIC or not isinstance(body.get("id"), str):
            return
        got = self._get(body["id"]).got
        if node.index not in got:
            got[node.index] = self.clock.seconds()
            self.version += 1

    def as_list(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.messages.values()]


@implementer(IPushProducer)
class _Stream:
    """One open event stream. Its transport pauses it when the reader falls
    behind (the send buffer is full): pushes skip it then, so a page that
    stops reading costs no more than that buffer, and on resuming it is
    sent the whole state at once."""

    def __init__(self, page: "DevnetPage", request: Any) -> None:
        self.page, self.request = page, request
        self.paused = self.stale = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.stale:
            self.stale = False
            self.request.write(self.page.everything())

    def stopProducing(self) -> None:
        self.paused = True


class PageError(Exception):
    """A request the page refuses: its status and a sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(request: Any, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(value)


def _error(request: Any, status: int, message: str) -> bytes:
    return _json(request, status, {"status": status, "error": message})


class DevnetPage:
    """The page's state and its streams, over one devnet (``foxnode.devnet.
    Devnet``, or anything with its ``nodes``, ``version``, ``reactor``)."""

    def __init__(self, net: Any, spreads: Spreads, rng: random.Random | None = None) -> None:
        self.net = net
        self.spreads = spreads
        self.rng = rng or random.Random()
        self.streams: list[Any] = []
        self._graph: tuple[int, bytes] | None = None
        self._pushed = (-1, -1)
        self._idle = 0.0
        self._pusher = LoopingCall(self._push)
        self._pusher.clock = net.reactor

    # -- what the page shows ---------------------------------------------

    def graph(self) -> dict[str, Any]:
        nodes = self.net.nodes
        links = sorted({(min(n.index, p), max(n.index, p)) for n in nodes if n.running() for p in n.peers
                        if p != n.index and nodes[p].running()})
        return {"version": self.net.version, "nodes": len(nodes),
                "up": [1 if n.running() else 0 for n in nodes],
                "ids": [n.node_id for n in nodes], "links": links}

    def graph_json(self) -> bytes:
        # A thousand nodes' links are some 100 KB: made once per change.
        if self._graph is None or self._graph[0] != self._version():
            self._graph = (self._version(), orjson.dumps(self.graph()))
        return self._graph[1]

    def _version(self) -> int:
        # Processes exit between the watcher's looks: their state counts too.
        return hash((self.net.version, tuple(n.running() for n in self.net.nodes)))

    def state(self) -> dict[str, Any]:
        return {**orjson.loads(self.graph_json()), "topic": TOPIC, "messages": self.spreads.as_list()}

    # -- publishing ------------------------------------------------------

    def choose(self, body: bytes) -> Any:
        """The node a publish request names (or one at random); PageError
        when the body is wrong or the node cannot publish."""
        try:
            args = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            raise PageError(400, f"the body is not JSON: {e}") from None
        if not isinstance(args, dict):
            raise PageError(400, 'the body must be a JSON object, e.g. {"node": 0}')
        unknown = set(args) - {"node"}
        if unknown:
            raise PageError(400, f"unknown field(s): {', '.join(sorted(map(str, unknown)))}; only \"node\"")
        nodes = self.net.nodes
        index = args.get("node")
        if index is None:
            ready = [n for n in nodes if n.running() and n.conn is not None]
            if not ready:
                raise PageError(409, "no node is up to publish")
            return self.rng.choice(ready)
        if not isinstance(index, int) or isinstance(index, bool):
            raise PageError(400, '"node" must be a node number')
        if not 0 <= index < len(nodes):
            raise PageError(404, f"no node-{index} in this devnet (node-0..node-{len(nodes) - 1})")
        node = nodes[index]
        if not node.running() or node.conn is None:
            raise PageError(409, f"{node.name} is down")
        return node

    async def publish(self, node: Any) -> dict[str, Any]:
        sent = self.net.reactor.seconds()
        try:
            reply = await node.conn.request("publish", {"topic": TOPIC, "payload": {"from": "devnet page",
                                                                                     "node": node.index}},
                                            timeout=10)
        except Exception as e:
            raise PageError(502, f"{node.name} did not answer: {e}") from None
        if not reply.ok() or not isinstance(reply.response, dict):
            raise PageError(502, f"{node.name} refused: {reply.error}")
        mid = str(reply.response.get("id"))
        self.spreads.published(mid, node.index, sent)
        return {"id": mid, "node": node.index, "topic": TOPIC}

    # -- the streams -----------------------------------------------------

    def open_stream(self, request: Any) -> bool:
        if len(self.streams) >= MAX_STREAMS:
            return False
        stream = _Stream(self, request)
        self.streams.append(stream)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: self._closed(stream))
        request.write(b"retry: 2000\n\n" + self.everything())
        if not self._pusher.running:
            # What the first stream was just sent is what was pushed.
            self._pushed = (self._version(), self.spreads.version)
            self._pusher.start(PUSH_EVERY, now=False)
        return True

    def everything(self) -> bytes:
        """The graph and the spreads, as a stream's first events."""
        return self._event(b"graph", self.graph_json()) + self._event(b"spread", orjson.dumps(self.spreads.as_list()))

    def _closed(self, stream: _Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams and self._pusher.running:
            self._pusher.stop()

    @staticmethod
    def _event(name: bytes, data: bytes) -> bytes:
        return b"event: " + name + b"\ndata: " + data + b"\n\n"

    def _push(self) -> None:
        """Send what changed since the last push to every stream."""
        now = (self._version(), self.spreads.version)
        out = b""
        if now[0] != self._pushed[0]:
            out += self._event(b"graph", self.graph_json())
        if now[1] != self._pushed[1]:
            out += self._event(b"spread", orjson.dumps(self.spreads.as_list()))
        self._pushed = now
        self._idle = 0.0 if out else self._idle + PUSH_EVERY
        if not out and self._idle >= KEEPALIVE:
            out, self._idle = b": keepalive\n\n", 0.0
        if out:
            for stream in list(self.streams):
                if stream.paused:
                    stream.stale = True
                else:
                    stream.request.write(out)

    def close(self) -> None:
        for stream in list(self.streams):
            stream.request.unregisterProducer()
            stream.request.finish()
        if self._pusher.running:
            self._pusher.stop()


# -- twisted.web ------------------------------------------------------------------


class PageRequest(Request):
    """A request whose body is bounded (``MAX_BODY``) and whose Host must
    name loopback, so that a page whose name was rebound to 127.0.0.1 (DNS
    rebinding) cannot publish through the devnet."""

    too_large = False

    def gotLength(self, length: int | None) -> None:
        # Always in memory: a chunked body (None) would go to a file.
        super().gotLength(0 if length is None else min(length, MAX_BODY))
        if length is not None and length > MAX_BODY:
            self.too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large or self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        host = (self.getHeader(b"host") or b"").decode("latin-1").rsplit(":", 1)[0].strip("[]").lower()
        if host not in (LOOPBACK, "localhost", "::1") and not host.startswith("127."):
            self.site = self.channel.site
            self.setResponseCode(403)
            self.setHeader(b"content-type", b"application/json")
            self.write(orjson.dumps({"status": 403, "error": "the devnet page answers on loopback "
                                                             "names only (Host)"}))
            self.finish()
            return
        super().process()


class _Leaf(Resource):
    isLeaf = True
    #: methods this path answers; any other gets 405
    allowed: tuple[bytes, ...] = (b"GET", b"HEAD")

    def __init__(self, page: DevnetPage) -> None:
        super().__init__()
        self.page = page

    def render(self, request: Any) -> Any:
        if request.postpath not in ([], [b""]):
            return _error(request, 404, "no such path")
        if request.method not in self.allowed:
            request.setHeader(b"allow", b", ".join(self.allowed))
            return _error(request, 405, f"{request.method.decode('latin-1')} is not allowed here; "
                                        f"use {', '.join(m.decode() for m in self.allowed)}")
        if getattr(request, "too_large", False):
            return _error(request, 413, f"the body is too large: at most {MAX_BODY} bytes")
        return self.answer(request)

    def answer(self, request: Any) -> Any:
        raise NotImplementedError


class _Static(_Leaf):
    def __init__(self, page: DevnetPage, name: str, kind: bytes) -> None:
        super().__init__(page)
        self.name, self.kind = name, kind

    def answer(self, request: Any) -> bytes:
        request.setHeader(b"content-type", self.kind)
        request.setHeader(b"cache-control", b"no-cache")
        return (STATIC / self.name).read_bytes()


class _State(_Leaf):
    def answer(self, request: Any) -> bytes:
        return _json(request, 200, self.page.state())


class _Events(_Leaf):
    allowed = (b"GET",)

    def answer(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        if not self.page.open_stream(request):
            return _error(request, 503, f"at most {MAX_STREAMS} open streams; close a page")
        return NOT_DONE_YET


class _Publish(_Leaf):
    allowed = (b"POST",)

    def answer(self, request: Any) -> Any:
        try:
            node = self.page.choose(request.content.read())
        except PageError as e:
            return _error(request, e.status, e.message)

        def done(result: Any) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            if isinstance(result, dict):
                body = _json(request, 202, result)
            elif isinstance(result.value, PageError):
                body = _error(request, result.value.status, result.value.message)
            else:
                log.failure("publish through the devnet page failed", result)
                body = _error(request, 500, f"internal error: {type(result.value).__name__}")
            request.write(body)
            request.finish()

        ensureDeferred(self.page.publish(node)).addBoth(done)
        return NOT_DONE_YET


class _Root(Resource):
    def __init__(self, page: DevnetPage) -> None:
        super().__init__()
        self.children_by_name = {
            b"": _Static(page, "devnet.html", b"text/html; charset=utf-8"),
            b"network.js": _Static(page, "network.js", b"text/javascript; charset=utf-8"),
            b"devnet.js": _Static(page, "devnet.js", b"text/javascript; charset=utf-8"),
            b"devnet-worker.js": _Static(page, "devnet-worker.js", b"text/javascript; charset=utf-8"),
            b"state": _State(page), b"events": _Events(page), b"publish": _Publish(page),
        }
        self.missing = _Missing(page)

    def getChild(self, path: bytes, request: Any) -> Resource:
        return self.children_by_name.get(path, self.missing)


class _Missing(_Leaf):
    allowed = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")

    def render(self, request: Any) -> bytes:
        return _error(request, 404, "no such path; the page is at /")


def make_site(page: DevnetPage) -> Site:
    site = Site(_Root(page))
    site.requestFactory = PageRequest
    site.displayTracebacks = False
    site.noisy = False
    return site


def listen(reactor: Any, page: DevnetPage, port: int) -> Any:
    """Serve the page on 127.0.0.1:``port`` (0: a free port); fires with the
    listening port."""
    return serverFromString(reactor, f"tcp:{port}:interface={LOOPBACK}").listen(make_site(page))
