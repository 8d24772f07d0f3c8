import itertools

import numpy as np
import pytest

from retrieval.drafting import Calibrator, DraftBudget, merge
from retrieval.drafting.base import Candidates
from retrieval.drafting.draft import tree_depths
from retrieval.drafting.merge import evaluate_trie
from retrieval.errors import InvalidArgument


def random_trie(rng, source, n_max=40, vocab=4, depth_max=6, max_children=2, q_levels=None, n_feat=0):
    """A random BFS-ordered trie (unique children tokens, at most ``max_children`` a node) with random
    priors (with ``q_levels``: few distinct values, some 1.0) and features (0, or random below ``n_feat``)."""
    toks, pars, deps = [], [], []
    frontier = [(-1, 0)]
    while frontier and len(toks) < n_max:
        nxt = []
        for node, d in frontier:
            if d >= depth_max:
                continue
            for t in rng.choice(vocab, size=int(rng.integers(0, max_children + 1)), replace=False).tolist():
                toks.append(t)
                pars.append(node)
                deps.append(d + 1)
                nxt.append((len(toks) - 1, d + 1))
        frontier = nxt
    n = len(toks)
    prior = rng.random(n) if q_levels is None else rng.integers(1, q_levels + 1, size=n) / q_levels
    if q_levels is not None:
        prior[rng.random(n) < 0.1] = 1.0
    feat = rng.integers(0, n_feat, size=n) if n_feat else np.zeros(n, np.int64)
    return Candidates(source, np.array(toks, np.int32), np.array(pars, np.int32), np.ones(n), prior,
                      feat, np.array(deps, np.int32), 1)


def paths_probs(c, probs):
    out, paths = {}, []
    for i in range(len(c.tokens)):
        p = c.parents[i]
        paths.append((paths[p] if p >= 0 else ()) + (int(c.tokens[i]),))
        out[paths[-1]] = probs[i]
    return out


def brute_force(cands, combine):
    """Path probabilities of the union, computed the slow way."""
    per = {}
    for c in cands:
        pp = {}
        for path, q in paths_probs(c, c.prior).items():
            pp[path] = q * (pp[path[:-1]] if len(path) > 1 else 1.0)
        for path, p in pp.items():
            per.setdefault(path, []).append(p)
    if combine == "noisy_or":
        return {k: 1 - np.prod([1 - p for p in v]) for k, v in per.items()}
    return {k: max(v) for k, v in per.items()}


@pytest.mark.parametrize("combine", ["noisy_or", "max"])
def test_merge_is_the_best_valid_subtree(rng, combine):
    for _ in range(60):
        cands = [random_trie(rng, s) for s in ("a", "b", "c")]
        budget = DraftBudget(int(rng.integers(1, 30)), int(rng.integers(1, 7)))
        d = merge(cands, budget, None, combine)
        ref = brute_force(cands, combine)
        ref = {k: v for k, v in ref.items() if len(k) <= budget.max_depth}
        # validity: topological, budget, depth, unique children
        assert len(d) <= budget.max_nodes
        assert (d.parents < np.arange(len(d))).all()
        assert len(d) == 0 or d.depths().max() <= budget.max_depth
        kids = set()
        for i in range(len(d)):
            key = (int(d.parents[i]), int(d.tokens[i]))
            assert key not in kids
            kids.add(key)
        # probabilities: those of the union (clipped to be monotone), and the kept set is the top of them
        got = paths_probs(d, d.probs)
        for path, p in got.items():
            assert path in ref
            want = min(ref[path[:i]] for i in range(1, len(path) + 1))
            assert p == pytest.approx(want, rel=1e-5, abs=1e-6)
            if len(path) > 1:
                assert got[path[:-1]] >= p - 1e-7
        assert len(d) == min(budget.max_nodes, len(ref))
        mono = {k: min(ref[k[:i]] for i in range(1, len(k) + 1)) for k in ref}
        kth = sorted(mono.values(), reverse=True)[len(d) - 1] if len(d) else 1
        assert all(v <= kth + 1e-6 for k, v in mono.items() if k not in got)


def test_chain_mode_follows_the_best_child(rng):
    for _ in range(30):
        cands = [random_trie(rng, "a"), random_trie(rng, "b")]
        d = merge(cands, DraftBudget.chain(5))
        assert d.is_chain and len(d) <= 5
        ref = brute_force(cands, "noisy_or")
        prefix = ()
        for t in d.tokens.tolist():
            sibs = {k[-1]: v for k, v in ref.items() if len(k) == len(prefix) + 1 and k[:-1] == prefix}
            assert ref[prefix + (t,)] == pytest.approx(max(sibs.values()), rel=1e-6)
            prefix += (t,)


def test_merge_credits_the_best_source_and_handles_empty():
    a = Candidates("a", np.array([5]), np.array([-1]), np.ones(1), np.array([0.2]), np.zeros(1, np.int64), np.array([1]))
    b = Candidates("b", np.array([5, 6]), np.array([-1, 0]), np.ones(2), np.array([0.5, 0.5]), np.zeros(2, np.int64),
                   np.array([1, 2]))
    d = merge([a, b], DraftBudget(8, 4))
    assert d.tokens.tolist() == [5, 6] and d.sources == ["b", "b"]
    assert d.probs[0] == pytest.approx(1 - 0.8 * 0.5)
    assert len(merge([], DraftBudget())) == 0
    with pytest.raises(InvalidArgument):
        merge([a], DraftBudget(), combine="sum")


