"""Search over gRPC on a real server, checked against exact brute-force answers.

Covers the three call forms (stream, batch, unary), filters at both selectivities (a selective filter
takes the exact path, a broad one the index path), payloads and vectors in results, the l2 / ip /
cosine metrics, updates and deletes leaving the results of every index type (hnsw, faiss HNSW, faiss
IVF also before it is trained, exact), read-your-writes, and a faiss index rebuilt after many deletes.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from retrieval import convert
from retrieval.v1 import search_pb2, search_pb2_grpc
from tests.vectors.helpers import (NO_ID, all_points, assert_same_neighbours, brute_knn, distances, recall,
                                   ref_eval, to_filter, wait_indexed)

D = 16
FILTER_EXACT_THRESHOLD = 2048  # the server's default (config indexing.filter_exact_threshold)


def clustered(n, seed, d=D, nc=20):
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((nc, d)) * 2
    return (cent[rng.integers(0, nc, n)] + rng.standard_normal((n, d))).astype(np.float32)


def payload(i: int, rng) -> dict:
    p = {"cat": i % 10, "color": ["red", "green", "blue", "black"][i % 4], "price": float(rng.uniform(0, 100)),
         "tags": [t for t in ("a", "b", "c", "d") if rng.random() < 0.3], "nested": {"level": i % 3},
         "flag": bool(i % 7 == 0)}
    if i % 5 == 0:
        p["opt"] = None if i % 10 == 0 else "set"
    return p


class Model:
    """What the collection should hold: id -> (vector, payload)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.pts: dict[int, tuple[np.ndarray, dict | None]] = {}

    def upsert(self, ids, x, pls=None):
        for j, i in enumerate(np.asarray(ids, np.uint64).tolist()):
            self.pts[i] = (x[j].copy(), None if pls is None else pls[j])

    def delete(self, ids):
        for i in np.asarray(ids, np.uint64).tolist():
            self.pts.pop(i, None)

    def arrays(self, f=None):
        items = [(i, v) for i, (v, p) in self.pts.items() if f is None or ref_eval(f, p)]
        ids = np.array([i for i, _ in items], np.uint64)
        xb = np.stack([v for _, v in items]) if items else np.zeros((0, D), np.float32)
        return ids, xb

    def knn(self, xq, k, f=None):
        ids, xb = self.arrays(f)
        return brute_knn(xq, ids, xb, k, self.metric)

    def check_consistent(self, xq, D_, I, f=None):
        """Every returned (id, distance) pair is a live point (matching the filter) at its current vector."""
        for r in range(len(I)):
            for j in np.flatnonzero(I[r] != NO_ID):
                i = int(np.uint64(I[r, j]))
                assert i in self.pts, f"deleted point {i} returned"
                v, p = self.pts[i]
                if f is not None:
                    assert ref_eval(f, p), f"point {i} with payload {p} does not match the filter"
                want = distances(xq[r : r + 1], v[None], self.metric)[0, 0]
                assert abs(D_[r, j] - want) <= 1e-3 * max(1.0, abs(want)), \
                    f"point {i}: distance {D_[r, j]} but its current vector is at {want} (stale?)"


# ------------------------------------------------------------------------------------------------
# A module-wide collection with payloads for call forms, filters, payloads/vectors
# ------------------------------------------------------------------------------------------------
N_MAIN = 6000


@pytest.fixture(scope="module")
def main_col(client):
    name = "search-main"
    client.create_collection(name, dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 100})
    rng = np.random.default_rng(7)
    x = clustered(N_MAIN, 1)
    ids = (np.arange(N_MAIN, dtype=np.uint64) * np.uint64(3_000_000_000_000_001)) + np.uint64(2**62)  # some >= 2**63
    pls = [payload(i, rng) for i in range(N_MAIN)]
    client.upsert_stream(name, ((ids[i : i + 1000], x[i : i + 1000], pls[i : i + 1000]) for i in range(0, N_MAIN, 1000)))
    model = Model("l2")
    model.upsert(ids, x, pls)
    wait_indexed(client, name)
    return name, model, clustered(40, 2)


