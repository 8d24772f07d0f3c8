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

Per-session recalibration (:class:`SessionCorrection`, one per session, issue 19): the shared table pools
every generation, but a summary copies its prompt for tens of tokens and a translation almost never. Each
session also counts, per source and depth, its own hits and the hits the shared estimates predicted for
the same tried nodes, and multiplies the shared ``q_s`` by ``(hits + K) / (expected + K)`` (K = 2) before
path probabilities are formed. It sees the same feedback as the shared table, from this session only.

Thread-safety: :class:`Calibrator` updates hold a lock; reads are lock-free (a torn read of two
counters only perturbs one estimate). :func:`merge` is pure but for the session correction it is given;
:func:`evaluation` remembers its result on the (per-session) candidates.
"""

from __future__ import annotations

import threading

import numpy as np

from retrieval.drafting.base import Candidates, depth_levels
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
        feat = c.feat
        try:  # the tables exist and are long enough (else: made or grown to max(feat) + 1, as _tables does)
            hf, tf = self._hits[c.source][feat], self._trials[c.source][feat]
        except (KeyError, IndexError):
            h, t = self._tables(c.source, int(feat.max()) + 1)
            hf, tf = h[feat], t[feat]
        # (h + S * prior) / (t + S)
        q = c.prior * self.strength
        q += hf
        tf += self.strength
        q /= tf
        return q

    def update(self, cands: list[Candidates], true_next: np.ndarray) -> None:
        """Score earlier candidates against the tokens that followed (``true_next``: accepted + bonus)."""
        true_next = np.asarray(true_next)
        T = len(true_next)
        if T == 0:
            return
        tried_f: dict[str, list[np.ndarray]] = {}
        hit_f: dict[str, list[np.ndarray]] = {}
        for c in cands:
            if len(c) == 0:
                continue
            tried, hit = evaluation(c, true_next)
            ft = c.feat[tried]
            if len(ft) == 0:
                continue
            tried_f.setdefault(c.source, []).append(ft)
            hit_f.setdefault(c.source, []).append(c.feat[hit])
        for source, parts in tried_f.items():
            ft = parts[0] if len(parts) == 1 else np.concatenate(parts)
            hp = hit_f[source]
            fh = hp[0] if len(hp) == 1 else np.concatenate(hp)
            h, t = self._tables(source, int(ft.max()) + 1)
            with self._lock:
                np.add.at(t, ft, 1.0)
                np.add.at(h, fh, 1.0)

    def table(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (hits, trials) of one source (for reports)."""
        h, t = self._hits.get(source), self._trials.get(source)
        if h is None:
            return np.zeros(0), np.zeros(0)
        return h.copy(), t.copy()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._hits.values()) + sum(a.nbytes for a in self._trials.values())


