"""The optimized per-step path (issue 19, latency) against the straightforward implementations.

:mod:`tests.drafting.reference_impl` holds the code as it was before the optimization; every optimized
function must give the same arrays, bit for bit (same dtypes, same float rounding), on fixed-seed inputs
and on a real replay (Spec-Bench turns over a datastore built from the shipped AlpacaEval corpus), where
the candidates, the drafts and everything learned (calibration tables, session corrections) are compared
at every step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retrieval.drafting import DraftBudget
from retrieval.drafting.base import Candidates, continuation_candidates, depth_levels, trie_candidates
from retrieval.drafting.context import ContextLookup
from retrieval.drafting.datastore import suffix_candidates
from retrieval.drafting.draft import Draft
from retrieval.drafting.kernels import (bucket_offsets, build_suffix_array, gather_continuations,
                                        gather_continuations_t, longest_suffix_match, nested_ngram_ends,
                                        ngram_end_positions, prefix_trie, prefix_trie_t, sa_range)
from retrieval.drafting.merge import Calibrator, SessionCorrection, evaluate_trie, evaluation, merge
from retrieval.drafting.recycling import RecyclingMatrix, RecyclingSource
from tests.drafting import reference_impl as ref
from tests.drafting import test_merge as merge_tests


def same(a, b) -> bool:
    """Equal arrays (dtype, shape, bytes), tuples, candidates (fields and levels) and drafts."""
    if isinstance(a, Candidates) or isinstance(b, Candidates):
        return (type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
                and a.levels == b.levels == depth_levels(b.depth))
    if isinstance(a, Draft):
        return (isinstance(b, Draft) and a.source_names == b.source_names
                and all(same(getattr(a, f), getattr(b, f)) for f in ("tokens", "parents", "probs", "source_index")))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


# --- reference sources (the proposals as they were) ------------------------------------------------------

def ref_context(src: ContextLookup, ctx, max_depth):
    out = []
    seen = np.zeros(0, dtype=np.int64)
    L = len(ctx)
    for n in range(min(src.max_ngram, L - 1), src.min_ngram - 1, -1):
        ends = ref.ngram_end_positions(ctx, n)
        if len(ends) == 0:
            continue
        if len(seen):
            ends = ends[~np.isin(ends, seen)]
            if len(ends) == 0:
                continue
        pick = ends[-src.max_matches:] if src.prefer == "recent" else ends[: src.max_matches]
        seen = np.concatenate([seen, pick])
        rows = ref.gather_continuations(ctx, pick + 1, max_depth, sep=None)
        tok, par, cnt, dep = ref.prefix_trie(rows)
        if len(tok):
            out.append(ref.trie_candidates(src.name, tok, par, cnt, dep, float(len(pick)), n, src.alpha))
        if len(out) >= src.levels:
            break
    return out


def ref_recycling(src: RecyclingSource, ctx, max_depth):
    toks = ref.recycling_expand(src.matrix.M, int(ctx[-1]), src.parents, src.ranks)
    keep = (toks >= 0) & (src.depths <= max_depth)
    if not keep.any():
        return []
    idx = np.flatnonzero(keep)
    remap = np.full(len(toks), -1, dtype=np.int64)
    remap[idx] = np.arange(len(idx))
    par = src.parents[idx]
    par = np.where(par >= 0, remap[np.maximum(par, 0)], -1)
    ranks = src.ranks[idx]
    return [Candidates(src.name, toks[idx].astype(np.int32), par.astype(np.int32), np.ones(len(idx)),
                       src._prior_by_rank[ranks], src._feat[idx], src.depths[idx], 0)]


# --- kernels on fixed-seed inputs ------------------------------------------------------------------------

def _rows(rng, k, D, vocab=3):
    rows = rng.integers(0, vocab, size=(k, D)).astype(np.int32)
    cut = rng.integers(0, D + 1, size=k)
    for i in range(k):
        rows[i, cut[i]:] = -1
    return rows


def test_prefix_trie_equals_reference(rng):
    for _ in range(300):
        k, D = int(rng.integers(0, 40)), int(rng.integers(0, 8))
        rows = _rows(rng, k, D)
        w = rng.random(k)
        for weights in (None, w):
            assert same(prefix_trie(rows, weights), ref.prefix_trie(rows, weights))
            srt = rows[np.lexsort(rows.T[::-1])] if k and D else rows
            assert same(prefix_trie(srt, weights, is_sorted=True), ref.prefix_trie(srt, weights, is_sorted=True))
        # one weight for every row (the corpus' sampled ranges): the sums of the reference, bit for bit
        for u in (1.0, 1000 / 256, 7 / 3, 0.1):
            got = prefix_trie_t(np.ascontiguousarray(rows.T), np.float64(u))[:4]
            assert same(got, ref.prefix_trie(rows, np.full(k, u)))


def test_gather_and_candidates_equal_reference(rng):
    for _ in range(200):
        n = int(rng.integers(1, 60))
        t = rng.integers(0, 4, size=n).astype(np.uint16)
        sep = 3 if rng.random() < 0.7 else None
        starts = np.sort(rng.integers(0, n + 3, size=int(rng.integers(0, 12))))
        D = int(rng.integers(0, 7))
        rows = ref.gather_continuations(t, starts, D, sep)
        assert same(gather_continuations(t, starts, D, sep), rows)
        assert same(np.ascontiguousarray(gather_continuations_t(t, starts, D, sep).T), rows)
        for srt in (False, True):
            r = rows if not srt or len(rows) == 0 or D == 0 else rows[np.lexsort(rows.T[::-1])]
            w = np.float64(rng.integers(1, 9) / 4) if srt else None
            tok, par, cnt, dep = ref.prefix_trie(r, None if w is None else np.full(len(r), w), is_sorted=srt)
            want = ref.trie_candidates("s", tok, par, cnt, dep, 5.0, 3, 1.0) if len(tok) else None
            got = continuation_candidates("s", np.ascontiguousarray(r.T).reshape(D, len(r)), w, srt, 5.0, 3, 1.0)
            assert (got is None and want is None) or same(got, want)
            if len(tok):
                assert same(trie_candidates("s", tok, par, cnt, dep, 5.0, 3, 1.0), want)


def _corpus(rng, n, v):
    t = rng.integers(0, v, size=n).astype(np.uint16)
    t[rng.random(n) < 0.03] = v
    t[-1] = v
    sa = build_suffix_array(t)
    return t, sa, bucket_offsets(t, sa, v + 1)


@pytest.mark.parametrize("n,v", [(300, 3), (20000, 2), (20000, 40)])
def test_sa_range_and_longest_match_equal_reference(rng, n, v):
    """Exactly the reference's ranges, empty ones included (wide ranges: the bisection; narrow: the scan)."""
    t, sa, off = _corpus(rng, n, v)
    for _ in range(300):
        s = int(rng.integers(0, n))
        pat = t[s:s + int(rng.integers(1, 20))].astype(np.int64)
        if rng.random() < 0.3:
            pat[rng.integers(0, len(pat))] = rng.integers(0, v)
        pat = pat[pat != v]
        assert sa_range(t, sa, off, pat) == ref.sa_range(t, sa, off, pat)
        ctx = rng.integers(0, v, size=int(rng.integers(1, 30)))
        for mx in (1, 8, 16):
            assert longest_suffix_match(t, sa, off, ctx, mx) == ref.longest_suffix_match(t, sa, off, ctx, mx)


