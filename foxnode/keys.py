"""The key store: the sym keys and asym key pairs a node keeps for its
operator (PROTOCOL.md "Keys"), as Whisper's node did, so that a client with
only a WebSocket can seal and open private messages through the node.

The keys live in memory and in one human-readable JSON file in the data
directory, ``keys.json``, mode 0600 from its first byte (it holds secrets).
It is written as the peers file is (storefiles.py's ``write_atomically``: a
temporary file, fsync, rename, fsync of the directory), on the store's kind
of writer thread, one change at a time. A change is adopted in memory only
once the file holds it, and its reply comes after that: a ``newkey`` whose
reply arrived survives a kill, and a write that failed changed nothing.

A file that cannot be read or is not a key store stops the node at start
with one line naming the file and the fault (``KeyStoreError``), and is
never overwritten.

The ops are operator ops (service.py serves them so): only ``--trusted``
clients may make, read or delete keys.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from foxnode import codec, crypto, logs
from foxnode.config import KeyConfig
from foxnode.storefiles import DirectorySyncError, read_document, write_atomically
from foxnode.storewriter import ThreadRunner  # the peer store's kind of writer thread

FORMAT = "foxnode/keys"
VERSION = 1
KEY_FILE = "keys.json"
#: the file's mode: the node's user alone reads it
FILE_MODE = 0o600
SYM = "sym"
ASYM = "asym"
#: hex digits of a key id (32 random bytes, as Whisper's)
ID_LENGTH = 64
#: seconds ``close()`` (the node's shutdown) waits for a write under way
CLOSE_TIMEOUT = 5.0

log = logs.logger(__name__)


class KeyStoreError(Exception):
    """The keys file cannot be used; the message (one line) names the file and the fault."""


class KeyWriteError(Exception):
    """The keys file could not be written; nothing was changed."""


class KeyDurabilityError(KeyWriteError):
    """The keys file was replaced, but its directory could not be synced:
    the change is kept (in the file and in memory) but may not survive a
    crash."""


class _Refused(Exception):
    """A change that cannot be made (the store is full); ``reply`` says why."""

    def __init__(self, reply: codec.Reply) -> None:
        super().__init__(reply.error)
        self.reply = reply


@attrs.frozen
class StoredKey:
    """One key: a sym key (32 bytes) or an asym key's private seed (32 bytes)."""

    id: str
    type: str
    secret: bytes = attrs.field(repr=False)
    #: an asym key's pair, derived from its seed
    pair: crypto.KeyPair | None = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def make(cls, key_id: str, kind: str, secret: bytes) -> "StoredKey":
        return cls(key_id, kind, secret, crypto.KeyPair(secret) if kind == ASYM else None)

    @property
    def public_key(self) -> str | None:
        return self.pair.public_key.hex() if self.pair is not None else None

    def describe(self, secret: bool = False) -> dict[str, Any]:
        """What ``getkey`` (and ``newkey``, ``addkey``) reply with."""
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.pair is not None:
            out["public_key"] = self.public_key
        if secret:
            out["key" if self.type == SYM else "private_key"] = self.secret.hex()
        return out

    def to_json(self) -> dict[str, str]:
        if self.type == SYM:
            return {"type": SYM, "key": self.secret.hex()}
        # The public key too, for the operator reading the file; checked at load.
        return {"type": ASYM, "private_key": self.secret.hex(), "public_key": self.public_key or ""}


def _is_id(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == ID_LENGTH
            and all(c in "0123456789abcdef" for c in value))


_HEX = re.compile(r"[0-9a-fA-F]*")


def _secret_hex(value: Any, size: int) -> bytes | None:
    """The bytes of ``value``, hex of exactly ``size`` bytes, or None.
    Hex digits only: bytes.fromhex skips whitespace, so 64 characters with
    spaces in them would be fewer than 32 bytes."""
    if not isinstance(value, str) or len(value) != 2 * size or _HEX.fullmatch(value) is None:
        return None
    return bytes.fromhex(value)


