"""Every in-process adapter against exact search on real data, and the registry's errors."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ann import adapters
from bench.ann.adapters.base import Algorithm
from bench.ann.datasets import load
from bench.ann.metrics import distances, recall_per_query
from retrieval.errors import InvalidArgument


@pytest.fixture(scope="module")
def bigann():
    return load("bigann-10k").subset(max_n=3000)


@pytest.fixture(scope="module")
def glove():
    return load("glove-50-10k").subset(max_n=3000, max_queries=200)


def recall(ds, ids, k=10):
    return recall_per_query(ds.gt_dist, ids, distances(ds.xq, ds.xb, ids, ds.metric), k).mean()


CASES = [
    ("hnswlib", {"M": 16, "ef_construction": 100}, {"ef": 64}, 0.97),
    ("faiss-hnsw", {"M": 16, "ef_construction": 100}, {"ef": 64}, 0.97),
    ("faiss-ivf-flat", {"nlist": 32}, {"nprobe": 16}, 0.95),
    ("faiss-ivfpq", {"nlist": 16, "m": "auto", "nbits": 6}, {"nprobe": 16}, 0.55),
    ("faiss", {"factory": "IVF16,Flat"}, {"nprobe": 16}, 0.999),
    ("exact-numpy", {}, {}, 1.0),
    ("exact-torch", {}, {}, 1.0),
]


@pytest.mark.parametrize("name, build, query, min_recall", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("which", ["bigann", "glove"])
def test_adapter_recall_single_and_batch(request, name, build, query, min_recall, which):
    ds = request.getfixturevalue(which)
    alg = adapters.get(name)(ds.metric, ds.d, build, threads=1)
    try:
        alg.fit(ds.xb)
        alg.set_query_params(query)
        single = np.stack([alg.query(q, 10) for q in ds.xq])
        batch = alg.batch_query(ds.xq, 10)
        assert single.shape == batch.shape == (ds.nq, 10)
        assert single.dtype == np.int64 or np.issubdtype(single.dtype, np.integer)
        r = recall(ds, single)
        assert r >= min_recall, f"{name} recall {r:.3f} < {min_recall}"
        assert recall(ds, batch) >= min_recall
        assert alg.index_bytes() > 0
        assert "(" in alg.describe()
    finally:
        alg.close()


def test_more_search_effort_gives_more_recall(bigann):
    alg = adapters.get("faiss-ivf-flat")("l2", bigann.d, {"nlist": 64})
    alg.fit(bigann.xb)
    rs = []
    for nprobe in (1, 4, 64):
        alg.set_query_params({"nprobe": nprobe})
        rs.append(recall(bigann, alg.batch_query(bigann.xq, 10)))
    assert rs[0] < rs[1] < rs[2] == 1.0


def test_registry_and_parameter_errors():
    assert {"hnswlib", "faiss-hnsw", "faiss-ivf-flat", "faiss-ivfpq", "faiss", "exact-numpy", "exact-torch"} <= set(
        adapters.names()
    )
    with pytest.raises(InvalidArgument, match="unknown algorithm 'annoy'; valid: .*hnswlib"):
        adapters.get("annoy")
    with pytest.raises(InvalidArgument, match="has no build parameter.*'efc'.*valid: \\['M', 'ef_construction', 'seed'\\]"):
        adapters.get("hnswlib")("l2", 8, {"M": 8, "efc": 10})
    alg = adapters.get("faiss-ivfpq")("l2", 10, {"nlist": 2, "m": 3})
    with pytest.raises(InvalidArgument, match="m=3 must divide the dimension 10"):
        alg.fit(np.random.default_rng(0).standard_normal((200, 10)).astype(np.float32))
    h = adapters.get("hnswlib")("l2", 4, {"M": 8, "ef_construction": 20})
    h.fit(np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32))
    with pytest.raises(InvalidArgument, match="has no query parameter"):
        h.set_query_params({"nprobe": 3})
    with pytest.raises(InvalidArgument, match="parameter 'ef' must be int"):
        h.set_query_params({"ef": "many"})


def test_a_new_algorithm_is_one_short_class():
    """The interface is complete: a class implementing only the declared methods runs in the benchmark."""

    class Random(Algorithm):
        name = "random-test"

        def fit(self, xb):
            self.n = len(xb)

        def set_query_params(self, params):
            pass

        def query(self, q, k):
            return np.arange(k, dtype=np.int64) % self.n

        def batch_query(self, xq, k):
            return np.stack([self.query(q, k) for q in xq])

        def index_bytes(self):
            return 0

        def close(self):
            pass

    r = Random("l2", 4, {})
    r.fit(np.zeros((5, 4), np.float32))
    assert r.batch_query(np.zeros((2, 4), np.float32), 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(TypeError):  # leaving a method out is caught at construction, not at run time

        class Broken(Algorithm):
            name = "broken"

            def fit(self, xb):
                pass

        Broken("l2", 4, {})
    with pytest.raises(InvalidArgument, match="does not support metric 'hamming'"):
        Random("hamming", 4, {})
