"""The floor of foxnode's stack: a bare Autobahn/Twisted WebSocket server.

A ``WebSocketServerFactory`` behind a twisted.web ``Site`` at ``/ws`` (the
way foxnode serves it), whose protocol answers every message with one fixed,
small reply the size of a ``time`` reply. No JSON, no codec, no node: what
is left is Twisted's reactor, twisted.web's upgrade path and Autobahn's
framing, which is the least foxnode can cost per message.

Run: ``python bench/bare.py --port 9000`` (binds 127.0.0.1 only).
"""
from __future__ import annotations

import argparse
import sys

REPLY = b'{"status":200,"error":"OK","response":{"time":1700000000.123456,"time_zone":"UTC"}}'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--port", type=int, default=9000)
    args = parser.parse_args(argv)

    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class FixedReply(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(REPLY, isBinary=False)

    factory = WebSocketServerFactory()
    factory.protocol = FixedReply
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    site = Site(root)
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    print(f"bare: listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
