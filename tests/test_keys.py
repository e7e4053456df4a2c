"""The key store (keys.py) without sockets: its ops, its file (mode 0600,
written before the reply, refused when corrupt, never overwritten), its
bound, and what a failed write leaves: nothing changed."""

from __future__ import annotations

import json
import os
import stat

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from foxnode import codec, crypto
from foxnode.config import KeyConfig
from foxnode.keys import KEY_FILE, KeyStore, KeyStoreError, load
from foxnode.store import DirectorySyncError, write_atomically
from foxnode.testing import FakeConnection, InlineWriter, MemoryNetwork, memory_node

OPERATOR = FakeConnection()


def open_store(directory, **kw) -> KeyStore:
    keys = KeyStore.open(Clock(), directory / KEY_FILE, **kw)
    keys._writer = InlineWriter()
    return keys


def reply_of(result) -> codec.Reply:
    """The reply an op gave, at once or through a Deferred that has fired."""
    if isinstance(result, codec.Reply):
        return result
    got = []
    result.addBoth(got.append)
    assert got, "the reply is still waiting"
    assert isinstance(got[0], codec.Reply), got[0]
    return got[0]


def call(keys: KeyStore, op: str, args) -> codec.Reply:
    return reply_of(keys.ops[op](OPERATOR, args))


def test_newkey_of_each_kind_is_on_disk_with_mode_0600_and_survives_a_restart(tmp_path):
    keys = open_store(tmp_path)
    asym = call(keys, "newkey", {"type": "asym"})
    assert asym.status == 200, asym
    assert set(asym.response) == {"id", "type", "public_key"} and asym.response["type"] == "asym"
    assert crypto.parse_public_key(asym.response["public_key"]) is not None
    sym = call(keys, "newkey", {"type": "sym"})
    assert sym.status == 200 and sym.response == {"id": sym.response["id"], "type": "sym"}
    pw = call(keys, "newkey", {"type": "sym", "password": "topic password"})
    assert pw.status == 200 and pw.response["type"] == "sym"
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_bytes())
    assert doc["format"] == "foxnode/keys" and set(doc["keys"]) == {
        asym.response["id"], sym.response["id"], pw.response["id"]}
    # The node restarts: the same keys, the same secrets.
    again = open_store(tmp_path)
    for made in (asym, sym, pw):
        before = call(keys, "getkey", {"id": made.response["id"], "secret": True})
        after = call(again, "getkey", {"id": made.response["id"], "secret": True})
        assert before == after and after.status == 200
    assert call(again, "getkey", {"id": asym.response["id"]}).response == asym.response


def test_the_same_password_gives_the_same_key_on_two_stores(tmp_path):
    for d in (tmp_path / "a", tmp_path / "b"):
        d.mkdir()
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    ka = call(a, "newkey", {"type": "sym", "password": "shared secret"}).response["id"]
    kb = call(b, "newkey", {"type": "sym", "password": "shared secret"}).response["id"]
    kc = call(b, "newkey", {"type": "sym", "password": "another one"}).response["id"]
    secret_a = call(a, "getkey", {"id": ka, "secret": True}).response["key"]
    secret_b = call(b, "getkey", {"id": kb, "secret": True}).response["key"]
    assert ka != kb and secret_a == secret_b == crypto.password_key("shared secret").hex()
    assert call(b, "getkey", {"id": kc, "secret": True}).response["key"] != secret_b


