"""The peer store: durability of acknowledged registers (real ``twistd``
processes killed with SIGKILL), refusal of corrupt files, group commit, the
file format, eviction and write failures.

Every address used here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from foxnode import client
from foxnode.store import (
    BOOTSTRAP,
    REGISTER,
    PeerRecord,
    PeerStore,
    StoreWriteError,
    load,
)
from foxnode.testing import LOOPBACK, free_port, running_node, spawn_node

TWISTD = str(Path(sys.executable).with_name("twistd"))
TIMEOUT = 10.0


def addr(*parts: int, port: int = 9000) -> str:
    return f"ws://127.{'.'.join(str(p) for p in parts)}:{port}/ws"




async def close_all(protos) -> None:
    for proto in protos:
        proto.close()
    await gatherResults([proto.when_closed() for proto in protos], consumeErrors=True)


def _kill_and_reap(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.kill()
    return process.wait(timeout=30)


# -- durability: a 202 means on disk ---------------------------------------------------

CONNECTIONS = 20
REGISTERS_EACH = 10


@pytest.mark.parametrize("kill_after", [CONNECTIONS * REGISTERS_EACH, CONNECTIONS * REGISTERS_EACH // 2],
                         ids=["after-all-acks", "mid-burst"])
@pytest_twisted.ensureDeferred
async def test_acknowledged_registers_survive_sigkill(reactor, node_dir, kill_after):
    node = await deferToThread(spawn_node, node_dir)
    protos: list = []
    acknowledged: list[str] = []
    wrong: list = []
    try:
        protos = await gatherResults(
            [client.connect(reactor, node.url, timeout=TIMEOUT) for _ in range(CONNECTIONS)],
            consumeErrors=True)

        def acked(reply: Any, address: str) -> None:
            if (reply.status, reply.error) != (202, "Accepted") or reply.response["accepted"] != [address]:
                wrong.append((address, reply))
                return
            acknowledged.append(address)
            if len(acknowledged) == kill_after:
                # At once, from the callback of the reply: no grace time.
                node.process.send_signal(signal.SIGKILL)

        ds = []
        for c, proto in enumerate(protos):
            for k in range(REGISTERS_EACH):
                a = addr(20, c, k + 1)
                d = proto.request("register", {"addr": a}, timeout=TIMEOUT)
                ds.append(d.addCallback(acked, a))
        # Registers after the kill fail with the connection; acknowledged
        # ones are what counts.
        await gatherResults(ds, consumeErrors=True).addErrback(lambda f: None)
        assert not wrong, wrong[:3]
        assert len(acknowledged) >= kill_after
        assert await deferToThread(_kill_and_reap, node.process) == -signal.SIGKILL
    finally:
        await close_all(protos)
        await deferToThread(_kill_and_reap, node.process)

    restarted = await deferToThread(spawn_node, node_dir)
    try:
        reply = await client.call(reactor, restarted.url, "peers", timeout=TIMEOUT)
    finally:
        # twistd re-raises the SIGTERM after an orderly shutdown
        assert await deferToThread(restarted.stop) in (0, -signal.SIGTERM)
    assert reply.status == 200
    known = set(reply.response["peers"])
    lost = set(acknowledged) - known
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged addresses lost, e.g. {sorted(lost)[:3]}"
    if kill_after == CONNECTIONS * REGISTERS_EACH:
        assert known == set(acknowledged)


# -- corrupt peers files: refuse to start, never overwrite ---------------------------

def _valid_file(path: Path, *addresses: str) -> bytes:
    records = [PeerRecord(addr=a, added=1617786770.954288, source=REGISTER) for a in addresses]
    return PeerStore(None, path, records).snapshot()


def _holder_of(value: Any, key: str) -> dict | None:
    """The JSON object that has ``key`` as a key, anywhere in ``value``."""
    if isinstance(value, dict):
        if key in value:
            return value
        children = list(value.values())
    elif isinstance(value, list):
        children = value
    else:
        return None
    for child in children:
        found = _holder_of(child, key)
        if found is not None:
            return found
    return None


def _with_invalid_record(path: Path) -> bytes:
    doc = json.loads(_valid_file(path, addr(5, 0, 1), addr(5, 0, 2)))
    holder = _holder_of(doc, addr(5, 0, 2))
    assert holder is not None, f"no record keyed by address in {doc}"
    holder["http://127.5.0.3:9000/ws"] = holder.pop(addr(5, 0, 2))
    return json.dumps(doc, indent=2).encode()


def _truncated(path: Path) -> bytes:
    data = _valid_file(path, addr(5, 0, 1), addr(5, 0, 2))
    return data[: len(data) // 2]


CORRUPT = {
    "not-json": (lambda p: b"this is not JSON\n", r"JSON"),
    "truncated": (_truncated, r"JSON"),
    "binary-garbage": (lambda p: bytes(range(256)), r"JSON|UTF|decode"),
    "a-list": (lambda p: b"[]\n", r"object|list|array|shape|format"),
    "wrong-shape": (lambda p: b'{"peers": ["ws://127.5.0.1:9000/ws"]}\n', r"object|list|array|shape|format"),
    "invalid-address": (_with_invalid_record, r"http://127\.5\.0\.3:9000/ws.*invalid|invalid.*http://127\.5\.0\.3:9000/ws"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_peers_file_refuses_to_start_and_is_left_alone(tmp_path, case):
    make, fault = CORRUPT[case]
    peers = tmp_path / "peers.json"
    original = make(peers)
    peers.write_bytes(original)
    before = sorted(p.name for p in tmp_path.iterdir())
    port = free_port()
    try:
        result = subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "foxnode",
             "--listen", f"tcp:{port}:interface={LOOPBACK}",
             "--peers-file", str(peers), "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path, capture_output=True, timeout=30)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"foxnode kept running on a corrupt peers file: {e.stdout!r}") from None
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    assert str(peers) in output, output
    assert re.search(fault, output, re.IGNORECASE | re.DOTALL), f"fault not named ({fault}): {output}"
    assert peers.read_bytes() == original
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "data")
    assert after == before, "files appeared next to the peers file"


def test_peers_file_that_is_a_directory_refuses_to_start(tmp_path):
    peers = tmp_path / "peers.json"
    peers.mkdir()
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "foxnode",
         "--listen", f"tcp:{free_port()}:interface={LOOPBACK}",
         "--peers-file", str(peers), "--data-dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, timeout=30)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode != 0, output
    assert str(peers) in output, output
    assert peers.is_dir() and not any(peers.iterdir())


# -- group commit, file format -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_registers(reactor, node_dir):
    connections, each = 10, 30
    async with running_node(reactor, node_dir) as node:
        store = node.node.store
        protos = await gatherResults([client.connect(reactor, node.url) for _ in range(connections)])
        try:
            writes_before = store.writes
            ds = [proto.request("register", {"addr": addr(30, c, k + 1)}, timeout=TIMEOUT)
                  for c, proto in enumerate(protos) for k in range(each)]
            replies = await gatherResults(ds, consumeErrors=True)
        finally:
            await close_all(protos)
        writes = store.writes - writes_before
    acknowledged = sum(1 for r in replies if r.status == 202)
    assert acknowledged == connections * each
    assert 1 <= writes <= acknowledged // 10, f"{writes} writes for {acknowledged} registers"


@pytest_twisted.ensureDeferred
async def test_peers_file_is_indented_json_with_one_record_per_address(reactor, node_dir):
    addresses = [addr(40, 0, i + 1) for i in range(5)] + ["wss://localhost:9443/ws"]
    async with running_node(reactor, node_dir) as node:
        reply = await client.call(reactor, node.url, "register", {"addr": addresses + addresses[:2]})
        assert reply.status == 202
        text = (node_dir / "peers.json").read_text("utf-8")
        # acknowledged means on disk: the file already holds them
        json.loads(text)
        for a in addresses:
            assert text.count(json.dumps(a)) == 1, f"{a} is not in the file exactly once:\n{text}"
    assert text.endswith("\n")
    assert re.search(r'^ {2,}"', text, re.MULTILINE), f"not indented:\n{text}"
    assert text.count("\n") > len(addresses), f"not one record per line or more:\n{text}"


# -- PeerStore, unit tests with a real reactor ------------------------------------------

@contextlib.asynccontextmanager
async def open_store(reactor, path: Path, load_file: bool = True, **kw):
    store = PeerStore.open(reactor, path, **kw) if load_file else PeerStore(reactor, path, **kw)
    try:
        yield store
    finally:
        await store.close()


def verify(store: PeerStore, a: str, failures: int = 0) -> None:
    now = time.time()
    store.update(a, node_id="ab" * 32, last_handshake=now, last_seen=now, failures=failures,
                 last_error="connection refused" if failures else None)


@pytest_twisted.ensureDeferred
async def test_add_is_durable_and_loads_back(reactor, tmp_path):
    path = tmp_path / "peers.json"
    async with open_store(reactor, path) as store:
        result = store.add([addr(50, 0, 1), addr(50, 0, 2)], REGISTER)
        await result.durable
        assert sorted(r.addr for r in load(path)) == [addr(50, 0, 1), addr(50, 0, 2)]
        assert store.writes >= 1
    async with open_store(reactor, path) as store:
        assert store.addresses() == [addr(50, 0, 1), addr(50, 0, 2)]


@pytest_twisted.ensureDeferred
async def test_full_store_evicts_never_verified_then_failing(reactor, tmp_path):
    healthy, unverified, failing = addr(51, 0, 1), addr(51, 0, 2), addr(51, 0, 3)
    async with open_store(reactor, tmp_path / "peers.json", max_peers=3) as store:
        for a in (healthy, unverified, failing):
            await store.add([a], REGISTER, now=time.time()).durable
        verify(store, healthy)
        verify(store, failing, failures=3)

        new1 = addr(51, 0, 4)
        r = store.add([new1], REGISTER)
        assert (r.accepted, r.rejected) == ([new1], [])
        await r.durable
        assert set(store.addresses()) == {healthy, failing, new1}

        verify(store, new1)
        new2 = addr(51, 0, 5)
        r = store.add([new2], REGISTER)
        assert (r.accepted, r.rejected) == ([new2], [])
        await r.durable
        assert set(store.addresses()) == {healthy, new1, new2}

        # Only verified, healthy addresses left: nothing to evict.
        verify(store, new2)
        new3 = addr(51, 0, 6)
        r = store.add([new3], REGISTER)
        assert r.accepted == []
        assert r.rejected == [{"addr": new3, "reason": "peer store is full"}]
        await r.durable
        assert set(store.addresses()) == {healthy, new1, new2}
        assert len(store) == 3
    assert {r.addr for r in load(tmp_path / "peers.json")} == {healthy, new1, new2}


@pytest_twisted.ensureDeferred
async def test_full_store_rejects_what_does_not_fit_and_says_so(reactor, tmp_path):
    async with open_store(reactor, tmp_path / "peers.json", max_peers=2) as store:
        first = [addr(52, 0, 1), addr(52, 0, 2)]
        await store.add(first, REGISTER).durable
        for a in first:
            verify(store, a)
        more = [addr(52, 0, 3), addr(52, 0, 4)]
        r = store.add(more, REGISTER)
        assert r.accepted == []
        assert r.rejected == [{"addr": a, "reason": "peer store is full"} for a in more]
        assert sorted(store.addresses()) == first


@pytest_twisted.ensureDeferred
async def test_bootstrap_addresses_are_never_evicted(reactor, tmp_path):
    boot = addr(53, 0, 1)
    async with open_store(reactor, tmp_path / "peers.json", max_peers=2) as store:
        # the bootstrap address is the oldest and never verified
        await store.add([boot], BOOTSTRAP, now=1.0).durable
        for i in range(2, 8):
            r = store.add([addr(53, 0, i)], REGISTER, now=float(i))
            assert r.accepted == [addr(53, 0, i)]
            await r.durable
            assert boot in store
            assert len(store) == 2
        # a failing bootstrap address is not evicted either
        store.update(boot, failures=9, last_error="connection refused")
        verify(store, addr(53, 0, 7))
        r = store.add([addr(53, 0, 9)], REGISTER)
        assert r.rejected == [{"addr": addr(53, 0, 9), "reason": "peer store is full"}]
        assert set(store.addresses()) == {boot, addr(53, 0, 7)}


@pytest.mark.parametrize("seed", range(8))
def test_full_store_evicts_in_the_same_order_as_a_sort_of_the_store(tmp_path, seed):
    # The store keeps its eviction order in a heap updated as records
    # change; the model is the plain rule, re-sorting every record for every
    # eviction (a stable sort: among equals, the first added goes first).
    # Writes are held in the test's hands (a fake commit), so registers
    # wait for them as long as the test likes, and no disk or running
    # reactor is needed.
    rng = random.Random(seed)
    cap = 40
    store = PeerStore(Clock(), tmp_path / "peers.json", max_peers=cap, flush_delay=3600)
    writes: list[tuple[Deferred, list[str], list[str]]] = []  # (write, its addresses, source)
    store.commit = lambda: writes.append((Deferred(), [], [])) or writes[-1][0]
    model: dict[str, PeerRecord] = {}
    unwritten: set[str] = set()
    clock = 1000.0
    for step in range(2000):
        clock += rng.choice([0, 0, 1])  # equal "added" times are common
        action = rng.random()
        known = sorted(model)
        if action < 0.5 or not known:
            fresh = [addr(rng.randrange(250), rng.randrange(250), rng.randrange(1, 250))
                     for _ in range(rng.choice([1, 1, 1, 3]))]
            if known and rng.random() < 0.3:
                fresh.insert(rng.randrange(len(fresh) + 1), rng.choice(known))
            source = BOOTSTRAP if rng.random() < 0.05 else REGISTER
            durable = rng.random() < 0.5
            before = len(writes)
            result = store.add(fresh, source, now=clock, durable=durable)
            result.durable.addErrback(lambda f: f.trap(StoreWriteError))
            # the model
            new = [a for a in dict.fromkeys(fresh) if a not in model]
            overflow = len(model) + len(new) - cap
            if overflow > 0:
                evictable = sorted(
                    (r for r in model.values() if r.source != BOOTSTRAP and r.addr not in fresh
                     and r.addr not in unwritten and (not r.verified or r.failures > 0 or r.is_self)),
                    key=lambda r: (r.verified, -r.failures, r.added))
                for r in evictable[:overflow]:
                    del model[r.addr]
                new = new[:cap - len(model)]
            for a in new:
                model[a] = PeerRecord(addr=a, added=clock, source=source)
            if durable and new:
                assert len(writes) == before + 1, "a register with new addresses waits for a write"
                writes[-1][1].extend(new)
                writes[-1][2].append(source)
                unwritten.update(new)
        elif action < 0.6 and writes:
            # a write ends: its registers' addresses are on disk, or (now
            # and then) it failed and they are rolled back
            d, new, sources = writes.pop(rng.randrange(len(writes)))
            unwritten.difference_update(new)
            if rng.random() < 0.8:
                d.callback(None)
            else:
                d.errback(StoreWriteError("disk full"))
                for a in new:
                    if a in model and model[a].source in sources and not model[a].verified:
                        del model[a]
        elif action < 0.9:
            a = rng.choice(known)
            change = rng.choice([
                {"last_handshake": clock, "failures": 0},
                {"failures": model[a].failures + 1},
                {"failures": 0},
                {"is_self": True},
                {"last_seen": clock},
            ])
            store.update(a, **change)
            for name, value in change.items():
                setattr(model[a], name, value)
        elif a := rng.choice(known):
            if a not in unwritten:  # the node removes only addresses it has dialed
                store.remove(a)
                del model[a]
        assert list(store.addresses()) == list(model), f"step {step}"


def test_a_flood_into_a_full_store_is_logged_as_a_sum_not_per_register(tmp_path):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        # no lazy flush within the test, and writes that succeed at once:
        # a Clock has no threads to write with
        store = PeerStore(clock, tmp_path / "peers.json", max_peers=10, flush_delay=3600)
        store.commit = lambda: succeed(None)
        store.add([addr(60, 0, i) for i in range(1, 11)], REGISTER, durable=False)
        for i in range(1, 501):
            store.add([addr(61, i // 250, i % 250 + 1)], REGISTER, durable=False)
            clock.advance(0.05)  # 25 s in all
        assert len(store) == 10
        store.close()  # says what the current window holds
        assert clock.getDelayedCalls() == [], "close() left a call behind"
        # after close (a node still stopping), an eviction is said at once
        store.add([addr(62, 0, 1)], REGISTER, durable=False)
        assert clock.getDelayedCalls() == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if "evicted" in (e.get("log_format") or "")]
    # one line at once, then one per 10-s window, not one per register
    assert 3 <= len(said) <= 6, said
    assert said[0].endswith("evicted 1 unverified or failing addresses"), said
    counts = [int(re.search(r"evicted (\d+)", line).group(1)) for line in said]
    assert sum(counts) == 501, said


@pytest_twisted.ensureDeferred
async def test_accepted_addresses_are_all_kept_when_the_store_is_full(reactor, tmp_path):
    # Re-registering a known, unverified address together with a new one in
    # a full store: whatever the reply calls accepted must be in the store.
    known, new = addr(54, 0, 1), addr(54, 0, 2)
    async with open_store(reactor, tmp_path / "peers.json", max_peers=1) as store:
        await store.add([known], REGISTER).durable
        r = store.add([known, new], REGISTER)
        await r.durable
        missing = [a for a in r.accepted if a not in store]
        assert not missing, f"accepted {r.accepted} but the store holds {store.addresses()}"
        assert len(store) <= 1


@pytest_twisted.ensureDeferred
async def test_write_failure_fails_durability(reactor, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"a regular file\n")
    path = blocker / "peers.json"
    async with open_store(reactor, path, load_file=False) as store:
        r = store.add([addr(55, 0, 1)], REGISTER)
        with pytest.raises(StoreWriteError) as info:
            await r.durable
        assert "peers file" in str(info.value)
        assert "directory" in str(info.value).lower(), str(info.value)
        # The refused address was rolled back: not listed, never written.
        assert addr(55, 0, 1) not in store
        # Once the disk is usable again, writes succeed.
        blocker.unlink()
        blocker.mkdir()
        r = store.add([addr(55, 0, 2)], REGISTER)
        await r.durable
        assert sorted(x.addr for x in load(path)) == [addr(55, 0, 2)]


@contextlib.asynccontextmanager
async def node_with_unwritable_store(reactor, node_dir):
    peers_dir = node_dir / "store"
    async with running_node(reactor, node_dir, "--peers-file", str(peers_dir / "peers.json")) as node:
        # The store's directory turns out to be a regular file.
        shutil.rmtree(peers_dir)
        peers_dir.write_bytes(b"not a directory\n")
        yield node


@pytest_twisted.ensureDeferred
async def test_register_answers_an_error_when_the_store_cannot_be_written(reactor, node_dir):
    async with node_with_unwritable_store(reactor, node_dir) as node:
        reply = await client.call(reactor, node.url, "register", {"addr": addr(56, 0, 1)})
    assert reply.status != 202 and reply.status >= 400, reply
    assert reply.error != "Accepted"
    assert "peer" in reply.error.lower() and ("write" in reply.error.lower() or "store" in reply.error.lower()), reply
    assert "directory" in reply.error.lower(), reply


@pytest_twisted.ensureDeferred
async def test_failed_register_is_not_listed_by_peers(reactor, node_dir):
    async with node_with_unwritable_store(reactor, node_dir) as node:
        proto = await client.connect(reactor, node.url)
        try:
            reply = await proto.request("register", {"addr": addr(57, 0, 1)})
            peers = await proto.request("peers")
        finally:
            proto.close()
            await proto.when_closed()
    assert reply.status != 202, reply
    # The reply said nothing was registered; the node must not list it.
    assert addr(57, 0, 1) not in peers.response["peers"], (reply, peers)
