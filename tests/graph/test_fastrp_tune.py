"""FastRP tuning (retrieval/graph/fastrp_tune.py) on real graphs: the chosen parameters score at least the
base on validation and beat it on held-out nodes; the stored terms combine to exactly what fastrp computes;
determinism; link-prediction fallback; bad options; the fastrp job with tune=true over a loopback server."""

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.client import Client
from retrieval.errors import InvalidArgument
from retrieval.graph.fastrp import FastRPParams, check_params, fastrp, transition_matrix, whiten_columns
from retrieval.graph.fastrp_tune import _Group, _standardize_by, _window, check_tune_options, tune_fastrp
from retrieval.graph.readers import read_graph
from tests.reference import running_server


@pytest.fixture(scope="module")
def cora(data_dir):
    return read_graph(data_dir / "cora").graph


@pytest.fixture(scope="module")
def split(cora):
    """Half the labelled Cora nodes for the tuner, the other half held out (unlabeled for it)."""
    rng = np.random.default_rng(0)
    lab = np.flatnonzero(cora.labels.y >= 0)
    perm = rng.permutation(lab)
    tune_nodes, test_nodes = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    y = np.full(cora.n, -1, np.int64)
    y[tune_nodes] = cora.labels.y[tune_nodes]
    return y, tune_nodes, test_nodes


@pytest.fixture(scope="module")
def tuned(cora, split):
    return tune_fastrp(cora.adjacency(), split[0], dims=(64,), seed=0)


def _heldout_accuracy(E, y, train, test):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    E = (E - E.mean(0)) / np.where(E.std(0) == 0, 1, E.std(0))
    with threadpool_limits(1):  # a BLAS thread pool on a shared 2-core machine is slower, not faster
        clf = LogisticRegression(C=0.1, max_iter=500).fit(E[train], y[train])
    return float((clf.predict(E[test]) == y[test]).mean())


def test_tuned_beats_default_on_validation_and_on_held_out_nodes(cora, split, tuned):
    params, rep = tuned
    assert rep["task"] == "node_classification" and rep["metric"] == "micro_f1" and rep["fallback"] is None
    assert rep["score"] >= rep["base_score"] and rep["chosen"] == "search"
    assert rep["validation"]["labeled"] == len(split[1]) and rep["stopped_early"] is None
    # the chosen parameters are valid FastRP parameters of the requested dimension, trailing zeros trimmed
    check_params(params, cora.n, False)
    assert params.dim == 64 and params.iteration_weights[-1] > 0 and params.standardize and params.normalize
    assert rep["params"] == params.as_dict()
    assert 1 <= len(params.iteration_weights) <= 32
    # on the nodes the tuner never saw labels of, with the paper protocol's classifier
    y, tune_nodes, test_nodes = split
    A = cora.adjacency()
    acc_tuned = _heldout_accuracy(fastrp(A, params), cora.labels.y, tune_nodes, test_nodes)
    acc_default = _heldout_accuracy(fastrp(A, FastRPParams(dim=64, seed=0)), cora.labels.y, tune_nodes, test_nodes)
    assert acc_tuned >= acc_default + 0.05, (acc_tuned, acc_default)
    assert acc_tuned > 0.7


def test_deterministic_for_a_seed(cora, split, tuned):
    params, rep = tuned
    again, rep2 = tune_fastrp(cora.adjacency(), split[0], dims=(64,), seed=0)
    assert again == params and rep2["score"] == rep["score"] and rep2["top"] == rep["top"]
    assert np.array_equal(fastrp(cora.adjacency(), again), fastrp(cora.adjacency(), params))


@pytest.mark.parametrize("variant", [False, True])
def test_stored_terms_combine_to_what_fastrp_computes(cora, variant):
    """The search's linear combinations of once-propagated terms equal fastrp's own output (standardised
    with the same rows' statistics), for flat windows (prefix sums) and general weights."""
    A = cora.adjacency()
    S, deg = transition_matrix(sp.csr_matrix(A, dtype=np.float32))
    rows = np.arange(0, cora.n, 3)
    base = dict(dim=48, beta=-0.5, s=3.0, propagate_normalized=variant, normalize=True, standardize=False, seed=5)
    grp = _Group(S, deg, None, [FastRPParams(**base, iteration_weights=(1.0,)),
                                FastRPParams(**dict(base, beta=0.5), iteration_weights=(1.0,))], rows)
    grp.upto(9)
    stat = np.arange(len(rows))
    for block, beta in ((0, -0.5), (1, 0.5)):
        for w in (_window(3, 7), _window(9, 9), (0.0, 0.5, 0.0, 2.0, 1.0)):
            got = grp.combine(block, w, stat)
            E = fastrp(A, FastRPParams(**dict(base, beta=beta), iteration_weights=w))[rows]
            ref = (E - E.mean(0)) / E.std(0)
            assert np.abs(got - ref).max() < 1e-3, (block, w)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_whitened_terms_match_whitened_fastrp(cora, gamma):
    """Stage 5's whitened candidates: on all rows, the combined terms whitened and standardised again are
    fastrp's output with ``whiten=gamma``."""
    A = cora.adjacency()
    S, deg = transition_matrix(sp.csr_matrix(A, dtype=np.float32))
    rows = np.arange(cora.n)
    p = FastRPParams(dim=32, beta=-0.5, s=3.0, normalize=True, standardize=True, seed=4, iteration_weights=(1.0,))
    grp = _Group(S, deg, None, [p], rows)
    grp.upto(6)
    w = _window(4, 6)
    got = _standardize_by(whiten_columns(grp.combine(0, w, rows), gamma), rows)
    ref = fastrp(A, FastRPParams(**dict(p.as_dict(), iteration_weights=w, whiten=gamma)))
    assert np.abs(got - ref).max() < 2e-3


