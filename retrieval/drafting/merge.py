"""Scoring and merging candidate tries into one draft within a budget.

Scoring (the estimated acceptance probability of a node)
--------------------------------------------------------
Each source proposes a trie. For a node ``v`` (parent ``u``) of source ``s`` the merger estimates the
conditional acceptance ``q_s(v) = P(v accepted | u accepted)`` by a Beta-binomial average between the
source's prior (see :func:`retrieval.drafting.base.trie_candidates`) and what the verifier actually did
with earlier nodes of the same calibration bucket ``f`` (hits ``h`` out of ``t`` nodes whose parent was
accepted):

    q_s(v) = (h[s, f] + S * prior(v)) / (t[s, f] + S)          (S = prior strength, default 4)

The path probability is the product along the path, ``p_s(v) = q_s(v) * p_s(u)`` (``p = 1`` at the root).
Tries of several sources are united on token paths; a path proposed by several sources gets

    p(v) = 1 - prod_s (1 - p_s(v))          ("noisy-or"; "max" is the alternative)

Both rules keep ``p(child) <= p(parent)``. Under greedy verification the expected number of accepted
draft tokens of a tree ``T`` is ``sum_{v in T} p(v)`` (each accepted token is one node on the accepted
path), so keeping the ``max_nodes`` nodes of highest ``p`` (depth ``<= max_depth``) maximizes the
estimate; the kept set is closed under ancestors because ``p`` does not increase down a path and ties
are broken parent-first. A chain keeps the best child at each level.

Calibration learns only from verification results the client sends anyway (accepted tokens): after
each step every candidate node whose parent path was accepted counts as a trial, and it is a hit when
the verifier accepted its token. Nodes that were proposed but not selected are scored too, so the
estimate is not biased by the selection. No model logits are used.

Thread-safety: :class:`Calibrator` updates hold a lock; reads are lock-free (a torn read of two
counters only perturbs one estimate). :func:`merge` is pure.
"""

from __future__ import annotations

import threading

import numpy as np

from retrieval.drafting.base import Candidates
from retrieval.drafting.draft import Draft, DraftBudget
from retrieval.errors import InvalidArgument


