import numpy as np
import pytest
import torch

from retrieval.errors import Cancelled, InvalidArgument
from retrieval.graph.linkpred import LinkScorer, split_edges, train_link_model
from retrieval.graph.ncn import (PRESETS, Adj, LinkModel, NCNConfig, common_neighbors, gather_rows, make_config,
                                 sample_per_row)
from retrieval.graph.readers import read_graph


@pytest.fixture(scope="module")
def celegans(data_dir):
    return read_graph(data_dir / "celegans" / "Celegans.txt").graph


@pytest.fixture(scope="module")
def adj_and_dense(celegans):
    A = celegans.adjacency().toarray() > 0
    np.fill_diagonal(A, False)
    s, d, _ = celegans.edges()
    adj = Adj.from_edges(torch.from_numpy(s), torch.from_numpy(d), celegans.n)
    return adj, A


def _pairs(n, k, seed):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, n, k)), torch.from_numpy(rng.integers(0, n, k))


def test_gather_rows_and_common_neighbours_match_dense(adj_and_dense):
    adj, A = adj_and_dense
    src, dst = _pairs(adj.n, 300, 0)
    b, k = gather_rows(adj, src)
    for i in (0, 7, 123):
        assert sorted(k[b == i].tolist()) == np.flatnonzero(A[src[i]]).tolist()
    (bc, kc), (b1, k1), (b2, k2) = common_neighbors(adj, src, dst, residual=True)
    for i in range(300):
        ni, nj = A[src[i]], A[dst[i]]
        assert sorted(kc[bc == i].tolist()) == np.flatnonzero(ni & nj).tolist()
        assert sorted(k1[b1 == i].tolist()) == np.flatnonzero(ni & ~nj).tolist()
        assert sorted(k2[b2 == i].tolist()) == np.flatnonzero(nj & ~ni).tolist()
    bb, kk = common_neighbors(adj, src, dst)
    assert torch.equal(bb, bc) and torch.equal(kk, kc)


