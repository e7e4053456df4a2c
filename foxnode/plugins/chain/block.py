"""foxchain blocks, pure: their canonical form, hash, proof of work and the
checks a block passes on its own (no ledger, no clock but the one passed in).

A block is ``{"height", "prev", "time", "data", "nonce", "difficulty"}``
plus, as sent, its ``"hash"``: the SHA-256 (hex) of its canonical JSON (the
six fields, keys sorted, no spaces, UTF-8). Its proof of work holds when the
hash, read as a 256-bit number, is below ``2**(256 - difficulty)``
(``difficulty`` leading zero bits); its work is ``2**difficulty``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: the fields a block is made of (and hashed over), beside its ``hash``
FIELDS = ("data", "difficulty", "height", "nonce", "prev", "time")
#: the difficulties a block may have: below the least, it proves nothing;
#: above the most, nobody mines it (and work stays a 64-bit number)
MIN_DIFFICULTY = 8
MAX_DIFFICULTY = 32
#: what ``mine`` uses unless told (about 65,000 hashes: a fraction of a second)
DEFAULT_DIFFICULTY = 16
#: the most ``mine`` may be asked for (about 4 million hashes: seconds)
MAX_MINE_DIFFICULTY = 22
#: a block's ``data``, as canonical JSON, is at most this many bytes
MAX_DATA_BYTES = 1024
#: a block's ``time`` may be at most this far ahead of the node's clock
MAX_FUTURE = 2 * 60 * 60
#: nonces are whole numbers below this
MAX_NONCE = 2 ** 53
ZERO = "0" * 64


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def header(block: dict[str, Any]) -> dict[str, Any]:
    """The six fields of ``block`` (without its hash)."""
    return {k: block[k] for k in FIELDS}


def block_hash(block: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(header(block))).hexdigest()


def meets(digest: str, difficulty: int) -> bool:
    """Does the hash ``digest`` (hex) have ``difficulty`` leading zero bits?"""
    return int(digest, 16) < 1 << (256 - difficulty)


def work(difficulty: int) -> int:
    return 1 << difficulty


#: the first block, the same on every node; it proves no work and needs none
GENESIS: dict[str, Any] = {"height": 0, "prev": ZERO, "time": 0, "data": "foxchain", "nonce": 0,
                           "difficulty": 0}
GENESIS = {**GENESIS, "hash": block_hash(GENESIS)}


class Invalid(ValueError):
    """Why a block is refused, in words for a log line or a 400."""


def whole(value: Any) -> bool:
    """A whole number of JSON's (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_hash(value: Any) -> bool:
    """64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def check(block: Any, now: float) -> dict[str, Any]:
    """``block`` as received, checked on its own: shape, hash, proof of
    work, difficulty, data size, time; the block (with its hash) or
    ``Invalid``. Whether it fits its parent is the ledger's question."""
    if not isinstance(block, dict):
        raise Invalid("a block is an object")
    missing = [k for k in FIELDS + ("hash",) if k not in block]
    if missing:
        raise Invalid(f'a block needs "{missing[0]}"')
    extra = sorted(set(block) - set(FIELDS) - {"hash"})
    if extra:
        raise Invalid(f'a block has no "{extra[0]}"')
    if not whole(block["height"]) or block["height"] < 1:
        raise Invalid('"height" must be a whole number of at least 1 (0 is the genesis block)')
    for name in ("prev", "hash"):
        value = block[name]
        if not is_hash(value):
            raise Invalid(f'"{name}" must be 64 lowercase hex digits')
    if not whole(block["time"]) or block["time"] < 0:
        raise Invalid('"time" must be a whole number of unix seconds')
    if block["time"] > now + MAX_FUTURE:
        raise Invalid(f'"time" is more than {MAX_FUTURE} s ahead of this node\'s clock')
    if not whole(block["nonce"]) or not 0 <= block["nonce"] < MAX_NONCE:
        raise Invalid(f'"nonce" must be a whole number from 0 to {MAX_NONCE - 1}')
    d = block["difficulty"]
    if not whole(d) or not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY:
        raise Invalid(f'"difficulty" must be a whole number from {MIN_DIFFICULTY} to {MAX_DIFFICULTY}')
    try:
        size = len(canonical(block["data"]))
    except (TypeError, ValueError):
        raise Invalid('"data" must be JSON') from None
    if size > MAX_DATA_BYTES:
        raise Invalid(f'"data" is {size} bytes as JSON, more than {MAX_DATA_BYTES}')
    digest = block_hash(block)
    if digest != block["hash"]:
        raise Invalid('"hash" is not the hash of the block')
    if not meets(digest, d):
        raise Invalid(f"the proof of work does not hold: the hash has fewer than {d} leading zero bits")
    return dict(block)


def mine(prev: dict[str, Any], data: Any, when: int, difficulty: int,
         start: int = 0, tries: int | None = None) -> dict[str, Any] | None:
    """A block on ``prev`` with ``data``, its proof of work found by trying
    nonces from ``start``; None after ``tries`` (default: 16 times the
    expected number) without one. Pure and slow: run it in a thread."""
    block = {"height": prev["height"] + 1, "prev": prev["hash"], "time": max(int(when), prev["time"]),
             "data": data, "nonce": 0, "difficulty": difficulty}
    # Canonical JSON puts "nonce" between "height" and "prev": hash the
    # part before it once, then only the nonce and the rest per try.
    text = canonical(block)
    marker = b'"nonce":0,'
    at = text.index(marker) + len(b'"nonce":')
    before, after = text[:at], text[at + 1:]
    base = hashlib.sha256(before)
    target = 1 << (256 - difficulty)
    tries = tries if tries is not None else 16 << difficulty
    for nonce in range(start, min(start + tries, MAX_NONCE)):
        h = base.copy()
        h.update(b"%d" % nonce + after)
        digest = h.digest()
        if int.from_bytes(digest, "big") < target:
            block["nonce"] = nonce
            block["hash"] = digest.hex()
            assert block["hash"] == block_hash(block)
            return block
    return None
