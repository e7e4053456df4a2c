"""Gossip: whisper-like publish/subscribe across the network.

Envelopes. A message travels in an envelope signed by the node it was
published at: id (a SHA-256 of the content), origin node id, topic, JSON
payload, creation time, TTL and a nonce. Every node checks an envelope
before it delivers or forwards it: a bad id (tampered), a bad signature
(forged), an expired or far-future envelope, or one over the size limit is
dropped, counted, and the peer that sent it is told why; a peer that keeps
sending such envelopes is disconnected. A seen-cache remembers every id
until its envelope expires, so a message is delivered and forwarded at most
once per node and a replayed envelope is dropped; an expired one is refused
anyway, so the cache can forget it then and stays bounded.

Spreading. Plain flooding sends every message over every link: on a network
where each node has d peers, each node receives about d copies. foxnode
spreads like Plumtree (Leitao et al., "Epidemic Broadcast Trees"; the same
idea as gossipsub's mesh plus IHAVE/IWANT): every peer link starts *eager*
(full envelopes are pushed over it); a node that receives a copy it has
already seen tells that sender ``prune``, and the link becomes *lazy*, over
which only ids are announced (``ihave``). The eager links settle into a
spanning tree, so each node receives about one full copy per message.
Announcements go out ``lazy_delay`` after the envelope came, batched per
link, to at most ``lazy_fanout`` lazy links drawn at random among those
not known to hold it (gossipsub's D_lazy; plain Plumtree tells every lazy
link, which on a large network is most of a node's work), and once more
``lazy_repeat`` later (or twice the graft wait) to as many others not known
to hold it by then: a node whose tree parent went away and that no
neighbour drew the first time hears of it the second (gossipsub too
announces an id over several heartbeats). A
node that hears of an id over a lazy link and does not get the envelope
soon after asks for it (``graft``), which also makes that link eager again:
that is how the tree heals when a link or node goes away. How soon is
``graft_wait``: ``graft_timeout``, or more where envelopes come later than
that over the tree (an estimate of how late, as TCP's of a round trip: a
mean and deviation of the time from an id's first announcement to its
envelope over a link not grafted), up to ``graft_timeout_max``. The trade-off:
fewer copies, at the price of a repair delay (``graft_wait``) when the
tree is broken, and small id announcements on the lazy links.

Peer frames (events, only after the ``hello`` handshake):
``{"event": "gossip", "envelope": {...}}``, ``{"event": "ihave", "ids": [...]}``,
``{"event": "graft", "ids": [...]}``, ``{"event": "prune"}``, and
``{"event": "rejected", "id": ..., "reason": ...}`` telling a peer why its
envelope was dropped.

Memory. A payload held decoded costs far more than its JSON text: 64 KiB of
``[{},{},...]`` is some 20,000 Python objects, 1.5 MB. So no payload is
kept past the accepting of its envelope: the frames that carry it (to peers,
to subscribers) are encoded then, and the cache keeps the gossip frame and
three scalars. What gossip keeps, and its bound in bytes (figures measured
on CPython 3.11, 64-bit; defaults in brackets):

- ``cache``: at most ``cache_bytes`` [32 MiB], counting each entry's
  bookkeeping as ``CACHE_ENTRY_BYTES`` beside its frame; and at most
  ``cache_capacity`` [10,000] entries.
- ``seen``: at most ``seen_capacity`` [200,000] ids, about 230 bytes each
  (a 64-character id, a float, an ordered-dict slot): 46 MB when full.
- ``missing`` (announced ids awaited, each with its graft timer): at most
  ``cache_capacity`` [10,000] entries of about 750 bytes, plus 8 bytes per
  announcer, and of them at most its share (``cache_capacity`` over the
  live links) first announced by any one link, so that one peer's made-up
  ids cannot crowd out every other's announcements, and announcers are live peers only (at most
  ``--max-inbound`` + ``--max-outbound``): some 10 MB when full.
- ``links``: one small ``Link`` per live peer connection (at most
  ``--max-inbound`` + ``--max-outbound``), dropped when the peer goes down.
- ``subscribers``: per connection at most ``max_topics_per_connection``
  [64] topics of at most ``max_topic_length`` [128] characters, under
  1 KiB each, in at most ``max_subscriptions_per_connection`` [64]
  subscriptions (and at most ``max_subscriptions_per_ip`` [256] over all
  the connections of one client address, the operator's aside), each with at most 64 ``from`` keys (about 10 KiB): under
  1 MiB per connection, released when it closes.
- polled filters (filters.py): each a subscription of its own and at
  most ``filter_bytes`` [256 KiB] of held frames, at most ``max_filters``
  [256] of them: 64 MiB of frames when full, released when they expire.

Frames queued for a slow reader are its connection's, bounded by
``--send-queue`` per connection (one frame object per message, shared by
every peer's queue that holds it, and holding no more than its length: see
``codec.exact``). A subscriber's event names its subscription, so each
subscription gets a frame of its own: the send queue bounds it.

Private, signed and paid-for messages (PROTOCOL.md). An envelope's
``content``, when not null, is base64 of what crypto.py packs (the payload's
JSON text, signed or not) and, when ``encrypted`` says ``"sym"`` or
``"asym"``, seals; its ``payload`` is then null. The topic stays readable, so
every node forwards what it cannot open; the envelope's origin, topic and
times are bound into the sealing as associated data (``_sealing_aad``), so
a sealed content cannot be moved to another topic or envelope; a signature names the envelope it was given for (origin, topic,
times, sealing and reader: ``_signing_context``), so whoever can read a
signed content cannot send it on as its signer's. ``work`` is the proof-of-work nonce: the envelope's proof of work is
``crypto.pow_of`` of its body (``_body``: every field but the id, the
signature and ``work``) and ``work``. Nodes refuse, count and do not
forward envelopes below their ``--min-pow``; the origin's signature covers
the id, which covers ``work`` too. Opening happens only at delivery, once
per key, for the subscriptions that hold that key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import math
import os
import random
import re
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import orjson

from foxnode import codec, crypto, identity, logs
from foxnode.config import MAX_DEPTH, GossipConfig
from foxnode.limits import TokenBucket, client_key

if TYPE_CHECKING:
    from foxnode.history import History
    from foxnode.keys import KeyStore

log = logs.logger(__name__)

ENVELOPE_VERSION = 1
CLOSE_ABUSE = 4011
#: seconds between two log lines about contents with a bad signature
BAD_SIGNATURE_LOG_INTERVAL = 60.0


#: What one cache entry costs beside the bytes of its frame (its key, the
#: tuple and floats, the ordered-dict slot, the bytes object's header):
#: about 330 bytes measured, charged with room to spare. (The frame is
#: copied to an allocation of its own size: see ``codec.exact``.)
CACHE_ENTRY_BYTES = 512

_MESSAGE_ID = re.compile(r"[0-9a-f]{64}")
#: what a payload's depth is short of its gossip frame's (the frame, the envelope)
_FRAME_LEVELS = 2


def is_message_id(value: Any) -> bool:
    """A message id as ``Envelope.create`` makes them: 64 lowercase hex
    digits (so each one held costs the same few bytes)."""
    return isinstance(value, str) and _MESSAGE_ID.fullmatch(value) is not None


class Awaited(NamedTuple):
    """An announced id not yet received."""

    timer: Any
    #: the links that announced it, still to ask
    announcers: list["Link"]
    #: when it was first announced
    since: float
    #: the connections a graft for it went to
    grafted: tuple[Any, ...] = ()


#: ids received through a graft, kept (at most this many) so that the
#: eager copy coming after tells how late it was
GRAFTED_KEPT = 1024


class Cached(NamedTuple):
    """What the cache keeps of an envelope: never its decoded payload."""

    #: the encoded gossip frame, sent as it is to answer a graft
    frame: bytes
    created: float
    expires: float


class Rejected(Exception):
    """An envelope that must not be delivered or forwarded; ``str()`` says why."""


#: what ``encrypted`` may say
SEALINGS = (None, "sym", "asym")


def _body(origin: str, topic: str, payload: Any, created: float, ttl: int, nonce: str,
          encrypted: str | None = None, content: str | None = None) -> bytes:
    """The envelope without its id, signature and proof-of-work nonce:
    what its proof of work is over, and its size for it. A plain envelope's
    is what it was before sealing existed, so its id is too."""
    fields = [ENVELOPE_VERSION, origin, topic, payload, created, ttl, nonce]
    if encrypted is not None or content is not None:
        fields += [encrypted, content]
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def _hashed(body: bytes, work: int) -> bytes:
    """What the id hashes: the body and, when there is one, the proof-of-work nonce."""
    return body + b"/%d" % work if work else body


def _canonical(origin: str, topic: str, payload: Any, created: float, ttl: int, nonce: str,
               encrypted: str | None = None, content: str | None = None, work: int = 0) -> bytes:
    """What an envelope's id is the SHA-256 of."""
    return _hashed(_body(origin, topic, payload, created, ttl, nonce, encrypted, content), work)