def test_addkey_getkey_delkey(tmp_path):
    keys = open_store(tmp_path)
    sym = call(keys, "addkey", {"type": "sym", "key": "ab" * 32})
    assert sym.status == 200 and sym.response["type"] == "sym"
    assert call(keys, "getkey", {"id": sym.response["id"], "secret": True}).response == {
        "id": sym.response["id"], "type": "sym", "key": "ab" * 32}
    seed = os.urandom(32)
    asym = call(keys, "addkey", {"type": "asym", "private_key": seed.hex().upper()})
    assert asym.response["public_key"] == crypto.KeyPair(seed).public_key.hex()
    got = call(keys, "getkey", {"id": asym.response["id"], "secret": True}).response
    assert got["private_key"] == seed.hex() and got["public_key"] == asym.response["public_key"]
    assert "private_key" not in call(keys, "getkey", {"id": asym.response["id"]}).response
    gone = call(keys, "delkey", {"id": sym.response["id"]})
    assert gone == codec.Reply(200, "OK", {"id": sym.response["id"]})
    unknown = call(keys, "getkey", {"id": sym.response["id"]})
    assert unknown == codec.Reply(404, f'Key "{sym.response["id"]}" is not known.')
    assert call(keys, "delkey", {"id": sym.response["id"]}).status == 404
    assert sym.response["id"] not in json.loads((tmp_path / KEY_FILE).read_bytes())["keys"]
    assert len(open_store(tmp_path)) == 1


BAD = [
    ("newkey", None, "args"), ("newkey", [], "args"), ("newkey", {}, "type"),
    ("newkey", {"type": "rsa"}, "type"), ("newkey", {"type": 1}, "type"), ("newkey", {"type": ["sym"]}, "type"),
    ("newkey", {"type": "sym", "password": 5}, "password"), ("newkey", {"type": "sym", "password": ""}, "password"),
    ("newkey", {"type": "sym", "password": "x" * 1025}, "password"),
    ("newkey", {"type": "sym", "password": "\ud800"}, "password"),
    ("newkey", {"type": "asym", "password": "pw"}, "password"),
    ("addkey", "x", "args"), ("addkey", {"key": "ab" * 32}, "type"), ("addkey", {"type": "sym"}, "key"),
    ("addkey", {"type": "sym", "key": "ab" * 31}, "key"), ("addkey", {"type": "sym", "key": "zz" * 32}, "key"),
    ("addkey", {"type": "sym", "key": 7}, "key"), ("addkey", {"type": "asym"}, "private_key"),
    ("addkey", {"type": "asym", "private_key": "ab" * 33}, "private_key"),
    ("addkey", {"type": "asym", "private_key": "0x" + "ab" * 31}, "private_key"),
    # 64 characters that bytes.fromhex reads as fewer bytes (it skips
    # whitespace): a 21-byte sym key was stored, and the node then refused
    # to start on its own keys file; an asym one raised mid-op (a 500).
    ("addkey", {"type": "sym", "key": "ab " * 21 + " "}, "key"),
    ("addkey", {"type": "sym", "key": "ab" * 31 + " a"}, "key"),
    ("addkey", {"type": "asym", "private_key": "ab " * 21 + " "}, "private_key"),
    ("addkey", {"type": "sym", "key": "ab" * 32, "private_key": "ab" * 32}, "private_key"),
    ("addkey", {"type": "asym", "private_key": "ab" * 32, "key": "ab" * 32}, "key"),
    ("getkey", None, "args"), ("getkey", {}, "id"), ("getkey", {"id": 5}, "id"), ("getkey", {"id": ""}, "id"),
    ("getkey", {"id": "x" * 200}, "id"), ("getkey", {"id": None}, "id"),
    ("delkey", 3, "args"), ("delkey", {}, "id"), ("delkey", {"id": ["a"]}, "id"),
]


@pytest.mark.parametrize("op, args, named", BAD)
def test_every_bad_argument_is_a_400_naming_it(tmp_path, op, args, named):
    keys = open_store(tmp_path)
    reply = call(keys, op, args)
    assert reply.status == 400 and f'"{named}"' in reply.error, reply
    assert not (tmp_path / KEY_FILE).exists() and len(keys) == 0


def test_getkey_secret_must_be_a_boolean(tmp_path):
    keys = open_store(tmp_path)
    kid = call(keys, "newkey", {"type": "sym"}).response["id"]
    for bad in ("yes", 1, None, []):
        reply = call(keys, "getkey", {"id": kid, "secret": bad})
        assert reply.status == 400 and '"secret"' in reply.error


