"""Input files the builder tests write, and exact answers to compare with."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.reference import exact_knn as exact  # noqa: F401 (re-exported to the builder tests)
from tests.reference import recall as id_recall  # noqa: F401
from tests.reference import recall_by_distance

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


def recall(found: np.ndarray, true_dist: np.ndarray, found_dist: np.ndarray, k: int = 10) -> float:
    """recall@k of ``found`` ids against exact answers, counted by distance (ties tolerated)."""
    return recall_by_distance(found, found_dist, true_dist, k)
