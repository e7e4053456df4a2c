"""The ``hello`` handshake as pure functions: what each side sends, what it
signs, and how the other side's hello is checked. No sockets and no state:
the peer manager (peers.py) calls these with the values its connection saw,
and so do the test helpers that play a peer (testing.py), so both speak the
same handshake by construction.

The listening side puts a fresh nonce and its node id in the WebSocket
upgrade response (protocol.py). The dialer's ``hello`` carries its node id,
network, protocol version, listening port or advertised address, a fresh
nonce of its own, and its signature over ``hello_proof("dialer", ...)``; the
listener checks it and answers with its own id and its signature over the
same values with the role ``"listener"``. Each proof names the role, the
network, both nonces and both node ids, and each side checks the other's
with the values it saw itself (its own nonce, its own id), so a signature
taken from one connection proves nothing on another: not in the other role,
not to another node, not a second time. What no handshake without a secure
channel can stop is a full relay: a node in the middle that passes every
byte both ways is a proxy (TLS is the answer to that).
"""

from __future__ import annotations

import string
from typing import Any, Callable

import orjson

from foxnode import PROTOCOL_VERSION, __version__, address, codec, identity

# Machine-readable reasons a peer connection ends, with their close codes.
WRONG_NETWORK = "wrong-network"
INCOMPATIBLE_VERSION = "incompatible-version"
BAD_PROOF = "bad-proof"
SELF = "self"
DUPLICATE = "duplicate"
TOO_MANY_PEERS = "too-many-peers"
BAD_HELLO = "bad-hello"
#: a dial of a pinned address (``#<node id>``) met another node
WRONG_NODE = "wrong-node"
CLOSE_CODES = {
    WRONG_NETWORK: 4001,
    INCOMPATIBLE_VERSION: 4002,
    BAD_PROOF: 4003,
    SELF: 4004,
    DUPLICATE: 4005,
    TOO_MANY_PEERS: 4006,
    BAD_HELLO: 4007,
    WRONG_NODE: 4012,
}
CODE_OF_CLOSE = {v: k for k, v in CLOSE_CODES.items()}
#: the HTTP-like status of a refused hello, by reason (others: 403)
REFUSAL_STATUS = {TOO_MANY_PEERS: 503, BAD_HELLO: 400}

DIALER = "dialer"
LISTENER = "listener"
_HEX = frozenset(string.hexdigits)


