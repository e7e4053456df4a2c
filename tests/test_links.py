"""Link emulation (links.py): latency with jitter, loss as retransmission
delay, bandwidth, per link and per group of ports; on a Clock, and once on
the wire between two real nodes.

Every address used here is on 127.0.0.1.
"""

from __future__ import annotations

import random
import time

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from foxnode import links, tap
from foxnode.config import LinkConfig, LinkShape
from foxnode.testing import running_node, sleep, wait_for


class Recorder:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.got: list[tuple[float, bytes]] = []

    def __call__(self, data: bytes) -> None:
        self.got.append((self.clock.seconds(), data))


def pipe(shape: LinkShape, seed: int = 1, min_rto: float = 0.2) -> tuple[Clock, links.Pipe, Recorder]:
    clock = Clock()
    out = Recorder(clock)
    return clock, links.Pipe(clock, shape, out, random.Random(seed), min_rto), out


def test_latency_delays_each_chunk_by_it():
    clock, p, out = pipe(LinkShape(latency=0.04))
    p.send(b"a")
    clock.advance(0.039)
    assert out.got == []
    clock.advance(0.001)
    assert out.got == [(pytest.approx(0.04), b"a")]


def test_jitter_spreads_arrivals_but_never_reorders():
    clock, p, out = pipe(LinkShape(latency=0.04, jitter=0.02))
    for i in range(200):
        p.send(b"%d" % i)
        clock.advance(0.001)
    for _ in range(100):
        clock.advance(0.001)
    assert [d for _, d in out.got] == [b"%d" % i for i in range(200)]
    times = [t for t, _ in out.got]
    assert times == sorted(times)
    # (the clock moves in steps of 1 ms: a delivery is seen at the step after its time)
    delays = [t - i * 0.001 for i, t in enumerate(times)]
    assert all(0.02 - 1e-6 <= d <= 0.06 + 0.002 for d in delays), delays
    assert max(delays) - min(delays) > 0.02  # it does jitter


def test_bandwidth_spaces_chunks_by_their_size():
    clock, p, out = pipe(LinkShape(latency=0.01, bandwidth=10_000))
    for _ in range(10):
        p.send(b"x" * 1000)
    clock.pump([0.01] * 200)
    assert [t for t, _ in out.got] == pytest.approx([0.1 * (i + 1) + 0.01 for i in range(10)], abs=0.0101)