def test_a_full_store_refuses_with_a_4xx_and_keeps_its_file(tmp_path):
    keys = open_store(tmp_path, config=KeyConfig(max_keys=2))
    first = call(keys, "newkey", {"type": "sym"}).response["id"]
    call(keys, "newkey", {"type": "asym"})
    before = (tmp_path / KEY_FILE).read_bytes()
    for args in ({"type": "sym"}, {"type": "asym"}, {"type": "sym", "password": "pw"}):
        reply = call(keys, "newkey", args)
        assert reply.status == 409 and "full" in reply.error and "2 keys" in reply.error, reply
    assert call(keys, "addkey", {"type": "sym", "key": "ab" * 32}).status == 409
    assert (tmp_path / KEY_FILE).read_bytes() == before and len(keys) == 2
    # room again after a delkey
    assert call(keys, "delkey", {"id": first}).status == 200
    assert call(keys, "newkey", {"type": "sym"}).status == 200
    # a file over the limit is refused at start
    with pytest.raises(KeyStoreError, match="more than the limit 1"):
        load(tmp_path / KEY_FILE, max_keys=1)


def test_a_failed_write_changes_nothing_and_says_503(tmp_path):
    def broken(path, data, mode):
        raise OSError(28, "No space left on device")

    keys = open_store(tmp_path)
    kid = call(keys, "newkey", {"type": "sym"}).response["id"]
    before = (tmp_path / KEY_FILE).read_bytes()
    keys._write = broken
    for op, args in (("newkey", {"type": "asym"}), ("addkey", {"type": "sym", "key": "cd" * 32}),
                     ("delkey", {"id": kid}), ("newkey", {"type": "sym", "password": "pw"})):
        reply = call(keys, op, args)
        assert reply.status == 503 and "No space left" in reply.error and "nothing was changed" in reply.error
    assert len(keys) == 1 and keys.get(kid) is not None
    assert (tmp_path / KEY_FILE).read_bytes() == before
    keys._write = write_atomically
    assert call(keys, "delkey", {"id": kid}).status == 200


def test_a_write_renamed_but_not_synced_keeps_the_key_and_says_so(tmp_path):
    def unsynced(path, data, mode):
        write_atomically(path, data, mode=mode)
        raise DirectorySyncError(5, "cannot sync its directory: Input/output error")

    keys = open_store(tmp_path, write=unsynced)
    reply = call(keys, "newkey", {"type": "asym"})
    assert reply.status == 503 and "may not survive a crash" in reply.error
    # the client learns the key it has, and the store holds what the file does
    assert reply.response["type"] == "asym" and keys.get(reply.response["id"]) is not None
    assert len(open_store(tmp_path)) == 1


class HeldWriter:
    """Writes that wait until the test lets them go."""

    def __init__(self) -> None:
        self.held: list[tuple] = []

    def run(self, write, *args) -> Deferred:
        d = Deferred()
        self.held.append((write, args, d))
        return d

    def release(self) -> None:
        write, args, d = self.held.pop(0)
        try:
            result = write(*args)
        except BaseException:
            fail().chainDeferred(d)
        else:
            d.callback(result)

    def stop(self) -> None:
        pass


def test_the_reply_comes_after_the_key_is_on_disk_and_changes_keep_their_order(tmp_path):
    keys = KeyStore(Clock(), tmp_path / KEY_FILE)
    keys._writer = writer = HeldWriter()
    first = keys.ops["newkey"](OPERATOR, {"type": "sym"})
    second = keys.ops["addkey"](OPERATOR, {"type": "sym", "key": "ef" * 32})
    got = []
    first.addCallback(got.append)
    second.addCallback(got.append)
    assert got == [] and len(keys) == 0 and not (tmp_path / KEY_FILE).exists()
    assert len(writer.held) == 1  # one write at a time
    writer.release()
    assert len(got) == 1 and got[0].status == 200 and len(keys) == 1
    assert got[0].response["id"] in load(tmp_path / KEY_FILE)[0].id
    writer.release()
    assert [r.status for r in got] == [200, 200]
    assert {k.id for k in load(tmp_path / KEY_FILE)} == {r.response["id"] for r in got}