def test_call_forms_agree_and_are_accurate(client, server, main_col):
    name, model, xq = main_col
    Dt, It = model.knn(xq, 10)
    Db, Ib = client.search_batch(name, xq, k=10, ef=128)
    assert Db.shape == Ib.shape == (40, 10)
    assert recall(Ib, It) >= 0.97
    model.check_consistent(xq, Db, Ib)
    for r in range(0, 40, 4):  # the stream (client.search) and the unary Search RPC agree with the batch
        h = client.search(name, xq[r], k=10, ef=128)
        assert np.array_equal(h.ids, Ib[r]) and np.allclose(h.distances, Db[r])
    with grpc.insecure_channel(server.address) as ch:
        stub = search_pb2_grpc.SearchStub(ch)
        req = search_pb2.SearchRequest(collection=name, k=10, params=convert.query_params_to_proto(
            convert.QueryParams(ef=128)))
        convert.vectors_to_proto(xq[3:4], req.queries)
        resp = stub.Search(req)
        assert resp.nq == 1 and resp.k == 10
        assert np.array_equal(np.asarray(resp.ids, np.uint64).view(np.int64), Ib[3])
        # exact=True ignores the index: identical to brute force
        req.params.exact = True
        resp = stub.SearchBatch(req)
        assert_same_neighbours(np.asarray(resp.distances)[None], np.asarray(resp.ids, np.uint64).view(np.int64)[None],
                               Dt[3:4], It[3:4])
    De, Ie = client.search_batch(name, xq, k=10, exact=True)
    assert_same_neighbours(De, Ie, Dt, It)


FILTERS = {
    # selective: few points match -> the exact path
    "equality": {"must": [{"key": "color", "equals": "red"}, {"key": "cat", "equals": 4}]},
    "any_of": {"must": [{"key": "tags", "any_of": ["a", "d"]}, {"key": "cat", "any_of": [1, 2]}]},
    "range": {"must": [{"key": "price", "range": {"gte": 10, "lt": 30}}]},
    "is_null": {"must": [{"key": "opt", "is_null": True}, {"key": "flag", "equals": True}]},
    "nested": {"should": [{"must": [{"key": "color", "equals": "blue"}, {"key": "price", "range": {"lte": 20}}]},
                          {"must": [{"key": "nested.level", "equals": 2}, {"key": "opt", "is_null": False}]}],
               "must_not": [{"key": "tags", "any_of": ["b"]}]},
    # broad: most points match -> the index path with the filter inside the graph search
    "broad_must_not": {"must_not": [{"key": "cat", "equals": 0}]},
    "broad_range": {"must": [{"key": "price", "range": {"gt": 12.5}}]},
    "broad_nested": {"should": [{"key": "color", "any_of": ["red", "green", "blue"]},
                                {"must": [{"key": "nested.level", "equals": 0}]}]},
}


@pytest.mark.parametrize("fname", list(FILTERS))
def test_filtered_search_vs_exact(client, main_col, fname):
    name, model, xq = main_col
    fd = FILTERS[fname]
    f = to_filter(fd)
    n_match = sum(ref_eval(f, p) for _, p in model.pts.values())
    assert client.count(name, filter=fd) == n_match
    broad = fname.startswith("broad")
    # the test really covers both paths of the server
    assert (n_match > FILTER_EXACT_THRESHOLD) == broad, (fname, n_match)
    assert n_match >= 20
    Dt, It = model.knn(xq, 10, f)
    Dg, Ig = client.search_batch(name, xq, k=10, ef=128, filter=fd)
    model.check_consistent(xq, Dg, Ig, f)
    if broad:
        assert recall(Ig, It) >= 0.95, fname
        assert (Ig != NO_ID).all()
    else:
        assert_same_neighbours(Dg, Ig, Dt, It)
    # single-query form over the stream, with payloads
    h = client.search(name, xq[0], k=10, ef=128, filter=fd, with_payloads=True)
    assert all(ref_eval(f, p) for p in h.payloads)
    # exact=True with the filter is exact at every selectivity
    De, Ie = client.search_batch(name, xq[:10], k=10, exact=True, filter=fd)
    assert_same_neighbours(De, Ie, Dt[:10], It[:10])


