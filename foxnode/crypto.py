"""The cryptography of private, signed and paid-for messages (PROTOCOL.md
"Keys" and "Private, signed and paid-for messages"): well-reviewed
constructions of the ``cryptography`` package, put together here once, and
nothing of our own invention beyond how they are framed.

- **Symmetric** (a ``sym`` key, 32 bytes): ChaCha20-Poly1305 (RFC 8439)
  with a random 96-bit nonce, sent in front of the ciphertext. Random
  nonces are safe for well under 2**32 messages per key, far more than a
  Whisper-style topic key ever seals.
- **Asymmetric** (``to`` a public key): ECIES-like, as Whisper's was, but
  on Curve25519: a fresh X25519 key pair per message, its shared secret
  with the recipient's X25519 key through HKDF-SHA256 into a one-time
  ChaCha20-Poly1305 key and nonce (one-time key, so the nonce may be
  derived too). The ephemeral public key travels in front of the
  ciphertext, and both public keys are bound into the HKDF ``info``.
- **Password keys**: scrypt (RFC 7914) with a cost fixed here, the same on
  every node, and a *fixed*, domain-separated salt. Whisper's
  ``shh_generateSymKeyFromPassword`` promises that every node derives the
  same key from the same password, with nothing else shared; a random salt
  would have to be shared too, and then it is a key, not a password. The
  domain separation keeps the key apart from any other use of the same
  password; scrypt's cost is what stands between a weak password and a
  dictionary attack, so topic passwords should be strong.
- **Asymmetric keys**: one 32-byte private seed per key (what ``addkey``
  takes as ``private_key``), from which HKDF-SHA256 derives two
  independent keys, one X25519 (to open what is sent ``to`` it) and one
  Ed25519 (to sign), as libsodium's ``crypto_kdf`` derives subkeys: one key
  never serves two algorithms. Its public key is both public keys, X25519
  then Ed25519 (64 bytes, 128 hex digits): what ``to`` and ``from`` name.
- **Signatures**: Ed25519 over the content *inside* the encryption, so the
  signer is as private as the payload; the signed content carries the
  signer's whole public key, and the signature covers that too, and a
  *context* its caller gives (gossip.py: the envelope's origin, topic,
  times, sealing and reader), which is not sent but known to the verifier.
  Sign-then-encrypt signs only the words unless the signature names where
  they go (Davis, "Defective Sign & Encrypt", 2001): without the context,
  whoever could read a signed content could send it on under another
  topic, to another reader, under another key or later, and it would still
  say "from" its signer.
- **Proof of work**: Whisper's (EIP-627), with SHA-256 for Keccak-256 (see
  ``work_hash`` and ``pow_value``).

Every failure to open is a ``CannotOpen`` (wrong key, tampered or cut
bytes, not ours at all): never garbage, never another exception.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

#: bytes of a sym key, of an asym private seed, of each half of a public key
KEY_SIZE = 32
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 64
NONCE_SIZE = 12
TAG_SIZE = 16
SIGNATURE_SIZE = 64

#: scrypt's cost for password keys: 2**15 (32 MiB, about 0.1 s), RFC
#: 7914's interactive figure and geth's light scrypt N. Fixed: a node with
#: another cost would derive another key from the same password.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
#: scrypt's salt: fixed (see the module's text) and naming its one use
PASSWORD_SALT = b"foxnode sym key v1"
#: the longest password taken, in bytes of UTF-8
MAX_PASSWORD_BYTES = 4096

_X25519_INFO = b"foxnode asym key v1: x25519"
_ED25519_INFO = b"foxnode asym key v1: ed25519"
_SEAL_INFO = b"foxnode sealed to v1"
_SIGNED_DOMAIN = b"foxnode signed content v2\x00"
_SYM_KEY_INFO = b"foxnode signed under sym key v1\x00"

#: the first byte of content (what is sealed): unsigned or signed (2: signed
#: over a context; 1, signed over the payload alone, is no longer taken)
_UNSIGNED = 0
_SIGNED = 2


class CannotOpen(Exception):
    """Sealed or signed bytes that this key does not open, or that were
    changed: the one exception every opening raises."""


class BadSignature(CannotOpen):
    """Content whose signature is not its signer's."""


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


# -- keys ----------------------------------------------------------------------------

def new_sym_key() -> bytes:
    return os.urandom(KEY_SIZE)


