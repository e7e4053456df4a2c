"""The key store between twistd processes on loopback: what only processes
show: two nodes deriving one key from one password, keys kept across a
restart, a client that is not the operator refused, a corrupt keys.json
refusing the start and left as it was."""

from __future__ import annotations

import stat
import subprocess

import pytest_twisted

from foxnode import client
from foxnode.keys import KEY_FILE
from foxnode.testing import free_port, spawn_node, stop_all, twistd_command


async def call(reactor, node, op, args=None):
    return await client.call(reactor, node.url, op, args)


@pytest_twisted.ensureDeferred
async def test_two_nodes_one_password_one_key_and_keys_survive_a_restart(reactor, tmp_path):
    a = spawn_node(tmp_path / "a")
    b = spawn_node(tmp_path / "b")
    nodes = [a, b]
    try:
        secrets = []
        for node in (a, b):
            made = await call(reactor, node, "newkey", {"type": "sym", "password": "the lab's topic"})
            assert made.status == 200 and made.response["type"] == "sym", made
            got = await call(reactor, node, "getkey", {"id": made.response["id"], "secret": True})
            assert got.status == 200, got
            secrets.append(got.response["key"])
        assert secrets[0] == secrets[1] and len(secrets[0]) == 64
        other = await call(reactor, b, "newkey", {"type": "sym", "password": "another topic"})
        got = await call(reactor, b, "getkey", {"id": other.response["id"], "secret": True})
        assert got.response["key"] != secrets[0]

        asym = await call(reactor, a, "newkey", {"type": "asym"})
        sym = await call(reactor, a, "newkey", {"type": "sym"})
        added = await call(reactor, a, "addkey", {"type": "sym", "key": "5a" * 32})
        assert {asym.status, sym.status, added.status} == {200}
        ids = [r.response["id"] for r in (asym, sym, added)]
        before = [(await call(reactor, a, "getkey", {"id": i, "secret": True})).response for i in ids]
        assert "private_key" in before[0] and "public_key" in before[0]
        gone = await call(reactor, a, "delkey", {"id": ids[2]})
        assert gone.status == 200 and gone.response == {"id": ids[2]}
        path = a.directory / KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        # Killed outright: what was acknowledged is on disk.
        a.kill()
        a = spawn_node(a.directory, port=a.port)
        nodes[0] = a
        after = [(await call(reactor, a, "getkey", {"id": i, "secret": True})).response for i in ids[:2]]
        assert after == before[:2]
        unknown = await call(reactor, a, "getkey", {"id": ids[2]})
        assert unknown.status == 404 and unknown.error == f'Key "{ids[2]}" is not known.'
        bad = await call(reactor, a, "newkey", {"type": "sym", "password": 12})
        assert bad.status == 400 and '"password"' in bad.error
    finally:
        stop_all(nodes)
    # A clean stop leaves the file as the last change made it.
    assert stat.S_IMODE((a.directory / KEY_FILE).stat().st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_a_client_that_is_not_the_operator_is_refused(reactor, tmp_path):
    # Loopback clients are not the operator here: only 127.9.9.9 would be.
    node = spawn_node(tmp_path / "n", "--trusted", "127.9.9.9/32")
    try:
        for op, args in (("newkey", {"type": "sym"}), ("addkey", {"type": "sym", "key": "ab" * 32}),
                         ("getkey", {"id": "ab" * 32}), ("delkey", {"id": "ab" * 32})):
            reply = await call(reactor, node, op, args)
            assert reply.status == 403, reply
            assert reply.error == f'Operation "{op}" is only for trusted clients.'
        assert (await call(reactor, node, "time")).status == 200
        assert not (node.directory / KEY_FILE).exists()
    finally:
        stop_all([node])


def test_a_corrupt_keys_file_refuses_the_start_in_one_line_and_is_left_alone(tmp_path):
    directory = tmp_path / "n"
    directory.mkdir()
    path = directory / KEY_FILE
    original = b'{"format": "foxnode/keys", "version": 1, "keys": {"%s": {"type": "sym", "key": "12"}}}\n' % (
        b"0" * 64)
    path.write_bytes(original)
    path.chmod(0o600)
    port = free_port()
    try:
        result = subprocess.run(twistd_command(directory, port), cwd=directory, capture_output=True,
                                timeout=60)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"foxnode kept running on a corrupt keys file: {e.stdout!r}") from None
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("foxnode: cannot start: keys file ") and str(path) in lines[0], output
    assert "'key'" in lines[0], output
    assert path.read_bytes() == original
    # Nothing else was made in the data directory: no node key, no lock left.
    assert sorted(p.name for p in directory.iterdir()) == [KEY_FILE], output
