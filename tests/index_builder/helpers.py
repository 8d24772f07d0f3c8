"""Input files the builder tests write, and exact answers to compare with."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
BIGANN = ROOT / "bench" / "datasets" / "vectors" / "bigann-128-euclidean-10k"
GLOVE = ROOT / "bench" / "datasets" / "vectors" / "glove-50-angular-10k"

#: a small HNSW so the builds of the tests take a fraction of a second
SMALL_HNSW = {"type": "hnsw", "m": 16, "ef_construction": 100}


def bigann(n: int = 3000, nq: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` BIGANN base vectors (uint8) and ``nq`` shipped queries (uint8)."""
    return np.load(BIGANN / "base.u8.npy")[:n], np.load(BIGANN / "queries.u8.npy")[:nq]


def glove(n: int = 2000, nq: int = 50) -> tuple[np.ndarray, np.ndarray]:
    x = np.load(GLOVE / "vectors.f32.npy")
    return x[:n], x[n : n + nq]


def write_vecs(path: Path, x: np.ndarray, dtype: str) -> Path:
    """TEXMEX layout: per record an int32 dimension, then the values."""
    x = np.asarray(x)
    rec = np.zeros(len(x), dtype=[("d", "<i4"), ("v", dtype, (x.shape[1],))])
    rec["d"] = x.shape[1]
    rec["v"] = x
    rec.tofile(path)
    return path


def write_hdf5(path: Path, xb: np.ndarray, xq: np.ndarray, distance: str = "euclidean") -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.create_dataset("train", data=xb)
        f.create_dataset("test", data=xq)
        f.create_dataset("neighbors", data=np.zeros((len(xq), 1), np.int64))
    return path


def write_parquet(path: Path, ids: np.ndarray, x: np.ndarray, row_group_size: int = 700) -> Path:
    """An id column, a fixed-size-list vector column and two payload columns (tag, n)."""
    d = x.shape[1]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).ravel()), d)
    n = len(ids)
    table = pa.table({"id": pa.array(np.asarray(ids, np.uint64)), "vector": vec,
                      "tag": pa.array(["even" if i % 2 == 0 else "odd" for i in range(n)]),
                      "n": pa.array(np.arange(n, dtype=np.int64))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def exact(xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64: (D, row numbers), ``metric`` l2 (squared) or cosine (1 - cos)."""
    q, b = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        dist = 1 - q @ b.T
    else:
        dist = (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :]
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, 1), idx


def recall(found: np.ndarray, true_dist: np.ndarray, found_dist: np.ndarray | None = None, k: int = 10) -> float:
    """recall@k of ``found`` ids against exact answers, a hit counted by distance (ties tolerated):
    a returned neighbour within 1e-3 (relative) of the true k-th distance counts."""
    if found_dist is None:
        raise ValueError("give found_dist")
    kth = true_dist[:, k - 1 : k]
    ok = (found[:, :k] >= 0) & (found_dist[:, :k] <= kth * (1 + 1e-3) + 1e-6)
    return float(ok.sum() / (len(found) * k))


def id_recall(found: np.ndarray, true_ids: np.ndarray, k: int = 10) -> float:
    """|found[:, :k] ∩ true[:, :k]| / k, averaged over queries."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, true_ids)]))
