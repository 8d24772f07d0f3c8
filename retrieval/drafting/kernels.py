"""Kernels of the draft sources: plain functions of arrays and numbers.

* Suffix array by prefix doubling (Manber & Myers 1993, "Suffix arrays: a new method for on-line string
  searches"): after round ``r`` every suffix ``i`` has rank ``R_r[i]`` = rank of ``T[i : i + 2^r]`` among all
  such windows; ``R_{r+1}[i]`` is the rank of the pair ``(R_r[i], R_r[i + 2^r])`` (``-1`` past the end).
  Each round is one ``argsort`` of int64 keys, and we stop once all ranks are distinct, so the cost is
  ``O(n log n * log L)`` with ``L`` the longest repeated substring. The result is the suffix array
  ``SA`` (``T[SA[0]:] < T[SA[1]:] < ...``).
* Pattern search in ``SA`` (REST, He et al. 2024, "REST: Retrieval-Based Speculative Decoding", Sec. 3):
  the suffixes starting with a pattern ``P`` form one contiguous range of ``SA``; we narrow the range one
  token at a time (``bucket`` table for the first token, binary search for the next ones, because inside
  a range that shares ``P[:j]`` the tokens ``T[SA[i] + j]`` are sorted).
* The longest suffix of the context that occurs in ``T``: the occurrence test is monotone in the suffix
  length (if ``c[-m:]`` occurs so does ``c[-m+1:]``), so we binary-search ``m``.
* Continuations of the matched occurrences are rows ``T[SA[i] + m : SA[i] + m + depth]``; because the
  range is sorted, the rows come sorted lexicographically and a prefix trie with counts is a run-length
  computation (:func:`prefix_trie`).
* Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"): :func:`ngram_end_positions` and
  :func:`pld_chain` (the reference rule, used as the harness check of the benchmark).

Separators: a corpus is stored as documents joined by a separator id ``sep`` (= the vocabulary size, so it
never occurs in a valid context) and ends with ``sep``. Matches therefore never cross documents and
continuations are cut at the first separator (the cut part is ``-1``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)


# --- suffix array -------------------------------------------------------------------------------------

def build_suffix_array(tokens: np.ndarray, progress: Callable[[int, int], None] | None = None,
                       check: Callable[[], None] | None = None) -> np.ndarray:
    """Suffix array of ``tokens`` (``(n,)`` integer array) by prefix doubling.

    Returns ``(n,)`` int32 (int64 when ``n >= 2**31``) with ``tokens[sa[i]:] < tokens[sa[i+1]:]`` in
    lexicographic order, a proper prefix sorting first. ``progress(round, max_rounds)`` is called after
    each doubling round; ``check()`` between rounds (e.g. a job's cancellation check). Memory: about
    ``40 n`` bytes at the peak.
    """
    t = np.asarray(tokens)
    n = len(t)
    idx_dtype = np.int32 if n < 2**31 else np.int64
    if n == 0:
        return np.zeros(0, dtype=idx_dtype)
    # dense initial ranks 0..u-1 of the token values
    _, rank = np.unique(t, return_inverse=True)
    rank = rank.astype(np.int64).ravel()
    max_rounds = max(1, int(np.ceil(np.log2(max(n, 2)))) + 1)
    k = 1
    rnd = 0
    sa = np.argsort(rank, kind="stable")
    while True:
        if check is not None:
            check()
        second = np.zeros(n, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:] + 1  # 0 means "past the end", sorts first
        key = rank * (n + 1) + second
        sa = np.argsort(key, kind="stable")
        sk = key[sa]
        new_sorted = np.empty(n, dtype=np.int64)
        new_sorted[0] = 0
        np.cumsum(sk[1:] != sk[:-1], out=new_sorted[1:])
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = new_sorted
        rnd += 1
        if progress is not None:
            progress(rnd, max_rounds)
        if new_sorted[-1] == n - 1 or k >= n:
            break
        k *= 2
    return sa.astype(idx_dtype)


def bucket_offsets(tokens: np.ndarray, sa: np.ndarray, n_symbols: int) -> np.ndarray:
    """``(n_symbols + 1,)`` int64: suffixes starting with symbol ``v`` are ``sa[off[v]:off[v+1]]``."""
    counts = np.bincount(np.asarray(tokens).astype(np.int64), minlength=n_symbols)[:n_symbols]
    off = np.zeros(n_symbols + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def _indexable(a):
    """A 1-D integer array as something whose items read as Python ints fast: a memoryview of a native-order
    integer ndarray (item access is several times cheaper than numpy scalar indexing), else ``a`` itself."""
    if isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "iu" and a.dtype.isnative:
        try:
            return memoryview(a)
        except (TypeError, ValueError, BufferError):
            return a
    return a


def _lower(T, S, lo: int, hi: int, j: int, t: int) -> int:
    """First ``i`` in ``[lo, hi)`` with ``T[S[i] + j] >= t`` (``hi`` if none); the keys are sorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if T[S[mid] + j] < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _upper(T, S, lo: int, hi: int, j: int, t: int) -> int:
    """First ``i`` in ``[lo, hi)`` with ``T[S[i] + j] > t`` (``hi`` if none); the keys are sorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if T[S[mid] + j] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _narrow_ix(T, S, lo: int, hi: int, j: int, t: int) -> tuple[int, int]:
    a = _lower(T, S, lo, hi, j, t)
    if a == hi or T[S[a] + j] != t:
        return a, a
    return a, _upper(T, S, a + 1, hi, j, t)


def _narrow(tokens: np.ndarray, sa: np.ndarray, lo: int, hi: int, j: int, t: int) -> tuple[int, int]:
    """Sub-range of ``sa[lo:hi]`` (all sharing a prefix of length ``j``) whose token at offset ``j`` is ``t``:
    the lower and upper bound of ``t`` among the sorted keys ``tokens[sa[i] + j]``, by bisection (an empty
    range sits at the lower bound)."""
    return _narrow_ix(_indexable(tokens), _indexable(sa), int(lo), int(hi), j, int(t))


#: Once a range is at most this wide, the rest of the pattern is compared in one vectorized step.
SCAN_WIDTH = 64


def sa_range(tokens: np.ndarray, sa: np.ndarray, off: np.ndarray, pattern) -> tuple[int, int]:
    """Range ``[lo, hi)`` of ``sa`` whose suffixes start with ``pattern`` (empty range: ``lo == hi``).

    ``pattern`` must not contain the separator; ``off`` from :func:`bucket_offsets`. An empty pattern
    matches everything. The range is narrowed one token at a time (:func:`_narrow`) while it is wider
    than :data:`SCAN_WIDTH`, then the rest of the pattern is matched over that window (the span of the
    matches); the occurrences are those of :func:`sa_range_stepwise` (the one-token-at-a-time reference;
    where an empty range sits may differ).
    """
    pat = np.asarray(pattern, dtype=np.int64).ravel().tolist()
    if len(pat) == 0:
        return 0, len(sa)
    return _sa_range_ix(_indexable(tokens), _indexable(sa), off, pat, len(tokens))


def _sa_range_ix(T, S, off, pat: list[int], n: int) -> tuple[int, int]:
    """:func:`sa_range` of a non-empty list pattern over indexables (:func:`_indexable`) of the arrays."""
    t0 = pat[0]
    if t0 < 0 or t0 + 1 >= len(off):
        return 0, 0
    lo, hi = int(off[t0]), int(off[t0 + 1])
    m = len(pat)
    j = 1
    while j < m and hi - lo > SCAN_WIDTH:
        lo, hi = _narrow_ix(T, S, lo, hi, j, pat[j])
        j += 1
    if j < m and hi > lo:
        # the span of the matching suffixes, or (lo, lo) when nothing matches; narrowing one token at a
        # time finds the same span (the matches of a sorted range are contiguous)
        s0 = lo
        while j < m and lo < hi:
            if S[lo] + j >= n:  # a suffix of length j (a corpus not ended by the separator) sorts first
                lo += 1
                if lo == hi:
                    break
            lo, hi = _narrow_ix(T, S, lo, hi, j, pat[j])
            j += 1
        if lo == hi:
            return s0, s0
    return lo, hi


def sa_range_stepwise(tokens: np.ndarray, sa: np.ndarray, off: np.ndarray, pattern) -> tuple[int, int]:
    """:func:`sa_range` narrowing one token at a time (the reference the fast path is tested against)."""
    pattern = [int(x) for x in pattern]
    if not pattern:
        return 0, len(sa)
    t0 = pattern[0]
    if t0 < 0 or t0 + 1 >= len(off):
        return 0, 0
    lo, hi = int(off[t0]), int(off[t0 + 1])
    for j in range(1, len(pattern)):
        if lo >= hi:
            break
        lo, hi = _narrow(tokens, sa, lo, hi, j, pattern[j])
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
    T, S, c, n = _indexable(tokens), _indexable(sa), ctx.tolist(), len(tokens)
    while lo_m <= hi_m:
        m = (lo_m + hi_m) >> 1
        lo, hi = _sa_range_ix(T, S, off, c[len(c) - m:], n)
        if hi > lo:
            best = (m, lo, hi)
            lo_m = m + 1
        else:
            hi_m = m - 1
    return best


def gather_continuations(tokens: np.ndarray, starts: np.ndarray, depth: int, sep: int | None) -> np.ndarray:
    """``(len(starts), depth)`` int32 rows ``tokens[s : s + depth]``; past the end or from the first
    ``sep`` on, the row is ``-1``. (A view of :func:`gather_continuations_t`, the layout the tries read.)"""
    return gather_continuations_t(tokens, starts, depth, sep).T


def gather_continuations_t(tokens: np.ndarray, starts: np.ndarray, depth: int, sep: int | None) -> np.ndarray:
    """``(depth, len(starts))`` int32, C-contiguous: column ``i`` is ``tokens[s : s + depth]`` for ``s =
    starts[i]``, ``-1`` past the end or from the first ``sep`` on (the layout :func:`prefix_trie_t` reads)."""
    starts = np.asarray(starts, dtype=np.int64)
    n = len(tokens)
    k = len(starts)
    if k == 0 or depth == 0:
        return np.full((depth, k), -1, dtype=np.int32)
    idx = np.arange(depth, dtype=np.int64)[:, None] + starts
    last = int(starts.max()) + depth - 1  # the largest index read
    if last >= n:
        bad = idx >= n
        np.minimum(idx, n - 1, out=idx)
        R = np.asarray(tokens[idx]).astype(np.int32)
        if sep is not None:
            bad |= R == sep
    else:
        R = np.asarray(tokens[idx]).astype(np.int32)
        if sep is None:
            return R
        bad = R == sep
    if bad.any():
        np.logical_or.accumulate(bad, axis=0, out=bad)
        R[bad] = -1
    return R


_EMPTY_TRIE = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float64), np.zeros(0, np.int32))


def prefix_trie(rows: np.ndarray, weights: np.ndarray | None = None, is_sorted: bool = False):
    """Count the prefixes of ``rows`` into a trie.

    ``rows``: ``(k, D)`` int, each row a continuation, ``-1`` padding only at the end of a row.
    ``weights``: ``(k,)`` per-row weight (default 1). Returns ``(tok, parent, count, depth)``, 1-D arrays
    in breadth-first order (so parents come first): node ``v`` is the prefix ``rows[i, :depth[v]]`` of
    some row ``i``, ``count[v]`` the total weight of the rows starting with it, ``parent[v]`` the node of
    that prefix minus its last token (``-1`` at depth 1).

    Sorted rows make every prefix a run of consecutive rows: ``start[d, i]`` marks the first row of a run
    at depth ``d`` (a change in ``rows[i, :d+1]``); numbering the valid run starts depth-major gives BFS
    ids, and the id of the run holding row ``i`` at depth ``d`` is a cumulative count of starts.
    """
    rows = np.asarray(rows)
    k = rows.shape[0]
    D = rows.shape[1] if rows.ndim == 2 else 0
    if k == 0 or D == 0:
        return tuple(a.copy() for a in _EMPTY_TRIE)
    return prefix_trie_t(np.ascontiguousarray(rows.T), weights, is_sorted)[:4]


def prefix_trie_t(R: np.ndarray, weights: np.ndarray | None = None, is_sorted: bool = False):
    """:func:`prefix_trie` of the transposed rows ``R`` (``(D, k)``, column ``i`` = row ``i``), plus
    ``n_first``, the number of depth-1 nodes (they come first): ``(tok, parent, count, depth, n_first)``.
    ``weights`` may also be one number, the weight of every row."""
    tok, par, _, cnt, dep, levels = _prefix_trie_t(R, weights, is_sorted)
    return tok, par, cnt, dep, (levels[0][2] if levels else 0)


def _prefix_trie_t(R, weights=None, is_sorted=False):
    """:func:`prefix_trie_t` with the parents also as int64 and the levels instead of ``n_first``:
    ``(tok, par, par64, cnt, dep, levels)``, ``levels`` as :func:`~retrieval.drafting.base.depth_levels`."""
    D, k = R.shape
    if k == 0 or D == 0:
        e = _EMPTY_TRIE
        return e[0].copy(), e[1].copy(), np.zeros(0, np.int64), e[2].copy(), e[3].copy(), []
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if not is_sorted and k > 1:
        order = np.lexsort(R[::-1])
        R = R[:, order]
        if w is not None and w.ndim:
            w = w[order]
    # start[d, i]: row i opens a run at depth d (its prefix of length d + 1 differs from row i - 1's)
    start = np.empty((D, k), dtype=bool)
    start[:, 0] = True
    if k > 1:
        np.not_equal(R[:, 1:], R[:, :-1], out=start[:, 1:])
        np.logical_or.accumulate(start, axis=0, out=start)
    valid = R >= 0
    start &= valid
    sf = start.ravel()
    f = np.flatnonzero(sf)  # node v = flat position d * k + i of its run start: BFS order
    n = len(f)
    if n == 0:
        e = _EMPTY_TRIE
        return e[0].copy(), e[1].copy(), np.zeros(0, np.int64), e[2].copy(), e[3].copy(), []
    # ids[k + d * k + i] = id of the run holding row i at depth d; ids[:k] = -1 (the root), so the parent
    # of the node at flat position f (depth d, row i) is ids[f] (the run holding row i at depth d - 1)
    ids = np.empty((D + 1) * k, dtype=np.int64)
    ids[:k] = -1
    np.cumsum(sf, out=ids[k:])
    ids[k:] -= 1
    par64 = ids[f]
    tok = R.ravel()[f].astype(np.int32)
    # nodes of depth d + 1 are f in [d * k, (d + 1) * k): levels[d] = (d + 1, b[d], b[d + 1])
    b = [0, *np.searchsorted(f, _level_starts(D, k)).tolist(), n]
    levels = [(d + 1, b[d], b[d + 1]) for d in range(D) if b[d + 1] > b[d]]
    dep = f // k
    dep += 1
    vf = valid.ravel()
    if w is None or w.ndim == 0:
        cnt = np.bincount(ids[k:][vf], minlength=n)
        if w is None or w == 1.0:
            cnt = cnt.astype(np.float64)
        else:  # the sum of c equal weights, added one at a time as bincount adds them
            cnt = np.full(k, w).cumsum()[cnt - 1]
    else:
        cnt = np.bincount(ids[k:][vf], weights=np.broadcast_to(w, (D, k))[valid], minlength=n)
    return tok, par64.astype(np.int32), par64, cnt, dep.astype(np.int32), levels


def _level_starts(D: int, k: int) -> np.ndarray:
    return np.arange(1, D, dtype=np.int64) * k


# --- prompt lookup --------------------------------------------------------------------------------------

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


def nested_ngram_ends(ctx: np.ndarray, max_n: int) -> list[np.ndarray]:
    """``[None, E_1, ..., E_max_n]`` with ``E_n = ngram_end_positions(ctx, n)``, computed together: an end of
    the last ``n``-gram is an end of the last ``(n - 1)``-gram whose token ``n - 1`` places earlier also
    matches, ``E_n = {e in E_{n-1} : e >= n - 1, ctx[e - n + 1] == ctx[L - n]}`` (one pass over the
    context for ``E_1``, then small arrays). Requires ``1 <= max_n <= len(ctx) - 1``."""
    ctx = np.asarray(ctx)
    L = len(ctx)
    ends = np.flatnonzero(ctx[: L - 1] == ctx[L - 1])
    out = [None, ends]
    for n in range(2, max_n + 1):
        if len(ends):
            # ends >= n - 2 here, so ends - (n - 1) >= -1 is a valid index; the mask drops e < n - 1
            ends = ends[(ctx[ends - (n - 1)] == ctx[L - n]) & (ends >= n - 1)]
        out.append(ends)
    return out


def pld_chain(ctx: np.ndarray, max_ngram: int = 3, min_ngram: int = 1, k: int = 10,
              require_full: bool = False) -> np.ndarray:
    """The prompt-lookup reference rule: for ``n = max_ngram .. min_ngram`` take the **earliest**
    window ``ctx[i:i+n] == ctx[-n:]`` with ``i + n < len(ctx) - n`` and propose ``ctx[i+n : i+n+k]``.

    ``require_full=True`` also asks ``i + n + k <= len(ctx)`` (Spec-Bench's exact rule, 1.720 on the dev
    half); ``False`` allows a truncated continuation (1.731). Returns ``(<=k,)`` int32, maybe empty.
    """
    ctx = np.asarray(ctx)
    L = len(ctx)
    for n in range(max_ngram, min_ngram - 1, -1):
        ends = ngram_end_positions(ctx, n)
        if len(ends) == 0:
            continue
        starts = ends + 1  # i + n
        ok = starts < L - n
        if require_full:
            ok &= starts + k <= L
        good = starts[ok]
        if len(good):
            s = int(good[0])
            return ctx[s: s + k].astype(np.int32)
    return np.zeros(0, dtype=np.int32)
