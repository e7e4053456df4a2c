"""foxnode: the peer-to-peer node of foxchain, on Twisted and Autobahn."""

__version__ = "0.1.0"

#: Wire protocol version spoken in ``hello``; peers with another refuse.
#: 2: proofs bound to role, both nonces and both node ids (issue 11).
PROTOCOL_VERSION = 2
