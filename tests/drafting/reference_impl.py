"""The straightforward implementations the optimized drafting code must reproduce exactly.

Verbatim copies of the per-step path as it was before the issue-19 latency work (kernels, trie candidates,
evaluation, calibration, session correction, merge, the four sources' proposals); tests/drafting/
test_equivalence.py checks the optimized code against them, array for array and bit for bit. Not used by
the package.
"""

from __future__ import annotations

import numpy as np

from retrieval.drafting.base import DEPTH_BUCKETS, MATCH_EDGES, RATIO_BUCKETS, SUPPORT_EDGES, Candidates
from retrieval.drafting.draft import Draft, DraftBudget
from retrieval.drafting.merge import Calibrator as _Calibrator
from retrieval.drafting.merge import SessionCorrection as _SessionCorrection
from retrieval.errors import InvalidArgument


def _narrow(tokens: np.ndarray, sa: np.ndarray, lo: int, hi: int, j: int, t: int) -> tuple[int, int]:
    """Sub-range of ``sa[lo:hi]`` (all sharing a prefix of length ``j``) whose token at offset ``j`` is ``t``."""
    if hi - lo <= 256:
        keys = tokens[sa[lo:hi] + j]
        a = int(np.searchsorted(keys, t, side="left"))
        b = int(np.searchsorted(keys, t, side="right"))
        return lo + a, lo + b
    a, b = lo, hi
    while a < b:
        mid = (a + b) >> 1
        if tokens[sa[mid] + j] < t:
            a = mid + 1
        else:
            b = mid
    start = a
    b = hi
    while a < b:
        mid = (a + b) >> 1
        if tokens[sa[mid] + j] <= t:
            a = mid + 1
        else:
            b = mid
    return start, a


SCAN_WIDTH = 64


def _scan(tokens: np.ndarray, sa: np.ndarray, lo: int, hi: int, j: int, rest: np.ndarray) -> tuple[int, int]:
    """Sub-range of ``sa[lo:hi]`` (all sharing a prefix of length ``j``) whose suffixes continue with
    ``rest`` at offset ``j``: one gather of the ``(hi - lo, len(rest))`` window and one comparison.

    The matching suffixes of a sorted range are contiguous, so the result is the span of the matches
    (empty: ``(lo, lo)``). Positions past the end never match.
    """
    n = len(tokens)
    s = np.asarray(sa[lo:hi], dtype=np.int64) + j
    idx = s[:, None] + np.arange(len(rest), dtype=np.int64)
    eq = (np.asarray(tokens[np.minimum(idx, n - 1)]) == rest).all(axis=1)
    if idx.shape[1]:
        eq &= idx[:, -1] < n
    hit = np.flatnonzero(eq)
    if len(hit) == 0:
        return lo, lo
    return lo + int(hit[0]), lo + int(hit[-1]) + 1


def sa_range(tokens: np.ndarray, sa: np.ndarray, off: np.ndarray, pattern) -> tuple[int, int]:
    """Range ``[lo, hi)`` of ``sa`` whose suffixes start with ``pattern`` (empty range: ``lo == hi``).

    ``pattern`` must not contain the separator; ``off`` from :func:`bucket_offsets`. An empty pattern
    matches everything. The range is narrowed one token at a time (:func:`_narrow`) while it is wider
    than :data:`SCAN_WIDTH`, then the rest of the pattern is matched at once (:func:`_scan`); the occurrences
    are those of :func:`sa_range_stepwise` (the one-token-at-a-time reference; where an empty range sits may differ).
    """
    pat = np.asarray(pattern, dtype=np.int64).ravel()
    if len(pat) == 0:
        return 0, len(sa)
    t0 = int(pat[0])
    if t0 < 0 or t0 + 1 >= len(off):
        return 0, 0
    lo, hi = int(off[t0]), int(off[t0 + 1])
    m = len(pat)
    j = 1
    while j < m and hi - lo > SCAN_WIDTH:
        lo, hi = _narrow(tokens, sa, lo, hi, j, int(pat[j]))
        j += 1
    if j < m and hi > lo:
        lo, hi = _scan(tokens, sa, lo, hi, j, pat[j:])
    return lo, hi