def _micro_f1_heldout(E, Y, train, test):
    """The bench's protocol: one-vs-rest logistic regression (C = 0.1, liblinear), top-k labels per node."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        P = OneVsRestClassifier(LogisticRegression(C=0.1, solver="liblinear")).fit(E[train], Y[train]).predict_proba(E[test])
    k = Y[test].sum(1).astype(int)
    pred = np.zeros_like(Y[test])
    for i, row in enumerate(np.argsort(-P, axis=1, kind="stable")):
        pred[i, row[:k[i]]] = 1
    return float(f1_score(Y[test], pred, average="micro"))


@pytest.mark.slow
def test_whitening_stage_helps_on_blogcatalog(data_dir, monkeypatch):
    """BlogCatalog (dense, fast-mixing): the tuner whitens the chosen embedding, and on held-out nodes that
    beats the tuner without the whitening stage (the non-negative power filters alone)."""
    import retrieval.graph.fastrp_tune as ft

    g = read_graph(data_dir / "blogcatalog" / "blogcatalog.mat").graph
    A = g.adjacency()
    Yall = g.labels.Y.toarray().astype(np.int8)
    lab = np.flatnonzero(Yall.sum(1) > 0)
    perm = np.random.default_rng(0).permutation(lab)
    train, test = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    keep = np.zeros(g.n, np.float32)
    keep[train] = 1
    Ytune = sp.csr_matrix(sp.diags(keep) @ g.labels.Y)
    params, rep = tune_fastrp(A, Ytune, dims=(128,), seed=0)
    assert params.whiten > 0 and rep["chosen"] == "search"
    assert any(c["whiten"] > 0 for c in rep["confirmed"]) and any(c["whiten"] == 0 for c in rep["confirmed"])
    monkeypatch.setattr(ft, "_WHITEN", ())
    plain, _ = tune_fastrp(A, Ytune, dims=(128,), seed=0)
    assert plain.whiten == 0
    f_white = _micro_f1_heldout(fastrp(A, params), Yall, train, test)
    f_plain = _micro_f1_heldout(fastrp(A, plain), Yall, train, test)
    assert f_white >= f_plain + 0.008, (f_white, f_plain)
    assert f_white > 0.385, f_white


def test_multilabel_and_too_few_labels(data_dir):
    g = read_graph(data_dir / "ppi" / "PPI_subgraph.mat").graph
    keep = np.zeros(g.n, np.float32)
    keep[::2] = 1
    Y = sp.csr_matrix(sp.diags(keep) @ g.labels.Y)
    params, rep = tune_fastrp(g.adjacency(), Y, dims=(32,), seed=1, max_power=8)
    assert rep["task"] == "node_classification" and rep["score"] >= rep["base_score"]
    assert len(params.iteration_weights) <= 9  # a refinement may add one power past the search's 8
    y = np.full(g.n, -1)
    y[:5] = [0, 1, 0, 1, 0]  # 5 labelled nodes: link prediction instead, and the report says why
    params, rep = tune_fastrp(g.adjacency(), y, dims=(32,), seed=1, max_power=8)
    assert rep["task"] == "link_prediction" and "too few" in rep["fallback"]


def test_link_prediction_without_labels(data_dir):
    g = read_graph(data_dir / "celegans" / "Celegans.txt").graph
    params, rep = tune_fastrp(g.adjacency(), None, dims=(32,), seed=0, max_power=8)
    assert rep["task"] == "link_prediction" and rep["metric"] == "auc" and rep["fallback"] is None
    assert 0.5 < rep["score"] <= 1.0 and rep["score"] >= rep["base_score"]
    assert rep["validation"]["held_out_edges"] == rep["validation"]["non_edges"] > 0
    check_params(params, g.n, False)


def test_time_limit_and_dims(cora, split):
    params, rep = tune_fastrp(cora.adjacency(), split[0], dims=(32,), seed=0, time_limit=1e-3)
    assert rep["stopped_early"] and "time_limit" in rep["stopped_early"]
    check_params(params, cora.n, False)  # the best so far (or the base), still valid
    params, rep = tune_fastrp(cora.adjacency(), split[0], dims=(16, 32), seed=0, max_power=8, dim_margin=1.0)
    assert params.dim == 16  # a larger dim must win by dim_margin (here: impossible)
    assert {c["dim"] for c in rep["confirmed"]} == {16, 32}


@pytest.mark.parametrize("kw, match", [
    (dict(dims=[0]), "dims"), (dict(dims=[True]), "dims"), (dict(dims="abc"), "dims"),
    (dict(max_power=0), "max_power"), (dict(max_power=2.5), "max_power"), (dict(time_limit=-1), "time_limit"),
    (dict(betas=["a"]), "betas"), (dict(folds=1), "folds"), (dict(dim_margin=-0.1), "dim_margin"),
])
def test_bad_options(cora, kw, match):
    with pytest.raises(InvalidArgument, match=match):
        tune_fastrp(cora.adjacency(), cora.labels.y, **kw)


def test_check_tune_options():
    assert check_tune_options(None) == {}
    assert check_tune_options({"dims": [32, 64], "time_limit": 5}) == {"dims": [32, 64], "time_limit": 5.0}
    with pytest.raises(InvalidArgument, match="unknown tune_options"):
        check_tune_options({"dim": 3})
    with pytest.raises(InvalidArgument, match="must be an object"):
        check_tune_options([1])


# ---- the fastrp job with tune=true over a real loopback server ---------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("tune") / "data", env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def cora_served(client, cora):
    client.create_graph("cora", cora.n)
    s, d, _ = cora.edges()
    client.append_edges("cora", s, d)
    client.set_node_labels("cora", cora.labels.y)
    return "cora"


def test_job_with_tune_reports_the_chosen_params(client, server, cora_served, cora):
    from retrieval.graph.store import GraphStore

    job = client.run_fastrp(cora_served, dim=32, seed=3, tune=True, tune_options={"max_power": 16})
    assert job["state"] == "succeeded", job
    res = job["result"]
    tuning, chosen = res["tuning"], res["params"]
    assert tuning["task"] == "node_classification" and tuning["score"] >= tuning["base_score"]
    assert tuning["params"] == chosen and chosen["dim"] == 32 and chosen["seed"] == 3
    assert len(chosen["iteration_weights"]) <= 17
    # congruence: the stored embedding is fastrp with the chosen parameters, in process
    X = client.get_embeddings(cora_served)
    ref = fastrp(cora.adjacency(), FastRPParams(**chosen))
    assert X.shape == (cora.n, 32) and np.allclose(X, ref, atol=1e-5)
    info = GraphStore(server.data_dir / "graphs").embedding_info(cora_served, "fastrp")
    assert info["params"] == chosen and info["tuning"]["score"] == tuning["score"]
    # the same through the generic Jobs.Start, without labels: link prediction on held-out edges
    client.create_graph("cora-nolabels", cora.n)
    s, d, _ = cora.edges()
    client.append_edges("cora-nolabels", s, d)
    job = client.start_job("fastrp", graph="cora-nolabels", params={"dim": 16}, tune=True,
                           tune_options={"max_power": 8})
    job = client.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    assert job["result"]["tuning"]["task"] == "link_prediction" and job["result"]["params"]["dim"] == 16


def test_job_bad_tune_values(client, cora_served):
    for bad in ("yes", 1, [True]):
        with pytest.raises(InvalidArgument, match="tune must be true or false"):
            client.start_job("fastrp", graph=cora_served, params={"dim": 8}, tune=bad)
    with pytest.raises(InvalidArgument, match="tune must be true or false"):
        client.run_fastrp(cora_served, dim=8, tune="yes")  # checked by the client before the call
    with pytest.raises(InvalidArgument, match="unknown tune_options"):
        client.run_fastrp(cora_served, dim=8, tune=True, tune_options={"dimz": [8]})
    with pytest.raises(InvalidArgument, match="max_power"):
        client.start_job("fastrp", graph=cora_served, params={"dim": 8}, tune=True, tune_options={"max_power": 0})
    with pytest.raises(InvalidArgument, match="tune is not true"):
        client.start_job("fastrp", graph=cora_served, params={"dim": 8}, tune_options={"max_power": 4})
    with pytest.raises(InvalidArgument, match="tune_options must be an object"):
        client.start_job("fastrp", graph=cora_served, params={"dim": 8}, tune=True, tune_options=[1])


def test_async_client_tunes_too(server, cora_served):
    import asyncio

    from retrieval.aio import AsyncClient

    async def go():
        async with AsyncClient(server.address, timeout=120) as c:
            return await c.run_fastrp(cora_served, dim=16, embedding="aio", tune=True, tune_options={"max_power": 4})

    job = asyncio.run(go())
    assert job["state"] == "succeeded", job
    assert job["result"]["tuning"]["task"] == "node_classification" and job["result"]["params"]["dim"] == 16
