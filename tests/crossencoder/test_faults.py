"""Defects of the cross-encoder index found by the outside fault test (issue 11, item 7):

* ``cur`` after deleting stored anchor items: a dead anchor must cost no call and a budget >= the
  alive items must be exhaustive (the exact top-k over the alive items), with exact call counts;
* a huge query text: tokenised once per search (prefix only), not once per round and batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.crossencoder import CrossEncoderIndex, build_and_load, make_scorer
from retrieval.crossencoder.scorers import CallableScorer
from retrieval.errors import InvalidArgument

N, K_Q, K_I = 300, 50, 30


class LoggingTableScorer:
    """The fixture's exact scores behind the real ``callable`` backend, recording every item scored."""

    def __init__(self, fx) -> None:
        self.q = {t: j for j, t in reversed(list(enumerate(fx.queries)))}
        self.i = {t: j for j, t in reversed(list(enumerate(fx.items)))}
        self.S = fx.S
        self.items_scored: list[str] = []

    def __call__(self, queries, items):
        self.items_scored.extend(items)
        return self.S[[self.q[t] for t in queries], [self.i[t] for t in items]]

    def scorer(self) -> CallableScorer:
        return CallableScorer(self, fingerprint="fixture-table/logging")


@pytest.fixture()
def logged(tmp_path, fx):
    log = LoggingTableScorer(fx)
    index, _ = build_and_load(tmp_path / "idx", scorer=log.scorer(), items=fx.item_records()[:N],
                              anchor_queries=fx.anchor_pool[:K_Q], params={"k_i": K_I, "anchor_method": "random"})
    return index, log


def _exact_topk(fx, q: int, alive_ids: np.ndarray, k: int) -> np.ndarray:
    s = fx.S[q, alive_ids]
    return np.sort(s)[::-1][:k]