class SessionCorrection:
    """Per-session online recalibration of the shared estimates (one per generation, never shared).

    The shared :class:`Calibrator` pools every session; generations differ (a summary copies its prompt
    for tens of tokens, a translation almost never). Per source and depth bucket ``b`` the session keeps
    its own hits ``H[s, b]`` and the hits the shared estimates expected ``E[s, b] = sum q`` over the same
    tried nodes, both decayed by ``decay`` per verification step, and scales the shared estimate:

        q'(v) = min(q(v) * (H + K) / (E + K), cap)      (K = ``strength`` expected hits of prior weight)

    Learned only from the accepted ids of this session; nothing is tuned per request.
    """

    def __init__(self, strength: float = 2.0, decay: float = 1.0, depth_buckets: int = 4, cap: float = 0.98) -> None:
        if not strength > 0 or not 0 < decay <= 1 or depth_buckets < 1 or not 0 < cap <= 1:
            raise InvalidArgument(f"session correction needs strength > 0, 0 < decay <= 1, depth_buckets >= 1 and "
                                  f"0 < cap <= 1, got {strength}, {decay}, {depth_buckets}, {cap}")
        self.strength, self.decay, self.nb, self.cap = float(strength), float(decay), int(depth_buckets), float(cap)
        self._H: dict[str, np.ndarray] = {}
        self._E: dict[str, np.ndarray] = {}
        self._pending: list[tuple[Candidates, np.ndarray]] = []

    def _bucket(self, c: Candidates) -> np.ndarray:
        """``min(depth, nb) - 1`` of each node of ``c`` (remembered on ``c``: adjust and update both need it;
        shared, do not modify)."""
        memo = c.__dict__.get("_depth_bucket")
        if memo is not None and memo[0] == self.nb:
            return memo[1]
        b = np.minimum(c.depth, self.nb) - 1
        c.__dict__["_depth_bucket"] = (self.nb, b)
        return b

    def adjust(self, c: Candidates, q: np.ndarray) -> np.ndarray:
        """The corrected estimates of ``c`` (``q``: the shared ones, remembered for :meth:`update`)."""
        self._pending.append((c, q))
        H = self._H.get(c.source)
        if H is None:
            return q
        f = (H + self.strength) / (self._E[c.source] + self.strength)
        x = f[self._bucket(c)[: len(q)]]  # q may cover a BFS prefix (the trie cut at the budget's depth)
        x *= q  # q * f[b]
        np.minimum(x, self.cap, out=x)
        return x

    def take_pending(self) -> list[tuple[Candidates, np.ndarray]]:
        """The candidates (and shared estimates) of the drafts since the last call, to score later."""
        pending, self._pending = self._pending, []
        return pending

    def update(self, true_next: np.ndarray, pending: list | None = None) -> None:
        """Score the last draft's candidates (or ``pending``, from :meth:`take_pending`) against the
        tokens that followed it (accepted + bonus)."""
        if pending is None:
            pending = self.take_pending()
        true_next = np.asarray(true_next)
        if len(true_next) == 0:
            return
        if self.decay < 1.0:
            for k in self._H:
                self._H[k] *= self.decay
                self._E[k] *= self.decay
        for c, q in pending:
            if len(c) == 0:
                continue
            # the first len(q) nodes (a BFS prefix) score as they do in the whole trie
            tried, hit = evaluation(c, true_next)
            k = len(q)
            tried, hit = tried[:k], hit[:k]
            if not tried.any():
                continue
            H = self._H.get(c.source)
            if H is None:
                H = self._H[c.source] = np.zeros(self.nb)
                self._E[c.source] = np.zeros(self.nb)
            b = self._bucket(c)[: len(q)]
            np.add.at(H, b[hit], 1.0)
            np.add.at(self._E[c.source], b[tried], q[tried])

    def discard_pending(self) -> None:
        self._pending = []

    def nbytes(self) -> int:
        return 16 * self.nb * len(self._H)


