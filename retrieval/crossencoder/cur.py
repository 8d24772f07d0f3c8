r"""CUR factorisation of the cross-encoder score matrix (ANNCUR) and its numerical kernels.

Paper: N. Yadav, N. Monath, R. Angell, M. Zaheer, A. McCallum, "Efficient Nearest Neighbor Search
for Cross-Encoder Models using Matrix Factorization", EMNLP 2022 (ANNCUR).

Notation (the paper's). ``f(q, i)`` is the cross-encoder score; ``M`` the (unknown) query x item
score matrix. Offline, with ``k_q`` anchor queries ``Q_anc`` and ``N`` items::

    R = M[Q_anc, :]                    in R^{k_q x N}     (k_q * N cross-encoder calls)
    I_anc = k_i anchor items           (columns of R)
    A = R[:, I_anc]                    in R^{k_q x k_i}   (the intersection: no extra calls)
    U = A^+                            in R^{k_i x k_q}
    E = U R                            in R^{k_i x N}     (column j = embedding of item j)

A test query ``q`` costs ``k_i`` calls, its scores against the anchor items, ``C_q = M[q, I_anc]``::

    M_hat[q, :] = C_q U R = C_q E                          (ANNCUR, eq. 2: M ~ C U R)

so the approximate scores of all items are one inner-product search with the query embedding
``C_q`` over the item embeddings ``E``. The top ``k_r`` items by ``M_hat`` are re-scored exactly
(``k_r`` more calls) and returned by their exact scores; cost per query = ``k_i + k_r``.

Departures from the paper, and why
----------------------------------
1. *Centring* (this fixture's pitfall): raw joint-encoder scores carry a large common offset (mean
   0.62, within-query std 0.09), so the raw ``R`` is ~99% rank one and ``A^+`` spends its energy on
   the offset. We centre each anchor-query row on its mean over the anchor items,
   ``mu_r = mean_{a in I_anc} R[r, a]``, ``R_c = R - mu 1^T``, ``A_c = R_c[:, I_anc]``, and use
   ``E = A_c^+ R_c``. Because ``A_c 1 = 0``, ``1^T A_c^+ = 0``: a constant shift of ``C_q`` (the
   query's own offset) drops out, so the query side is the centred ``C_q - mean(C_q)``. This is
   least squares *with an intercept* for the query's row; ranking ignores the intercept.
2. *Regularised pseudo-inverse*: a plain ``A^+`` blows up when ``k_i`` is close to ``k_q`` (tiny
   singular values). With ``A_c = P diag(s) Q^T`` (thin SVD, ``s_1`` the largest)::

       ridge:      A_c^+ = Q diag(s_j / (s_j^2 + lambda s_1^2)) P^T   (lambda relative to s_1^2)
       truncated:  A_c^+ = Q_r diag(1 / s_j) P_r^T, j <= rank and s_j > rcond * s_1
       pinv:       ridge with lambda = 0 (numpy's pinv with rcond 1e-10)

   The ridge scale is ``s_1^2`` of the *centred* matrix: ``s_1^2`` of raw scores is the offset's
   and over-regularises (SOURCE.md).
3. *Anchor items*: besides uniform sampling, spread selections that cost no calls: ``qr``
   (column-pivoted QR on the top right singular vectors of ``R_c``, the classical column-subset
   selection for CUR), ``kmeans-r`` (k-means over the items' score profiles ``R[:, j]``) and
   ``kmeans-de`` (k-means over dual-encoder item embeddings). Measured in ``bench/crossencoder``.

Storage convention: the index keeps ``R`` item-major, i.e. ``RT = R^T`` of shape ``(N, k_q)``
(``R`` in Fortran order), so adding items appends rows. Every kernel here takes ``RT``.

All kernels are plain functions of arrays and numbers; they are thread-safe (no shared state).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import scipy.linalg

from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)

SOLVERS = ("ridge", "truncated", "pinv")
ANCHOR_METHODS = ("random", "qr", "kmeans-r", "kmeans-de")

__all__ = [
    "SOLVERS",
    "ANCHOR_METHODS",
    "CurFactors",
    "regularized_pinv",
    "pinv_ridge",
    "pinv_truncated",
    "solve_cur",
    "project_items",
    "query_embedding",
    "select_anchor_items",
    "kmeans",
    "ridge_with_intercept",
    "top_eigenvalue",
    "gram",
]


# ------------------------------------------------------------------------------------------------
# Pseudo-inverses
# ------------------------------------------------------------------------------------------------
def pinv_ridge(A: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge pseudo-inverse ``Q diag(s/(s^2 + ridge*s_1^2)) P^T`` of ``A`` (m x n) -> (n x m), float64.

    ``ridge = 0`` gives the Moore-Penrose inverse (singular values below ``1e-10 s_1`` dropped).
    It is the solution operator of ``min_x ||A x - b||^2 + ridge s_1^2 ||x||^2``.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2:
        raise InvalidArgument(f"A must be a matrix, got shape {A.shape}")
    if not np.isfinite(ridge) or ridge < 0:
        raise InvalidArgument(f"ridge must be a finite number >= 0, got {ridge!r}")
    if A.size == 0:
        return np.zeros((A.shape[1], A.shape[0]))
    P, s, Qt = np.linalg.svd(A, full_matrices=False)
    s1 = s[0] if s.size else 0.0
    if s1 == 0.0:
        return np.zeros((A.shape[1], A.shape[0]))
    if ridge == 0:
        keep = s > 1e-10 * s1
        f = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    else:
        f = s / (s * s + ridge * s1 * s1)
    return (Qt.T * f) @ P.T


def pinv_truncated(A: np.ndarray, rank: int | None = None, rcond: float = 1e-6) -> np.ndarray:
    """Truncated pseudo-inverse: keep the top ``rank`` singular values that exceed ``rcond * s_1``.

    Equals ``pinv(A_r)`` for the best rank-``rank`` approximation ``A_r`` of ``A``. (n x m), float64.
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2:
        raise InvalidArgument(f"A must be a matrix, got shape {A.shape}")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
        raise InvalidArgument(f"rank must be a positive integer or None, got {rank!r}")
    if not 0 <= rcond < 1:
        raise InvalidArgument(f"rcond must be in [0, 1), got {rcond!r}")
    if A.size == 0:
        return np.zeros((A.shape[1], A.shape[0]))
    P, s, Qt = np.linalg.svd(A, full_matrices=False)
    if s[0] == 0.0:
        return np.zeros((A.shape[1], A.shape[0]))
    keep = s > rcond * s[0]
    if rank is not None:
        keep[int(rank):] = False
    f = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return (Qt.T * f) @ P.T