def _key_from_json(key_id: Any, raw: Any, path: Path) -> StoredKey:
    where = f"keys file {path}: key {str(key_id)[:80]!r}"
    if not _is_id(key_id):
        raise KeyStoreError(f"{where}: not a key id ({ID_LENGTH} lowercase hex digits)")
    if not isinstance(raw, dict):
        raise KeyStoreError(f"{where}: not an object")
    kind = raw.get("type")
    if kind == SYM:
        secret = _secret_hex(raw.get("key"), crypto.KEY_SIZE)
        if secret is None:
            raise KeyStoreError(f"{where}: 'key' is not {crypto.KEY_SIZE} bytes of hex")
        return StoredKey.make(key_id, SYM, secret)
    if kind == ASYM:
        secret = _secret_hex(raw.get("private_key"), crypto.SEED_SIZE)
        if secret is None:
            raise KeyStoreError(f"{where}: 'private_key' is not {crypto.SEED_SIZE} bytes of hex")
        key = StoredKey.make(key_id, ASYM, secret)
        if "public_key" in raw and raw["public_key"] != key.public_key:
            raise KeyStoreError(f"{where}: 'public_key' is not the private key's")
        return key
    raise KeyStoreError(f"{where}: 'type' is not {SYM!r} or {ASYM!r}")


def load(path: str | os.PathLike, max_keys: int = KeyConfig().max_keys) -> list[StoredKey]:
    """Read and validate the keys file; a missing file is an empty store."""
    path = Path(path)
    doc = read_document(path, "keys file", FORMAT, VERSION, "keys", max_keys, KeyStoreError)
    if doc is None:
        return []
    keys = doc["keys"]
    try:
        if path.stat().st_mode & 0o077:
            # Rewritten with 0600 at the next change; said now, as node.key's is.
            log.warn("keys file {path} is readable by others; chmod 600 it", path=str(path))
    except OSError:
        pass
    return [_key_from_json(key_id, raw, path) for key_id, raw in keys.items()]


def render(keys: Iterable[StoredKey]) -> bytes:
    """The file's bytes: one key per line, so that a diff shows one key."""
    lines = [orjson.dumps(k.id) + b": " + orjson.dumps(k.to_json()) for k in keys]
    head = b'{\n  "format": "%s",\n  "version": %d,\n  "keys": {' % (FORMAT.encode(), VERSION)
    body = b",\n    ".join(lines)
    return head + (b"\n    " + body + b"\n  }\n}\n" if lines else b"}\n}\n")


