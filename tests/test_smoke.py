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


def test_json_the_labs_node_took_is_taken():
    # Python's json (the lab's node) reads these; orjson alone would not.
    from foxnode import codec

    assert codec.decode(b'{"op": "time", "id": 1e400}').id == float("inf")
    assert codec.decode(b'{"op": "time", "args": {"x": NaN}}').op == "time"
    # Binary frames are UTF-8 only, even when Python's json would guess UTF-16.
    for payload in (b"\xff\xfe{\x00}\x00", '{"op": "time"}'.encode("utf-16"), b"[" * 5000):
        try:
            codec.decode(payload)
        except codec.CodecError as e:
            assert e.reply is codec.PARSE_ERROR
        else:
            raise AssertionError(f"{payload[:20]!r} was taken")