def test_nested_ngram_ends_equal_reference(rng):
    for _ in range(200):
        ctx = rng.integers(0, 3, size=int(rng.integers(2, 60)))
        top = min(6, len(ctx) - 1)
        got = nested_ngram_ends(ctx, top)
        for n in range(1, top + 1):
            assert same(got[n], ref.ngram_end_positions(ctx, n)) and same(got[n], ngram_end_positions(ctx, n))


def test_sources_equal_reference(rng):
    t, sa, off = _corpus(rng, 5000, 6)
    mat = RecyclingMatrix(7, 8)
    mat.warm_start(t, 6)
    rec = RecyclingSource(mat)
    for prefer in ("recent", "earliest"):
        cl = ContextLookup(max_matches=int(rng.integers(1, 20)), levels=int(rng.integers(1, 4)), prefer=prefer)
        for _ in range(150):
            ctx = rng.integers(0, 6, size=int(rng.integers(1, 200))).astype(np.int32)
            D = int(rng.integers(1, 11))
            assert same(cl.propose(ctx, D, 64), ref_context(cl, ctx, D))
            assert same(rec.propose(ctx, D, 64), ref_recycling(rec, ctx, D))
            for mm in (4, 100, 256):
                args = ("corpus", t, sa, off, 6, ctx, D, 16, 1, mm, 2, 1.0)
                assert same(suffix_candidates(*args), ref.suffix_candidates(*args))
            mat.observe_sequence(ctx[-5:])


