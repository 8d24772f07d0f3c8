r"""Per-graph tuning of FastRP's iteration weights, beta, propagation variant and dimension.

Paper: H. Chen, S. F. Sultan, Y. Tian, M. Chen, S. Skiena, "Fast and Accurate Network Embeddings via
Very Sparse Random Projection", CIKM 2019: the authors choose the iteration weights ``alpha_1..alpha_k``
and the normalisation strength ``beta`` per graph by a search scored on held-out data. This module does
the same, cheaply, for :func:`retrieval.graph.fastrp.fastrp` (see its docstring for the equations)::

    E(alpha) = sum_i alpha_i T_i,   T_i = nrm(N_i),  N_i = S N_{i-1},  N_0 = [D^beta R | X Q]
    E       <- (E - mean) / std    column-wise (standardize=True)

For one *setting* (dim, beta, property_ratio, propagation variant) the terms ``T_1..T_K`` are computed
once (K sparse x dense products); every weight vector is then a linear combination of stored terms, so
trying a weight vector costs no propagation. Only the rows the validation task reads are kept
(``[rows, d]`` per term), and the column mean / std of the standardisation are estimated on a uniform
sample of nodes that is part of those rows.

Why windows of high powers: spectrally, ``T_i`` is (up to the row normalisation) the random projection
of ``U lambda^i U^T``, a low-pass filter that sharpens with i; the centring of the standardisation
removes the trivial (stationary) component. A flat window ``alpha_a = ... = alpha_b = 1`` approximates a
band of the top eigenvalues better than one power, and non-negative weights (which :func:`check_params`
requires) cannot do more than such monotone filters. Sparse graphs with a slow-mixing spectrum (Cora,
CiteSeer) want powers 16-32; dense, fast-mixing ones (BlogCatalog) want powers 3-8.

Why whitening (stage 5): ``E = U f(lambda) U^T R`` is ``d`` random mixtures of the eigenvectors ``f``
lets through, each scaled by ``f(lambda)``; a regularised linear classifier under-uses the directions
that ``f`` and the mixing shrank. Partial whitening of the final columns (``FastRPParams.whiten``,
``E C^{-gamma/2}``) equalises them, and once the decay of ``f`` inside the band no longer matters, higher
powers (a sharper cut below the band) score better: hence the shift of the whitened weights. Measured
alternatives that did not help (BlogCatalog, d = 128, held-out Micro-F1 at 10 / 50%): signed weights
(damped Chebyshev approximations of a step at lambda = 0.15-0.3, degree 8-16: 0.13-0.27 / 0.15-0.32,
far below the windows' 0.36 / 0.38: a step of low degree leaks the bulk of the spectrum around 0, which
``lambda^a`` suppresses), non-negative filters with roots in the negative spectrum (``lambda^a (lambda +
r)^b``: 0.30-0.36 / 0.35-0.38, no better than the windows) and a dense Gaussian or orthogonalised
Gaussian projection instead of the sparse ``R`` (0.360 / 0.383 vs 0.360 / 0.385, three seeds).

Search (stages 1-4 at a reduced ``search_dim``, default a quarter of the dimension and at least 32: the
ranking of the candidates carries over and costs a quarter; each stage stops at ``time_limit``):

1. which powers, at the base's beta: single powers and pairs ``(a, a+1)`` over the anchors 1, 2, 3, 4,
   6, 8, 12, 16, 24, 32, ..., plus the paper's ``[0, 0, 1, 6.67]`` and GDS' ``[0, 1, 1]``; the largest
   power starts at 8 and doubles (up to ``max_power``) while the best one lies in the upper half; then
   flat windows ``[a..b]`` ending at the best one's last power or the next anchor;
2. ``beta``: a line search over the sorted ``betas`` grid from the base's beta, and the other
   propagation variant (``propagate_normalized``) at the base's beta (and ``property_ratio`` 0.5 when
   features are given), the two best shapes each; the settings of one step propagate together, side by
   side in one ``n x (settings * d)`` block, so one sparse product per power serves them all;
3. the other propagation variant at the best beta, if not tried;
4. a local refinement of the best weights (window edges +-1, a linear / quadratic ramp), twice at most;
5. the ``confirm`` best candidates (from at most two settings) at every dimension of ``dims``; the best
   of each dimension also with its final columns whitened (``whiten`` 0.5 and 1; the covariance from
   the stored rows), and the best whitened weights (when they span at most 16 powers) moved up one power
   at a time, up to 4, while that scores better; the choice is the best of the smallest dimension within
   ``dim_margin`` of the best, or the base when it scores at least as well.

The base parameters (default :class:`FastRPParams` at the first dimension) are scored exactly (by running
:func:`fastrp` on the task's graph, without extra scaling), so the chosen score is never below the base's.

Validation task: with labels (single-label int ``[n]`` with -1 = unlabeled, or multi-label 0/1 ``[n, L]``),
``folds``-fold cross-validated ridge regression (one-vs-rest, intercept; the mean over the penalties
0.01, 0.1 and 1 per training row) on the embedding rows of at most ``max_labeled`` labelled nodes; each
node predicts its true number of labels (top-k, as the paper's protocol); score = Micro-F1 (single-label:
accuracy). Ridge stands in for the logistic regression of the paper's evaluation because it is exact in
closed form: a few ms per candidate. Averaging over the penalties ranked candidates closer to the
held-out logistic regression than the best penalty did (on Cora, CiteSeer, PPI). Without (enough)
labels: link prediction; ``val_pairs`` edges are held out of the graph the terms are computed on, as many
random non-edges drawn; score = ROC-AUC of the cosine similarity of the embeddings.

Departures from the paper: the paper searches a grid over the four weights of ``A^1..A^4``; we search
windows of up to ``max_power`` powers (32 by default), which the sparse Planetoid graphs need, score
with ridge regression instead of logistic regression (speed), and may whiten the final columns (not in
the paper).

Thread-safety: :func:`tune_fastrp` is a pure function of its arguments; while it runs, the process's
BLAS is limited to ``blas_threads`` (default 1) through threadpoolctl, which other threads' BLAS calls see
too (they run single-threaded for that second or two, not wrong).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import scipy.sparse as sp

from retrieval.errors import InvalidArgument
from retrieval.graph.fastrp import (FastRPParams, check_inputs, check_params, fastrp, initial_vectors,
                                    transition_matrix, whiten_columns)
from retrieval.graph.graph import as_labels

logger = logging.getLogger(__name__)

#: the options :func:`tune_fastrp` takes besides the graph (also the keys of a job's ``tune_options``)
TUNE_OPTIONS = ("dims", "betas", "max_power", "time_limit", "max_labeled", "folds", "val_pairs", "dim_margin",
                "search_dim", "confirm", "blas_threads")
DEFAULT_BETAS = (-1.0, -0.5, 0.0, 0.5)
PAPER_WEIGHTS = (0.0, 0.0, 1.0, 6.67)
GDS_WEIGHTS = (0.0, 1.0, 1.0)
_ANCHORS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
_STAT_ROWS = 1024     # uniform sample of nodes for the standardisation's column mean / std
_MIN_LABELED = 10     # fewer labelled nodes (or < 2 classes): link prediction instead
_STAGES = 5
_WHITEN = (0.5, 1.0)  # whitening exponents tried on the best candidate of each dimension (stage 5)
_SHIFT_MAX = 4        # ... and the best whitened weights moved up by at most this many powers,
_SHIFT_MAX_LEN = 16   # when they span at most this many


# --------------------------------------------------------------------------------------------------
# validation tasks
# --------------------------------------------------------------------------------------------------
class _NodeTask:
    """Cross-validated ridge classification of labelled nodes; ``score(E_rows)`` -> Micro-F1."""

    kind = "node_classification"
    metric = "micro_f1"

    def __init__(self, lab: np.ndarray, Y: np.ndarray, n: int, rng: np.random.Generator, folds: int):
        stat = np.sort(rng.choice(n, size=min(n, _STAT_ROWS), replace=False))
        self.rows = np.union1d(lab, stat)
        self.lab_pos = np.searchsorted(self.rows, lab)
        self.stat_pos = np.searchsorted(self.rows, stat)
        self.Y = Y.astype(np.float64)                       # [m, L] 0/1, rows in the order of lab
        self.k = Y.sum(1).astype(np.int64)                  # labels per node (1 when single-label)
        perm = rng.permutation(len(lab))
        self.folds = [np.sort(perm[f::folds]) for f in range(folds)]
        # per fold: the (row, label) pairs of the true labels and each pair's row budget k
        self.truth = []
        for va in self.folds:
            r, c = np.nonzero(Y[va])
            self.truth.append((r, c, self.k[va][r]))
        self.num_labeled = len(lab)

    def score(self, Er: np.ndarray) -> float:
        X = Er[self.lab_pos].astype(np.float64)
        d = X.shape[1]
        # per-fold sums, so each training fold's centred Gram matrix is a difference, not a new product
        parts = [(X[va], self.Y[va]) for va in self.folds]
        sums = [(Xf.T @ Xf, Xf.T @ Yf, Xf.sum(0), Yf.sum(0), len(Xf)) for Xf, Yf in parts]
        tot = [sum(p[i] for p in sums) for i in range(5)]
        hits = np.zeros(len(_PENALTIES))
        eye = np.eye(d)
        for (Xv, Yv), (G, B, sx, sy, m), truth in zip(parts, sums, self.truth):
            mt = tot[4] - m
            mu, ymu = (tot[2] - sx) / mt, (tot[3] - sy) / mt
            Gc = (tot[0] - G) - mt * np.outer(mu, mu)
            Bc = (tot[1] - B) - mt * np.outer(mu, ymu)
            scale = float(mt)
            Xvc = Xv - mu
            for j, lam in enumerate(_PENALTIES):
                W = np.linalg.solve(Gc + (lam * scale) * eye, Bc)
                hits[j] += _topk_hits(Xvc @ W + ymu, *truth)
        # the mean over the penalties: it ranks candidates closer to the held-out logistic regression than
        # the best penalty does (which also favours unscaled embeddings that need a tiny penalty)
        return float(hits.mean() / self.k.sum())


_PENALTIES = (0.01, 0.1, 1.0)  # ridge penalties per training row (a standardised column has unit variance)


def _topk_hits(P: np.ndarray, r: np.ndarray, c: np.ndarray, k: np.ndarray) -> int:
    """How many true labels ``(r, c)`` are among the top-``k`` scores of their row of ``P`` (a true label
    is in when fewer than ``k`` labels of its row score strictly higher)."""
    higher = (P[r] > P[r, c][:, None]).sum(1)
    return int((higher < k).sum())


class _LinkTask:
    """Held-out edges vs random non-edges; ``score(E_rows)`` -> ROC-AUC of the cosine similarity."""

    kind = "link_prediction"
    metric = "auc"

    def __init__(self, A: sp.csr_matrix, rng: np.random.Generator, val_pairs: int):
        n = A.shape[0]
        directed = (A != A.T).nnz > 0
        C = sp.coo_matrix(A)
        keep = (C.row != C.col) & ((C.row < C.col) | directed)
        u, v = C.row[keep].astype(np.int64), C.col[keep].astype(np.int64)
        m = len(u)
        if m < 20:
            raise InvalidArgument(f"tuning needs node labels or at least 20 edges to hold out, the graph has {m}")
        npos = int(min(val_pairs, max(1, m // 10)))
        pick = rng.choice(m, size=npos, replace=False)
        pu, pv = u[pick], v[pick]
        drop = sp.csr_matrix((np.ones(npos, np.float32), (pu, pv)), shape=A.shape)
        if not directed:
            drop = drop + drop.T
        At = A - A.multiply(drop > 0)
        At.eliminate_zeros()
        self.A = sp.csr_matrix(At, dtype=np.float32)
        keys = np.unique(np.concatenate([u * n + v, v * n + u]))
        nu, nv = _non_edges(keys, n, npos, rng)
        stat = rng.choice(n, size=min(n, _STAT_ROWS), replace=False)
        self.rows = np.unique(np.concatenate([pu, pv, nu, nv, stat]))
        self.stat_pos = np.searchsorted(self.rows, np.sort(stat))
        self.pairs = [np.searchsorted(self.rows, x) for x in (pu, pv, nu, nv)]
        self.num_pos = npos

    def score(self, Er: np.ndarray) -> float:
        X = Er.astype(np.float64)
        nrm = np.linalg.norm(X, axis=1)
        nrm[nrm == 0] = 1.0
        X = X / nrm[:, None]
        a, b, c, d = self.pairs
        pos = np.einsum("ij,ij->i", X[a], X[b])
        neg = np.einsum("ij,ij->i", X[c], X[d])
        return _auc(pos, neg)


def _non_edges(keys: np.ndarray, n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random ordered pairs ``u != v`` whose key ``u * n + v`` is not in the sorted ``keys``."""
    us, vs = [], []
    got = 0
    for _ in range(100):
        u = rng.integers(0, n, size=2 * count)
        v = rng.integers(0, n, size=2 * count)
        kk = u * n + v
        pos = np.minimum(np.searchsorted(keys, kk), len(keys) - 1)
        ok = (u != v) & (keys[pos] != kk)
        us.append(u[ok])
        vs.append(v[ok])
        got += int(ok.sum())
        if got >= count:
            break
    if got < count:
        raise InvalidArgument("the graph is too dense to sample non-edges for link-prediction tuning")
    return np.concatenate(us)[:count], np.concatenate(vs)[:count]


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    npos, nneg = len(pos), len(neg)
    return float((r[:npos].sum() - npos * (npos + 1) / 2) / (npos * nneg))


