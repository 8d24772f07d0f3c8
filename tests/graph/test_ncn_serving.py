"""The serving path of NCN / NCNC (a frozen predictor: numpy common neighbours, the pair MLPs compiled
and run in chunks through oneDNN) against the plain model, and the opt-in int8 quantisation."""

import numpy as np
import pytest
import torch

from retrieval.errors import InvalidArgument
from retrieval.graph import ncn
from retrieval.graph.linkpred import LinkScorer, predict_logits, split_edges, train_link_model
from retrieval.graph.ncn import make_config
from retrieval.graph.readers import read_graph


@pytest.fixture(scope="module")
def celegans(data_dir):
    return read_graph(data_dir / "celegans" / "Celegans.txt").graph


@pytest.fixture(scope="module")
def trained(celegans):
    split = split_edges(celegans, seed=0)
    out = {}
    for predictor in ("ncn", "ncnc"):
        cfg = make_config("cora", predictor=predictor, input="learnable", epochs=1, hidden=64)
        out[predictor] = train_link_model(split, None, cfg, seed=0)
    return split, out


def _predict_links_pairs(g, nodes, rng, k=60):
    """Pairs as PredictLinks makes them: one node against candidates that are not its neighbours."""
    out = []
    for u in nodes:
        nb, _ = g.neighbors(int(u))
        c = np.setdiff1d(rng.choice(g.n, k, replace=False), np.append(nb, u))
        out.append(np.stack([np.full(c.size, u), c], 1))
    return np.concatenate(out)


def _plain_logits(model, h, adj, pairs, monkeypatch):
    """The model with no serving cache: torch common neighbours, sparse products, nn.Sequential MLPs."""
    model.predictor.unfreeze()
    with monkeypatch.context() as mp:
        mp.setattr(ncn, "pair_common_neighbors", lambda a, x, y: ncn.common_neighbors(a, x, y))
        mp.setattr(ncn, "bag_rows", lambda b, k, w, B, x: ncn.spmm_rows(b, k, w, B, x, sorted_unique=True))
        with torch.no_grad():
            return predict_logits(model, h, adj, pairs, 64)


@pytest.mark.parametrize("predictor", ["ncn", "ncnc"])
@pytest.mark.parametrize("onednn", [True, False])
def test_the_serving_path_equals_the_plain_model(celegans, trained, predictor, onednn, monkeypatch):
    """Frozen (cached h' and W1 h', numpy common neighbours, compiled MLPs in chunks of 7 pairs so that
    chunks end mid-call, oneDNN or F.linear), the logits are the plain model's to within 1e-4."""
    split, res = trained
    monkeypatch.setattr(ncn, "SERVE_CHUNK", 7)
    if not onednn:
        monkeypatch.setattr(ncn, "_ONEDNN_LINEAR", False)
    elif not ncn.serving_linear():
        pytest.skip("this torch build has no oneDNN linear")
    sc = LinkScorer.from_training(res[predictor], celegans)
    assert sc.model.predictor._serve is not None
    rng = np.random.default_rng(0)
    hub = int(np.argmax(celegans.adjacency().sum(1)))
    pairs = np.concatenate([_predict_links_pairs(celegans, [hub, 0, 7, 100], rng),
                            rng.integers(0, celegans.n, size=(300, 2)), split.test[:100]])
    with torch.no_grad():
        fast = predict_logits(sc.model, sc.h, sc.adj, pairs, 8192)
    plain = _plain_logits(sc.model, sc.h, sc.adj, pairs, monkeypatch)
    assert np.abs(fast - plain).max() < 1e-4
    assert np.ptp(plain) > 1e-2  # the scores differ between pairs: the comparison means something


def test_compiled_steps_equal_the_modules(trained):
    """Each MLP as compiled steps (Dropout / Identity dropped, Linear + ReLU fused) equals the module."""
    _, res = trained
    m = res["ncnc"].model.predictor.m
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for seq in (m.xijlin, m.xcnlin, m.xcnlin[1:], m.lin):
            ref = seq(x.clone())
            for onednn in (False, ncn.serving_linear()):
                got = ncn._run_steps(ncn._compile_steps(seq, onednn, False), x.clone())
                assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_int8_is_opt_in_and_close_to_exact(celegans, trained):
    """quantize='int8' changes the scores (approximate), but little: probabilities within 0.02 on
    average and most of each top 10 kept; the default is exact."""
    import copy

    _, res = trained
    r = res["ncnc"]
    exact = LinkScorer.from_training(r, celegans)
    assert exact.quantize is None and exact.model.predictor._serve["quantize"] is None
    q = LinkScorer(copy.deepcopy(r.model), r.x, r.adj, celegans, quantize="int8")  # its own frozen copy
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, celegans.n, size=(400, 2))
    pe, pq = exact.score(pairs), q.score(pairs)
    assert not np.array_equal(pe, pq)
    assert np.abs(pe - pq).mean() < 0.02
    overlap = [len(set(exact.predict(u, k=10)[0].tolist()) & set(q.predict(u, k=10)[0].tolist())) / 10
               for u in (0, 7, 100, 200)]
    assert np.mean(overlap) >= 0.6


def test_bad_quantize_is_refused(celegans, trained):
    _, res = trained
    with pytest.raises(InvalidArgument, match="quantize must be one of"):
        LinkScorer.from_training(res["ncn"], celegans, quantize="int4")
