"""Plumtree's lazy push, bounded: announcements wait ``lazy_delay``, go in
one frame per link, to at most ``lazy_fanout`` lazy links, never to a link
known to hold the id, and once more ``lazy_repeat`` later to as many others.
The graft wait follows how late envelopes come. And the property this must keep: on a network of
many nodes, every message reaches every node, with about one copy each,
also after a fifth of the nodes go away. Socket-free (gossip.py's logic on
a Clock), so hundreds of nodes run in a second."""

from __future__ import annotations

import heapq
import itertools
import random

import attrs
import orjson
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock  # the single-node tests

from foxnode import codec, identity
from foxnode.gossip import Envelope, Gossip
from foxnode.metrics import NodeMetrics
from foxnode.testing import FakeConnection


def make_gossip(clock: Clock | None = None, **config) -> Gossip:
    gossip = Gossip(clock or Clock(), identity.Identity.generate(), NodeMetrics())
    if config:
        gossip.config = attrs.evolve(gossip.config, **config)
    return gossip


def envelope_of(signer: identity.Identity, clock: Clock, n: int = 1) -> Envelope:
    return Envelope.create(signer, "t", {"n": n}, 60, clock.seconds())


def lazy_links(gossip: Gossip, count: int) -> list[FakeConnection]:
    conns = []
    for _ in range(count):
        conn = FakeConnection("in", identity.Identity.generate().node_id)
        gossip.peer_up(conn)
        gossip.on_prune(conn, codec.Event("prune", {}))
        conns.append(conn)
    return conns


def announced(conn: FakeConnection) -> list[str]:
    return [i for e in conn.events() if e.name == "ihave" for i in e.body["ids"]]


def test_ids_wait_the_delay_then_go_to_at_most_the_fanout():
    gossip = make_gossip(lazy_fanout=6)
    lazy = lazy_links(gossip, 20)
    eager = FakeConnection("in", identity.Identity.generate().node_id)
    gossip.peer_up(eager)
    envelope = envelope_of(gossip.signer, gossip.reactor)
    gossip.accept(envelope, sender=None)
    assert [e.name for e in eager.events()] == ["gossip"]
    assert not any(c.sent for c in lazy), "announced before the delay"
    gossip.reactor.advance(gossip.config.lazy_delay)
    told = [c for c in lazy if announced(c) == [envelope.id]]
    assert len(told) == 6 and all(len(c.sent) <= 1 for c in lazy)
    # The eager link has the envelope: no announcement of it there.
    assert [e.name for e in eager.events()] == ["gossip"]


def test_a_link_that_sent_or_announced_the_id_is_not_told_of_it():
    gossip = make_gossip(lazy_fanout=100)
    sender, announcer, copier, *others = lazy_links(gossip, 8)
    envelope = envelope_of(identity.Identity.generate(), gossip.reactor)
    gossip.accept(envelope, sender=sender)
    gossip.on_ihave(announcer, codec.Event("ihave", {"ids": [envelope.id]}))
    gossip.on_gossip(copier, codec.Event("gossip", {"envelope": envelope.to_json()}))
    gossip.reactor.advance(gossip.config.lazy_delay)
    assert [announced(c) for c in (sender, announcer, copier)] == [[], [], []]
    assert all(announced(c) == [envelope.id] for c in others)


def test_the_origins_link_is_not_told():
    gossip = make_gossip(lazy_fanout=100)
    origin = identity.Identity.generate()
    links = lazy_links(gossip, 3)
    to_origin = FakeConnection("in", origin.node_id)
    gossip.peer_up(to_origin)
    gossip.on_prune(to_origin, codec.Event("prune", {}))
    envelope = envelope_of(origin, gossip.reactor)
    gossip.accept(envelope, sender=links[0])
    gossip.reactor.advance(gossip.config.lazy_delay)
    assert announced(to_origin) == [] and announced(links[1]) == [envelope.id]


