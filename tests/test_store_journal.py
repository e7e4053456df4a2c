"""The peer store's journal: a commit fires only once its lines are
fsynced; a crash at any point loses nothing acknowledged and the node
then either starts with all of it or refuses, leaving the files alone;
the journal is folded into the peers file periodically and at close; and
the eviction policy of ``peerindex``, without any I/O.

Every address used here is on 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

import foxnode.store
from foxnode import client
from foxnode.peerindex import FULL, PeerIndex
from foxnode.store import BOOTSTRAP, EXCHANGE, REGISTER, PeerRecord, PeerStore, StoreError, load
from foxnode.storefiles import DiskOps, journal_path
from foxnode.testing import InlineWriter, spawn_node

TIMEOUT = 10.0


def addr(n: int, m: int = 0) -> str:
    return f"ws://127.3.{m}.{n}:9/ws"


class ManualRunner:
    """Runs the store's writes when the test says (``step``), in its thread."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple, Deferred]] = []

    def run(self, write: Any, *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.append((write, args, d))
        return d

    def step(self) -> None:
        write, args, d = self.jobs.pop(0)
        try:
            write(*args)
        except BaseException as e:
            d.errback(e)
        else:
            d.callback(None)

    def stop(self) -> None:
        pass


class RecordingOps(DiskOps):
    """Notes every write and fsync, by the file's name."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.names: dict[int, str] = {}

    def open(self, path: Any, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.names[fd] = Path(path).name
        return fd

    def write(self, fd: int, data: Any) -> int:
        self.events.append(("write", self.names.get(fd), bytes(data)))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.events.append(("fsync", self.names.get(fd)))


def test_a_commit_fires_only_after_its_journal_line_is_fsynced(tmp_path):
    events: list = []
    runner = ManualRunner()
    store = PeerStore(Clock(), tmp_path / "peers.json", runner=runner, ops=RecordingOps(events))
    first = store.add([addr(1)], REGISTER)
    first.durable.addCallback(lambda _: events.append(("acked", addr(1))))
    runner.step()  # starts the journal, appends the line
    assert events[-1] == ("acked", addr(1))
    # A second register while nothing is in flight: its own append.
    second = store.add([addr(2)], REGISTER)
    second.durable.addCallback(lambda _: events.append(("acked", addr(2))))
    assert ("acked", addr(2)) not in events, "acknowledged before anything was written"
    runner.step()
    for a in (addr(1), addr(2)):
        acked = events.index(("acked", a))
        wrote = next(i for i, e in enumerate(events)
                     if e[0] == "write" and e[1] == "peers.json.journal" and a.encode() in e[2])
        synced = next(i for i, e in enumerate(events[wrote:], wrote) if e == ("fsync", "peers.json.journal"))
        assert wrote < synced < acked, events
    # Nothing but the journal was written: the peers file waits for a fold.
    assert not (tmp_path / "peers.json").exists()
    assert [r.addr for r in load(tmp_path / "peers.json")] == [addr(1), addr(2)]


def test_concurrent_registers_share_one_append_and_one_fsync(tmp_path):
    events: list = []
    runner = ManualRunner()
    store = PeerStore(Clock(), tmp_path / "peers.json", runner=runner, ops=RecordingOps(events))
    first = store.add([addr(1)], REGISTER)
    runner.step()
    assert first.durable.called
    del events[:]
    # One write in flight, and ten registers meanwhile.
    store.add([addr(2)], REGISTER)
    waiting = [store.add([addr(10 + i)], REGISTER).durable for i in range(10)]
    runner.step()
    assert not any(d.called for d in waiting)
    runner.step()
    assert all(d.called for d in waiting)
    fsyncs = [e for e in events if e[0] == "fsync"]
    assert fsyncs == [("fsync", "peers.json.journal")] * 2, events


# -- crashes ------------------------------------------------------------------------------------

class ImagingOps(DiskOps):
    """After every call that writes, what a crash right then would leave of
    the two files (unsynced writes included: a crash may keep them), and
    what had been acknowledged by then."""

    def __init__(self, directory: Path, model: dict) -> None:
        self.directory = directory
        self.model = model
        self.images: list[tuple[dict[str, bytes], set[str], set[str], bool]] = []
        self.journal_fds: set[int] = set()

    def _image(self, tearable: bool = False) -> None:
        files = {}
        for name in ("peers.json", "peers.json.journal"):
            p = self.directory / name
            if p.exists():
                files[name] = p.read_bytes()
        self.images.append((files, set(self.model["present"]), set(self.model["removed"]), tearable))

    def open(self, path: Any, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        if Path(path).name == "peers.json.journal":
            self.journal_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.journal_fds.discard(fd)
        super().close(fd)

    def write(self, fd: int, data: Any) -> int:
        n = super().write(fd, data)
        # An append not yet fsynced may reach the disk in part: torn.
        self._image(tearable=fd in self.journal_fds)
        return n

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._image()

    def truncate(self, fd: int, size: int) -> None:
        super().truncate(fd, size)
        self._image()

    def replace(self, src: Any, dst: Any) -> None:
        super().replace(src, dst)
        self._image()


@pytest.mark.parametrize("seed", range(4))
def test_a_crash_at_any_point_loses_no_acknowledged_write(tmp_path, monkeypatch, seed):
    # Registers, removals and bookkeeping, with folds every few lines; the
    # files are imaged after every write, fsync, truncate and rename. Every
    # image must open, hold every address acknowledged by then, and none
    # whose removal was acknowledged.
    monkeypatch.setattr(foxnode.store, "FOLD_LINES", 6)
    rng = random.Random(seed)
    live = tmp_path / "live"
    live.mkdir()
    model: dict[str, set[str]] = {"present": set(), "removed": set()}
    ops = ImagingOps(live, model)
    store = PeerStore(Clock(), live / "peers.json", max_peers=30, runner=InlineWriter(), ops=ops)
    fresh = iter(range(1, 10_000))
    for _ in range(120):
        # While a change is on its way, its addresses may be either way:
        # the images taken meanwhile expect only what holds before and after.
        first_image, present_before = len(ops.images), set(model["present"])
        action = rng.random()
        if action < 0.6:
            new = [addr(next(fresh) % 250 + 1, 1 + len(model["present"]) % 7) for _ in range(rng.choice([1, 2]))]
            new = [a for a in new if a not in model["removed"] and a not in store]
            result = store.add(new, REGISTER)
            outcome: list = []
            result.durable.addBoth(outcome.append)
            assert outcome == [None], outcome
            model["present"].update(result.accepted)
            # (a full store evicts: an evicted address was never promised to stay)
            model["present"] &= set(store.addresses())
        elif action < 0.8 and model["present"]:
            gone = rng.choice(sorted(model["present"]))
            store.remove(gone)
            done: list = []
            store.commit().addBoth(done.append)
            assert done == [None]
            model["present"].discard(gone)
            model["removed"].add(gone)
        elif model["present"]:
            store.update(rng.choice(sorted(model["present"])), failures=rng.randrange(3), last_seen=1.0)
            store.commit()
        for i in range(first_image, len(ops.images)):
            files, present, removed, tearable = ops.images[i]
            ops.images[i] = (files, present_before & model["present"], removed, tearable)
    done = []
    store.close().addBoth(done.append)
    assert done == [None]
    assert ops.images, "nothing was imaged"
    folds = sum(1 for files, *_ in ops.images if b'"journal"' in files.get("peers.json", b""))
    assert folds, "the journal was never folded"

    crash = tmp_path / "crash"
    for number, (files, present, removed, tearable) in enumerate(ops.images):
        variants = [files]
        if tearable and files.get("peers.json.journal"):
            journal = files["peers.json.journal"]
            cut = rng.randrange(1, max(2, len(journal.rsplit(b"\n", 2)[-2]) + 1))
            variants.append({**files, "peers.json.journal": journal[:-cut]})
        for variant in variants:
            shutil.rmtree(crash, ignore_errors=True)
            crash.mkdir()
            for name, data in variant.items():
                (crash / name).write_bytes(data)
            try:
                held = {r.addr for r in load(crash / "peers.json", max_peers=30)}
            except StoreError as e:
                raise AssertionError(f"image {number}: a crash here would keep the node from starting: {e}")
            assert present <= held, f"image {number}: lost {sorted(present - held)[:3]}"
            assert not (removed & held), f"image {number}: removed, yet back: {sorted(removed & held)[:3]}"


def _store_with_journal(directory: Path, *addresses: str, folded: bool = False) -> PeerStore:
    directory.mkdir(exist_ok=True)
    store = PeerStore.open(Clock(), directory / "peers.json", runner=InlineWriter())
    if folded:
        store.add([addr(200)], REGISTER)
        store.fold()
    for a in addresses:
        store.add([a], REGISTER)
    return store


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _refused(directory: Path, *words: str) -> None:
    before = _files(directory)
    with pytest.raises(StoreError) as info:
        PeerStore.open(Clock(), directory / "peers.json")
    message = str(info.value)
    assert "\n" not in message
    assert str(directory / "peers.json") in message, message
    for word in words:
        assert word in message, message
    assert _files(directory) == before, "a refused store was written"


def test_a_torn_last_line_is_dropped_and_cut_off_before_the_next_append(tmp_path):
    _store_with_journal(tmp_path, addr(1), addr(2))
    journal = journal_path(tmp_path / "peers.json")
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op": "put", "addr": "ws://127.3.0.3:9/ws", "rec')
    store = PeerStore.open(Clock(), tmp_path / "peers.json", runner=InlineWriter())
    assert store.addresses() == [addr(1), addr(2)]
    store.add([addr(4)], REGISTER)
    assert journal.read_bytes().startswith(whole)
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())
    assert [r.addr for r in load(tmp_path / "peers.json")] == [addr(1), addr(2), addr(4)]


@pytest.mark.parametrize("where", ["middle", "header"])
def test_garbage_in_the_journal_refuses_to_start_and_is_left_alone(tmp_path, where):
    _store_with_journal(tmp_path, addr(1), addr(2), addr(3))
    journal = journal_path(tmp_path / "peers.json")
    lines = journal.read_bytes().split(b"\n")
    lines[0 if where == "header" else 2] = b"\x00garbage{"
    journal.write_bytes(b"\n".join(lines))
    _refused(tmp_path, str(journal), "line 1" if where == "header" else "line 3")


def test_a_journal_line_that_is_json_but_no_change_is_refused(tmp_path):
    _store_with_journal(tmp_path, addr(1))
    journal = journal_path(tmp_path / "peers.json")
    journal.write_bytes(journal.read_bytes() + b'{"op": "put", "addr": "http://127.3.0.9:9/ws", "record": {}}\n')
    _refused(tmp_path, "invalid address")


def test_a_journal_from_another_peers_file_is_refused(tmp_path):
    _store_with_journal(tmp_path / "a", addr(1), folded=True)
    _store_with_journal(tmp_path / "b", addr(2), folded=True)
    shutil.copy(tmp_path / "a" / "peers.json.journal", tmp_path / "b" / "peers.json.journal")
    _refused(tmp_path / "b", "another peers file")


def test_a_journal_whose_peers_file_is_missing(tmp_path):
    # Before the first fold, the journal is the whole store: replayed.
    _store_with_journal(tmp_path / "first", addr(1), addr(2))
    assert not (tmp_path / "first" / "peers.json").exists()
    assert PeerStore.open(Clock(), tmp_path / "first" / "peers.json").addresses() == [addr(1), addr(2)]
    # After a fold, it is not: the peers file is gone, and with it what it held.
    _store_with_journal(tmp_path / "later", addr(3), folded=True)
    (tmp_path / "later" / "peers.json").unlink()
    _refused(tmp_path / "later", "missing")


def test_a_corrupt_peers_file_is_refused_though_its_journal_is_fine(tmp_path):
    _store_with_journal(tmp_path, addr(1), folded=True)
    (tmp_path / "peers.json").write_bytes(b"{ not json")
    _refused(tmp_path, "JSON")


def test_a_crash_between_a_folds_rename_and_the_journals_reset(tmp_path):
    # The journal is of the epoch before the peers file's: folded already.
    store = _store_with_journal(tmp_path, addr(1), addr(2))
    old_journal = journal_path(tmp_path / "peers.json").read_bytes()
    store.remove(addr(1))
    store.fold()
    journal_path(tmp_path / "peers.json").write_bytes(old_journal)
    reopened = PeerStore.open(Clock(), tmp_path / "peers.json", runner=InlineWriter())
    assert reopened.addresses() == [addr(2)]
    # ... and the next append starts a journal of the file's epoch.
    reopened.add([addr(3)], REGISTER)
    assert PeerStore.open(Clock(), tmp_path / "peers.json").addresses() == [addr(2), addr(3)]


def test_a_replayed_remove_stays_removed(tmp_path):
    store = _store_with_journal(tmp_path, addr(1), addr(2), addr(3))
    store.fold()
    store.remove(addr(1))
    store.commit()
    assert addr(1).encode() in (tmp_path / "peers.json").read_bytes(), "folded before the removal"
    assert PeerStore.open(Clock(), tmp_path / "peers.json").addresses() == [addr(2), addr(3)]
    # Removed and registered again: last, as in memory.
    store.remove(addr(2))
    store.add([addr(2)], REGISTER)
    assert store.addresses() == [addr(3), addr(2)]
    assert PeerStore.open(Clock(), tmp_path / "peers.json").addresses() == store.addresses()


def _reopened(path: Path) -> PeerStore:
    return PeerStore.open(Clock(), path, runner=InlineWriter())


def test_an_unregistered_address_stays_so_in_the_journal_and_after_a_fold(tmp_path):
    path = tmp_path / "peers.json"
    store = _store_with_journal(tmp_path, addr(1), addr(2), addr(3))
    done: list = []
    store.unregister([addr(1)]).addBoth(done.append)
    assert done == [None], done
    for state in ("journal", "folded"):
        again = _reopened(path)
        assert again.addresses() == [addr(2), addr(3)], state
        assert again.unregistered() == [addr(1)], state
        # Learned from a peer (the exchange, a hello): left out, unsaid ...
        result = again.add([addr(1)], EXCHANGE, durable=False)
        assert result.accepted == [] and addr(1) not in again, state
        store.fold()
    assert json.loads(path.read_text())["unregistered"] == [addr(1)]
    # ... registered by the operator: back, and no longer unregistered,
    # in memory, in the journal, and in the next fold.
    assert store.add([addr(1)], REGISTER).accepted == [addr(1)]
    assert not store.is_unregistered(addr(1))
    for state in ("journal", "folded"):
        again = _reopened(path)
        assert addr(1) in again and again.unregistered() == [], state
        store.fold()
    assert "unregistered" not in json.loads(path.read_text()), "the lab's file grows no empty key"


class FailingFsync(DiskOps):
    """A disk whose fsyncs fail while ``failing`` is set."""

    failing = False

    def fsync(self, fd: int) -> None:
        if self.failing:
            raise OSError(5, "Input/output error")
        super().fsync(fd)


def test_a_failed_register_leaves_an_unregistered_address_unregistered(tmp_path):
    path = tmp_path / "peers.json"
    ops = FailingFsync()
    store = PeerStore.open(Clock(), path, runner=InlineWriter(), ops=ops)
    store.add([addr(1)], REGISTER)
    store.unregister([addr(1)])
    ops.failing = True
    outcome: list = []
    store.add([addr(1)], REGISTER).durable.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), outcome
    # Rolled back, the unregistration with it: in memory, and in the next
    # write (a fold, the journal's state being unknown after a failure).
    assert addr(1) not in store and store.is_unregistered(addr(1))
    ops.failing = False
    store.commit()
    again = _reopened(path)
    assert addr(1) not in again and again.unregistered() == [addr(1)]


def test_an_unregistration_covers_every_spelling_of_the_address(tmp_path):
    store = _store_with_journal(tmp_path, addr(1), "ws://localhost:9/ws", "ws://[::1]:9/ws")
    store.unregister([addr(1), "ws://localhost:9/ws", "ws://[::1]:9/ws"])
    pin = "ab" * 32
    for spelling in (addr(1) + "#" + pin, addr(1) + "?x", "ws://127.3.0.1:9/ws", "ws://LocalHost:9/ws",
                     "ws://localhost.:9/ws?y", "ws://[0:0::1]:9/ws", "ws://[0000::0001]:9/ws#" + pin):
        assert store.is_unregistered(spelling), spelling
        assert store.add([spelling], EXCHANGE, durable=False).accepted == [], spelling
    assert not store.is_unregistered(addr(2)) and not store.is_unregistered("wss://127.3.0.1:9/ws")
    assert not store.is_unregistered("not an address")
    # The operator registering any spelling of it ends the unregistration.
    assert store.add([addr(1) + "#" + pin], REGISTER).accepted == [addr(1) + "#" + pin]
    left = ["ws://localhost:9/ws", "ws://[::1]:9/ws"]
    assert store.unregistered() == left and _reopened(tmp_path / "peers.json").unregistered() == left


def test_the_command_line_revives_an_unregistered_bootstrap_address(tmp_path):
    store = _store_with_journal(tmp_path, addr(1))
    store.unregister([addr(1)])
    again = _reopened(tmp_path / "peers.json")
    # As tap.makeService adds --peer and --static-peer addresses.
    assert again.add([addr(1)], BOOTSTRAP, durable=False, revive=True).accepted == [addr(1)]
    assert again.unregistered() == []


def test_unregistered_addresses_are_bounded_oldest_first(tmp_path, monkeypatch):
    import foxnode.storefiles

    monkeypatch.setattr(foxnode.store, "MAX_UNREGISTERED", 3)
    monkeypatch.setattr(foxnode.storefiles, "MAX_UNREGISTERED", 3)
    store = _store_with_journal(tmp_path, *[addr(i) for i in range(1, 6)])
    for i in range(1, 6):
        store.unregister([addr(i)])
    assert store.unregistered() == [addr(3), addr(4), addr(5)]
    assert _reopened(tmp_path / "peers.json").unregistered() == [addr(3), addr(4), addr(5)]


@pytest.mark.parametrize("bad", ['"ws://127.3.0.1:9/ws"', "[1]", "{}", "null"])
def test_a_peers_file_with_a_bad_unregistered_list_is_refused_and_left_alone(tmp_path, bad):
    path = tmp_path / "peers.json"
    store = _store_with_journal(tmp_path, addr(1))
    store.close()
    doc = json.loads(path.read_text())
    text = json.dumps(doc)[:-1] + f', "unregistered": {bad}}}'
    path.write_text(text)
    with pytest.raises(StoreError, match="unregistered"):
        PeerStore.open(Clock(), path)
    assert path.read_text() == text


# -- folds --------------------------------------------------------------------------------------

def _journal_lines(path: Path) -> int:
    return len(journal_path(path).read_bytes().splitlines()) - 1  # the header


def test_the_journal_is_folded_once_it_outgrows_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(foxnode.store, "FOLD_LINES", 10)
    path = tmp_path / "peers.json"
    store = PeerStore(Clock(), path, runner=InlineWriter())
    store.add([addr(i) for i in range(1, 6)], REGISTER)
    lengths = []
    for i in range(40):
        # Bookkeeping: the journal grows, the store does not.
        store.update(addr(i % 5 + 1), failures=i)
        store.commit()
        lengths.append(_journal_lines(path))
    # Longer than the store and than FOLD_LINES: folded with the next commit.
    assert max(lengths) == 11, lengths
    assert lengths.count(0) >= 3, lengths
    assert {r.addr: r.failures for r in load(path)} == {r.addr: r.failures for r in store.records()}


def test_close_folds_the_journal_into_the_peers_file(tmp_path):
    path = tmp_path / "peers.json"
    store = PeerStore(Clock(), path, runner=InlineWriter())
    store.add([addr(1), addr(2)], REGISTER)
    store.add([addr(3)], EXCHANGE, durable=False)
    store.update(addr(1), failures=2)
    done: list = []
    store.close().addBoth(done.append)
    assert done == [None]
    assert _journal_lines(path) == 0
    doc = json.loads(path.read_text())
    assert list(doc["peers"]) == [addr(1), addr(2), addr(3)]
    assert doc["peers"][addr(1)]["failures"] == 2
    # Nothing changed since: the next close writes nothing.
    again = PeerStore.open(Clock(), path, runner=InlineWriter())
    before = _files(tmp_path)
    again.close()
    assert _files(tmp_path) == before


# -- the eviction policy, without I/O ---------------------------------------------------------

def verified(index: PeerIndex, a: str, failures: int = 0) -> None:
    index.update(a, {"last_handshake": 5.0, "failures": failures})


def test_index_evicts_never_verified_then_most_failing_then_oldest():
    index = PeerIndex(4)
    for i, a in enumerate([addr(1), addr(2), addr(3), addr(4)]):
        index.add([a], REGISTER, now=float(i))
    verified(index, addr(1))             # healthy: kept
    verified(index, addr(2), failures=1)  # verified, failing
    verified(index, addr(3), failures=5)  # verified, failing more
    # addr(4): never verified, the first to go
    got = index.add([addr(5)], REGISTER, now=10.0)
    assert [r.addr for r in got.evicted] == [addr(4)] and got.accepted == [addr(5)]
    got = index.add([addr(6), addr(7)], REGISTER, now=11.0)
    assert [r.addr for r in got.evicted] == [addr(5), addr(6)] or [r.addr for r in got.evicted] == [addr(5), addr(3)]


def test_index_order_matches_the_rule():
    index = PeerIndex(3)
    index.add([addr(1)], REGISTER, now=3.0)
    index.add([addr(2)], REGISTER, now=1.0)
    index.add([addr(3)], REGISTER, now=2.0)
    # All never verified: the oldest "added" goes first.
    assert [r.addr for r in index.add([addr(4)], REGISTER, now=4.0).evicted] == [addr(2)]
    verified(index, addr(3), failures=2)
    verified(index, addr(1), failures=1)
    verified(index, addr(4))
    # Verified ones now: most failures first.
    assert [r.addr for r in index.add([addr(5)], REGISTER, now=5.0).evicted] == [addr(3)]


def test_index_never_evicts_bootstrap_held_or_the_requests_own():
    index = PeerIndex(3)
    index.add([addr(1)], BOOTSTRAP, now=0.0)
    index.add([addr(2)], REGISTER, now=1.0, hold=True)  # its write in flight
    index.add([addr(3)], REGISTER, now=2.0)
    got = index.add([addr(3), addr(4)], REGISTER, now=3.0)
    # addr(3) is the request's own, addr(2) is held, addr(1) bootstrap.
    assert got.evicted == [] and got.accepted == [addr(3)]
    assert got.rejected == [{"addr": addr(4), "reason": FULL}]
    assert index.held == {addr(2)}
    index.release([addr(2)])
    got = index.add([addr(4)], REGISTER, now=4.0)
    assert [r.addr for r in got.evicted] == [addr(2)] and got.accepted == [addr(4)]


def test_index_dedupes_within_and_across_requests():
    index = PeerIndex(10)
    got = index.add([addr(1), addr(1), addr(2)], REGISTER, now=0.0)
    assert set(got.accepted) == {addr(1), addr(2)} and got.fresh == [addr(1), addr(2)]
    got = index.add([addr(2), addr(3), addr(3)], REGISTER, now=1.0)
    assert set(got.accepted) == {addr(2), addr(3)} and got.fresh == [addr(3)]
    assert index.addresses() == [addr(1), addr(2), addr(3)]


def test_index_follows_records_changed_after_the_heap_was_built():
    index = PeerIndex(2)
    index.add([addr(1)], REGISTER, now=0.0)
    index.add([addr(2)], REGISTER, now=1.0)
    index.add([addr(3)], REGISTER, now=2.0)  # builds the heap; evicts addr(1)
    assert addr(1) not in index
    verified(index, addr(2))  # healthy now: out of the running
    got = index.add([addr(4)], REGISTER, now=3.0)
    assert [r.addr for r in got.evicted] == [addr(3)]
    index.update(addr(2), {"failures": 4})  # failing: back in
    got = index.add([addr(5)], REGISTER, now=4.0)
    assert [r.addr for r in got.evicted] == [addr(4)]


def test_index_records_are_the_stores_records():
    record = PeerRecord(addr=addr(1), added=1.0, source=REGISTER)
    index = PeerIndex(5, [record])
    assert index.get(addr(1)) is record and len(index) == 1 and addr(1) in index


# -- a real node, killed ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_acknowledged_registers_survive_sigkill_in_the_journal(reactor, node_dir):
    node = await deferToThread(spawn_node, node_dir)
    protos: list = []
    acknowledged: list[str] = []
    try:
        protos = await gatherResults([client.connect(reactor, node.url, timeout=TIMEOUT) for _ in range(4)])
        ds = []
        for c, proto in enumerate(protos):
            for k in range(1, 31):
                a = f"ws://127.3.{c}.{k}:9/ws"
                d = proto.request("register", {"addr": a}, timeout=TIMEOUT)
                d.addCallback(lambda r, a=a: r.status == 202 and acknowledged.append(a))
                ds.append(d)
        await gatherResults(ds)
        journal = (node_dir / "peers.json.journal").read_bytes()
        assert node.kill(signal.SIGKILL) == -signal.SIGKILL
    finally:
        for proto in protos:
            proto.close()
        await gatherResults([p.when_closed() for p in protos], consumeErrors=True)
        node.kill()
    assert len(acknowledged) == 120
    # Killed with everything in the journal, not folded.
    assert journal.count(b"\n") > 120
    assert not (node_dir / "peers.json").exists()

    restarted = await deferToThread(spawn_node, node_dir)
    try:
        reply = await client.call(reactor, restarted.url, "peers", timeout=TIMEOUT)
    finally:
        assert await deferToThread(restarted.stop) in (0, -signal.SIGTERM)
    assert set(reply.response["peers"]) == set(acknowledged)
    # The orderly stop folded them into the peers file.
    on_file = json.loads((node_dir / "peers.json").read_text())["peers"]
    assert set(on_file) == set(acknowledged)
    assert (node_dir / "peers.json.journal").read_bytes().count(b"\n") == 1
    assert os.path.exists(node_dir / "peers.json.journal")
