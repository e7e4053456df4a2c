"""foxchain without sockets: blocks on their own (block.py), the ledger's
fork choice and reorgs (ledger.py), and the plugin's ops and validator on
a node of a MemoryNetwork (mining inline: a memory reactor has no threads)."""

from __future__ import annotations

import pytest

from foxnode import codec
from foxnode.plugins.chain import TOPIC
from foxnode.plugins.chain import block as blocks
from foxnode.plugins.chain.block import GENESIS, Invalid
from foxnode.plugins.chain.ledger import HEAD, KNOWN, ORPHAN, SIDE, Ledger, LedgerError
from foxnode.testing import FakeConnection, MemoryNetwork, memory_node

NOW = 1_800_000_000


def mined(prev, data="x", difficulty=8, when=NOW):
    b = blocks.mine(prev, data, when, difficulty)
    assert b is not None
    return b


def solved(b):
    """``b`` with a nonce that makes its proof of work hold, its hash right."""
    b = dict(b)
    for nonce in range(1 << 20):
        b["nonce"], b["hash"] = nonce, None
        b["hash"] = blocks.block_hash(b)
        if blocks.meets(b["hash"], b["difficulty"]):
            return b
    raise AssertionError("no nonce")


# -- blocks ------------------------------------------------------------------------


def test_a_mined_block_passes_its_checks_and_proves_its_difficulty():
    b = mined(GENESIS, {"memo": "hi"}, difficulty=12)
    assert blocks.check(b, NOW) == b
    assert b["hash"].startswith("000") and int(b["hash"], 16) < 1 << (256 - 12)
    assert (b["height"], b["prev"], b["data"]) == (1, GENESIS["hash"], {"memo": "hi"})
    # The genesis block is the same everywhere: a constant hash.
    assert GENESIS["hash"] == blocks.block_hash(GENESIS)


@pytest.mark.parametrize("change, says", [
    ({"nonce": None}, '"nonce" must be a whole number'),
    ({"hash": "00" * 32}, '"hash" is not the hash of the block'),
    ({"height": 0}, '"height" must be a whole number of at least 1'),
    ({"height": True}, '"height" must be a whole number'),
    ({"prev": "XYZ"}, '"prev" must be 64 lowercase hex digits'),
    ({"difficulty": 7}, '"difficulty" must be a whole number from 8 to 32'),
    ({"difficulty": 33}, '"difficulty" must be a whole number from 8 to 32'),
    ({"time": NOW + 3 * 3600}, '"time" is more than 7200 s ahead'),
    ({"data": "x" * 2000}, '"data" is 2002 bytes as JSON, more than 1024'),
    ({"extra": 1}, 'a block has no "extra"'),
])
def test_a_block_that_breaks_a_rule_is_invalid_and_says_which(change, says):
    b = {**mined(GENESIS), **change}
    with pytest.raises(Invalid) as caught:
        blocks.check(b, NOW)
    assert says in str(caught.value)


def test_a_block_without_its_proof_of_work_is_invalid():
    b = mined(GENESIS, difficulty=8)
    b["difficulty"] = 30  # claims more work than it did
    b["hash"] = blocks.block_hash(b)
    with pytest.raises(Invalid, match="the proof of work does not hold"):
        blocks.check(b, NOW)
    for shape in (None, [], "block", {"height": 1}):
        with pytest.raises(Invalid):
            blocks.check(shape, NOW)


def test_mining_gives_up_after_its_tries():
    assert blocks.mine(GENESIS, "x", NOW, 32, tries=100) is None


# -- the ledger ----------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.open(str(tmp_path / "chain.sqlite"))
    yield ledger
    ledger.close()


def test_the_ledger_starts_at_genesis_and_grows(ledger):
    assert ledger.head()["hash"] == GENESIS["hash"] and ledger.head()["work"] == 1
    b1 = mined(GENESIS)
    b2 = mined(b1)
    assert ledger.add(b1) == HEAD and ledger.add(b2) == HEAD and ledger.add(b2) == KNOWN
    assert ledger.head()["hash"] == b2["hash"] and ledger.head()["work"] == 1 + 2 * 256
    assert [b["height"] for b in ledger.recent(5)] == [2, 1, 0]
    assert ledger.at(1)["hash"] == b1["hash"]


def test_an_orphan_is_not_kept_and_a_misfit_is_invalid(ledger):
    b1 = mined(GENESIS)
    b2 = mined(b1)
    assert ledger.add(b2) == ORPHAN and ledger.get(b2["hash"]) is None
    ledger.add(b1)
    with pytest.raises(Invalid, match='"height" is 5, its parent\'s is 0: it must be 1'):
        ledger.add(solved({**mined(GENESIS), "height": 5}))
    with pytest.raises(Invalid, match="earlier than its parent"):
        ledger.add(solved({**mined(b1, when=NOW), "time": NOW - 10}))
    assert ledger.count() == 2