def test_cur_after_deleting_anchor_items_is_exhaustive_and_costs_no_dead_call(logged, fx):
    index, log = logged
    anchors = index.anchor_item_ids.tolist()
    dead_anchors = anchors[:10]
    others = [i for i in range(N) if i not in anchors][:5]
    assert index.delete_items(dead_anchors + others) == 15
    dead_texts = {fx.items[i] for i in dead_anchors + others}
    alive = index.ids
    n_alive = alive.size
    assert n_alive == N - 15
    queries = fx.test_queries[:6]
    for k in (n_alive, 20):
        log.items_scored.clear()
        before = index.scorer.totals.calls
        res = index.search_batch(queries, k=k, params={"mode": "cur", "budget": 5000})
        assert index.scorer.totals.calls - before == n_alive * len(queries)
        assert len(log.items_scored) == n_alive * len(queries) and not dead_texts & set(log.items_scored)
        for q, r in enumerate(res):
            # Exhaustive: every alive item scored once, the answer is the exact top-k over them.
            assert r.calls == n_alive and (r.k_i, r.k_r) == (K_I - 10, n_alive - (K_I - 10))
            assert (r.ids >= 0).sum() == min(k, n_alive) and not set(r.ids.tolist()) - set(alive.tolist())
            np.testing.assert_array_equal(r.scores, _exact_topk(fx, q, alive, k))
            np.testing.assert_array_equal(r.scores, fx.S[q, r.ids])
    # A budget below the alive items: exactly that many calls, still none on a dead anchor; an
    # explicit k_i equal to the stored anchors' count means the stored (alive) ones too.
    for params in ({"mode": "cur", "budget": 100}, {"mode": "cur", "budget": 100, "k_i": K_I}):
        log.items_scored.clear()
        before = index.scorer.totals.calls
        res = index.search_batch(queries, k=10, params=params)
        assert all(r.calls == 100 and (r.k_i, r.k_r) == (K_I - 10, 100 - K_I + 10) for r in res)
        assert index.scorer.totals.calls - before == 100 * len(queries) == len(log.items_scored)
        assert not dead_texts & set(log.items_scored)
    # The stored generation is unchanged (re-solved in memory, no call); reopened: same answers.
    assert index.anchor_item_ids.tolist() == anchors
    again = CrossEncoderIndex.load(index.path, log.scorer())
    for a, b in zip(again.search_batch(queries, 10, {"mode": "cur", "budget": 5000}),
                    index.search_batch(queries, 10, {"mode": "cur", "budget": 5000}), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        assert a.calls == b.calls == n_alive


def test_cur_with_every_stored_anchor_deleted_picks_alive_ones(logged, fx):
    index, log = logged
    anchors = index.anchor_item_ids.tolist()
    index.delete_items(anchors)
    dead = {fx.items[i] for i in anchors}
    alive = index.ids
    log.items_scored.clear()
    r = index.search(fx.test_queries[0], k=alive.size, params={"mode": "cur", "budget": 5000})
    assert r.calls == alive.size == len(log.items_scored) and r.k_i == K_I and not dead & set(log.items_scored)
    np.testing.assert_array_equal(r.scores, _exact_topk(fx, 0, alive, alive.size))
    r = index.search(fx.test_queries[0], k=10, params={"mode": "cur", "budget": 60})
    assert r.calls == 60 and r.k_i + r.k_r == 60


def test_cur_kernel_refuses_a_dead_anchor():
    from retrieval.crossencoder.search import cur_search

    alive = np.array([True, False, True, True])
    with pytest.raises(InvalidArgument, match="alive"):
        cur_search(lambda q, r: np.zeros(len(r), np.float32), 1, np.zeros((4, 2), np.float32),
                   np.array([0, 1]), alive, 2, 2)


# ------------------------------------------------------------------------------------------------
# A huge query text
# ------------------------------------------------------------------------------------------------
class CountingTokenizer:
    """A real tokenizer, called through: counts the calls that carry (a prefix of) ``marker``."""

    def __init__(self, tok, marker: str) -> None:
        self._tok = tok
        self._marker = marker[:200]
        self.marker_calls = 0
        self.marker_chars = 0

    def __call__(self, texts, *args, **kw):
        hit = [t for t in texts if len(t) >= 200 and t.startswith(self._marker)]
        if hit:
            self.marker_calls += 1
            self.marker_chars += sum(len(t) for t in hit)
        return self._tok(texts, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def small_scorers(tiny_hf_dir):
    import torch

    torch.set_num_threads(1)
    return {
        "minilm-joint": make_scorer("minilm-joint", batch_size=4, device="cpu", precision="fp32"),
        "hf": make_scorer("hf", model_dir=str(tiny_hf_dir), batch_size=4, device="cpu"),
    }


@pytest.mark.parametrize("backend", ["minilm-joint", "hf"])
def test_a_huge_query_is_tokenised_once_not_every_round(tmp_path, fx, small_scorers, backend):
    scorer = small_scorers[backend]
    index, _ = build_and_load(tmp_path / "idx", scorer=scorer, items=fx.item_records()[:12],
                              anchor_queries=fx.anchor_pool[:2], params={"k_i": 2, "anchor_method": "random"})
    huge = ("what is the answer to the question of how to configure it " * 20000)[: 1 << 20]
    counting = CountingTokenizer(scorer._cache.tok, huge)
    scorer._cache.tok = counting
    try:
        params = {"mode": "adaptive", "budget": 12, "rounds": 6}  # 6 rounds of 2 pairs
        r = index.search(huge, k=3, params=params)
        assert r.calls == 12 and r.rounds == 6 and r.query_truncated and r.truncated_pairs == 12
        # One tokenisation of a prefix of the query for the whole search (the old code: one of the
        # whole megabyte per round and batch).
        assert counting.marker_calls == 1 and counting.marker_chars < 20_000
        again = index.search(huge, k=3, params=params)
        assert counting.marker_calls == 1  # cached across searches too
        np.testing.assert_array_equal(again.ids, r.ids)
        # The model sees the query cut to its limit: the same answer as a query of its first 10 KB.
        ref = index.search(huge[:10_000], k=3, params=params)
        np.testing.assert_array_equal(ref.ids, r.ids)
        np.testing.assert_allclose(ref.scores, r.scores, atol=1e-6)
    finally:
        scorer._cache.tok = counting._tok
