r"""Search kernels: ANNCUR, adaptive retrieval, and dual-encoder retrieve-and-rerank.

Every kernel takes a scoring callback ``score(qidx, rows) -> float32 scores`` (``qidx[j]`` = which
query of the batch, ``rows[j]`` = which item row; one cross-encoder call per pair) and plain arrays,
and returns a :class:`KernelOutput`: for each query the rows it scored exactly and their scores, the
top-``k`` of them, and the calls spent. Each round of every kernel issues *one* scoring call for the
whole batch of queries, so the scorer can fill its batches (GPU) across queries.

Common rule: results are ranked by *exact* cross-encoder scores only; every item scored exactly
(anchor items included) stays in the final pool. Dead (deleted) rows are never returned.

ANNCUR (Yadav et al., EMNLP 2022; equations in :mod:`retrieval.crossencoder.cur`)
    ``k_i`` calls for ``C_q`` (the anchor items), ``M_hat[q] = centre(C_q) E^T``, then the top
    ``k_r`` non-anchor items by ``M_hat[q]`` are scored; top-``k`` of the ``k_i + k_r`` exact scores.
    The anchors are alive rows: after deletes the index re-solves ``E`` over its alive anchors.

Adaptive retrieval (N. Yadav, N. Monath, M. Zaheer, R. Fergus, A. McCallum, "Adaptive Retrieval
and Scalable Indexing for k-NN Search with Cross-Encoders", ICLR 2024; the test-time part, "AXN")
    Item latents ``x_j`` are fixed (here the columns of ``R``: ``x_j = R[:, j]`` in R^{k_q}, the
    item's scores against the anchor queries). With budget ``B`` in ``n_r`` rounds of
    ``ceil(B / n_r)`` items, starting from a first set ``S_1`` (anchor items, or dual-encoder
    candidates for the seeded form), round ``t`` solves the query's latent by least squares over
    everything scored so far::

        (u_q, b_q) = argmin_{u,b}  sum_{j in S_t} (x_j^T u + b - f(q, j))^2 + lambda s_1^2 ||u||^2

    and scores the ``ceil(B / n_r)`` best unscored items by ``x_j^T u_q``; ``S_{t+1}`` adds them.
    Departures: an unpenalised intercept ``b`` (the score offset, see ``cur.py``) and a ridge term
    relative to ``s_1^2`` of the centred ``X_S`` (the paper uses plain least squares over fitted
    latents; with raw ``R`` columns, ``k_q`` dimensions and fewer observations than dimensions in
    early rounds, the ridge keeps ``u_q`` stable). With ``S_1`` = the CUR anchor items and one round,
    this is ANNCUR with the ridge pseudo-inverse over the anchor queries.

Retrieve-and-rerank (the baseline)
    top-``B`` items by dual-encoder inner product, all scored, top-``k`` by exact score.

The kernels are thread-safe (pure functions of their inputs; the callback decides its own safety).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from retrieval.crossencoder.cur import query_embedding, ridge_with_intercept
from retrieval.errors import InvalidArgument

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

__all__ = [
    "ScoreFn",
    "KernelOutput",
    "cur_search",
    "adaptive_search",
    "rerank_search",
    "topk_rows",
    "round_sizes",
]


@dataclasses.dataclass
class KernelOutput:
    """Per query: ``rows`` (nq x k, -1 padded), ``scores`` (nq x k, -inf padded, exact scores, best
    first), ``calls`` (nq,) pairs scored, ``rounds`` (scoring rounds issued)."""

    rows: np.ndarray
    scores: np.ndarray
    calls: np.ndarray
    rounds: int
    scored_rows: list[np.ndarray]
    scored_scores: list[np.ndarray]


def topk_rows(values: np.ndarray, m: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``m`` largest ``values`` (1-d), best first, skipping rows where ``exclude``.

    Ties broken by the lower row. Fewer than ``m`` when fewer rows are allowed.
    """
    v = np.asarray(values, dtype=np.float64)
    if exclude is not None:
        v = np.where(exclude, -np.inf, v)
    n_ok = int(np.sum(np.isfinite(v)))
    m = min(m, n_ok)
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    if m < v.size:
        part = np.argpartition(-v, m - 1)[:m]
    else:
        part = np.arange(v.size)
    part = part[np.isfinite(v[part])]
    order = np.lexsort((part, -v[part]))
    return part[order][:m].astype(np.int64)


def _finalise(scored_rows: list[np.ndarray], scored_scores: list[np.ndarray], alive: np.ndarray,
              k: int, calls: np.ndarray, rounds: int) -> KernelOutput:
    nq = len(scored_rows)
    rows = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    for q in range(nq):
        r = scored_rows[q]
        s = scored_scores[q]
        ok = alive[r]
        r, s = r[ok], s[ok]
        # Keep one entry per row (a row is never scored twice, but be safe), best exact score first.
        order = np.lexsort((r, -s.astype(np.float64)))
        r, s = r[order], s[order]
        _, first = np.unique(r, return_index=True)
        keep = np.sort(first)
        r, s = r[keep][:k], s[keep][:k]
        rows[q, : r.size] = r
        scores[q, : s.size] = s
    return KernelOutput(rows, scores, calls, rounds, scored_rows, scored_scores)


