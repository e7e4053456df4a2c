"""Filters for polling between twistd processes on loopback: a filter made
on one connection outlives it, and a new connection polls what was
published meanwhile on another node, all of it, in order."""

from __future__ import annotations

import time

import pytest_twisted

from foxnode import client
from foxnode.testing import sleep, spawn_node, stop_all


@pytest_twisted.ensureDeferred
async def test_a_filter_outlives_its_connection_and_polls_what_another_node_published(reactor, tmp_path):
    a = spawn_node(tmp_path / "a", "--exchange-interval", "2")
    b = spawn_node(tmp_path / "b", "--exchange-interval", "2", "--peer", a.url)
    try:
        deadline = time.monotonic() + 30
        while not (await client.call(reactor, b.url, "info")).response["connected"]:
            assert time.monotonic() < deadline, "the nodes did not connect"
            await sleep(reactor, 0.3)

        maker = await client.connect(reactor, b.url)
        made = await maker.request("filter", {"topics": ["lab"]})
        assert made.status == 200, made
        fid = made.response["filter"]
        maker.close()
        await maker.when_closed()

        ids = []
        for n in range(20):
            reply = await client.call(reactor, a.url, "publish", {"topic": "lab", "payload": {"n": n}})
            assert reply.status == 202, reply
            ids.append(reply.response["id"])

        got: list = []
        poller = await client.connect(reactor, b.url)
        try:
            deadline = time.monotonic() + 15
            while len(got) < len(ids):
                assert time.monotonic() < deadline, f"polled {len(got)} of {len(ids)} messages"
                reply = await poller.request("poll", {"filter": fid, "limit": 7})
                assert reply.status == 200, reply
                got += reply.response["messages"]
                if not reply.response["more"]:
                    await sleep(reactor, 0.2)
            assert [m["id"] for m in got] == ids
            assert [m["payload"] for m in got] == [{"n": n} for n in range(20)]
            assert all(m["subscription"] == fid and m["event"] == "message" for m in got)
            ended = await poller.request("unfilter", {"filter": fid})
            assert ended.status == 200 and ended.response == {"filter": fid}
            gone = await poller.request("poll", {"filter": fid})
            assert (gone.status, gone.error) == (404, f'Filter "{fid}" is not known.')
        finally:
            poller.close()
    finally:
        stop_all([a, b])
