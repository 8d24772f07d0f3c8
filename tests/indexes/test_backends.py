"""Every index backend against exact search on fixed-seed data: recall, distances, removal, allowed
masks, updates (re-adding under new labels), padding, and a save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InvalidArgument
from retrieval.indexes import registry
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec, QueryParams, VectorIndex
from retrieval.indexes.exact import knn
from tests.reference import recall

D_ = 32
N = 2500
NQ = 100
K = 10

# (spec, recall@10 floor at default params, true-nearest-in-top-10 floor, distances exact?)
BACKENDS = {
    "hnsw": (HnswSpec(m=16, ef_construction=100), 0.95, 0.98, True),
    "faiss-hnsw32": (FaissSpec("HNSW32"), 0.95, 0.98, True),
    "faiss-ivf": (FaissSpec("IVF32,Flat"), 0.9, 0.95, True),
    "faiss-ivfpq": (FaissSpec("IVF16,PQ8x4"), 0.3, 0.5, False),
    "exact": (ExactSpec(), 0.999, 1.0, True),
}


def make_data(metric: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((30, D_))
    xb = (cent[rng.integers(0, 30, N)] + 0.7 * rng.standard_normal((N, D_))).astype(np.float32)
    xq = (cent[rng.integers(0, 30, NQ)] + 0.7 * rng.standard_normal((NQ, D_))).astype(np.float32)
    if metric == "ip":
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq


def true_dist(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "l2":
        return (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None]
    return 1 - q @ b.T


def exact_topk(xq, xb, metric, k, labels=None):
    dist = true_dist(xq, xb, metric)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    lab = np.arange(len(xb)) if labels is None else np.asarray(labels)
    return np.take_along_axis(dist, order, 1), lab[order]


def build(spec, metric, xb, labels=None) -> VectorIndex:
    idx = registry.create(spec, D_, metric, threads=1)
    assert isinstance(idx, VectorIndex)
    if not idx.is_trained():
        assert idx.train_size() > 0 and idx.capabilities.needs_training
        idx.train(xb)
        assert idx.is_trained() and idx.train_size() == 0
    idx.add(xb, np.arange(len(xb), dtype=np.int64) if labels is None else labels)
    return idx


def check_distances(D, I, xq, xb_of_label, metric, exact_dist: bool):
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape
    valid = I >= 0
    for r in range(len(I)):
        row = D[r][valid[r]]
        assert (np.diff(row) >= -1e-4 * max(1.0, abs(row).max())).all(), "distances not ascending"
    assert np.isinf(D[~valid]).all()
    if exact_dist and valid.any():
        rows, cols = np.nonzero(valid)
        want = np.array([true_dist(xq[r : r + 1], xb_of_label(I[r, c])[None], metric)[0, 0] for r, c in zip(rows, cols)])
        np.testing.assert_allclose(D[rows, cols], want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_against_exact(name, metric, tmp_path):
    spec, rec_floor, top1_floor, exact_dist = BACKENDS[name]
    xb, xq = make_data(metric)
    idx = build(spec, metric, xb)
    Dt, gt = exact_topk(xq, xb, metric, K)

    # --- recall and distances at default query params
    D, I = idx.search(xq, K, QueryParams())
    assert I.shape == (NQ, K) and (I >= 0).all()
    r = recall(I, gt)
    top1 = float(np.mean([gt[i, 0] in I[i] for i in range(NQ)]))
    assert r >= rec_floor, f"{name}/{metric}: recall@10 {r:.3f} < {rec_floor}"
    assert top1 >= top1_floor, f"{name}/{metric}: nearest found for {top1:.2f} of queries < {top1_floor}"
    check_distances(D, I, xq, lambda lab: xb[lab], metric, exact_dist)
    st = idx.stats()
    assert (st.live, st.hidden) == (N, 0) and st.memory_bytes > 0

    # --- query params reach the backend: ivf with every list probed is exact (flat codes)
    if name == "faiss-ivf":
        _, I_all = idx.search(xq, K, QueryParams(nprobe=32))
        assert recall(I_all, gt) >= 0.999
        _, I_one = idx.search(xq, K, QueryParams(nprobe=1))
        assert recall(I_one, gt) < recall(I_all, gt)
    if name in ("hnsw", "faiss-hnsw32"):
        _, I_big = idx.search(xq, K, QueryParams(ef=400))
        assert recall(I_big, gt) >= max(r, 0.99)

    # --- allowed mask: results stay inside it and agree with exact search over it
    rng = np.random.default_rng(1)
    allowed = rng.random(N) < 0.3
    D, I = idx.search(xq, K, QueryParams(ef=200, nprobe=32), allowed)
    got = I[I >= 0]
    assert allowed[got].all(), "a label outside the allowed mask was returned"
    _, gt_a = exact_topk(xq, xb[allowed], metric, K, np.flatnonzero(allowed))
    assert recall(I, gt_a) >= (0.95 if exact_dist else 0.35)
    # a very selective mask: at most 5 points
    few = np.zeros(N, bool)
    few[rng.choice(N, 5, replace=False)] = True
    D, I = idx.search(xq[:10], K, QueryParams(ef=64, nprobe=32), few)
    assert few[I[I >= 0]].all() and np.isinf(D[I < 0]).all()
    if name in ("hnsw", "exact"):  # these find every allowed point (graph fallback to brute force)
        assert ((I >= 0).sum(1) == 5).all()

    # --- remove 40%: removed labels never come back; recall over the rest holds
    gone = rng.choice(N, int(0.4 * N), replace=False)
    assert idx.remove(gone) == len(gone)
    assert idx.remove(gone[:10]) == 0  # removing twice counts nothing
    keep = np.setdiff1d(np.arange(N), gone)
    st = idx.stats()
    assert st.live == len(keep)
    D, I = idx.search(xq, K, QueryParams())
    assert not np.isin(I, gone).any(), "a removed label was returned"
    _, gt_k = exact_topk(xq, xb[keep], metric, K, keep)
    assert recall(I, gt_k) >= rec_floor - 0.05
    D, I = idx.search(xq, K, QueryParams(), allowed)
    assert not np.isin(I, gone).any() and allowed[I[I >= 0]].all()

    # --- update: the removed vectors come back under new labels (hnsw reuses the hidden slots)
    new_labels = np.arange(N, N + len(gone), dtype=np.int64)
    idx.add(xb[gone], new_labels)
    assert idx.stats().live == N
    D, I = idx.search(xb[gone[:50]], 1, QueryParams(ef=100, nprobe=32))
    want = new_labels[:50]
    hit = float(np.mean(I[:, 0] == want))
    assert hit >= (0.95 if exact_dist else 0.5), f"{name}: re-added vectors found under their new label {hit:.2f}"
    assert not np.isin(I, gone).any()

    def vec_of(lab):
        return xb[lab] if lab < N else xb[gone[lab - N]]

    # --- save / load round trip: same answers, same counts, removed labels still hidden
    D1, I1 = idx.search(xq, K, QueryParams())
    files = idx.save(tmp_path)
    assert files and all((tmp_path / f).exists() for f in files)
    idx2 = registry.load(spec, tmp_path, D_, metric, threads=1)
    D2, I2 = idx2.search(xq, K, QueryParams())
    assert np.array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)
    assert idx2.stats().live == idx.stats().live
    if name != "exact":  # the exact backend drops hidden rows when it saves
        assert idx2.stats().hidden == idx.stats().hidden
    assert not np.isin(I2, gone).any()
    check_distances(D2, I2, xq, vec_of, metric, exact_dist)
    if exact_dist:
        labs = np.array([int(keep[3]), N + 1, int(keep[7])])
        np.testing.assert_allclose(idx2.get_vectors(labs), np.stack([vec_of(int(l)) for l in labs]), rtol=1e-6)


@pytest.mark.parametrize("name", ["hnsw", "faiss-hnsw32", "faiss-ivf", "exact"])
def test_padding_when_fewer_than_k(name):
    spec = BACKENDS[name][0]
    xb, xq = make_data("l2")
    idx = registry.create(spec, D_, "l2", threads=1)
    if not idx.is_trained():
        idx.train(xb)
    D, I = idx.search(xq[:3], 5, QueryParams())  # empty index
    assert I.shape == (3, 5) and (I == -1).all() and np.isinf(D).all()
    idx.add(xb[:3], np.array([10, 11, 12], np.int64))
    D, I = idx.search(xq[:3], 5, QueryParams(nprobe=32))
    assert (np.sort(I[:, :3], 1) == [10, 11, 12]).all() and (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()
    idx.remove(np.array([11]))
    D, I = idx.search(xq[:3], 5, QueryParams(nprobe=32))
    assert (np.sort(I[:, :2], 1) == [10, 12]).all() and (I[:, 2:] == -1).all()


def test_knn_kernel_against_numpy():
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((500, 16)).astype(np.float32)
    xq = rng.standard_normal((20, 16)).astype(np.float32)
    mask = rng.random(500) < 0.5
    for metric in ("l2", "ip"):
        D, I = knn(xq, xb, 7, metric, mask)
        Dt, It = exact_topk(xq, xb[mask], metric, 7, np.flatnonzero(mask))
        np.testing.assert_allclose(D, Dt, rtol=1e-4, atol=1e-3)
        assert recall(I, It, 7) >= 0.99
    D, I = knn(xq, xb[:3], 5, "l2")
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()


def test_registry_errors():
    with pytest.raises(InvalidArgument, match="unknown index type 'annoy'; valid: exact, faiss, hnsw"):
        registry.spec_from_dict({"type": "annoy"})
    with pytest.raises(InvalidArgument, match="unknown index type"):
        registry.backend("annoy")
    with pytest.raises(InvalidArgument, match="unknown parameter 'M_max' for index type 'hnsw'"):
        registry.spec_from_dict({"type": "hnsw", "M_max": 16})
    assert registry.spec_from_dict({"type": "hnsw", "M": 16}) == HnswSpec(m=16)  # names in any case
    with pytest.raises(InvalidArgument, match="faiss cannot build factory string 'IVFxyz,Nope'"):
        registry.create(FaissSpec("IVFxyz,Nope"), 8, "l2")
    with pytest.raises(InvalidArgument, match="hnsw m must be in"):
        HnswSpec(m=1)
    with pytest.raises(InvalidArgument, match="factory"):
        FaissSpec("")
    for spec in (HnswSpec(m=8, ef_construction=50), FaissSpec("IVF8,PQ4", train_size=500), ExactSpec()):
        assert registry.spec_from_dict(registry.spec_to_dict(spec)) == spec
    assert registry.spec_from_dict(None) == HnswSpec() and registry.spec_from_dict("exact") == ExactSpec()
