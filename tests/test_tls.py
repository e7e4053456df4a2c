"""TLS: a node serves wss:// with --listen ssl:..., and dials wss:// peers
verifying their certificates against the system's trust store or --cafile.
The CA is made by the test; every address is on loopback."""

import pytest_twisted

from foxnode import client
from foxnode.testing import make_test_ca, start_node, wait_for


@pytest_twisted.ensureDeferred
async def test_wss_node_is_dialed_with_cafile_and_refused_without(reactor, tmp_path):
    ca = make_test_ca(tmp_path / "ca")
    secure = await start_node(reactor, tmp_path / "secure", "--listen", ca.listen())
    url = f"wss://localhost:{secure.port}/ws"
    trusting = await start_node(reactor, tmp_path / "trusting", "--cafile", str(ca.ca_cert), "--peer", url)
    doubting = await start_node(reactor, tmp_path / "doubting", "--peer", url)
    try:
        # A client verifies the node's certificate with the CA ...
        reply = await client.call(reactor, url, "time", trust_roots=str(ca.ca_cert))
        assert reply.status == 200
        # ... a node given the CA connects and proves the peer's node id over TLS ...
        await wait_for(reactor, lambda: trusting.node.live_peers(), what="the TLS peer connection")
        assert trusting.node.live_peers()[0]["node_id"] == secure.node.node_id
        assert trusting.node.store.get(url).verified
        # ... and a node trusting only the system's CAs refuses the certificate.
        await wait_for(reactor, lambda: doubting.node.store.get(url).failures >= 1, timeout=15,
                       what="the untrusted dial to fail")
        assert "certificate" in doubting.node.store.get(url).last_error.lower()
        assert doubting.node.live_peers() == []
        assert {p["node_id"] for p in secure.node.live_peers()} == {trusting.node.node_id}
    finally:
        for n in (trusting, doubting, secure):
            await n.stop()


@pytest_twisted.ensureDeferred
async def test_a_tls_node_is_recorded_as_wss_by_the_nodes_it_dials(reactor, tmp_path):
    ca = make_test_ca(tmp_path / "ca")
    plain = await start_node(reactor, tmp_path / "plain")
    secure = await start_node(reactor, tmp_path / "secure", "--listen", ca.listen(), "--peer", plain.url)
    try:
        await wait_for(reactor, lambda: plain.node.live_peers(), what="the TLS node to connect")
        announced = f"wss://127.0.0.1:{secure.port}/ws"
        await wait_for(reactor, lambda: announced in plain.node.store, what="the wss:// address to be learned")
        assert plain.node.store.get(announced).node_id == secure.node.node_id
        info = await client.call(reactor, announced, "info", trust_roots=str(ca.ca_cert))
        assert info.response["listen"] == announced
    finally:
        for n in (secure, plain):
            await n.stop()
