"""The message store (msgstore.py): SQLite in the data directory, bounded
in bytes and by TTL, refusing what is not its own."""

from __future__ import annotations

import os
import random
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foxnode.msgstore import ROW_OVERHEAD, STORE_FILE, MessageStore, MessageStoreError


def add(store, n, created=1000.0, ttl=60.0, topic="t", body=b"{}", durable=False):
    message_id = f"{n:064x}"
    return store.add(message_id, topic, created, created + ttl, body, durable=durable)


def test_what_was_added_and_committed_is_there_after_reopening(tmp_path):
    path = str(tmp_path / STORE_FILE)
    store = MessageStore.open(path, 1 << 20)
    assert add(store, 1, durable=True) and add(store, 2)
    assert not add(store, 1)  # held already
    store.commit()
    store.close()
    again = MessageStore.open(path, 1 << 20)
    assert again.count == 2 and again.has(f"{1:064x}") and again.has(f"{2:064x}")
    assert again.bytes == 2 * (2 + ROW_OVERHEAD)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


@pytest.mark.parametrize("content", [
    b"not a database at all, just text\n" * 100,
    b"SQLite format 3\x00" + os.urandom(4000),
])
def test_a_file_that_is_not_a_database_is_refused_in_one_line_and_left_as_it_was(tmp_path, content):
    path = tmp_path / STORE_FILE
    path.write_bytes(content)
    with pytest.raises(MessageStoreError) as e:
        MessageStore.open(str(path), 1 << 20)
    assert "\n" not in str(e.value) and STORE_FILE in str(e.value)
    assert path.read_bytes() == content


def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / STORE_FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE accounts (name TEXT)")
    db.execute("INSERT INTO accounts VALUES ('alice')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(MessageStoreError, match="another program"):
        MessageStore.open(str(path), 1 << 20)
    assert path.read_bytes() == before


def test_a_damaged_store_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / STORE_FILE
    store = MessageStore.open(str(path), 1 << 30)
    for n in range(2000):
        add(store, n, body=b'{"x":"' + b"y" * 200 + b'"}')
    store.commit()
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    for offset in range(3 * 4096, len(data) - 4096, 4096 * 3):
        data[offset + 100:offset + 300] = os.urandom(200)
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(MessageStoreError):
        MessageStore.open(str(path), 1 << 30)
    assert path.read_bytes() == before


def test_over_its_bytes_the_envelopes_nearest_their_end_go_first(tmp_path):
    limit = 50 * (100 + ROW_OVERHEAD)
    store = MessageStore.open(str(tmp_path / STORE_FILE), limit)
    ttls = list(range(1, 201))
    random.Random(7).shuffle(ttls)
    gone = []
    for n, ttl in enumerate(ttls):
        add(store, n, ttl=float(ttl), body=b"x" * 100)
        gone += store.evict()
        assert store.bytes <= limit
    store.commit()
    assert store.count == 50 and len(gone) == 150
    kept = {int(r[0], 16) for r in store._db.execute("SELECT id FROM envelopes")}
    # Those kept are the ones with the longest life left.
    kept_ttls = sorted(ttls[n] for n in kept)
    assert kept_ttls == list(range(151, 201))
    assert store.bytes == sum(r[0] for r in store._db.execute("SELECT size FROM envelopes"))
    store.close()


def test_a_sweep_drops_exactly_the_expired(tmp_path):
    store = MessageStore.open(str(tmp_path / STORE_FILE), 1 << 20)
    for n in range(10):
        add(store, n, created=1000.0, ttl=float(n * 10))
    swept = store.sweep(now=1045.0)
    assert sorted(int(i, 16) for i, _ in swept) == [0, 1, 2, 3, 4]
    assert store.count == 5
    store.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3)), min_size=1, max_size=60),
       st.integers(1, 7), st.data())
def test_paging_neither_repeats_nor_skips_whatever_is_added_meanwhile(tmp_path_factory, rows, size, data):
    store = MessageStore.open(str(tmp_path_factory.mktemp("s") / STORE_FILE), 1 << 30)
    topics = ["a", "b", "c", "d"]
    for n, (created, topic) in enumerate(rows):
        add(store, n, created=float(created), ttl=1e6, topic=topics[topic])
    there = {f"{n:064x}" for n, (_, t) in enumerate(rows) if topics[t] in ("a", "b")}
    seen, after, extra = [], None, len(rows)
    while True:
        page = store.page(["a", "b"], 0, 1e9, now=0, after=after, limit=size)
        assert [(r.created, r.seq) for r in page] == sorted((r.created, r.seq) for r in page)
        seen += [r.id for r in page]
        if len(page) < size:
            break
        after = (page[-1].created, page[-1].seq)
        # Meanwhile, more arrive, at any time.
        for _ in range(data.draw(st.integers(0, 3))):
            add(store, extra, created=float(data.draw(st.integers(0, 25))), ttl=1e6,
                topic=data.draw(st.sampled_from(topics)))
            extra += 1
    assert len(seen) == len(set(seen))
    assert there <= set(seen)
    store.close()
