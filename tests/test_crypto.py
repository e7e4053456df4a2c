"""The message cryptography (crypto.py): round trips, and every way of not
opening fails with ``CannotOpen``, never with garbage."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import pytest_twisted

from foxnode import crypto
from foxnode.crypto import BadSignature, CannotOpen, KeyPair


def test_sym_round_trip_and_fresh_nonces():
    key = crypto.new_sym_key()
    a = crypto.seal_sym(key, b"hello", aad=b"topic")
    b = crypto.seal_sym(key, b"hello", aad=b"topic")
    assert a != b  # a random nonce each time
    assert crypto.open_sym(key, a, aad=b"topic") == b"hello"
    assert crypto.open_sym(key, crypto.seal_sym(key, b"")) == b""


def test_sym_wrong_key_tampering_and_wrong_aad_fail_cleanly():
    key = crypto.new_sym_key()
    sealed = crypto.seal_sym(key, b"secret payload", aad=b"t")
    with pytest.raises(CannotOpen):
        crypto.open_sym(crypto.new_sym_key(), sealed, aad=b"t")
    with pytest.raises(CannotOpen):
        crypto.open_sym(key, sealed, aad=b"another topic")
    for i in (0, 12, len(sealed) - 1):  # the nonce, the ciphertext, the tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(CannotOpen):
            crypto.open_sym(key, bytes(bad), aad=b"t")
    for cut in (b"", sealed[:5], sealed[:27], sealed[:-1]):
        with pytest.raises(CannotOpen):
            crypto.open_sym(key, cut, aad=b"t")


def test_asym_round_trip_only_the_recipient_opens():
    alice, bob = KeyPair.generate(), KeyPair.generate()
    sealed = crypto.seal_to(bob.public_key, b"for bob", aad=b"t")
    assert crypto.open_from(bob, sealed, aad=b"t") == b"for bob"
    # the ephemeral key is fresh every time
    assert crypto.seal_to(bob.public_key, b"for bob")[:32] != crypto.seal_to(bob.public_key, b"for bob")[:32]
    with pytest.raises(CannotOpen):
        crypto.open_from(alice, sealed, aad=b"t")
    with pytest.raises(CannotOpen):
        crypto.open_from(bob, sealed, aad=b"u")
    for i in (0, 31, 32, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 0x80
        with pytest.raises(CannotOpen):
            crypto.open_from(bob, bytes(bad), aad=b"t")
    # a low-order "ephemeral key" (all zeros): refused, not an exception of its own
    with pytest.raises(CannotOpen):
        crypto.open_from(bob, bytes(32) + sealed[32:], aad=b"t")
    with pytest.raises(CannotOpen):
        crypto.open_from(bob, sealed[:40])


def test_a_key_pair_is_its_seed():
    seed = bytes(range(32))
    assert KeyPair(seed).public_key == KeyPair(seed).public_key
    assert len(KeyPair(seed).public_key) == crypto.PUBLIC_KEY_SIZE
    assert KeyPair(seed).public_key != KeyPair(bytes(32)).public_key
    # the X25519 and Ed25519 halves are different keys
    pub = KeyPair(seed).public_key
    assert pub[:32] != pub[32:]
    with pytest.raises(ValueError):
        KeyPair(b"short")
    assert crypto.parse_public_key(pub.hex()) == pub
    assert crypto.parse_public_key(pub.hex().upper()) == pub
    for bad in (None, 5, "", pub.hex()[:-2], pub.hex() + "00", "zz" * 64):
        assert crypto.parse_public_key(bad) is None


def test_signed_content_names_its_signer_and_a_forgery_is_detected():
    alice, mallory = KeyPair.generate(), KeyPair.generate()
    content = crypto.pack(b"from alice", alice)
    assert crypto.unpack(content) == (b"from alice", alice.public_key)
    assert crypto.unpack(crypto.pack(b"anon")) == (b"anon", None)
    # mallory signs, but names alice as the signer
    forged = bytearray(crypto.pack(b"from alice", mallory))
    forged[1:65] = alice.public_key
    with pytest.raises(BadSignature):
        crypto.unpack(bytes(forged))
    # the payload changed after signing
    changed = bytearray(content)
    changed[-1] ^= 1
    with pytest.raises(BadSignature):
        crypto.unpack(bytes(changed))
    for bad in (b"", b"\x02abc", b"\x01" + bytes(10)):
        with pytest.raises(CannotOpen):
            crypto.unpack(bad)


def test_signed_and_sealed_round_trip():
    alice, bob = KeyPair.generate(), KeyPair.generate()
    sealed = crypto.seal_to(bob.public_key, crypto.pack(b"hi bob", alice))
    assert crypto.unpack(crypto.open_from(bob, sealed)) == (b"hi bob", alice.public_key)


def test_the_same_password_gives_the_same_key_and_another_another():
    a = crypto.password_key("correct horse battery staple")
    assert a == crypto.password_key("correct horse battery staple")
    assert len(a) == crypto.KEY_SIZE
    assert a != crypto.password_key("correct horse battery stapler")
    # the construction, spelled out: another implementation gets the same key
    assert a == hashlib.scrypt(b"correct horse battery staple", salt=b"foxnode sym key v1",
                               n=2**15, r=8, p=1, maxmem=64 * 1024 * 1024, dklen=32)
    for bad in ("", "x" * (crypto.MAX_PASSWORD_BYTES + 1)):
        with pytest.raises(ValueError):
            crypto.password_key(bad)


def test_pow_value_by_hand():
    # 2**zero bits / (size * ttl)
    assert crypto.pow_value(10, 256, 4) == 1.0
    assert crypto.pow_value(0, 100, 10) == 0.001
    assert crypto.leading_zero_bits(bytes([0, 0, 0x10]) + bytes(29)) == 19
    assert crypto.leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert crypto.leading_zero_bits(bytes(32)) == 256
    # a fixed hash: the work hash of body b"envelope" with nonce 0, computed by hand
    digest = hashlib.sha256(b"envelope").digest()
    h = hashlib.sha256(digest + (0).to_bytes(8, "big")).digest()
    assert crypto.work_hash(digest, 0) == h
    bits = 256 - int.from_bytes(h, "big").bit_length()
    assert crypto.pow_of(b"envelope", 0, ttl=10) == 2.0**bits / (8 * 10)
    assert crypto.pow_of(b"envelope", 0, ttl=10, size=100) == 2.0**bits / (100 * 10)


def test_work_reaches_its_target_and_the_value_checks():
    body, ttl = b"x" * 100, 10
    found = crypto.work(body, ttl, target=2.0, max_seconds=30)
    assert found.pow >= 2.0  # 2**11 / 1000 > 2: eleven zero bits, a few thousand tries
    assert crypto.pow_of(body, found.nonce, ttl) == found.pow


def test_work_stops_at_its_time_with_the_best_found():
    ticks = itertools.count()
    # each look at the clock is a second: one batch, then time is up
    found = crypto.work(b"y" * 100, 10, target=1e30, max_seconds=0.5, clock=lambda: next(ticks))
    assert 0 < found.pow < 1e30
    assert crypto.pow_of(b"y" * 100, found.nonce, 10) == found.pow


@pytest_twisted.ensureDeferred
async def test_work_in_a_thread_leaves_the_reactor_answering(reactor):
    from twisted.internet.task import deferLater

    ticks = []
    loop = [deferLater(reactor, 0.01 * i, ticks.append, i) for i in range(5)]
    found = await crypto.work_in_thread(reactor, b"z" * 100, 10, target=1e30, max_seconds=0.5)
    # the reactor's timers ran while the search did
    assert ticks == list(range(5))
    for d in loop:
        await d
    assert crypto.pow_of(b"z" * 100, found.nonce, 10) == found.pow
