import pytest_twisted

from foxnode import client
from foxnode.testing import start_node


@pytest_twisted.ensureDeferred
async def test_node_answers_time(reactor, node_dir):
    running = await start_node(reactor, node_dir)
    try:
        reply = await client.call(reactor, running.url, "time")
        assert reply.status == 200
        assert set(reply.response) == {"time", "time_zone"}
    finally:
        await running.stop()
