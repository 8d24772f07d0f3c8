"""Congruence: the service answers like hnswlib / faiss used directly with the same parameters.

On the shipped BIGANN-10k (L2) and GloVe-10k (ip and cosine, the ``glove`` fixture's split), a server
started with ``RETRIEVAL_INDEXING__THREADS=1`` (sequential insertion, same order as the upload) is
compared with the library called in-process: hnswlib (M=16, ef_construction=200, random_seed=100)
and faiss ``IndexHNSWFlat(d, 32)`` (efConstruction 40, faiss's default, as the service's "HNSW32").

hnswlib: neighbours must be identical (ties in distance tolerated), and distances equal.

faiss: identity is not reachable, and the reason is faiss's, not the service's. ``IndexHNSW.add``
inserts each call's points in a shuffled order (highest level first, then a permutation drawn from a
fixed-seed generator per call), so the same vectors added in one call or in several give different
graphs. The service adds in time-sliced chunks as its indexer catches up, the library test in one
call. ``test_faiss_hnsw_depends_on_add_batches`` demonstrates this on the library alone; the service
is then held to what faiss itself varies by: recall@10 within 0.01 of the library at every ef,
per-query agreement at least as good as one-call vs chunked faiss (minus 0.03), and identical
neighbours where the search has converged (ef = 200).
"""

from __future__ import annotations

import faiss
import hnswlib
import numpy as np
import pytest

from retrieval.client import Client
from retrieval.server.process import ServerProcess
from tests.reference import exact_knn, recall
from tests.vectors.helpers import wait_indexed

K = 10
EFS = (10, 40, 200)


@pytest.fixture(scope="module")
def seq_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("congruence") / "data",
                        env={"RETRIEVAL_INDEXING__THREADS": "1", "OMP_NUM_THREADS": "1"})
    srv.start()
    with Client(srv.address, timeout=300) as c:
        yield c
    srv.stop()


def recall_at(I: np.ndarray, gt: np.ndarray) -> float:
    return recall(I, gt, K)


def exact_gt(xb, xq, metric):
    return exact_knn(xq, xb, K, metric)[1]


def service_results(client, name, metric, index, xb, xq):
    client.create_collection(name, dimension=xb.shape[1], metric=metric, index=index)
    client.upsert(name, np.arange(len(xb)), xb)  # one batch: ids = row numbers, insertion in row order
    wait_indexed(client, name, timeout=600)
    out = {ef: client.search_batch(name, xq, k=K, ef=ef) for ef in EFS}
    client.drop_collection(name)
    return out


def hnswlib_results(xb, xq, metric):
    p = hnswlib.Index(space=metric, dim=xb.shape[1])
    p.init_index(max_elements=len(xb), M=16, ef_construction=200, random_seed=100)
    p.add_items(xb, np.arange(len(xb)), num_threads=1)
    out = {}
    for ef in EFS:
        p.set_ef(ef)
        I, D = p.knn_query(xq, k=K, num_threads=1)
        out[ef] = (D.astype(np.float32), I.astype(np.int64))
    return out


def faiss_index(xb, metric, chunks=None):
    faiss.omp_set_num_threads(1)
    idx = faiss.IndexHNSWFlat(xb.shape[1], 32, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    if chunks is None:
        idx.add(xb)
    else:
        for i in range(0, len(xb), chunks):
            idx.add(xb[i : i + chunks])
    return idx


def faiss_results(idx, xq, metric):
    out = {}
    for ef in EFS:
        idx.hnsw.efSearch = ef
        D, I = idx.search(xq, K)
        out[ef] = ((D if metric == "l2" else 1 - D).astype(np.float32), I.astype(np.int64))
    return out


def assert_identical(svc, lib, tol=1e-5):
    """Same neighbours in the same order, except where distances tie; same distances."""
    for ef in svc:
        Ds, Is = svc[ef]
        Dl, Il = lib[ef]
        np.testing.assert_allclose(Ds, Dl, rtol=tol, atol=tol, err_msg=f"ef={ef}: distances differ")
        differ = Is != Il
        if differ.any():
            rows, cols = np.nonzero(differ)
            for r, c in zip(rows, cols):  # a swap is fine only between equal distances
                tied = np.abs(Dl[r] - Dl[r, c]) <= tol * max(1.0, abs(Dl[r, c]))
                assert Is[r, c] in Il[r][tied], f"ef={ef} query {r}: {Is[r]} vs library {Il[r]}"


def agreement(I1, I2) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(I1, I2)]))