def longest_suffix_match(tokens: np.ndarray, sa: np.ndarray, off: np.ndarray, context,
                         max_len: int, min_len: int = 1) -> tuple[int, int, int]:
    """Longest ``m`` in ``[min_len, max_len]`` such that ``context[-m:]`` occurs in ``tokens``.

    Returns ``(m, lo, hi)`` with ``sa[lo:hi]`` the occurrences, or ``(0, 0, 0)`` when even ``min_len``
    does not occur. Binary search on ``m`` (occurrence is monotone in ``m``).
    """
    ctx = np.asarray(context[-max_len:] if max_len > 0 else context[:0], dtype=np.int64).ravel()
    max_len = min(max_len, len(ctx))
    if max_len < min_len or min_len < 1:
        return 0, 0, 0
    best = (0, 0, 0)
    lo_m, hi_m = min_len, max_len
    while lo_m <= hi_m:
        m = (lo_m + hi_m) >> 1
        lo, hi = sa_range(tokens, sa, off, ctx[len(ctx) - m:])
        if hi > lo:
            best = (m, lo, hi)
            lo_m = m + 1
        else:
            hi_m = m - 1
    return best


def gather_continuations(tokens: np.ndarray, starts: np.ndarray, depth: int, sep: int | None) -> np.ndarray:
    """``(len(starts), depth)`` int32 rows ``tokens[s : s + depth]``; past the end or from the first
    ``sep`` on, the row is ``-1``."""
    starts = np.asarray(starts, dtype=np.int64)
    n = len(tokens)
    if len(starts) == 0 or depth == 0:
        return np.full((len(starts), depth), -1, dtype=np.int32)
    idx = starts[:, None] + np.arange(depth, dtype=np.int64)[None, :]
    out_of_range = idx >= n
    rows = np.asarray(tokens[np.minimum(idx, n - 1)]).astype(np.int32)
    bad = out_of_range
    if sep is not None:
        bad = bad | (rows == sep)
    if bad.any():
        bad = np.maximum.accumulate(bad, axis=1)
        rows[bad] = -1
    return rows


def prefix_trie(rows: np.ndarray, weights: np.ndarray | None = None, is_sorted: bool = False):
    """Count the prefixes of ``rows`` into a trie.

    ``rows``: ``(k, D)`` int, each row a continuation, ``-1`` padding only at the end of a row.
    ``weights``: ``(k,)`` per-row weight (default 1). Returns ``(tok, parent, count, depth)``, 1-D arrays
    in breadth-first order (so parents come first): node ``v`` is the prefix ``rows[i, :depth[v]]`` of
    some row ``i``, ``count[v]`` the total weight of the rows starting with it, ``parent[v]`` the node of
    that prefix minus its last token (``-1`` at depth 1).

    Sorted rows make every prefix a run of consecutive rows: ``start[i, d]`` marks the first row of a run
    at depth ``d`` (a change in ``rows[i, :d+1]``); numbering the valid run starts depth-major gives BFS
    ids, and the id of the run holding row ``i`` at depth ``d`` is a cumulative count of starts.
    """
    rows = np.asarray(rows)
    k = rows.shape[0]
    D = rows.shape[1] if rows.ndim == 2 else 0
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float64), np.zeros(0, np.int32))
    if k == 0 or D == 0:
        return empty
    w = np.ones(k, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    if not is_sorted:
        order = np.lexsort(rows.T[::-1])
        rows, w = rows[order], w[order]
    valid_t = (rows >= 0).T  # (D, k)
    start_t = np.ones((D, k), dtype=bool)
    if k > 1:
        start_t[:, 1:] = np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1).T
    start_t &= valid_t
    ids = np.cumsum(start_t.ravel()).reshape(D, k) - 1  # id of the run holding row i at depth d (if valid)
    dd, rr = np.nonzero(start_t)
    if len(dd) == 0:
        return empty
    tok = rows[rr, dd].astype(np.int32)
    par = np.where(dd == 0, -1, ids[np.maximum(dd - 1, 0), rr]).astype(np.int32)
    cnt = np.bincount(ids[valid_t], weights=np.broadcast_to(w, (D, k))[valid_t], minlength=len(dd))
    return tok, par, cnt, (dd + 1).astype(np.int32)


def ngram_end_positions(ctx: np.ndarray, n: int) -> np.ndarray:
    """Positions ``e`` (ascending) with ``ctx[e-n+1 : e+1] == ctx[-n:]`` and ``e < len(ctx) - 1``.

    The continuation of such a match starts at ``e + 1`` (inside the context). ``ctx`` 1-D int array.
    """
    ctx = np.asarray(ctx)
    L = len(ctx)
    if n < 1 or L < n + 1:
        return np.zeros(0, dtype=np.int64)
    m = ctx[n - 1: L - 1] == ctx[L - 1]
    for j in range(1, n):
        if not m.any():
            break
        m &= ctx[n - 1 - j: L - 1 - j] == ctx[L - 1 - j]
    return np.flatnonzero(m) + (n - 1)


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
    parent_cnt = np.where(par >= 0, cnt[np.maximum(par, 0)], root_count)
    r = cnt / np.maximum(parent_cnt, 1e-9)
    prior = r * parent_cnt / (parent_cnt + alpha)
    first = dep == 1
    prior = np.where(first, prior * match_len / (match_len + match_scale), prior)
    db = np.minimum(dep, DEPTH_BUCKETS) - 1
    rb = np.minimum((r * 10).astype(np.int64), 10)
    sb = np.searchsorted(SUPPORT_EDGES, parent_cnt, side="left")
    mb = int(np.searchsorted(MATCH_EDGES, match_len, side="left"))
    feat = ((db * RATIO_BUCKETS + rb) * (len(SUPPORT_EDGES) + 1) + sb) * (len(MATCH_EDGES) + 1) + mb
    return Candidates(source, tok.astype(np.int32), par.astype(np.int32), cnt.astype(np.float64),
                      np.clip(prior, 0.0, 1.0), feat.astype(np.int64), dep.astype(np.int32), int(match_len))