def _score_sets(score: ScoreFn, sets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One scoring call for all queries' row sets; returns the scores split per query."""
    sizes = [len(s) for s in sets]
    if sum(sizes) == 0:
        return [np.empty(0, dtype=np.float32) for _ in sets]
    qidx = np.repeat(np.arange(len(sets)), sizes)
    rows = np.concatenate([np.asarray(s, dtype=np.int64) for s in sets])
    out = np.asarray(score(qidx, rows), dtype=np.float32)
    return list(np.split(out, np.cumsum(sizes)[:-1]))


def cur_search(score: ScoreFn, nq: int, E: np.ndarray, anchors: np.ndarray, alive: np.ndarray, k: int,
               k_r: int, block: int = 64) -> KernelOutput:
    """ANNCUR for a batch of ``nq`` queries.

    ``E``: (N x k_i) item embeddings for the anchor set ``anchors`` (k_i,), alive rows only (the index
    re-solves its factors without the deleted anchors); ``alive``: (N,) bool; ``k_r``: rerank calls
    per query (capped by the alive non-anchor items). Calls per query: ``k_i + k_r`` exactly, so
    ``k_r = alive - k_i`` scores every alive item.
    """
    anchors = np.asarray(anchors, dtype=np.int64)
    if anchors.size and not bool(alive[anchors].all()):
        raise InvalidArgument("cur_search: every anchor row must be alive (a deleted anchor would cost calls)")
    C = np.stack(_score_sets(score, [anchors] * nq)) if nq else np.empty((0, anchors.size), np.float32)
    Q = query_embedding(C)  # nq x k_i
    excl = ~alive.copy()
    excl[anchors] = True
    picks: list[np.ndarray] = []
    for s in range(0, nq, block):
        approx = Q[s : s + block] @ E.T  # b x N
        for row in approx:
            picks.append(topk_rows(row, k_r, excl) if k_r > 0 else np.empty(0, dtype=np.int64))
    exact = _score_sets(score, picks) if k_r > 0 else [np.empty(0, np.float32)] * nq
    scored_rows = [np.concatenate([anchors, p]) for p in picks]
    scored_scores = [np.concatenate([C[q], exact[q]]) for q in range(nq)]
    calls = np.array([anchors.size + p.size for p in picks], dtype=np.int64)
    return _finalise(scored_rows, scored_scores, alive, k, calls, rounds=2 if k_r > 0 else 1)


def round_sizes(budget: int, rounds: int, first: int | None = None) -> list[int]:
    """Items scored per round: ``first`` (default ``ceil(budget/rounds)``), then ``ceil(budget/rounds)``
    until the budget is spent (the last round takes the remainder)."""
    per = max(1, math.ceil(budget / max(rounds, 1)))
    sizes = [min(budget, per if first is None else first)]
    while sum(sizes) < budget:
        sizes.append(min(per, budget - sum(sizes)))
    return sizes


def adaptive_search(score: ScoreFn, nq: int, X: np.ndarray, alive: np.ndarray, k: int, budget: int,
                    rounds: int, first: Sequence[np.ndarray], ridge: float = 1e-3) -> KernelOutput:
    """Adaptive retrieval (ICLR 2024) for a batch of ``nq`` queries.

    ``X``: (N x d) item latents (``R^T``); ``first[q]``: the rows scored in round one for query ``q``
    (alive rows, at most ``budget``); later rounds follow :func:`round_sizes`. ``budget`` is capped by
    the number of alive rows. Calls per query = ``min(budget, alive rows)``.
    """
    n_alive = int(alive.sum())
    budget = min(budget, n_alive)
    X = np.asarray(X)  # a memmap becomes a plain view (no copy): cheaper fancy indexing
    per = max(1, math.ceil(budget / max(rounds, 1)))
    sets = [np.asarray(f, dtype=np.int64)[:budget] for f in first]
    got = _score_sets(score, sets)
    scored_rows = [s.copy() for s in sets]
    scored_scores = [g.copy() for g in got]
    n_rounds = 1
    dead = ~alive
    while True:
        todo = [q for q in range(nq) if scored_rows[q].size < budget]
        if not todo:
            break
        W = np.zeros((len(todo), X.shape[1]))
        for j, q in enumerate(todo):
            rows = scored_rows[q]
            W[j], _ = ridge_with_intercept(np.asarray(X[rows], dtype=np.float64), scored_scores[q], ridge)
        approx = (X @ W.T.astype(X.dtype)).T  # len(todo) x N
        picks: list[np.ndarray] = []
        for j, q in enumerate(todo):
            excl = dead.copy()
            excl[scored_rows[q]] = True
            m = min(per, budget - scored_rows[q].size)
            picks.append(topk_rows(approx[j], m, excl))
        new = _score_sets(score, picks) if todo else []
        n_rounds += 1
        progressed = False
        for j, q in enumerate(todo):
            if picks[j].size:
                progressed = True
            scored_rows[q] = np.concatenate([scored_rows[q], picks[j]])
            scored_scores[q] = np.concatenate([scored_scores[q], new[j]])
        if not progressed:
            break
    calls = np.array([r.size for r in scored_rows], dtype=np.int64)
    return _finalise(scored_rows, scored_scores, alive, k, calls, rounds=n_rounds)


def rerank_search(score: ScoreFn, nq: int, de_q: np.ndarray, de_items: np.ndarray, alive: np.ndarray,
                  k: int, budget: int, block: int = 64) -> KernelOutput:
    """Dual-encoder retrieve-and-rerank: top-``budget`` by ``de_q @ de_items^T``, all scored exactly."""
    picks: list[np.ndarray] = []
    dead = ~alive
    for s in range(0, nq, block):
        sim = de_q[s : s + block] @ de_items.T
        for row in sim:
            picks.append(topk_rows(row, budget, dead))
    got = _score_sets(score, picks)
    calls = np.array([p.size for p in picks], dtype=np.int64)
    return _finalise(picks, got, alive, k, calls, rounds=1)
