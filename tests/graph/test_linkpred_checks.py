"""Evaluation and training rules of link prediction: enough negatives for Hits@K, early stopping that
stops, and a cancelled training that keeps its best epoch."""

import json

import numpy as np
import pytest

from retrieval.errors import Cancelled, InvalidArgument
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


def test_auto_preset_follows_features_size_and_density(celegans):
    from retrieval.graph.ncn import PRESETS, auto_preset, config_for_graph

    # Cora-sized with features: the Cora settings; past 10k nodes: PubMed's
    assert auto_preset(2_708, 5_278, True)[0] == "cora"
    assert auto_preset(19_717, 44_324, True)[0] == "pubmed"
    # featureless and sparse (C. elegans, mean degree 14.5): Cora's settings over a learned table
    m = celegans.num_edges - celegans.num_self_loops
    name, extra, why = auto_preset(celegans.n, m, False)
    assert (name, extra["input"]) == ("cora", "learnable") and "mean degree 14.5" in why
    # featureless and dense (ogbl-ddi: 4,267 nodes, 1,067,911 edges): the ddi settings
    assert auto_preset(4_267, 1_067_911, False)[0] == "ddi"
    # the chosen preset's values, early stopping on, the user's config on top
    cfg, chosen = config_for_graph("", celegans.n, m, False, {"hidden": 8, "patience": 3})
    assert chosen == {"preset": "auto", "chosen": "cora", "why": why}
    assert (cfg.input, cfg.hidden, cfg.patience, cfg.gnn_lr) == ("learnable", 8, 3, PRESETS["cora"]["gnn_lr"])
    assert config_for_graph(None, 4_267, 1_067_911, False)[0].encoder == "sum"
    # early stop after half the epochs without a better validation score, whatever the epoch count
    assert config_for_graph("auto", 100, 300, True)[0].patience == 50
    assert config_for_graph("auto", 100, 300, True, {"epochs": 30, "eval_every": 3})[0].patience == 5
    assert config_for_graph("auto", 100, 300, True, {"patience": None})[0].patience is None
    with pytest.raises(InvalidArgument, match="epochs must be a positive integer"):
        config_for_graph("auto", 100, 300, True, {"epochs": "many"})
    # a named preset is the reference's, untouched: no early stop added
    cfg, chosen = config_for_graph("cora", celegans.n, m, False, {"input": "learnable"})
    assert cfg.patience is None and chosen == {"preset": "cora"}
    with pytest.raises(InvalidArgument, match="valid presets.*auto"):
        config_for_graph("coral", 10, 10, True)
    with pytest.raises(InvalidArgument, match="chosen from the graph"):
        make_config("auto")


def test_a_featureless_graph_trains_with_no_preset_named(tmp_path, celegans):
    """Before ``auto`` this was an error ("has no node features"); now the job picks a learned table and
    stops early, and the result and model.json say what was chosen."""
    store = GraphStore(tmp_path / "graphs")
    store.put("ce", celegans)
    cfg = {"epochs": 30, "hidden": 8, "max_batches": 1, "gnn_lr": 0.0, "pred_lr": 0.0, "patience": 2}
    out = ncn_train_job(_CancelAfter(tmp_path / "work", 10**9), store_root=str(store.root), graph="ce",
                        config=cfg, seed=0)
    assert out["preset"]["chosen"] == "cora" and out["preset"]["preset"] == "auto"
    assert out["summary"]["stopped_early"] and out["summary"]["epochs_run"] == 3
    meta = json.loads((store.path("ce") / "models" / "ncn" / "model.json").read_text())
    assert meta["preset"] == out["preset"] and meta["config"]["input"] == "learnable"
