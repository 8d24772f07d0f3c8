"""The Graphs service over a real loopback server: store, edges, features, FastRP + SimilarNodes,
link-model training, ScoreLinks / PredictLinks, statuses, restart and crash."""

import numpy as np
import pytest

from retrieval.client import Client
from retrieval.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from retrieval.graph.fastrp import FastRPParams, fastrp
from retrieval.graph.readers import read_graph


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retrieval.server.process import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("graphs") / "data", env={"OMP_NUM_THREADS": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def celegans(data_dir):
    return read_graph(data_dir / "celegans" / "Celegans.txt").graph


@pytest.fixture(scope="module")
def ce(client, celegans):
    """C.elegans pushed through the service in several stream chunks."""
    client.create_graph("ce", celegans.n)
    s, d, _ = celegans.edges()
    r = client.append_edges("ce", s, d, chunk=500)
    assert r["received"] == len(s) and r["added"] == celegans.num_edges and r["m"] == celegans.num_edges
    return "ce"


def test_lifecycle_and_statuses(client):
    info = client.create_graph("life", 5, directed=True, weighted=True)
    assert info["n"] == 5 and info["directed"] and info["weighted"] and info["m"] == 0
    with pytest.raises(AlreadyExists):
        client.create_graph("life", 3)
    with pytest.raises(InvalidArgument, match="not valid"):
        client.create_graph("../evil", 3)
    with pytest.raises(NotFound):
        client.describe_graph("nope")
    r = client.append_edges("life", [0, 1, 1], [1, 0, 2], [0.5, 1.5, 2.0])
    assert r["added"] == 3 and r["m"] == 3
    out, inn = client.neighbors("life", [1], "out")[0], client.neighbors("life", [1], "in")[0]
    assert out[0].tolist() == [0, 2] and out[1].tolist() == [1.5, 2.0] and inn[0].tolist() == [0]
    assert "life" in [g["name"] for g in client.list_graphs()]
    assert client.add_nodes("life", 2)["n"] == 7
    client.drop_graph("life")
    with pytest.raises(NotFound):
        client.drop_graph("life")


def test_edges_match_in_process_graph(client, ce, celegans):
    d = client.describe_graph(ce)
    assert d["n"] == celegans.n and d["m"] == celegans.num_edges and d["degree"] == celegans.describe()["degree"]
    nodes = [0, 5, 17, 296]
    got = client.neighbors(ce, nodes)
    for u, (ids, w) in zip(nodes, got):
        assert ids.tolist() == celegans.neighbors(u)[0].tolist() and (w == 1).all()


def test_bad_edges_store_nothing(client, ce):
    before = client.describe_graph(ce)
    with pytest.raises(InvalidArgument, match="outside graph"):
        client.append_edges(ce, [0, 1, 2, 1000], [1, 2, 3, 4], chunk=2)  # the second chunk is bad
    with pytest.raises(InvalidArgument, match="unweighted"):
        client.append_edges(ce, [0], [1], [1.0])
    client.create_graph("w", 3, weighted=True)
    with pytest.raises(InvalidArgument, match="finite and >= 0"):
        client.append_edges("w", [0, 1], [1, 2], [1.0, -1.0])
    with pytest.raises(InvalidArgument, match="finite and >= 0"):
        client.append_edges("w", [0], [1], [float("nan")])
    with pytest.raises(InvalidArgument, match="same length"):
        client.append_edges("w", [0, 1], [1])
    assert client.describe_graph("w")["m"] == 0
    after = client.describe_graph(ce)
    assert after["version"] == before["version"] and after["m"] == before["m"]


def test_features_and_labels(client, ce, celegans):
    with pytest.raises(InvalidArgument, match=r"shape \(297, f\)"):
        client.set_node_features(ce, np.ones((10, 4), np.float32))
    with pytest.raises(InvalidArgument, match="finite"):
        client.set_node_features(ce, np.full((celegans.n, 2), np.nan, np.float32))
    x = np.random.default_rng(0).normal(size=(celegans.n, 6)).astype(np.float32)
    assert client.set_node_features(ce, x)["feature_dim"] == 6
    y = np.arange(celegans.n) % 3
    assert client.set_node_labels(ce, y)["labels"] == {"multilabel": False, "num_classes": 3,
                                                       "num_labeled": celegans.n}
    Y = np.zeros((celegans.n, 4), np.int8)
    Y[:, 1] = 1
    assert client.set_node_labels(ce, Y)["labels"]["multilabel"]
    with pytest.raises(InvalidArgument):
        client.set_node_labels(ce, [0, 1])


def test_fastrp_job_and_similar_nodes_match_in_process(client, ce, celegans):
    params = dict(iteration_weights=[0.0, 1.0, 1.0], beta=-0.5, seed=7)
    job = client.run_fastrp(ce, dim=32, **params)
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["n"] == celegans.n and res["dim"] == 32 and res["collection"] in [c["name"] for c in client.list_collections()]
    E = fastrp(celegans.adjacency(), FastRPParams(dim=32, **params))
    En = E / np.linalg.norm(E, axis=1, keepdims=True)
    nodes = np.arange(0, celegans.n, 7)
    got = client.similar_nodes(ce, nodes, k=10, exact=True)
    hnsw = client.similar_nodes(ce, nodes, k=10, ef=64)
    hit = 0
    for u, (ids, dist), (hids, _) in zip(nodes, got, hnsw):
        sims = En @ En[u]
        sims[u] = -np.inf
        ref = np.argsort(-sims, kind="stable")[:10]
        assert set(ids.tolist()) == set(ref.tolist()) or np.allclose(np.sort(1 - sims[ids]), np.sort(1 - sims[ref]), atol=1e-4)
        assert np.allclose(dist, 1 - sims[ids], atol=1e-4) and u not in ids
        hit += len(set(hids.tolist()) & set(ids.tolist()))
    assert hit / (10 * len(nodes)) > 0.95  # HNSW vs exact search of the same collection
    # a rerun replaces the collection atomically and drops the old one
    old = res["collection"]
    job2 = client.run_fastrp(ce, dim=32, **dict(params, seed=8))
    assert job2["state"] == "succeeded"
    names = [c["name"] for c in client.list_collections()]
    assert job2["result"]["collection"] in names and old not in names
    assert client.describe_graph(ce)["embeddings"] == ["fastrp"]


def test_fastrp_bad_params(client, ce):
    with pytest.raises(InvalidArgument, match="dim"):
        client.run_fastrp(ce, dim=0)
    with pytest.raises(InvalidArgument, match="iteration_weights"):
        client.run_fastrp(ce, dim=8, iteration_weights=[1.0, -1.0])
    with pytest.raises(NotFound):
        client.run_fastrp("nope", dim=8)
    client.create_graph("empty", 0)
    with pytest.raises(InvalidArgument, match="empty"):
        client.run_fastrp("empty", dim=8)
    job = client.run_fastrp(ce, dim=8, beta=-2.5, embedding="wild")  # far outside [-1, 1]: warned, not refused
    assert job["state"] == "succeeded"
    with pytest.raises(NotFound):
        client.similar_nodes(ce, [0], embedding="missing")
    with pytest.raises(InvalidArgument, match="outside the graph"):
        client.similar_nodes(ce, [10_000])
    with pytest.raises(ResourceExhausted):
        client.similar_nodes(ce, [0], k=5000)


def test_link_model_training_and_serving(client, ce, celegans, server):
    job = client.train_link_model(ce, model="ncn", preset="cora",
                                  config={"input": "learnable", "epochs": 3, "hidden": 32}, seed=0)
    assert job["state"] == "succeeded", job
    assert 0 <= job["result"]["metrics"]["test"]["hits@100"] <= 1
    assert "ncn" in client.describe_graph(ce)["models"]
    pairs = np.array([[0, 1], [0, 5], [10, 200], [3, 3]])
    p = client.score_links(ce, pairs[:, 0], pairs[:, 1])
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    # congruence: the same stored model scored in-process
    from retrieval.graph.linkpred import LinkScorer
    from retrieval.graph.store import GraphStore

    local = LinkScorer.load(GraphStore(server.data_dir / "graphs"), ce, "ncn", device="cpu").score(pairs)
    assert np.allclose(p, local, atol=1e-5)
    nb = set(celegans.neighbors(0)[0].tolist())
    (ids, probs), = client.predict_links(ce, [0], k=5)
    assert len(ids) == 5 and not (set(ids.tolist()) & nb) and (np.diff(probs) <= 0).all()
    (ids2, _), = client.predict_links(ce, [0], k=3, candidates=[1, 2, 3, 100, 200])
    assert set(ids2.tolist()) <= {1, 2, 3, 100, 200} - nb
    (ids3, _), = client.predict_links(ce, [0], k=5, embedding="fastrp", num_candidates=50)
    assert len(ids3) <= 5 and not (set(ids3.tolist()) & nb)
    with pytest.raises(NotFound):
        client.score_links(ce, [0], [1], model="missing")
    with pytest.raises(InvalidArgument, match="outside the graph"):
        client.score_links(ce, [0], [celegans.n])
    with pytest.raises(InvalidArgument, match="unknown NCN hyper-parameters"):
        client.train_link_model(ce, config={"nonsense": 1})
    with pytest.raises(InvalidArgument, match="no node features"):
        client.train_link_model("w", config={"epochs": 1})


@pytest.mark.slow
def test_state_survives_restart_and_crash(server, client, ce, celegans):
    before = client.describe_graph(ce)
    p1 = client.score_links(ce, [0, 7], [1, 9])
    s1 = client.similar_nodes(ce, [3], k=5, exact=True)
    server.stop()
    server.start()
    with Client(server.address, timeout=120) as c2:
        assert c2.describe_graph(ce) == before
        assert np.allclose(c2.score_links(ce, [0, 7], [1, 9]), p1, atol=1e-6)
        assert c2.similar_nodes(ce, [3], k=5, exact=True)[0][0].tolist() == s1[0][0].tolist()
        c2.append_edges(ce, [0], [250])
    server.kill()
    server.start()
    with Client(server.address, timeout=120) as c3:
        d = c3.describe_graph(ce)
        assert d["m"] == before["m"] + 1 and d["version"] == before["version"] + 1
