"""foxnode: the peer-to-peer node of foxchain, on Twisted and Autobahn."""

__version__ = "0.1.0"

#: Wire protocol version spoken in ``hello``; peers with another major refuse.
PROTOCOL_VERSION = 1