def test_broad_filter_with_pending_points(client, main_col):
    """The index path with part of the matching points still in the delta (searched exactly, merged)."""
    name, model, xq = main_col
    rng = np.random.default_rng(71)
    n = 1500
    ids = np.arange(n, dtype=np.uint64) + np.uint64(2**64 - 2 - n)  # near the top of the id range
    x = clustered(n, 72)
    pls = [payload(i, rng) for i in range(n)]
    client.upsert(name, ids, x, pls)
    model.upsert(ids, x, pls)
    # and update some indexed points so that their old labels must be excluded from the filtered graph search
    old_ids = np.array(sorted(model.pts), np.uint64)[:300]
    x2 = clustered(300, 73)
    pls2 = [payload(i, rng) for i in range(300)]
    client.upsert(name, old_ids, x2, pls2)
    model.upsert(old_ids, x2, pls2)
    assert client.describe_collection(name)["pending"] > 0
    for fname in ("broad_must_not", "broad_nested"):
        fd = FILTERS[fname]
        f = to_filter(fd)
        Dg, Ig = client.search_batch(name, xq, k=10, ef=128, filter=fd)
        model.check_consistent(xq, Dg, Ig, f)
        Dt, It = model.knn(xq, 10, f)
        assert recall(Ig, It) >= 0.95, fname
    # the new points near the top of the id range are found right away
    Dn, In = client.search_batch(name, x[:50], k=1, ef=128, filter=FILTERS["broad_must_not"])
    want = [i for i in range(50) if pls[i]["cat"] != 0]
    assert (In[want, 0] == ids[want].view(np.int64)).all()
    wait_indexed(client, name)


def test_filter_matching_nothing_or_fewer_than_k(client, main_col):
    name, model, xq = main_col
    Dg, Ig = client.search_batch(name, xq[:3], k=5, filter={"must": [{"key": "color", "equals": "purple"}]})
    assert (Ig == NO_ID).all() and np.isinf(Dg).all()
    fd = {"must": [{"key": "cat", "equals": 3}, {"key": "price", "range": {"lt": 1.5}}, {"key": "flag", "equals": False}]}
    f = to_filter(fd)
    n = sum(ref_eval(f, p) for _, p in model.pts.values())
    assert 0 < n < 20
    Dg, Ig = client.search_batch(name, xq[:3], k=20, filter=fd)
    Dt, It = model.knn(xq[:3], 20, f)
    assert_same_neighbours(Dg, Ig, Dt, It)
    assert ((Ig != NO_ID).sum(1) == n).all()
    h = client.search(name, xq[0], k=20, filter=fd)
    assert len(h.ids) == n  # the client strips padding


