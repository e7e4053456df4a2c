"""Filters for polling (PROTOCOL.md "Filters (polling)"), without sockets:
nodes on a MemoryNetwork, time advanced by the test."""

from __future__ import annotations

import ipaddress
import os

from prometheus_client import generate_latest

from foxnode import codec, service
from foxnode.config import GossipConfig, NodeConfig
from foxnode.testing import FakeConnection, MemoryNetwork, memory_node

FIVE_MINUTES = 300.0


def reply_of(result, reactor):
    if isinstance(result, codec.Reply):
        return result
    got = []
    result.addBoth(got.append)
    if not got:
        reactor.advance(0)  # a publish answers once its turn's commit is done
    return got[0]


def ask(node_service, op, args, conn=None):
    conn = conn or FakeConnection()
    conn.trusted = node_service.node.is_trusted(conn)
    return reply_of(node_service.node.handle_request(conn, codec.Request(op, args)), node_service.reactor)


def configs(node=None, **gossip):
    return service.Configs(node=node or NodeConfig(), gossip=GossipConfig(**gossip))


def one_node(tmp_path, node=None, **gossip):
    net = MemoryNetwork()
    return net, memory_node(net, tmp_path / "a", configs(node, **gossip))


def publish(net, node, n, **args):
    reply = ask(node, "publish", {"topic": "t", "payload": {"n": n}, **args})
    assert reply.status == 202, reply
    net.advance(0.1)
    return reply.response["id"]


def made_filter(node, conn=None, **args):
    reply = ask(node, "filter", {"topics": ["t"], **args}, conn)
    assert reply.status == 200, reply
    return reply.response["filter"]


def poll(node, filter_id, **args):
    return ask(node, "poll", {"filter": filter_id, **args})