def _sealing_aad(origin: str, topic: str, created: float, ttl: int) -> bytes:
    """What a sealed content is bound to, as associated data: the envelope
    it travels in (its origin node, topic, creation time and TTL), not only
    its topic. Otherwise anyone, without the key, could copy a sealed
    content into an envelope of their own, and every reader holding the key
    would get the private message again, opened, as a new one."""
    return orjson.dumps(["foxnode sealed v2", origin, topic, float(created), ttl])


def _signing_context(origin: str, topic: str, created: float, ttl: int, encrypted: str | None,
                     under: bytes) -> bytes:
    """What a signed content's signature names besides the payload: the
    envelope's origin, topic, creation time and TTL, how it is sealed, and
    for whom (``under``: a sym key's ``crypto.sym_key_binding``, the X25519
    half of the reader's public key, or nothing). So "from" holds for this
    message as the reader gets it: the same words sent on by another node,
    under another topic, key or reader, or later, are not the signer's."""
    return orjson.dumps([ENVELOPE_VERSION, origin, topic, float(created), ttl, encrypted, under.hex()])


def _content_limit(config: GossipConfig) -> int:
    """The longest ``content``: base64 of the largest payload, signed and sealed."""
    return (config.max_payload + 256) * 4 // 3 + 4


def _signed_part(message_id: str) -> bytes:
    return b"foxnode-envelope/1\x00" + message_id.encode()


@attrs.frozen
class Envelope:
    id: str
    origin: str
    topic: str
    payload: Any
    created: float
    ttl: int
    nonce: str
    sig: str
    #: None, "sym" or "asym": how ``content`` is sealed
    encrypted: str | None = None
    #: base64 of the packed (and maybe sealed) content; ``payload`` is None then
    content: str | None = None
    #: the proof-of-work nonce
    work: int = 0

    @classmethod
    def create(cls, signer: identity.Identity, topic: str, payload: Any, ttl: int,
               now: float, encrypted: str | None = None, content: str | None = None,
               work: int = 0, nonce: str | None = None) -> "Envelope":
        created = round(now, 3)
        nonce = nonce if nonce is not None else os.urandom(8).hex()
        body = _body(signer.node_id, topic, payload, created, ttl, nonce, encrypted, content)
        message_id = hashlib.sha256(_hashed(body, work)).hexdigest()
        return cls(message_id, signer.node_id, topic, payload, created, ttl, nonce,
                   signer.sign(_signed_part(message_id)), encrypted, content, work)

    def body(self) -> bytes:
        return _body(self.origin, self.topic, self.payload, self.created, self.ttl, self.nonce,
                     self.encrypted, self.content)

    def pow(self, now: float | None = None) -> float:
        """Its proof of work; at ``now``, an envelope created after ``now``
        pays for the seconds it is early too, as Whisper's (EIP-627) does:
        created ``max_skew`` ahead, it lives that much beyond its TTL at
        every node, and priced by its TTL alone it would buy that time
        free. (Whole seconds, so a clock a moment ahead costs nothing.)"""
        ttl = self.ttl
        if now is not None and self.created > now:
            ttl += int(self.created - now)
        return crypto.pow_of(self.body(), self.work, ttl)

    @property
    def expires(self) -> float:
        return self.created + self.ttl

    def to_json(self) -> dict[str, Any]:
        # Not recursive: the payload is JSON already, and a deep copy of a
        # payload of 20,000 containers costs as much as decoding it.
        out = attrs.asdict(self, recurse=False)
        # A plain envelope goes as it went before sealing and proof of work.
        if self.encrypted is None and self.content is None:
            del out["encrypted"], out["content"]
        if not self.work:
            del out["work"]
        return out

    @classmethod
    def from_json(cls, raw: Any, config: GossipConfig, now: float) -> "Envelope":
        """Check everything about a received envelope; raise ``Rejected``."""
        if not isinstance(raw, dict):
            raise Rejected("envelope is not an object")
        try:
            # The fields of sealing and proof of work may be left out (plain envelopes).
            fields = {name: raw[name] if name in raw or field.default is attrs.NOTHING else field.default
                      for name, field in attrs.fields_dict(cls).items()}
        except KeyError as e:
            raise Rejected(f"envelope lacks {e.args[0]!r}") from None
        if not isinstance(fields["id"], str) or len(fields["id"]) != 64:
            raise Rejected("malformed id")
        if not identity.is_node_id(fields["origin"]):
            raise Rejected("malformed origin")
        topic = fields["topic"]
        if not isinstance(topic, str) or not 0 < len(topic) <= config.max_topic_length:
            raise Rejected("malformed topic")
        created, ttl = fields["created"], fields["ttl"]
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise Rejected("malformed creation time")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= config.max_ttl:
            raise Rejected(f"ttl must be 1..{config.max_ttl}")
        if not isinstance(fields["nonce"], str) or len(fields["nonce"]) > 64:
            raise Rejected("malformed nonce")
        if not identity.is_signature(fields["sig"]):
            # Exactly 128 hex digits: outside the body, a signature is in
            # neither the size check nor the proof of work.
            raise Rejected("malformed signature")
        encrypted, sealed, work = fields["encrypted"], fields["content"], fields["work"]
        if not isinstance(encrypted, (str, type(None))) or encrypted not in SEALINGS:
            raise Rejected("malformed encrypted")
        if sealed is None:
            if encrypted is not None:
                raise Rejected("malformed content: encrypted without content")
        elif not isinstance(sealed, str) or len(sealed) > _content_limit(config):
            raise Rejected("malformed content")
        elif fields["payload"] is not None:
            raise Rejected("malformed content: a payload beside it")
        if not isinstance(work, int) or isinstance(work, bool) or not 0 <= work < 2**64:
            raise Rejected("malformed work")
        if created > now + config.max_skew:
            raise Rejected("created in the future")
        if created + ttl < now:
            raise Rejected("expired")
        try:
            body = _body(fields["origin"], topic, fields["payload"], created, ttl, fields["nonce"],
                         encrypted, sealed)
        except (TypeError, ValueError):
            # orjson.JSONEncodeError: an integer over 64 bits, a lone surrogate
            raise Rejected("payload not representable as JSON") from None
        if len(body) > (config.max_payload if sealed is None else _content_limit(config)) + 1024:
            raise Rejected(f"payload over {config.max_payload} bytes")
        if hashlib.sha256(_hashed(body, work)).hexdigest() != fields["id"]:
            raise Rejected("id does not match the content (tampered)")
        if not identity.verify(fields["origin"], fields["sig"], _signed_part(fields["id"])):
            raise Rejected("bad signature (forged)")
        return cls(**fields)

    @classmethod
    def stored(cls, encoded: bytes) -> tuple["Envelope", orjson.Fragment | None]:
        """An envelope as the message store holds it (checked when it was
        taken), and its payload encoded already (None when sealed)."""
        raw = orjson.loads(encoded)
        fields = {name: raw.get(name, field.default) for name, field in attrs.fields_dict(cls).items()}
        envelope = cls(**fields)
        return envelope, (None if envelope.content is not None else orjson.Fragment(orjson.dumps(envelope.payload)))