# --- evaluation, calibration, merge ----------------------------------------------------------------------

def random_trie(rng, source, n_max=60, vocab=3, depth_max=8, q_levels=None):
    """A random BFS trie (up to ``vocab`` children a node, random features); with ``q_levels`` the priors
    take few values (ties in the merged ranking)."""
    return merge_tests.random_trie(rng, source, n_max, vocab, depth_max, max_children=vocab, q_levels=q_levels,
                                   n_feat=30)


def test_evaluate_trie_equals_reference(rng):
    for _ in range(300):
        c = random_trie(rng, "a")
        truth = rng.integers(0, 3, size=int(rng.integers(0, 10)))
        want = ref.evaluate_trie(c.tokens, c.parents, truth, c.depth)
        assert same(evaluate_trie(c.tokens, c.parents, truth, c.depth), want)
        assert same(evaluate_trie(c.tokens, c.parents, truth), want)
        k = int(rng.integers(0, len(c) + 1))  # a BFS prefix scores as in the whole trie
        got = evaluation(c, np.asarray(truth))
        assert same([x[:k] for x in got], ref.evaluate_trie(c.tokens[:k], c.parents[:k], truth, c.depth[:k]))


@pytest.mark.parametrize("combine", ["noisy_or", "max"])
def test_merge_calibration_and_correction_equal_reference(rng, combine):
    """Sessions of random steps, twice: the optimized calibrator / correction / merge and the reference
    ones, each learning from its own drafts; drafts and tables must stay identical."""
    for trial in range(12):
        cal, rcal = Calibrator(), ref.Calibrator()
        for _session in range(3):
            corr, rcorr = SessionCorrection(decay=0.9 if trial % 2 else 1.0), ref.SessionCorrection(
                decay=0.9 if trial % 2 else 1.0)
            for step in range(15):
                q_levels = [None, 4, 2][step % 3]
                srcs = [("a", "b", "c", "a"), ("a",), ("b", "c")][(trial + step) % 3]
                budget = [DraftBudget(int(rng.integers(1, 40)), int(rng.integers(1, 9))),
                          DraftBudget.chain(int(rng.integers(1, 9))), DraftBudget(64, 10)][step % 3]
                # tries no deeper than the budget, as the sources make them (SessionCorrection.adjust needs
                # one estimate per node of the trie, in both versions)
                cands = [random_trie(rng, s, q_levels=q_levels, depth_max=budget.max_depth) for s in srcs]
                if rng.random() < 0.2:
                    cands.append(random_trie(rng, "c", n_max=0))  # an empty trie
                rc = [dataclasses.replace(c) for c in cands]  # fresh objects: nothing cached on them
                corr.discard_pending()
                rcorr.discard_pending()
                d = merge(cands, budget, cal, combine, corr)
                rd = ref.merge(rc, budget, rcal, combine, rcorr)
                assert same(d, rd)
                assert same(merge(cands, budget, None, combine), ref.merge(rc, budget, None, combine))
                truth = rng.integers(0, 3, size=int(rng.integers(0, 8)))
                corr.update(truth)
                rcorr.update(truth)
                cal.update(cands, truth)
                rcal.update(rc, truth)
                for s in ("a", "b", "c"):
                    assert same(cal.table(s), rcal.table(s))
                    assert same(corr._H.get(s), rcorr._H.get(s)) and same(corr._E.get(s), rcorr._E.get(s))