def password_key(password: str) -> bytes:
    """The sym key of ``password``: the same on every node (about 0.1 s of
    CPU and 32 MiB: run it off the reactor's thread)."""
    data = password.encode("utf-8")
    if not data or len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"a password has 1 to {MAX_PASSWORD_BYTES} bytes")
    return Scrypt(salt=PASSWORD_SALT, length=KEY_SIZE, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(data)


class KeyPair:
    """An asym key: its seed, and the X25519 and Ed25519 keys derived from it."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an asym private key has {SEED_SIZE} bytes")
        self.seed = seed
        self.x25519 = X25519PrivateKey.from_private_bytes(_hkdf(seed, _X25519_INFO, 32))
        self.ed25519 = Ed25519PrivateKey.from_private_bytes(_hkdf(seed, _ED25519_INFO, 32))
        self.public_key = _raw(self.x25519.public_key()) + _raw(self.ed25519.public_key())

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls(os.urandom(SEED_SIZE))


def _raw(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def parse_public_key(value: Any) -> bytes | None:
    """The bytes of a public key given as hex (128 digits), or None."""
    if not isinstance(value, str) or len(value) != 2 * PUBLIC_KEY_SIZE:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    try:
        X25519PublicKey.from_public_bytes(raw[:32])
        Ed25519PublicKey.from_public_bytes(raw[32:])
    except ValueError:
        return None
    return raw


#: a throwaway key, to try a public key's X25519 half with
_PROBE = X25519PrivateKey.generate()


def can_seal_to(public_key: bytes) -> bool:
    """Whether anything can be sealed to ``public_key`` (what
    ``parse_public_key`` returned): not when its X25519 half is a point of
    small order, whose shared secret with every key is all zeros (OpenSSL
    refuses it). Such a key has no private key behind it: what ``to``
    names must be refused, not met with an exception mid-seal."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public_key[:32]))
    except ValueError:
        return False
    return True


# -- sealing ---------------------------------------------------------------------------

def seal_sym(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """nonce (12) || ChaCha20-Poly1305(key, nonce, plaintext, aad)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sym(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise CannotOpen("too short to be sealed")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        raise CannotOpen("wrong key, or changed on the way") from None


def _one_time(shared: bytes, ephemeral: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    okm = _hkdf(shared, _SEAL_INFO + ephemeral + recipient, KEY_SIZE + NONCE_SIZE)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


def seal_to(public_key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """ephemeral X25519 public key (32) || ChaCha20-Poly1305 ciphertext,
    readable only with the private key of ``public_key`` (64 bytes; its
    X25519 half is used)."""
    recipient = public_key[:32]
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    ephemeral_raw = _raw(ephemeral.public_key())
    key, nonce = _one_time(shared, ephemeral_raw, recipient)
    return ephemeral_raw + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_from(pair: KeyPair, sealed: bytes, aad: bytes = b"") -> bytes:
    if len(sealed) < 32 + TAG_SIZE:
        raise CannotOpen("too short to be sealed")
    ephemeral_raw, body = sealed[:32], sealed[32:]
    try:
        shared = pair.x25519.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    except ValueError:
        # an all-zero shared secret (a low-order point): not sealed to anyone
        raise CannotOpen("not sealed to a public key") from None
    key, nonce = _one_time(shared, ephemeral_raw, pair.public_key[:32])
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise CannotOpen("not sealed to this key, or changed on the way") from None


# -- signed content ------------------------------------------------------------------

class Content(NamedTuple):
    payload: bytes
    #: the signer's public key (64 bytes), None when unsigned
    signer: bytes | None


def sym_key_binding(key: bytes) -> bytes:
    """What a signature under sym key ``key`` names of it: a hash, so that
    the signed bytes (never sent) commit to the key without holding it."""
    return hashlib.sha256(_SYM_KEY_INFO + key).digest()


def _signed_bytes(public_key: bytes, context: bytes, payload: bytes) -> bytes:
    return _SIGNED_DOMAIN + public_key + len(context).to_bytes(4, "big") + context + payload


def pack(payload: bytes, signer: KeyPair | None = None, context: bytes = b"") -> bytes:
    """The content to seal: ``0 || payload``, or ``2 || signer's public key
    (64) || Ed25519 signature (64) || payload``, the signature over a
    domain tag, the public key, ``context`` (not in the content: the
    verifier must know it, see ``unpack``) and the payload."""
    if signer is None:
        return bytes([_UNSIGNED]) + payload
    signature = signer.ed25519.sign(_signed_bytes(signer.public_key, context, payload))
    return bytes([_SIGNED]) + signer.public_key + signature + payload


def unpack(content: bytes, context: bytes = b"") -> Content:
    """The payload and its signer; ``BadSignature`` when the signature is
    not the named signer's over ``context`` (the one ``pack`` was given),
    ``CannotOpen`` when the content is no content."""
    if not content:
        raise CannotOpen("empty content")
    if content[0] == _UNSIGNED:
        return Content(content[1:], None)
    if content[0] != _SIGNED or len(content) < 1 + PUBLIC_KEY_SIZE + SIGNATURE_SIZE:
        raise CannotOpen("not content of this version")
    public_key = content[1:1 + PUBLIC_KEY_SIZE]
    signature = content[1 + PUBLIC_KEY_SIZE:1 + PUBLIC_KEY_SIZE + SIGNATURE_SIZE]
    payload = content[1 + PUBLIC_KEY_SIZE + SIGNATURE_SIZE:]
    try:
        Ed25519PublicKey.from_public_bytes(public_key[32:]).verify(
            signature, _signed_bytes(public_key, context, payload))
    except (InvalidSignature, ValueError):
        raise BadSignature("the signature is not the signer's") from None
    return Content(payload, public_key)


# -- proof of work (EIP-627) ---------------------------------------------------------------

#: nonces tried between two looks at the clock
_BATCH = 4096


def work_hash(body_digest: bytes, nonce: int) -> bytes:
    """SHA-256(SHA-256(envelope without its nonce) || nonce, 8 bytes
    big-endian): Whisper's work hash (Keccak-256 of the envelope's hash and
    its nonce), with SHA-256. ``body_digest`` is the inner hash."""
    return hashlib.sha256(body_digest + nonce.to_bytes(8, "big")).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def pow_value(zero_bits: int, size: int, ttl: int) -> float:
    """Whisper's proof of work: 2**(leading zero bits of the work hash) /
    (size in bytes * TTL in seconds). Bigger and longer-lived envelopes
    cost more work for the same value."""
    return 2.0**zero_bits / (max(1, size) * max(1, ttl))


def pow_of(body: bytes, nonce: int, ttl: int, size: int | None = None) -> float:
    """The proof of work of an envelope: ``body``, its bytes without the
    nonce, whose length is its size unless ``size`` says otherwise."""
    digest = hashlib.sha256(body).digest()
    return pow_value(leading_zero_bits(work_hash(digest, nonce)), len(body) if size is None else size, ttl)


class Work(NamedTuple):
    nonce: int
    pow: float


def work(body: bytes, ttl: int, target: float, max_seconds: float, size: int | None = None,
         clock: Callable[[], float] = time.monotonic, start: int = 0) -> Work:
    """Search nonces for ``body`` until its proof of work reaches ``target``
    or ``max_seconds`` passed; the best found either way. Blocking: call it
    in a thread (``work_in_thread``)."""
    size = len(body) if size is None else size
    prefix = hashlib.sha256(hashlib.sha256(body).digest())
    # The fewest leading zero bits that reach the target.
    needed = 0
    while pow_value(needed, size, ttl) < target and needed < 256:
        needed += 1
    best_bits, best_nonce = -1, start
    deadline = clock() + max_seconds
    nonce = start
    while True:
        for nonce in range(nonce, nonce + _BATCH):
            h = prefix.copy()
            h.update(nonce.to_bytes(8, "big"))
            bits = leading_zero_bits(h.digest())
            if bits > best_bits:
                best_bits, best_nonce = bits, nonce
                if bits >= needed:
                    return Work(best_nonce, pow_value(best_bits, size, ttl))
        nonce += 1
        if clock() >= deadline or nonce >= 2**64 - _BATCH:
            return Work(best_nonce, pow_value(best_bits, size, ttl))


def work_in_thread(reactor: Any, body: bytes, ttl: int, target: float, max_seconds: float,
                   size: int | None = None) -> Any:
    """``work`` in the reactor's thread pool, so that the node answers on
    meanwhile; a Deferred of its ``Work``. (hashlib releases the GIL only for
    long inputs, so a search shares the CPU with the reactor, bounded by
    ``max_seconds``.)"""
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), work, body, ttl, target, max_seconds, size)