# --------------------------------------------------------------------------------------------------
# terms of one setting, computed once
# --------------------------------------------------------------------------------------------------
class _Group:
    """Settings propagated together: their ``N_0`` side by side, so one sparse product per power serves
    all of them; keeps the stored rows of each setting's ``T_1..T_K`` and their prefix sums."""

    def __init__(self, S, deg, X, params: list[FastRPParams], rows: np.ndarray):
        blocks = [initial_vectors(deg, p, X) for p in params]
        self.cols = np.cumsum([0] + [blk.shape[1] for blk in blocks])
        self.N = blocks[0] if len(blocks) == 1 else np.ascontiguousarray(np.hstack(blocks))
        del blocks
        self.S, self.rows = S, rows
        self.variants = [p.propagate_normalized for p in params]
        self.T: list[list[np.ndarray]] = [[] for _ in params]
        self.C: list[list[np.ndarray]] = [[] for _ in params]  # C[b][k] = T_1 + ... + T_{k+1} of block b
        self.K = 0

    def upto(self, K: int, check_cancelled=None) -> None:
        while self.K < K:
            if check_cancelled is not None:
                check_cancelled()
            self.N = np.asarray(self.S @ self.N, dtype=np.float32)
            for b, variant in enumerate(self.variants):
                cols = slice(self.cols[b], self.cols[b + 1])
                if variant:  # GDS: the normalised rows are what the next power averages
                    _row_normalize(self.N[:, cols])
                    t = self.N[self.rows, cols]
                else:        # paper: normalise only the copy that is summed
                    t = _row_normalize(self.N[self.rows, cols])
                self.T[b].append(t)
                self.C[b].append(t if not self.C[b] else self.C[b][-1] + t)
            self.K += 1

    def combine(self, b: int, w: tuple[float, ...], stat_pos: np.ndarray) -> np.ndarray:
        """``sum_i w_i T_i`` of block ``b`` on the stored rows, standardised by the ``stat_pos`` rows."""
        T, C = self.T[b], self.C[b]
        nz = [i for i, x in enumerate(w) if x]
        if all(w[i] == w[nz[0]] for i in nz) and nz[-1] - nz[0] + 1 == len(nz):  # a flat window: prefix sums
            E = C[nz[-1]] - C[nz[0] - 1] if nz[0] > 0 else C[nz[-1]].copy()
        else:
            E = np.zeros_like(T[0])
            for i in nz:
                E += np.float32(w[i]) * T[i]
        return _standardize_by(E, stat_pos)


