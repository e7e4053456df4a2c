"""One node per data directory and per peers file (locks.py), between real
``twistd`` processes: a second node on either refuses to start with one
line naming the file and the process holding it; the first keeps working
and loses nothing; a node killed with SIGKILL does not block a restart.

Every address used here is on 127.0.0.0/8.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from foxnode import client
from foxnode.locks import FileLock, LockError, lock_data_dir, lock_peers_file
from foxnode.testing import free_port, spawn_node, twistd_command

TIMEOUT = 10.0


def addr(i: int) -> str:
    return f"ws://127.70.0.{i}:9000/ws"


def _second_node(directory: Path, *extra: str) -> tuple[int, str]:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(twistd_command(directory, free_port(), *extra), cwd=directory,
                                capture_output=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the second node kept running: {e.stdout!r}") from None
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def _layouts(tmp_path: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], Path]]:
    """(first node's options, second node's options, the file they share)."""
    shared_data, shared_peers = tmp_path / "shared-data", tmp_path / "shared" / "peers.json"
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "peers.json").symlink_to(shared_peers)
    return {
        "data-dir": (("--data-dir", str(shared_data), "--peers-file", str(tmp_path / "a-peers.json")),
                     ("--data-dir", str(shared_data), "--peers-file", str(tmp_path / "b-peers.json")),
                     shared_data),
        "peers-file": (("--data-dir", str(tmp_path / "a-data"), "--peers-file", str(shared_peers)),
                       ("--data-dir", str(tmp_path / "b-data"), "--peers-file", str(shared_peers)),
                       shared_peers),
        # Another name for the same file is the same file.
        "peers-file-via-symlink": (
            ("--data-dir", str(tmp_path / "a-data"), "--peers-file", str(shared_peers)),
            ("--data-dir", str(tmp_path / "b-data"), "--peers-file", str(link_dir / "peers.json")),
            shared_peers),
    }


@pytest.mark.parametrize("shared", ["data-dir", "peers-file", "peers-file-via-symlink"])
@pytest_twisted.ensureDeferred
async def test_a_second_node_on_the_same_files_refuses_and_the_first_loses_nothing(reactor, tmp_path, shared):
    first_options, second_options, shared_path = _layouts(tmp_path)[shared]
    first = await deferToThread(spawn_node, tmp_path / "a", *first_options)
    try:
        reply = await client.call(reactor, first.url, "register", {"addr": addr(1)}, timeout=TIMEOUT)
        assert reply.status == 202, reply

        code, output = await deferToThread(_second_node, tmp_path / "b", *second_options)
        assert code != 0, output
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1, output
        assert str(shared_path) in lines[0], output
        assert f"process {first.process.pid}" in lines[0], output
        assert "Traceback" not in output
        if shared == "data-dir":
            assert not (tmp_path / "b-peers.json").exists(), "the refused node touched its peers file"
        else:
            assert not (tmp_path / "b-data" / "node.key").exists(), "the refused node made a key"

        # The first node goes on, and keeps what it acknowledged.
        reply = await client.call(reactor, first.url, "register", {"addr": addr(2)}, timeout=TIMEOUT)
        assert reply.status == 202, reply
        reply = await client.call(reactor, first.url, "peers", timeout=TIMEOUT)
        assert set(reply.response["peers"]) == {addr(1), addr(2)}
        info = await client.call(reactor, first.url, "info", timeout=TIMEOUT)
        node_id = info.response["node_id"]
    finally:
        assert await deferToThread(first.stop) in (0, -signal.SIGTERM)

    again = await deferToThread(spawn_node, tmp_path / "a", *first_options)
    try:
        reply = await client.call(reactor, again.url, "peers", timeout=TIMEOUT)
        assert set(reply.response["peers"]) == {addr(1), addr(2)}
        info = await client.call(reactor, again.url, "info", timeout=TIMEOUT)
        assert info.response["node_id"] == node_id
    finally:
        await deferToThread(again.stop)


@pytest_twisted.ensureDeferred
async def test_a_node_killed_with_sigkill_does_not_block_a_restart(reactor, node_dir):
    first = await deferToThread(spawn_node, node_dir)
    reply = await client.call(reactor, first.url, "register", {"addr": addr(3)}, timeout=TIMEOUT)
    assert reply.status == 202
    assert await deferToThread(first.kill) == -signal.SIGKILL
    # Its lock files are still there, naming a dead process; no lock is.
    assert (node_dir / "foxnode.lock").exists() and (node_dir / "peers.json.lock").exists()

    again = await deferToThread(spawn_node, node_dir)
    try:
        reply = await client.call(reactor, again.url, "peers", timeout=TIMEOUT)
        assert reply.response["peers"] == [addr(3)]
        assert (node_dir / "foxnode.lock").read_text().strip() == str(again.process.pid)
    finally:
        await deferToThread(again.stop)
    # An orderly stop removes them.
    assert not (node_dir / "foxnode.lock").exists() and not (node_dir / "peers.json.lock").exists()


# -- the locks themselves, in this process --------------------------------------------

def test_a_lock_file_removed_by_its_holder_is_not_a_way_in(tmp_path):
    # B opened the lock file and waits; A releases (removing the file) and
    # C takes a new one at the same path: B must not hold the old, removed
    # file as if it were the lock.
    path = tmp_path / "x.lock"
    a = FileLock.acquire(path, "thing")
    stale_fd = os.open(path, os.O_RDWR)
    a.release()
    c = FileLock.acquire(path, "thing")
    try:
        with pytest.raises(LockError, match=f"process {os.getpid()}"):
            FileLock.acquire(path, "thing")
        # The removed file is free to lock, but is not the lock.
        import fcntl

        fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert os.fstat(stale_fd).st_nlink == 0
    finally:
        os.close(stale_fd)
        c.release()


def test_a_lock_file_planted_as_a_symlink_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "foxnode.lock").symlink_to(victim)
    with pytest.raises(LockError, match="foxnode.lock"):
        lock_data_dir(tmp_path / "data")
    assert victim.read_bytes() == b"keep me\n"


def test_locks_are_taken_in_one_process_once(tmp_path):
    peers = lock_peers_file(tmp_path / "peers.json")
    try:
        with pytest.raises(LockError, match="peers file"):
            lock_peers_file(tmp_path / "peers.json")
    finally:
        peers.release()
    lock_peers_file(tmp_path / "peers.json").release()