def evaluate_trie(tokens: np.ndarray, parents: np.ndarray, true_next: np.ndarray,
                  depth: np.ndarray | None = None, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """Which nodes were tried (parent path accepted, depth within ``len(true_next)``) and which hit.

    ``tokens``/``parents`` a BFS-ordered trie (``depth`` non-decreasing; computed when not given);
    returns two ``(m,)`` bool arrays. The nodes of a BFS prefix ``[:k]`` of the trie score the same in the
    prefix as in the whole trie.
    """
    from retrieval.drafting.draft import tree_depths

    m = len(tokens)
    tried = np.zeros(m, dtype=bool)
    hitx = np.zeros(m + 1, dtype=bool)  # hitx[m] stays False: hitx[-1] (a parent -1) reads "not hit"
    if depth is None:
        depth = tree_depths(parents)
    tn = np.asarray(true_next).tolist()
    T = len(tn)
    for d, lo, hi in (levels if levels is not None else depth_levels(depth)):
        if d > T:
            break
        par = parents[lo:hi]
        ok = par < 0 if d == 1 else hitx[par]
        tried[lo:hi] = ok
        h = tokens[lo:hi] == tn[d - 1]
        h &= ok
        hitx[lo:hi] = h
        if not h.any():
            break
    return tried, hitx[:m]


def evaluation(c: Candidates, true_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate_trie` of ``c`` against ``true_next``, remembered on ``c`` (the session correction and
    the shared calibration score the same candidates against the same accepted ids). The arrays are shared:
    do not modify them."""
    key = (true_next.dtype.str, true_next.tobytes())
    memo = c.__dict__.get("_evaluation")
    if memo is not None and memo[0] == key:
        return memo[1], memo[2]
    tried, hit = evaluate_trie(c.tokens, c.parents, true_next, c.depth, c.levels)
    c.__dict__["_evaluation"] = (key, tried, hit)
    return tried, hit


_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so h -> h * P is a bijection mod 2**64


def path_hashes(tokens: np.ndarray, parents: np.ndarray, depth: np.ndarray, levels=None) -> np.ndarray:
    """``(m,)`` uint64 polynomial hash of each node's token path (root excluded), level by level:
    ``h(v) = h(parent) * P + token + 1 (mod 2**64)``, ``h(root) = 0``. The merger keys on (depth, hash)."""
    h = np.zeros(len(tokens), dtype=np.uint64)
    t = tokens.astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        for d, lo, hi in (levels if levels is not None else depth_levels(depth)):
            if d == 1:
                h[lo:hi] = t[lo:hi]
            else:
                h[lo:hi] = h[parents[lo:hi]] * _PRIME + t[lo:hi]
    # fold the depth into the top byte so paths of different depths never share a key
    return (h & np.uint64((1 << 56) - 1)) | (depth.astype(np.uint64) << np.uint64(56))


def merge(cands: list[Candidates], budget: DraftBudget, calibrator: Calibrator | None = None,
          combine: str = "noisy_or", correction: SessionCorrection | None = None) -> Draft:
    """One draft from the candidate tries of several sources, within ``budget`` (see module doc).

    All tries are processed together, level by level: path probabilities ``p_s(v)`` and 64-bit path keys
    (:func:`path_hashes`' rule, depth in the top byte). Nodes with equal keys are the same token path;
    a collision between two different paths of one depth would at worst merge two proposals into one
    node, never produce an invalid tree.

    Layout: index 0 of the working arrays is the root (``p = 1``, hash 0, depth 0), so every level is
    ``x[lo:hi] = f(x[parent[lo:hi]])`` with no special case; the nodes of depth ``> max_depth`` are a
    suffix of each (BFS-ordered) trie and are sliced off before anything is computed.
    """
    if combine not in ("noisy_or", "max"):
        raise InvalidArgument(f"combine={combine!r} is not a merge rule; expected 'noisy_or' or 'max'")
    cap = budget.max_nodes if budget.tree else min(budget.max_nodes, budget.max_depth)
    names: list[str] = []
    TOK, PAR, DEP, Q = [_ROOT_TOK], [_ROOT_PAR], [_ROOT_DEP], [_ONE]
    sizes, srcs, bases = [1], [0], [0]
    base = 1
    for c in cands:
        k = c.upto(budget.max_depth) if len(c) else 0
        if k == 0:
            continue
        if c.source not in names:
            names.append(c.source)
        q = calibrator.conditional(c) if calibrator is not None else c.prior
        if correction is not None:
            q = correction.adjust(c, q[:k])
        TOK.append(c.tokens[:k])
        PAR.append(c.parents[:k])
        DEP.append(c.depth[:k])
        Q.append(q[:k])
        sizes.append(k)
        srcs.append(names.index(c.source))
        bases.append(base)
        base += k
    if base == 1:
        return Draft.empty()
    # working node i of candidate c: parent base_c + parent (the root, index 0, for a child of the root)
    par_c = np.concatenate(PAR)
    par = par_c + np.repeat(np.array(bases), sizes)
    par[par_c < 0] = 0
    dep = np.concatenate(DEP).astype(np.uint16)
    o = np.argsort(dep, kind="stable")  # the root (depth 0) stays first
    N = len(o)
    inv_o = np.empty(N, dtype=np.int64)
    inv_o[o] = np.arange(N)
    par = inv_o[par[o]]
    tok = np.concatenate(TOK)[o]
    dep = dep[o]
    q = np.concatenate(Q)[o]
    src = np.repeat(np.array(srcs), sizes)[o]
    p = np.empty(N)
    p[0] = 1.0
    h = np.empty(N, dtype=np.uint64)
    h[0] = 0
    t = tok.astype(np.uint64)
    t += np.uint64(1)
    bounds = np.searchsorted(dep, np.arange(1, int(dep[-1]) + 2)).tolist()
    with np.errstate(over="ignore"):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                pp = par[lo:hi]
                np.multiply(q[lo:hi], p[pp], out=p[lo:hi])
                hl = h[lo:hi]
                np.multiply(h[pp], _PRIME, out=hl)
                hl += t[lo:hi]
    key = h[1:]
    key &= np.uint64((1 << 56) - 1)
    key |= dep[1:].astype(np.uint64) << np.uint64(56)
    # group equal keys; keys sort by depth first (top byte), so groups come out in BFS order
    o = np.argsort(key)  # the default sort: fast but unstable; equal keys are put back in order below
    ks = key[o]
    head = np.empty(N - 1, dtype=bool)
    head[0] = True
    np.not_equal(ks[1:], ks[:-1], out=head[1:])
    starts = np.flatnonzero(head)
    n = len(starts)
    grp = np.cumsum(head)
    grp -= 1
    if n < N - 1:
        # equal keys (the same path from several tries): their members in working order, as a stable sort
        # leaves them (the order of the noisy-or sum and of the credited source depends on it)
        multi = np.zeros(n, dtype=bool)
        multi[grp[~head]] = True
        m = multi[grp]
        gm = grp[m]  # non-decreasing: sorting (group, index) pairs orders the indices within each group
        gm *= N
        gm += o[m]
        gm.sort()
        gm %= N
        o[m] = gm
    inv = np.empty(N, dtype=np.int64)  # group of each working node (the root: -1)
    inv[0] = -1
    inv[o + 1] = grp
    po = p[1:][o]
    best = np.maximum.reduceat(po, starts)
    Pe = np.empty(n + 1)  # Pm, and Pe[n] = inf: Pe[-1] (the root as a parent) is never exceeded
    Pe[n] = np.inf
    Pm = Pe[:n]
    if combine == "noisy_or":
        x = np.minimum(po, 1.0)
        np.negative(x, out=x)
        with np.errstate(divide="ignore"):
            np.log1p(x, out=x)
            np.exp(np.add.reduceat(x, starts), out=Pm)
        np.subtract(1.0, Pm, out=Pm)
    else:
        Pm[:] = best
    # the source credited with a node: the one giving it the highest probability (the last such one)
    top = po >= best[grp]
    best_src = np.empty(n, dtype=np.int64)
    best_src[grp[top]] = src[1:][o][top]
    first = o[starts]
    first += 1
    m_tok, m_dep = tok[first], dep[first]
    m_par = inv[par[first]]
    # p(child) <= p(parent), level by level (it holds already but for rounding; groups are in BFS order)
    if (Pm > Pe[m_par]).any():
        gb = np.searchsorted(m_dep, np.arange(2, int(m_dep[-1]) + 2)).tolist()
        for lo, hi in zip(gb[:-1], gb[1:]):
            Pm[lo:hi] = np.minimum(Pm[lo:hi], Pm[m_par[lo:hi]])
    if budget.tree:
        idx = np.arange(n) if n <= cap else _best(Pm, cap)
    else:
        sel = []
        cur = -1
        for _ in range(cap):
            ch = np.flatnonzero(m_par == cur)
            if len(ch) == 0:
                break
            cur = int(ch[np.argmax(Pm[ch])])
            sel.append(cur)
        idx = np.array(sorted(sel), dtype=np.int64)
    # topological output order: by depth, then by probability, then by group (idx is ascending: lexsort is stable)
    idx = idx[np.lexsort((-Pm[idx], m_dep[idx]))]
    remap = np.full(n + 1, -1, dtype=np.int64)  # remap[-1] (the root) stays -1
    remap[idx] = np.arange(len(idx))
    parents = remap[m_par[idx]]
    return Draft._checked_by_caller(m_tok[idx], parents, Pm[idx], best_src[idx], tuple(names))


def _best(P: np.ndarray, cap: int) -> np.ndarray:
    """Ascending indices of the ``cap < len(P)`` best groups, best = highest ``P``, ties to the lower index
    (the first ``cap`` of ``np.lexsort((m_dep, -P))``: ``m_dep`` does not decrease with the index). One
    partition instead of a sort: every ``P`` above the ``cap``-th largest value, then the lowest indices
    among those equal to it."""
    thr = np.partition(P, len(P) - cap)[len(P) - cap]
    above = np.flatnonzero(P > thr)
    ties = np.flatnonzero(P == thr)[: cap - len(above)]
    idx = np.concatenate([above, ties])
    idx.sort()
    return idx


_ROOT_PAR = np.full(1, -1, dtype=np.int32)
_ROOT_TOK = np.zeros(1, dtype=np.int32)
_ROOT_DEP = np.zeros(1, dtype=np.int32)
_ONE = np.ones(1)
