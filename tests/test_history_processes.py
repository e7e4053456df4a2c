"""History between twistd processes on loopback: a node stopped while
messages pass answers ``history`` with all of them soon after it is back;
what ``publish`` acknowledged survives kill -9; a message store that is not
one refuses the start in one line and is left as it was."""

from __future__ import annotations

import sqlite3
import subprocess
import time

import pytest_twisted

from foxnode import client
from foxnode.msgstore import STORE_FILE
from foxnode.testing import free_port, sleep, spawn_node, stop_all, twistd_command


async def history(reactor, node, **args):
    got, cursor = [], None
    while True:
        reply = await client.call(reactor, node.url, "history", {"topics": ["lab"], "cursor": cursor, **args})
        assert reply.status == 200, reply
        got += reply.response["messages"]
        cursor = reply.response["cursor"]
        if cursor is None:
            return got


@pytest_twisted.ensureDeferred
async def test_a_node_stopped_while_30_messages_pass_has_them_all_soon_after_it_is_back(reactor, tmp_path):
    a = spawn_node(tmp_path / "a")
    b = spawn_node(tmp_path / "b", "--peer", a.url)
    nodes = [a, b]
    try:
        first = await client.call(reactor, a.url, "publish", {"topic": "lab", "payload": "before"})
        assert first.status == 202
        for _ in range(100):
            if len(await history(reactor, b)) == 1:
                break
            await sleep(reactor, 0.1)
        assert len(await history(reactor, b)) == 1, "b never got the first message: not linked"
        b.stop()
        published = [first.response["id"]]
        for n in range(30):
            reply = await client.call(reactor, a.url, "publish", {"topic": "lab", "payload": {"n": n}})
            assert reply.status == 202, reply
            published.append(reply.response["id"])
        b = spawn_node(b.directory, "--peer", a.url, port=b.port)
        nodes[1] = b
        back = time.monotonic()
        while time.monotonic() - back < 10:
            got = await history(reactor, b)
            if len(got) == 31:
                break
            await sleep(reactor, 0.1)
        assert [m["id"] for m in got] == published, "not all 30, or not oldest first"
        assert [m["payload"] for m in got[1:]] == [{"n": n} for n in range(30)]
        took = time.monotonic() - back
        assert took < 10, took
        # And a subscriber with since gets them from b too.
        events = []
        conn = await client.connect(reactor, b.url, on_event=lambda e: events.append(e.body))
        reply = await conn.request("subscribe", {"topics": ["lab"], "since": 0})
        assert reply.status == 200
        for _ in range(100):
            if len(events) >= 31:
                break
            await sleep(reactor, 0.05)
        assert [e["id"] for e in events] == published
        conn.close()
    finally:
        stop_all(nodes)


@pytest_twisted.ensureDeferred
async def test_what_publish_acknowledged_survives_kill_9(reactor, tmp_path):
    a = spawn_node(tmp_path / "a")
    try:
        conn = await client.connect(reactor, a.url)
        acked = [(await conn.request("publish", {"topic": "lab", "payload": {"n": n}, "ttl": 600})).response["id"]
                 for n in range(50)]
        conn.close()
        a.kill()
        a = spawn_node(a.directory, port=a.port)
        assert [m["id"] for m in await history(reactor, a, limit=1000)] == acked
    finally:
        stop_all([a])


def _refused(directory):
    port = free_port()
    try:
        result = subprocess.run(twistd_command(directory, port), cwd=directory, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"foxnode kept running on a bad message store: {e.stdout!r}") from None
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("foxnode: cannot start: message store ") and STORE_FILE in lines[0], output
    return lines[0]


def test_a_message_store_that_is_not_ours_or_is_damaged_refuses_the_start_and_is_left_as_it_was(tmp_path):
    directory = tmp_path / "n"
    directory.mkdir()
    path = directory / STORE_FILE
    path.write_bytes(b"these are my lab notes, not a database\n" * 50)
    before = path.read_bytes()
    assert "not a message store" in _refused(directory)
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == [STORE_FILE]

    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE grades (student TEXT, grade INTEGER)")
    db.commit()
    db.close()
    before = path.read_bytes()
    assert "another program" in _refused(directory)
    assert path.read_bytes() == before
