"""The in-memory graph: CSR adjacency plus optional node features and labels.

A :class:`Graph` is immutable. Builders validate their input and raise
:class:`retrieval.errors.InvalidArgument` with a sentence naming the first bad value; nothing is
half-built.

Conventions
-----------
- Nodes are ``0 .. n-1``.
- ``directed=False``: the CSR is symmetric, every undirected edge ``{u, v}`` is stored as ``u -> v``
  and ``v -> u``; a self-loop ``{u, u}`` is stored once. ``num_edges`` counts each undirected edge
  (and each self-loop) once.
- ``directed=True``: the CSR holds out-edges; ``num_edges`` is the number of arcs.
- ``weighted=False``: no weight array is kept (every edge weighs 1).
- Weights are finite and non-negative (float32).
- Within a row, column ids are sorted ascending and unique.

Thread-safety: a ``Graph`` is read-only after construction and may be shared between threads.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("last", "first", "sum", "max", "min")


# --------------------------------------------------------------------------------------------------
# validation helpers (plain functions: the store, the readers and the server all use them)
# --------------------------------------------------------------------------------------------------
def _first_bad_id(arr: np.ndarray, n: int | None):
    """``(position, shown value, reason)`` of the first entry of ``arr`` that is not a node id, or None."""
    for i, v in enumerate(arr.tolist()):
        if isinstance(v, (bool, np.bool_)):
            return i, repr(v), "is a boolean, not an integer node id"
        if isinstance(v, (int, np.integer)):
            iv = int(v)
        elif isinstance(v, (float, np.floating)):
            if not np.isfinite(v) or v != int(v):
                return i, repr(float(v)), "is not an integer node id"
            iv = int(v)
        else:
            try:
                iv = operator.index(v)
            except TypeError:
                return i, repr(v), "is not an integer node id"
        if iv < 0:
            return i, str(iv), "is outside the graph: node ids are >= 0"
        if n is not None and iv >= n:
            return i, str(iv), f"is outside the graph: expected an id in [0, {n})"
        if iv > np.iinfo(np.int64).max:
            return i, str(iv), "is too large for a node id (the limit is 2**63 - 1)"
    return None


def as_node_ids(x, name: str, n: int | None = None) -> np.ndarray:
    """``x`` as a 1-D int64 array of node ids in ``[0, n)`` (no upper bound when ``n`` is None).

    Every entry is checked *before* any cast: a fraction (1.5), a negative id (-1), a string ("abc"), a
    boolean, NaN / inf, or an id >= ``n`` raises InvalidArgument naming the position, e.g.
    ``src[3] = 1.5 is not an integer node id``. Integral floats (2.0) are accepted."""
    if isinstance(x, (str, bytes)):
        raise InvalidArgument(f"{name} must be a 1-D array of node ids, got the string {x!r}")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidArgument(f"{name} must be a flat sequence of integer node ids: {e}") from None
    if arr.dtype.kind in "USO" and not isinstance(x, np.ndarray):
        arr = np.asarray(x, dtype=object)  # a list mixing numbers and strings: judge each entry
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be a 1-D array of node ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    kind = arr.dtype.kind
    hi = np.iinfo(np.int64).max if n is None else n - 1
    if kind in "iu":
        ok = (arr >= 0) & (arr <= hi) if kind == "i" else arr <= np.uint64(max(hi, 0))
        if kind == "u" and n is not None and n == 0:
            ok = np.zeros(arr.shape, bool)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(arr) & (arr == np.round(arr)) & (arr >= 0) & (arr <= min(float(hi), 2.0**53))
    else:  # strings, objects (mixed lists), booleans: entry by entry
        ok = None
        if kind == "O" and _first_bad_id(arr, n) is None:
            return np.array([int(v) for v in arr.tolist()], np.int64)
    if ok is None or not ok.all():
        start = 0 if ok is None else int(np.flatnonzero(~ok)[0])
        bad = _first_bad_id(arr[start:], n)
        if bad is None:  # floats above 2**53 (rounded ids)
            raise InvalidArgument(f"{name}[{start}] = {arr[start]!r} is too large to be an exact node id")
        i, shown, why = bad
        raise InvalidArgument(f"{name}[{start + i}] = {shown} {why}")
    return arr.astype(np.int64, copy=False)


def as_weights(w, m: int, name: str = "weights") -> np.ndarray:
    """``w`` as float32 of length ``m``: finite and non-negative."""
    arr = np.asarray(w, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise InvalidArgument(f"{name} must be a 1-D array of {m} values (one per edge), got shape {arr.shape}")
    bad_mask = ~np.isfinite(arr) | (arr < 0)
    if bad_mask.any():
        bad = int(np.flatnonzero(bad_mask)[0])
        raise InvalidArgument(f"{name}[{bad}] = {float(arr[bad])}: edge weights must be finite and >= 0")
    return arr.astype(np.float32)


def as_features(x, n: int, name: str = "features") -> np.ndarray:
    """Node features as a C-contiguous float32 ``(n, f)`` array of finite values (sparse input is densified)."""
    if sp.issparse(x):
        x = x.toarray()
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InvalidArgument(f"{name} must have shape ({n}, f) (one row per node), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise InvalidArgument(f"{name} must have at least one column, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InvalidArgument(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidArgument(f"{name}[{r}, {c}] = {float(arr[r, c])}: features must be finite")
    return arr


@dataclass(frozen=True)
class Labels:
    """Node labels: single-label (``y`` int64 ``[n]``, -1 = unlabeled) or multi-label (``Y`` CSR ``n x L`` of 0/1)."""

    y: np.ndarray | None = None
    Y: sp.csr_matrix | None = None

    @property
    def multilabel(self) -> bool:
        return self.Y is not None

    @property
    def num_classes(self) -> int:
        if self.Y is not None:
            return int(self.Y.shape[1])
        return int(self.y.max()) + 1 if self.y.size and self.y.max() >= 0 else 0

    @property
    def num_labeled(self) -> int:
        if self.Y is not None:
            return int((np.diff(self.Y.indptr) > 0).sum())
        return int((self.y >= 0).sum())


def as_labels(labels, n: int, name: str = "labels") -> Labels:
    """Validate labels: an int array ``[n]`` (-1 = unlabeled) or a 0/1 matrix ``[n, L]`` (dense or sparse)."""
    if isinstance(labels, Labels):
        labels = labels.Y if labels.multilabel else labels.y
    if sp.issparse(labels) or (np.ndim(labels) == 2):
        Y = sp.csr_matrix(labels)
        if Y.shape[0] != n:
            raise InvalidArgument(f"{name} must have {n} rows (one per node), got shape {Y.shape}")
        Y.sum_duplicates()
        Y.eliminate_zeros()
        if Y.nnz and not np.all(Y.data == 1):
            raise InvalidArgument(f"multi-label {name} must be a 0/1 matrix, found value {float(Y.data[Y.data != 1][0])}")
        Y = sp.csr_matrix((np.ones(Y.nnz, np.int8), Y.indices.astype(np.int32), Y.indptr.astype(np.int64)), shape=Y.shape)
        return Labels(Y=Y)
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidArgument(f"{name} must be a 1-D array of {n} class ids (-1 = unlabeled), got shape {y.shape}")
    if y.size and y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise InvalidArgument(f"{name} must be integer class ids")
    elif y.size and y.dtype.kind not in "iub":
        raise InvalidArgument(f"{name} must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < -1:
        bad = int(np.flatnonzero(y < -1)[0])
        raise InvalidArgument(f"{name}[{bad}] = {int(y[bad])}: class ids are >= 0, -1 means unlabeled")
    return Labels(y=y)


# --------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Graph:
    """An immutable graph in CSR form. Build it with :meth:`from_edges` or :meth:`from_csr`."""

    n: int
    directed: bool
    weighted: bool
    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [nnz], sorted within each row
    weights: np.ndarray | None = None  # float32 [nnz] when weighted
    features: np.ndarray | None = None  # float32 [n, f]
    labels: Labels | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------------
    @staticmethod
    def from_edges(
        n: int,
        src,
        dst,
        weights=None,
        *,
        directed: bool = False,
        weighted: bool | None = None,
        duplicates: str = "last",
        self_loops: bool = True,
        features=None,
        labels=None,
    ) -> "Graph":
        """Build from an edge list.

        ``src``, ``dst``: node ids ``[m]`` in ``[0, n)``; ``weights``: ``[m]`` finite, >= 0 (None: all 1).
        ``weighted``: keep weights (default: ``weights is not None``). For an undirected graph the rows
        ``(u, v)`` and ``(v, u)`` are the same edge. ``duplicates`` says which weight a repeated edge
        keeps: ``last`` (the latest row), ``first``, ``sum``, ``max`` or ``min``. ``self_loops=False``
        drops rows with ``u == v``.
        """
        n = _check_n(n)
        src = as_node_ids(src, "src", n)
        dst = as_node_ids(dst, "dst", n)
        if src.shape != dst.shape:
            raise InvalidArgument(f"src and dst must have the same length, got {src.shape[0]} and {dst.shape[0]}")
        if duplicates not in DUPLICATE_POLICIES:
            raise InvalidArgument(f"duplicates must be one of {list(DUPLICATE_POLICIES)}, got {duplicates!r}")
        if weighted is None:
            weighted = weights is not None
        w = as_weights(weights, src.shape[0]) if weights is not None else None
        if w is not None and not weighted:
            w = None
        if not self_loops:
            keep = src != dst
            src, dst = src[keep], dst[keep]
            w = w[keep] if w is not None else None
        if not directed:
            # canonical (min, max) so reverse rows collapse onto the same edge
            lo, hi = np.minimum(src, dst), np.maximum(src, dst)
            src, dst = lo, hi
        src, dst, w = _dedupe(n, src, dst, w, duplicates)
        if not directed:
            off = src != dst
            rows = np.concatenate([src, dst[off]])
            cols = np.concatenate([dst, src[off]])
            ww = np.concatenate([w, w[off]]) if w is not None else None
        else:
            rows, cols, ww = src, dst, w
        indptr, indices, data = _coo_to_csr(n, rows, cols, ww)
        if weighted and data is None:
            data = np.ones(indices.shape[0], np.float32)
        g = Graph(n=n, directed=bool(directed), weighted=bool(weighted), indptr=indptr, indices=indices,
                  weights=data if weighted else None)
        return g.with_features(features).with_labels(labels)

    @staticmethod
    def from_csr(n: int, indptr, indices, weights=None, *, directed: bool, features=None, labels=None,
                 check: bool = True) -> "Graph":
        """Wrap CSR arrays (as stored on disk). ``check`` validates shapes, ranges, order and symmetry."""
        n = _check_n(n)
        indptr = np.asarray(indptr, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        w = None if weights is None else np.asarray(weights, dtype=np.float32)
        if check:
            if indptr.shape != (n + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.shape[0]:
                raise InvalidArgument(f"CSR indptr is malformed for n={n} and nnz={indices.shape[0]}")
            as_node_ids(indices, "indices", n)
            if w is not None:
                as_weights(w, indices.shape[0])
            rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
            key = rows * n + indices
            if key.size > 1 and np.any(np.diff(key) <= 0):
                raise InvalidArgument("CSR columns must be sorted and unique within each row")
            if not directed:
                A = sp.csr_matrix((np.ones(indices.shape[0]), indices, indptr), shape=(n, n))
                if (A != A.T).nnz:
                    raise InvalidArgument("an undirected graph needs a symmetric CSR adjacency")
        g = Graph(n=n, directed=bool(directed), weighted=w is not None, indptr=indptr, indices=indices, weights=w)
        return g.with_features(features).with_labels(labels)

    @staticmethod
    def from_scipy(A, *, directed: bool | None = None, weighted: bool | None = None, self_loops: bool = True,
                   features=None, labels=None) -> "Graph":
        """From a square scipy sparse (or dense) adjacency. ``directed=None``: directed iff not symmetric.
        ``weighted=None``: weighted iff some stored value differs from 1. Explicit zeros are dropped."""
        A = sp.csr_matrix(A)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise InvalidArgument(f"an adjacency matrix must be square, got shape {A.shape}")
        A.sum_duplicates()
        A.eliminate_zeros()
        if A.nnz and (not np.all(np.isfinite(A.data)) or A.data.min() < 0):
            raise InvalidArgument("adjacency values (edge weights) must be finite and >= 0")
        if directed is None:
            directed = bool((A != A.T).nnz)
        if weighted is None:
            weighted = bool(A.nnz and np.any(A.data != 1))
        coo = A.tocoo()
        src, dst, w = coo.row, coo.col, coo.data
        if not directed:
            keep = src <= dst
            if (A != A.T).nnz:  # caller asked for undirected on an asymmetric matrix: union of both halves
                keep = np.ones_like(src, dtype=bool)
            src, dst, w = src[keep], dst[keep], w[keep]
        return Graph.from_edges(A.shape[0], src, dst, w if weighted else None, directed=directed, weighted=weighted,
                                duplicates="max", self_loops=self_loops, features=features, labels=labels)

    def with_features(self, features) -> "Graph":
        if features is None:
            return self if self.features is None else _replace(self, features=None)
        return _replace(self, features=as_features(features, self.n))

    def with_labels(self, labels) -> "Graph":
        if labels is None:
            return self if self.labels is None else _replace(self, labels=None)
        return _replace(self, labels=as_labels(labels, self.n))

    # ---- queries ------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_self_loops(self) -> int:
        if "self_loops" not in self._cache:
            rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))
            self._cache["self_loops"] = int((rows == self.indices).sum())
        return self._cache["self_loops"]

    @property
    def num_edges(self) -> int:
        """Undirected: edges counted once (self-loops once). Directed: arcs."""
        if self.directed:
            return self.nnz
        return (self.nnz - self.num_self_loops) // 2 + self.num_self_loops

    def degrees(self, weighted: bool = False) -> np.ndarray:
        """Out-degree (undirected: degree; a self-loop counts once). ``weighted``: sum of weights, float64."""
        if weighted and self.weights is not None:
            rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))
            return np.bincount(rows, weights=self.weights, minlength=self.n)
        return np.diff(self.indptr).astype(np.int64)

    def in_degrees(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.n).astype(np.int64)

    def neighbors(self, u: int, direction: str = "out") -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of node ``u``: ``(ids int64, weights float32)``, ids ascending.

        ``direction``: ``out`` (default; for undirected graphs the only meaningful one), ``in`` or ``both``.
        """
        u = int(as_node_ids([u], "node", self.n)[0])
        if direction not in ("out", "in", "both"):
            raise InvalidArgument(f"direction must be 'out', 'in' or 'both', got {direction!r}")
        if not self.directed or direction == "out":
            s, e = self.indptr[u], self.indptr[u + 1]
            ids = self.indices[s:e].copy()
            w = self.weights[s:e].copy() if self.weights is not None else np.ones(ids.shape[0], np.float32)
            return ids, w
        At = self._transpose()
        s, e = At.indptr[u], At.indptr[u + 1]
        in_ids = At.indices[s:e].astype(np.int64)
        in_w = At.data[s:e].astype(np.float32)
        if direction == "in":
            return in_ids, in_w
        out_ids, out_w = self.neighbors(u, "out")
        ids = np.concatenate([out_ids, in_ids])
        w = np.concatenate([out_w, in_w])
        ids, first = np.unique(ids, return_index=True)
        return ids, w[first]

    def adjacency(self, dtype=np.float32) -> sp.csr_matrix:
        """The adjacency as a scipy CSR matrix ``n x n`` (weights, or ones when unweighted)."""
        data = self.weights if self.weights is not None else np.ones(self.nnz, dtype=dtype)
        return sp.csr_matrix((data.astype(dtype, copy=False), self.indices, self.indptr), shape=(self.n, self.n))

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each edge once: ``(src, dst, weights)``; undirected edges come with ``src <= dst``."""
        rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))
        keep = slice(None) if self.directed else rows <= self.indices
        w = self.weights[keep] if self.weights is not None else None
        return rows[keep], self.indices[keep], w

    def _transpose(self) -> sp.csr_matrix:
        if "transpose" not in self._cache:
            self._cache["transpose"] = self.adjacency().T.tocsr()
        return self._cache["transpose"]

    def describe(self) -> dict:
        """Counts and degree statistics as a JSON-able dict."""
        deg = self.degrees()
        out = {
            "n": self.n,
            "m": self.num_edges,
            "directed": self.directed,
            "weighted": self.weighted,
            "self_loops": self.num_self_loops,
            "degree": _stats(deg),
            "isolated": int(((deg == 0) & (self.in_degrees() == 0)).sum()) if self.directed else int((deg == 0).sum()),
            "feature_dim": int(self.features.shape[1]) if self.features is not None else 0,
        }
        if self.directed:
            out["in_degree"] = _stats(self.in_degrees())
        if self.weighted and self.nnz:
            out["weight"] = {"min": float(self.weights.min()), "max": float(self.weights.max()),
                             "mean": float(self.weights.mean())}
        if self.labels is not None:
            out["labels"] = {"multilabel": self.labels.multilabel, "num_classes": self.labels.num_classes,
                             "num_labeled": self.labels.num_labeled}
        return out


# --------------------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------------------
def _check_n(n) -> int:
    try:
        n_int = int(n)
    except (TypeError, ValueError):
        raise InvalidArgument(f"num_nodes must be an integer, got {n!r}") from None
    if n_int != n or n_int < 0:
        raise InvalidArgument(f"num_nodes must be a non-negative integer, got {n!r}")
    return n_int


def _replace(g: Graph, **kw) -> Graph:
    d = dict(n=g.n, directed=g.directed, weighted=g.weighted, indptr=g.indptr, indices=g.indices,
             weights=g.weights, features=g.features, labels=g.labels)
    d.update(kw)
    return Graph(**d)


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(x.min()), "max": int(x.max()), "mean": float(x.mean())}


def _dedupe(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray | None, policy: str):
    """Unique (src, dst) pairs sorted by key; for repeated pairs the weight follows ``policy``."""
    if src.size == 0:
        return src, dst, w
    key = src * np.int64(n) + dst
    order = np.argsort(key, kind="stable")  # stable: rows of one key keep their input order
    key_s = key[order]
    starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    uniq = key_s[starts]
    if w is None:
        ww = None
    else:
        w_s = w[order]
        if policy == "first":
            ww = w_s[starts]
        elif policy == "last":
            ends = np.r_[starts[1:], key_s.shape[0]] - 1
            ww = w_s[ends]
        elif policy == "sum":
            ww = np.add.reduceat(w_s.astype(np.float64), starts).astype(np.float32)
        elif policy == "max":
            ww = np.maximum.reduceat(w_s, starts)
        else:
            ww = np.minimum.reduceat(w_s, starts)
        if policy == "sum" and not np.all(np.isfinite(ww)):
            raise InvalidArgument("summing duplicate edge weights overflowed float32")
    return uniq // n, uniq % n, ww


def _coo_to_csr(n: int, rows: np.ndarray, cols: np.ndarray, w: np.ndarray | None):
    """Sorted, duplicate-free COO -> CSR arrays (rows/cols need not be sorted; pairs must be unique)."""
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    w = w[order] if w is not None else None
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols.astype(np.int64), w