def test_payloads_and_vectors_in_results(client, server, main_col):
    name, model, xq = main_col
    h = client.search(name, xq[5], k=7, ef=64, with_payloads=True, with_vectors=True)
    assert len(h.ids) == 7 and len(h.payloads) == 7 and h.vectors.shape == (7, D)
    for i, p, v in zip(h.ids.view(np.uint64).tolist(), h.payloads, h.vectors):
        assert model.pts[i][1] == p and model.pts[i][0].tobytes() == v.tobytes()
    # k beyond the number of matches: padding rows carry "" payloads and zero vectors on the wire
    fd = {"must": [{"key": "color", "equals": "red"}, {"key": "cat", "equals": 4}, {"key": "flag", "equals": True}]}
    n_match = sum(ref_eval(to_filter(fd), p) for _, p in model.pts.values())
    assert n_match > 0
    h = client.search(name, xq[5], k=n_match + 7, with_payloads=True, with_vectors=True, filter=fd)
    n = len(h.ids)
    assert n == n_match and len(h.payloads) == n and h.vectors.shape == (n, D)
    # on the wire: padding is id 2**64-1, distance inf, payload "" and a zero vector
    with grpc.insecure_channel(server.address) as ch:
        req = search_pb2.SearchRequest(collection=name, k=n_match + 7, with_payloads=True, with_vectors=True,
                                       filter=convert.filter_to_proto(to_filter(fd)))
        convert.vectors_to_proto(xq[5:7], req.queries)
        resp = search_pb2_grpc.SearchStub(ch).SearchBatch(req)
    k = n_match + 7
    ids_w = np.asarray(resp.ids, np.uint64).reshape(2, k)
    dist_w = np.asarray(resp.distances).reshape(2, k)
    vec_w = convert.vectors_from_proto(resp.vectors).reshape(2, k, D)
    pad = ids_w == np.uint64(2**64 - 1)
    assert (pad.sum(1) == 7).all() and np.isinf(dist_w[pad]).all() and (vec_w[pad] == 0).all()
    assert [p for p, m in zip(resp.payloads, pad.ravel()) if m] == [""] * 14
    assert all(p for p, m in zip(resp.payloads, pad.ravel()) if not m)
    assert all(p["color"] == "red" and p["cat"] == 4 and p["flag"] for p in h.payloads)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_metrics(client, metric, index):
    name = f"metric-{metric}-{index}"
    client.create_collection(name, dimension=D, metric=metric, index=index)
    x = clustered(1500, 11)
    x *= np.random.default_rng(3).uniform(0.5, 3, (len(x), 1)).astype(np.float32)  # not normalised
    ids = np.arange(1500, dtype=np.uint64) + np.uint64(2**63)
    client.upsert(name, ids, x)
    model = Model(metric)
    model.upsert(ids, x)
    xq = clustered(30, 12) * 1.7
    Dt, It = model.knn(xq, 10)
    for phase in ("pending", "indexed"):
        Dg, Ig = client.search_batch(name, xq, k=10, ef=200)
        model.check_consistent(xq, Dg, Ig)
        if index == "exact" or phase == "pending":
            assert_same_neighbours(Dg, Ig, Dt, It, atol=1e-4)
        else:
            assert recall(Ig, It) >= 0.95
        if metric == "cosine":
            assert (Dg >= -1e-5).all() and (Dg <= 2 + 1e-5).all()
        wait_indexed(client, name)
    # returned vectors are the stored originals, not the normalised index copies
    h = client.search(name, xq[0], k=3, with_vectors=True)
    for i, v in zip(h.ids.view(np.uint64).tolist(), h.vectors):
        assert model.pts[i][0].tobytes() == v.tobytes()
    client.drop_collection(name)


# ------------------------------------------------------------------------------------------------
# Updates and deletes in every index type
# ------------------------------------------------------------------------------------------------
INDEXES = {
    "hnsw": {"type": "hnsw", "m": 16, "ef_construction": 100},
    "faiss-hnsw": {"type": "faiss", "factory": "HNSW32"},
    "faiss-ivf": {"type": "faiss", "factory": "IVF16,Flat"},  # trained once 16 * 39 = 624 points exist
    "exact": "exact",
}


def _check(client, name, model: Model, xq, exact_expected: bool, what: str, f=None, fd=None):
    Dg, Ig = client.search_batch(name, xq, k=10, ef=200, nprobe=16, filter=fd)
    model.check_consistent(xq, Dg, Ig, f)
    Dt, It = model.knn(xq, 10, f)
    if exact_expected:
        assert_same_neighbours(Dg, Ig, Dt, It)
    else:
        assert recall(Ig, It) >= 0.95, what
    return Dg, Ig


