"""References the tests check approximate methods against, written once: float64 exact k-NN in the
service's distance conventions, recall (by ids, and tie-tolerant by distance), clustered data, and a
server on a loopback port.

Distances: l2 is squared L2, ip is ``1 - <q, x>``, cosine is ``1 - cos`` (what the service returns).
The order of ip is the order of ``-<q, x>``, so references in another convention rank the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

NO_ID = -1  # the client's int64 view of the padding id 2**64 - 1


def distances(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """float64 (nq, n) distances in the service's convention."""
    q, b = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
    if metric == "l2":  # not clipped at 0: rounding may leave -1e-13 for a point's own distance
        return (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None]
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
    elif metric != "ip":
        raise ValueError(f"unknown metric {metric!r}")
    return 1 - q @ b.T


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in float64: (D (nq, k), row numbers (nq, k)), ties broken by row (stable sort)."""
    dist = distances(xq, xb, metric)
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, 1), idx


def recall(I: np.ndarray, gt: np.ndarray, k: int | None = None) -> float:
    """Mean |I_row[:k] & gt_row[:k]| / |gt_row[:k]| over rows; padding (-1) ignored, a row of ``gt``
    with no entry counts 1. ``k`` defaults to the width of ``gt``."""
    I, gt = np.asarray(I), np.asarray(gt)
    k = gt.shape[1] if k is None else k
    out = []
    for a, b in zip(I[:, :k], gt[:, :k]):
        want = set(b[b != NO_ID].tolist())
        out.append(len(set(a[a != NO_ID].tolist()) & want) / len(want) if want else 1.0)
    return float(np.mean(out))


def recall_by_distance(I: np.ndarray, D: np.ndarray, Dt: np.ndarray, k: int = 10, rtol: float = 1e-3) -> float:
    """recall@k counted by distance, so float ties do not count as misses: a returned neighbour (not
    padding) within ``rtol`` of the true k-th distance ``Dt[:, k - 1]`` is a hit."""
    kth = np.asarray(Dt)[:, k - 1 : k]
    ok = (np.asarray(I)[:, :k] != NO_ID) & (np.asarray(D)[:, :k] <= kth * (1 + rtol) + 1e-6)
    return float(ok.sum() / (len(I) * k))


def clustered(n: int, d: int, centers: int = 16, spread: float = 0.15, seed: int = 0) -> np.ndarray:
    """float32 (n, d) points around ``centers`` Gaussian centres: data with the structure real
    embeddings have (and HNSW recall on it is not trivially 1)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    return (c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


@contextlib.contextmanager
def running_server(data_dir: Path, env: dict | None = None, **kw) -> Iterator:
    """A real server process on a free loopback port, stopped on exit; ``env`` adds settings
    (``RETRIEVAL_...`` variables)."""
    from retrieval.server.process import ServerProcess

    srv = ServerProcess(Path(data_dir), env=env or {}, **kw)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