class HandshakeRefused(Exception):
    def __init__(self, code: str, text: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.retry_after = retry_after

    def reason(self) -> dict[str, Any]:
        r: dict[str, Any] = {"code": self.code, "text": self.text}
        if self.retry_after is not None:
            r["retry_after"] = self.retry_after
        return r

    def reply(self) -> codec.Reply:
        return codec.Reply(REFUSAL_STATUS.get(self.code, 403), self.text, self.reason())


def hello_proof(role: str, network: str, listener_nonce: str, dialer_nonce: str,
                dialer_id: str, listener_id: str) -> bytes:
    """What the ``role`` side of one handshake signs: the role, the network,
    both sides' fresh nonces and both node ids. Encoded as a JSON list, so
    that no value can run into the next."""
    if role not in (DIALER, LISTENER):
        raise ValueError(f"role must be {DIALER!r} or {LISTENER!r}")
    return orjson.dumps(["foxnode-hello/2", role, network, listener_nonce, dialer_nonce,
                         dialer_id, listener_id])


def is_nonce(value: object) -> bool:
    """A handshake nonce: 16 to 128 hex digits."""
    return isinstance(value, str) and 16 <= len(value) <= 128 and _HEX.issuperset(value)


def hello_fields(node_id: str, network: str, *, advertise: str | None = None,
                 port: int | None = None, secure: bool = False) -> dict[str, Any]:
    """What either side says of itself in its hello (unsigned)."""
    args: dict[str, Any] = {
        "node_id": node_id,
        "network": network,
        "version": PROTOCOL_VERSION,
        "agent": f"foxnode/{__version__}",
    }
    if advertise:
        args["advertise"] = advertise
    if port is not None:
        args["port"] = port
        if secure:
            args["secure"] = True
    return args


def dialer_hello(signer: identity.Identity, network: str, listener_nonce: str, listener_id: str,
                 nonce: str, **fields: Any) -> dict[str, Any]:
    """The dialer's signed ``hello`` args, for the listener that sent
    ``listener_nonce`` and ``listener_id`` in its upgrade response."""
    args = hello_fields(signer.node_id, network, **fields)
    args["nonce"] = nonce
    args["signature"] = signer.sign(hello_proof(DIALER, network, listener_nonce, nonce,
                                                signer.node_id, listener_id))
    return args


def listener_hello(signer: identity.Identity, network: str, listener_nonce: str,
                   dialer: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The listener's signed reply to the (checked) hello ``dialer``."""
    args = hello_fields(signer.node_id, network, **fields)
    args["signature"] = signer.sign(hello_proof(LISTENER, network, listener_nonce, dialer["nonce"],
                                                dialer["node_id"], signer.node_id))
    return args


def _is_address(value: object) -> bool:
    try:
        address.parse(value)
    except address.InvalidAddress:
        return False
    return True


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


#: fields a hello may carry, how each must look, and how that is said
_OPTIONAL_FIELDS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("port", _is_port, "a port number, 1 to 65535"),
    ("secure", lambda v: isinstance(v, bool), "true or false"),
    ("advertise", _is_address, f"a ws:// or wss:// address of at most {address.MAX_ADDRESS_LENGTH} characters"),
    ("agent", lambda v: isinstance(v, str) and len(v) <= 256, "a string of at most 256 characters"),
    ("probe", lambda v: isinstance(v, bool), "true or false"),
)


def check_hello(args: Any, network: str, my_id: str, proof_of: Callable[[dict[str, Any]], bytes],
                dialer: bool) -> dict[str, Any]:
    """Validate the other side's hello (a dialer's request, or the
    listener's reply) and its proof: ``proof_of(args)`` is what the other
    side must have signed, made of the values this side saw. Returns
    ``args``; raises ``HandshakeRefused`` naming the field."""
    if not isinstance(args, dict):
        raise HandshakeRefused(BAD_HELLO, 'hello needs "args": an object')
    node_id = args.get("node_id")
    if not identity.is_node_id(node_id):
        raise HandshakeRefused(BAD_HELLO, '"node_id" must be a string of 64 hex characters')
    their_network = args.get("network")
    if not isinstance(their_network, str):
        raise HandshakeRefused(BAD_HELLO, '"network" must be a string')
    if their_network != network:
        raise HandshakeRefused(WRONG_NETWORK, f'"network": this node is on network {network!r}')
    version = args.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise HandshakeRefused(BAD_HELLO, '"version" must be a whole number')
    if version != PROTOCOL_VERSION:
        raise HandshakeRefused(INCOMPATIBLE_VERSION, f'"version": this node speaks protocol {PROTOCOL_VERSION}')
    if dialer and not is_nonce(args.get("nonce")):
        raise HandshakeRefused(BAD_HELLO, '"nonce" must be a string of 16 to 128 hex digits')
    for name, valid, what in _OPTIONAL_FIELDS:
        if name in args and not valid(args[name]):
            raise HandshakeRefused(BAD_HELLO, f'"{name}" must be {what}')
    signature = args.get("signature")
    if not isinstance(signature, str):
        raise HandshakeRefused(BAD_HELLO, '"signature" must be a string (hex)')
    if not identity.verify(node_id, signature, proof_of(args)):
        raise HandshakeRefused(BAD_PROOF, '"signature" does not prove the node id on this connection')
    if node_id == my_id:
        raise HandshakeRefused(SELF, "this is a connection to the node itself")
    return args


def check_listener_hello(reply: Any, network: str, signer_id: str, listener_nonce: str,
                         listener_id: str, nonce: str) -> dict[str, Any]:
    """The listener's hello reply, checked by the dialer ``signer_id`` who
    sent ``nonce`` to the listener that named ``listener_nonce`` and
    ``listener_id`` in its upgrade response."""

    def listener_proof(remote: dict[str, Any]) -> bytes:
        if remote["node_id"] != listener_id:
            raise HandshakeRefused(BAD_PROOF, "the reply's node id is not the one the upgrade named")
        return hello_proof(LISTENER, network, listener_nonce, nonce, signer_id, listener_id)

    return check_hello(reply, network, signer_id, listener_proof, dialer=False)


def check_dialer_hello(args: Any, network: str, my_id: str, my_nonce: str) -> dict[str, Any]:
    """A dialer's hello, checked by the listener ``my_id`` that sent
    ``my_nonce`` in its upgrade response."""

    def dialer_proof(remote: dict[str, Any]) -> bytes:
        return hello_proof(DIALER, network, my_nonce, remote["nonce"], remote["node_id"], my_id)

    return check_hello(args, network, my_id, dialer_proof, dialer=True)


def refusal_from(reply: codec.Reply) -> HandshakeRefused:
    """The refusal a listener's non-200 hello reply carries."""
    body = reply.response if isinstance(reply.response, dict) else {}
    code = body.get("code") if body.get("code") in CLOSE_CODES else BAD_HELLO
    retry = body.get("retry_after")
    return HandshakeRefused(code, reply.error, retry if isinstance(retry, (int, float)) else None)