def test_a_filter_collects_what_arrived_since_the_last_poll_oldest_first(tmp_path):
    net, node = one_node(tmp_path)
    try:
        maker = FakeConnection()
        fid = made_filter(node, maker)
        # It outlives the connection that made it.
        node.node.connection_lost(maker, 1000, None)
        ids = [publish(net, node, n) for n in range(3)]
        got = poll(node, fid)
        assert got.status == 200
        body = codec.loads(codec.encode_reply(got))["response"]
        assert [m["id"] for m in body["messages"]] == ids
        assert [m["payload"] for m in body["messages"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        # Each as a subscription pushes it.
        assert all(m["event"] == "message" and m["subscription"] == fid and m["encrypted"] is None
                   for m in body["messages"])
        assert body["more"] is False and body["dropped"] == 0
        again = codec.loads(codec.encode_reply(poll(node, fid)))["response"]
        assert again["messages"] == [] and again["more"] is False
    finally:
        node.stopService()


def test_a_filter_ends_five_minutes_after_its_last_poll(tmp_path):
    net, node = one_node(tmp_path)
    try:
        fid = made_filter(node)
        other = made_filter(node)
        net.advance(FIVE_MINUTES - 10, step=5)
        assert poll(node, fid).status == 200  # polled: five more minutes
        net.advance(FIVE_MINUTES - 10, step=5)
        assert poll(node, fid).status == 200
        # Never polled: gone, by the sweep of the service tree, untold.
        assert {sub.id for sub in node.node.gossip.subscribers["t"]} == {fid}
        assert poll(node, other) == codec.Reply(404, f'Filter "{other}" is not known.')
        net.advance(FIVE_MINUTES + GossipConfig().filter_sweep_interval, step=5)
        assert poll(node, fid) == codec.Reply(404, f'Filter "{fid}" is not known.')
        # Nothing of them is left in gossip.
        assert node.node.gossip.subscribers == {}
    finally:
        node.stopService()


def test_unfilter_ends_it(tmp_path):
    net, node = one_node(tmp_path)
    try:
        fid = made_filter(node)
        assert ask(node, "unfilter", {"filter": fid}).response == {"filter": fid}
        assert poll(node, fid).status == 404
        assert ask(node, "unfilter", {"filter": fid}) == codec.Reply(404, f'Filter "{fid}" is not known.')
        publish(net, node, 1)
        assert node.node.gossip.subscribers == {}
    finally:
        node.stopService()


def test_limit_pages_and_more_says_what_waits(tmp_path):
    net, node = one_node(tmp_path)
    try:
        fid = made_filter(node)
        ids = [publish(net, node, n) for n in range(5)]
        pages = []
        while True:
            body = codec.loads(codec.encode_reply(poll(node, fid, limit=2)))["response"]
            pages.append(([m["id"] for m in body["messages"]], body["more"]))
            if not body["more"]:
                break
        assert pages == [(ids[0:2], True), (ids[2:4], True), (ids[4:], False)]
        assert poll(node, fid, limit=0).status == 400 and "limit" in poll(node, fid, limit=0).error
    finally:
        node.stopService()


def test_held_messages_are_bounded_the_oldest_dropped_and_counted(tmp_path):
    net, node = one_node(tmp_path, filter_messages=3)
    try:
        fid = made_filter(node)
        ids = [publish(net, node, n) for n in range(5)]
        body = codec.loads(codec.encode_reply(poll(node, fid)))["response"]
        assert [m["id"] for m in body["messages"]] == ids[2:]
        assert body["dropped"] == 2
        assert poll(node, fid).response["dropped"] == 0
        scraped = generate_latest(node.node.metrics.registry).decode()
        assert "foxnode_filter_messages_dropped_total 2.0" in scraped
        assert "foxnode_filters 1.0" in scraped
    finally:
        node.stopService()


def test_held_bytes_are_bounded_too(tmp_path):
    net, node = one_node(tmp_path, filter_bytes=4000)
    try:
        fid = made_filter(node)
        for n in range(5):
            assert ask(node, "publish", {"topic": "t", "payload": "x" * 1500}).status == 202
            net.advance(0.1)
        body = codec.loads(codec.encode_reply(poll(node, fid)))["response"]
        assert len(body["messages"]) == 2 and body["dropped"] == 3
    finally:
        node.stopService()


def test_filters_are_bounded_per_node_and_per_client_address(tmp_path):
    # The operator is 127.0.0.1 alone: other loopback addresses are clients.
    only_me = NodeConfig(trusted=(ipaddress.ip_network("127.0.0.1/32"),))
    net, node = one_node(tmp_path, only_me, max_filters=5, max_filters_per_ip=2, operator_filters=2)
    try:
        stranger = FakeConnection(remote_host="127.9.9.9")
        made = [made_filter(node, stranger) for _ in range(2)]
        over = ask(node, "filter", {"topics": ["t"]}, FakeConnection(remote_host="127.9.9.9"))
        assert over.status == 429 and "127.9.9.9" in over.error and "at most 2" in over.error
        # Another address is another client; the operator is held to the total only.
        made_filter(node, FakeConnection(remote_host="127.9.9.8"))
        made_filter(node)
        made_filter(node)
        full = ask(node, "filter", {"topics": ["t"]})
        assert full.status == 429 and "at most 5" in full.error
        # One ended, one may be made again, by that address too.
        ask(node, "unfilter", {"filter": made[0]})
        made_filter(node, FakeConnection(remote_host="127.9.9.9"))
    finally:
        node.stopService()


def test_clients_from_many_addresses_leave_the_operator_filters(tmp_path):
    # max_filters_per_ip holds one /64; an IPv6 client holds 65,536 of them
    # in a /48, and 16 /64s filled the node: the operator, held to the total
    # only, got 429 too. The defaults keep some filters for the operator.
    net, node = one_node(tmp_path)
    config = node.node.gossip.config
    others = config.max_filters - config.operator_filters
    try:
        strangers = [FakeConnection(remote_host=f"2001:db8:0:{n:x}::1") for n in range(64)]
        made = 0
        for conn in strangers:
            for _ in range(config.max_filters_per_ip):
                if made < others:
                    made_filter(node, conn)
                    made += 1
        refused = ask(node, "filter", {"topics": ["t"]}, FakeConnection(remote_host="2001:db8:1::1"))
        assert refused.status == 429 and "operator" in refused.error, refused
        for _ in range(config.operator_filters):
            made_filter(node)  # the operator (127.0.0.1)
        full = ask(node, "filter", {"topics": ["t"]})
        assert full.status == 429 and f"at most {config.max_filters}" in full.error
    finally:
        node.stopService()


def test_a_key_filter_receives_only_what_its_key_opens(tmp_path):
    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    try:
        secret = os.urandom(32).hex()
        key_a = ask(a, "addkey", {"type": "sym", "key": secret}).response["id"]
        key_b = ask(b, "addkey", {"type": "sym", "key": secret}).response["id"]
        other_b = ask(b, "newkey", {"type": "sym"}).response["id"]
        a.node.store.add([net.url(b.node.listen_port)], "register")
        for _ in range(100):
            net.advance(0.2)
            if b.node.live_peers():
                break
        assert b.node.live_peers()
        keyed = made_filter(b, key=key_b)
        wrong = made_filter(b, key=other_b)
        plain = made_filter(b)
        sealed = publish(net, a, 1, key=key_a)
        clear = publish(net, a, 2)
        net.advance(1)
        got = codec.loads(codec.encode_reply(poll(b, keyed)))["response"]["messages"]
        assert [(m["id"], m["payload"], m["encrypted"]) for m in got] == [(sealed, {"n": 1}, "sym")]
        assert poll(b, wrong).response["messages"] == []
        got = codec.loads(codec.encode_reply(poll(b, plain)))["response"]["messages"]
        assert [(m["id"], m["payload"]) for m in got] == [(clear, {"n": 2})]
    finally:
        a.stopService()
        b.stopService()


def test_filter_takes_what_subscribe_takes(tmp_path):
    net, node = one_node(tmp_path)
    try:
        for args in ({}, {"topics": 3}, {"topics": ["t"], "key": "nokey"}, {"topics": ["t"], "from": ["x"]},
                     {"topics": ["t"], "min_pow": -1}):
            refused = ask(node, "filter", args)
            sub = ask(node, "subscribe", args)
            assert (refused.status, refused.error.replace("filter", "subscribe")) == (sub.status, sub.error)
        assert ask(node, "poll", {}).status == 400
        assert "filter" in ask(node, "poll", {"filter": 1}).error
    finally:
        node.stopService()