@pytest.mark.parametrize("kind", list(INDEXES))
def test_updates_and_deletes_leave_results(client, kind):
    name = f"upd-{kind}"
    client.create_collection(name, dimension=D, metric="l2", index=INDEXES[kind], shards=1)
    rng = np.random.default_rng(21)
    model = Model("l2")
    n = 2000
    x = clustered(n, 22)
    ids = np.unique(rng.integers(0, 2**64 - 1, size=n + 50, dtype=np.uint64))[:n]
    rng.shuffle(ids)
    pls = [{"g": int(i % 4)} for i in range(n)]
    xq = clustered(30, 23)
    exact_kind = kind == "exact"

    if kind == "faiss-ivf":
        # before the index is trained: everything is served from the delta, exactly
        client.upsert(name, ids[:400], x[:400], pls[:400])
        model.upsert(ids[:400], x[:400], pls[:400])
        assert wait_indexed(client, name, untrained_ok=True)["state"] == "untrained"
        client.delete(name, ids=ids[:50])
        model.delete(ids[:50])
        moved = x[50:80] + 5
        client.upsert(name, ids[50:80], moved, pls[50:80])
        model.upsert(ids[50:80], moved, pls[50:80])
        _check(client, name, model, xq, True, "untrained")
        _check(client, name, model, xq, True, "untrained+filter", to_filter({"must": [{"key": "g", "equals": 1}]}),
               {"must": [{"key": "g", "equals": 1}]})
        client.upsert(name, ids[400:], x[400:], pls[400:])
        model.upsert(ids[400:], x[400:], pls[400:])
    else:
        client.upsert(name, ids, x, pls)
        model.upsert(ids, x, pls)
    info = wait_indexed(client, name)
    assert info["indexed"] == len(model.pts) and info["pending"] == 0
    _check(client, name, model, xq, exact_kind, "indexed")

    live = np.array(sorted(model.pts), np.uint64)
    # updates: move 100 points right onto queries; the old positions must not find them any more
    upd = live[rng.choice(len(live), 100, replace=False)]
    old = np.stack([model.pts[i][0] for i in upd.tolist()])
    new = clustered(100, 24)  # 100 new places, distinct from each other
    client.upsert(name, upd, new, [{"g": 9}] * 100)
    model.upsert(upd, new, [{"g": 9}] * 100)
    # deletes: 300 by id and one payload group by filter
    rest = np.setdiff1d(live, upd)
    dele = rest[rng.choice(len(rest), 300, replace=False)]
    dele_x = np.stack([model.pts[i][0] for i in dele[:20].tolist()])
    assert client.delete(name, ids=dele) == 300
    model.delete(dele)
    gone_by_filter = [i for i, (_, p) in model.pts.items() if p == {"g": 3}]
    assert client.delete(name, filter={"must": [{"key": "g", "equals": 3}]}) == len(gone_by_filter)
    model.delete(gone_by_filter)
    deleted = np.concatenate([dele, np.array(gone_by_filter, np.uint64)]).view(np.int64)

    for phase in ("right after the writes", "after the indexer caught up"):
        Dg, Ig = _check(client, name, model, xq, exact_kind, phase)
        assert not np.isin(Ig, deleted).any()
        # the moved points are found at their new place...
        Dn, In = client.search_batch(name, new[:30], k=1, ef=200, nprobe=16)
        assert (In[:, 0] == upd[:30].view(np.int64)).mean() >= (1.0 if exact_kind else 0.9), phase
        # ...and not at the old one (any hit on a moved id must be at its new distance)
        Do, Io = client.search_batch(name, old[:30], k=10, ef=200, nprobe=16)
        model.check_consistent(old[:30], Do, Io)
        _, Iq = client.search_batch(name, dele_x, k=5, ef=200, nprobe=16)  # right where deleted points were
        assert not np.isin(Iq, deleted).any()
        # a filter on the deleted group finds nothing; on the updated group finds exactly them
        _, Ig3 = client.search_batch(name, xq[:5], k=5, filter={"must": [{"key": "g", "equals": 3}]})
        assert (Ig3 == NO_ID).all()
        f9 = {"must": [{"key": "g", "equals": 9}]}
        _check(client, name, model, xq, True, phase + " g=9", to_filter(f9), f9)
        assert len(client.get(name, dele).ids) == 0
        wait_indexed(client, name)
    info = client.describe_collection(name)
    assert info["points"] == len(model.pts) and info["indexed"] == len(model.pts)
    client.drop_collection(name)