# ------------------------------------------------------------------------------------------------
def _datasets(bigann, glove):
    xb, xq, gt = bigann
    gb, gq = glove
    return {"bigann-l2": (xb, xq, gt[:, :K], "l2"),
            "glove-ip": (gb, gq, exact_gt(gb, gq, "ip"), "ip"),
            "glove-cosine": (gb, gq, exact_gt(gb, gq, "cosine"), "cosine")}


@pytest.mark.parametrize("case", ["bigann-l2", pytest.param("glove-ip", marks=pytest.mark.slow),
                                  pytest.param("glove-cosine", marks=pytest.mark.slow)])
def test_hnsw_matches_hnswlib(seq_server, bigann, glove, case):
    xb, xq, gt, metric = _datasets(bigann, glove)[case]
    svc = service_results(seq_server, f"cong-hnsw-{case}", metric,
                          {"type": "hnsw", "m": 16, "ef_construction": 200}, xb, xq)
    lib = hnswlib_results(xb, xq, metric)
    assert_identical(svc, lib)
    for ef in EFS:
        rs, rl = recall_at(svc[ef][1], gt), recall_at(lib[ef][1], gt)
        assert abs(rs - rl) <= 0.01, f"ef={ef}: service recall {rs:.4f}, hnswlib {rl:.4f}"
    assert recall_at(svc[200][1], gt) >= 0.99


@pytest.mark.parametrize("case", ["bigann-l2", pytest.param("glove-ip", marks=pytest.mark.slow)])
def test_faiss_hnsw_matches_faiss(seq_server, bigann, glove, case):
    xb, xq, gt, metric = _datasets(bigann, glove)[case]
    svc = service_results(seq_server, f"cong-faiss-{case}", metric, {"type": "faiss", "factory": "HNSW32"}, xb, xq)
    lib = faiss_results(faiss_index(xb, metric), xq, metric)
    lib_chunked = faiss_results(faiss_index(xb, metric, chunks=256), xq, metric)
    for ef in EFS:
        rs, rl = recall_at(svc[ef][1], gt), recall_at(lib[ef][1], gt)
        assert abs(rs - rl) <= 0.01, f"ef={ef}: service recall {rs:.4f}, faiss {rl:.4f}"
        # the service agrees with faiss at least as well as faiss agrees with itself across add batches
        floor = agreement(lib_chunked[ef][1], lib[ef][1]) - 0.03
        got = agreement(svc[ef][1], lib[ef][1])
        assert got >= min(floor, 0.99), f"ef={ef}: service/faiss agreement {got:.3f} < {floor:.3f}"
        # every returned distance is the true distance of that neighbour
        Ds, Is = svc[ef]
        q, b = xq.astype(np.float64), xb[Is].astype(np.float64)
        want = ((q[:, None] - b) ** 2).sum(-1) if metric == "l2" else 1 - (q[:, None] * b).sum(-1)
        np.testing.assert_allclose(Ds, want, rtol=1e-4, atol=1e-4)
    # converged: the same neighbours as the library (ties tolerated) on all but a few queries; the
    # service adds in chunks sized by timing, and the faiss graph depends on the add batches (see the
    # next test), so a query or two may still differ at ef=200 (seen in CI: 1 of 1000 on GloVe)
    Ds, Is = svc[200]
    Dl, Il = lib[200]
    same = np.flatnonzero(np.abs(Ds - Dl).max(1) <= 1e-4 * np.maximum(1.0, np.abs(Dl).max(1)))
    assert len(same) >= 0.995 * len(xq), f"{len(xq) - len(same)} of {len(xq)} queries differ from faiss at ef=200"
    assert_identical({200: (Ds[same], Is[same])}, {200: (Dl[same], Il[same])}, tol=1e-4)


def test_faiss_hnsw_depends_on_add_batches(bigann):
    """Evidence for the tolerance above: faiss alone gives different neighbours for one add call vs
    chunks of 256 (same vectors, same order). If faiss ever becomes batch-invariant, this fails and
    the faiss congruence test should demand identity."""
    xb, xq, _ = bigann
    one = faiss_results(faiss_index(xb, "l2"), xq, "l2")
    again = faiss_results(faiss_index(xb, "l2"), xq, "l2")
    chunked = faiss_results(faiss_index(xb, "l2", chunks=256), xq, "l2")
    assert all(np.array_equal(one[ef][1], again[ef][1]) for ef in EFS)  # deterministic with one thread
    assert not np.array_equal(one[10][1], chunked[10][1])
