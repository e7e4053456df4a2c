"""Who is the node's operator: ``--trusted`` networks (PROTOCOL.md "Who may do what")."""

import ipaddress

import pytest
from twisted.python import usage

from foxnode import tap
from foxnode.config import DEFAULT_TRUSTED
from foxnode.node import is_trusted_host


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", True), ("127.3.0.1", True), ("::1", True),
    # An IPv4-mapped address is its IPv4 address, in either direction.
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", False),
    ("10.0.0.1", False), ("::2", False), ("0.0.0.0", False),
    # Not an IP address at all (a UNIX socket, "?"): never trusted.
    ("?", False), ("localhost", False), ("", False),
])
def test_default_trusts_loopback_only(host, expected):
    assert is_trusted_host(host, DEFAULT_TRUSTED) is expected


def test_given_networks_replace_the_default():
    options = tap.Options()
    options.parseOptions(["--trusted", "127.5.0.0/16", "--trusted", "::1"])
    trusted = options.node_config().trusted
    assert trusted == (ipaddress.ip_network("127.5.0.0/16"), ipaddress.ip_network("::1/128"))
    assert is_trusted_host("127.5.9.9", trusted)
    assert not is_trusted_host("127.0.0.1", trusted)


def test_default_when_not_given():
    options = tap.Options()
    options.parseOptions([])
    assert options.node_config().trusted == DEFAULT_TRUSTED


def test_bad_network_is_one_usage_line():
    options = tap.Options()
    with pytest.raises(usage.UsageError, match="--trusted 300.0.0.0/8"):
        options.parseOptions(["--trusted", "300.0.0.0/8"])


@pytest.mark.parametrize("op, args", [("newkey", {"type": "sym"}), ("unregister", {"addr": "ws://127.0.0.9:9/ws"})])
def test_a_node_this_node_dialed_is_no_operator_of_it(tmp_path, op, args):
    # The operator is a client that connects to the node from a --trusted
    # network. A node this node dialed, at an address in such a network
    # (anyone may register one), is a peer: over the connection this node
    # opened, it must not reach the operator ops.
    from foxnode.testing import MemoryNetwork, memory_node

    net = MemoryNetwork()
    a = memory_node(net, tmp_path / "a")
    b = memory_node(net, tmp_path / "b")
    try:
        a.node.store.add([net.url(b.node.listen_port)], "register")
        a.node.peers.tick_soon()
        net.advance(0.5)
        outbound = a.node.peers.peers[b.node.node_id]
        assert outbound.direction == "out"
        replies = []
        b.node.peers.peers[a.node.node_id].request(op, args).addCallback(replies.append)
        net.advance(0.1)
        [reply] = replies
        assert reply.status == 403 and "only for trusted clients" in reply.error, reply
        assert len(a.node.gossip.keys) == 0 and not outbound.trusted
    finally:
        a.stopService()
        b.stopService()