class Calibrator(_Calibrator):
    """The package's calibrator with the two methods the optimization rewrote, as they were."""

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
        tried_f: dict[str, list[np.ndarray]] = {}
        hit_f: dict[str, list[np.ndarray]] = {}
        for c in cands:
            if len(c) == 0:
                continue
            tried, hit = evaluate_trie(c.tokens, c.parents, true_next, c.depth, c.levels)
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


class SessionCorrection(_SessionCorrection):
    """The package's session correction with the methods the optimization rewrote, as they were."""

    def _bucket(self, c: Candidates) -> np.ndarray:
        return np.minimum(c.depth, self.nb) - 1

    def adjust(self, c: Candidates, q: np.ndarray) -> np.ndarray:
        """The corrected estimates of ``c`` (``q``: the shared ones, remembered for :meth:`update`)."""
        self._pending.append((c, q))
        H = self._H.get(c.source)
        if H is None:
            return q
        b = self._bucket(c)
        f = (H + self.strength) / (self._E[c.source] + self.strength)
        return np.minimum(q * f[b], self.cap)

    def update(self, true_next: np.ndarray, pending: list | None = None) -> None:
        """Score the last draft's candidates (or ``pending``) against the tokens that followed it."""
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
            tried, hit = evaluate_trie(c.tokens[:len(q)], c.parents[:len(q)], true_next, c.depth[:len(q)])
            if not tried.any():
                continue
            H = self._H.get(c.source)
            if H is None:
                H = self._H[c.source] = np.zeros(self.nb)
                self._E[c.source] = np.zeros(self.nb)
            b = self._bucket(c)[: len(q)]
            np.add.at(H, b[hit], 1.0)
            np.add.at(self._E[c.source], b[tried], q[tried])


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
    for d, lo, hi in (levels if levels is not None else depth_levels(depth)):
        if d > T:
            break
        par = parents[lo:hi]
        ok = par < 0 if d == 1 else hit[np.maximum(par, 0)] & (par >= 0)
        tried[lo:hi] = ok
        hit[lo:hi] = ok & (tokens[lo:hi] == true_next[d - 1])
        if not hit[lo:hi].any():
            break
    return tried, hit


