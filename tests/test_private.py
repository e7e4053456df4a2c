"""Private, signed and paid-for messages in gossip, without sockets: what
publish seals, what each subscription receives, what a node refuses."""

from __future__ import annotations

import base64

import attrs
import orjson
import pytest
from twisted.internet.task import Clock

from foxnode import codec, crypto, identity
from foxnode.config import GossipConfig
from foxnode.gossip import Envelope, Gossip, Rejected, _sealing_aad
from foxnode.keys import KEY_FILE, KeyStore
from foxnode.metrics import NodeMetrics
from foxnode.testing import FakeConnection, InlineWriter

OPERATOR = FakeConnection()
OPERATOR.trusted = True


def setup(tmp_path, **config):
    clock = Clock()
    clock.advance(1_800_000_000)
    keys = KeyStore(clock, tmp_path / KEY_FILE)
    keys._writer = InlineWriter()
    gossip = Gossip(clock, identity.Identity.generate(), NodeMetrics(), GossipConfig(**config), keys=keys)
    return clock, keys, gossip


def key(keys, args):
    reply = keys.ops["newkey"](OPERATOR, args)
    got = []
    reply.addCallback(got.append)
    return got[0].response


def subscriber(gossip, **filters):
    conn = FakeConnection()
    reply = gossip.op_subscribe(conn, {"topics": ["t"], **filters})
    assert reply.status == 200, reply
    return conn, reply.response["subscription"]


def messages(conn):
    return [e.body for e in conn.events() if isinstance(e, codec.Event) and e.name == "message"]


def publish(clock, gossip, **args):
    reply = gossip.op_publish(OPERATOR, {"topic": "t", "payload": {"n": 1}, **args})
    clock.advance(0)
    return reply