class Calibrator:
    """Per-source, per-bucket hit / trial counters. ``strength`` = weight of the prior in node counts."""

    def __init__(self, strength: float = 4.0) -> None:
        if not strength > 0:
            raise InvalidArgument(f"calibration strength must be > 0, got {strength}")
        self.strength = float(strength)
        self._hits: dict[str, np.ndarray] = {}
        self._trials: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _tables(self, source: str, n_feat: int) -> tuple[np.ndarray, np.ndarray]:
        h = self._hits.get(source)
        if h is None or len(h) < n_feat:
            with self._lock:
                h = self._hits.get(source)
                if h is None or len(h) < n_feat:
                    old_h, old_t = self._hits.get(source), self._trials.get(source)
                    h, t = np.zeros(n_feat), np.zeros(n_feat)
                    if old_h is not None:
                        h[: len(old_h)], t[: len(old_t)] = old_h, old_t
                    self._trials[source] = t
                    self._hits[source] = h
        return self._hits[source], self._trials[source]

    def conditional(self, c: Candidates) -> np.ndarray:
        """``(m,)`` calibrated ``P(node accepted | parent accepted)`` of the candidates."""
        if len(c) == 0:
            return np.zeros(0)
        h, t = self._tables(c.source, int(c.feat.max()) + 1)
        return (h[c.feat] + self.strength * c.prior) / (t[c.feat] + self.strength)

    def update(self, cands: list[Candidates], true_next: np.ndarray) -> None:
        """Score earlier candidates against the tokens that followed (``true_next``: accepted + bonus)."""
        true_next = np.asarray(true_next)
        T = len(true_next)
        if T == 0:
            return
        for c in cands:
            if len(c) == 0:
                continue
            tried, hit = evaluate_trie(c.tokens, c.parents, true_next, c.depth, levels_of(c))
            if not tried.any():
                continue
            h, t = self._tables(c.source, int(c.feat.max()) + 1)
            with self._lock:
                np.add.at(t, c.feat[tried], 1.0)
                np.add.at(h, c.feat[hit], 1.0)

    def table(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (hits, trials) of one source (for reports)."""
        h, t = self._hits.get(source), self._trials.get(source)
        if h is None:
            return np.zeros(0), np.zeros(0)
        return h.copy(), t.copy()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._hits.values()) + sum(a.nbytes for a in self._trials.values())


def _levels(depth: np.ndarray) -> list[tuple[int, int, int]]:
    """``(d, lo, hi)``: nodes ``lo:hi`` have depth ``d`` (``depth`` non-decreasing)."""
    if len(depth) == 0:
        return []
    cut = np.flatnonzero(np.diff(depth)) + 1
    b = np.concatenate([[0], cut, [len(depth)]]).tolist()
    dl = depth[b[:-1]].tolist()
    return [(dl[i], b[i], b[i + 1]) for i in range(len(dl))]


def evaluate_trie(tokens: np.ndarray, parents: np.ndarray, true_next: np.ndarray,
                  depth: np.ndarray | None = None, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes were tried (parent path accepted, depth within ``len(true_next)``) and which hit.

    ``tokens``/``parents`` a BFS-ordered trie (``depth`` non-decreasing; computed when not given);
    returns two ``(m,)`` bool arrays.
    """
    from retrieval.drafting.draft import tree_depths

    m = len(tokens)
    tried = np.zeros(m, dtype=bool)
    hit = np.zeros(m, dtype=bool)
    if depth is None:
        depth = tree_depths(parents)
    T = len(true_next)
    for d, lo, hi in (levels if levels is not None else _levels(depth)):
        if d > T:
            break
        par = parents[lo:hi]
        ok = par < 0 if d == 1 else hit[np.maximum(par, 0)] & (par >= 0)
        tried[lo:hi] = ok
        hit[lo:hi] = ok & (tokens[lo:hi] == true_next[d - 1])
        if not hit[lo:hi].any():
            break
    return tried, hit


_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so h -> h * P is a bijection mod 2**64


def levels_of(c: Candidates) -> list[tuple[int, int, int]]:
    """:func:`_levels` of a candidate trie, cached on it."""
    lv = getattr(c, "_levels", None)
    if lv is None:
        lv = _levels(c.depth)
        c._levels = lv
    return lv


def path_hashes(tokens: np.ndarray, parents: np.ndarray, depth: np.ndarray, levels=None) -> np.ndarray:
    """``(m,)`` uint64 polynomial hash of each node's token path (root excluded), level by level:
    ``h(v) = h(parent) * P + token + 1 (mod 2**64)``, ``h(root) = 0``. The merger keys on (depth, hash)."""
    h = np.zeros(len(tokens), dtype=np.uint64)
    t = tokens.astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        for d, lo, hi in (levels if levels is not None else _levels(depth)):
            if d == 1:
                h[lo:hi] = t[lo:hi]
            else:
                h[lo:hi] = h[parents[lo:hi]] * _PRIME + t[lo:hi]
    # fold the depth into the top byte so paths of different depths never share a key
    return (h & np.uint64((1 << 56) - 1)) | (depth.astype(np.uint64) << np.uint64(56))


def merge(cands: list[Candidates], budget: DraftBudget, calibrator: Calibrator | None = None,
          combine: str = "noisy_or") -> Draft:
    """One draft from the candidate tries of several sources, within ``budget`` (see module doc).

    All tries are processed together, level by level: path probabilities ``p_s(v)`` and 64-bit path keys
    (:func:`path_hashes`' rule, depth in the top byte). Nodes with equal keys are the same token path;
    a collision between two different paths of one depth would at worst merge two proposals into one
    node, never produce an invalid tree.
    """
    if combine not in ("noisy_or", "max"):
        raise InvalidArgument(f"combine={combine!r} is not a merge rule; expected 'noisy_or' or 'max'")
    cap = budget.max_nodes if budget.tree else min(budget.max_nodes, budget.max_depth)
    names: list[str] = []
    TOK, PAR, DEP, Q, SRC = [], [], [], [], []
    base = 0
    for c in cands:
        if len(c) == 0:
            continue
        if c.source not in names:
            names.append(c.source)
        TOK.append(c.tokens)
        PAR.append(np.where(c.parents >= 0, c.parents + base, -1))
        DEP.append(c.depth)
        Q.append(calibrator.conditional(c) if calibrator is not None else c.prior)
        SRC.append(np.full(len(c), names.index(c.source), dtype=np.int64))
        base += len(c)
    if not TOK:
        return Draft.empty()
    dep = np.concatenate(DEP)
    keep = dep <= budget.max_depth  # ancestor-closed
    o = np.argsort(dep, kind="stable")
    o = o[keep[o]]
    N = len(o)
    inv_o = np.full(len(dep), -1, dtype=np.int64)
    inv_o[o] = np.arange(N)
    par = np.concatenate(PAR)[o]
    par = np.where(par >= 0, inv_o[np.maximum(par, 0)], -1)
    tok = np.concatenate(TOK)[o]
    dep = dep[o]
    q = np.concatenate(Q)[o]
    src = np.concatenate(SRC)[o]
    p = np.empty(N)
    h = np.empty(N, dtype=np.uint64)
    t = tok.astype(np.uint64) + np.uint64(1)
    levels = _levels(dep)
    with np.errstate(over="ignore"):
        for d, lo, hi in levels:
            if d == 1:
                p[lo:hi] = q[lo:hi]
                h[lo:hi] = t[lo:hi]
            else:
                pp = par[lo:hi]
                p[lo:hi] = q[lo:hi] * p[pp]
                h[lo:hi] = h[pp] * _PRIME + t[lo:hi]
    key = (h & np.uint64((1 << 56) - 1)) | (dep.astype(np.uint64) << np.uint64(56))
    # group equal keys; keys sort by depth first (top byte), so groups come out in BFS order
    o = np.argsort(key, kind="stable")
    ks = key[o]
    head = np.empty(N, dtype=bool)
    head[0] = True
    np.not_equal(ks[1:], ks[:-1], out=head[1:])
    grp = np.cumsum(head) - 1
    n = int(grp[-1]) + 1
    inv = np.empty(N, dtype=np.int64)
    inv[o] = grp
    first = o[head]
    uk = ks[head]
    if combine == "noisy_or":
        with np.errstate(divide="ignore"):
            Pm = 1.0 - np.exp(np.bincount(inv, weights=np.log1p(-np.minimum(p, 1.0)), minlength=n))
    else:
        Pm = np.zeros(n)
        np.maximum.at(Pm, inv, p)
    # the source credited with a node: the one giving it the highest probability
    best = np.zeros(n)
    np.maximum.at(best, inv, p)
    top = p >= best[inv]
    best_src = np.empty(n, dtype=np.int64)
    best_src[inv[top]] = src[top]
    m_tok, m_dep = tok[first], dep[first]
    m_par = np.where(m_dep > 1, np.searchsorted(uk, key[np.maximum(par[first], 0)]), -1)
    # p(child) <= p(parent), level by level (groups are already in BFS order)
    for d, lo, hi in _levels(m_dep):
        if d > 1:
            Pm[lo:hi] = np.minimum(Pm[lo:hi], Pm[m_par[lo:hi]])
    sel = np.zeros(n, dtype=bool)
    if budget.tree:
        sel[np.lexsort((m_dep, -Pm))[:cap]] = True
    else:
        cur = -1
        for _ in range(cap):
            ch = np.flatnonzero(m_par == cur)
            if len(ch) == 0:
                break
            cur = int(ch[np.argmax(Pm[ch])])
            sel[cur] = True
    idx = np.flatnonzero(sel)
    # topological output order: by depth, then by probability
    idx = idx[np.lexsort((idx, -Pm[idx], m_dep[idx]))]
    remap = np.full(n, -1, dtype=np.int64)
    remap[idx] = np.arange(len(idx))
    parents = np.where(m_par[idx] >= 0, remap[np.maximum(m_par[idx], 0)], -1)
    return Draft(m_tok[idx], parents, Pm[idx], best_src[idx], tuple(names))
