import numpy as np
import pytest

from retrieval.drafting import Draft, DraftBudget, accepted_length, position_ids, tree_attention_mask, tree_depths
from retrieval.errors import InvalidArgument


def test_worked_example_from_docs():
    # context ... "The" ; draft: "cat"(0) -> "sat"(1) -> "on"(2); "dog"(3) -> "ran"(4); "cat"(0) -> "is"(5)
    tokens = [10, 11, 12, 20, 21, 13]
    parents = [-1, 0, 1, -1, 3, 0]
    d = Draft(tokens, parents, [0.6, 0.5, 0.4, 0.2, 0.1, 0.05], [0, 0, 0, 1, 1, 0], ("context", "corpus"))
    assert d.depths().tolist() == [1, 2, 3, 1, 2, 2]
    assert d.position_ids(7).tolist() == [7, 8, 9, 7, 8, 8]
    m = d.attention_mask()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [1, 0, 0, 0, 0, 1],
    ]
    assert d.sources == ["context", "context", "context", "corpus", "corpus", "context"]
    assert d.accepted_length([10, 13, 99]) == 2
    assert d.accepted_length([10, 11, 12, 50]) == 3
    assert d.accepted_length([20, 21]) == 2
    assert d.accepted_length([99]) == 0
    assert not d.is_chain


def test_chain_is_special_case():
    d = Draft.from_chain([5, 6, 7], "context")
    assert d.parents.tolist() == [-1, 0, 1] and d.is_chain
    assert d.attention_mask().tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    assert position_ids(d.parents, 4).tolist() == [4, 5, 6]


def test_mask_matches_brute_force_ancestry(rng):
    for _ in range(20):
        n = int(rng.integers(1, 40))
        parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, n)]
        mask = tree_attention_mask(parents)
        for i in range(n):
            anc, j = {i}, parents[i]
            while j >= 0:
                anc.add(j)
                j = parents[j]
            assert set(np.flatnonzero(mask[i]).tolist()) == anc
        depth = tree_depths(np.array(parents))
        assert (mask.sum(1) == depth).all()


def test_accepted_length_brute_force(rng):
    for _ in range(50):
        n = int(rng.integers(1, 30))
        parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, n)]
        tokens = rng.integers(0, 3, size=n)
        truth = rng.integers(0, 3, size=8)
        # brute force over all root paths
        best = 0
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(int(tokens[j]))
                j = parents[j]
            path.reverse()
            if path == truth[: len(path)].tolist():
                best = max(best, len(path))
        # siblings with equal tokens make the greedy walk ambiguous; only compare when unique
        kids = {}
        dup = any(kids.setdefault((p, int(t)), i) != i for i, (p, t) in enumerate(zip(parents, tokens)))
        if not dup:
            assert accepted_length(tokens, np.array(parents), truth) == best


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, -2], [-1, 0, 3]])
def test_bad_parents_rejected(parents):
    with pytest.raises(InvalidArgument):
        Draft(np.zeros(len(parents)), parents, np.zeros(len(parents)), np.zeros(len(parents)), ("x",))


def test_length_mismatch_and_source_index():
    with pytest.raises(InvalidArgument):
        Draft([1, 2], [-1], [0.5, 0.5], [0, 0], ("x",))
    with pytest.raises(InvalidArgument):
        Draft([1], [-1], [0.5], [1], ("x",))


@pytest.mark.parametrize("kw", [dict(max_nodes=0), dict(max_depth=0), dict(max_nodes=10**6),
                                dict(max_depth=10**4), dict(max_nodes=-3), dict(max_nodes=2.5), dict(max_nodes=True)])
def test_budget_limits(kw):
    with pytest.raises(InvalidArgument):
        DraftBudget(**kw)


def test_draft_is_immutable():
    d = Draft.from_chain([1, 2])
    with pytest.raises(ValueError):
        d.tokens[0] = 3