def test_ids_within_the_delay_share_one_frame_per_link():
    gossip = make_gossip(lazy_fanout=100)
    links = lazy_links(gossip, 5)
    ids = []
    for n in range(7):
        envelope = envelope_of(gossip.signer, gossip.reactor, n)
        gossip.accept(envelope, sender=None)
        ids.append(envelope.id)
        gossip.reactor.advance(gossip.config.lazy_delay / 10)
    gossip.reactor.advance(gossip.config.lazy_delay)
    for conn in links:
        assert len(conn.sent) == 1 and announced(conn) == ids


def test_a_link_that_turned_eager_before_the_flush_is_still_told():
    # It was lazy when the envelope came, so it was not sent the envelope.
    gossip = make_gossip(lazy_fanout=100)
    (link,) = lazy_links(gossip, 1)
    envelope = envelope_of(gossip.signer, gossip.reactor)
    gossip.accept(envelope, sender=None)
    gossip.on_graft(link, codec.Event("graft", {"ids": []}))  # eager again
    gossip.reactor.advance(gossip.config.lazy_delay)
    assert announced(link) == [envelope.id]


def test_stopping_cancels_the_announcements():
    gossip = make_gossip()
    (link,) = lazy_links(gossip, 1)
    gossip.accept(envelope_of(gossip.signer, gossip.reactor), sender=None)
    gossip.stop()
    gossip.reactor.advance(1)
    assert link.sent == [] and not gossip.reactor.getDelayedCalls()


# -- many nodes ------------------------------------------------------------------------


class Timer:
    def __init__(self, when: float, call) -> None:
        self.when, self.call, self.cancelled, self.called = when, call, False, False

    def active(self) -> bool:
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        self.cancelled = True