def test_read_your_writes_before_indexing(client):
    name = "ryw"
    client.create_collection(name, dimension=32, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 200})
    rng = np.random.default_rng(31)
    # enough points that the indexer (now beside searches, not in front of them) is still busy when
    # the search comes: 20k at ef_construction 200
    x = rng.standard_normal((20000, 32)).astype(np.float32)
    ids = np.arange(20000, dtype=np.uint64) + np.uint64(2**63)
    client.upsert(name, ids[:10000], x[:10000])
    client.upsert(name, ids[10000:], x[10000:])
    D_, I = client.search_batch(name, x[-20:], k=1)     # the last points of the batch are indexed last
    info = client.describe_collection(name)
    assert info["pending"] > 20, "the indexer finished before the search; the test did not test anything"
    assert (I[:, 0] == ids[-20:].view(np.int64)).all()
    assert (D_[:, 0] <= 1e-5 * (x[-20:] ** 2).sum(1)).all()  # zero up to float rounding
    h = client.search(name, x[-1], k=1, with_vectors=True)
    assert h.ids[0] == ids[-1].view(np.int64) and h.vectors[0].tobytes() == x[-1].tobytes()
    # and a delete is visible at once too
    client.delete(name, ids=ids[-20:])
    _, I = client.search_batch(name, x[-20:], k=3)
    assert not np.isin(I, ids[-20:].view(np.int64)).any()
    client.drop_collection(name)


def test_faiss_rebuild_after_many_deletes(client, server):
    name = "rebuild"
    client.create_collection(name, dimension=D, metric="l2", index={"type": "faiss", "factory": "HNSW32"})
    x = clustered(4000, 41)
    ids = np.arange(4000, dtype=np.uint64)
    client.upsert(name, ids, x)
    model = Model("l2")
    model.upsert(ids, x)
    wait_indexed(client, name)
    xq = clustered(30, 42)
    gone = np.random.default_rng(43).choice(4000, 2600, replace=False).astype(np.uint64)
    for i in range(0, 2600, 650):  # several batches
        client.delete(name, ids=gone[i : i + 650])
    model.delete(gone)
    _check(client, name, model, xq, False, "before rebuild")
    t_end = time.monotonic() + 60
    while True:  # hidden slots are > 25 % of the index: the indexer rebuilds it without them
        info = client.describe_collection(name)
        # deletes that arrive while a rebuild runs are replayed onto the new index as hidden slots, and
        # fewer than 1024 hidden slots do not trigger another rebuild
        if "rebuilt faiss with" in server.log_tail(400) and info["shard_info"][0]["deleted_in_index"] < 1024 \
                and info["state"] == "ready":
            break
        assert time.monotonic() < t_end, f"no rebuild: {info['shard_info']}"
        time.sleep(0.1)
    assert info["indexed"] == 1400 and info["points"] == 1400
    Dg, Ig = _check(client, name, model, xq, False, "after rebuild")
    assert not np.isin(Ig, gone.view(np.int64)).any()
    # the rebuilt index takes new writes and deletes as before
    extra = clustered(300, 44)
    eids = np.arange(10_000, 10_300, dtype=np.uint64)
    client.upsert(name, eids, extra)
    model.upsert(eids, extra)
    client.delete(name, ids=eids[:100])
    model.delete(eids[:100])
    wait_indexed(client, name)
    _check(client, name, model, xq, False, "after rebuild + writes")
    client.drop_collection(name)


def test_multi_shard_merge_is_exact(client):
    name = "sharded"
    client.create_collection(name, dimension=D, metric="l2", index="exact", shards=4)
    x = clustered(3000, 51)
    ids = np.arange(3000, dtype=np.uint64) * np.uint64(7919)
    rng = np.random.default_rng(52)
    pls = [payload(i, rng) for i in range(3000)]
    client.upsert(name, ids, x, pls)
    model = Model("l2")
    model.upsert(ids, x, pls)
    xq = clustered(25, 53)
    info = client.describe_collection(name)
    assert all(s["points"] > 500 for s in info["shard_info"])
    _check(client, name, model, xq, True, "4 shards")
    fd = FILTERS["equality"]
    _check(client, name, model, xq, True, "4 shards + filter", to_filter(fd), fd)
    ids_all, _, _ = all_points(client, name, with_vectors=False)
    assert ids_all.tolist() == sorted(ids.tolist())
    client.drop_collection(name)


