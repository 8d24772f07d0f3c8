r"""FastRP node embeddings.

Paper: H. Chen, S. F. Sultan, Y. Tian, M. Chen, S. Skiena, "Fast and Accurate Network Embeddings via
Very Sparse Random Projection", CIKM 2019 (code: github.com/GTmac/FastRP). Extensions as in Neo4j GDS
``gds.fastRP`` (node self-influence, node features through per-feature random vectors).

Equations (paper notation; A the n x n adjacency, D = diag(A 1) the (weighted) degree matrix)::

    S    = D^{-1} A                                  transition matrix (rows of isolated nodes are 0)
    L    = D^{beta}                                  normalisation strength beta (paper: alpha); isolated -> 1
    R    ~ very sparse random projection, n x d', entries  +sqrt(s/d')  w.p. 1/(2s)
                                                          0          w.p. 1 - 1/s
                                                          -sqrt(s/d')  w.p. 1/(2s)
           s = 3 (Achlioptas 2003) or s = sqrt(n) (Li, Hastie, Church 2006)
    P    = X Q,  Q ~ the same distribution, f x d_p  (node features X, n x f; d_p = round(d * property_ratio))
    N_0  = [ L R | P ]                               initial vectors, n x d  (d = d' + d_p)
    N_i  = S N_{i-1},  i = 1..k                      k = len(iteration_weights)
    E    = w_0 * nrm(N_0) + sum_i alpha_i * nrm(N_i)  nrm = row-wise L2 normalisation (optional),
                                                      alpha_i = iteration_weights, w_0 = self_influence
    (GDS variant, propagate_normalized=True:  N_i = S nrm(N_{i-1}) -- the rows are normalised before
     they are averaged again; the paper's code propagates the raw S^i N_0 and normalises only when summing)
    E    <- (E - mean) / std  column-wise              only with standardize=True (the paper's code)
    E    <- (E - mean) C^{-gamma/2},  C = V diag(c) V^T the column covariance of E, C^{-gamma/2} =
            V diag(max(c, 1e-5 max c))^{-gamma/2} V^T     only with whiten = gamma > 0 (ours, see below);
            then standardised again when standardize=True

The paper's BlogCatalog setting is ``iteration_weights=[0, 0, 1, 6.67]``, ``beta=-0.64``, ``s=sqrt(n)``
(scikit-learn's SparseRandomProjection ``density='auto'``), per-power L2 normalisation and a final
column standardisation (``sklearn.preprocessing.scale``); see :data:`PAPER_BLOGCATALOG`.

Defaults follow Neo4j GDS (:data:`GDS_DEFAULTS`): ``iteration_weights=[0, 1, 1]``, ``beta=0``, ``s=3``,
``self_influence=0``, ``property_ratio=0``, per-iteration L2 normalisation of the propagated rows
(``propagate_normalized=True``), no standardisation.

Departures, and why:
- GDS divides a node's neighbour sum by its *unweighted* degree; we use the weighted degree so that
  ``S`` is the paper's row-stochastic transition matrix (identical for unweighted graphs).
- GDS draws each node's random vector from a per-thread generator; we draw ``R`` from one seeded
  numpy generator in fixed node chunks, so the result depends only on ``seed`` (not on threads).
- The degree scaling ``L`` multiplies the random part only (as in GDS); the feature part is not scaled.
- Directed graphs propagate along out-edges (``S`` built from the out-adjacency).
- ``whiten`` (not in the paper or GDS; default 0 = off) decorrelates the columns of the final embedding
  (partial ZCA whitening, exponent gamma in (0, 1]). ``E = U f(Lambda) U^T R`` mixes the eigenvectors that
  the filter ``f`` keeps by a random ``d``-column matrix; an L2-regularised linear classifier on ``E`` then
  under-uses the directions the mixing shrank. Whitening undoes the mixing (gamma = 1: a rotation of the
  kept band when ``f`` is a clean band) at ``O(n d^2)``; on BlogCatalog (d = 128, gamma = 0.5) it added
  0.005-0.01 held-out Micro-F1 (bench/results/graph/fastrp_tune.md). It is a linear map of the columns,
  like the standardisation; the rows are unchanged otherwise.

Memory: the sparse ``A`` (O(m)) plus three dense n x d float32 arrays (current ``N_i``, the sum ``E``,
and one temporary; with ``whiten`` the whitened copy of ``E``); no dense n x n matrix is ever formed.
Time: O(k m d), plus O(n d^2) with ``whiten``.

Thread-safety: :func:`fastrp` is a pure function of its arguments.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp

from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)

#: the paper's BlogCatalog configuration (authors' notebook, d = 512)
PAPER_BLOGCATALOG = dict(dim=512, iteration_weights=(0.0, 0.0, 1.0, 6.67), beta=-0.64, s="li",
                         normalize=True, propagate_normalized=False, standardize=True)
#: Neo4j GDS defaults for gds.fastRP (embeddingDimension has no default there)
GDS_DEFAULTS = dict(iteration_weights=(0.0, 1.0, 1.0), beta=0.0, s=3.0, self_influence=0.0, property_ratio=0.0,
                    normalize=True, propagate_normalized=True, standardize=False)

_CHUNK = 65536  # rows of R drawn per generator call (fixed so results do not depend on anything else)


@dataclass
class FastRPParams:
    """Build parameters of a FastRP run (all of them; there are no query-time parameters).

    dim: embedding dimension d (> 0). iteration_weights: alpha_1..alpha_k, each >= 0, not all 0 unless
    self_influence > 0. beta: normalisation strength (a warning outside [-1, 1]). s: sparsity, "achlioptas"
    (= 3), "li" (= sqrt(n)) or a number >= 1. self_influence: w_0 >= 0. property_ratio: share of the
    dimensions fed by node features, in [0, 1] (needs features when > 0). normalize: per-iteration row L2
    normalisation. propagate_normalized: True (GDS) averages the normalised rows in the next iteration,
    False (the paper's code) propagates the raw ``S^i N_0`` and normalises only the copy that is summed.
    standardize: final column standardisation. whiten: exponent gamma in [0, 1] of the final partial
    whitening ``E <- (E - mean) C^{-gamma/2}`` (C the column covariance; 0 = off, the default; 1 = ZCA
    whitening), applied after the standardisation (which is then redone). seed: generator seed.
    """

    dim: int = 128
    iteration_weights: tuple[float, ...] = (0.0, 1.0, 1.0)
    beta: float = 0.0
    s: float | str = 3.0
    self_influence: float = 0.0
    property_ratio: float = 0.0
    normalize: bool = True
    propagate_normalized: bool = True
    standardize: bool = False
    whiten: float = 0.0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["iteration_weights"] = [float(w) for w in self.iteration_weights]
        return d


def describe_params(p: "dict | FastRPParams") -> str:
    """FastRP parameters in a few words, e.g. ``powers 26-32 flat, beta 0, GDS propagation, dim 64``
    (unset fields of a dict read as the defaults)."""
    d = p.as_dict() if isinstance(p, FastRPParams) else dict(p)
    w = [float(x) for x in d.get("iteration_weights", FastRPParams.iteration_weights)]
    nz = [i + 1 for i, x in enumerate(w) if x]
    if not nz:
        ws = "no iteration weights"
    elif len(nz) == 1:
        ws = f"power {nz[0]}"
    elif len({x for x in w if x}) == 1 and nz == list(range(nz[0], nz[-1] + 1)):
        ws = f"powers {nz[0]}-{nz[-1]} flat"
    else:
        ws = "weights " + ",".join(f"A^{i + 1}:{x:.2g}" for i, x in enumerate(w) if x)
    prop = "GDS" if d.get("propagate_normalized", True) else "paper"
    out = f"{ws}, beta {float(d.get('beta', 0.0)):g}, {prop} propagation"
    for key in ("property_ratio", "whiten"):
        if d.get(key):
            out += f", {key} {float(d[key]):g}"
    return out + (f", dim {d['dim']}" if "dim" in d else "")


def resolve_s(s, n_in: int) -> float:
    """The sparsity ``s`` for an input dimension ``n_in``: "achlioptas" -> 3, "li" -> sqrt(n_in)."""
    if isinstance(s, str):
        key = s.lower()
        if key in ("achlioptas", "3"):
            return 3.0
        if key in ("li", "sqrt", "auto", "sqrt(n)"):
            return max(1.0, math.sqrt(max(n_in, 1)))
        raise InvalidArgument(f"s must be 'achlioptas', 'li' or a number >= 1, got {s!r}")
    try:
        val = float(s)
    except (TypeError, ValueError):
        raise InvalidArgument(f"s must be 'achlioptas', 'li' or a number >= 1, got {s!r}") from None
    if not math.isfinite(val) or val < 1:
        raise InvalidArgument(f"s must be a number >= 1 (density 1/s), got {s!r}")
    return val


def very_sparse_random_matrix(rows: int, cols: int, s: float, seed) -> sp.csr_matrix:
    """``rows x cols`` CSR with entries ``+-sqrt(s/cols)`` w.p. ``1/(2s)`` each, else 0 (float32).

    Drawn in fixed chunks of rows from ``np.random.default_rng(seed)``: same seed -> same matrix.
    """
    rng = np.random.default_rng(seed)
    val = np.float32(math.sqrt(s / cols)) if cols else np.float32(0)
    p = 1.0 / s
    indptr = np.zeros(rows + 1, dtype=np.int64)
    idx_parts, sign_parts = [], []
    for start in range(0, rows, _CHUNK):
        r = min(_CHUNK, rows - start)
        # nonzeros per row ~ Binomial(cols, 1/s); positions uniform without replacement within a row
        u = rng.random((r, cols), dtype=np.float32) if cols * r <= 2**26 else None
        if u is not None:
            mask = u < p
            rr, cc = np.nonzero(mask)
        else:  # very wide: draw row by row to bound memory
            rr_l, cc_l = [], []
            for i in range(r):
                ui = rng.random(cols, dtype=np.float32)
                ci = np.flatnonzero(ui < p)
                rr_l.append(np.full(ci.shape[0], i, np.int64))
                cc_l.append(ci)
            rr, cc = np.concatenate(rr_l), np.concatenate(cc_l)
        signs = rng.integers(0, 2, size=rr.shape[0], dtype=np.int8)
        indptr[start + 1:start + r + 1] = np.bincount(rr, minlength=r)
        idx_parts.append(cc.astype(np.int32))
        sign_parts.append(signs)
    np.cumsum(indptr, out=indptr)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int32)
    signs = np.concatenate(sign_parts) if sign_parts else np.zeros(0, np.int8)
    data = np.where(signs == 1, val, -val).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(rows, cols))


def _accumulate(E: np.ndarray, N: np.ndarray, w: float, normalize: bool, chunk: int = 8192) -> None:
    """``E += w * nrm(N)`` (or ``w * N``) in row chunks, so no second n x d temporary is allocated."""
    for a in range(0, N.shape[0], chunk):
        blk = N[a:a + chunk]
        if normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", blk, blk, dtype=np.float64))
            norms[norms == 0] = 1.0
            E[a:a + chunk] += (w / norms).astype(np.float32)[:, None] * blk
        else:
            E[a:a + chunk] += np.float32(w) * blk


def _row_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in place (zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


def check_params(p: FastRPParams, n: int, has_features: bool) -> list[str]:
    """Validate ``p``; raise InvalidArgument for hard errors, return warning strings for soft ones."""
    warns = []
    if not isinstance(p.dim, (int, np.integer)) or isinstance(p.dim, bool) or p.dim <= 0:
        raise InvalidArgument(f"dim must be a positive integer, got {p.dim!r}")
    weights = list(p.iteration_weights) if p.iteration_weights is not None else []
    if len(weights) == 0 and not p.self_influence:
        raise InvalidArgument("iteration_weights must hold at least one weight (or set self_influence > 0)")
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float, np.floating, np.integer)) or not math.isfinite(w) or w < 0:
            raise InvalidArgument(f"iteration_weights[{i}] = {w!r}: weights must be finite and >= 0")
    if not (isinstance(p.beta, (int, float, np.floating)) and math.isfinite(p.beta)):
        raise InvalidArgument(f"beta (normalization strength) must be a finite number, got {p.beta!r}")
    if abs(p.beta) > 1:
        warns.append(f"beta = {p.beta} is far outside [-1, 1]: degree scaling D^beta will dominate the embedding")
    if not math.isfinite(p.self_influence) or p.self_influence < 0:
        raise InvalidArgument(f"self_influence must be finite and >= 0, got {p.self_influence!r}")
    if not math.isfinite(p.property_ratio) or not 0 <= p.property_ratio <= 1:
        raise InvalidArgument(f"property_ratio must be in [0, 1], got {p.property_ratio!r}")
    if p.property_ratio > 0 and not has_features:
        raise InvalidArgument("property_ratio > 0 needs node features (none were given)")
    if p.property_ratio > 0 and round(p.dim * p.property_ratio) == 0:
        raise InvalidArgument(f"property_ratio={p.property_ratio} gives 0 feature dimensions out of dim={p.dim}")
    if (isinstance(p.whiten, bool) or not isinstance(p.whiten, (int, float, np.floating, np.integer))
            or not math.isfinite(p.whiten) or not 0 <= p.whiten <= 1):
        raise InvalidArgument(f"whiten (whitening exponent) must be a number in [0, 1], got {p.whiten!r}")
    if sum(weights) == 0 and p.self_influence == 0:
        raise InvalidArgument("all iteration_weights are 0 and self_influence is 0: the embedding would be all zeros")
    resolve_s(p.s, max(n, 1))
    return warns


def check_inputs(adj, features=None) -> tuple[sp.csr_matrix, np.ndarray | sp.csr_matrix | None]:
    """Validate and convert FastRP's inputs: ``adj`` -> float32 CSR ``n x n`` (weights finite, >= 0, n > 0),
    ``features`` -> None, float32 dense or float32 CSR ``n x f`` (finite). Raises InvalidArgument."""
    if not sp.issparse(adj):
        raise InvalidArgument(f"adj must be a scipy sparse matrix, got {type(adj).__name__}")
    A = sp.csr_matrix(adj, dtype=np.float32)
    n = A.shape[0]
    if A.shape[0] != A.shape[1]:
        raise InvalidArgument(f"adj must be square, got shape {A.shape}")
    if n == 0:
        raise InvalidArgument("the graph is empty (0 nodes): nothing to embed")
    if A.nnz and (not np.all(np.isfinite(A.data)) or A.data.min() < 0):
        raise InvalidArgument("adjacency weights must be finite and >= 0")
    X = None
    if features is not None:
        X = features if sp.issparse(features) else np.asarray(features)
        if X.ndim != 2 or X.shape[0] != n:
            raise InvalidArgument(f"features must have shape ({n}, f), got {X.shape}")
        if sp.issparse(X):
            X = sp.csr_matrix(X, dtype=np.float32)
            if X.nnz and not np.all(np.isfinite(X.data)):
                raise InvalidArgument("features must be finite")
        else:
            X = np.asarray(X, dtype=np.float32)
            if not np.all(np.isfinite(X)):
                raise InvalidArgument("features must be finite")
    return A, X


def transition_matrix(A: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """``S = D^-1 A`` (float32 CSR; rows of isolated nodes are 0) and the weighted degrees (float64 ``[n]``)."""
    deg = np.asarray(A.sum(axis=1)).ravel().astype(np.float64)
    inv = np.zeros_like(deg)
    nz = deg > 0
    inv[nz] = 1.0 / deg[nz]
    S = sp.diags(inv.astype(np.float32)) @ A  # D^-1 A, CSR
    return sp.csr_matrix(S, dtype=np.float32), deg


def initial_vectors(deg: np.ndarray, params: FastRPParams, X=None) -> np.ndarray:
    """``N_0 = [L R | X Q]`` (float32 ``[n, dim]``) for the degrees ``deg`` and checked ``params``.

    The random matrices come from ``SeedSequence(params.seed)``: the same seed, dim, s, beta and
    property_ratio give the same ``N_0`` (what :func:`fastrp` and the tuner both start from)."""
    n = deg.shape[0]
    d = int(params.dim)
    d_p = int(round(d * params.property_ratio)) if X is not None and params.property_ratio > 0 else 0
    d_r = d - d_p
    nz = deg > 0
    seeds = np.random.SeedSequence(int(params.seed)).spawn(2)
    N = np.zeros((n, d), dtype=np.float32)
    if d_r > 0:
        R = very_sparse_random_matrix(n, d_r, resolve_s(params.s, n), seeds[0])
        scale = np.ones(n, dtype=np.float64)
        scale[nz] = np.power(deg[nz], float(params.beta))
        R = sp.diags(scale.astype(np.float32)) @ R
        N[:, :d_r] = R.toarray()
        del R
    if d_p > 0:
        Q = very_sparse_random_matrix(X.shape[1], d_p, resolve_s(params.s, X.shape[1]), seeds[1])
        N[:, d_r:] = np.asarray(X @ Q.toarray() if not sp.issparse(X) else (X @ Q).toarray(), dtype=np.float32)
        del Q
    return N


def fastrp(
    adj,
    params: FastRPParams | None = None,
    *,
    features=None,
    progress: Callable[[int, int, str], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
    **kw,
) -> np.ndarray:
    """FastRP embeddings of the graph with adjacency ``adj`` (scipy sparse ``n x n``, weights >= 0).

    ``params`` (or the same fields as keywords, e.g. ``fastrp(A, dim=64, beta=-0.5)``): see
    :class:`FastRPParams`. ``features``: optional ``n x f`` (dense or sparse) node features, used when
    ``property_ratio > 0``. ``progress(done, total, message)`` is called after each iteration;
    ``check_cancelled()`` before each. Returns float32 ``[n, dim]``.
    """
    if params is None:
        params = FastRPParams(**kw)
    elif kw:
        raise InvalidArgument("pass either params or keyword parameters, not both")
    A, X = check_inputs(adj, features)
    n = A.shape[0]
    for w in check_params(params, n, X is not None):
        warnings.warn(w, RuntimeWarning, stacklevel=2)
        logger.warning(w)

    d = int(params.dim)
    weights = [float(w) for w in params.iteration_weights]
    k = len(weights)
    t0 = time.perf_counter()
    S, deg = transition_matrix(A)
    N = initial_vectors(deg, params, X)

    E = np.zeros((n, d), dtype=np.float32)
    if params.self_influence > 0:
        _accumulate(E, N, float(params.self_influence), params.normalize)
    for i in range(k):
        if check_cancelled is not None:
            check_cancelled()
        N = np.asarray(S @ N, dtype=np.float32)  # sparse x dense -> dense float32
        if params.normalize and params.propagate_normalized:
            _row_normalize(N)  # GDS: the normalised rows are what the next iteration averages
            if weights[i] != 0.0:
                E += np.float32(weights[i]) * N
        elif weights[i] != 0.0:
            _accumulate(E, N, weights[i], params.normalize)  # paper: normalise only the copy that is summed
        if progress is not None:
            progress(i + 1, k, "fastrp iterations")
    del N
    if params.standardize:
        _standardize(E)
    if params.whiten > 0:
        E = whiten_columns(E, float(params.whiten))
        if params.standardize:
            _standardize(E)
    logger.info("fastrp: n=%d nnz=%d d=%d k=%d in %.3fs", n, A.nnz, d, k, time.perf_counter() - t0)
    return E


def _standardize(E: np.ndarray) -> None:
    """Column standardisation in place (zero-variance columns are only centred)."""
    mean = E.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = E.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std == 0] = 1.0
    E -= mean
    E /= std


_WHITEN_FLOOR = 1e-5  # covariance eigenvalues below this share of the largest are raised to it


def whitening_matrix(E: np.ndarray, gamma: float, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, W)`` of the partial whitening ``(E - mean) @ W``, ``W = C^{-gamma/2}`` (symmetric, float64
    ``[d, d]``) for the column covariance ``C`` of ``E[rows]`` (all rows when None), its eigenvalues
    floored at ``1e-5`` times the largest. Accumulated in float64 over row chunks."""
    X = E if rows is None else E[rows]
    m, d = X.shape
    mean = X.mean(axis=0, dtype=np.float64)
    G = np.zeros((d, d))
    for a in range(0, m, 8192):
        blk = X[a:a + 8192].astype(np.float64) - mean
        G += blk.T @ blk
    c, V = np.linalg.eigh(G / max(m, 1))
    top = c.max() if c.size else 0.0
    if top <= 0:
        return mean, np.eye(d)
    c = np.maximum(c, _WHITEN_FLOOR * top)
    return mean, (V * c ** (-gamma / 2)) @ V.T


def whiten_columns(E: np.ndarray, gamma: float, rows: np.ndarray | None = None) -> np.ndarray:
    """``(E - mean) C^{-gamma/2}`` (float32, a new array), mean and covariance from ``E[rows]`` (or all rows):
    see :func:`whitening_matrix`."""
    mean, W = whitening_matrix(E, gamma, rows)
    out = np.empty(E.shape, np.float32)
    Wf = W.astype(np.float32)
    mf = mean.astype(np.float32)
    for a in range(0, E.shape[0], 8192):
        out[a:a + 8192] = (E[a:a + 8192] - mf) @ Wf
    return out


def fastrp_dense_reference(A_dense: np.ndarray, params: FastRPParams, features=None) -> np.ndarray:
    """The same computation with dense numpy matrices and explicit powers ``(D^-1 A)^i`` (float64).

    For tests on small graphs only: O(n^2) memory. Uses the same random matrices as :func:`fastrp`.
    """
    A = np.asarray(A_dense, dtype=np.float64)
    n = A.shape[0]
    d = params.dim
    X = None if features is None else (features.toarray() if sp.issparse(features) else np.asarray(features, np.float64))
    d_p = int(round(d * params.property_ratio)) if X is not None and params.property_ratio > 0 else 0
    d_r = d - d_p
    deg = A.sum(1)
    Dinv = np.diag(np.where(deg > 0, 1.0 / np.where(deg > 0, deg, 1), 0.0))
    S = Dinv @ A
    seeds = np.random.SeedSequence(int(params.seed)).spawn(2)
    parts = []
    if d_r > 0:
        R = very_sparse_random_matrix(n, d_r, resolve_s(params.s, n), seeds[0]).toarray().astype(np.float64)
        L = np.diag(np.where(deg > 0, np.power(np.where(deg > 0, deg, 1), params.beta), 1.0))
        parts.append(L @ R)
    if d_p > 0:
        Q = very_sparse_random_matrix(X.shape[1], d_p, resolve_s(params.s, X.shape[1]), seeds[1]).toarray()
        parts.append(X @ Q)
    N0 = np.concatenate(parts, axis=1)

    def nrm(M):
        if not params.normalize:
            return M
        nn = np.linalg.norm(M, axis=1, keepdims=True)
        return M / np.where(nn == 0, 1, nn)

    E = params.self_influence * nrm(N0)
    if params.propagate_normalized:
        cur = N0
        for w in params.iteration_weights:
            cur = nrm(S @ cur)
            E = E + w * cur
    else:
        P = np.eye(n)
        for w in params.iteration_weights:
            P = S @ P  # explicit power S^i (dense n x n)
            E = E + w * nrm(P @ N0)

    def stdz(M):
        sd = M.std(0)
        return (M - M.mean(0)) / np.where(sd == 0, 1, sd)

    if params.standardize:
        E = stdz(E)
    if params.whiten > 0:  # explicit eigendecomposition of the covariance, in float64
        Ec = E - E.mean(0)
        c, V = np.linalg.eigh(Ec.T @ Ec / n)
        c = np.maximum(c, 1e-5 * c.max())
        E = Ec @ (V * c ** (-params.whiten / 2)) @ V.T
        if params.standardize:
            E = stdz(E)
    return E


# --------------------------------------------------------------------------------------------------
# the job body
# --------------------------------------------------------------------------------------------------
def fastrp_job(ctx, *, store_root: str, graph: str, embedding_name: str = "fastrp", use_features: bool = False,
               **params) -> dict:
    """Job body: compute FastRP embeddings of a stored graph and store them with it.

    ``params``: :class:`FastRPParams` fields. ``use_features``: feed the graph's node features through
    ``property_ratio``. Progress: one unit per iteration. The result replaces any earlier embeddings
    of the same name atomically and records the graph version it was computed from.
    Returns ``{"graph", "embedding", "n", "dim", "graph_version", "seconds", "params"}``.
    """
    from retrieval.graph.store import GraphStore

    store = GraphStore(store_root)
    g = store.load(graph)
    version = store.version(graph)
    p = FastRPParams(**params)
    if use_features and g.features is None:
        raise InvalidArgument(f"graph {graph!r} has no node features; attach them or use use_features=False")
    feats = g.features if use_features else None
    if feats is None and p.property_ratio > 0:
        raise InvalidArgument("property_ratio > 0 needs use_features=True and a graph with node features")
    k = len(p.iteration_weights)
    ctx.progress(0, k, "fastrp iterations")
    t0 = time.perf_counter()
    emb = fastrp(g.adjacency(), p, features=feats, progress=ctx.progress, check_cancelled=ctx.check_cancelled)
    secs = time.perf_counter() - t0
    ctx.check_cancelled()
    info = {"kind": "fastrp", "params": p.as_dict(), "graph_version": version, "use_features": bool(use_features),
            "seconds": secs}
    store.put_embeddings(graph, embedding_name, emb, info)
    return {"graph": graph, "embedding": embedding_name, "n": int(emb.shape[0]), "dim": int(emb.shape[1]),
            "graph_version": version, "seconds": secs, "params": p.as_dict()}