def _completion_like_pairs(adj, A, u, candidates):
    """The pairs NCNC's completion scores for the targets (u, c): (c, k) for k in N(u) and (u, k) for k in
    N(c), plus repeats, a few pairs of a node with itself and some random pairs."""
    nu = np.flatnonzero(A[u])
    x = [np.repeat(candidates, len(nu)), np.full(sum(int(A[c].sum()) for c in candidates), u)]
    y = [np.tile(nu, len(candidates)), np.concatenate([np.flatnonzero(A[c]) for c in candidates])]
    rng = np.random.default_rng(3)
    r = rng.integers(0, adj.n, (2, 40))
    x, y = np.concatenate(x + [r[0], r[0][:5], y[0][:7]]), np.concatenate(y + [r[1], r[0][:5], x[0][:7]])
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("backend", ["auto", "torch"])  # on CPU: the numpy plan, and the torch one
@pytest.mark.parametrize("max_table,max_work", [(1 << 22, 1 << 23), (1, 50), (600, 1 << 23)])
def test_pair_common_neighbors_equals_the_intersection(adj_and_dense, max_table, max_work, backend):
    """Grouped by anchor (mask, walk, walk into the partners; a table of one row at a time and tiny work
    groups in the second case; small=0: even where the plain intersection would be taken for its small
    size), the answer is common_neighbors', entry for entry, in its order, with either backend."""
    from retrieval.graph.ncn import _anchor_partner, _cn_plan, pair_common_neighbors

    adj, A = adj_and_dense
    deg = A.sum(1)
    hub, low = int(np.argmax(deg)), int(np.flatnonzero(deg == 3)[0])
    seen = set()
    for u in (hub, low):
        cands = np.setdiff1d(np.random.default_rng(u).choice(adj.n, 30, replace=False), [u])
        x, y = _completion_like_pairs(adj, A, u, cands)
        got = pair_common_neighbors(adj, x, y, max_table=max_table, max_work=max_work, small=0, backend=backend)
        ref = common_neighbors(adj, x, y)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert ref[0].numel() > 100
        a, p = _anchor_partner(adj.deg(), x, y)
        key = torch.unique(a * adj.n + p)
        anchors, r_of, per = torch.unique_consecutive(key // adj.n, return_inverse=True, return_counts=True)
        seen |= set(_cn_plan(adj, adj.deg(), anchors, r_of, per, key % adj.n, *gather_rows(adj, anchors))[0].tolist())
    assert seen == {0, 1, 2}  # every way was taken
    src, dst = _pairs(adj.n, 300, 0)  # nothing shared: the plain intersection
    assert all(torch.equal(g, r) for g, r in zip(pair_common_neighbors(adj, src, dst, backend=backend),
                                                 common_neighbors(adj, src, dst)))
    e = torch.zeros(0, dtype=torch.long)
    assert [t.numel() for t in pair_common_neighbors(adj, e, e, backend=backend)] == [0, 0]


def test_remove_edges_and_drop_entries(adj_and_dense):
    adj, A = adj_and_dense
    s = torch.tensor([0, 5])
    d = torch.tensor([int(np.flatnonzero(A[0])[0]), int(np.flatnonzero(A[5])[0])])
    r = adj.remove_edges(s, d)
    D = r.sparse().to_dense().numpy() > 0
    expect = A.copy()
    for u, v in zip(s.tolist(), d.tolist()):
        expect[u, v] = expect[v, u] = False
    assert (D == expect).all()
    g = torch.Generator().manual_seed(0)
    dropped = adj.drop_entries(0.5, g)
    assert 0.4 * adj.nnz < dropped.nnz < 0.6 * adj.nnz
    Dd = dropped.sparse().to_dense().numpy() > 0
    assert not (Dd & ~A).any()


def test_sample_per_row_bounds_and_weights():
    b = torch.tensor([0] * 10 + [1] * 2)
    k = torch.arange(12)
    bb, kk, ww = sample_per_row(b, k, 2, 4, torch.Generator().manual_seed(0))
    assert (bb == 0).sum() == 4 and (bb == 1).sum() == 2
    assert torch.allclose(ww[bb == 0], torch.full((4,), 2.5)) and torch.allclose(ww[bb == 1], torch.ones(2))


def _dense_ncn(pred, h, A, src, dst, extra=None):
    """Dense reference of the NCN score: CN indicator rows (B x n) @ h'."""
    hx = pred.transform(h)
    Ad = torch.from_numpy(A.astype(np.float32))
    cn = Ad[src] * Ad[dst]
    if extra is not None:
        cn = cn + extra
    xcn = cn @ hx
    xij = pred.m.xijlin(h[src] * h[dst])
    return pred.m.lin(pred.m.xcnlin(xcn) * pred.m.beta + xij).squeeze(-1)


@pytest.mark.parametrize("preset", ["cora", "citeseer"])
def test_ncn_forward_matches_dense_reference(adj_and_dense, preset):
    adj, A = adj_and_dense
    torch.manual_seed(0)
    cfg = make_config(preset, predictor="ncn", hidden=32, input="learnable")
    model = LinkModel(32, cfg, num_nodes=adj.n).eval()
    src, dst = _pairs(adj.n, 200, 1)
    with torch.no_grad():
        h = model.encode(None, adj)
        out = model.score(h, adj, src, dst)
        ref = _dense_ncn(model.predictor, h, A, src, dst)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_ncnc_forward_matches_dense_reference(adj_and_dense):
    adj, A = adj_and_dense
    torch.manual_seed(0)
    # an offset below the untrained logits makes the completion probabilities large (about alpha * pt)
    cfg = make_config("cora", predictor="ncnc", hidden=32, input="learnable", splitsize=97, prob_offset=-5.0,
                      completion="paper")
    model = LinkModel(32, cfg, num_nodes=adj.n).eval()
    pred = model.predictor
    src, dst = _pairs(adj.n, 60, 2)
    n = adj.n
    with torch.no_grad():
        h = model.encode(None, adj)
        out = model.score(h, adj, src, dst)
        # dense completion: for k in N(i)\N(j) weight p(j,k); for k in N(j)\N(i) weight p(i,k)
        Ad = A.astype(bool)
        extra = torch.zeros(len(src), n)
        for b in range(len(src)):
            i, j = int(src[b]), int(dst[b])
            only_i = np.flatnonzero(Ad[i] & ~Ad[j])
            only_j = np.flatnonzero(Ad[j] & ~Ad[i])
            if len(only_i):
                logit = _dense_ncn(pred, h, A, torch.full((len(only_i),), j), torch.from_numpy(only_i))
                extra[b, only_i] = pred.calibrate(logit)
            if len(only_j):
                logit = _dense_ncn(pred, h, A, torch.full((len(only_j),), i), torch.from_numpy(only_j))
                extra[b, only_j] = pred.calibrate(logit)
        ref = _dense_ncn(pred, h, A, src, dst, extra=extra)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, _dense_ncn(pred, h, A, src, dst), atol=1e-3)  # completion changes scores