def _standardize_by(E: np.ndarray, stat_pos: np.ndarray) -> np.ndarray:
    """``E`` with its columns standardised by the mean / std of the rows ``stat_pos`` (a new array)."""
    st = E[stat_pos]
    sd = st.std(0)
    sd[sd == 0] = 1.0
    return (E - st.mean(0)) / sd


def _row_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


# --------------------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------------------
def _window(a: int, b: int) -> tuple[float, ...]:
    """Flat weights on the powers ``a..b`` (1-based)."""
    return tuple(0.0 if i < a else 1.0 for i in range(1, b + 1))


def _coarse(lo: int, hi: int) -> list[tuple[float, ...]]:
    """Single anchor powers and pairs ``(a, a + 1)`` whose largest power is in ``(lo, hi]``."""
    out = []
    for a in _ANCHORS:
        if lo < a <= hi:
            out.append(_window(a, a))
        if lo < a + 1 <= hi:
            out.append(_window(a, a + 1))
    if lo < 4 <= hi:
        out.append(PAPER_WEIGHTS)
    if lo < 3 <= hi:
        out.append(GDS_WEIGHTS)
    return out


def _windows(c: int, hi: int) -> list[tuple[float, ...]]:
    """Flat windows ending at the power ``c`` or at the next anchor above it (<= ``hi``), starting at an
    anchor between a quarter of the end and the end."""
    ends = [c] + [a for a in _ANCHORS if c < a <= hi][:1]
    return [_window(a, b) for b in ends for a in _ANCHORS if b / 4 <= a < b]


