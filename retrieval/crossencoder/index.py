"""The cross-encoder k-NN index: CUR factors, item texts, persisted in one folder.

Build it with the job body :func:`retrieval.crossencoder.build.build_index` (resumable, scores the
``k_q`` anchor queries against every item), then open it with :meth:`CrossEncoderIndex.load` and the
same scorer (its fingerprint must match the stored one).

Folder layout (``FORMAT``; every array is float32 little-endian, row-major)::

    meta.json            format, scorer / dual-encoder fingerprints, k_q, n_rows, byte sizes, build
                         params, the current CUR generation; written last, atomically (tmp + rename)
    anchor_queries.json  the k_q anchor query texts (row order of R)
    items.jsonl          one {"id", "text", "payload"} per row, rows in insertion order
    R.f32                (n_rows x k_q): R^T, the item-major score matrix (R in Fortran order)
    alive.u8             (n_rows,) 1 = live item, 0 = deleted
    de.f32               (n_rows x d) dual-encoder item embeddings (only with a dual encoder)
    cur-<gen>.npz        anchors (k_i,), U (k_i x k_q), mu (k_q,) of CUR generation <gen>
    E-<gen>.f32          (n_rows x k_i) item embeddings of that generation

Appends (``add_items``) truncate each append-only file to the size ``meta.json`` records, append,
fsync, then rewrite ``meta.json``: a crash before the meta write leaves the old index intact.
``set_anchor_items`` writes a new generation, switches ``meta.json`` to it, then deletes the old one.
Deleted rows stay in the files (tombstones in ``alive.u8``) and are never scored or returned. A
deleted *anchor* item no longer serves the query embedding either: a ``cur`` search with the stored
anchors uses the alive ones only, with ``U``, ``mu`` and ``E`` re-solved from the stored ``R`` over
them (no cross-encoder call; O(k_q k_i^2 + N k_q k_i) time and N x k_i floats once per index
mutation, cached), so a dead anchor costs no call, ``k_i`` shrinks by the dead anchors and their
calls go to the rerank step (``k_r``), and a budget >= the alive items is exhaustive. The stored
generation (``describe()["anchor_item_ids"]``) is kept until ``set_anchor_items`` re-picks.

Thread-safety: searches may run concurrently with each other and with mutations. Mutations
(``add_items``, ``delete_items``, ``set_anchor_items``) are serialised by a lock and publish a new
immutable state; a search works on the state it started with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.crossencoder import search as kernels
from retrieval.crossencoder.cur import (
    ANCHOR_METHODS,
    SOLVERS,
    CurFactors,
    select_anchor_items,
    solve_cur,
)
from retrieval.crossencoder.dual import DualEncoder, dual_encoder_from_spec
from retrieval.crossencoder.index_writes import (AddResult, IndexWrites, _open_f32, _save_cur,  # noqa: F401
                                                 _State)  # AddResult and _save_cur: imported from here too
from retrieval.crossencoder.scorers import (
    CallStats,
    Scorer,
    ScorerFingerprint,
    check_fingerprint,
    scorer_from_spec,
    validate_texts,
)
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

FORMAT = "retrieval.crossencoder.index/1"

__all__ = [
    "FORMAT",
    "BuildParams",
    "SearchParams",
    "SearchResult",
    "AddResult",
    "MODES",
    "CrossEncoderIndex",
    "read_meta",
]


# ------------------------------------------------------------------------------------------------
# Parameters and results
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BuildParams:
    """Build-time settings (anchors, solver). Query-time settings are :class:`SearchParams`.

    ``k_i``: anchor items of the stored CUR factors (default 100; a search may ask for another
    ``k_i``, solved on first use and cached). ``anchor_method``: ``random`` | ``qr`` | ``kmeans-r`` |
    ``kmeans-de`` (see :func:`retrieval.crossencoder.cur.select_anchor_items`). ``solver``: ``ridge``
    (default, ``ridge`` relative to ``s_1^2`` of the centred intersection, default 1e-3) |
    ``truncated`` (``rank``) | ``pinv``. ``seed``: anchor sampling / k-means seed. ``chunk_size``:
    items per resumable indexing chunk (each chunk costs ``k_q * chunk_size`` calls).
    """

    k_i: int = 100
    anchor_method: str = "qr"
    solver: str = "ridge"
    ridge: float = 1e-3
    rank: int | None = None
    seed: int = 0
    chunk_size: int = 64

    def validate(self) -> BuildParams:
        if not isinstance(self.k_i, int) or self.k_i < 1:
            raise InvalidArgument(f"k_i must be a positive integer, got {self.k_i!r}")
        if self.anchor_method not in ANCHOR_METHODS:
            raise InvalidArgument(f"unknown anchor_method {self.anchor_method!r}; valid: {', '.join(ANCHOR_METHODS)}")
        if self.solver not in SOLVERS:
            raise InvalidArgument(f"unknown solver {self.solver!r}; valid solvers: {', '.join(SOLVERS)}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise InvalidArgument(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidArgument(f"rank must be a positive integer or None, got {self.rank!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise InvalidArgument(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        return self

    @classmethod
    def from_any(cls, p: BuildParams | dict[str, Any] | None) -> BuildParams:
        if p is None:
            return cls().validate()
        if isinstance(p, cls):
            return p.validate()
        if isinstance(p, dict):
            bad = set(p) - {f.name for f in dataclasses.fields(cls)}
            if bad:
                raise InvalidArgument(f"unknown build parameters {sorted(bad)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**p).validate()
        raise InvalidArgument(f"build params must be BuildParams or a dict, got {type(p).__name__}")


@dataclasses.dataclass(frozen=True)
class SearchParams:
    """Query-time settings.

    ``mode``: one of ``MODES`` (``cur``, ``adaptive``, ``adaptive-seeded``, ``rerank``).
    ``budget``: cross-encoder calls per query (default 100; at least ``k`` and the mode's minimum).
    ``k_i``: ``cur`` only, anchor-item calls; ``None``/``"auto"`` =
    ``min(index k_i, max((budget - k) // 2, budget // 4))``, the rest (``k_r = budget - k_i``) reranks. ``rounds``: adaptive rounds (default 10).
    ``seed_fraction``: ``adaptive-seeded`` only, share of round one taken from the dual encoder's top
    candidates (default 0.5; the rest are anchor items). ``ridge``: adaptive least-squares ridge
    (relative to ``s_1^2``, default 1e-3).
    """

    mode: str = "adaptive"
    budget: int = 100
    k_i: int | str | None = None
    rounds: int = 10
    seed_fraction: float = 0.5
    ridge: float = 1e-3

    @classmethod
    def from_any(cls, p: SearchParams | dict[str, Any] | None) -> SearchParams:
        if p is None:
            return cls()
        if isinstance(p, cls):
            return p
        if isinstance(p, dict):
            bad = set(p) - {f.name for f in dataclasses.fields(cls)}
            if bad:
                raise InvalidArgument(f"unknown search parameters {sorted(bad)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
            return cls(**p)
        raise InvalidArgument(f"search params must be SearchParams or a dict, got {type(p).__name__}")


@dataclasses.dataclass
class SearchResult:
    """One query's answer. ``ids`` (k,) int64 padded with -1; ``scores`` (k,) float32 exact
    cross-encoder scores, best first, padded with -inf. ``calls``: cross-encoder calls spent.
    ``scorer_seconds``: time inside the scorer; ``other_seconds``: everything else (embedding solve,
    vector search, dual encoder, bookkeeping). In a batch, the batch's scorer time is shared out in
    proportion to calls. ``truncated_pairs``: pairs whose query or item was cut to the model's limit;
    ``query_truncated``: whether the query itself was cut."""

    ids: np.ndarray
    scores: np.ndarray
    calls: int
    scorer_seconds: float
    other_seconds: float
    mode: str
    k_i: int
    k_r: int
    rounds: int
    truncated_pairs: int
    query_truncated: bool

    @property
    def total_seconds(self) -> float:
        return self.scorer_seconds + self.other_seconds

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ids"] = self.ids.tolist()
        d["scores"] = [float(x) for x in self.scores]
        return d


# ------------------------------------------------------------------------------------------------
# Persistence helpers
# ------------------------------------------------------------------------------------------------
def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of an index folder (no scorer needed); :class:`NotFound` if there is none."""
    p = Path(path) / "meta.json"
    if not p.is_file():
        raise NotFound(f"no cross-encoder index at {str(path)!r} (meta.json missing)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise FailedPrecondition(f"index at {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


# ------------------------------------------------------------------------------------------------
# Search modes (a registry by name)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    mode: str
    budget: int
    k_i: int
    k_r: int
    cur: CurFactors | None = None  # ``cur`` mode: the factors of the (alive) anchor items searched


MODES: dict[str, Callable[..., kernels.KernelOutput]] = {}
_MIN_BUDGET = {"cur": 2, "adaptive": 2, "adaptive-seeded": 2, "rerank": 1}
_NEEDS_DE = {"adaptive-seeded", "rerank"}


def _register_mode(name: str):
    def deco(fn):
        MODES[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------
class CrossEncoderIndex(IndexWrites):
    """A persisted ANNCUR / adaptive index over item texts. Open with :meth:`load`.

    Public read-only views: ``ids`` (alive item ids), ``k_q``, ``k_i``, ``anchor_queries``,
    ``anchor_item_ids``, ``fingerprint``, :meth:`item_embeddings` (the CUR embeddings, ready for an
    inner-product vector collection), :meth:`describe`.
    """

    def __init__(self, path: Path, meta: dict[str, Any], scorer: Scorer, dual_encoder: DualEncoder | None) -> None:
        self.path = path
        self.scorer = scorer
        self.dual_encoder = dual_encoder
        self._meta = meta
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.anchor_queries: list[str] = json.loads((path / "anchor_queries.json").read_text())
        self._state = self._load_state()

    # --- opening -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], scorer: Scorer | dict[str, Any],
             dual_encoder: DualEncoder | dict[str, Any] | None = None) -> CrossEncoderIndex:
        """Open the index at ``path`` with ``scorer`` (and the dual encoder it was built with, if any).

        Raises :class:`NotFound` without an index there and :class:`FailedPrecondition` when the
        scorer's (or dual encoder's) fingerprint differs from the stored one.
        """
        p = Path(path)
        meta = read_meta(p)
        sc = scorer_from_spec(scorer)
        check_fingerprint(meta["scorer"], sc.fingerprint(), what=f"index at {str(p)!r}")
        de = dual_encoder_from_spec(dual_encoder)
        if meta.get("dual_encoder") and de is not None:
            check_fingerprint(meta["dual_encoder"], de.fingerprint(), what=f"index at {str(p)!r} (dual encoder)")
        if de is not None and not meta.get("dual_encoder"):
            raise FailedPrecondition(
                f"index at {str(p)!r} was built without a dual encoder, so it has no item embeddings for one; rebuild it with dual_encoder"
            )
        return cls(p, meta, sc, de)

    def _load_state(self) -> _State:
        m = self._meta
        n, kq = int(m["n_rows"]), int(m["k_q"])
        RT = _open_f32(self.path / "R.f32", n, kq)
        alive = np.fromfile(self.path / "alive.u8", dtype=np.uint8, count=n).astype(bool) if n else np.zeros(0, bool)
        ids = np.empty(n, dtype=np.int64)
        texts: list[str] = []
        with open(self.path / "items.jsonl", "rb") as f:
            for r in range(n):
                rec = json.loads(f.readline())
                ids[r] = rec["id"]
                texts.append(rec["text"])
        gen = int(m["cur_gen"])
        z = np.load(self.path / f"cur-{gen}.npz")
        k_i = int(z["anchors"].size)
        E = np.array(_open_f32(self.path / f"E-{gen}.f32", n, k_i))
        cur = CurFactors(z["anchors"].astype(np.int64), z["U"], z["mu"], E)
        de = None
        if m.get("de_dim"):
            de = np.array(_open_f32(self.path / "de.f32", n, int(m["de_dim"])))
        row_of = {int(ids[r]): r for r in range(n) if alive[r]}
        return _State(0, n, RT, alive, ids, tuple(texts), row_of, cur, de)

    # --- read-only views ---------------------------------------------------------------------
    @property
    def k_q(self) -> int:
        return int(self._meta["k_q"])

    @property
    def k_i(self) -> int:
        return int(self._state.cur.anchors.size)

    @property
    def build_params(self) -> BuildParams:
        return BuildParams(**self._meta["build"])

    @property
    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint.from_dict(self._meta["scorer"])

    @property
    def n_items(self) -> int:
        return self._state.n_alive

    @property
    def ids(self) -> np.ndarray:
        st = self._state
        return st.ids[st.alive].copy()

    @property
    def anchor_item_ids(self) -> np.ndarray:
        st = self._state
        return st.ids[st.cur.anchors].copy()

    @property
    def R(self) -> np.ndarray:
        """The (k_q x n_rows) anchor-query x item score matrix (a read-only memmap view, all rows)."""
        return self._state.RT.T

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,), E (n x k_i) float32)`` of the alive items: the ANNCUR item embeddings. The query
        embedding is the centred vector of its scores against :attr:`anchor_item_ids` (in that order);
        inner product ranks items by approximate cross-encoder score."""
        st = self._state
        return st.ids[st.alive].copy(), np.asarray(st.cur.E[st.alive]).copy()

    def get_items(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """``{"id", "text", "payload"}`` of alive items; :class:`NotFound` for an unknown id."""
        st = self._state
        rows = []
        for i in ids:
            if int(i) not in st.row_of:
                raise NotFound(f"item id {int(i)} is not in the index")
            rows.append(st.row_of[int(i)])
        out = []
        want = set(rows)
        with open(self.path / "items.jsonl", "rb") as f:
            recs = {r: json.loads(line) for r, line in enumerate(f) if r in want}
        for r in rows:
            out.append(recs[r])
        return out

    def describe(self) -> dict[str, Any]:
        """Anchors, scorer fingerprint, sizes and budget defaults (JSON-serialisable)."""
        st = self._state
        d = SearchParams()
        return {
            "path": str(self.path),
            "format": FORMAT,
            "n_items": st.n_alive,
            "n_rows": st.n_rows,
            "k_q": self.k_q,
            "k_i": int(st.cur.anchors.size),
            "anchor_queries": list(self.anchor_queries),
            "anchor_item_ids": st.ids[st.cur.anchors].tolist(),
            "scorer": self._meta["scorer"],
            "dual_encoder": self._meta.get("dual_encoder"),
            "build": self._meta["build"],
            "build_stats": self._meta.get("build_stats", {}),
            "modes": sorted(MODES),
            "search_defaults": dataclasses.asdict(d),
            "min_budget": dict(_MIN_BUDGET),
        }

    # --- caches ------------------------------------------------------------------------------
    def _cached(self, key: tuple, make: Callable[[], Any], maxsize: int = 16) -> Any:
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        val = make()
        with self._cache_lock:
            self._cache[key] = val
            while len(self._cache) > maxsize:
                self._cache.popitem(last=False)
        return val

    def _alive_rows(self, st: _State) -> np.ndarray:
        return np.flatnonzero(st.alive)

    def _anchor_set(self, st: _State, n: int) -> np.ndarray:
        """``n`` anchor items chosen by the index's anchor method among alive rows (cached)."""
        bp = self.build_params
        method = bp.anchor_method
        if method == "kmeans-de" and st.de is None:
            method = "qr"
        return self._cached(
            ("anchors", st.gen, n, method, bp.seed),
            lambda: select_anchor_items(method, n, st.RT, self._alive_rows(st), st.de, bp.seed),
        )

    def _cur_for(self, st: _State, k_i: int) -> CurFactors:
        """CUR factors for ``k_i`` anchor items, all alive. ``k_i`` = the stored count: the stored
        anchors, less the deleted ones (factors re-solved from ``R`` over the alive ones, no call,
        cached per state; fewer than ``k_i`` anchors then); any other ``k_i`` (or every stored anchor
        deleted): ``k_i`` anchors picked among the alive items by the index's anchor method."""
        stored = st.cur
        bp = self.build_params
        if k_i == stored.anchors.size:
            live = stored.anchors[st.alive[stored.anchors]]
            if live.size == stored.anchors.size:
                return stored
            if live.size:
                def make_live() -> CurFactors:
                    t0 = time.perf_counter()
                    f = solve_cur(st.RT, live, bp.solver, bp.ridge, bp.rank)
                    logger.info("re-solved CUR factors over the %d alive of %d stored anchor items in %.3fs (cached)",
                                live.size, stored.anchors.size, time.perf_counter() - t0)
                    return f

                return self._cached(("cur-live", st.gen), make_live)

        def make() -> CurFactors:
            t0 = time.perf_counter()
            f = solve_cur(st.RT, self._anchor_set(st, k_i), bp.solver, bp.ridge, bp.rank)
            logger.info("solved CUR factors for k_i=%d on the fly in %.3fs (cached)", k_i, time.perf_counter() - t0)
            return f

        return self._cached(("cur", st.gen, k_i), make)

    # --- search ------------------------------------------------------------------------------
    def _plan(self, st: _State, k: int, p: SearchParams) -> _Plan:
        if p.mode not in MODES:
            raise InvalidArgument(f"unknown search mode {p.mode!r}; valid modes: {', '.join(sorted(MODES))}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}")
        if not isinstance(p.budget, (int, np.integer)) or isinstance(p.budget, bool):
            raise InvalidArgument(f"budget must be an integer number of cross-encoder calls, got {p.budget!r}")
        if p.budget < k:
            raise InvalidArgument(
                f"budget {p.budget} is below k = {k}: every returned item is scored exactly, so the budget must be at least k"
            )
        if p.budget < _MIN_BUDGET[p.mode]:
            raise InvalidArgument(f"budget {p.budget} is below the minimum of mode {p.mode!r} ({_MIN_BUDGET[p.mode]} calls)")
        if p.mode in _NEEDS_DE and (st.de is None or self.dual_encoder is None):
            raise FailedPrecondition(
                f"mode {p.mode!r} needs a dual encoder: build the index with dual_encoder and load it with the same one"
            )
        if not isinstance(p.rounds, int) or p.rounds < 1:
            raise InvalidArgument(f"rounds must be a positive integer, got {p.rounds!r}")
        if not 0.0 <= float(p.seed_fraction) <= 1.0:
            raise InvalidArgument(f"seed_fraction must be in [0, 1], got {p.seed_fraction!r}")
        if not (math.isfinite(p.ridge) and p.ridge >= 0):
            raise InvalidArgument(f"ridge must be a finite number >= 0, got {p.ridge!r}")
        if st.n_alive == 0:
            raise FailedPrecondition("the index has no items")
        budget = int(min(p.budget, st.n_alive))
        k_i = k_r = 0
        if p.mode == "cur":
            if p.k_i is None or p.k_i == "auto":
                # Measured on the fixture (bench/crossencoder, split sweep): about half of what is
                # left after the k results for small k, a quarter of the budget when k ~ budget.
                k_i = max(1, min(int(st.cur.anchors.size), max((p.budget - k) // 2, p.budget // 4), st.n_alive))
            else:
                if not isinstance(p.k_i, (int, np.integer)) or isinstance(p.k_i, bool) or p.k_i < 1:
                    raise InvalidArgument(f"k_i must be a positive integer or 'auto', got {p.k_i!r}")
                if p.k_i > p.budget:
                    raise InvalidArgument(f"k_i = {p.k_i} anchor-item calls exceed the budget of {p.budget} calls")
                if p.k_i > st.n_alive:
                    raise InvalidArgument(f"k_i = {p.k_i} exceeds the {st.n_alive} items in the index")
                k_i = int(p.k_i)
            # Dead stored anchors are dropped (see _cur_for): k_i is what the anchors cost, and the
            # rerank step may take every other alive item, so budget >= alive items is exhaustive.
            cur = self._cur_for(st, k_i)
            k_i = int(cur.anchors.size)
            k_r = max(0, min(p.budget - k_i, st.n_alive - k_i))
            return _Plan(p.mode, k_i + k_r, k_i, k_r, cur)
        return _Plan(p.mode, budget, k_i, k_r)

    def search(self, query: str, k: int = 10, params: SearchParams | dict[str, Any] | None = None) -> SearchResult:
        """Top-``k`` items for ``query`` within ``params.budget`` cross-encoder calls."""
        return self.search_batch([query], k, params)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10,
                     params: SearchParams | dict[str, Any] | None = None) -> list[SearchResult]:
        """:meth:`search` for several queries; each round is one scorer call for the whole batch."""
        t0 = time.perf_counter()
        queries = validate_texts(queries, "queries")
        if not queries:
            return []
        p = SearchParams.from_any(params)
        st = self._state
        plan = self._plan(st, k, p)
        stats = CallStats()
        per_q_trunc = np.zeros(len(queries), dtype=np.int64)
        q_trunc = np.zeros(len(queries), dtype=bool)
        texts = st.texts

        def score(qidx: np.ndarray, rows: np.ndarray) -> np.ndarray:
            s, tq, ti = self.scorer.score_detailed([queries[i] for i in qidx], [texts[r] for r in rows], stats)
            np.add.at(per_q_trunc, qidx, (tq | ti).astype(np.int64))
            q_trunc[qidx[tq]] = True
            return s

        out = MODES[plan.mode](self, st, queries, k, p, plan, score)
        wall = time.perf_counter() - t0
        total_calls = max(int(out.calls.sum()), 1)
        results = []
        for q in range(len(queries)):
            rows = out.rows[q]
            ids = np.where(rows >= 0, st.ids[np.maximum(rows, 0)], -1).astype(np.int64)
            share = float(out.calls[q]) / total_calls
            sc_s = stats.seconds * share
            results.append(SearchResult(
                ids=ids, scores=out.scores[q].copy(), calls=int(out.calls[q]),
                scorer_seconds=sc_s, other_seconds=max(0.0, (wall - stats.seconds) * (1.0 / len(queries))),
                mode=plan.mode, k_i=plan.k_i, k_r=plan.k_r, rounds=out.rounds,
                truncated_pairs=int(per_q_trunc[q]), query_truncated=bool(q_trunc[q]),
            ))
        return results


# ------------------------------------------------------------------------------------------------
# Mode implementations
# ------------------------------------------------------------------------------------------------
@_register_mode("cur")
def _mode_cur(index: CrossEncoderIndex, st: _State, queries, k, p: SearchParams, plan: _Plan, score):
    cur = plan.cur if plan.cur is not None else index._cur_for(st, plan.k_i)
    return kernels.cur_search(score, len(queries), cur.E, cur.anchors, st.alive, k, plan.k_r)


def _first_round(index: CrossEncoderIndex, st: _State, queries, p: SearchParams, plan: _Plan, seeded: bool):
    n1 = kernels.round_sizes(plan.budget, p.rounds)[0]
    anchors = index._anchor_set(st, min(n1, st.n_alive))
    if not seeded:
        return [anchors] * len(queries)
    n_de = int(round(p.seed_fraction * n1))
    dq = index.dual_encoder.encode(queries)
    out = []
    for q in range(len(queries)):
        top = kernels.topk_rows(st.de @ dq[q], n_de, ~st.alive) if n_de else np.empty(0, np.int64)
        rest = anchors[~np.isin(anchors, top)][: n1 - top.size]
        out.append(np.concatenate([top, rest]))
    return out


@_register_mode("adaptive")
def _mode_adaptive(index: CrossEncoderIndex, st: _State, queries, k, p: SearchParams, plan: _Plan, score):
    first = _first_round(index, st, queries, p, plan, seeded=False)
    return kernels.adaptive_search(score, len(queries), st.RT, st.alive, k, plan.budget, p.rounds, first, p.ridge)


@_register_mode("adaptive-seeded")
def _mode_adaptive_seeded(index: CrossEncoderIndex, st: _State, queries, k, p: SearchParams, plan: _Plan, score):
    first = _first_round(index, st, queries, p, plan, seeded=True)
    return kernels.adaptive_search(score, len(queries), st.RT, st.alive, k, plan.budget, p.rounds, first, p.ridge)


@_register_mode("rerank")
def _mode_rerank(index: CrossEncoderIndex, st: _State, queries, k, p: SearchParams, plan: _Plan, score):
    dq = index.dual_encoder.encode(queries)
    return kernels.rerank_search(score, len(queries), dq, st.de, st.alive, k, plan.budget)