def test_merge_equals_reference_with_shared_paths_and_ties(rng):
    """Many sources proposing the same paths (groups of up to 6 members) with tied probabilities."""
    for _ in range(150):
        base = random_trie(rng, "a", vocab=2, q_levels=3)
        cands = []
        for s in ("a", "b", "c", "d", "e", "a"):
            c = dataclasses.replace(base, source=s, prior=rng.integers(1, 4, size=len(base)) / 3)
            cands.append(c)
        budget = DraftBudget(int(rng.integers(1, 30)), int(rng.integers(1, 9)))
        for combine in ("noisy_or", "max"):
            assert same(merge(cands, budget, None, combine), ref.merge(cands, budget, None, combine))


# --- a real replay ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_setup(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from bench.drafts.data import CORPUS_DIR, TOKENIZER_MODEL, VOCAB_SIZE, load_turns
    from retrieval.drafting import DatastoreCatalog, ManagerConfig, SessionManager

    corpus = sorted(CORPUS_DIR.glob("*.json"))
    if not corpus or not TOKENIZER_MODEL.is_file():
        pytest.skip("the shipped drafting data is not present")
    cat = DatastoreCatalog(tmp_path_factory.mktemp("stores"))
    cat.build("alpaca", [str(corpus[0])], tokenizer=str(TOKENIZER_MODEL), text_fields=["instruction", "output"])
    turns = load_turns(24)
    m = SessionManager(ManagerConfig(vocab_size=VOCAB_SIZE, default_budget=DraftBudget(64, 10)), cat)
    ds = cat.open("alpaca")
    m.recycling.matrix.warm_start(ds.tokens, ds.sep)
    return m, ds, turns


def test_real_replay_equals_reference(real_setup):
    """Spec-Bench turns replayed as the server does (learn after replying); at every step the sources'
    candidates, the draft and the learned state equal those of the reference code."""
    m, ds, turns = real_setup
    rcal = ref.Calibrator()
    rmat = RecyclingMatrix(m.recycling.matrix.vocab_size, m.recycling.matrix.k)
    rmat.M[:] = m.recycling.matrix.M
    rrec = RecyclingSource(rmat)
    steps = 0
    for t in turns[::3]:
        s = m.open(t.prompt, datastore="alpaca")
        rcorr = ref.SessionCorrection()
        out, i = t.output, 0
        while True:
            ctx = np.array(s.context)
            d = s.draft()
            rc = []
            for src in s.sources:
                if src.name == "context":
                    rc += ref_context(src, ctx, 10)
                elif src.name == "recycling":
                    rc += ref_recycling(rrec, ctx, 10)
                else:  # corpus, history
                    tok, sa, off, sep = ((ds.tokens, ds.sa, ds.offsets, ds.sep) if src.name == "corpus" else
                                         (*src.store.snapshot, src.store.sep) if src.store.snapshot else (None,) * 4)
                    if tok is not None and len(tok):
                        rc += ref.suffix_candidates(src.name, tok, sa, off, sep, ctx, 10, src.max_match_len,
                                                    src.min_match_len, src.max_matches, src.levels, src.alpha)
            assert same(s._last, rc)
            rcorr.discard_pending()
            assert same(d, ref.merge(rc, DraftBudget(64, 10), rcal, "noisy_or", rcorr))
            if i >= len(out):
                break
            acc = out[i:i + min(d.accepted_length(out[i:i + 11].tolist()), len(out) - i - 1) + 1]
            s.append(acc, defer_feedback=True)
            rcorr.update(acc)
            rrec.observe(ctx, acc.astype(np.int32), None)
            s.flush_feedback()
            rcal.update(rc, acc)
            for name in ("context", "corpus", "recycling", "history"):
                assert same(m.calibrator.table(name), rcal.table(name))
                assert same(s.correction._H.get(name), rcorr._H.get(name))
                assert same(s.correction._E.get(name), rcorr._E.get(name))
            assert same(m.recycling.matrix.M, rmat.M)
            i += len(acc)
            steps += 1
            if i >= len(out) or steps % 60 == 0:
                break
        m.close(s.session_id)
    assert steps > 100