def test_gcn_propagation_matches_formula(adj_and_dense):
    adj, A = adj_and_dense
    torch.manual_seed(0)
    cfg = make_config("cora", hidden=16, jk=False, x_dropout=0.0, gnn_dropout=0.0, tail_dropout=0.0)
    x = torch.randn(adj.n, 5)
    model = LinkModel(5, cfg).eval()
    with torch.no_grad():
        h = model.encode(x, adj)
        z = model.encoder.xemb(x)
        At = torch.from_numpy(A.astype(np.float32)) + torch.eye(adj.n)
        dinv = torch.diag(At.sum(1).rsqrt())
        ref = dinv @ At @ dinv @ z
    assert torch.allclose(h, ref, atol=1e-5)


def test_sparse_and_dense_features_agree(adj_and_dense):
    adj, _ = adj_and_dense
    torch.manual_seed(0)
    cfg = make_config("cora", hidden=16)
    x = (torch.rand(adj.n, 40) < 0.05).float()
    model = LinkModel(40, cfg).eval()
    src, dst = _pairs(adj.n, 50, 3)
    with torch.no_grad():
        a = model.score(model.encode(x, adj), adj, src, dst)
        b = model.score(model.encode(x.to_sparse(), adj), adj, src, dst)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_training_reaches_hits_well_above_chance(data_dir):
    g = read_graph(data_dir / "usair" / "USAir.txt", index_base=1).graph
    split = split_edges(g, seed=0)
    cfg = make_config("cora", predictor="ncn", input="learnable", epochs=12, hidden=64, hits_k=100)
    res = train_link_model(split, None, cfg, seed=0)
    chance = 100 / len(split.test_neg)  # a random scorer's expected Hits@100
    assert chance < 0.25
    assert res.best["test"]["hits@100"] > 0.75, res.best
    assert res.best["test"]["auc"] > 0.85  # a random scorer has 0.5


def test_short_training_is_deterministic_and_resumes(tmp_path, celegans):
    split = split_edges(celegans, seed=1)
    cfg = make_config("cora", predictor="ncnc", input="learnable", epochs=4, hidden=32, batch_size=512)
    full = train_link_model(split, None, cfg, seed=3, work_dir=tmp_path / "a")

    class CancelAfter2:
        work_dir = tmp_path / "b"

        def __init__(self):
            self.calls = 0

        def progress(self, done, total=None, message=""):
            self.calls += 1

        def check_cancelled(self):
            if self.calls >= 2:
                raise Cancelled("stop")

    with pytest.raises(Cancelled):
        train_link_model(split, None, cfg, seed=3, ctx=CancelAfter2())
    resumed = train_link_model(split, None, cfg, seed=3, work_dir=tmp_path / "b")
    assert len(resumed.history) == 4
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    assert resumed.best == full.best


