import numpy as np
import pytest

from retrieval.drafting.kernels import (bucket_offsets, build_suffix_array, gather_continuations,
                                        longest_suffix_match, ngram_end_positions, pld_chain, prefix_trie, sa_range,
                                        sa_range_stepwise)


def naive_sa(t):
    return sorted(range(len(t)), key=lambda i: tuple(t[i:]))


@pytest.mark.parametrize("alphabet", [1, 2, 3, 50])
def test_suffix_array_matches_naive_sort(rng, alphabet):
    for _ in range(30):
        t = rng.integers(0, alphabet, size=int(rng.integers(1, 80)))
        assert build_suffix_array(t).tolist() == naive_sa(t.tolist())


def test_suffix_array_repetitive_and_empty():
    t = np.array([1, 2] * 40 + [3] + [1, 2] * 40)
    assert build_suffix_array(t).tolist() == naive_sa(t.tolist())
    assert len(build_suffix_array(np.zeros(0, np.int32))) == 0
    assert build_suffix_array(np.array([7])).tolist() == [0]


def _corpus(rng, n=400, v=5):
    t = rng.integers(0, v, size=n).astype(np.int64)
    t[rng.random(n) < 0.05] = v  # separators
    t[-1] = v
    sa = build_suffix_array(t)
    return t, sa, bucket_offsets(t, sa, v + 1)


def test_sa_range_matches_naive_scan(rng):
    t, sa, off = _corpus(rng)
    for _ in range(200):
        pat = rng.integers(0, 5, size=int(rng.integers(1, 6))).tolist()
        lo, hi = sa_range(t, sa, off, pat)
        got = sorted(sa[lo:hi].tolist())
        want = [i for i in range(len(t) - len(pat) + 1) if t[i:i + len(pat)].tolist() == pat]
        assert got == want


def test_longest_suffix_match_matches_naive(rng):
    t, sa, off = _corpus(rng)
    ts = t.tolist()

    def occurs(p):
        return any(ts[i:i + len(p)] == p for i in range(len(ts) - len(p) + 1))

    for _ in range(200):
        ctx = rng.integers(0, 5, size=int(rng.integers(1, 20))).tolist()
        m, lo, hi = longest_suffix_match(t, sa, off, ctx, max_len=8)
        want = max([k for k in range(1, min(8, len(ctx)) + 1) if occurs(ctx[-k:])], default=0)
        assert m == want
        if m:
            assert hi - lo == sum(ts[i:i + m] == ctx[-m:] for i in range(len(ts) - m + 1))


def test_gather_continuations_cuts_at_separator_and_end():
    t = np.array([1, 2, 9, 3, 4, 9])
    rows = gather_continuations(t, np.array([0, 3, 5]), 3, sep=9)
    assert rows.tolist() == [[1, 2, -1], [3, 4, -1], [-1, -1, -1]]
    rows = gather_continuations(t, np.array([4]), 4, sep=None)
    assert rows.tolist() == [[4, 9, -1, -1]]


def test_prefix_trie_matches_naive_counts(rng):
    for _ in range(100):
        k, D = int(rng.integers(1, 25)), int(rng.integers(1, 6))
        rows = rng.integers(0, 3, size=(k, D))
        cut = rng.integers(0, D + 1, size=k)
        for i in range(k):
            rows[i, cut[i]:] = -1
        w = rng.random(k)
        tok, par, cnt, dep = prefix_trie(rows, w)
        paths = []
        for i in range(len(tok)):
            assert par[i] < i
            paths.append((paths[par[i]] if par[i] >= 0 else ()) + (int(tok[i]),))
            assert dep[i] == len(paths[-1])
        want = {}
        for r, wi in zip(rows.tolist(), w):
            for d in range(D):
                if r[d] < 0:
                    break
                want[tuple(r[:d + 1])] = want.get(tuple(r[:d + 1]), 0) + wi
        got = dict(zip(paths, cnt))
        assert set(got) == set(want) and all(abs(got[p] - want[p]) < 1e-9 for p in want)
        assert (np.diff(dep) >= 0).all()


def test_ngram_end_positions_matches_naive(rng):
    for _ in range(200):
        ctx = rng.integers(0, 3, size=int(rng.integers(1, 40)))
        for n in (1, 2, 3):
            L = len(ctx)
            want = [e for e in range(n - 1, L - 1) if L >= n + 1 and ctx[e - n + 1:e + 1].tolist() == ctx[L - n:].tolist()]
            assert ngram_end_positions(ctx, n).tolist() == want


def naive_pld(ids, max_n=3, k=10, require_full=False):
    L = len(ids)
    for n in range(max_n, 0, -1):
        gram = ids[L - n:]
        for i in range(0, L - n + 1):
            if ids[i:i + n] == gram:
                s = i + n
                if s < L - n and (not require_full or s + k <= L):
                    return ids[s:s + k]
    return []


@pytest.mark.parametrize("require_full", [False, True])
def test_pld_chain_matches_the_reference_rule(rng, require_full):
    for _ in range(300):
        ids = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        got = pld_chain(np.array(ids), 3, 1, 10, require_full=require_full).tolist()
        assert got == naive_pld(ids, 3, 10, require_full)


def test_sa_range_on_wide_ranges_uses_binary_search_correctly():
    rng = np.random.default_rng(7)
    t = rng.integers(0, 3, size=6000).astype(np.int64)
    t[-1] = 3
    sa = build_suffix_array(t)
    off = bucket_offsets(t, sa, 4)
    for _ in range(60):
        pat = rng.integers(0, 3, size=int(rng.integers(1, 8)))
        lo, hi = sa_range(t, sa, off, pat.tolist())
        win = np.lib.stride_tricks.sliding_window_view(t, len(pat))
        want = np.flatnonzero((win == pat).all(axis=1))
        assert sorted(sa[lo:hi].tolist()) == want.tolist()
    assert off[1] - off[0] > 256  # the first ranges are wide enough for the bisection path


@pytest.mark.parametrize("n", [50, 3000])
def test_sa_range_scan_path_equals_the_stepwise_reference(n):
    """Long patterns over a small alphabet end in the vectorized window comparison (``_scan``), including
    patterns running past the end of the corpus and patterns with unknown tokens."""
    rng = np.random.default_rng(n)
    t = rng.integers(0, 3, size=n).astype(np.int64)
    t[-1] = 3
    sa = build_suffix_array(t)
    off = bucket_offsets(t, sa, 4)
    for _ in range(300):
        start = int(rng.integers(0, n))
        pat = t[start:start + int(rng.integers(1, 16))].copy()  # occurs (or runs into the end)
        if rng.random() < 0.3:
            pat[rng.integers(0, len(pat))] = rng.integers(0, 3)
        pat = pat[pat != 3]
        if len(pat) == 0:
            continue
        want = sa_range_stepwise(t, sa, off, pat.tolist())
        got = sa_range(t, sa, off, pat)
        assert got == want or (got[0] == got[1] and want[0] == want[1])  # where an empty range sits is free
        assert sorted(sa[want[0]:want[1]].tolist()) == [
            i for i in range(n - len(pat) + 1) if t[i:i + len(pat)].tolist() == pat.tolist()]
    assert sa_range(t, sa, off, [7]) == (0, 0) == sa_range_stepwise(t, sa, off, [7])
