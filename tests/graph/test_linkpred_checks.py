"""Evaluation and training rules of link prediction: enough negatives for Hits@K, early stopping that
stops, and a cancelled training that keeps its best epoch."""

import json

import numpy as np
import pytest

from retrieval.errors import Cancelled
from retrieval.graph.graph import Graph
from retrieval.graph.linkpred import LinkScorer, hits_at_k, ncn_train_job, split_edges, train_link_model
from retrieval.graph.ncn import make_config
from retrieval.graph.readers import read_graph
from retrieval.graph.store import GraphStore


@pytest.fixture(scope="module")
def celegans(data_dir):
    return read_graph(data_dir / "celegans" / "Celegans.txt").graph


def test_negatives_are_at_least_the_largest_k(celegans):
    m = celegans.num_edges - celegans.num_self_loops
    default = split_edges(celegans, seed=0)  # floor(0.2 m) >= 100: the NCN code's split, unchanged
    assert len(default.valid_neg) == len(default.test_neg) == int(0.2 * m) == 429
    small = split_edges(celegans, seed=0, test_frac=0.02)  # floor(0.02 m) = 42 test edges
    assert len(small.test) == 42 and len(small.valid_neg) == len(small.test_neg) == 100
    assert small.describe()["negatives"] == 100
    # with 100 negatives Hits@100 is no longer 1.0 for any scorer: a constant scorer gets 0
    assert hits_at_k(np.zeros(42), np.zeros(100), 100) == 0.0
    neg_keys = {tuple(p) for p in np.concatenate([small.valid_neg, small.test_neg]).tolist()}
    assert len(neg_keys) == 200  # distinct, and none is an edge
    A = celegans.adjacency()
    assert all(A[u, v] == 0 and u < v for u, v in neg_keys)


def test_tiny_graph_uses_every_non_edge(caplog):
    g = Graph.from_edges(12, np.arange(12), (np.arange(12) + 1) % 12)  # a ring: 54 non-edges
    split = split_edges(g, seed=0)
    assert len(split.valid_neg) == len(split.test_neg) == 27
    assert "fewer than min_negatives" in caplog.text


def test_patience_stops_training(celegans):
    split = split_edges(celegans, seed=0)
    # learning rates 0: the validation score never improves after the first evaluation
    cfg = make_config("cora", predictor="ncn", input="learnable", epochs=20, hidden=8, gnn_lr=0.0, pred_lr=0.0,
                      patience=2, max_batches=1)
    res = train_link_model(split, None, cfg, seed=0)
    assert res.stopped_early and len(res.epoch_seconds) == 3 and res.best["epoch"] == 1
    assert res.summary()["epochs_run"] == 3


class _CancelAfter:
    """A job context that cancels once ``n`` epochs were reported."""

    def __init__(self, work_dir, n):
        self.work_dir, self.n, self.done = work_dir, n, 0

    def progress(self, done, total=None, message=""):
        self.done = done

    def check_cancelled(self):
        if self.done >= self.n:
            raise Cancelled("cancelled by the test")


def test_cancelled_training_keeps_the_best_epoch(tmp_path, celegans):
    store = GraphStore(tmp_path / "graphs")
    store.put("ce", celegans)
    cfg = {"input": "learnable", "epochs": 50, "hidden": 8, "max_batches": 2}
    with pytest.raises(Cancelled):
        ncn_train_job(_CancelAfter(tmp_path / "work", 2), store_root=str(store.root), graph="ce", preset="cora",
                      config=cfg, seed=0)
    assert store.list_models("ce") == ["ncn"]
    meta = json.loads((store.path("ce") / "models" / "ncn" / "model.json").read_text())
    assert meta["partial"] is True and meta["summary"]["cancelled"] and meta["metrics"]["epoch"] in (1, 2)
    assert meta["summary"]["epochs_run"] == 2
    p = LinkScorer.load(store, "ce", "ncn", device="cpu").score([[0, 1], [5, 9]])
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    # cancelled before any epoch was evaluated: nothing is stored, the earlier model stays
    with pytest.raises(Cancelled):
        ncn_train_job(_CancelAfter(tmp_path / "work2", 0), store_root=str(store.root), graph="ce", preset="cora",
                      config=cfg, seed=0, model_name="other")
    assert store.list_models("ce") == ["ncn"]