class KeyStore:
    """The node's keys, in memory, mirrored to one JSON file; its ops."""

    def __init__(self, reactor: Any, path: str | os.PathLike, keys: Iterable[StoredKey] = (),
                 config: KeyConfig = KeyConfig(),
                 write: Callable[[Path, bytes, int], None] | None = None) -> None:
        self._reactor = reactor
        self.path = Path(path)
        self.config = config
        #: what puts the file on disk (tests hand in one that fails)
        self._write = write if write is not None else write_atomically
        #: where writes and password derivations run, off the reactor's thread
        self._writer = ThreadRunner(reactor, name="foxnode-key-writer")
        #: the keys as the file holds them
        self._keys: dict[str, StoredKey] = {k.id: k for k in keys}
        #: changes waiting for their turn: (change, Deferred of its outcome)
        self._queue: collections.deque[tuple[Callable[[dict[str, StoredKey]], None], Deferred]] = (
            collections.deque())
        self._writing = False
        self._closed = False
        self._drained: list[Deferred] = []
        self.ops = {"newkey": self.op_newkey, "addkey": self.op_addkey,
                    "getkey": self.op_getkey, "delkey": self.op_delkey}

    @classmethod
    def open(cls, reactor: Any, path: str | os.PathLike, config: KeyConfig = KeyConfig(),
             **kw: Any) -> "KeyStore":
        return cls(reactor, path, load(path, config.max_keys), config, **kw)

    # -- reading (for gossip's sealing and opening) --------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> StoredKey | None:
        return self._keys.get(key_id)

    # -- changing ------------------------------------------------------------------------

    def _change(self, change: Callable[[dict[str, StoredKey]], None]) -> Deferred:
        """Apply ``change`` to a copy of the keys as every earlier change
        left them, write the copy, and adopt it once the file holds it;
        fires then, or fails with ``KeyWriteError`` (nothing changed) or
        ``_Refused``."""
        d: Deferred = Deferred()
        self._queue.append((change, d))
        self._next()
        return d

    def _next(self) -> None:
        while not self._writing and self._queue:
            change, d = self._queue.popleft()
            keys = dict(self._keys)
            try:
                change(keys)
            except _Refused as e:
                d.errback(Failure(e))
                continue
            self._writing = True
            written = self._writer.run(partial(self._write, mode=FILE_MODE), self.path, render(keys.values()))
            written.addBoth(self._written, keys, d)
        if not self._writing and not self._queue:
            waiters, self._drained = self._drained, []
            for w in waiters:
                if not w.called:  # close() may have given up on it already
                    w.callback(None)

    def _written(self, result: Any, keys: dict[str, StoredKey], d: Deferred) -> None:
        self._writing = False
        if isinstance(result, Failure):
            error = result.value
            if isinstance(error, DirectorySyncError):
                # The file holds the change: so does memory, and the reply says
                # it may not survive a crash.
                self._keys = keys
                outcome = Failure(KeyDurabilityError(_describe(error)))
            else:
                log.error("cannot write keys file {path}: {why}", path=str(self.path), why=_describe(error))
                outcome = Failure(KeyWriteError(_describe(error)))
            d.errback(outcome)
        else:
            self._keys = keys
            d.callback(None)
        self._next()

    def _adding(self, key: StoredKey) -> Callable[[dict[str, StoredKey]], None]:
        def add(keys: dict[str, StoredKey]) -> None:
            if len(keys) >= self.config.max_keys:
                raise _Refused(codec.conflict(
                    f"Key store is full: it holds at most {self.config.max_keys} keys; "
                    "delete one with delkey first."))
            keys[key.id] = key

        return add

    def _new_id(self) -> str:
        while True:
            key_id = secrets.token_hex(ID_LENGTH // 2)
            if key_id not in self._keys:
                return key_id

    def _settled(self, outcome: Any, ok: Callable[[], codec.Reply], what: str) -> codec.Reply:
        if not isinstance(outcome, Failure):
            return ok()
        if outcome.check(_Refused):
            return outcome.value.reply
        if outcome.check(KeyDurabilityError):
            reply = ok()
            return codec.Reply(503, f"Key store could not confirm the write ({outcome.value}): {what} "
                                    "is in the keys file, but may not survive a crash.", reply.response)
        outcome.trap(KeyWriteError)
        return codec.unavailable(f"Key store unavailable (cannot write {self.path.name}: "
                                 f"{outcome.value}); nothing was changed. Try again later.")

    def _store(self, key: StoredKey) -> Deferred:
        d = self._change(self._adding(key))
        return d.addBoth(self._settled, lambda: codec.ok(key.describe()), "the key")

    # -- the ops -------------------------------------------------------------------------

    def _refuse_now(self) -> codec.Reply | None:
        if self._closed:
            return codec.unavailable("The node is shutting down; the key store takes no changes.")
        if len(self._keys) >= self.config.max_keys:  # said at once; checked again in its turn
            return codec.conflict(f"Key store is full: it holds at most {self.config.max_keys} keys; "
                                  "delete one with delkey first.")
        return None

    def op_newkey(self, conn: Any, args: Any) -> Any:
        """A fresh key: an asym key pair, a random sym key, or the sym key
        of a password (derived off the reactor's thread)."""
        kind = _type_of("newkey", args)
        if isinstance(kind, codec.Reply):
            return kind
        password = args.get("password")
        if "password" in args:
            if kind != SYM:
                return codec.bad_args("newkey", '"password" is only for "type": "sym"')
            why = self._bad_password(password)
            if why:
                return codec.bad_args("newkey", why)
        refused = self._refuse_now()
        if refused is not None:
            return refused
        key_id = self._new_id()
        if kind == ASYM:
            return self._store(StoredKey.make(key_id, ASYM, os.urandom(crypto.SEED_SIZE)))
        if password is None:
            return self._store(StoredKey.make(key_id, SYM, crypto.new_sym_key()))
        def derived(secret: bytes) -> Any:
            if self._closed:  # the node began to stop meanwhile: nothing is written now
                return codec.unavailable("The node is shutting down; the key store takes no changes.")
            return self._store(StoredKey.make(key_id, SYM, secret))

        # scrypt takes about 0.1 s: on the writer's thread, not the reactor's.
        d = self._writer.run(crypto.password_key, password)
        return d.addCallbacks(derived, lambda f: codec.unavailable(f"Cannot derive the key ({f.value})."))

    def _bad_password(self, password: Any) -> str | None:
        if not isinstance(password, str):
            return '"password" must be a string'
        try:
            size = len(password.encode("utf-8"))
        except UnicodeEncodeError:
            return '"password" is not valid Unicode text'
        limit = min(self.config.max_password, crypto.MAX_PASSWORD_BYTES)
        if not 0 < size <= limit:
            return f'"password" must have 1 to {limit} bytes (UTF-8)'
        return None

    def op_addkey(self, conn: Any, args: Any) -> Any:
        """A key the client has: a sym key (``key``) or an asym private key."""
        kind = _type_of("addkey", args)
        if isinstance(kind, codec.Reply):
            return kind
        field, other = ("key", "private_key") if kind == SYM else ("private_key", "key")
        if other in args:
            return codec.bad_args("addkey", f'"{other}" is not for "type": "{kind}"; give "{field}"')
        if field not in args:
            return codec.bad_args("addkey", f'"{field}" is missing: give 32 bytes of hex (64 digits)')
        secret = _secret_hex(args[field], 32)
        if secret is None:
            return codec.bad_args("addkey", f'"{field}" must be 32 bytes of hex (64 digits)')
        refused = self._refuse_now()
        if refused is not None:
            return refused
        return self._store(StoredKey.make(self._new_id(), kind, secret))

    def _key_of(self, op: str, args: Any) -> StoredKey | codec.Reply:
        if not isinstance(args, dict):
            return codec.bad_args(op, '"args" must be an object with "id"')
        if "id" not in args:
            return codec.bad_args(op, '"id" is missing: give a key id')
        key_id = args["id"]
        if not isinstance(key_id, str) or not key_id:
            return codec.bad_args(op, '"id" must be a key id (a string)')
        if len(key_id) > self.config.max_id_length:
            return codec.bad_args(op, f'"id" is longer than {self.config.max_id_length} characters: no key id')
        key = self._keys.get(key_id)
        if key is None:
            return codec.not_found(f'Key "{key_id}" is not known.')
        return key

    def op_getkey(self, conn: Any, args: Any) -> codec.Reply:
        key = self._key_of("getkey", args)
        if isinstance(key, codec.Reply):
            return key
        secret = args.get("secret", False)
        if not isinstance(secret, bool):
            return codec.bad_args("getkey", '"secret" must be true or false')
        return codec.ok(key.describe(secret=secret))

    def op_delkey(self, conn: Any, args: Any) -> Any:
        key = self._key_of("delkey", args)
        if isinstance(key, codec.Reply):
            return key
        if self._closed:
            return codec.unavailable("The node is shutting down; the key store takes no changes.")

        def delete(keys: dict[str, StoredKey]) -> None:
            keys.pop(key.id, None)  # gone already by an earlier delkey: as good

        d = self._change(delete)
        return d.addBoth(self._settled, lambda: codec.ok({"id": key.id}), "the deletion")

    # -- shutdown --------------------------------------------------------------------------

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> Deferred:
        """No more changes; fires once the changes under way are written,
        or after ``timeout`` seconds of a write that does not end (their
        replies were not sent: nothing unwritten was acknowledged)."""
        self._closed = True
        if not self._writing and not self._queue:
            self._writer.stop()
            return succeed(None)
        d: Deferred = Deferred()
        self._drained.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)

        def done(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                log.error("key store: shutting down without the write to {path}, which did not end "
                          "within {timeout:g} s", path=str(self.path), timeout=timeout)
            self._writer.stop()

        return d.addBoth(done)


def _type_of(op: str, args: Any) -> str | codec.Reply:
    if not isinstance(args, dict):
        return codec.bad_args(op, '"args" must be an object with "type": "sym" or "asym"')
    if "type" not in args:
        return codec.bad_args(op, '"type" is missing: give "sym" or "asym"')
    kind = args["type"]
    if not isinstance(kind, str) or kind not in (SYM, ASYM):
        return codec.bad_args(op, '"type" must be "sym" or "asym"')
    return kind


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__