def test_evaluate_trie_matches_walk(rng):
    for _ in range(50):
        c = random_trie(rng, "a")
        truth = rng.integers(0, 4, size=int(rng.integers(1, 6)))
        tried, hit = evaluate_trie(c.tokens, c.parents, truth, c.depth)
        dep = tree_depths(c.parents)
        for i in range(len(c)):
            path, j = [], i
            while j >= 0:
                path.append(int(c.tokens[j]))
                j = c.parents[j]
            path.reverse()
            exp_tried = len(path) <= len(truth) and path[:-1] == truth[: len(path) - 1].tolist()
            assert tried[i] == exp_tried
            assert hit[i] == (exp_tried and path[-1] == truth[dep[i] - 1])


def test_calibrator_moves_towards_observed_rate():
    cal = Calibrator(strength=4)
    c = Candidates("a", np.array([1, 2]), np.array([-1, -1]), np.ones(2), np.array([0.5, 0.5]),
                   np.array([0, 1]), np.array([1, 1]))
    assert cal.conditional(c).tolist() == [0.5, 0.5]
    for _ in range(96):
        cal.update([c], np.array([1]))  # token 1 always right, token 2 always wrong
    q = cal.conditional(c)
    assert q[0] == pytest.approx((96 + 2) / 100) and q[1] == pytest.approx(2 / 100)
    with pytest.raises(InvalidArgument):
        Calibrator(strength=0)


def test_session_correction_rescales_by_observed_over_expected():
    from retrieval.drafting.merge import SessionCorrection

    c = Candidates("a", np.array([1, 2, 3]), np.array([-1, -1, 0]), np.ones(3), np.array([0.5, 0.5, 0.5]),
                   np.zeros(3, np.int64), np.array([1, 1, 2]))
    q = np.array([0.2, 0.2, 0.4])
    corr = SessionCorrection(strength=2.0, depth_buckets=4, cap=0.98)
    assert corr.adjust(c, q).tolist() == q.tolist()  # nothing observed yet: the shared estimate
    corr.discard_pending()  # (a session does this before each draft: only the last one is scored)
    for _ in range(10):
        corr.adjust(c, q)
        corr.update(np.array([1, 3]))  # the session accepts node 0 then node 2 every time
    # depth 1: 10 hits of 20 * 0.2 = 4 expected; depth 2: 10 hits of 10 * 0.4 = 4 expected
    f1, f2 = (10 + 2) / (4 + 2), (10 + 2) / (4 + 2)
    out = corr.adjust(c, q)
    assert out == pytest.approx([0.2 * f1, 0.2 * f1, min(0.4 * f2, 0.98)])
    # a session that never accepts pulls the estimates down
    low = SessionCorrection(strength=2.0)
    for _ in range(10):
        low.adjust(c, q)
        low.update(np.array([7]))
    assert low.adjust(c, q)[:2] == pytest.approx(0.2 * 2 / (4 + 2))
    assert low.adjust(c, q)[2] == pytest.approx(0.4)  # depth 2 never tried: unchanged
    # only the last draft of a session is scored; a separate source is corrected separately
    other = Candidates("b", c.tokens, c.parents, c.counts, c.prior, c.feat, c.depth)
    assert low.adjust(other, q).tolist() == q.tolist()
    for bad in ({"strength": 0}, {"decay": 0}, {"depth_buckets": 0}, {"cap": 1.5}):
        with pytest.raises(InvalidArgument):
            SessionCorrection(**bad)


def test_session_correction_changes_the_merged_ranking():
    from retrieval.drafting.merge import SessionCorrection

    # two sources propose different first tokens with the same shared estimate; the session learns
    # that source "b" is right and "a" wrong, so "b" must come first (and alone in a chain of 1)
    a = Candidates("a", np.array([5]), np.array([-1]), np.ones(1), np.array([0.5]), np.zeros(1, np.int64), np.array([1]))
    b = Candidates("b", np.array([6]), np.array([-1]), np.ones(1), np.array([0.5]), np.zeros(1, np.int64), np.array([1]))
    corr = SessionCorrection()
    d0 = merge([a, b], DraftBudget.chain(1), None, correction=corr)
    assert d0.tokens.tolist() == [5]  # tie: the first source
    corr.discard_pending()
    for _ in range(5):
        merge([a, b], DraftBudget.chain(1), None, correction=corr)
        corr.update(np.array([6]))
    d = merge([a, b], DraftBudget(2, 1), None, correction=corr)
    assert d.tokens.tolist() == [6, 5] and d.probs[0] > 0.5 > d.probs[1]
    assert merge([a, b], DraftBudget(2, 1), None).probs.tolist() == [0.5, 0.5]  # without it: unchanged


def test_session_correction_with_a_trie_deeper_than_the_budget():
    """A source's trie deeper than max_depth is cut by the merger; the session correction then sees the
    estimates of the kept prefix only (it used to fail on the shape mismatch once it had learned)."""
    from retrieval.drafting.merge import SessionCorrection

    deep = Candidates("a", np.array([1, 2, 3, 4]), np.array([-1, 0, 1, 2]), np.ones(4), np.full(4, 0.5),
                      np.zeros(4, np.int64), np.array([1, 2, 3, 4]))
    corr = SessionCorrection()
    budget = DraftBudget(8, 2)
    for _ in range(3):
        d = merge([deep], budget, None, correction=corr)
        assert d.tokens.tolist() == [1, 2]
        corr.update(np.array([1, 2, 9]))
    d = merge([deep], budget, None, correction=corr)
    assert d.tokens.tolist() == [1, 2] and d.probs[0] > 0.5  # learned: the session accepts this source
