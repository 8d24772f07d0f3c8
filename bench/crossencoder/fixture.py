"""The shipped cross-encoder fixture (``bench/datasets/crossencoder``) as scorers and index inputs.

400 AlpacaEval instructions x 1,000 model answers with the exact joint-encoder score of every pair
(rows 0..99 test queries, 100..399 anchor queries) and all-MiniLM-L6-v2 bi-encoder embeddings. See
``bench/datasets/crossencoder/SOURCE.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from retrieval.crossencoder.dual import TableDualEncoder
from retrieval.crossencoder.scorers import TableScorer

DATA = Path(__file__).resolve().parents[1] / "datasets" / "crossencoder"


@dataclasses.dataclass(frozen=True)
class Fixture:
    queries: list[str]  # 400: test queries first (n_test), then anchor queries
    items: list[str]  # 1000
    S: np.ndarray  # (400, 1000) float32 exact scores
    q_de: np.ndarray  # (400, 384) bi-encoder query embeddings
    i_de: np.ndarray  # (1000, 384) bi-encoder item embeddings
    n_test: int

    @property
    def test_queries(self) -> list[str]:
        return self.queries[: self.n_test]

    @property
    def anchor_pool(self) -> list[str]:
        return self.queries[self.n_test :]

    def item_records(self) -> list[dict]:
        return [{"id": j, "text": t, "payload": None} for j, t in enumerate(self.items)]

    def scorer(self) -> TableScorer:
        return TableScorer(self.queries, self.items, self.S, label="crossencoder-fixture-400x1000")

    def dual_encoder(self) -> TableDualEncoder:
        return TableDualEncoder(self.queries + self.items, np.concatenate([self.q_de, self.i_de]),
                                label="crossencoder-fixture-bienc")


@functools.lru_cache(maxsize=1)
def load_fixture() -> Fixture:
    t = json.loads((DATA / "task.json").read_text())
    S = np.load(DATA / "ce_scores_zeroshot_400x1000.npy")
    b = np.load(DATA / "bienc_embeddings.npz")
    return Fixture(list(t["queries"]), list(t["items"]), S, b["q"], b["i"], int(t["n_test"]))


def exact_topk(S_rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item indices per row (ties by lower index), (nq, k)."""
    order = np.lexsort((np.broadcast_to(np.arange(S_rows.shape[1]), S_rows.shape), -S_rows.astype(np.float64)), axis=-1)
    return order[:, :k]


def recall_at(S_rows: np.ndarray, returned: np.ndarray, k: int) -> np.ndarray:
    """Top-k-Recall per query = |exact top-k ∩ returned top-k| / k, ties tolerated: a returned item
    counts as a hit when its exact score is >= the exact k-th best score (no float slack)."""
    kth = np.sort(S_rows, axis=1)[:, ::-1][:, k - 1]
    r = returned[:, :k]
    valid = r >= 0
    sc = np.where(valid, np.take_along_axis(S_rows, np.maximum(r, 0), axis=1), -np.inf)
    hits = (sc >= kth[:, None]) & valid
    return hits.sum(axis=1) / k