def test_close_waits_for_the_write_under_way_then_refuses_changes(tmp_path):
    clock = Clock()
    keys = KeyStore(clock, tmp_path / KEY_FILE)
    keys._writer = writer = HeldWriter()
    pending = keys.ops["newkey"](OPERATOR, {"type": "asym"})
    closed = keys.close(timeout=5)
    assert not closed.called
    writer.release()
    assert closed.called and reply_of(pending).status == 200
    assert keys.ops["newkey"](OPERATOR, {"type": "sym"}).status == 503
    # a write that never ends: close gives up after its timeout
    hung = KeyStore(clock, tmp_path / "other.json")
    hung._writer = slow = HeldWriter()
    late = hung.ops["newkey"](OPERATOR, {"type": "sym"})
    given_up = hung.close(timeout=5)
    clock.advance(5)
    assert given_up.called and not late.called
    # the write ends after all: its reply goes out, and nothing breaks
    slow.release()
    assert reply_of(late).status == 200


CORRUPT = {
    "not-json": b"this is not JSON\n",
    "binary": bytes(range(256)),
    "a-list": b"[]\n",
    "no-format": b'{"keys": {}}\n',
    "wrong-version": b'{"format": "foxnode/keys", "version": 9, "keys": {}}\n',
    "keys-not-object": b'{"format": "foxnode/keys", "version": 1, "keys": []}\n',
    "bad-id": b'{"format": "foxnode/keys", "version": 1, "keys": {"x": {"type": "sym", "key": "%s"}}}\n'
              % (b"ab" * 32),
    "short-key": b'{"format": "foxnode/keys", "version": 1, "keys": {"%s": {"type": "sym", "key": "abcd"}}}\n'
                 % (b"0" * 64),
    "bad-type": b'{"format": "foxnode/keys", "version": 1, "keys": {"%s": {"type": "rsa"}}}\n' % (b"0" * 64),
    "wrong-public-key": b'{"format": "foxnode/keys", "version": 1, "keys": {"%s": {"type": "asym", '
                        b'"private_key": "%s", "public_key": "00"}}}\n' % (b"0" * 64, b"ab" * 32),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_file_is_refused_in_one_line_naming_it(tmp_path, case):
    path = tmp_path / KEY_FILE
    path.write_bytes(CORRUPT[case])
    with pytest.raises(KeyStoreError) as e:
        KeyStore.open(Clock(), path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == CORRUPT[case]


def test_a_missing_file_is_an_empty_store_and_nothing_is_written_until_a_change(tmp_path):
    keys = open_store(tmp_path)
    assert len(keys) == 0 and not (tmp_path / KEY_FILE).exists()
    assert keys.close().called and not (tmp_path / KEY_FILE).exists()


def test_operator_ops_are_refused_to_other_clients_and_served_to_the_operator(tmp_path):
    network = MemoryNetwork()
    service = memory_node(network, tmp_path / "node")
    node = service.node
    stranger = FakeConnection(remote_host="127.9.9.9")
    stranger.trusted = False
    operator = FakeConnection()
    operator.trusted = True
    for op in ("newkey", "addkey", "getkey", "delkey"):
        reply = node.handle_request(stranger, codec.Request(op, {"type": "sym"}))
        assert reply == codec.Reply(403, f'Operation "{op}" is only for trusted clients.')
    made = reply_of(node.handle_request(operator, codec.Request("newkey", {"type": "asym"})))
    assert made.status == 200
    got = reply_of(node.handle_request(operator, codec.Request("getkey", {"id": made.response["id"]})))
    assert got.response == made.response
    assert (tmp_path / "node" / KEY_FILE).exists()
    service.stopService()


def test_concurrent_changes_are_all_kept(tmp_path):
    keys = KeyStore(Clock(), tmp_path / KEY_FILE)
    keys._writer = writer = HeldWriter()
    replies = [keys.ops["newkey"](OPERATOR, {"type": "sym"}) for _ in range(5)]
    while writer.held:
        writer.release()
    ids = {reply_of(r).response["id"] for r in replies}
    assert len(ids) == 5 and {k.id for k in load(tmp_path / KEY_FILE)} == ids


def test_writers_hand_back_what_the_job_returned():
    # the password's key comes back so, from the thread as from InlineWriter
    got = []
    InlineWriter().run(lambda: 42).addCallback(got.append)
    assert got == [42]
