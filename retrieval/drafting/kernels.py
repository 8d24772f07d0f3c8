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


#: Once a range is at most this wide, the rest of the pattern is compared in one vectorized step.
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
