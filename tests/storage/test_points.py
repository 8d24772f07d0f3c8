"""PointStore: the SQLite system of record (uint64 ids, seq numbers, tombstones, replay)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from retrieval.errors import InvalidArgument
from retrieval.storage.points import PointStore, from_keys, to_keys
from retrieval.vectors import filters as flt

D = 4
BIG = [0, 1, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 12345]


@pytest.fixture
def store(tmp_path):
    s = PointStore(tmp_path / "points.sqlite", D)
    yield s
    s.close()


def vecs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_key_mapping_preserves_order():
    ids = np.array(sorted(BIG), np.uint64)
    keys = to_keys(ids)
    assert keys.dtype == np.int64
    assert (np.diff(keys) > 0).all()
    assert (from_keys(keys) == ids).all()


def test_upsert_get_round_trip_big_ids(store):
    ids = np.array(BIG, np.uint64)
    x = vecs(len(ids))
    pls = [json.dumps({"i": i}) for i in range(len(ids) - 1)] + [None]
    seq = store.upsert(ids, x, pls)
    assert seq == 1 and store.last_seq == 1
    got_ids, got_x, got_p = store.get(ids, True, True)
    order = np.argsort(ids)
    assert got_ids.tolist() == sorted(BIG)  # uint64 order
    assert np.array_equal(got_x, x[order])  # bit-exact
    assert got_p == [pls[i] for i in order]
    # missing ids are omitted; with_vectors / with_payloads off
    got_ids, got_x, got_p = store.get(np.array([5, 2**63, 2**64 - 3], np.uint64), False, False)
    assert got_ids.tolist() == [2**63] and got_x is None and got_p is None
    assert store.count() == len(ids)


def test_upsert_replaces_and_bumps_seq(store):
    ids = np.array([3, 2**63 + 7], np.uint64)
    store.upsert(ids, vecs(2, 1), ['{"v":1}', '{"v":1}'])
    x2 = vecs(1, 2)
    seq = store.upsert(ids[1:], x2, ['{"v":2}'])
    assert seq == 2
    got_ids, got_x, got_p = store.get(ids, True, True)
    assert got_p == ['{"v":1}', '{"v":2}']
    assert np.array_equal(got_x[1], x2[0])
    assert store.count() == 2


def test_delete_by_ids_and_filter(store):
    ids = np.arange(10, dtype=np.uint64) + np.uint64(2**63 - 5)
    store.upsert(ids, vecs(10), [json.dumps({"g": int(i) % 3}) for i in range(10)])
    seq, deleted = store.delete(ids=np.array([ids[0], ids[9], 42], np.uint64))
    assert seq == 2 and sorted(deleted.tolist()) == sorted([int(ids[0]), int(ids[9])])
    where = flt.to_sql(flt.Filter(must=(flt.Condition("g", equals=0),)))
    seq, deleted = store.delete(where=where)
    # g == 0 for i in {0, 3, 6, 9}; 0 and 9 are gone already
    assert seq == 3 and sorted(deleted.tolist()) == sorted([int(ids[3]), int(ids[6])])
    assert store.count() == 6
    # deleting nothing is no write
    seq, deleted = store.delete(ids=np.array([42], np.uint64))
    assert seq == 0 and len(deleted) == 0 and store.last_seq == 3


def test_scroll_in_uint64_order(store):
    ids = np.array(BIG, np.uint64)
    store.upsert(ids, vecs(len(ids)), [json.dumps({"big": bool(i >= 2**63)}) for i in BIG])
    out, start = [], 0
    while True:
        got, _, _ = store.scroll(start, 3, None, False, False)
        out.extend(got.tolist())
        if len(got) < 3:
            break
        start = int(got[-1]) + 1
    assert out == sorted(BIG)
    got, _, _ = store.scroll(2**63, 100, None, False, False)
    assert got.tolist() == [i for i in sorted(BIG) if i >= 2**63]
    where = flt.to_sql(flt.Filter(must=(flt.Condition("big", equals=True),)))
    got, _, pls = store.scroll(0, 100, where, False, True)
    assert got.tolist() == [i for i in sorted(BIG) if i >= 2**63]
    assert all(json.loads(p)["big"] for p in pls)
    ids_m, vecs_m = store.match(where, None, True)
    assert sorted(ids_m.tolist()) == got.tolist() and vecs_m.shape == (len(got), D)
    assert store.count(where) == len(got)


def test_changes_since_and_tombstones(store):
    a = np.array([1, 2, 3, 2**64 - 2], np.uint64)
    s1 = store.upsert(a, vecs(4, 1), None)              # seq 1
    s2 = store.upsert(a[:1], vecs(1, 2), None)          # seq 2: 1 updated
    s3, _ = store.delete(ids=a[1:2])                    # seq 3: 2 deleted
    s4 = store.upsert(np.array([9], np.uint64), vecs(1, 3), None)  # seq 4
    assert (s1, s2, s3, s4) == (1, 2, 3, 4)

    def collect(since):
        ups, dels = {}, {}
        for kind, ids, vx, seqs in store.changes_since(since, block=2):
            for j, i in enumerate(ids.tolist()):
                if kind == "upsert":
                    ups[i] = (int(seqs[j]), vx[j].copy())
                else:
                    assert vx is None
                    dels[i] = int(seqs[j])
        return ups, dels

    ups, dels = collect(0)
    assert sorted(ups) == [1, 3, 9, 2**64 - 2] and dels == {2: 3}
    assert ups[1][0] == 2 and np.array_equal(ups[1][1], vecs(1, 2)[0])
    ups, dels = collect(2)
    assert sorted(ups) == [9] and dels == {2: 3}
    ups, dels = collect(3)
    assert sorted(ups) == [9] and dels == {}
    ups, dels = collect(4)
    assert ups == {} and dels == {}

    # re-inserting a deleted id removes its tombstone
    store.upsert(a[1:2], vecs(1, 4), None)  # seq 5
    ups, dels = collect(2)
    assert 2 in ups and dels == {}

    # purge forgets tombstones a snapshot covers, not later ones
    store.delete(ids=a[2:3])  # seq 6
    store.delete(ids=np.array([9], np.uint64))  # seq 7
    store.purge_tombstones(6)
    ups, dels = collect(0)
    assert dels == {9: 7}
    assert store._w.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0] == 1


def test_iter_points_max_seq(store):
    store.upsert(np.array([5, 2**63], np.uint64), vecs(2), None)  # seq 1
    store.upsert(np.array([7], np.uint64), vecs(1, 1), None)      # seq 2
    got = np.concatenate([ids for ids, _ in store.iter_points(block=1)])
    assert got.tolist() == [5, 7, 2**63]
    got = np.concatenate([ids for ids, _ in store.iter_points(block=1, max_seq=1)])
    assert got.tolist() == [5, 2**63]


def test_persistence_and_reopen(tmp_path):
    p = tmp_path / "p.sqlite"
    s = PointStore(p, D)
    x = vecs(3)
    s.upsert(np.array([1, 2, 2**63], np.uint64), x, ['{"a":1}', None, '{"b":[1,2]}'])
    s.delete(ids=np.array([2], np.uint64))
    s.close()
    s = PointStore(p, D)
    try:
        assert s.last_seq == 2
        ids, xv, pls = s.get(np.array([1, 2, 2**63], np.uint64), True, True)
        assert ids.tolist() == [1, 2**63] and np.array_equal(xv, x[[0, 2]]) and pls == ['{"a":1}', '{"b":[1,2]}']
        # WAL mode, as documented
        assert s._r.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


def test_failed_batch_is_rolled_back(store):
    store.upsert(np.array([1], np.uint64), vecs(1), ['{"a":1}'])
    # the second row's payload cannot be bound: the whole batch must roll back
    with pytest.raises(sqlite3.Error):
        store.upsert(np.array([1, 2], np.uint64), vecs(2, 5), ['{"a":2}', {"not": "a string"}])
    assert store.count() == 1 and store.last_seq == 1
    ids, xv, pls = store.get(np.array([1, 2], np.uint64), True, True)
    assert ids.tolist() == [1] and pls == ['{"a":1}'] and np.array_equal(xv, vecs(1))
    assert store.upsert(np.array([2], np.uint64), vecs(1), None) == 2  # still writable, seq continues


def test_bad_synchronous(tmp_path):
    with pytest.raises(InvalidArgument, match="synchronous"):
        PointStore(tmp_path / "x.sqlite", D, synchronous="OFF")