def regularized_pinv(A: np.ndarray, solver: str = "ridge", ridge: float = 1e-3, rank: int | None = None) -> np.ndarray:
    """Dispatch to :func:`pinv_ridge` / :func:`pinv_truncated` by ``solver`` name (``SOLVERS``)."""
    if solver == "ridge":
        return pinv_ridge(A, ridge)
    if solver == "truncated":
        return pinv_truncated(A, rank)
    if solver == "pinv":
        return pinv_ridge(A, 0.0)
    raise InvalidArgument(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")


# ------------------------------------------------------------------------------------------------
# CUR factors
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CurFactors:
    """``U`` (k_i x k_q, float64), ``mu`` (k_q,, float64), ``E`` (N x k_i, float32): see module doc."""

    anchors: np.ndarray  # (k_i,) int64 rows of the anchor items
    U: np.ndarray
    mu: np.ndarray
    E: np.ndarray


def project_items(RT_rows: np.ndarray, U: np.ndarray, mu: np.ndarray, block: int = 65536) -> np.ndarray:
    """Item embeddings ``(R_c[:, rows])^T U^T`` = rows of ``E`` for score rows ``RT_rows`` (n x k_q).

    Used for new items: no re-factorisation, only their ``k_q`` scores. Returns (n x k_i) float32.
    """
    RT_rows = np.asarray(RT_rows)
    n = RT_rows.shape[0]
    out = np.empty((n, U.shape[0]), dtype=np.float32)
    Ut = U.T.astype(np.float64)
    for s in range(0, n, block):
        blk = np.asarray(RT_rows[s : s + block], dtype=np.float64) - mu
        out[s : s + block] = (blk @ Ut).astype(np.float32)
    return out


def solve_cur(RT: np.ndarray, anchors: np.ndarray, solver: str = "ridge", ridge: float = 1e-3,
              rank: int | None = None) -> CurFactors:
    """Centred, regularised CUR: ``mu``, ``U = reg_pinv(A_c)``, ``E = R_c^T U^T`` for all N rows.

    ``RT``: (N x k_q) score matrix transposed (may be a memmap); ``anchors``: (k_i,) row indices.
    Costs no cross-encoder calls. Time O(k_q k_i^2 + N k_q k_i).
    """
    anchors = np.asarray(anchors, dtype=np.int64)
    if anchors.ndim != 1 or anchors.size == 0:
        raise InvalidArgument(f"anchors must be a non-empty 1-d array of rows, got shape {anchors.shape}")
    N = RT.shape[0]
    if anchors.min() < 0 or anchors.max() >= N:
        raise InvalidArgument(f"anchor rows must be in [0, {N}), got range [{anchors.min()}, {anchors.max()}]")
    A = np.asarray(RT[anchors], dtype=np.float64).T  # k_q x k_i
    mu = A.mean(axis=1)
    Ac = A - mu[:, None]
    U = regularized_pinv(Ac, solver, ridge, rank)  # k_i x k_q
    E = project_items(RT, U, mu)
    return CurFactors(anchors=anchors, U=U, mu=mu, E=E)


def query_embedding(C: np.ndarray) -> np.ndarray:
    """Query side of ANNCUR: the anchor-item scores ``C`` (nq x k_i) centred per row, float32."""
    C = np.asarray(C, dtype=np.float64)
    return (C - C.mean(axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Least squares for a query's latent (adaptive retrieval)
# ------------------------------------------------------------------------------------------------
def top_eigenvalue(G: np.ndarray, tol: float = 1e-7, max_iter: int = 300) -> float:
    """Largest eigenvalue of a symmetric PSD matrix ``G`` by power iteration (deterministic start).

    Relative accuracy ``tol`` when the spectral gap allows; used only as a regularisation scale.
    """
    n = G.shape[0]
    if n == 0:
        return 0.0
    v = np.ones(n) / np.sqrt(n) + np.linspace(0.0, 1e-3, n)
    v /= np.linalg.norm(v)
    lam = 0.0
    for _ in range(max_iter):
        w = G @ v
        nw = float(np.linalg.norm(w))
        if nw == 0.0:
            return 0.0
        new = float(v @ w)
        v = w / nw
        if abs(new - lam) <= tol * max(abs(new), 1e-300):
            return new
        lam = new
    return max(lam, float(v @ (G @ v)))


def ridge_with_intercept(X: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, float]:
    """``argmin_{w,b} ||X w + b - y||^2 + ridge * s_1^2 ||w||^2`` (intercept not penalised).

    ``X``: (m x d) latent rows of the items scored so far; ``y``: (m,) their exact scores; ``s_1``: the
    largest singular value of the column-centred ``X`` (power iteration on the smaller Gram matrix).
    Solved in the dual (m x m) when m < d, else the primal (d x d), by Cholesky. Returns
    ``(w (d,) float64, b)``. ``ridge = 0`` gives the minimum-norm least-squares solution.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise InvalidArgument(f"X must be (m, d) and y (m,), got {X.shape} and {y.shape}")
    if not np.isfinite(ridge) or ridge < 0:
        raise InvalidArgument(f"ridge must be a finite number >= 0, got {ridge!r}")
    m, d = X.shape
    if m == 0:
        return np.zeros(d), 0.0
    xm = X.mean(axis=0)
    ym = float(y.mean())
    Xc = X - xm
    yc = y - ym
    if ridge == 0 or m == 1:
        w = np.linalg.lstsq(Xc, yc, rcond=None)[0]
    else:
        dual = m < d
        G = Xc @ Xc.T if dual else Xc.T @ Xc
        lam = ridge * max(top_eigenvalue(G), 1e-300)
        G[np.diag_indices_from(G)] += lam
        try:
            cf = scipy.linalg.cho_factor(G, check_finite=False)
            if dual:
                w = Xc.T @ scipy.linalg.cho_solve(cf, yc, check_finite=False)
            else:
                w = scipy.linalg.cho_solve(cf, Xc.T @ yc, check_finite=False)
        except np.linalg.LinAlgError:  # numerically singular despite the ridge: fall back to lstsq
            w = np.linalg.lstsq(Xc, yc, rcond=None)[0]
    b = ym - float(xm @ w)
    return w, b


# ------------------------------------------------------------------------------------------------
# Anchor items
# ------------------------------------------------------------------------------------------------
def gram(RT: np.ndarray, rows: np.ndarray, mean: np.ndarray | None = None, block: int = 65536) -> np.ndarray:
    """``sum_j (RT[j] - mean)(RT[j] - mean)^T`` over ``rows``: the (k_q x k_q) Gram of centred R."""
    kq = RT.shape[1]
    G = np.zeros((kq, kq))
    for s in range(0, rows.size, block):
        blk = np.asarray(RT[rows[s : s + block]], dtype=np.float64)
        if mean is not None:
            blk = blk - mean
        G += blk.T @ blk
    return G


def _row_mean(RT: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    acc = np.zeros(RT.shape[1])
    for s in range(0, rows.size, block):
        acc += np.asarray(RT[rows[s : s + block]], dtype=np.float64).sum(axis=0)
    return acc / max(rows.size, 1)


def kmeans(X: np.ndarray, k: int, seed: int = 0, n_iter: int = 20, max_train: int = 50000) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the (k x d) centroids (float64).

    Trains on at most ``max_train`` rows (a seeded sample). Deterministic for a given seed.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise InvalidArgument(f"k must be in [1, {n}] for k-means over {n} points, got {k}")
    rng = np.random.default_rng(seed)
    if n > max_train:
        X = X[np.sort(rng.choice(n, max_train, replace=False))]
        n = max_train
    sq = (X * X).sum(1)
    C = np.empty((k, X.shape[1]))
    C[0] = X[rng.integers(n)]
    d2 = np.maximum(sq - 2 * X @ C[0] + C[0] @ C[0], 0)
    for c in range(1, k):
        tot = d2.sum()
        j = rng.choice(n, p=d2 / tot) if tot > 0 else rng.integers(n)
        C[c] = X[j]
        d2 = np.minimum(d2, np.maximum(sq - 2 * X @ C[c] + C[c] @ C[c], 0))
    for _ in range(n_iter):
        D = sq[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
        lab = D.argmin(1)
        newC = np.zeros_like(C)
        np.add.at(newC, lab, X)
        cnt = np.bincount(lab, minlength=k)
        empty = cnt == 0
        newC[~empty] /= cnt[~empty, None]
        newC[empty] = C[empty]  # keep an empty cluster's centroid where it was
        if np.allclose(newC, C):
            C = newC
            break
        C = newC
    return C


def _nearest_distinct(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """For each centroid (largest cluster first) the nearest point not taken yet; (k,) indices."""
    X = np.asarray(X, dtype=np.float64)
    D = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
    lab = D.argmin(1)
    sizes = np.bincount(lab, minlength=C.shape[0])
    order = np.argsort(-sizes, kind="stable")
    taken = np.zeros(X.shape[0], dtype=bool)
    out = []
    for c in order:
        cand = np.argsort(D[:, c], kind="stable")
        for j in cand:
            if not taken[j]:
                taken[j] = True
                out.append(j)
                break
    return np.asarray(out, dtype=np.int64)


def select_anchor_items(method: str, k_i: int, RT: np.ndarray, eligible: np.ndarray,
                        de: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Choose ``k_i`` anchor items among the ``eligible`` rows; returns (k_i,) int64 rows, ordered.

    Methods (``ANCHOR_METHODS``), none costs a cross-encoder call:

    * ``random``: a seeded permutation's first ``k_i`` (prefixes of one seed are nested).
    * ``qr``: column-pivoted QR of ``V_r^T`` (the top ``r = min(k_i, k_q)`` right singular vectors of
      the row-centred ``R``, restricted to eligible items); the first ``k_i`` pivots. Beyond the rank
      (``k_i > k_q``) the rest is filled at random. Deterministic.
    * ``kmeans-r``: k-means (``k_i`` clusters) over the items' centred, unit-normalised score profiles
      ``R[:, j]``; the item nearest each centroid, largest cluster first.
    * ``kmeans-de``: the same over dual-encoder item embeddings ``de`` (rows aligned with ``RT``).
    """
    eligible = np.asarray(eligible, dtype=np.int64)
    n = eligible.size
    if method not in ANCHOR_METHODS:
        raise InvalidArgument(f"unknown anchor_method {method!r}; valid methods: {', '.join(ANCHOR_METHODS)}")
    if not isinstance(k_i, (int, np.integer)) or k_i < 1:
        raise InvalidArgument(f"k_i must be a positive integer, got {k_i!r}")
    if k_i > n:
        raise InvalidArgument(f"k_i = {k_i} anchor items requested but the index has only {n} items")
    rng = np.random.default_rng(seed)
    if method == "random" or k_i == n:
        return eligible[rng.permutation(n)[:k_i]]
    if method == "qr":
        mean = _row_mean(RT, eligible)
        G = gram(RT, eligible, mean)
        evals, evecs = np.linalg.eigh(G)
        evals, evecs = evals[::-1], evecs[:, ::-1]
        r = int(min(k_i, np.sum(evals > 1e-12 * max(evals[0], 1e-300))))
        r = max(r, 1)
        W = evecs[:, :r] / np.sqrt(np.maximum(evals[:r], 1e-300))  # k_q x r
        Vt = np.empty((r, n))
        for s in range(0, n, 65536):
            blk = np.asarray(RT[eligible[s : s + 65536]], dtype=np.float64) - mean
            Vt[:, s : s + 65536] = (blk @ W).T
        _, piv = scipy.linalg.qr(Vt, mode="r", pivoting=True)
        chosen = list(piv[:r])
        if k_i > r:
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen += list(rng.permutation(rest)[: k_i - r])
        return eligible[np.asarray(chosen[:k_i], dtype=np.int64)]
    if method == "kmeans-r":
        X = np.asarray(RT[eligible], dtype=np.float64)
        X = X - X.mean(axis=0)
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    else:  # kmeans-de
        if de is None:
            raise InvalidArgument("anchor_method 'kmeans-de' needs dual-encoder item embeddings: build the index with a dual_encoder")
        X = np.asarray(de[eligible], dtype=np.float64)
    C = kmeans(X, k_i, seed=seed)
    return eligible[_nearest_distinct(X, C)]
