"""Node identity: an Ed25519 key pair kept in the data directory.

The node id is the hex of the raw public key, as Ethereum's enode id is its
public key: anyone holding an id can check a signature made by that node
without a separate key exchange.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from foxnode import logs

KEY_FILE = "node.key"
NODE_ID_LENGTH = 64  # hex characters of a 32-byte key
SIGNATURE_LENGTH = 128  # hex characters of a 64-byte signature
# Exactly so many lowercase hex digits: bytes.fromhex alone also takes
# whitespace between them, so "ab cd ..." of any length would pass.
_NODE_ID = re.compile(r"[0-9a-f]{%d}" % NODE_ID_LENGTH)
_SIGNATURE = re.compile(r"[0-9a-f]{%d}" % SIGNATURE_LENGTH)

log = logs.logger(__name__)


class IdentityError(Exception):
    pass


@attrs.define
class Identity:
    private_key: Ed25519PrivateKey
    node_id: str

    @classmethod
    def generate(cls) -> "Identity":
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> "Identity":
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(key, raw.hex())

    def sign(self, data: bytes) -> str:
        return self.private_key.sign(data).hex()


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def is_signature(value: object) -> bool:
    """A signature as ``Identity.sign`` writes them: 128 lowercase hex digits."""
    return isinstance(value, str) and _SIGNATURE.fullmatch(value) is not None


def verify(node_id: str, signature: object, data: bytes) -> bool:
    """True when ``signature`` (hex) is ``node_id``'s signature of ``data``."""
    if not is_node_id(node_id) or not is_signature(signature):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(node_id))
        key.verify(bytes.fromhex(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create(data_dir: str | os.PathLike) -> Identity:
    """The node's identity from ``data_dir/node.key``, created on first start
    with mode 0600 so that only the node's user can read it."""
    directory = Path(data_dir)
    path = directory / KEY_FILE
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create(directory, path)
    except OSError as e:
        raise IdentityError(f"cannot read node key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"node key {path} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"node key {path} is not an Ed25519 key")
    if path.stat().st_mode & 0o077:
        log.warn("node key {path} is readable by others; chmod 600 it", path=str(path))
    return Identity.from_private_key(key)


def _create(directory: Path, path: Path) -> Identity:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"cannot create data directory {directory}: {e.strerror}") from None
    identity = Identity.generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process made it between our read and create: use theirs.
        return load_or_create(directory)
    except OSError as e:
        raise IdentityError(f"cannot create node key {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    log.info("created node key {path}", path=str(path))
    return identity