def _trim(w) -> tuple[float, ...]:
    w = [float(x) for x in w]
    while w and w[-1] == 0.0:
        w.pop()
    return tuple(w)


def _refinements(w: tuple[float, ...], max_power: int) -> list[tuple[float, ...]]:
    nz = [i for i, x in enumerate(w) if x > 0]
    a, b = nz[0], nz[-1]
    top = max(w)
    out = []
    if a > 0:
        out.append(tuple(top if i == a - 1 else x for i, x in enumerate(w)))        # window starts one earlier
    if b + 1 < max_power:
        out.append(tuple(w) + (top,))                                              # ... ends one later
    if b > a:
        out.append(tuple(0.0 if i == a else x for i, x in enumerate(w)))           # starts one later
        out.append(tuple(w[:b]))                                                   # ends one earlier
        for gamma in (1.0, 2.0):                                                   # ramps towards the top power
            out.append(tuple(x * ((i + 1) / (b + 1)) ** gamma for i, x in enumerate(w)))
    return [_trim(c) for c in out if any(c)]


# --------------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------------
class _TimeUp(Exception):
    pass


def _limit_blas_threads(fn):
    """Run ``fn`` with at most ``blas_threads`` BLAS threads (keyword, default 1; None: leave them), through
    threadpoolctl when installed."""

    @functools.wraps(fn)
    def run(*args, blas_threads: int | None = 1, **kwargs):
        limit = contextlib.nullcontext()
        if blas_threads is not None:
            blas_threads = _check_int(blas_threads, "blas_threads", 1, 1024)
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # not installed: the BLAS keeps its threads
                pass
            else:
                limit = threadpool_limits(limits=blas_threads, user_api="blas")
        with limit:
            return fn(*args, **kwargs)

    return run