class Draws(random.Random):
    """random() from a list, for the loss draws."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0) if self.draws else 0.99


def test_a_lost_segment_arrives_a_retransmission_later_and_holds_back_the_rest():
    clock = Clock()
    out = Recorder(clock)
    # First chunk: its segment lost once (0.001 < 0.5), then through.
    p = links.Pipe(clock, LinkShape(latency=0.05, loss=0.5), out, Draws([0.001, 0.9, 0.9]), min_rto=0.2)
    p.send(b"first")
    p.send(b"second")
    clock.pump([0.01] * 100)
    # rto: at least 0.2 s, and twice the round trip (2 x 0.1 s)
    assert out.got == [(pytest.approx(0.05 + 0.2), b"first"), (pytest.approx(0.05 + 0.2), b"second")]


def test_loss_costs_time_on_average_and_never_bytes():
    clock, p, out = pipe(LinkShape(latency=0.01, loss=0.1), seed=7)
    for i in range(500):
        p.send(b"%d" % i)
    clock.pump([0.01] * 1000)
    assert [d for _, d in out.got] == [b"%d" % i for i in range(500)]
    late = [t for t, _ in out.got if t > 0.021]
    assert late, "some chunks are retransmitted"


class Wrapped(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


def shaped(shape: LinkShape) -> tuple[Clock, links.ShapedProtocol, Wrapped, StringTransport]:
    from twisted.internet.protocol import Factory

    clock = Clock()
    inner = Wrapped()
    factory = links.ShapedFactory(Factory.forProtocol(lambda: inner), clock, shape, random.Random(1), 0.2)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, proto, inner, transport


def test_the_wrapper_delays_both_directions_and_closes_after_the_data():
    clock, proto, inner, transport = shaped(LinkShape(latency=0.03))
    inner.transport.write(b"hello")
    inner.transport.writeSequence([b" ", b"world"])
    inner.transport.loseConnection()
    assert transport.value() == b"" and not transport.disconnecting
    proto.dataReceived(b"reply")
    clock.advance(0.03)
    assert transport.value() == b"hello world" and transport.disconnecting
    assert inner.data == b"reply"
    # What arrived before the end reaches the protocol before the end does.
    proto.dataReceived(b"last")
    proto.connectionLost(Failure(ConnectionError("gone")))
    assert inner.lost is None
    clock.advance(0.03)
    assert inner.data == b"replylast" and inner.lost is not None


def test_links_take_the_shape_of_their_group():
    config = LinkConfig(default=LinkShape(latency=0.04),
                        rules=((9000, 9099, LinkShape(latency=0.001)), (9100, 9100, LinkShape())))
    assert config.shape_for(9050).latency == 0.001
    assert config.shape_for(9100).is_plain()
    assert config.shape_for(9200).latency == 0.04
    plain = object()
    assert links.wrap_endpoint(plain, config, 9100, Clock(), random.Random()) is plain
    assert isinstance(links.wrap_endpoint(plain, config, 9200, Clock(), random.Random()), links.ShapedEndpoint)
    assert links.wrap_endpoint(plain, LinkConfig(), 9200, Clock(), random.Random()) is plain


def test_the_figures_as_written():
    assert links.parse_latency("40ms:10ms") == (0.04, 0.01)
    assert links.parse_latency("0.5s") == (0.5, 0.0)
    assert links.parse_latency("250us")[0] == pytest.approx(250e-6)
    assert links.parse_loss("1%") == 0.01 and links.parse_loss("0.02") == 0.02
    assert links.parse_rate("1mbit") == 125_000 and links.parse_rate("2000") == 2000
    assert links.parse_rule("9000-9499=latency=40ms:10ms,loss=1%") == (
        9000, 9499, LinkShape(latency=0.04, jitter=0.01, loss=0.01))
    for bad, parse in [("-40ms", links.parse_latency), ("40ms:-1ms", links.parse_latency),
                       ("nan", links.parse_latency), ("61s", links.parse_latency), ("", links.parse_latency),
                       ("100%", links.parse_loss), ("-1%", links.parse_loss), ("abc", links.parse_loss),
                       ("nan", links.parse_loss), ("0", links.parse_rate), ("fast", links.parse_rate),
                       ("9000=latency=-1ms", links.parse_rule), ("9000-8000=", links.parse_rule),
                       ("x=latency=1ms", links.parse_rule), ("9000=jitter=1ms", links.parse_rule),
                       ("9000", links.parse_rule)]:
        with pytest.raises(ValueError):
            parse(bad)


def test_the_node_options():
    options = tap.Options()
    options.parseOptions(["--link-latency", "40ms:10ms", "--link-loss", "1%", "--link-bandwidth", "1mbit",
                          "--link-rule", "9000-9099=latency=1ms"])
    c = options.configs().peers.links
    assert c.default == LinkShape(latency=0.04, jitter=0.01, loss=0.01, bandwidth=125_000)
    assert c.rules == ((9000, 9099, LinkShape(latency=0.001)),)
    with pytest.raises(UsageError, match="--link-latency"):
        tap.Options().parseOptions(["--link-latency", "-5ms"])


@pytest_twisted.ensureDeferred
async def test_on_the_wire_a_request_takes_twice_the_configured_latency(reactor, tmp_path):
    """A dials B with 50 ms links: a request over that peer connection
    answers after about one round trip, 2 x 50 ms (one way each)."""
    async with running_node(reactor, tmp_path / "b") as b:
        async with running_node(reactor, tmp_path / "a", "--peer", b.url, "--link-latency", "50ms") as a:
            await wait_for(reactor, lambda: a.node.peers.peers, timeout=20, what="A's peer")
            info = a.node.info()
            assert info["links"]["emulation"] == "wrapper"
            assert info["links"]["default"]["latency"] == 0.05
            conn = next(iter(a.node.peers.peers.values()))
            times = []
            for _ in range(5):
                started = time.monotonic()
                reply = await conn.request("peers", timeout=5)
                times.append(time.monotonic() - started)
                assert reply.ok()
            best = min(times)
            assert 0.095 <= best <= 0.2, times
        # Without emulation: far below.
        assert b.node.info()["links"] is None


@pytest_twisted.ensureDeferred
async def test_a_partition_closes_the_links_dialed_across_it_and_healing_dials_again(reactor, tmp_path):
    from foxnode import client

    async with running_node(reactor, tmp_path / "b") as b:
        async with running_node(reactor, tmp_path / "a", "--peer", b.url) as a:
            await wait_for(reactor, lambda: a.node.peers.peers, timeout=20, what="A's peer")
            port = b.port
            reply = await client.call(reactor, a.url, "links", {"block": [[port, port]]})
            assert reply.status == 200 and reply.response == {"block": [[port, port]], "closed": 1}, reply
            # Each side is told (B learned A's address from A's hello, and would dial it).
            reply = await client.call(reactor, b.url, "links", {"block": [[a.port, a.port]]})
            assert reply.status == 200, reply
            await wait_for(reactor, lambda: not a.node.peers.peers and not b.node.peers.peers, timeout=10,
                           what="the link closed")
            assert a.node.info()["links"]["blocked"] == [[port, port]]
            # Not dialed again while partitioned (rounds run every second).
            await sleep(reactor, 2.5)
            assert not a.node.peers.peers
            reply = await client.call(reactor, a.url, "links", {"block": []})
            assert reply.status == 200 and reply.response == {"block": [], "closed": 0}
            await client.call(reactor, b.url, "links", {"block": []})
            await wait_for(reactor, lambda: a.node.peers.peers, timeout=10, what="the link again")
            bad = await client.call(reactor, a.url, "links", {"block": [[9, 8]]})
            assert bad.status == 400 and '"block"' in bad.error
