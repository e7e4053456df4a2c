"""The peer store: durability of acknowledged registers (real ``twistd``
processes killed with SIGKILL), refusal of corrupt files, group commit, the
file format, eviction and write failures.

Every address used here is on 127.0.0.0/8 or ``localhost``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

import foxnode.storefiles
from foxnode import client, identity, tap
from foxnode.store import (
    BOOTSTRAP,
    CLOSE_TIMEOUT,
    EXCHANGE,
    REGISTER,
    PeerRecord,
    PeerStore,
    StoreWriteError,
    load,
)
from foxnode.testing import (
    LOOPBACK,
    NodeProcess,
    free_port,
    node_options,
    running_node,
    sleep,
    spawn_node,
    start_node,
    twistd_command,
    wait_for,
    wait_until_serving,
)

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
        # acknowledged means on disk: the journal beside the file holds them
        assert sorted(r.addr for r in load(node_dir / "peers.json")) == sorted(addresses)
        journal = (node_dir / "peers.json.journal").read_text("utf-8")
        assert all(json.loads(line) for line in journal.splitlines())
    # the stop folds the journal into the file users read
    text = (node_dir / "peers.json").read_text("utf-8")
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
            if source == BOOTSTRAP:
                # named on the command line: a known record becomes a bootstrap one
                for a in fresh:
                    if a in model:
                        model[a].source = BOOTSTRAP
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


def test_a_peers_file_without_last_dialed_still_loads(tmp_path):
    # Written before the field existed: loads, and its verified records are
    # not taken as dialed by this node (so not handed on until dialed).
    path = tmp_path / "peers.json"
    path.write_text('{"format": "foxnode/peers", "version": 1, "peers": {"ws://127.3.0.1:9/ws": '
                    '{"added": 1.0, "source": "handshake", "node_id": null, "last_handshake": 2.0, '
                    '"last_seen": 2.0, "failures": 0, "last_error": null, "is_self": false}}}')
    (record,) = load(path)
    assert record.verified and not record.dialed and record.last_dialed is None
    record.last_dialed = 3.0
    assert record.to_json()["last_dialed"] == 3.0


# -- a hung disk: shutdown ends within a stated time, says what was not written --------

@contextlib.contextmanager
def hung_writes(monkeypatch):
    """Every store fsync hangs until the test ends (a hung disk)."""
    release = threading.Event()
    started = threading.Event()

    def hang(ops, fd):
        started.set()
        release.wait(60)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(foxnode.storefiles.DiskOps, "fsync", hang)
    try:
        yield started
    finally:
        release.set()  # never leave a thread behind that a reactor would join


@contextlib.contextmanager
def log_lines():
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def _not_written(lines: list[str]) -> list[str]:
    return [line for line in lines if "not written" in line]


@pytest_twisted.ensureDeferred
async def test_close_gives_up_on_a_hung_write_and_says_what_was_not_written(reactor, tmp_path, monkeypatch):
    with hung_writes(monkeypatch) as started, log_lines() as lines:
        store = PeerStore(reactor, tmp_path / "peers.json")
        waiting = store.add([addr(70, 0, 1), addr(70, 0, 2)], REGISTER)
        outcome: list = []
        waiting.durable.addBoth(outcome.append)
        await wait_for(reactor, started.is_set, what="the write to start")
        store.add([addr(70, 0, 3)], EXCHANGE, durable=False)
        store.update(addr(70, 0, 1), last_seen=1.0)
        began = time.monotonic()
        # A bound of 0.5 s instead of CLOSE_TIMEOUT, to keep the test short.
        await store.close(timeout=0.5).addTimeout(10, reactor)
        assert time.monotonic() - began < 10
        said = _not_written(lines)
        assert len(said) == 1, lines
        assert "2 registered addresses" in said[0] and "2 other changes" in said[0], said
        assert str(tmp_path / "peers.json") in said[0]
        # The registers waiting on it are not acknowledged.
        assert len(outcome) == 1 and isinstance(outcome[0], Failure), outcome
        assert outcome[0].check(StoreWriteError), outcome
    # The hung write ends (here, failing) after the store gave up: nothing
    # more is said or answered.
    await deferToThread(time.sleep, 0.2)
    assert len(outcome) == 1


@pytest_twisted.ensureDeferred
async def test_node_stop_ends_within_the_bound_while_a_register_waits_on_a_hung_disk(reactor, node_dir,
                                                                                     monkeypatch):
    with hung_writes(monkeypatch) as started, log_lines() as lines:
        node = await start_node(reactor, node_dir)
        proto = await client.connect(reactor, node.url)
        replies: list = []
        proto.request("register", {"addr": addr(71, 0, 1)}, timeout=60).addBoth(replies.append)
        await wait_for(reactor, started.is_set, what="the write to start")
        stopped: list = []
        node.service.stopService().addBoth(stopped.append)
        # 3 s for the connections to close, CLOSE_TIMEOUT for the disk, and slack
        await wait_for(reactor, lambda: stopped, timeout=CLOSE_TIMEOUT + 15, what="the node to stop")
        await wait_for(reactor, lambda: replies, what="the register to end")
        said = _not_written(lines)
        assert len(said) == 1 and "1 registered addresses" in said[0], lines
    # Never acknowledged: the connection closed without a 202.
    assert not (hasattr(replies[0], "status") and replies[0].status == 202), replies


def _make_key(directory: Path) -> None:
    # Made before the node starts: the node under test hangs in every fsync.

    identity.load_or_create(directory)


HANGING_FSYNC_TWISTD = (
    "import os, time; os.fsync = lambda fd: time.sleep(10**6); "
    "from twisted.scripts.twistd import run; import sys; sys.argv[0] = 'twistd'; run()"
)


@pytest_twisted.ensureDeferred
async def test_sigterm_ends_a_twistd_node_whose_disk_hangs(reactor, node_dir):
    _make_key(node_dir)
    port = free_port()
    log_path = node_dir / "twistd.log"
    # twistd's own command line, run by a Python whose fsync never returns
    command = [sys.executable, "-c", HANGING_FSYNC_TWISTD, *twistd_command(node_dir, port)[1:]]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=node_dir)
    node = NodeProcess(process, port, node_dir, log_path)
    try:
        await deferToThread(wait_until_serving, node)
        proto = await client.connect(reactor, node.url)
        replies: list = []
        proto.request("register", {"addr": addr(72, 0, 1)}, timeout=60).addBoth(replies.append)
        await sleep(reactor, 1.0)
        assert not replies, f"a register answered while its write hangs: {replies}"
        process.send_signal(signal.SIGTERM)
        code = await deferToThread(process.wait, CLOSE_TIMEOUT + 25)
        assert code in (0, -signal.SIGTERM), node.log()
        await proto.when_closed()
    finally:
        await deferToThread(_kill_and_reap, process)
    said = _not_written(node.log().splitlines())
    assert len(said) == 1, node.log()
    assert "1 registered addresses" in said[0], said
    assert not (replies and hasattr(replies[0], "status") and replies[0].status == 202), replies



# -- the store file: temporary files, symlinks, failed writes -------------------------------

def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


@pytest_twisted.ensureDeferred
async def test_a_symlink_planted_at_the_temporary_name_is_not_written_through(reactor, tmp_path, monkeypatch):
    path = tmp_path / "peers.json"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the node's\n")
    # The name the node used to write to (predictable from its pid), and
    # for the property, a name the node is made to pick first.
    (tmp_path / f".peers.json.tmp-{os.getpid()}").symlink_to(victim)
    planted = tmp_path / ".peers.json.tmp-planted"
    planted.symlink_to(victim)
    names = iter([planted.name])
    pick = foxnode.storefiles._temp_name
    monkeypatch.setattr(foxnode.storefiles, "_temp_name", lambda name: next(names, None) or pick(name))
    async with open_store(reactor, path) as store:
        await store.add([addr(80, 0, 1)], REGISTER).durable
        await store.add([addr(80, 0, 2)], REGISTER).durable
    assert victim.read_bytes() == b"not the node's\n"
    assert not path.is_symlink()
    assert [r.addr for r in load(path)] == [addr(80, 0, 1), addr(80, 0, 2)]
    assert _temporaries(tmp_path) == sorted([planted.name, f".peers.json.tmp-{os.getpid()}"])


def test_temporary_names_are_not_predictable():
    names = {foxnode.storefiles._temp_name("peers.json") for _ in range(100)}
    assert len(names) == 100
    assert not any(str(os.getpid()) == n.rsplit("-", 1)[-1] for n in names)


@pytest_twisted.ensureDeferred
async def test_a_peers_file_that_is_a_symlink_stays_one_and_its_target_is_written(reactor, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    target = real / "the-peers.json"
    target.write_bytes(_valid_file(target, addr(81, 0, 1)))
    link_dir = tmp_path / "node"
    link_dir.mkdir()
    link = link_dir / "peers.json"
    link.symlink_to(target)
    async with open_store(reactor, link) as store:
        assert store.addresses() == [addr(81, 0, 1)]
        await store.add([addr(81, 0, 2)], REGISTER).durable
        assert link.is_symlink() and link.resolve() == target
        assert [r.addr for r in load(target)] == [addr(81, 0, 1), addr(81, 0, 2)]
    # A relative link, and one whose target does not exist yet.
    fresh = link_dir / "fresh.json"
    fresh.symlink_to(Path("..") / "elsewhere" / "fresh-target.json")
    async with open_store(reactor, fresh) as store:
        await store.add([addr(81, 0, 3)], REGISTER).durable
    assert fresh.is_symlink()
    assert [r.addr for r in load(real / "fresh-target.json")] == [addr(81, 0, 3)]
    assert _temporaries(real) == [] and _temporaries(link_dir) == []


def _failing(call: str, monkeypatch) -> None:
    """Make the store's ``os.<call>`` fail as a full disk would, for the
    file (not the directory) only."""
    real = getattr(os, call)

    def fail(fd, *args):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(28, "No space left on device")
        return real(fd, *args)

    monkeypatch.setattr(os, call, fail)


@pytest.mark.parametrize("call", ["write", "fsync"])
@pytest_twisted.ensureDeferred
async def test_a_failed_write_leaves_no_temporary_file(reactor, tmp_path, monkeypatch, call):
    path = tmp_path / "peers.json"
    async with open_store(reactor, path) as store:
        await store.add([addr(82, 0, 1)], REGISTER).durable
        before = _on_disk(path)
        with monkeypatch.context() as m:
            _failing(call, m)
            with pytest.raises(StoreWriteError, match="space"):
                await store.add([addr(82, 0, 2)], REGISTER).durable
        assert _temporaries(tmp_path) == []
        assert _on_disk(path) == before
        assert store.addresses() == [addr(82, 0, 1)]
    assert [r.addr for r in load(path)] == [addr(82, 0, 1)]


def _on_disk(path: Path) -> tuple[bytes | None, bytes | None]:
    """The peers file and its journal, byte for byte."""
    journal = path.with_name(path.name + ".journal")
    return tuple(p.read_bytes() if p.exists() else None for p in (path, journal))


def _failing_directory_sync(monkeypatch) -> None:

    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest_twisted.ensureDeferred
async def test_a_failed_directory_sync_keeps_memory_what_the_file_holds(reactor, tmp_path, monkeypatch):
    # A directory is synced when a file is renamed into it: the journal's
    # start (here, with the first register) and every fold.
    path = tmp_path / "peers.json"
    async with open_store(reactor, path) as store:
        with monkeypatch.context() as m:
            _failing_directory_sync(m)
            with pytest.raises(StoreWriteError, match="not confirmed"):
                await store.add([addr(83, 0, 1)], REGISTER).durable
            assert store.addresses() == [r.addr for r in load(path)] == [addr(83, 0, 1)]
            # The next write folds, and its sync fails too.
            with pytest.raises(StoreWriteError, match="not confirmed"):
                await store.add([addr(83, 0, 2)], REGISTER).durable
            assert store.addresses() == [r.addr for r in load(path)] == [addr(83, 0, 1), addr(83, 0, 2)]
            # Bookkeeping changes meanwhile, written with the same failure.
            store.update(addr(83, 0, 1), last_seen=5.0)
            with pytest.raises(StoreWriteError):
                await store.commit()
            assert store.addresses() == [r.addr for r in load(path)]
        # The disk recovers: the same register is acknowledged, synced now.
        writes = store.writes
        await store.add([addr(83, 0, 2)], REGISTER).durable
        assert store.writes == writes + 1
        assert store.addresses() == [r.addr for r in load(path)]
    assert _temporaries(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_register_after_a_failed_directory_sync_answers_503_and_lists_what_the_file_holds(
        reactor, node_dir, monkeypatch):
    async with running_node(reactor, node_dir) as node:
        with monkeypatch.context() as m:
            _failing_directory_sync(m)
            reply = await client.call(reactor, node.url, "register", {"addr": addr(84, 0, 1)})
            assert reply.status == 503, reply
            assert "not confirm" in reply.error and "nothing was registered" not in reply.error, reply
            assert str(node_dir) not in reply.error, "the reply names the node's files"
            peers = await client.call(reactor, node.url, "peers")
            on_disk = [r.addr for r in load(node_dir / "peers.json")]
            assert peers.response["peers"] == on_disk == [addr(84, 0, 1)]
        reply = await client.call(reactor, node.url, "register", {"addr": addr(84, 0, 1)})
        assert reply.status == 202, reply


@pytest_twisted.ensureDeferred
async def test_an_unwritable_store_still_dials_the_bootstrap_peer(reactor, tmp_path, monkeypatch):
    async with running_node(reactor, tmp_path / "b") as b:
        with log_lines() as lines:
            def unwritable(ops, path, flags, mode=0o644):
                raise OSError(30, "Read-only file system")

            monkeypatch.setattr(foxnode.storefiles.DiskOps, "open", unwritable)
            (tmp_path / "a").mkdir()
            service = tap.makeService(node_options(tmp_path / "a", "--peer", b.url), reactor)
            # The write of the bootstrap address fails before the node
            # starts dialing.
            await wait_for(reactor, lambda: any("cannot write peers file" in line for line in lines),
                           what="the write to fail")
            gc.collect()  # a failed Deferred nobody handled says so when collected
            service.startService()
            try:
                await service.when_listening()
                assert b.url in service.node.store
                await wait_for(reactor, lambda: b.node.node_id in service.node.peers.peers, timeout=20,
                               what="the node to connect to its bootstrap peer")
            finally:
                await service.stopService()
            gc.collect()
    assert not [line for line in lines if "Unhandled error" in line], lines