@pytest.mark.parametrize("kind", list(INDEXES))
def test_empty_and_tiny_collections(client, kind):
    name = f"empty-{kind}"
    client.create_collection(name, dimension=4, index=INDEXES[kind])
    D_, I = client.search_batch(name, np.ones((2, 4), np.float32), k=3)
    assert (I == NO_ID).all() and np.isinf(D_).all()
    client.upsert(name, [1], np.ones((1, 4), np.float32))
    client.delete(name, ids=[1])
    D_, I = client.search_batch(name, np.ones((2, 4), np.float32), k=3, filter={"must": [{"key": "a", "is_null": True}]})
    assert (I == NO_ID).all()
    # fewer points than k: all of them, then padding, before and after indexing
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    client.upsert(name, [10, 11, 2**63], x)
    model = Model("l2")
    model.upsert(np.array([10, 11, 2**63], np.uint64), x)
    xq = np.array([[0, 1, 2, 3.5], [8, 8, 8, 8]], np.float32)
    for _ in range(2):
        D_, I = client.search_batch(name, xq, k=5)
        Dt, It = model.knn(xq, 5)
        assert_same_neighbours(D_, I, Dt, It)
        wait_indexed(client, name, untrained_ok=True)
    client.drop_collection(name)


def test_hnsw_quality_after_update_churn(client):
    """Updates reuse the slots of hidden labels (hnswlib replace_deleted). After replacing every point's
    vector about once, recall must stay within 0.01 of a fresh hnswlib build over the same final vectors."""
    import hnswlib

    name = "churn"
    client.create_collection(name, dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 100})
    rng = np.random.default_rng(61)
    n = 4000
    x = rng.standard_normal((n, D)).astype(np.float32)
    ids = np.arange(n, dtype=np.uint64)
    client.upsert(name, ids, x)
    for _ in range(10):
        wait_indexed(client, name)
        sel = rng.choice(n, 400, replace=False)
        x[sel] = rng.standard_normal((400, D)).astype(np.float32)
        client.upsert(name, ids[sel], x[sel])
    info = wait_indexed(client, name)
    assert info["indexed"] == n and info["shard_info"][0]["deleted_in_index"] == 0  # every hidden slot reused
    xq = rng.standard_normal((200, D)).astype(np.float32)
    Dt, It = brute_knn(xq, ids, x, 10, "l2")
    _, Ig = client.search_batch(name, xq, k=10, ef=64)
    fresh = hnswlib.Index(space="l2", dim=D)
    fresh.init_index(max_elements=n, M=16, ef_construction=100, random_seed=100)
    fresh.add_items(x, np.arange(n), num_threads=1)
    fresh.set_ef(64)
    If, _ = fresh.knn_query(xq, k=10, num_threads=1)
    r_svc, r_fresh = recall(Ig, It), recall(If.astype(np.int64), It)
    assert r_svc >= r_fresh - 0.01, f"recall after churn {r_svc:.4f} vs fresh build {r_fresh:.4f}"
    _, I1 = client.search_batch(name, x, k=1, ef=200)
    assert (I1[:, 0] == ids.view(np.int64)).mean() >= 0.995  # points findable by their own vector
    client.drop_collection(name)


@pytest.mark.parametrize("kind", [*INDEXES, "faiss-ivfpq"])
def test_exact_param_is_exact_for_every_index_kind(client, kind):
    """``params.exact`` ("ignore the index and search exactly") gives the brute-force answer whatever
    the index: also for IVF (whose vectors are looked up by id) and IVF-PQ (whose codes are lossy)."""
    name = f"exactparam-{kind}"
    index = INDEXES.get(kind, {"type": "faiss", "factory": "IVF16,PQ4x4"})
    client.create_collection(name, dimension=D, metric="l2", index=index)
    x = clustered(1500, 81)
    ids = np.arange(1500, dtype=np.uint64) * np.uint64(3) + np.uint64(2**63)
    client.upsert(name, ids, x)
    model = Model("l2")
    model.upsert(ids, x)
    wait_indexed(client, name)
    client.delete(name, ids=ids[:100])
    model.delete(ids[:100])
    xq = clustered(20, 82)
    De, Ie = client.search_batch(name, xq, k=10, exact=True)
    Dt, It = model.knn(xq, 10)
    assert_same_neighbours(De, Ie, Dt, It, atol=1e-3)
    client.drop_collection(name)