def test_scorer_scores_and_predicts(celegans):
    split = split_edges(celegans, seed=0)
    cfg = make_config("cora", predictor="ncn", input="learnable", epochs=2, hidden=32)
    res = train_link_model(split, None, cfg, seed=0)
    sc = LinkScorer.from_training(res, celegans)
    p = sc.score(split.test[:10])
    assert p.shape == (10,) and p.dtype == np.float32 and ((p > 0) & (p < 1)).all()
    ids, probs = sc.predict(0, k=5)
    nb = set(celegans.neighbors(0)[0].tolist())
    assert len(ids) == 5 and not (set(ids.tolist()) & nb) and 0 not in ids
    assert (np.diff(probs) <= 0).all()
    cand_ids, _ = sc.predict(0, candidates=[1, 2, 3, 250], k=10, exclude_neighbors=False)
    assert set(cand_ids.tolist()) == {1, 2, 3, 250}
    with pytest.raises(InvalidArgument, match="outside the graph"):
        sc.score([[0, celegans.n]])
    with pytest.raises(InvalidArgument, match=r"shape \[P, 2\]"):
        sc.score([0, 1, 2])
    with pytest.raises(InvalidArgument, match="k must be"):
        sc.predict(0, k=0)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(hidden=0), "hidden must be a positive integer"),
        (dict(epochs=-1), "epochs must be a positive integer"),
        (dict(x_dropout=1.5), r"x_dropout must be in \[0, 1\)"),
        (dict(gnn_lr=float("nan")), "gnn_lr"),
        (dict(predictor="seal"), "predictor must be one of"),
        (dict(pt=0.0), "pt must be in"),
        (dict(nonsense=1), "unknown NCN hyper-parameters"),
        (dict(patience=0), "patience"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(InvalidArgument, match=msg):
        make_config("cora", **kw)


def test_presets_follow_reference_readme():
    assert PRESETS["cora"]["gnn_lr"] == 0.0043 and PRESETS["cora"]["batch_size"] == 1152
    assert PRESETS["citeseer"]["twolayerlin"] and PRESETS["citeseer"]["prob_scale"] == 6.5
    assert PRESETS["ddi"]["hits_k"] == 20 and PRESETS["ddi"]["input"] == "learnable"
    with pytest.raises(InvalidArgument, match="valid presets"):
        make_config("pubmed2")
    assert isinstance(make_config(), NCNConfig)


def test_featureless_graph_needs_an_input_choice(celegans):
    split = split_edges(celegans, seed=0)
    with pytest.raises(InvalidArgument, match="featureless"):
        train_link_model(split, None, make_config("cora", epochs=1))


@pytest.mark.gpu
def test_cuda_matches_cpu(adj_and_dense):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    adj, A = adj_and_dense
    torch.manual_seed(0)
    cfg = make_config("cora", predictor="ncnc", hidden=32, input="learnable")
    model = LinkModel(32, cfg, num_nodes=adj.n).eval()
    src, dst = _pairs(adj.n, 100, 4)
    with torch.no_grad():
        cpu = model.score(model.encode(None, adj), adj, src, dst)
        mc = model.to("cuda")
        ac = Adj(adj.rowptr.cuda(), adj.col.cuda(), adj.n)
        gpu = mc.score(mc.encode(None, ac), ac, src.cuda(), dst.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4, rtol=1e-3)


def test_reference_completion_mode_matches_dense(adj_and_dense):
    """completion='reference' (the default): the inner NCN sees h' = h + xlin(h) as its input (the authors' code)."""
    adj, A = adj_and_dense
    torch.manual_seed(0)
    cfg = make_config("cora", predictor="ncnc", hidden=32, input="learnable", prob_offset=-5.0)
    assert cfg.completion == "reference"
    model = LinkModel(32, cfg, num_nodes=adj.n).eval()
    pred = model.predictor
    src, dst = _pairs(adj.n, 40, 5)
    with torch.no_grad():
        h = model.encode(None, adj)
        hx = pred.transform(h)
        out = model.score(h, adj, src, dst)
        Ad = A.astype(bool)
        extra = torch.zeros(len(src), adj.n)
        for b in range(len(src)):
            i, j = int(src[b]), int(dst[b])
            for a, only in ((j, np.flatnonzero(Ad[i] & ~Ad[j])), (i, np.flatnonzero(Ad[j] & ~Ad[i]))):
                if len(only):
                    logit = _dense_ncn(pred, hx, A, torch.full((len(only),), a), torch.from_numpy(only))
                    extra[b, only] = pred.calibrate(logit)
        ref = _dense_ncn(pred, h, A, src, dst, extra=extra)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("predictor", ["ncn", "ncnc"])
def test_the_serving_cache_changes_no_score(celegans, predictor, monkeypatch):
    """LinkScorer caches h + xlin(h) (and W1 of it) once per model and scores each distinct completion
    pair once, its common neighbours found by pair_common_neighbors and summed by bag_rows; the scores
    equal the plain model's (no cache, sorted-key intersections, sparse products), pair for pair (up to
    float rounding)."""
    from retrieval.graph import ncn
    from retrieval.graph.linkpred import predict_logits

    split = split_edges(celegans, seed=0)
    cfg = make_config("cora", predictor=predictor, input="learnable", epochs=1, hidden=32)
    res = train_link_model(split, None, cfg, seed=0)
    sc = LinkScorer.from_training(res, celegans)
    rng = np.random.default_rng(0)
    hub = int(np.argmax(celegans.adjacency().sum(1)))
    pairs = np.concatenate([split.test[:200], rng.integers(0, celegans.n, size=(200, 2)),
                            np.stack([np.zeros(50, np.int64), np.arange(50)], 1),  # one node, many targets
                            np.stack([np.full(60, hub), rng.choice(celegans.n, 60, replace=False)], 1)])
    cached = sc.score(pairs)
    assert sc.model.predictor._frozen  # the cache was in use
    sc.model.predictor.unfreeze()
    monkeypatch.setattr(ncn, "pair_common_neighbors", lambda adj, x, y: ncn.common_neighbors(adj, x, y))
    monkeypatch.setattr(ncn, "bag_rows", lambda b, k, w, B, x: ncn.spmm_rows(b, k, w, B, x, sorted_unique=True))
    with torch.no_grad():
        plain = predict_logits(sc.model, sc.h, sc.adj, pairs, 64)
    np.testing.assert_allclose(cached, 1.0 / (1.0 + np.exp(-plain.astype(np.float64))), rtol=1e-4, atol=1e-5)
    assert np.ptp(cached) > 1e-3  # the scores differ between pairs: the comparison means something
