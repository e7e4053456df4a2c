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

    # Python's json (the lab's node) reads these, so they are not a parse
    # error; but the node could not send them back (orjson writes NaN as
    # null and refuses the rest), so they are refused, naming the fault.
    cases = {
        b'{"op": "time", "id": 1e400}': ("NaN or Infinity", None),
        b'{"op": "time", "id": "a", "args": {"x": NaN}}': ("NaN or Infinity", "a"),
        b'{"op": "time", "id": 7, "args": [-Infinity]}': ("NaN or Infinity", 7),
        b'{"op": "time", "id": "\\ud800"}': ("surrogate", None),
        b'{"op": "\\udfff", "id": 1}': ("surrogate", 1),
        b'{"op": "time", "id": 2, "args": {"\\ud800": 1}}': ("surrogate", 2),
        b'{"op": "time", "id": 3, "args": 18446744073709551616, "x": NaN}': ("NaN", 3),
        b'{"op": "time", "id": 4, "args": 1e999}': ("NaN or Infinity", 4),
        b'{"event": "gossip", "envelope": {"payload": NaN}}': ("NaN", None),
    }
    for payload, (fault, rid) in cases.items():
        try:
            codec.decode(payload)
        except codec.CodecError as e:
            assert e.reply.status == 400 and fault in e.reply.error, (payload, e.reply)
            assert (e.has_id, e.rid) == (rid is not None, rid), payload
            assert e.event == ("gossip" if b"event" in payload else None)
            codec.encode_reply(e.reply, e.has_id, e.rid)
        else:
            raise AssertionError(f"{payload!r} was taken")
    # What orjson reads is sendable as it is: a big integer it reads as a float.
    assert codec.decode(b'{"op": "time", "id": 18446744073709551616}').id == 2.0 ** 64
    # Binary frames are UTF-8 only, even when Python's json would guess UTF-16.
    for payload in (b"\xff\xfe{\x00}\x00", '{"op": "time"}'.encode("utf-16"), b"[" * 5000):
        try:
            codec.decode(payload)
        except codec.CodecError as e:
            assert e.reply is codec.PARSE_ERROR
        else:
            raise AssertionError(f"{payload[:20]!r} was taken")