@pytest.mark.parametrize("kind", ["hnsw", "faiss-hnsw"])
def test_concurrent_writers_keep_index_and_store_consistent(client, server, kind):
    """Four clients upsert and delete overlapping ids at once. Afterwards the index serves exactly what
    the store holds: each stored point is found at distance ~0 from its stored vector, no id appears
    twice in a result row (a stale label next to the current one), and no deleted id shows up."""
    import threading

    from retrieval.client import Client

    name = f"concurrent-{kind}"
    client.create_collection(name, dimension=D, metric="l2", index=INDEXES[kind], shards=2)
    errors: list = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(server.address, timeout=60) as c:
                for step in range(40):
                    ids = rng.choice(600, size=int(rng.integers(20, 150)), replace=False).astype(np.uint64)
                    if step % 5 == 4:
                        c.delete(name, ids=ids[:30])
                    else:
                        c.upsert(name, ids, rng.standard_normal((len(ids), D)).astype(np.float32) * 3)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    ids, x, _ = all_points(client, name)
    gone = np.setdiff1d(np.arange(600, dtype=np.uint64), ids)
    for phase in ("pending", "indexed"):
        D1, I1 = client.search_batch(name, x, k=3, ef=200)
        assert (I1[:, 0] == ids.view(np.int64)).mean() >= 0.99, phase
        found = I1[:, 0] == ids.view(np.int64)
        assert (D1[found, 0] <= 1e-3).all(), f"{phase}: a point is indexed with a stale vector"
        for row in I1:
            r = row[row != NO_ID]
            assert len(set(r.tolist())) == len(r), f"{phase}: an id appears twice in one result row: {row}"
        assert not np.isin(I1, gone.view(np.int64)).any(), phase
        wait_indexed(client, name)
    info = client.describe_collection(name)
    assert info["points"] == len(ids) == info["indexed"]
    client.drop_collection(name)


def test_faiss_rebuild_under_concurrent_writes(client, server):
    """Rebuilds (triggered by hidden slots) while two clients keep updating and deleting: the swap
    replays what changed meanwhile, so afterwards index and store agree."""
    import threading

    from retrieval.client import Client

    name = "rebuild-concurrent"
    client.create_collection(name, dimension=D, metric="l2", index={"type": "faiss", "factory": "HNSW32"})
    n = 3000
    rng0 = np.random.default_rng(90)
    client.upsert(name, np.arange(n, dtype=np.uint64), rng0.standard_normal((n, D)).astype(np.float32) * 3)
    wait_indexed(client, name)
    errors: list = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(server.address, timeout=60) as c:
                for step in range(60):
                    ids = rng.choice(n, size=int(rng.integers(100, 300)), replace=False).astype(np.uint64)
                    if step % 3 == 2:
                        c.delete(name, ids=ids[:100])
                    else:
                        c.upsert(name, ids, rng.standard_normal((len(ids), D)).astype(np.float32) * 3)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (91, 92)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    info = wait_indexed(client, name)
    assert f"shard {name}/0: rebuilt faiss" in server.log_path.read_text(), \
        "no rebuild happened; the test did not test anything"
    ids, x, _ = all_points(client, name)
    gone = np.setdiff1d(np.arange(n, dtype=np.uint64), ids)
    assert info["points"] == info["indexed"] == len(ids)
    D1, I1 = client.search_batch(name, x, k=3, ef=200)
    found = I1[:, 0] == ids.view(np.int64)
    assert found.mean() >= 0.99 and (D1[found, 0] <= 1e-3).all()
    assert not np.isin(I1, gone.view(np.int64)).any()
    for row in I1:
        assert len(set(row[row != NO_ID].tolist())) == (row != NO_ID).sum()
    client.drop_collection(name)