@_limit_blas_threads
def tune_fastrp(
    adj,
    labels=None,
    features=None,
    *,
    base: FastRPParams | None = None,
    dims=None,
    betas=DEFAULT_BETAS,
    max_power: int = 32,
    seed: int = 0,
    time_limit: float | None = None,
    max_labeled: int = 2000,
    folds: int = 3,
    val_pairs: int = 1000,
    dim_margin: float = 0.002,
    search_dim: int | None = None,
    confirm: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> tuple[FastRPParams, dict]:
    """Choose FastRP parameters for the graph ``adj`` by a small search scored on a validation task.

    ``labels``: None, a :class:`~retrieval.graph.graph.Labels`, int ``[n]`` (-1 = unlabeled) or 0/1
    ``[n, L]``: node classification on the labelled nodes (pass only the labels you may tune on: the
    nodes you will evaluate on must be unlabeled here); without labels, or with fewer than 10 labelled
    nodes or 2 classes, link prediction on held-out edges. ``features``: ``n x f`` node features; when given,
    ``property_ratio`` 0.5 is tried too. ``base``: the starting parameters, scored as they are (default
    ``FastRPParams(dim=dims[0])``); its ``s`` is kept. ``dims``: the dimensions to choose from (default:
    ``base.dim`` only). ``betas``: the beta grid of the line search. ``max_power``: the largest power (number of iterations) tried, 1..100. ``seed``: the FastRP seed of
    every candidate and of the validation split. ``time_limit``: seconds; the search stops there with
    the best so far (the report says ``stopped_early``). ``max_labeled`` / ``folds``: labelled nodes used
    and cross-validation folds; ``val_pairs``: held-out edges for link prediction. ``dim_margin``: how
    much a larger dimension must add to the score to be chosen. ``search_dim``: the dimension stages 1-4
    run at (default ``min(dims[0], max(32, dims[0] // 4))``: the ranking of the candidates carries over,
    at a fraction of the cost); the ``confirm`` best of them are then scored at every dimension of
    ``dims`` (stage 5), and the choice is made among those (and the base) only. Stage 5 always scores
    at least the best candidate at ``dims[0]``, even past ``time_limit``.

    Returns ``(params, report)``: ``params`` with ``normalize=True, standardize=True`` and ``whiten`` 0,
    0.5 or 1 (unless the base won), the weights trimmed of trailing zeros; ``report``: task, metric, the
    base's and the chosen score, the chosen parameters, the number of candidates, seconds (propagation / scoring),
    the five best candidates of the search, the confirmed ones and where the search stopped early (or
    None). Deterministic for a seed. ``blas_threads``: BLAS threads while the search runs (through
    threadpoolctl when installed; None: leave them): its products are small, and a BLAS thread pool
    only adds synchronisation (2-10x slower on a shared 2-core machine). Memory: the sparse graph, one
    ``n x (settings * search_dim)`` block being propagated (and the best setting's), and ``K`` stored
    terms of at most ``max_labeled + 1024`` rows per setting kept.
    """
    t_start = time.perf_counter()
    A, X = check_inputs(adj, features)
    n = A.shape[0]
    dims = _check_dims(dims, base)
    if base is None:
        base = FastRPParams(dim=dims[0], seed=seed)
    base = replace(base, dim=dims[0], seed=int(seed))
    check_params(base, n, X is not None)
    betas = _check_betas(betas)
    max_power = _check_int(max_power, "max_power", 1, 100)
    folds = _check_int(folds, "folds", 2, 10)
    max_labeled = _check_int(max_labeled, "max_labeled", _MIN_LABELED, 10**7)
    val_pairs = _check_int(val_pairs, "val_pairs", 10, 10**7)
    if time_limit is not None:
        time_limit = _check_seconds(time_limit)
    dim_margin = _check_margin(dim_margin)
    if search_dim is not None:
        search_dim = _check_int(search_dim, "search_dim", 1, 4096)
    confirm = _check_int(confirm, "confirm", 1, 100)

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7475]))
    task, fallback = _make_task(A, labels, n, rng, max_labeled, folds, val_pairs)
    A_task = task.A if isinstance(task, _LinkTask) else A
    ds = min(dims[0], max(32, dims[0] // 4)) if search_dim is None else search_dim
    S, deg = transition_matrix(A_task)
    deadline = None if time_limit is None else t_start + float(time_limit)
    scored: dict[tuple, float] = {}
    timing = {"propagation": 0.0, "scoring": 0.0}
    cache: dict[tuple, tuple[_Group, int]] = {}  # setting -> (its group, its block)

    def tick():
        if check_cancelled is not None:
            check_cancelled()
        if deadline is not None and time.perf_counter() > deadline:
            raise _TimeUp

    def family(dim, beta, ratio, variant) -> FastRPParams:
        return replace(base, dim=dim, beta=float(beta), property_ratio=float(ratio), propagate_normalized=variant,
                       normalize=True, standardize=True, self_influence=0.0, iteration_weights=(1.0,))

    def prepare(settings) -> None:
        """Propagate the settings not cached yet together (one group); keep the best setting's group."""
        new = [st for st in dict.fromkeys(settings) if st not in cache]
        if not new:
            return
        keep = {id(cache[best["setting"]][0])} if best["setting"] in cache else set()
        for st in [st for st, (grp, _) in cache.items() if id(grp) not in keep]:
            del cache[st]
        grp = _Group(S, deg, X, [family(*st) for st in new], task.rows)
        for b, st in enumerate(new):
            cache[st] = (grp, b)

    def score(setting, w, timed=True) -> float:
        w = _trim(w)
        key = (setting, w)
        if key not in scored:
            if timed:
                tick()
            prepare([setting])
            grp, b = cache[setting]
            t0 = time.perf_counter()
            grp.upto(len(w), check_cancelled)
            t1 = time.perf_counter()
            scored[key] = task.score(grp.combine(b, w, task.stat_pos))
            timing["propagation"] += t1 - t0
            timing["scoring"] += time.perf_counter() - t1
            if scored[key] > best["score"]:
                best.update(score=scored[key], setting=setting, weights=w)
        return scored[key]

    def ranked(setting) -> list[tuple[float, ...]]:
        return [w for (st, w), _ in sorted(scored.items(), key=lambda kv: -kv[1]) if st == setting]

    # the base, exactly as fastrp computes it on the task's graph
    t0 = time.perf_counter()
    E_base = fastrp(A_task, base, features=X if base.property_ratio > 0 else None)
    base_score = task.score(E_base[task.rows])  # as the base's users see it: no extra scaling
    timing["scoring"] += time.perf_counter() - t0
    del E_base
    best = {"score": -math.inf, "setting": None, "weights": None}
    stage, stopped = 0, None
    try:
        # 1. which powers: single powers and pairs (the largest doubling from 8 while the best is in the
        #    upper half), then flat windows around the best one
        stage = 1
        s1 = (ds, float(base.beta), 0.0, False)
        hi, lo = min(8, max_power), 0
        while True:
            for w in _coarse(lo, hi):
                score(s1, w)
            if 2 * len(best["weights"]) <= hi or hi >= max_power:
                break
            lo, hi = hi, min(2 * hi, max_power)
        for w in _windows(len(best["weights"]), hi):
            score(s1, w)
        _progress(progress, 1)
        # 2. beta (a line search over the sorted grid from the base's beta) and the propagation variant,
        #    the two best shapes each; the first neighbours and the other variant propagate together
        stage = 2
        shapes = ranked(s1)[:2]
        grid = sorted(set(betas) | {float(base.beta)})
        i0 = grid.index(float(base.beta))
        first = [(ds, grid[i], 0.0, False) for i in (i0 - 1, i0 + 1) if 0 <= i < len(grid)]
        first.append((ds, float(base.beta), 0.0, True))
        if X is not None:  # the feature share
            first.append((ds, float(base.beta), 0.5, False))
        prepare(first)
        for st in first:
            for w in shapes:
                score(st, w)
        for step in (-1, 1):  # further along the grid while the best beta is the last one tried
            i = i0 + 2 * step
            while 0 <= i < len(grid) and best["setting"][1] == grid[i - step]:
                b = best["setting"]
                for w in shapes:
                    score((ds, grid[i], b[2], b[3]), w)
                i += step
        _progress(progress, 2)
        # 3. the other propagation variant at the best beta, if not tried yet
        stage = 3
        b = best["setting"]
        for w in dict.fromkeys([best["weights"]] + shapes):
            score((b[0], b[1], b[2], not b[3]), w)
        _progress(progress, 3)
        # 4. local refinement of the weights
        stage = 4
        for _ in range(2):
            before = best["score"]
            for w in _refinements(best["weights"], max_power):
                score(best["setting"], w)
            if best["score"] <= before:
                break
    except _TimeUp:
        stopped = f"time_limit ({time_limit} s) reached in stage {stage}"
    _progress(progress, 4)

    # 5. the best candidates at the dimensions asked for (from at most two settings, propagated together
    #    per dimension); the choice is made among these and the base
    searched = sorted(((k, v) for k, v in scored.items() if k[0][0] == ds), key=lambda kv: -kv[1])
    picked: list[tuple] = []
    for (st, w), _ in searched:
        if len(picked) == confirm:
            break
        if st in {p[0] for p in picked} or len({p[0] for p in picked}) < 2:
            picked.append((st, w))
    final: dict[tuple, float] = {}  # (setting, weights, whitening exponent) -> score

    def score_whitened(setting, w, gamma) -> float:
        """``w`` at ``setting`` (cached), whitened with the covariance of all stored rows, standardised again."""
        tick()
        grp, b = cache[setting]
        t0 = time.perf_counter()
        E = whiten_columns(grp.combine(b, w, task.stat_pos), gamma)
        sc = task.score(_standardize_by(E, task.stat_pos))
        timing["scoring"] += time.perf_counter() - t0
        return sc

    try:
        for dim in dims:
            prepare([(dim,) + st[1:] for st, _ in picked])
            for j, (st, w) in enumerate(picked):
                key = ((dim,) + st[1:], w)
                final[key + (0.0,)] = score(*key, timed=(j > 0))  # the best one is always scored at every dim
            if not picked:  # stopped before anything was scored
                break
            # the best of this dimension with its columns (partially) whitened
            st, w, _ = max((k for k in final if k[0][0] == dim), key=final.get)
            for gamma in _WHITEN:
                final[(st, w, gamma)] = score_whitened(st, w, gamma)
            # whitening favours higher powers (it undoes the decay of f(lambda) inside the kept band): the
            # best whitened weights moved up one power at a time while that scores better (short windows only:
            # one power more hardly changes a long one)
            st, w, gamma = max((k for k in final if k[0][0] == dim), key=final.get)
            top = final[(st, w, gamma)]
            if gamma > 0 and len(w) <= _SHIFT_MAX_LEN:
                for sh in range(1, _SHIFT_MAX + 1):
                    ws = (0.0,) * sh + w
                    if len(ws) > max_power:
                        break
                    tick()
                    t0 = time.perf_counter()
                    cache[st][0].upto(len(ws), check_cancelled)
                    timing["propagation"] += time.perf_counter() - t0
                    final[(st, ws, gamma)] = sc = score_whitened(st, ws, gamma)
                    if sc <= top:
                        break
                    top = sc
    except _TimeUp:
        stopped = stopped or f"time_limit ({time_limit} s) reached in stage 5"
    _progress(progress, 5)
    chosen_key = _choose(final, dims, dim_margin)
    if chosen_key is None or base_score >= final[chosen_key]:
        params, chosen_score, chosen = base, base_score, "base"
    else:
        (dim, beta, ratio, variant), w, gamma = chosen_key
        params = replace(family(dim, beta, ratio, variant), iteration_weights=w, whiten=gamma)
        chosen_score, chosen = final[chosen_key], "search"
    check_params(params, n, X is not None)
    seconds = time.perf_counter() - t_start
    top = sorted(((k, v) for k, v in scored.items() if k[0][0] == ds), key=lambda kv: -kv[1])[:5]
    report = {
        "task": task.kind, "metric": task.metric, "fallback": fallback,
        "base_score": base_score, "score": chosen_score, "chosen": chosen, "params": params.as_dict(),
        "candidates": len(scored) + sum(1 for k in final if k[2] > 0) + 1, "search_dim": ds, "seconds": seconds,
        "seconds_propagation": timing["propagation"], "seconds_scoring": timing["scoring"],
        "stopped_early": stopped,
        "top": [{"dim": st[0], "beta": st[1], "property_ratio": st[2], "propagate_normalized": st[3],
                 "iteration_weights": list(w), "score": sc} for (st, w), sc in top],
        "confirmed": [{"dim": st[0], "beta": st[1], "property_ratio": st[2], "propagate_normalized": st[3],
                       "iteration_weights": list(w), "whiten": gamma, "score": sc}
                      for (st, w, gamma), sc in final.items()],
        "validation": ({"labeled": task.num_labeled, "folds": folds} if isinstance(task, _NodeTask)
                       else {"held_out_edges": task.num_pos, "non_edges": task.num_pos}),
    }
    logger.info("tune_fastrp: %s %s %.4f (base %.4f), %d candidates in %.2fs", task.kind, task.metric,
                chosen_score, base_score, len(scored) + 1, seconds)
    return params, report


def _choose(final: dict, dims, margin: float):
    """The best ``(setting, weights)`` of the smallest dimension whose best score is within ``margin`` of
    the best over all dimensions (None when nothing was scored)."""
    if not final:
        return None
    per_dim = {}
    for key, sc in final.items():
        d = key[0][0]
        if d not in per_dim or sc > final[per_dim[d]]:
            per_dim[d] = key
    top = max(final[k] for k in per_dim.values())
    d = min(d for d, k in per_dim.items() if final[k] >= top - margin)
    return per_dim[d]


def _make_task(A, labels, n, rng, max_labeled, folds, val_pairs):
    if labels is not None:
        L = as_labels(labels, n)
        if L.multilabel:
            lab = np.flatnonzero(np.diff(L.Y.indptr) > 0)
            Y = L.Y[lab].toarray()
        else:
            lab = np.flatnonzero(L.y >= 0)
            classes, yi = np.unique(L.y[lab], return_inverse=True)
            Y = np.zeros((len(lab), len(classes)), np.int8)
            Y[np.arange(len(lab)), yi] = 1
        if len(lab) > max_labeled:
            keep = np.sort(rng.choice(len(lab), size=max_labeled, replace=False))
            lab, Y = lab[keep], Y[keep]
        used = Y.sum(0) > 0
        Y = Y[:, used]
        if len(lab) >= _MIN_LABELED and Y.shape[1] >= 2:
            return _NodeTask(lab, Y, n, rng, folds), None
        fallback = f"{len(lab)} labelled nodes in {Y.shape[1]} classes: too few, link prediction instead"
    else:
        fallback = None
    return _LinkTask(A, rng, val_pairs), fallback


def check_tune_options(options) -> dict:
    """Validate a job's ``tune_options`` (a dict with keys from :data:`TUNE_OPTIONS`, or None); returns
    them as plain JSON values. Raises InvalidArgument naming the option."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgument(f"tune_options must be an object with keys from {list(TUNE_OPTIONS)}, got {options!r}")
    unknown = sorted(set(options) - set(TUNE_OPTIONS))
    if unknown:
        raise InvalidArgument(f"unknown tune_options {unknown}; valid: {list(TUNE_OPTIONS)}")
    out = dict(options)
    if "dims" in out:
        out["dims"] = list(_check_dims(out["dims"], None))
    if "betas" in out:
        out["betas"] = list(_check_betas(out["betas"]))
    for name, lo, hi in (("max_power", 1, 100), ("max_labeled", _MIN_LABELED, 10**7), ("folds", 2, 10),
                         ("val_pairs", 10, 10**7), ("search_dim", 1, 4096), ("confirm", 1, 100),
                         ("blas_threads", 1, 1024)):
        if name in out:
            out[name] = _check_int(out[name], name, lo, hi)
    if out.get("time_limit") is not None:
        out["time_limit"] = _check_seconds(out["time_limit"])
    if "dim_margin" in out:
        out["dim_margin"] = _check_margin(out["dim_margin"])
    return out


def _check_seconds(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise InvalidArgument(f"time_limit must be a positive number of seconds or None, got {v!r}")
    return float(v)


def _check_margin(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise InvalidArgument(f"dim_margin must be a number >= 0, got {v!r}")
    return float(v)


def _check_dims(dims, base) -> tuple[int, ...]:
    if dims is None:
        return (int(base.dim) if base is not None else 128,)
    if isinstance(dims, (int, np.integer)) and not isinstance(dims, bool):
        dims = (dims,)
    try:
        out = tuple(dims)
    except TypeError:
        raise InvalidArgument(f"dims must be a list of positive integers, got {dims!r}") from None
    if not out:
        raise InvalidArgument("dims must name at least one dimension")
    for d in out:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0:
            raise InvalidArgument(f"dims must be positive integers, got {d!r} in {list(out)}")
    return tuple(int(d) for d in dict.fromkeys(out))


def _check_betas(betas) -> tuple[float, ...]:
    try:
        out = tuple(betas)
    except TypeError:
        raise InvalidArgument(f"betas must be a list of numbers, got {betas!r}") from None
    for b in out:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or abs(b) > 4:
            raise InvalidArgument(f"betas must be finite numbers in [-4, 4], got {b!r}")
    return tuple(float(b) for b in out)


def _check_int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise InvalidArgument(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _progress(progress, stage: int) -> None:
    if progress is not None:
        progress(stage, _STAGES, "fastrp tuning")


__all__ = ["tune_fastrp", "check_tune_options", "TUNE_OPTIONS", "DEFAULT_BETAS"]
