"""foxnode: the peer-to-peer node of foxchain, on Twisted and Autobahn."""

__version__ = "0.1.0"

#: Wire protocol version spoken in ``hello``; peers with another refuse.
#: 2: proofs bound to role, both nonces and both node ids (issue 11).
#: 3: a sealed content's associated data is its envelope (origin, topic,
#: times), and a signature covers its envelope and reader (content version
#: 2): a node of protocol 2 could neither open nor check what one of 3
#: sends, and would drop it without a word, so the two do not peer.
PROTOCOL_VERSION = 3