_PRIME = np.uint64(0x100000001B3)


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
    TOK, PAR, DEP, Q, SRC = [_ROOT_TOK], [_ROOT_PAR], [_ROOT_DEP], [_ONE], [_ROOT_SRC]
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
        par = c.parents[:k]
        TOK.append(c.tokens[:k])
        PAR.append(np.where(par >= 0, par + base, 0))
        DEP.append(c.depth[:k])
        Q.append(q[:k])
        SRC.append(np.full(k, names.index(c.source), dtype=np.int64))
        base += k
    if base == 1:
        return Draft.empty()
    dep = np.concatenate(DEP).astype(np.uint16)
    o = np.argsort(dep, kind="stable")  # the root (depth 0) stays first
    N = len(o)
    inv_o = np.empty(N, dtype=np.int64)
    inv_o[o] = np.arange(N)
    par = inv_o[np.concatenate(PAR)[o]]
    tok = np.concatenate(TOK)[o]
    dep = dep[o]
    q = np.concatenate(Q)[o]
    src = np.concatenate(SRC)[o]
    p = np.empty(N)
    p[0] = 1.0
    h = np.empty(N, dtype=np.uint64)
    h[0] = 0
    t = tok.astype(np.uint64) + np.uint64(1)
    bounds = np.searchsorted(dep, np.arange(1, int(dep[-1]) + 2)).tolist()
    with np.errstate(over="ignore"):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                pp = par[lo:hi]
                np.multiply(q[lo:hi], p[pp], out=p[lo:hi])
                h[lo:hi] = h[pp] * _PRIME + t[lo:hi]
    key = (h[1:] & np.uint64((1 << 56) - 1)) | (dep[1:].astype(np.uint64) << np.uint64(56))
    # group equal keys; keys sort by depth first (top byte), so groups come out in BFS order
    o = np.argsort(key, kind="stable")
    ks = key[o]
    head = np.empty(N - 1, dtype=bool)
    head[0] = True
    np.not_equal(ks[1:], ks[:-1], out=head[1:])
    starts = np.flatnonzero(head)
    n = len(starts)
    grp = np.cumsum(head) - 1
    inv = np.empty(N, dtype=np.int64)  # group of each working node (the root: -1)
    inv[0] = -1
    inv[1 + o] = grp
    po = p[1:][o]
    best = np.maximum.reduceat(po, starts)
    if combine == "noisy_or":
        with np.errstate(divide="ignore"):
            Pm = 1.0 - np.exp(np.add.reduceat(np.log1p(-np.minimum(po, 1.0)), starts))
    else:
        Pm = best.copy()
    # the source credited with a node: the one giving it the highest probability (the last such one)
    top = po >= best[grp]
    best_src = np.empty(n, dtype=np.int64)
    best_src[grp[top]] = src[1:][o][top]
    first = 1 + o[starts]
    m_tok, m_dep = tok[first], dep[first]
    m_par = inv[par[first]]
    # p(child) <= p(parent), level by level (it holds already but for rounding; groups are in BFS order)
    inner = m_par >= 0
    if (Pm[inner] > Pm[m_par[inner]]).any():
        gb = np.searchsorted(m_dep, np.arange(2, int(m_dep[-1]) + 2)).tolist()
        for lo, hi in zip(gb[:-1], gb[1:]):
            Pm[lo:hi] = np.minimum(Pm[lo:hi], Pm[m_par[lo:hi]])
    if budget.tree:
        idx = np.arange(n) if n <= cap else np.sort(np.lexsort((m_dep, -Pm))[:cap])
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
    # topological output order: by depth, then by probability
    idx = idx[np.lexsort((idx, -Pm[idx], m_dep[idx]))]
    remap = np.full(n + 1, -1, dtype=np.int64)  # remap[-1] (the root) stays -1
    remap[idx] = np.arange(len(idx))
    parents = remap[m_par[idx]]
    return Draft._checked_by_caller(m_tok[idx], parents, Pm[idx], best_src[idx], tuple(names))


_ROOT_TOK = np.zeros(1, dtype=np.int32)


_ROOT_PAR = np.zeros(1, dtype=np.int64)


_ROOT_DEP = np.zeros(1, dtype=np.int32)


_ROOT_SRC = np.zeros(1, dtype=np.int64)


_ONE = np.ones(1)


def suffix_candidates(name: str, tokens, sa, off, sep, ctx, max_depth: int, max_match_len: int,
                      min_match_len: int, max_matches: int, levels: int, alpha: float) -> list[Candidates]:
    """Shared by the corpus and history sources: longest-suffix tries for ``levels`` match lengths."""
    out: list[Candidates] = []
    m, lo, hi = longest_suffix_match(tokens, sa, off, ctx, max_match_len, min_match_len)
    while m >= min_match_len and m > 0 and len(out) < levels:
        total = hi - lo
        if total <= max_matches:
            idx = np.arange(lo, hi)
        else:
            idx = lo + (np.arange(max_matches, dtype=np.int64) * total) // max_matches
        starts = sa[idx].astype(np.int64) + m
        rows = gather_continuations(tokens, starts, max_depth, sep)
        w = np.full(len(idx), total / len(idx))
        tok, par, cnt, dep = prefix_trie(rows, w, is_sorted=True)
        if len(tok):
            out.append(trie_candidates(name, tok, par, cnt, dep, float(total), m, alpha))
        m -= 1
        if m >= min_match_len and m > 0 and len(out) < levels:
            lo, hi = sa_range(tokens, sa, off, [int(x) for x in ctx[len(ctx) - m:]])
    return out


def recycling_expand(M: np.ndarray, root_token: int, parents: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Tokens of the static recycling tree rooted at ``root_token`` (``RecyclingMatrix.expand`` before the
    source's proposal fused it): ``-1`` where the row is empty (or the parent is)."""
    n = len(parents)
    out = [-1] * n
    par = parents.tolist()
    rk = ranks.tolist()
    rows: dict[int, list[int]] = {}  # one row read per distinct token
    for i in range(n):  # BFS order: parents first
        p = par[i]
        x = root_token if p < 0 else out[p]
        if x < 0:
            continue
        row = rows.get(x)
        if row is None:
            row = rows[x] = M[x].tolist()
        out[i] = row[rk[i]]
    return np.asarray(out, dtype=np.int64)