@attrs.define(eq=False)
class Subscription:
    """One ``subscribe``: its topics and what it takes of them."""

    id: str
    conn: Any
    topics: set[str]
    #: a key id: only what it opens, opened; None: only unencrypted messages
    key: str | None = None
    #: public keys (hex): only messages signed by one of them; None: any
    senders: frozenset[str] | None = None
    min_pow: float = 0.0
    #: while a ``since`` replay runs (history.py): what came live
    #: meanwhile, (id, event frame), sent after it; None otherwise. Its
    #: bytes count in the connection's ``fox_state["held_bytes"]`` too
    held: list | None = None
    held_bytes: int = 0
    #: the client address it counts against (``limits.client_key``); None:
    #: the operator's, or a polled filter's (filters.py counts those)
    client: str | None = None
    #: while a ``since`` replay runs: the stored ids it left to their
    #: live delivery (this node's publishes not yet delivered)
    skipped: set | None = None


class Opened(NamedTuple):
    """What a subscriber sees of an envelope."""

    payload: Any
    signer: str | None
    encrypted: str | None


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


@attrs.define(eq=False)
class Link:
    """Plumtree's view of one live peer connection. Kept per connection,
    not per node id: a connection that replaces another to the same node
    starts eager, whatever the old one had become."""

    conn: Any
    #: only ids are announced over it (``ihave``), not whole envelopes
    lazy: bool = False
    #: awaited ids (``missing``) this link was the first to announce
    awaited: int = 0


