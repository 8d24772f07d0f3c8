"""The draft-source family: one Protocol, capability fields, candidate tries, a registry by name.

A source looks at the context (prompt + accepted output of one generation) and returns zero or more
:class:`Candidates`: a small trie of continuations (tokens + parents, BFS order) with, per node, a
prior estimate of the conditional acceptance probability ``P(node accepted | parent accepted)`` and a
calibration feature (an integer bucket, see :mod:`retrieval.drafting.merge`). The merger turns the
tries of all sources into one draft within the budget.

Sources register a factory under a name (``context``, ``corpus``, ``recycling``, ``history``);
:func:`make_source` builds one by name and lists the valid names on a typo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import numpy as np

from retrieval.core.registry import Registry
from retrieval.drafting.kernels import _prefix_trie_t


@dataclass(frozen=True)
class SourceCaps:
    """What a source can do, declared rather than probed.

    ``shared``: one instance serves every session (its state is not per generation).
    ``learns_online``: :meth:`DraftSource.observe` / ``end_session`` change its state.
    ``uses_model_topk``: it can use the top-k candidate ids a client reports per verified position.
    ``vocab_size``: the vocabulary it was built for (``None``: any vocabulary).
    """

    shared: bool = False
    learns_online: bool = False
    uses_model_topk: bool = False
    vocab_size: int | None = None


@dataclass
class Candidates:
    """One source's candidate continuations of the context, as a trie.

    Arrays are ``(m,)``: ``tokens`` int32; ``parents`` int32, ``-1`` = child of the root, otherwise an
    earlier index (BFS order); ``counts`` float64 support (occurrences, or 1 for rank-based sources);
    ``prior`` float64 in [0, 1], the source's prior for ``P(node accepted | parent accepted)``; ``feat``
    int64 calibration bucket in ``[0, n_feat)``; ``depth`` int32, 1 for children of the root, non-decreasing.
    ``match_len``: length of the context suffix that was matched (0 when not applicable).

    Derived values are remembered on the instance (``levels``; the merger's evaluation against the accepted
    ids and depth buckets), so candidates belong to one session (sources make fresh ones per draft).
    """

    source: str
    tokens: np.ndarray
    parents: np.ndarray
    counts: np.ndarray
    prior: np.ndarray
    feat: np.ndarray
    depth: np.ndarray
    match_len: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def levels(self) -> list[tuple[int, int, int]]:
        """``(d, lo, hi)`` for each depth present: nodes ``lo:hi`` have depth ``d`` (computed once; the
        arrays of a candidate trie are not changed after it is made)."""
        return depth_levels(self.depth)

    def upto(self, max_depth: int) -> int:
        """Number of nodes of depth ``<= max_depth`` (they are a prefix: BFS order)."""
        lv = self.levels
        if not lv or lv[-1][0] <= max_depth:
            return len(self.tokens)
        return next(lo for d, lo, _ in lv if d > max_depth)


def depth_levels(depth: np.ndarray) -> list[tuple[int, int, int]]:
    """``(d, lo, hi)``: nodes ``lo:hi`` have depth ``d`` (``depth`` non-decreasing, 1-D)."""
    n = len(depth)
    if n == 0:
        return []
    cut = np.flatnonzero(depth[1:] != depth[:-1]) + 1
    if len(cut) == 0:
        return [(int(depth[0]), 0, n)]
    b = [0, *cut.tolist(), n]
    dl = depth[b[:-1]].tolist()
    return [(dl[i], b[i], b[i + 1]) for i in range(len(dl))]


@runtime_checkable
class DraftSource(Protocol):
    """A draft source.

    ``propose(ctx, max_depth, max_nodes)``: ``ctx`` is the ``(L,)`` int32 context (prompt + accepted
    output, ``L >= 1``, ids already checked against the vocabulary). Returns a list of
    :class:`Candidates` whose paths are at most ``max_depth`` long; a source may return more than
    ``max_nodes`` nodes (the merger trims), but should not return many more.

    ``observe(ctx, accepted, topk)``: after a verification step ``accepted`` (``(a,)`` int32, the tokens
    appended, bonus included) were appended to ``ctx`` (``ctx`` is the context *before* them);
    ``topk`` is ``None`` or ``(a, k)`` int32, the model's top-k candidates at each of those positions.

    ``end_session(prompt_len, ctx)``: the generation is over; ``ctx[prompt_len:]`` is its output.

    ``nbytes()``: memory held by the source (shared state counted once, by the shared instance).
    ``n_feat``: number of calibration buckets of this source.

    Thread-safety: shared sources (``caps.shared``) must allow ``propose`` from many threads at once and
    serialize their own updates.
    """

    name: str
    caps: SourceCaps
    n_feat: int

    def propose(self, ctx: np.ndarray, max_depth: int, max_nodes: int) -> list[Candidates]: ...

    def observe(self, ctx: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None: ...

    def end_session(self, prompt_len: int, ctx: np.ndarray) -> None: ...

    def nbytes(self) -> int: ...


# --- feature buckets shared by the trie sources (context, corpus, history) -----------------------------

DEPTH_BUCKETS = 8
RATIO_BUCKETS = 11
SUPPORT_EDGES = np.array([1, 2, 4, 8, 16, 64])  # c(parent) <=1, <=2, <=4, <=8, <=16, <=64, >64
MATCH_EDGES = np.array([1, 2, 3, 5, 8, 12])  # match length <=1, 2, 3, <=5, <=8, <=12, >12
TRIE_N_FEAT = DEPTH_BUCKETS * RATIO_BUCKETS * (len(SUPPORT_EDGES) + 1) * (len(MATCH_EDGES) + 1)


def trie_candidates(source: str, tok: np.ndarray, par: np.ndarray, cnt: np.ndarray, dep: np.ndarray,
                    root_count: float, match_len: int, alpha: float = 1.0,
                    match_scale: float = 2.0) -> Candidates:
    """Wrap a counted trie (from :func:`retrieval.drafting.kernels.prefix_trie`) as candidates.

    Prior of node ``v`` with parent ``u`` (``c(root) = root_count``), with ``r = c(v) / c(u)``:

        prior(v) = r * c(u) / (c(u) + alpha) * g(v),   g = m / (m + match_scale) at depth 1, else 1

    The first factor is the empirical continuation frequency, shrunk when the support ``c(u)`` is small
    (one occurrence is weak evidence); ``g`` discounts short suffix matches ``m`` at the first token.
    Calibration bucket: (depth, r in tenths, support c(u), match length).
    """
    par = np.asarray(par)
    return _trie_candidates(source, np.asarray(tok).astype(np.int32), par.astype(np.int32),
                            np.where(par >= 0, par, -1).astype(np.int64), np.asarray(cnt).astype(np.float64),
                            np.asarray(dep).astype(np.int32), np.asarray(dep) == 1, root_count, match_len, alpha,
                            match_scale)


_SUPPORT_EDGES_F = SUPPORT_EDGES.astype(np.float64)


def continuation_candidates(source: str, R: np.ndarray, weights: np.ndarray | None, is_sorted: bool,
                            root_count: float, match_len: int, alpha: float = 1.0,
                            match_scale: float = 2.0) -> Candidates | None:
    """:func:`trie_candidates` of ``prefix_trie(R.T, weights, is_sorted)`` in one pass (``R``: the
    transposed continuation rows, ``(depth, k)``, from :func:`~retrieval.drafting.kernels.gather_continuations_t`);
    ``None`` when the trie is empty."""
    tok, par, par64, cnt, dep, levels = _prefix_trie_t(R, weights, is_sorted)
    if len(tok) == 0:
        return None
    c = _trie_candidates(source, tok, par, par64, cnt, dep, slice(0, levels[0][2]), root_count, match_len, alpha,
                         match_scale)
    c.__dict__["levels"] = levels  # the cached property, known already
    return c


def _trie_candidates(source: str, tok: np.ndarray, par: np.ndarray, par64: np.ndarray, cnt: np.ndarray,
                     dep: np.ndarray, first, root_count: float, match_len: int, alpha: float = 1.0,
                     match_scale: float = 2.0) -> Candidates:
    """:func:`trie_candidates` of fresh arrays of the final dtypes (int32, int32, float64, int32), which the
    candidates then own; ``par64``: the parents as int64; ``first`` selects the depth-1 nodes (a mask, or
    a slice ``[:n]`` of a BFS trie). The float operations are those of the formula, in the same order."""
    n = len(cnt)
    ext = np.empty(n + 1)  # ext[0] = c(root), ext[1 + v] = c(v): c(parent(v)) = ext[parent(v) + 1]
    ext[0] = root_count
    ext[1:] = cnt
    parent_cnt = ext[par64 + 1]
    r = cnt / np.maximum(parent_cnt, 1e-9)
    prior = r * parent_cnt
    prior /= parent_cnt + alpha
    pf = prior[first]
    pf *= match_len
    pf /= match_len + match_scale
    prior[first] = pf
    np.clip(prior, 0.0, 1.0, out=prior)
    # feat = ((db * RATIO_BUCKETS + rb) * (len(SUPPORT_EDGES) + 1) + sb) * (len(MATCH_EDGES) + 1) + mb
    rb = (r * 10).astype(np.int64)
    np.minimum(rb, 10, out=rb)
    feat = np.minimum(dep, DEPTH_BUCKETS).astype(np.int64)
    feat -= 1
    feat *= RATIO_BUCKETS
    feat += rb
    feat *= len(SUPPORT_EDGES) + 1
    feat += _SUPPORT_EDGES_F.searchsorted(parent_cnt, side="left")
    feat *= len(MATCH_EDGES) + 1
    feat += int(np.searchsorted(MATCH_EDGES, match_len, side="left"))
    return Candidates(source, tok, par, cnt, prior, feat, dep, int(match_len))


# --- registry -----------------------------------------------------------------------------------------

SOURCES: Registry[Callable[..., DraftSource]] = Registry("draft source")


def register_source(name: str) -> Callable:
    """Class decorator / function decorator: register a source factory under ``name``."""
    return SOURCES.register(name)


def available_sources() -> list[str]:
    return SOURCES.names()


def source_factory(name: str) -> Callable[..., DraftSource]:
    return SOURCES.get(name)


def make_source(name: str, **params) -> DraftSource:
    """Build a draft source by registered name, e.g. ``make_source("context", max_ngram=6)``."""
    return source_factory(name)(**params)
