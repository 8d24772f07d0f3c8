"""Shared helpers of the vector tests: a reference filter evaluator, brute-force k-NN over ids, and
waiting for a collection's indexer (distances and recall are :mod:`tests.reference`'s)."""

from __future__ import annotations

import time

import numpy as np

from retrieval.vectors.filters import Condition, Filter, Range
from tests.reference import NO_ID, distances, recall  # noqa: F401 (re-exported to the vector tests)

# --------------------------------------------------------------------------------------------------
# Reference filter evaluator (the documented semantics, in plain Python)
# --------------------------------------------------------------------------------------------------
_MISSING = object()


def _resolve(payload, key: str):
    cur = payload
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar_eq(x, v) -> bool:
    if isinstance(v, bool):
        return isinstance(x, bool) and x == v
    if isinstance(v, str):
        return isinstance(x, str) and x == v
    return _is_num(x) and x == v


def _in_range(x, r: Range) -> bool:
    if not _is_num(x):
        return False
    return ((r.gt is None or x > r.gt) and (r.gte is None or x >= r.gte)
            and (r.lt is None or x < r.lt) and (r.lte is None or x <= r.lte))


def ref_condition(c: Condition, payload) -> bool:
    val = _resolve(payload, c.key) if payload is not None else _MISSING
    if c.is_null is not None:
        null = val is _MISSING or val is None
        return null if c.is_null else not null
    if val is _MISSING:
        return False
    elems = val if isinstance(val, list) else [val]
    if c.equals is not None:
        return any(_scalar_eq(e, c.equals) for e in elems)
    if c.any_of is not None:
        return any(_scalar_eq(e, v) for e in elems for v in c.any_of)
    return any(_in_range(e, c.range) for e in elems)


def ref_eval(f: Filter, payload) -> bool:
    def clause(c) -> bool:
        return ref_eval(c, payload) if isinstance(c, Filter) else ref_condition(c, payload)

    if not all(clause(c) for c in f.must):
        return False
    if f.should and not any(clause(c) for c in f.should):
        return False
    return not any(clause(c) for c in f.must_not)



def to_filter(d: dict) -> Filter:
    from retrieval.vectors.filters import from_dict

    return from_dict(d)


# --------------------------------------------------------------------------------------------------
# Brute force
# --------------------------------------------------------------------------------------------------
def brute_knn(xq, ids, xb, k: int, metric: str):
    """Exact k-NN over (ids, xb) -> (D float64 (nq, k) with inf padding, I int64 (nq, k) with -1 padding)."""
    ids = np.asarray(ids, np.uint64).view(np.int64)
    nq = len(xq)
    D = np.full((nq, k), np.inf)
    I = np.full((nq, k), NO_ID, np.int64)
    if len(ids) == 0:
        return D, I
    dist = distances(xq, xb, metric)
    if metric == "l2":
        dist = np.maximum(dist, 0)  # as the service reports a point's own distance
    kk = min(k, len(ids))
    order = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    D[:, :kk] = np.take_along_axis(dist, order, 1)
    I[:, :kk] = ids[order]
    return D, I


def assert_same_neighbours(D, I, Dt, It, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Service results equal the exact ones, up to float ties: same padding, same distances, and any
    id that differs sits at a distance tied with the exact answer's."""
    D = np.asarray(D, np.float64)
    assert D.shape == Dt.shape, (D.shape, Dt.shape)
    assert ((I == NO_ID) == (It == NO_ID)).all(), "padding differs from the exact answer"
    fin = It != NO_ID
    np.testing.assert_allclose(D[fin], Dt[fin], rtol=rtol, atol=atol)
    for r in range(len(I)):
        a, b = set(I[r][fin[r]].tolist()), set(It[r][fin[r]].tolist())
        if a != b:
            # allowed only when the differing ids are tied with the k-th distance
            kth = Dt[r][fin[r]].max()
            tied = np.abs(D[r][fin[r]] - kth) <= atol + rtol * abs(kth)
            assert set(I[r][fin[r]][~tied].tolist()) <= b, f"row {r}: {sorted(a - b)} not in the exact top-k"


# --------------------------------------------------------------------------------------------------
# Server-side state
# --------------------------------------------------------------------------------------------------
def wait_indexed(client, name: str, timeout: float = 120.0, untrained_ok: bool = False) -> dict:
    """Poll describe until nothing is pending (or the index waits for training points)."""
    t_end = time.monotonic() + timeout
    while True:
        info = client.describe_collection(name)
        if info["pending"] == 0 and info["state"] == "ready":
            return info
        if untrained_ok and info["state"] == "untrained":
            return info
        if time.monotonic() > t_end:
            raise TimeoutError(f"collection {name} still has {info['pending']} pending points, state {info['state']}")
        time.sleep(0.05)


def all_points(client, name: str, with_vectors: bool = True):
    """Every stored point by scrolling: (ids uint64, vectors, payloads)."""
    ids, vecs, pls = [], [], []
    start = None
    while True:
        page = client.scroll(name, start_id=start, limit=1000, with_vectors=with_vectors, with_payloads=True)
        ids.append(page.ids)
        if with_vectors and len(page.ids):
            vecs.append(page.vectors)
        pls.extend(page.payloads)
        if page.next_id is None:
            break
        start = page.next_id
    ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
    return ids, (np.vstack(vecs) if vecs else None), pls


__all__ = ["Condition", "Filter", "Range", "ref_eval", "ref_condition", "brute_knn", "recall", "distances",
           "assert_same_neighbours", "wait_indexed", "all_points", "to_filter", "NO_ID"]
