"""A frame holds what its length says: the send queues and gossip's cache
count ``len(frame)``, so a frame that kept orjson's grown buffer (about
4 KiB for a 400-byte frame) would make every such bound a tenth of the truth."""

import pytest

from foxnode import codec

FRAMES = 20_000


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("make", [
    lambda i: codec.encode_event("message", id=str(i), payload="x" * 400),
    lambda i: codec.encode_reply(codec.Reply(202, "Accepted", {"accepted": ["x" * 400]}), True, i),
    lambda i: codec.encode_reply(codec.Reply(400, "y" * 400), False, None),
    lambda i: codec.encode_reply(codec.ok({"x": "y" * 400}), True, i),
], ids=["event", "202 reply", "error reply", "200 reply"])
def test_frames_hold_about_their_length(make):
    before = _rss_kib()
    frames = [make(i) for i in range(FRAMES)]
    grown = (_rss_kib() - before) * 1024
    length = sum(len(f) for f in frames)
    # A bytes object's header and malloc rounding: well under 2x for 400-byte
    # frames; orjson's kept buffers were about 9x.
    assert grown < 2 * length, f"{FRAMES} frames of {length // FRAMES} bytes hold {grown // FRAMES} bytes each"