def test_each_subscription_receives_what_its_key_opens(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    sym = key(keys, {"type": "sym"})["id"]
    other = key(keys, {"type": "sym"})["id"]
    reader = key(keys, {"type": "asym"})
    signer = key(keys, {"type": "asym"})
    plain, _ = subscriber(gossip)
    with_sym, sym_sub = subscriber(gossip, key=sym)
    with_other, _ = subscriber(gossip, key=other)
    with_asym, _ = subscriber(gossip, key=reader["id"])
    only_signer, _ = subscriber(gossip, key=sym, **{"from": [signer["public_key"]]})
    only_reader, _ = subscriber(gossip, key=sym, **{"from": [reader["public_key"]]})

    assert publish(clock, gossip, key=sym, sign=signer["id"]).status == 202
    assert publish(clock, gossip, to=reader["public_key"]).status == 202
    assert publish(clock, gossip, sign=signer["id"]).status == 202  # signed, not sealed
    assert publish(clock, gossip).status == 202

    [m] = messages(with_sym)
    assert m["payload"] == {"n": 1} and m["from"] == signer["public_key"] and m["encrypted"] == "sym"
    assert m["subscription"] == sym_sub and isinstance(m["pow"], float)
    assert messages(with_other) == []
    [m] = messages(with_asym)
    assert m["encrypted"] == "asym" and m["from"] is None
    assert [m["from"] for m in messages(plain)] == [signer["public_key"], None]
    assert all(m["encrypted"] is None for m in messages(plain))
    assert len(messages(only_signer)) == 1 and messages(only_reader) == []


def test_what_travels_is_unreadable_without_the_key(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    sym = key(keys, {"type": "sym"})["id"]
    peer = FakeConnection(node_id="ab" * 32)
    gossip.peer_up(peer)
    publish(clock, gossip, key=sym, payload={"password": "hunter2"})
    [frame] = peer.sent
    envelope = orjson.loads(frame)["envelope"]
    assert envelope["payload"] is None and envelope["encrypted"] == "sym"
    assert b"hunter2" not in frame and b"password" not in frame
    assert envelope["topic"] == "t"  # readable, so every node forwards it


def test_sealed_content_moved_tampered_or_forged_reaches_nobody(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    sym_key = key(keys, {"type": "sym"})
    signer = key(keys, {"type": "asym"})
    secret = bytes.fromhex(reply_secret(keys, sym_key["id"]))
    sub, _ = subscriber(gossip, key=sym_key["id"])
    me = identity.Identity.generate()
    now = clock.seconds()

    def deliver(content, topic="t"):
        gossip.deliver(Envelope.create(me, topic, None, 60, now, "sym", base64.b64encode(content).decode()))

    aad = _sealing_aad(me.node_id, "t", round(now, 3), 60)
    good = crypto.seal_sym(secret, crypto.pack(b'{"n":1}', None), aad)
    deliver(good)
    assert len(messages(sub)) == 1
    # sealed for another topic (the topic is in the associated data)
    deliver(crypto.seal_sym(secret, crypto.pack(b'{"n":1}'), _sealing_aad(me.node_id, "u", round(now, 3), 60)))
    tampered = bytearray(good)
    tampered[20] ^= 1
    deliver(bytes(tampered))
    # signed by one key, naming another as the signer
    pair = keys.get(signer["id"]).pair
    forged = bytearray(crypto.pack(b'{"n":1}', crypto.KeyPair.generate()))
    forged[1:65] = pair.public_key
    deliver(crypto.seal_sym(secret, bytes(forged), aad))
    # not JSON inside
    deliver(crypto.seal_sym(secret, crypto.pack(b"{not json"), aad))
    assert len(messages(sub)) == 1
    # the key deleted: nothing opens any more
    keys.ops["delkey"](OPERATOR, {"id": sym_key["id"]})
    deliver(good)
    assert len(messages(sub)) == 1


def published(clock, gossip, **args):
    """The envelope (as JSON) of a publish by the operator."""
    reply = publish(clock, gossip, **args)
    assert reply.status == 202, reply
    return orjson.loads(gossip.cache[reply.response["id"]].frame)["envelope"]


def test_a_signature_names_where_and_when_it_was_given(tmp_path):
    # What "from" says must hold for the message a reader gets, not only
    # for its payload: someone who can read a signed content (anyone, when
    # it is only signed; a key holder, when it is sealed) must not make
    # it say "from" its signer on another topic, to another reader, under
    # another key, from another node, or later.
    clock, keys, gossip = setup(tmp_path)
    alice = key(keys, {"type": "asym"})
    bob, carol = key(keys, {"type": "asym"}), key(keys, {"type": "asym"})
    sym, other_sym = key(keys, {"type": "sym"}), key(keys, {"type": "sym"})
    mallory = identity.Identity.generate()
    only_alice = {"from": [alice["public_key"]]}
    now = clock.seconds()

    def reaches(sub, envelope):
        before = len(messages(sub))
        gossip.deliver(envelope)
        return len(messages(sub)) - before

    def rewrapped(env, **change):
        fields = dict(origin=None, topic=env["topic"], created=env["created"], ttl=env["ttl"],
                      encrypted=env["encrypted"], content=env["content"])
        fields.update(change)
        ident = fields.pop("origin") or mallory
        return Envelope.create(ident, fields.pop("topic"), None, fields.pop("ttl"), fields.pop("created"),
                               fields.pop("encrypted"), fields.pop("content"))

    # Signed, not sealed: its content is readable by every node.
    signed = published(clock, gossip, sign=alice["id"])
    on_t, _ = subscriber(gossip, **only_alice)
    admin = FakeConnection()
    gossip.op_subscribe(admin, {"topics": ["admin"], **only_alice})
    assert reaches(on_t, Envelope.from_json(signed, gossip.config, clock.seconds())) == 1
    assert reaches(admin, rewrapped(signed, topic="admin")) == 0, "moved to another topic"
    assert reaches(on_t, rewrapped(signed)) == 0, "sent on by another node"
    assert reaches(on_t, rewrapped(signed, created=now + 20)) == 0, "replayed later"

    # Sealed to bob: bob must not pass alice's words on to carol as hers to carol.
    to_bob = published(clock, gossip, sign=alice["id"], to=bob["public_key"])
    aad = _sealing_aad(to_bob["origin"], "t", to_bob["created"], to_bob["ttl"])
    inner = crypto.open_from(keys.get(bob["id"]).pair, base64.b64decode(to_bob["content"]), aad)
    carols, _ = subscriber(gossip, key=carol["id"], **only_alice)
    to_carol = crypto.seal_to(bytes.fromhex(carol["public_key"]), inner, aad)
    assert reaches(carols, rewrapped(to_bob, origin=gossip.signer,
                                     content=base64.b64encode(to_carol).decode())) == 0

    # Sealed with one sym key: resealed under another by one who holds both.
    with_sym = published(clock, gossip, sign=alice["id"], key=sym["id"])
    aad = _sealing_aad(with_sym["origin"], "t", with_sym["created"], with_sym["ttl"])
    inner = crypto.open_sym(keys.get(sym["id"]).secret, base64.b64decode(with_sym["content"]), aad)
    others, _ = subscriber(gossip, key=other_sym["id"], **only_alice)
    resealed = crypto.seal_sym(keys.get(other_sym["id"]).secret, inner, aad)
    assert reaches(others, rewrapped(with_sym, origin=gossip.signer,
                                     content=base64.b64encode(resealed).decode())) == 0
    # Each as it was published reaches its reader.
    bobs, _ = subscriber(gossip, key=bob["id"], **only_alice)
    syms, _ = subscriber(gossip, key=sym["id"], **only_alice)
    assert reaches(bobs, Envelope.from_json(to_bob, gossip.config, clock.seconds())) == 1
    assert reaches(syms, Envelope.from_json(with_sym, gossip.config, clock.seconds())) == 1


def test_a_sealed_content_cannot_be_replayed_in_another_envelope(tmp_path):
    # The sealing bound only the topic: anyone, without the key, could copy
    # a sealed content into an envelope of their own (another origin, a
    # later time) and every reader holding the key got the private message
    # again, opened, as a new one.
    clock, keys, gossip = setup(tmp_path)
    sym, reader = key(keys, {"type": "sym"}), key(keys, {"type": "asym"})
    mallory = identity.Identity.generate()
    for sealing in ({"key": sym["id"]}, {"to": reader["public_key"]}):
        sub, _ = subscriber(gossip, key=sym["id"] if "key" in sealing else reader["id"])
        original = published(clock, gossip, **sealing)
        assert len(messages(sub)) == 1
        for origin, created in ((mallory, clock.seconds()), (mallory, original["created"])):
            copy = Envelope.create(origin, "t", None, original["ttl"], created, original["encrypted"],
                                   original["content"])
            gossip.deliver(copy)
        assert len(messages(sub)) == 1, sealing


def test_a_sealed_payload_nests_no_deeper_than_a_plain_one_may(tmp_path):
    # A plain payload deeper than the codec's limit never gets past a
    # node's decoding of the gossip frame; one inside a content (sealed or
    # only signed) was opened and pushed to subscribers, whose clients
    # (foxnode's own: 64 levels) then refuse the event.
    from foxnode.config import MAX_DEPTH

    clock, keys, gossip = setup(tmp_path)
    plain, _ = subscriber(gossip)
    me = identity.Identity.generate()
    now = clock.seconds()

    def deliver(depth):
        payload = b"[" * depth + b"]" * depth
        env = Envelope.create(me, "t", None, 60, now, None, base64.b64encode(crypto.pack(payload)).decode())
        gossip.deliver(env)
        codec.decode(plain.sent[-1])  # what was pushed, the client's codec takes

    deliver(MAX_DEPTH - 2)  # as deep as a plain payload in a gossip frame may be
    assert len(messages(plain)) == 1
    deliver(500)
    assert len(messages(plain)) == 1


def test_bad_inner_signatures_cannot_flood_the_log(tmp_path):
    # A content's signature is checked only where it is opened, so the
    # envelope carrying a bad one is valid, and forwarded, everywhere: one
    # peer sending 1,000 a second wrote 1,000 lines a second at every node
    # with a subscriber on the topic. Said once a minute, with a count.
    from twisted.logger import formatEvent, globalLogPublisher

    clock, keys, gossip = setup(tmp_path)
    plain, _ = subscriber(gossip)
    me, alice = identity.Identity.generate(), crypto.KeyPair.generate()
    lines = []

    def observe(event):
        if event.get("log_namespace") == "foxnode.gossip" and "signature" in formatEvent(event):
            lines.append(formatEvent(event))

    def flood(n):
        for i in range(n):
            forged = bytearray(crypto.pack(b'{"n":%d}' % i, alice))
            forged[70] ^= 1  # the signature
            gossip.deliver(Envelope.create(me, "t", None, 60, clock.seconds(), None,
                                           base64.b64encode(bytes(forged)).decode()))

    globalLogPublisher.addObserver(observe)
    try:
        flood(200)
        assert len(lines) == 1, lines
        clock.advance(61)
        flood(5)
        assert len(lines) == 2 and "200" in lines[1], lines
    finally:
        globalLogPublisher.removeObserver(observe)
    assert messages(plain) == []


def test_a_validator_sees_the_signer_of_a_signed_message(tmp_path):
    # Validators (plugins) see a signed-only message's signer once its
    # signature holds, over the same context readers check it over.
    clock, keys, gossip = setup(tmp_path)
    alice = key(keys, {"type": "asym"})
    signed = Envelope.from_json(published(clock, gossip, sign=alice["id"]), gossip.config, clock.seconds())
    seen = gossip.view(signed)
    assert seen["from"] == alice["public_key"] and seen["payload"] == {"n": 1}
    moved = Envelope.create(identity.Identity.generate(), "t", None, signed.ttl, signed.created, None,
                            signed.content)
    assert gossip.view(moved)["from"] is None


def reply_secret(keys, key_id):
    return keys.ops["getkey"](OPERATOR, {"id": key_id, "secret": True}).response["key"]


def test_publish_refuses_bad_sealing_arguments_naming_them(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    sym = key(keys, {"type": "sym"})["id"]
    asym = key(keys, {"type": "asym"})
    cases = [
        ({"key": "ab" * 32}, 404, "is not known"), ({"key": 5}, 400, '"key"'),
        ({"key": asym["id"]}, 400, '"key"'), ({"key": sym, "to": asym["public_key"]}, 400, '"to"'),
        ({"to": "ab" * 32}, 400, '"to"'), ({"to": 7}, 400, '"to"'),
        ({"sign": sym}, 400, '"sign"'), ({"sign": "x"}, 404, "is not known"),
        ({"pow": -1}, 400, '"pow"'), ({"pow": "1"}, 400, '"pow"'), ({"pow": True}, 400, '"pow"'),
        ({"pow_time": 11}, 400, '"pow_time"'), ({"pow_time": -1}, 400, '"pow_time"'),
    ]
    for args, status, named in cases:
        reply = publish(clock, gossip, **args)
        assert reply.status == status and named in reply.error, (args, reply)
    assert gossip.seen == {}


#: X25519 points of small order (RFC 7748 section 7, libsodium's blacklist):
#: every shared secret with them is all zeros, so nothing can be sealed to them
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"),
             bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
             bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
             bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_publish_to_a_low_order_point_is_a_400_not_an_exception(tmp_path, point):
    # A "to" whose X25519 half has no shared secret with anyone made
    # seal_to raise ValueError inside the op: a 500 for a stranger's input.
    clock, keys, gossip = setup(tmp_path)
    signing_half = key(keys, {"type": "asym"})["public_key"][64:]
    reply = publish(clock, gossip, to=point.hex() + signing_half)
    assert reply.status == 400 and '"to"' in reply.error, reply
    assert gossip.seen == {}


def test_subscribe_and_unsubscribe_arguments(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    sym = key(keys, {"type": "sym"})["id"]
    conn = FakeConnection()
    for args, status, named in [
        ({"key": "nope"}, 404, "is not known"), ({"key": 1}, 400, '"key"'),
        ({"from": []}, 400, '"from"'), ({"from": ["ab"]}, 400, '"from"'), ({"from": "ab"}, 400, '"from"'),
        ({"min_pow": -1}, 400, '"min_pow"'), ({"min_pow": None}, 400, '"min_pow"'),
    ]:
        reply = gossip.op_subscribe(conn, {"topics": ["t"], **args})
        assert reply.status == status and named in reply.error, (args, reply)
    one = gossip.op_subscribe(conn, {"topics": ["t", "u"], "key": sym}).response["subscription"]
    two = gossip.op_subscribe(conn, {"topics": ["t"]}).response["subscription"]
    assert gossip.op_unsubscribe(conn, {"subscription": "zz"}).status == 404
    assert gossip.op_unsubscribe(conn, {"subscription": 3}).status == 400
    assert gossip.op_unsubscribe(conn, {"subscription": one, "topics": ["t"]}).status == 400
    assert gossip.op_unsubscribe(conn, {}).status == 400
    reply = gossip.op_unsubscribe(conn, {"subscription": one})
    assert reply.response == {"subscription": one, "topics": ["t"]}
    assert {s.id for s in gossip.subscribers["t"]} == {two} and "u" not in gossip.subscribers
    assert gossip.op_unsubscribe(conn, {"topics": ["t"]}).response == {"topics": []}
    assert gossip.subscribers == {} and conn.fox_state["subscriptions"] == {}
    # bounded per connection
    small = setup(tmp_path / "s", max_subscriptions_per_connection=2)[2]
    for _ in range(2):
        assert small.op_subscribe(conn, {"topics": ["t"]}).status == 200
    assert small.op_subscribe(conn, {"topics": ["t"]}).status == 400
    small.connection_closed(conn)
    assert small.subscribers == {}


def test_pow_is_reached_checked_and_refused_below_the_minimum(tmp_path):
    # 4.0 needs some 16 leading zero bits here: a chance envelope has 1 in 65,536
    clock, keys, gossip = setup(tmp_path, min_pow=4.0)
    me = identity.Identity.generate()
    now = clock.seconds()
    peer = FakeConnection(node_id=me.node_id)
    gossip.peer_up(peer)
    body_args = (me.node_id, "t", {"n": 1}, now, 60)
    cheap = Envelope.create(me, "t", {"n": 1}, 60, now)
    assert cheap.pow() < 4.0
    gossip.on_gossip(peer, codec.Event("gossip", {"envelope": cheap.to_json()}))
    assert cheap.id not in gossip.seen
    assert gossip.metrics.gossip_received.labels("pow")._value.get() == 1
    assert peer.closed == [] and peer.sent == []  # not held against the peer
    # worked for: taken
    from foxnode.gossip import _body
    nonce = "00" * 8
    body = _body(*body_args[:3], round(now, 3), 60, nonce)
    found = crypto.work(body, 60, target=4.0, max_seconds=60)
    paid = Envelope.create(me, "t", {"n": 1}, 60, now, work=found.nonce, nonce=nonce)
    assert paid.pow() == found.pow >= 4.0
    gossip.on_gossip(peer, codec.Event("gossip", {"envelope": paid.to_json()}))
    assert paid.id in gossip.seen
    # the work nonce is covered by the id, and so by the origin's signature
    raw = dict(paid.to_json(), work=paid.work + 1)
    with pytest.raises(Rejected, match="tampered"):
        Envelope.from_json(raw, gossip.config, now)
    # a plain publish below this node's own minimum is refused, naming "pow"
    reply = gossip.op_publish(OPERATOR, {"topic": "t", "payload": 1})
    assert reply.status == 400 and '"pow"' in reply.error


def test_an_envelope_created_early_pays_for_the_time_it_lives_beyond_its_ttl(tmp_path):
    # Created max_skew (30 s) ahead with a TTL of 1 s, an envelope lives 31 s
    # at every node; priced for 1 s, it paid a 31st of what an honest one
    # pays for its lifetime. Whisper (EIP-627) adds the seconds it is early.
    from foxnode.gossip import _body

    clock, keys, gossip = setup(tmp_path, min_pow=1.0)
    me = identity.Identity.generate()
    now = clock.seconds()
    peer = FakeConnection(node_id=me.node_id)
    gossip.peer_up(peer)
    early, nonce = now + 29, "00" * 8
    body = _body(me.node_id, "t", {"n": 1}, round(early, 3), 1, nonce)
    # Work enough for a TTL of 1 s, not for the 30 s it lives.
    work = next(w for w in range(1 << 24)
                if crypto.pow_of(body, w, 1) >= 1.0 > crypto.pow_of(body, w, 30))
    cheap = Envelope.create(me, "t", {"n": 1}, 1, early, work=work, nonce=nonce)
    assert cheap.pow() >= 1.0
    gossip.on_gossip(peer, codec.Event("gossip", {"envelope": cheap.to_json()}))
    assert cheap.id not in gossip.seen
    assert gossip.metrics.gossip_received.labels("pow")._value.get() == 1
    assert cheap.pow(now) < 1.0
    # Once its time has come, the same envelope is what it says.
    clock.advance(29)
    assert cheap.pow(clock.seconds()) == cheap.pow()
    gossip.on_gossip(peer, codec.Event("gossip", {"envelope": cheap.to_json()}))
    assert cheap.id in gossip.seen


def test_a_signature_padded_with_whitespace_is_refused(tmp_path):
    # bytes.fromhex skips whitespace: a signature spread out with spaces
    # verified, and the envelope went on with up to a whole message of
    # them, outside the size check and the proof of work, which cover the
    # body only: --min-pow paid for 200 bytes carried a megabyte.
    clock, keys, gossip = setup(tmp_path)
    me = identity.Identity.generate()
    peer = FakeConnection(node_id=me.node_id)
    gossip.peer_up(peer)
    good = Envelope.create(me, "t", {"n": 1}, 60, clock.seconds()).to_json()
    spread = " ".join(good["sig"][i:i + 2] for i in range(0, len(good["sig"]), 2)) + " " * 100_000
    for sig in (spread, good["sig"] + " ", " " + good["sig"]):
        gossip.on_gossip(peer, codec.Event("gossip", {"envelope": dict(good, sig=sig)}))
        assert good["id"] not in gossip.seen
        with pytest.raises(Rejected, match="malformed signature"):
            Envelope.from_json(dict(good, sig=sig), gossip.config, clock.seconds())
    assert not identity.verify(me.node_id, spread, b"x")
    gossip.on_gossip(peer, codec.Event("gossip", {"envelope": good}))
    assert good["id"] in gossip.seen


def test_other_clients_cannot_take_every_proof_of_work_slot(tmp_path, monkeypatch):
    # Two searches of up to 10 s each, from anyone: one client holding both
    # (a request every 5 s) kept two cores hashing and every other publisher
    # with "pow" at 429, the operator too. One slot is the operator's.
    from twisted.internet.defer import Deferred

    clock, keys, gossip = setup(tmp_path)
    assert gossip.config.max_works == 2
    searches: list[Deferred] = []
    monkeypatch.setattr(crypto, "work_in_thread", lambda *a, **kw: searches.append(Deferred()) or searches[-1])

    def stranger_publishes(host):
        reply = gossip.op_publish(FakeConnection(remote_host=host), {"topic": "t", "payload": 1, "pow": 1,
                                                                     "pow_time": 10})
        return reply

    first = stranger_publishes("10.0.0.1")
    assert not isinstance(first, codec.Reply)  # a search
    refused = stranger_publishes("10.0.0.2")
    assert isinstance(refused, codec.Reply) and refused.status == 429 and "operator" in refused.error, refused
    assert not isinstance(publish(clock, gossip, pow=1), codec.Reply)  # the operator's slot
    assert len(searches) == 2
    # The stranger's search over, a stranger may search again.
    searches[0].errback(RuntimeError("stopped"))
    first.addErrback(lambda f: None)
    assert not isinstance(stranger_publishes("10.0.0.2").addErrback(lambda f: None), codec.Reply)


def test_subscriptions_are_bounded_per_client_address_across_its_connections(tmp_path):
    # Each subscription gets a frame of its own per message: 32 connections
    # of one address with 64 subscriptions each made every 64 KiB publish on
    # their topic cost the node 2,048 frames (128 MiB of copying), one
    # request buying some 2,000 times its work.
    clock, keys, gossip = setup(tmp_path)
    cap = getattr(gossip.config, "max_subscriptions_per_ip", 256)  # the default
    per_conn = gossip.config.max_subscriptions_per_connection
    conns = [FakeConnection(remote_host="2001:db8::%x" % n) for n in range(1, 33)]  # one /64
    taken = 0
    for conn in conns:
        for _ in range(per_conn):
            reply = gossip.op_subscribe(conn, {"topics": ["t"]})
            if reply.status != 200:
                break
            taken += 1
    assert taken == cap < len(conns) * per_conn
    assert reply.status == 429 and "2001:db8::/64" in reply.error, reply
    # Another address, and the operator, are not held to that address's count.
    assert gossip.op_subscribe(FakeConnection(remote_host="10.0.0.1"), {"topics": ["t"]}).status == 200
    assert gossip.op_subscribe(OPERATOR, {"topics": ["t"]}).status == 200
    # What a connection held comes back when it closes, or unsubscribes.
    gossip.connection_closed(conns[0])
    assert gossip.op_subscribe(conns[-1], {"topics": ["t"]}).status == 200
    sub = gossip.op_subscribe(conns[-1], {"topics": ["t"]}).response["subscription"]
    gossip.op_unsubscribe(conns[-1], {"subscription": sub})
    assert gossip.op_subscribe(conns[-1], {"topics": ["t"]}).status == 200


def test_a_plain_envelope_goes_as_before_and_sealed_fields_are_checked(tmp_path):
    clock, keys, gossip = setup(tmp_path)
    me = identity.Identity.generate()
    now = clock.seconds()
    plain = Envelope.create(me, "t", {"n": 1}, 60, now)
    assert set(plain.to_json()) == {"id", "origin", "topic", "payload", "created", "ttl", "nonce", "sig"}
    assert Envelope.from_json(plain.to_json(), gossip.config, now) == plain
    sealed = Envelope.create(me, "t", None, 60, now, "sym", base64.b64encode(b"x" * 40).decode())
    assert Envelope.from_json(sealed.to_json(), gossip.config, now) == sealed
    for change, why in [({"encrypted": "rsa"}, "encrypted"), ({"encrypted": 1}, "encrypted"),
                        ({"content": 5}, "content"), ({"content": None}, "content"),
                        ({"payload": 1}, "content"), ({"work": -1}, "work"), ({"work": 1.5}, "work"),
                        ({"work": True}, "work"), ({"content": "x" * 200_000}, "content")]:
        with pytest.raises(Rejected, match=why):
            Envelope.from_json(dict(sealed.to_json(), **change), gossip.config, now)
    assert attrs.fields_dict(Envelope)["work"].default == 0


def test_proof_of_work_searches_are_bounded_and_their_slot_comes_back(tmp_path, monkeypatch):
    from twisted.internet.defer import Deferred

    clock, keys, gossip = setup(tmp_path, max_works=2)
    searches: list[tuple] = []

    def held(reactor, body, ttl, target, seconds, size=None):
        d = Deferred()
        searches.append((body, ttl, target, seconds, d))
        return d

    monkeypatch.setattr(crypto, "work_in_thread", held)
    first = publish(clock, gossip, pow=0.5, pow_time=1)
    second = publish(clock, gossip, pow=0.5)
    assert [s[3] for s in searches] == [1, gossip.config.pow_time]
    refused = publish(clock, gossip, pow=0.5)
    assert refused.status == 429 and "proof-of-work" in refused.error
    body, ttl, target, _, d = searches[0]
    d.callback(crypto.work(body, ttl, target, 30))
    got = []
    first.addCallback(got.append)
    assert got[0].status == 202 and got[0].response["pow"] >= 0.5
    clock.advance(0)
    assert got[0].response["id"] in gossip.seen
    # its slot is free again; a failed search frees its slot too
    third = publish(clock, gossip, pow=0.5)
    searches[1][4].errback(RuntimeError("thread pool stopped"))
    second.addErrback(lambda f: None)
    assert len(searches) == 3 and not isinstance(third, codec.Reply)
    assert not isinstance(publish(clock, gossip, pow=0.5), codec.Reply)  # a search, not a 429