def test_more_work_wins_and_the_best_chain_is_reorganised(ledger):
    a1, a2 = mined(GENESIS, "a"), None
    a2 = mined(a1, "a")
    for b in (a1, a2):
        ledger.add(b)
    # A fork from genesis: one block, but of more work than a1 and a2 together.
    b1 = mined(GENESIS, "b", difficulty=10)
    assert ledger.add(b1) == HEAD
    assert ledger.head()["hash"] == b1["hash"] and ledger.head()["height"] == 1
    assert ledger.at(2) is None and ledger.at(1)["hash"] == b1["hash"]
    # The old branch grows past it: back again.
    a3 = mined(a2, "a", difficulty=10)
    assert ledger.add(a3) == HEAD
    assert [ledger.at(h)["hash"] for h in (1, 2, 3)] == [a1["hash"], a2["hash"], a3["hash"]]
    # A side block that does not win is kept, off the best chain.
    assert ledger.add(mined(GENESIS, "c")) == SIDE


def test_equal_work_is_settled_by_the_lower_hash_whatever_the_order(tmp_path):
    x, y = mined(GENESIS, "x"), mined(GENESIS, "y")
    low = min(x, y, key=lambda b: b["hash"])
    for i, order in enumerate(((x, y), (y, x))):
        ledger = Ledger.open(str(tmp_path / f"{i}.sqlite"))
        for b in order:
            ledger.add(b)
        assert ledger.head()["hash"] == low["hash"]
        ledger.close()


def test_the_locator_finds_where_two_ledgers_part(tmp_path):
    ours, theirs = Ledger.open(str(tmp_path / "a.sqlite")), Ledger.open(str(tmp_path / "b.sqlite"))
    chain = [GENESIS]
    for i in range(40):
        chain.append(mined(chain[-1], i))
    for b in chain[1:31]:
        ours.add(b)
    for b in chain[1:]:
        theirs.add(b)
    locator = ours.locator()
    assert locator[0] == chain[30]["hash"] and locator[-1] == GENESIS["hash"] and len(locator) < 20
    got = theirs.after(locator, 100)
    assert [b["height"] for b in got] == list(range(31, 41))
    assert [b["height"] for b in theirs.after(["ee" * 32], 5)] == [1, 2, 3, 4, 5]
    ours.close()
    theirs.close()


def test_the_ledger_survives_a_reopen_and_refuses_a_file_that_is_not_one(tmp_path):
    path = str(tmp_path / "chain.sqlite")
    ledger = Ledger.open(path)
    b1 = mined(GENESIS)
    ledger.add(b1)
    ledger.close()
    again = Ledger.open(path)
    assert again.head()["hash"] == b1["hash"]
    again.close()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(LedgerError, match="not a foxchain ledger"):
        Ledger.open(str(junk))


# -- the plugin on a node ---------------------------------------------------------------


def call(node, op_name, args=None):
    result = node.node.handle_request(FakeConnection(), codec.Request(op_name, args))
    if not isinstance(result, codec.Reply):
        got = []
        result.addBoth(got.append)
        node.reactor.advance(0)
        assert got
        result = got[0]
    return codec.loads(codec.encode_reply(result))


@pytest.fixture
def node(tmp_path):
    net = MemoryNetwork()
    net.reactor.advance(NOW)
    built = memory_node(net, tmp_path / "n", plugins=["chain"])
    yield built
    built.stopService()


def test_the_ops_mine_and_read_the_chain(node):
    assert call(node, "chain")["response"] == {"height": 0, "hash": GENESIS["hash"], "work": 1,
                                               "blocks": [GENESIS]}
    mined_reply = call(node, "mine", {"data": {"memo": "first"}, "difficulty": 8})
    assert mined_reply["status"] == 200, mined_reply
    b = mined_reply["response"]["block"]
    assert mined_reply["response"]["head"] == {"height": 1, "hash": b["hash"], "work": 257}
    assert mined_reply["response"]["published"]
    assert call(node, "block", {"height": 1})["response"] == {**b, "best": True}
    assert call(node, "block", {"hash": b["hash"]})["response"]["data"] == {"memo": "first"}
    assert call(node, "chain", {"recent": 1})["response"]["blocks"] == [b]
    assert call(node, "blocks", {"locator": [GENESIS["hash"]]})["response"]["blocks"] == [b]
    # What it mined went out on the topic, in the node's history.
    got = call(node, "history", {"topics": [TOPIC]})["response"]["messages"]
    assert [m["payload"] for m in got] == [b]


@pytest.mark.parametrize("op_name, args, status, says", [
    ("mine", {"difficulty": 7}, 400, '"difficulty" must be a whole number from 8 to 22'),
    ("mine", {"difficulty": "16"}, 400, '"difficulty" must be a whole number'),
    ("mine", {"data": "x" * 2000}, 400, '"data" is 2002 bytes as JSON'),
    ("mine", {"date": 1}, 400, 'takes no "date"'),
    ("chain", {"recent": 101}, 400, '"recent" must be a whole number from 0 to 100'),
    ("block", {}, 400, 'requires "height" or "hash"'),
    ("block", {"height": -1}, 400, '"height" must be a whole number of at least 0'),
    ("block", {"hash": "nothex"}, 400, '"hash" must be a block hash'),
    ("block", {"height": 9}, 404, "No block at height 9"),
    ("block", {"hash": "ab" * 32}, 404, f'Block "{"ab" * 32}" is not known.'),
    ("blocks", {"locator": "x"}, 400, '"locator" must be a list'),
    ("blocks", {"locator": [1]}, 400, '"locator" must be a block hash'),
    ("blocks", {"limit": 0}, 400, '"limit" must be a whole number from 1 to 100'),
])
def test_bad_args_are_a_4xx_naming_them_and_the_node_goes_on(node, op_name, args, status, says):
    reply = call(node, op_name, args)
    assert reply["status"] == status and says in reply["error"], reply
    assert call(node, "chain")["status"] == 200


