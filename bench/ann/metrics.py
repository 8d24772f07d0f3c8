"""Recall, latency statistics and the Pareto frontier, as in ann-benchmarks, plus two fixes.

Distances are recomputed here in float64 from the returned ids (never taken from the algorithm), in
ann-benchmarks' units, smaller is closer:

    l2:     ||q - x||                      (Euclidean, not squared)
    cosine: 1 - <q, x> / (||q|| ||x||)     (ann-benchmarks' "angular")
    ip:     -<q, x>

recall@k (ann-benchmarks' ``knn`` metric): a returned neighbour is a hit when its distance is at most
the true k-th distance plus ``epsilon`` (absolute, default 1e-3 as in ann-benchmarks), so a neighbour
tied with the k-th true one counts and ties never lower recall:

    recall(q) = |{x in R_k(q) : dist(q, x) <= d_k(q) + epsilon}| / k

Departures from ann-benchmarks: an id returned twice counts once, and padding (``-1``) never counts
(ann-benchmarks would count a repeated true neighbour k times). ``recall_ids`` (set intersection with
the true top-k ids, the definition used in BASELINES.md) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.errors import InvalidArgument

DEFAULT_EPSILON = 1e-3


def distances(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """float64 ``(nq, m)`` distances from each query to the rows ``ids (nq, m)`` of ``xb``; ``inf`` where
    the id is ``-1`` (or otherwise outside ``[0, len(xb))``)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != len(xq):
        raise InvalidArgument(f"ids must have shape ({len(xq)}, m), got {ids.shape}")
    valid = (ids >= 0) & (ids < len(xb))
    safe = np.where(valid, ids, 0)
    out = np.empty(ids.shape, dtype=np.float64)
    chunk = max(1, (1 << 24) // max(1, ids.shape[1] * xb.shape[1]))
    for a in range(0, len(xq), chunk):
        q = np.asarray(xq[a : a + chunk], dtype=np.float64)[:, None, :]
        x = np.asarray(xb[safe[a : a + chunk]], dtype=np.float64)
        if metric == "l2":
            out[a : a + chunk] = np.sqrt(((x - q) ** 2).sum(axis=2))
        elif metric == "ip":
            out[a : a + chunk] = -(x * q).sum(axis=2)
        elif metric == "cosine":
            nq_ = np.linalg.norm(q, axis=2)
            nx = np.linalg.norm(x, axis=2)
            denom = np.where((nq_ * nx) > 0, nq_ * nx, 1.0)
            out[a : a + chunk] = 1.0 - (x * q).sum(axis=2) / denom
        else:
            raise InvalidArgument(f"metric must be l2, ip or cosine, got {metric!r}")
    out[~valid] = np.inf
    return out


def recall_per_query(
    true_dist: np.ndarray,
    run_ids: np.ndarray,
    run_dist: np.ndarray,
    k: int,
    epsilon: float = DEFAULT_EPSILON,
) -> np.ndarray:
    """float64 ``(nq,)`` recall@k of each query.

    true_dist: ``(nq, >=k)`` exact distances, ascending. run_ids / run_dist: ``(nq, m)`` the returned
    ids (``-1`` = padding) and their recomputed distances; only the first ``k`` columns count.
    """
    true_dist = np.asarray(true_dist, dtype=np.float64)
    if true_dist.ndim != 2 or true_dist.shape[1] < k:
        raise InvalidArgument(f"true distances must have shape (nq, >= {k}), got {true_dist.shape}")
    ids = np.asarray(run_ids, dtype=np.int64)[:, :k]
    dist = np.asarray(run_dist, dtype=np.float64)[:, :k]
    threshold = true_dist[:, k - 1] + epsilon
    hit = (dist <= threshold[:, None]) & (ids >= 0)
    # an id seen earlier in the same row does not count again
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, axis=1)
    dup_sorted = np.zeros_like(s, dtype=bool)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return (hit & ~dup).sum(axis=1) / float(k)


def recall_ids_per_query(true_ids: np.ndarray, run_ids: np.ndarray, k: int) -> np.ndarray:
    """``|returned top-k ∩ true top-k| / k`` per query (ids only; ties can lower it)."""
    t = np.asarray(true_ids)[:, :k]
    r = np.asarray(run_ids)[:, :k]
    return np.array([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(r, t)])


def latency_stats(seconds: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 / mean latency in milliseconds from per-query wall times in seconds."""
    s = np.asarray(seconds, dtype=np.float64) * 1e3
    if s.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    p50, p95, p99 = np.percentile(s, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(s.mean())}


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (recall, qps) points no other point beats on both axes, ordered by rising recall.

    As ann-benchmarks' ``create_pointset``: sort by QPS descending and keep each point whose recall is
    higher than that of every faster point.
    """
    pts = sorted(points, key=lambda p: (-p[1], -p[0]))
    out: list[tuple[float, float]] = []
    best = -np.inf
    for r, q in pts:
        if r > best:
            out.append((r, q))
            best = r
    return sorted(out)


def best_qps_at(points: Sequence[tuple[float, float]], min_recall: float) -> float | None:
    """Highest QPS among points with recall >= ``min_recall`` (None when no point reaches it)."""
    ok = [q for r, q in points if r >= min_recall]
    return max(ok) if ok else None
