"""The node's one HTTP port: ``/`` page, ``/ws`` WebSocket, ``/healthz``,
``/metrics`` and the page's static files."""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

import orjson
from autobahn.twisted.resource import WebSocketResource
from prometheus_client.twisted import MetricsResource
from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from foxnode.node import Node
from foxnode.protocol import FoxServerFactory

STATIC = resources.files("foxnode") / "static"


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


def make_site(node: Node, ws_factory: FoxServerFactory) -> Site:
    root = Root()
    root.putChild(b"", NodePage(node))
    root.putChild(b"ws", WebSocketResource(ws_factory))
    root.putChild(b"healthz", Health(node))
    root.putChild(b"metrics", MetricsResource(registry=node.metrics.registry))
    static = File(str(STATIC))
    static.indexNames = []
    root.putChild(b"static", static)
    # A connection that has not finished its HTTP request (or WebSocket
    # upgrade) by then is closed, instead of Twisted's default of 12 hours.
    site = Site(root, timeout=node.config.handshake_timeout)
    site.displayTracebacks = False
    site.noisy = False
    # Tests and tools reach the WebSocket factory through the site.
    site.ws_factory = ws_factory
    return site