def test_the_validator_refuses_an_invalid_block_published_at_the_node(node):
    bad = mined(GENESIS)
    bad["difficulty"] = 20
    bad["hash"] = blocks.block_hash(bad)
    for payload in (bad, "not a block", solved({**mined(GENESIS), "height": 3})):
        reply = call(node, "publish", {"topic": TOPIC, "payload": payload})
        assert reply["status"] == 400 and 'validator of plugin "chain"' in reply["error"], reply
    # An orphan is not refused as invalid, but not spread nor kept either.
    orphan = mined(mined(GENESIS))
    assert call(node, "publish", {"topic": TOPIC, "payload": orphan})["status"] == 400
    assert call(node, "chain")["response"]["height"] == 0
    good = mined(GENESIS, when=NOW)
    assert call(node, "publish", {"topic": TOPIC, "payload": good})["status"] == 202
    assert call(node, "chain")["response"]["hash"] == good["hash"]


def test_the_ledger_is_in_the_plugins_data_directory_and_outlives_the_node(tmp_path):
    net = MemoryNetwork()
    net.reactor.advance(NOW)
    first = memory_node(net, tmp_path / "n", plugins=["chain"])
    b = call(first, "mine", {"difficulty": 8})["response"]["block"]
    first.stopService()
    assert (tmp_path / "n" / "plugins" / "chain" / "chain.sqlite").exists()
    again = memory_node(net, tmp_path / "n", plugins=["chain"])
    try:
        assert call(again, "chain", {"recent": 0})["response"]["hash"] == b["hash"]
    finally:
        again.stopService()


def test_a_node_fetches_what_it_lacks_from_a_peer_with_more_work(tmp_path, monkeypatch):
    """Sync alone (nothing of it published: gossip and catch-up have nothing
    to bring): B, with a shorter fork of its own, meets A, asks it over
    ctx.ask (routed here to A's ops in memory), fetches A's blocks in
    batches and reorganises onto them."""
    from twisted.internet.defer import fail, maybeDeferred

    from foxnode import pluginhost
    from foxnode.plugin import OpError
    from foxnode.plugins import chain as plugin

    net = MemoryNetwork()
    net.reactor.advance(NOW)
    a = memory_node(net, tmp_path / "a", plugins=["chain"])
    b = memory_node(net, tmp_path / "b", plugins=["chain"])
    by_port = {n.node.listen_port: n for n in (a, b)}
    asked = []

    def ask_in_memory(reactor, addr, op_name, args, timeout):
        asked.append((addr, op_name))
        target = by_port.get(int(addr.rsplit(":", 1)[1].split("/")[0]))
        if target is None:
            return fail(ConnectionRefusedError(addr))

        def settled(reply):
            body = codec.loads(codec.encode_reply(reply))
            if body["status"] != 200:
                raise OpError(body["status"], body["error"])
            return body["response"]

        return maybeDeferred(target.node.handle_request, FakeConnection(), codec.Request(op_name, args)
                             ).addCallback(settled)

    monkeypatch.setattr(pluginhost, "_ask", ask_in_memory)
    try:
        chains = {name: next(c for ctx, c in plugin._chains.items() if ctx.node_id == n.node.node_id)
                  for name, n in (("a", a), ("b", b))}
        tip = GENESIS
        for i in range(plugin.BATCH + 20):  # more than one batch
            tip = mined(tip, i)
            assert chains["a"].ledger.add(tip) == HEAD
        own = mined(GENESIS, "b's own", difficulty=12)
        chains["b"].ledger.add(own)
        assert chains["b"].ledger.head()["hash"] == own["hash"]
        linked(net, a, b)
        for _ in range(50):
            net.advance(0.5)
            if chains["b"].ledger.head()["hash"] == tip["hash"]:
                break
        assert chains["b"].ledger.head() == chains["a"].ledger.head()
        assert call(b, "block", {"hash": own["hash"]})["response"]["best"] is False
        assert "blocks" in {op_name for _, op_name in asked}
        # A has nothing to fetch from B (less work): it asked for B's chain only.
        assert chains["a"].ledger.head()["hash"] == tip["hash"]
    finally:
        a.stopService()
        b.stopService()


def linked(net, a, b):
    a.node.store.add([net.url(b.node.listen_port)], "register")
    a.node.peers.addresses_added([net.url(b.node.listen_port)])
    for _ in range(100):
        net.advance(0.2)
        if a.node.live_peers() and b.node.live_peers():
            return
    raise AssertionError("the nodes did not connect")