class Gossip:
    """Publish/subscribe for one node. It serves ``ops`` and ``events``
    (service.py puts them in the node's tables) and hears of peer links
    coming and going from the peer manager (``peer_up``/``peer_down``)."""

    def __init__(self, reactor: Any, signer: identity.Identity, metrics: Any,
                 config: GossipConfig | None = None, keys: KeyStore | None = None) -> None:
        self.reactor = reactor
        self.signer = signer
        self.metrics = metrics
        self.config = config or GossipConfig()
        #: the node's key store, for ``key``, ``sign`` and subscriptions with a key
        self.keys = keys
        #: the deepest payload an opened content may hold: what a plain one
        #: may, in a gossip frame the codec holds to the node's --max-depth
        #: (service.build sets it from the node's config)
        self.payload_depth = MAX_DEPTH - _FRAME_LEVELS
        #: the message store (history.py), when the node keeps one
        self.history: History | None = None
        #: catch-up (catchup.py), told of peer links coming and going
        self.catchup: Any = None
        #: message id -> when it may be forgotten
        self.seen: OrderedDict[str, float] = OrderedDict()
        #: message id -> its gossip frame and times, to answer grafts
        self.cache: OrderedDict[str, Cached] = OrderedDict()
        #: what the cache holds, frames and bookkeeping (CACHE_ENTRY_BYTES each)
        self._cache_bytes = 0
        #: topic -> the subscriptions to it
        self.subscribers: dict[str, set[Subscription]] = {}
        #: live peer connections (from the peer manager's events), in the
        #: order they came up
        self.links: dict[Any, Link] = {}
        #: announced ids we wait for
        self.missing: dict[str, Awaited] = {}
        #: id received through a graft -> when it was first announced
        self._grafted_at: OrderedDict[str, float] = OrderedDict()
        #: how late envelopes come after their announcement: smoothed
        #: mean and deviation (seconds), None before the first
        self._late_mean: float | None = None
        self._late_dev = 0.0
        #: awaited id -> the link that announced it first (whose share it takes)
        self._awaited_by: dict[str, Link] = {}
        #: ids to announce at the next flush -> (origin, the connections
        #: known to hold it: its sender, the eager links it went to, and
        #: those that sent or announced it since); at most the envelopes
        #: accepted in ``lazy_delay``
        self._to_announce: dict[str, tuple[str, set[Any]]] = {}
        self._announcing: Any = None
        #: the same for the second announcements, ids told the first time
        #: in ``lazy_repeat``; those told then are among the holders
        self._to_repeat: dict[str, tuple[str, set[Any]]] = {}
        self._repeating: Any = None
        self._draw = random.Random()
        #: contents with a bad signature not yet said, and when it was last said
        self._bad_signatures = 0
        self._bad_signatures_said = -math.inf
        #: client address -> the subscriptions its connections hold
        self._subs_per_client: dict[str, int] = {}
        #: proof-of-work searches under way (publish's ``pow``), and how
        #: many of them are not the operator's
        self._works = 0
        self._others_works = 0
        #: the plugins' validators (pluginhost.Screen), set by service.build:
        #: asked about every message on its ``topics`` before it is delivered
        #: or forwarded, published here or received; None: no validators
        self.screen: Any = None
        #: what this part serves, for the node's tables
        self.ops = {"publish": self.op_publish, "subscribe": self.op_subscribe,
                    "unsubscribe": self.op_unsubscribe}
        self.events = {"gossip": self.on_gossip, "ihave": self.on_ihave, "graft": self.on_graft,
                       "prune": self.on_prune, "rejected": self.on_rejected}

    def stop(self) -> None:
        """Cancel the graft and announcement timers (the node is stopping)."""
        for timer in (self._announcing, self._repeating):
            if timer is not None and timer.active():
                timer.cancel()
        self._to_announce.clear()
        self._to_repeat.clear()
        for timer, *_ in self.missing.values():
            if timer.active():
                timer.cancel()
        self.missing.clear()
        self._awaited_by.clear()

    def graft_wait(self) -> float:
        """How long an announced id is waited for before a graft."""
        base = self.config.graft_timeout
        if self._late_mean is None:
            return base
        return min(self.config.graft_timeout_max, max(base, self._late_mean + 2 * self._late_dev))

    def _late(self, seconds: float) -> None:
        """An envelope came ``seconds`` after its first announcement, over
        a link not grafted for it (RFC 6298's smoothing). A sample counts
        at most ``graft_timeout_max``: a peer replaying an old copy of a
        grafted id must not hold the wait up for long."""
        seconds = min(seconds, self.config.graft_timeout_max)
        if self._late_mean is None:
            self._late_mean, self._late_dev = seconds, seconds / 2
        else:
            self._late_dev = 0.75 * self._late_dev + 0.25 * abs(self._late_mean - seconds)
            self._late_mean = 0.875 * self._late_mean + 0.125 * seconds

    def _unawait(self, message_id: str) -> Awaited | None:
        """``message_id`` no longer awaited; its first announcer's share back."""
        waiting = self.missing.pop(message_id, None)
        creator = self._awaited_by.pop(message_id, None)
        if creator is not None:
            creator.awaited -= 1
        return waiting

    # -- client ops ----------------------------------------------------------------

    def op_publish(self, conn: Any, args: Any) -> Any:
        if not isinstance(args, dict):
            return codec.bad_args("publish", '"args" must be an object with "topic" and "payload"')
        for name in ("topic", "payload"):
            if name not in args:
                return codec.bad_args("publish", f'"{name}" is missing')
        topic = args["topic"]
        if not isinstance(topic, str) or not 0 < len(topic) <= self.config.max_topic_length:
            return codec.bad_args("publish", f'"topic" must be a string of 1 to {self.config.max_topic_length} characters')
        try:
            topic.encode("utf-8")
        except UnicodeEncodeError:
            # Only reachable in-process (a lone surrogate): the wire brings text.
            return codec.bad_args("publish", '"topic" is not valid Unicode text')
        ttl = args.get("ttl", self.config.default_ttl)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= self.config.max_ttl:
            return codec.bad_args("publish", f'"ttl" must be a whole number of seconds, 1 to {self.config.max_ttl}')
        try:
            text = orjson.dumps(args["payload"])
        except (orjson.JSONEncodeError, UnicodeError) as e:
            # Only reachable in-process: what arrives over the wire was JSON.
            return codec.bad_args("publish", f'"payload" is not representable as JSON ({e})')
        if len(text) > self.config.max_payload:
            return codec.bad_args("publish", f'"payload" is {len(text)} bytes, over the limit of {self.config.max_payload}')
        how = self._sealing("publish", args)
        if isinstance(how, codec.Reply):
            return how
        encrypted, seal, under, signer, target, seconds = how
        payload, content = args["payload"], None
        now = self.reactor.seconds()
        if seal is not None or signer is not None:
            context = _signing_context(self.signer.node_id, topic, round(now, 3), ttl, encrypted, under)
            packed = crypto.pack(text, signer, context)
            aad = _sealing_aad(self.signer.node_id, topic, round(now, 3), ttl)
            sealed = seal(packed, aad) if seal is not None else packed
            content, payload = base64.b64encode(sealed).decode("ascii"), None
        nonce = os.urandom(8).hex()
        if target <= 0:
            return self._publish(Envelope.create(self.signer, topic, payload, ttl, now, encrypted, content,
                                                 nonce=nonce))
        if self._works >= self.config.max_works:
            return codec.too_many(f"Too many proof-of-work searches under way (at most {self.config.max_works}); "
                                  "retry after a few seconds, or publish without \"pow\".")
        operator = getattr(conn, "trusted", False)
        if not operator and self._others_works >= self._works_for_others():
            return codec.too_many(f"Too many proof-of-work searches under way from clients (at most "
                                  f"{self._works_for_others()}; the rest are kept for the node's operator); "
                                  "retry after a few seconds, or publish without \"pow\".")
        body = _body(self.signer.node_id, topic, payload, round(now, 3), ttl, nonce, encrypted, content)
        # In a thread, for at most its time: the node answers on meanwhile.
        self._works += 1
        if not operator:
            self._others_works += 1
        d = crypto.work_in_thread(self.reactor, body, ttl, target, seconds)

        def worked(found: crypto.Work) -> codec.Reply:
            return self._publish(Envelope.create(self.signer, topic, payload, ttl, now, encrypted, content,
                                                 work=found.nonce, nonce=nonce))

        def done(outcome: Any) -> Any:
            self._works -= 1
            if not operator:
                self._others_works -= 1
            return outcome

        return d.addBoth(done).addCallback(worked)

    def _works_for_others(self) -> int:
        """The searches clients other than the operator may hold together:
        ``max_works`` less ``operator_works``, but at least one."""
        return max(1, self.config.max_works - self.config.operator_works)

    def _publish(self, envelope: Envelope) -> Any:
        reached = envelope.pow()
        if reached < self.config.min_pow:
            return codec.bad_args("publish", f'"pow": reached {reached:.6g}, below this node\'s minimum '
                                             f'{self.config.min_pow:g} (--min-pow); nothing was published. '
                                             'Give a higher "pow" or "pow_time"')
        if self.screen is not None:
            refused = self.refused_by(envelope)
            if refused is not None:
                return codec.Reply(400, f'Refused by the validator of plugin "{refused}" for topic '
                                        f'"{envelope.topic}"; nothing was published.')
        reply = codec.accepted({"id": envelope.id, "pow": reached})
        encoded = self._encode(envelope)
        if self.history is None:
            # Spread it once the reply is out, so that the publisher, subscribed
            # to its own topic, hears 202 before the message.
            self.reactor.callLater(0, self.accept, envelope, None, True, encoded)
            return reply
        # Kept (on disk) before 202 says so; spread once the reply is out.
        self.history.record(envelope, encoded[1], durable=True)
        self.history.undelivered.add(envelope.id)

        def kept(_: Any) -> codec.Reply:
            self.reactor.callLater(0, self.accept, envelope, None, True, encoded)
            return reply

        def not_kept(failure: Any) -> codec.Reply:
            self.history.undelivered.discard(envelope.id)
            return codec.unavailable(f"The message store cannot be written ({failure.getErrorMessage()}); "
                                     "nothing was published.")

        return self.history.committed().addCallbacks(kept, not_kept)

    def _encode(self, envelope: Envelope) -> tuple[orjson.Fragment, bytes]:
        """The payload encoded once, and the envelope's JSON around it."""
        payload = orjson.Fragment(codec.dumps(envelope.payload))
        return payload, codec.dumps(dict(envelope.to_json(), payload=payload))

    def _key_arg(self, op: str, args: dict, name: str, kinds: tuple[str, ...]) -> Any:
        """The stored key named by ``args[name]`` (of one of ``kinds``),
        None when absent, or the refusal."""
        if name not in args:
            return None
        key_id = args[name]
        if not isinstance(key_id, str) or not 0 < len(key_id) <= 128:
            return codec.bad_args(op, f'"{name}" must be a key id (a string)')
        key = self.keys.get(key_id) if self.keys is not None else None
        if key is None:
            return codec.not_found(f'Key "{key_id}" is not known.')
        if key.type not in kinds:
            return codec.bad_args(op, f'"{name}" must name a{"n asym" if kinds == ("asym",) else " sym"} key, '
                                      f'not a{"n asym" if key.type == "asym" else " sym"} one')
        return key

    def _sealing(self, op: str, args: dict) -> Any:
        """publish's ``key``/``to``/``sign``/``pow``/``pow_time``: (encrypted,
        a sealing function or None, for whom it seals (``_signing_context``'s
        ``under``), the signer's KeyPair or None, the pow target, the seconds
        to work), or the refusal."""
        if "key" in args and "to" in args:
            return codec.bad_args(op, '"key" and "to" exclude each other: give one')
        key = self._key_arg(op, args, "key", ("sym",))
        if isinstance(key, codec.Reply):
            return key
        encrypted, seal, under = None, None, b""
        if key is not None:
            encrypted, under = "sym", crypto.sym_key_binding(key.secret)
            seal = lambda data, aad: crypto.seal_sym(key.secret, data, aad)  # noqa: E731
        if "to" in args:
            public = crypto.parse_public_key(args["to"])
            if public is None:
                return codec.bad_args(op, f'"to" must be a public key: {2 * crypto.PUBLIC_KEY_SIZE} hex digits '
                                          '(the "public_key" of an asym key)')
            if not crypto.can_seal_to(public):
                return codec.bad_args(op, '"to" is no one\'s public key: its X25519 half is a point of '
                                          'small order, to which nothing can be sealed')
            encrypted, under = "asym", public[:32]
            seal = lambda data, aad: crypto.seal_to(public, data, aad)  # noqa: E731
        signing = self._key_arg(op, args, "sign", ("asym",))
        if isinstance(signing, codec.Reply):
            return signing
        target = args.get("pow", 0)
        if not _number(target):
            return codec.bad_args(op, '"pow" must be a number, 0 or more (a proof-of-work target)')
        seconds = args.get("pow_time", self.config.pow_time)
        if not _number(seconds) or seconds > self.config.max_pow_time:
            return codec.bad_args(op, f'"pow_time" must be a number of seconds, 0 to {self.config.max_pow_time:g}')
        return encrypted, seal, under, signing.pair if signing is not None else None, target, seconds

    def _topics_arg(self, op: str, args: Any) -> list[str] | codec.Reply:
        if not isinstance(args, dict):
            return codec.bad_args(op, '"args" must be an object with "topics"')
        if "topics" not in args:
            return codec.bad_args(op, '"topics" is missing')
        topics = args["topics"]
        if isinstance(topics, str):
            topics = [topics]
        limit = self.config.max_topic_length
        if (not isinstance(topics, list)
                or not all(isinstance(t, str) and 0 < len(t) <= limit for t in topics)):
            return codec.bad_args(op, f'"topics" must be a list of strings of 1 to {limit} characters')
        return topics

    def selection_args(self, op: str, args: Any) -> tuple[list[str], str | None, frozenset[str] | None, float] | codec.Reply:
        """What ``filter`` and ``history`` select by: ``topics`` (at most
        ``max_topics_per_connection`` of them) and ``key``/``from``/``min_pow``,
        or the refusal."""
        topics = self._topics_arg(op, args)
        if isinstance(topics, codec.Reply):
            return topics
        if len(set(topics)) > self.config.max_topics_per_connection:
            return codec.bad_args(op, f'"topics": at most {self.config.max_topics_per_connection}')
        wanted = self._filter_args(op, args)
        if isinstance(wanted, codec.Reply):
            return wanted
        return (topics, *wanted)

    def _subscriptions(self, conn: Any) -> dict[str, Subscription]:
        return conn.fox_state.setdefault("subscriptions", {})

    def _filter_args(self, op: str, args: dict) -> Any:
        """subscribe's ``key``/``from``/``min_pow``: (key id, senders, min_pow) or the refusal."""
        key = self._key_arg(op, args, "key", ("sym", "asym"))
        if isinstance(key, codec.Reply):
            return key
        senders = None
        if "from" in args:
            given = args["from"]
            if not isinstance(given, list) or not given or len(given) > 64:
                return codec.bad_args(op, '"from" must be a list of 1 to 64 public keys (hex)')
            parsed = [crypto.parse_public_key(v) for v in given]
            if any(p is None for p in parsed):
                return codec.bad_args(op, f'"from": each must be a public key of {2 * crypto.PUBLIC_KEY_SIZE} hex digits')
            senders = frozenset(p.hex() for p in parsed if p is not None)
        min_pow = args.get("min_pow", 0)
        if not _number(min_pow):
            return codec.bad_args(op, '"min_pow" must be a number, 0 or more')
        return (key.id if key is not None else None), senders, float(min_pow)

    def op_subscribe(self, conn: Any, args: Any) -> codec.Reply:
        topics = self._topics_arg("subscribe", args)
        if isinstance(topics, codec.Reply):
            return topics
        mine = conn.fox_state.setdefault("topics", set())
        if len(mine | set(topics)) > self.config.max_topics_per_connection:
            return codec.bad_args("subscribe", f'"topics": at most {self.config.max_topics_per_connection} per connection')
        wanted = self._filter_args("subscribe", args)
        if isinstance(wanted, codec.Reply):
            return wanted
        subscriptions = self._subscriptions(conn)
        if len(subscriptions) >= self.config.max_subscriptions_per_connection:
            return codec.bad_args("subscribe", f'"topics": at most {self.config.max_subscriptions_per_connection} '
                                               'subscriptions per connection; unsubscribe one first')
        client = None if getattr(conn, "trusted", False) else client_key(conn.remote_host)
        if client is not None and self._subs_per_client.get(client, 0) >= self.config.max_subscriptions_per_ip:
            return codec.too_many(f"Too many subscriptions from {client} (at most "
                                  f"{self.config.max_subscriptions_per_ip} per client address, over all its "
                                  "connections); unsubscribe one first.")
        since = self.since_arg("subscribe", args)
        if isinstance(since, codec.Reply):
            return since
        sub = self.add_subscription(conn, topics, *wanted, since=since)
        if client is not None:
            sub.client = client
            self._subs_per_client[client] = self._subs_per_client.get(client, 0) + 1
        return codec.ok({"topics": sorted(mine), "subscription": sub.id})

    def since_arg(self, op: str, args: dict) -> float | None | codec.Reply:
        """subscribe's (and filter's) ``since``: None when absent."""
        if "since" not in args:
            return None
        if self.history is None:
            return codec.bad_args(op, '"since": this node keeps no message store')
        from foxnode.history import since_arg

        return since_arg(op, args)

    def add_subscription(self, conn: Any, topics: list[str], key: str | None,
                         senders: frozenset[str] | None, min_pow: float,
                         sub_id: str | None = None, since: float | None = None) -> Subscription:
        """A subscription of ``conn`` (checked already: what ``_topics_arg``
        and ``_filter_args`` return), delivered to from now on. ``conn`` is
        anything with ``fox_state`` and ``send_frame``: a connection, or a
        polled filter (filters.py), whose id its events carry (``sub_id``).
        With ``since``, the stored messages from then on come first."""
        sub = Subscription(sub_id or secrets.token_hex(16), conn, set(topics), key, senders, min_pow)
        if since is not None and self.history is not None:
            self.history.replay(sub, since)
        self._subscriptions(conn)[sub.id] = sub
        mine = conn.fox_state.setdefault("topics", set())
        for topic in topics:
            mine.add(topic)
            self.subscribers.setdefault(topic, set()).add(sub)
        return sub

    def op_unsubscribe(self, conn: Any, args: Any) -> codec.Reply:
        subscriptions = self._subscriptions(conn)
        if isinstance(args, dict) and "subscription" in args:
            if "topics" in args:
                return codec.bad_args("unsubscribe", '"subscription" and "topics" exclude each other: give one')
            sub_id = args["subscription"]
            if not isinstance(sub_id, str):
                return codec.bad_args("unsubscribe", '"subscription" must be the id subscribe replied with')
            sub = subscriptions.get(sub_id)
            if sub is None:
                return codec.not_found(f'Subscription "{sub_id[:100]}" is not known.')
            self._drop(sub, set(sub.topics))
            return codec.ok({"subscription": sub_id, "topics": sorted(conn.fox_state.get("topics", ()))})
        if isinstance(args, dict) and "topics" not in args:
            return codec.bad_args("unsubscribe", '"topics" or "subscription" is missing')
        topics = self._topics_arg("unsubscribe", args)
        if isinstance(topics, codec.Reply):
            return topics
        for sub in list(subscriptions.values()):
            self._drop(sub, set(topics) & sub.topics)
        return codec.ok({"topics": sorted(conn.fox_state.get("topics", ()))})

    def _drop(self, sub: Subscription, topics: set[str]) -> None:
        """``topics`` out of ``sub``; the subscription goes when none is left."""
        for topic in topics:
            sub.topics.discard(topic)
            subs = self.subscribers.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.subscribers[topic]
        state = sub.conn.fox_state
        if not sub.topics and state.get("subscriptions", {}).pop(sub.id, None) is not None and sub.client:
            left = self._subs_per_client.get(sub.client, 0) - 1
            if left > 0:
                self._subs_per_client[sub.client] = left
            else:
                self._subs_per_client.pop(sub.client, None)
        left = set().union(*(s.topics for s in state.get("subscriptions", {}).values()))
        state["topics"] = left

    def connection_closed(self, conn: Any) -> None:
        """Any connection closed: its subscriptions go."""
        for sub in list(conn.fox_state.get("subscriptions", {}).values()):
            self._drop(sub, set(sub.topics))
            sub.held = None

    # -- peer links (PeerListener) ---------------------------------------------------

    def peer_up(self, conn: Any) -> None:
        self.links[conn] = Link(conn)
        if self.catchup is not None:
            self.catchup.peer_up(conn)

    def peer_down(self, conn: Any) -> None:
        self.links.pop(conn, None)
        if self.catchup is not None:
            self.catchup.peer_down(conn)

    # -- spreading ---------------------------------------------------------------

    def accept(self, envelope: Envelope, sender: Any, forward: bool = True,
               encoded: tuple[orjson.Fragment, bytes] | None = None) -> bool:
        """A valid envelope: remember, keep, deliver, pass on (``forward``:
        over the links, as Plumtree does; otherwise the caller announces
        it). ``encoded``: what ``_encode`` made of it, when it is this
        node's publish (kept already). False when it was not new."""
        self.seen[envelope.id] = envelope.expires + self.config.max_skew
        if encoded is not None and self.history is not None:
            self.history.undelivered.discard(envelope.id)  # delivered now
        pending = self._unawait(envelope.id)
        if pending is not None:
            if pending.timer.active():
                pending.timer.cancel()
            if sender in pending.grafted:
                # The copy asked for: the tree's own copy, if it comes, says
                # how late it was.
                self._grafted_at[envelope.id] = pending.since
                if len(self._grafted_at) > GRAFTED_KEPT:
                    self._grafted_at.popitem(last=False)
            elif sender is not None:
                self._late(self.reactor.seconds() - pending.since)
        # The payload is encoded once, for every frame; after this method
        # nothing refers to its decoded form.
        if encoded is None:
            encoded = self._encode(envelope)
            if self.history is not None and not self.history.record(envelope, encoded[1]):
                # Kept already (the seen ids forgot it, or a restart did):
                # delivered when it first came.
                self.metrics.gossip_received.labels("duplicate").inc()
                return False
        payload, raw = encoded
        frame = codec.exact(b'{"event":"gossip","envelope":' + raw + b"}")
        self.cache[envelope.id] = Cached(frame, envelope.created, envelope.expires)
        self._cache_bytes += len(frame) + CACHE_ENTRY_BYTES
        self._trim()
        self.deliver(envelope, payload)
        if not forward:
            return True
        metrics = self.metrics
        holders = {sender}
        for conn, link in self.links.items():
            if conn is sender or conn.node_id == envelope.origin or link.lazy:
                continue
            if conn.send_frame(frame, droppable=True):
                metrics.gossip_sent.inc()
                holders.add(conn)
            else:
                metrics.send_dropped.labels("peer").inc()
        self.announce(envelope.id, envelope.origin, holders)
        return True

    def announce(self, message_id: str, origin: str, holders: set[Any]) -> None:
        """Tell lazy links of ``message_id`` at the next flush (none of
        ``holders``, nor the origin's)."""
        if len(holders) > len(self.links):
            return  # every link has it (or there is none: a new one catches up)
        self._to_announce[message_id] = (origin, holders)
        if self._announcing is None or not self._announcing.active():
            self._announcing = self.reactor.callLater(self.config.lazy_delay, self._flush_announcements)

    def _holds(self, conn: Any, message_id: Any) -> None:
        """``conn`` sent or announced ``message_id``: it needs no announcement."""
        if not isinstance(message_id, str):
            return
        pending = self._to_announce.get(message_id) or self._to_repeat.get(message_id)
        if pending is not None:
            pending[1].add(conn)

    def _flush_announcements(self) -> None:
        self._announcing = None
        pending, self._to_announce = self._to_announce, {}
        self._send_announcements(pending)
        repeat = self._to_repeat
        for message_id, (origin, holders) in pending.items():
            if any(c not in holders for c in self.links):
                repeat[message_id] = (origin, holders)
        # Bounded as the cache is: under a flood the oldest go without
        # their second announcement (the first has gone out).
        for message_id in list(itertools.islice(repeat, max(0, len(repeat) - self.config.cache_capacity))):
            del repeat[message_id]
        if repeat:
            if self._repeating is None or not self._repeating.active():
                # Later where envelopes come late: told of an id still on
                # its way over the tree, a node would graft for it.
                self._repeating = self.reactor.callLater(max(self.config.lazy_repeat, 2 * self.graft_wait()),
                                                         self._repeat_announcements)

    def _repeat_announcements(self) -> None:
        self._repeating = None
        pending, self._to_repeat = self._to_repeat, {}
        self._send_announcements(pending)

    def _send_announcements(self, pending: dict[str, tuple[str, set[Any]]]) -> None:
        """One ihave frame per link for the ids ``pending`` draws it for;
        the links told join each id's holders."""
        fanout = self.config.lazy_fanout
        batches: dict[Any, list[str]] = {}
        for message_id, (origin, holders) in pending.items():
            # Links that turned eager since are asked too: they were not
            # sent the envelope when it came.
            told = [c for c in self.links if c not in holders and c.node_id != origin]
            if len(told) > fanout:
                told = self._draw.sample(told, fanout)
            holders.update(told)
            for conn in told:
                batches.setdefault(conn, []).append(message_id)
        for conn, ids in batches.items():
            for at in range(0, len(ids), 1000):
                conn.send_frame(codec.encode_event("ihave", ids=ids[at:at + 1000]), droppable=True)

    def deliver(self, envelope: Envelope, payload: orjson.Fragment | None = None) -> None:
        """Push ``envelope`` to this node's subscriptions of its topic that
        take it (PROTOCOL.md: one with a key only what that key opens, one
        without only what is not encrypted; ``from``, ``min_pow``), one
        event each; ``payload``, when given, is its payload encoded already."""
        subscribers = self.subscribers.get(envelope.topic)
        if not subscribers:
            return
        if envelope.content is None and payload is None:
            payload = orjson.Fragment(codec.dumps(envelope.payload))
        reached = envelope.pow(self.reactor.seconds())
        #: key id (None: no key) -> what it opens of the envelope, or None
        opened: dict[str | None, Opened | None] = {}
        metrics = self.metrics
        for sub in list(subscribers):
            frame = self.event_frame(envelope, payload, sub.key, sub.senders, sub.min_pow, sub.id,
                                     reached, opened)
            if frame is None:
                continue
            if sub.held is not None:
                self._hold(sub, envelope.id, frame)
            elif sub.conn.send_frame(frame, droppable=True):
                metrics.gossip_delivered.inc()
            else:
                metrics.send_dropped.labels("subscriber").inc()

    def refused_by(self, envelope: Envelope) -> str | None:
        """The plugin whose validator refuses ``envelope``, or None. Every
        way an envelope comes in asks this before ``accept`` (which
        delivers and forwards it); callers skip it when ``screen`` is None."""
        screen = self.screen
        if screen is None or envelope.topic not in screen.topics:
            return None
        return screen(self.view(envelope))

    def view(self, envelope: Envelope) -> dict[str, Any]:
        """``envelope`` as a validator sees it: the event a subscriber
        without a key would get. A sealed one has ``payload`` None (the node
        does not open it for validators); a signed one names its signer in
        ``from`` once its signature holds. The payload is a copy: a
        validator cannot change what is delivered or forwarded."""
        payload, signer = None, None
        if envelope.content is None:
            payload = orjson.loads(orjson.dumps(envelope.payload))
        elif envelope.encrypted is None:
            try:
                content = crypto.unpack(base64.b64decode(envelope.content, validate=True),
                                        _signing_context(envelope.origin, envelope.topic, envelope.created,
                                                         envelope.ttl, None, b""))
                payload = orjson.loads(content.payload)
                signer = content.signer.hex() if content.signer else None
            except (binascii.Error, ValueError, crypto.CannotOpen):
                pass  # delivered to nobody either (_open)
        return {"id": envelope.id, "topic": envelope.topic, "payload": payload, "origin": envelope.origin,
                "created": envelope.created, "from": signer, "encrypted": envelope.encrypted,
                "pow": envelope.pow()}

    def event_frame(self, envelope: Envelope, payload: orjson.Fragment | None, key: str | None,
                    senders: frozenset[str] | None, min_pow: float, sub_id: str | None,
                    reached: float | None = None,
                    opened: dict[str | None, Opened | None] | None = None) -> bytes | None:
        """The ``message`` event a subscription with this ``key``,
        ``from`` (``senders``) and ``min_pow`` gets of ``envelope``; None
        when it gets nothing. ``sub_id`` None: no ``"subscription"`` (a
        history reply). ``opened`` shares the openings between calls."""
        if reached is None:
            reached = envelope.pow()
        if min_pow > reached:
            return None
        if opened is None:
            opened = {}
        if key not in opened:
            opened[key] = self._open(envelope, key, payload)
        view = opened[key]
        if view is None or (senders is not None and view.signer not in senders):
            return None
        extra = {} if sub_id is None else {"subscription": sub_id}
        return codec.encode_event("message", id=envelope.id, topic=envelope.topic, payload=view.payload,
                                  origin=envelope.origin, created=envelope.created, **extra,
                                  **{"from": view.signer}, encrypted=view.encrypted, pow=reached)

    def _hold(self, sub: Subscription, message_id: str, frame: bytes) -> None:
        """A live event for a subscription still replaying its ``since``:
        kept for after it, within ``send_queue`` bytes (the oldest dropped
        beyond, as a full send queue would)."""
        held = sub.held
        assert held is not None
        held.append((message_id, frame))
        sub.held_bytes += len(frame)
        # Bounded per connection, as its send queue is: not once for each
        # of its subscriptions that replays.
        state = sub.conn.fox_state
        total = state.get("held_bytes", 0) + len(frame)
        while len(held) > 1 and (sub.held_bytes > self.config.max_held_bytes
                                 or total > self.config.max_held_bytes):
            gone = len(held.pop(0)[1])
            sub.held_bytes -= gone
            total -= gone
            self.metrics.send_dropped.labels("subscriber").inc()
        state["held_bytes"] = total

    def _open(self, envelope: Envelope, key_id: str | None, payload: orjson.Fragment | None) -> Opened | None:
        """What a subscription holding ``key_id`` sees of ``envelope``; None:
        nothing (not for it, or it does not open)."""
        if envelope.content is None:
            return Opened(payload, None, None) if key_id is None else None
        if (key_id is None) != (envelope.encrypted is None):
            return None
        try:
            data = base64.b64decode(envelope.content, validate=True)
            under = b""
            if envelope.encrypted is not None:
                key = self.keys.get(key_id) if self.keys is not None and key_id is not None else None
                if key is None:
                    return None  # deleted since the subscription was made
                aad = _sealing_aad(envelope.origin, envelope.topic, envelope.created, envelope.ttl)
                if envelope.encrypted == "sym" and key.type == "sym":
                    data = crypto.open_sym(key.secret, data, aad)
                    under = crypto.sym_key_binding(key.secret)
                elif envelope.encrypted == "asym" and key.pair is not None:
                    data = crypto.open_from(key.pair, data, aad)
                    under = key.pair.public_key[:32]
                else:
                    return None
            content = crypto.unpack(data, _signing_context(envelope.origin, envelope.topic, envelope.created,
                                                           envelope.ttl, envelope.encrypted, under))
            # JSON, or it reaches nobody: the frame must stay valid; and no
            # deeper than a plain payload may be (the codec refuses those in
            # the gossip frame, whose envelope holds them two levels down).
            decoded = orjson.loads(content.payload)
            depth = self.payload_depth
            if (content.payload.count(b"[") + content.payload.count(b"{") > depth
                    and codec._too_deep(decoded, depth)):
                return None
        except (binascii.Error, ValueError, crypto.CannotOpen) as e:
            # orjson.JSONDecodeError is a ValueError; a bad signature is a CannotOpen
            if isinstance(e, crypto.BadSignature):
                self._bad_signature(envelope)
            return None
        return Opened(orjson.Fragment(content.payload), content.signer.hex() if content.signer else None,
                      envelope.encrypted)

    def _bad_signature(self, envelope: Envelope) -> None:
        """Say that a content's signature was not its signer's: at most once
        a minute, with how many since. Such an envelope is valid, and
        forwarded, everywhere (only an opener can tell), so one peer could
        otherwise write a line per envelope at every node."""
        self._bad_signatures += 1
        now = self.reactor.seconds()
        since = now - self._bad_signatures_said
        if since < BAD_SIGNATURE_LOG_INTERVAL:
            return
        if self._bad_signatures == 1:
            log.info("envelope {id} from {origin}: a signature that is not its signer's; not delivered "
                     "(said at most once a minute)", id=envelope.id[:16], origin=envelope.origin[:12])
        else:
            log.info("{n} envelopes with a signature that is not their signer's in {s:.0f} s, not "
                     "delivered; the latest {id} from {origin}", n=self._bad_signatures, s=since,
                     id=envelope.id[:16], origin=envelope.origin[:12])
        self._bad_signatures, self._bad_signatures_said = 0, now

    def on_gossip(self, conn: Any, event: codec.Event) -> None:
        link = self.links.get(conn)
        if link is None:
            return
        raw = event.body.get("envelope")
        message_id = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(message_id, str) and message_id in self.seen:
            # A copy over an eager link: one tree edge too many, make it lazy.
            self.metrics.gossip_received.labels("duplicate").inc()
            self._holds(conn, message_id)
            since = self._grafted_at.pop(message_id, None)
            if since is not None:
                self._late(self.reactor.seconds() - since)
            if not link.lazy:
                link.lazy = True
                conn.send_frame(codec.encode_event("prune"), droppable=True)
            return
        envelope = self.check(conn, raw)
        if envelope is None:
            return
        self.metrics.gossip_received.labels("accepted").inc()
        # Whoever brought us something new is on the tree.
        link.lazy = False
        self.accept(envelope, sender=conn)

    def check(self, conn: Any, raw: Any) -> Envelope | None:
        """An envelope a peer sent, checked as every one is (the sender is
        told why and held to account if it is bad); None if it is refused."""
        message_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            envelope = Envelope.from_json(raw, self.config, self.reactor.seconds())
        except Rejected as e:
            self._reject(conn, message_id, str(e))
            return None
        if self.config.min_pow and envelope.pow(self.reactor.seconds()) < self.config.min_pow:
            # Refused and counted, not forwarded; not held against the peer,
            # whose own minimum may be lower.
            self.metrics.gossip_received.labels("pow").inc()
            log.debug("dropped envelope {id} from {peer}: proof of work below {min_pow:g}",
                      id=envelope.id[:16], peer=conn.node_id[:12], min_pow=self.config.min_pow)
            return None
        if self.screen is not None:
            refused = self.refused_by(envelope)
            if refused is not None:
                # Remembered as seen, so that copies, announcements and
                # catch-up offers of it are not asked about again; not held
                # against the peer, which may run other validators.
                self.seen[envelope.id] = envelope.expires + self.config.max_skew
                self.metrics.gossip_received.labels("validator").inc()
                log.debug("dropped envelope {id} from {peer}: refused by the validator of plugin {plugin}",
                          id=envelope.id[:16], peer=conn.node_id[:12], plugin=refused)
                return None
        return envelope

    def _reject(self, conn: Any, message_id: Any, reason: str) -> None:
        self.metrics.gossip_received.labels(_reason_label(reason)).inc()
        log.info("dropped envelope {id} from {peer}: {reason}", id=str(message_id)[:16],
                 peer=conn.node_id[:12], reason=reason)
        conn.send_frame(codec.encode_event("rejected", id=message_id if isinstance(message_id, str) else None,
                               reason=reason), droppable=True)
        bucket = conn.fox_state.get("abuse")
        if bucket is None:
            bucket = conn.fox_state["abuse"] = TokenBucket(
                self.config.abuse_rate, self.config.abuse_burst, self.reactor.seconds)
        if not bucket.take():
            log.warn("disconnecting {peer}: too many bad envelopes", peer=conn.node_id[:12])
            conn.close(CLOSE_ABUSE, "too many bad envelopes")

    def on_ihave(self, conn: Any, event: codec.Event) -> None:
        link = self.links.get(conn)
        if link is None:
            return
        ids = event.body.get("ids")
        if not isinstance(ids, list):
            return
        for message_id in ids[:1000]:
            if not is_message_id(message_id):
                continue
            if message_id in self.seen:
                self._holds(conn, message_id)
                continue
            waiting = self.missing.get(message_id)
            if waiting is not None:
                self._add_announcer(waiting[1], link)
                continue
            # Each link its share of the table: one announcing made-up ids
            # must not keep it full, or honest announcements go unheard and
            # the tree cannot be repaired.
            capacity = self.config.cache_capacity
            if len(self.missing) >= capacity or link.awaited >= capacity // max(1, len(self.links)):
                continue
            timer = self.reactor.callLater(self.graft_wait(), self._graft, message_id)
            self.missing[message_id] = Awaited(timer, [link], self.reactor.seconds())
            self._awaited_by[message_id] = link
            link.awaited += 1

    def _add_announcer(self, announcers: list[Link], link: Link) -> None:
        if link in announcers:
            return
        if len(announcers) >= len(self.links):
            # Links that went down stay listed until a graft passes them
            # over; dropped here, the list stays within the live links
            # however fast peers come and go.
            announcers[:] = [a for a in announcers if self.links.get(a.conn) is a]
        announcers.append(link)

    def _graft(self, message_id: str) -> None:
        waiting = self.missing.get(message_id)
        if waiting is None or message_id in self.seen:
            self._unawait(message_id)
            return
        announcers = waiting.announcers
        while announcers:
            link = announcers.pop(0)
            if self.links.get(link.conn) is not link:
                continue  # that link is down
            link.lazy = False
            link.conn.send_frame(codec.encode_event("graft", ids=[message_id]))
            timer = self.reactor.callLater(self.graft_wait() * 2, self._graft, message_id)
            self.missing[message_id] = waiting._replace(timer=timer, grafted=waiting.grafted + (link.conn,))
            return
        self._unawait(message_id)

    def on_graft(self, conn: Any, event: codec.Event) -> None:
        link = self.links.get(conn)
        if link is None:
            return
        link.lazy = False
        ids = event.body.get("ids")
        if not isinstance(ids, list):
            return
        stored = []
        for message_id in ids[:1000]:
            cached = self.cache.get(message_id) if isinstance(message_id, str) else None
            if cached is None:
                if self.history is not None and is_message_id(message_id):
                    stored.append(message_id)  # out of the cache, maybe still kept
                continue
            if conn.send_frame(cached.frame, droppable=True):
                self.metrics.gossip_sent.inc()
        if stored and self.history is not None:
            for row in self.history.rows(stored):
                if conn.send_frame(codec.exact(b'{"event":"gossip","envelope":' + row.envelope + b"}"),
                                   droppable=True):
                    self.metrics.gossip_sent.inc()

    def on_prune(self, conn: Any, event: codec.Event) -> None:
        link = self.links.get(conn)
        if link is not None:
            link.lazy = True

    def on_rejected(self, conn: Any, event: codec.Event) -> None:
        if conn in self.links:
            log.warn("peer {peer} rejected our envelope {id}: {reason}", peer=conn.node_id[:12],
                     id=str(event.body.get("id"))[:16], reason=str(event.body.get("reason"))[:200])

    # -- bounded memory ------------------------------------------------------------

    def _trim(self) -> None:
        while self.cache and (len(self.cache) > self.config.cache_capacity
                              or self._cache_bytes > self.config.cache_bytes):
            self._uncache()
        while len(self.seen) > self.config.seen_capacity:
            # Full of live ids: forgetting the oldest risks a re-delivery of
            # it only if someone replays it before it expires.
            self.seen.popitem(last=False)

    def sweep(self) -> None:
        """Forget expired ids and old cached envelopes."""
        now = self.reactor.seconds()
        for message_id in [m for m, until in self.seen.items() if until < now]:
            del self.seen[message_id]
        horizon = now - self.config.cache_seconds
        while self.cache:
            oldest = next(iter(self.cache.values()))
            if oldest.created >= horizon and oldest.expires >= now:
                break
            self._uncache()

    def _uncache(self) -> None:
        _, cached = self.cache.popitem(last=False)
        self._cache_bytes -= len(cached.frame) + CACHE_ENTRY_BYTES


def _reason_label(reason: str) -> str:
    for label in ("tampered", "forged", "expired", "future", "ttl", "payload"):
        if label in reason:
            return label
    return "malformed"