class HeapClock:
    """A clock as gossip uses one (``callLater``, ``seconds``), on a heap:
    twisted's ``Clock`` sorts its whole list at each call, which thousands
    of pending frames make quadratic."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, f, *args, **kw) -> Timer:
        timer = Timer(self.now + delay, lambda: f(*args, **kw))
        heapq.heappush(self._heap, (timer.when, next(self._order), timer))
        return timer

    def run(self, seconds: float) -> None:
        until = self.now + seconds
        while self._heap and self._heap[0][0] <= until:
            when, _, timer = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if timer.active():
                timer.called = True
                timer.call()
        self.now = until


class Wire(FakeConnection):
    """One end of a link between two Gossips on one Clock: what it sends
    arrives at the other end ``latency`` later, as the peer's handlers see
    it."""

    def __init__(self, net: "Net", owner: int, other: int) -> None:
        super().__init__("out", net.nodes[other].signer.node_id)
        self.net, self.owner, self.other = net, owner, other
        self.peer: Wire | None = None

    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        net = self.net
        if not self.fox_open:
            return False
        net.frames += 1
        latency = net.latency * (0.75 + net.rng.random() / 2)
        net.clock.callLater(latency, net.arrive, self.peer, frame)
        return True


class Net:
    """``n`` Gossips, each linked to ``degree`` others at random (and to
    whoever picked it), links ``latency`` one way."""

    def __init__(self, n: int, degree: int, seed: int, latency: float = 0.04, **config) -> None:
        self.clock = HeapClock()
        self.rng = random.Random(seed)
        self.latency = latency
        self.frames = 0
        self.nodes = [make_gossip(self.clock, **config) for _ in range(n)]
        for g in self.nodes:
            g._draw = random.Random(self.rng.random())
        self.wires: dict[tuple[int, int], Wire] = {}
        self.copies = [0] * n
        self.down: set[int] = set()
        for a in range(n):
            for b in self.rng.sample([x for x in range(n) if x != a], degree):
                if (a, b) not in self.wires:
                    self.link(a, b)

    def link(self, a: int, b: int) -> None:
        ab, ba = Wire(self, a, b), Wire(self, b, a)
        ab.peer, ba.peer = ba, ab
        self.wires[a, b], self.wires[b, a] = ab, ba
        self.nodes[a].peer_up(ab)
        self.nodes[b].peer_up(ba)

    def arrive(self, wire: Wire, frame: bytes) -> None:
        if wire.owner in self.down or not wire.fox_open:
            return
        body = orjson.loads(frame)
        name = body.pop("event")
        if name == "gossip":
            self.copies[wire.owner] += 1
        gossip = self.nodes[wire.owner]
        gossip.events[name](wire, codec.Event(name, body))

    def kill(self, index: int) -> None:
        self.down.add(index)
        for (a, b), wire in list(self.wires.items()):
            if index in (a, b):
                wire.fox_open = False
                self.nodes[wire.owner].peer_down(wire)
                del self.wires[a, b]

    def publish(self, origin: int, n: int) -> str:
        gossip = self.nodes[origin]
        envelope = envelope_of(gossip.signer, self.clock, n)
        gossip.accept(envelope, sender=None)
        return envelope.id

    def run(self, seconds: float) -> None:
        self.clock.run(seconds)

    def holding(self, message_id: str) -> int:
        return sum(1 for i, g in enumerate(self.nodes) if i not in self.down and message_id in g.seen)

    def phase(self, rng: random.Random, count: int, gap: float, settle: float) -> float:
        """``count`` messages from random live nodes, ``gap`` apart, then
        ``settle``: every live node must hold each; the copies per live
        node per message."""
        alive = [i for i in range(len(self.nodes)) if i not in self.down]
        before, ids = list(self.copies), []
        for k in range(count):
            ids.append(self.publish(rng.choice(alive), k))
            self.run(gap)
        self.run(settle)
        for message_id in ids:
            assert self.holding(message_id) == len(alive), "a node never got a message"
        return sum(self.copies[i] - before[i] for i in alive) / len(alive) / count


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_node_gets_every_message_about_once_also_after_a_fifth_went_away(seed):
    n = 150
    net = Net(n, degree=6, seed=seed)
    rng = random.Random(seed)

    def phase(count: int) -> float:
        return net.phase(rng, count, gap=0.5, settle=3)

    phase(3)  # the first messages flood every link until duplicates prune them
    assert phase(10) <= 1.3
    for i in rng.sample(range(n), n // 5):
        net.kill(i)
    # The tree is broken in many places: grafts over the lazy links mend it,
    # and the duplicates they bring prune it again.
    phase(5)
    phase(10)
    assert phase(10) <= 1.3


def test_a_bounded_fanout_sends_fewer_frames_than_telling_every_lazy_link():
    frames = {}
    for fanout in (6, 1000):
        net = Net(150, degree=8, seed=7, lazy_fanout=fanout)
        for k in range(3):
            net.publish(k, k)
            net.run(0.5)
        net.frames = 0
        for k in range(10):
            message_id = net.publish(k, 100 + k)
            net.run(0.5)
        net.run(2)
        assert net.holding(message_id) == 150
        frames[fanout] = net.frames
    # Two draws of 6 (the second among those still not known to hold the
    # id) against every lazy link: about three quarters of the frames, with
    # links 16 a node here; the more links, the larger the saving.
    assert frames[6] < 0.8 * frames[1000], frames


# -- how long an announced id is waited for ----------------------------------------------


def _announce_then_send(gossip, announcer, tree, late: float, answer_graft_at: float | None = None):
    envelope = envelope_of(identity.Identity.generate(), gossip.reactor)
    gossip.on_ihave(announcer, codec.Event("ihave", {"ids": [envelope.id]}))
    if answer_graft_at is not None:
        gossip.reactor.advance(answer_graft_at)
        assert any(e.name == "graft" for e in announcer.events()), "no graft by then"
        gossip.on_gossip(announcer, codec.Event("gossip", {"envelope": envelope.to_json()}))
        gossip.reactor.advance(late - answer_graft_at)
    else:
        gossip.reactor.advance(late)
    gossip.on_gossip(tree, codec.Event("gossip", {"envelope": envelope.to_json()}))
    gossip.reactor.advance(10)  # every timer of it done
    announcer.sent.clear()


def test_the_graft_wait_follows_how_late_envelopes_come_over_the_tree():
    gossip = make_gossip()
    announcer, tree = lazy_links(gossip, 2)
    base = gossip.config.graft_timeout
    assert gossip.graft_wait() == base
    for _ in range(20):
        _announce_then_send(gossip, announcer, tree, late=base * 0.5)
    assert gossip.graft_wait() == base, "envelopes within the wait: it stays"
    # The tree's copies now come 1.5 s after the announcements: the first
    # grafts are for envelopes on their way; the wait grows past 1.5 s.
    for _ in range(20):
        _announce_then_send(gossip, announcer, tree, late=1.5)
    assert 1.5 < gossip.graft_wait() < gossip.config.graft_timeout_max
    # ... and the grafts stop.
    _announce_then_send(gossip, announcer, tree, late=1.5)
    envelope = envelope_of(identity.Identity.generate(), gossip.reactor)
    gossip.on_ihave(announcer, codec.Event("ihave", {"ids": [envelope.id]}))
    gossip.reactor.advance(1.5)
    assert not any(e.name == "graft" for e in announcer.events())


def test_a_copy_that_came_by_graft_still_tells_how_late_the_trees_was():
    # Grafted first, the envelope comes over the grafted link; the tree's
    # own copy, a duplicate then, is the measure.
    gossip = make_gossip()
    announcer, tree = lazy_links(gossip, 2)
    base = gossip.config.graft_timeout
    for _ in range(20):
        _announce_then_send(gossip, announcer, tree, late=2.0, answer_graft_at=base + 0.01)
        base = min(gossip.graft_wait(), 1.9) if gossip.graft_wait() < 2.0 else None
        if base is None:
            break
    assert gossip.graft_wait() > 2.0


def test_the_wait_is_bounded():
    gossip = make_gossip()
    announcer, tree = lazy_links(gossip, 2)
    for _ in range(5):
        _announce_then_send(gossip, announcer, tree, late=9.0)
    assert gossip.graft_wait() == gossip.config.graft_timeout_max


def slow_network_copies(seed: int, **config) -> list[float]:
    """Copies per node per message, by phase, on 250 ms links (± 25%): a
    lazy neighbour's announcement often comes well before the tree's copy,
    over paths of several hops. Every node gets every message."""
    n, rng = 150, random.Random(seed)
    net = Net(n, degree=6, seed=seed, latency=0.25, **config)

    def phase(count: int) -> float:
        return net.phase(rng, count, gap=1.0, settle=10)

    copies = [phase(5), phase(10)]
    for i in rng.sample(range(n), n // 5):
        net.kill(i)
    return copies + [phase(5), phase(10)]


def test_on_slow_links_the_wait_grows_and_saves_copies():
    adaptive = slow_network_copies(2)
    fixed = slow_network_copies(2, graft_timeout_max=Net(2, 1, 0).nodes[0].config.graft_timeout)
    print("copies per node per message by phase, adaptive", adaptive, "fixed", fixed)
    # A fixed 0.4 s grafts for envelopes on their way, and each graft makes
    # one more eager link: about 1.8 copies. Waiting as long as they take
    # saves a good part of that (not all: the second announcements still
    # find nodes deep in the tree without the envelope).
    assert adaptive[1] <= 1.6 and adaptive[3] <= 1.6
    assert adaptive[3] < fixed[3] - 0.2  # once the wait has learned


def test_one_very_late_copy_does_not_hold_the_wait_up():
    # A peer replaying an old copy of a grafted id: one sample of 100 s
    # counts as the longest wait, and honest samples bring the wait back.
    gossip = make_gossip()
    announcer, tree = lazy_links(gossip, 2)
    for _ in range(10):
        _announce_then_send(gossip, announcer, tree, late=0.1)
    gossip._late(100.0)
    assert gossip.graft_wait() <= gossip.config.graft_timeout_max
    for _ in range(30):
        _announce_then_send(gossip, announcer, tree, late=0.1)
    assert gossip.graft_wait() == gossip.config.graft_timeout
