"""Round trips of every Graphs proto conversion."""

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.errors import InvalidArgument
from retrieval.graph import convert as gconv
from retrieval.graph.fastrp import FastRPParams
from retrieval.graph.graph import Graph
from retrieval.v1 import graphs_pb2 as pb


def test_graph_info_round_trip():
    g = Graph.from_edges(4, [0, 1], [1, 2], labels=[0, 1, -1, 0])
    d = dict(g.describe(), name="g", version=3, embeddings=["fastrp"], models=["ncn"])
    assert gconv.graph_info_from_proto(gconv.graph_info_to_proto(d)) == d
    msg = gconv.graph_info_to_proto(d)
    msg.describe_json = ""
    back = gconv.graph_info_from_proto(msg)
    assert back["n"] == 4 and back["m"] == 2 and back["models"] == ["ncn"]
    # the typed labels message, and the deprecated JSON one older servers send, read the same
    assert msg.labels.num_classes == 2 and msg.labels.num_labeled == 3 and not msg.labels.multilabel
    assert back["labels"] == d["labels"] == {"multilabel": False, "num_classes": 2, "num_labeled": 3}
    msg.ClearField("labels")
    assert gconv.graph_info_from_proto(msg)["labels"] == d["labels"]
    msg.labels_json = ""
    assert "labels" not in gconv.graph_info_from_proto(msg)
    unlabelled = gconv.graph_info_to_proto(dict(Graph.from_edges(3, [0], [1]).describe(), name="u"))
    assert not unlabelled.HasField("labels") and not unlabelled.labels_json


def test_edges_round_trip_and_checks():
    s, d, w = gconv.edges_from_proto(gconv.edges_to_proto("g", [0, 5], [1, 2], [0.5, 2.0], "max"))
    assert s.tolist() == [0, 5] and d.tolist() == [1, 2] and w.tolist() == [0.5, 2.0]
    s, d, w = gconv.edges_from_proto(gconv.edges_to_proto("g", [0], [1]))
    assert w is None
    with pytest.raises(InvalidArgument, match="one per edge"):
        gconv.edges_from_proto(pb.AppendEdgesRequest(src=[0, 1], dst=[1, 2], weights=[1.0]))
    with pytest.raises(InvalidArgument, match="same length"):
        gconv.edges_from_proto(pb.AppendEdgesRequest(src=[0, 1], dst=[1]))
    with pytest.raises(InvalidArgument, match="not a node id"):
        gconv.edges_from_proto(pb.AppendEdgesRequest(src=[2**63], dst=[1]))
    r = {"received": 3, "added": 2, "m": 7, "version": 4, "self_loops_dropped": 1}
    assert gconv.append_result_from_proto(gconv.append_result_to_proto(r)) == r
    assert gconv.edges_to_proto("g", [0], [0], self_loops="reject").self_loops == "reject"


def test_embeddings_chunks_round_trip():
    X = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    chunks = list(gconv.embeddings_to_chunks(X, 3, 4, chunk_bytes=4 * 5 * 10))  # 10 rows a chunk
    assert [c.vectors.n for c in chunks] == [10, 10, 10, 7] and [c.offset for c in chunks] == [0, 10, 20, 30]
    back, info = gconv.embeddings_from_chunks(chunks)
    assert np.array_equal(back, X) and info == {"graph_version": 3, "current_version": 4}
    with pytest.raises(InvalidArgument, match="ended after 30 of 37 rows"):
        gconv.embeddings_from_chunks(chunks[:3])
    with pytest.raises(InvalidArgument, match="out of order"):
        gconv.embeddings_from_chunks([chunks[0], chunks[2]])


def test_client_side_node_ids_name_the_position():
    assert gconv.node_ids_in([0, 2.0, np.int64(3)], "src").tolist() == [0, 2, 3]
    for bad, words in (([0, 1.5], r"src must be integers, got 1.5 at src\[1\]"),
                       ([3, -1], r"src must be >= 0, got -1 at src\[1\]"),
                       ([0, "abc"], r"src must be integers, got 'abc' at src\[1\]")):
        with pytest.raises(InvalidArgument, match=words):
            gconv.node_ids_in(bad, "src")


def test_labels_round_trip():
    y = np.array([2, -1, 0])
    assert gconv.labels_from_proto(gconv.labels_to_proto("g", y), 3).tolist() == y.tolist()
    Y = sp.csr_matrix(np.array([[1, 0], [0, 0], [1, 1]], np.int8))
    back = gconv.labels_from_proto(gconv.labels_to_proto("g", Y), 3)
    assert (back != Y).nnz == 0 and back.shape == (3, 2)
    assert gconv.labels_from_proto(gconv.labels_to_proto("g", None), 3) is None
    with pytest.raises(InvalidArgument, match="outside the graph"):
        gconv.labels_from_proto(gconv.labels_to_proto("g", Y), 2)
    with pytest.raises(InvalidArgument, match="single labels, multi labels or clear"):
        gconv.labels_from_proto(pb.SetLabelsRequest(graph="g"), 3)


def test_neighbors_round_trip():
    lists = [(np.array([1, 2]), np.array([1.0, 0.5], np.float32)), (np.zeros(0, np.int64), np.zeros(0, np.float32)),
             (np.array([7]), np.array([2.0], np.float32))]
    back = gconv.neighbors_from_proto(gconv.neighbors_to_proto(lists))
    assert [(a.tolist(), b.tolist()) for a, b in back] == [(a.tolist(), b.tolist()) for a, b in lists]


def test_fastrp_params_round_trip():
    p = FastRPParams(dim=64, iteration_weights=(0.0, 0.0, 1.0, 6.67), beta=-0.64, s="li", self_influence=0.5,
                     property_ratio=0.25, normalize=True, propagate_normalized=False, standardize=True, seed=42)
    d = gconv.fastrp_params_from_proto(gconv.fastrp_params_to_proto(p))
    assert FastRPParams(**d).as_dict() == p.as_dict()
    assert FastRPParams(**gconv.fastrp_params_from_proto(gconv.fastrp_params_to_proto({"dim": 8, "s": 3.0}))).s == 3.0
    only_dim = gconv.fastrp_params_from_proto(pb.FastRPParams(dim=16))
    assert FastRPParams(**only_dim).as_dict() == FastRPParams(dim=16).as_dict()  # unset fields: defaults


def test_hits_and_train_round_trip():
    res = [(np.array([3, 1]), np.array([0.9, 0.1], np.float32)), (np.zeros(0, np.int64), np.zeros(0, np.float32))]
    back = gconv.hits_from_proto(gconv.hits_to_proto(res))
    assert [(a.tolist(), b.tolist()) for a, b in back] == [(a.tolist(), pytest.approx(b.tolist())) for a, b in res]
    p = {"graph": "g", "model": "m", "preset": "cora", "config": {"predictor": "ncnc"}, "seed": 3, "device": "cpu",
         "val_frac": 0.15, "test_frac": 0.25, "evaluate": "none"}
    assert gconv.train_request_to_params(gconv.train_params_to_request(p)) == p
    with pytest.raises(InvalidArgument, match="JSON"):
        gconv.train_request_to_params(pb.TrainLinkModelRequest(graph="g", config_json="{bad"))


def test_tune_options_typed_round_trip_and_checks():
    from retrieval.graph.fastrp_tune import TUNE_OPTIONS

    assert set(gconv.TUNE_OPTION_FIELDS) == set(TUNE_OPTIONS)  # the proto names every option of the tuner
    opts = {"dims": [32, 64], "betas": [-0.5, 0.0], "max_power": 16, "time_limit": 2.5, "max_labeled": 500,
            "folds": 4, "val_pairs": 200, "dim_margin": 0.01, "search_dim": 16, "confirm": 2, "blas_threads": 1}
    fields = gconv.tune_fields(True, opts)
    req = pb.RunFastRPRequest(graph="g", **fields)
    assert req.tune and req.HasField("tune_options") and not req.tune_options_json
    assert gconv.tune_options_from_proto(req) == opts
    # only what was set comes back; None is "the default" (unset); a bare number is a one-element list
    req = pb.RunFastRPRequest(**gconv.tune_fields(True, {"dims": 48, "time_limit": None}))
    assert gconv.tune_options_from_proto(req) == {"dims": [48]}
    assert gconv.tune_options_from_proto(pb.RunFastRPRequest(**gconv.tune_fields(True, {}))) == {}
    assert gconv.tune_options_from_proto(pb.RunFastRPRequest(tune=True)) is None
    assert gconv.tune_fields(False, None) == {"tune": False}
    # the deprecated JSON field still reads; both at once is refused
    old = pb.RunFastRPRequest(tune=True, tune_options_json='{"max_power": 8}')
    assert gconv.tune_options_from_proto(old) == {"max_power": 8}
    old.tune_options.max_power = 4
    with pytest.raises(InvalidArgument, match="not both"):
        gconv.tune_options_from_proto(old)
    for bad, match in (({"dimz": [8]}, "unknown tune_options"), ({"max_power": "8"}, "max_power must be"),
                       ({"max_power": True}, "max_power must be"), ({"dims": [8, -1]}, "dims must be"),
                       ({"betas": ["x"]}, "betas must be"), ({"folds": 2.5}, "folds must be"),
                       ([1], "must be an object")):
        with pytest.raises(InvalidArgument, match=match):
            gconv.tune_fields(True, bad)


def test_fastrp_params_whiten_and_bad_keys():
    p = FastRPParams(dim=32, whiten=0.5, standardize=True)
    msg = gconv.fastrp_params_to_proto(p)
    assert msg.HasField("whiten") and msg.whiten == 0.5
    assert FastRPParams(**gconv.fastrp_params_from_proto(msg)).as_dict() == p.as_dict()
    assert "whiten" not in gconv.fastrp_params_from_proto(pb.FastRPParams(dim=8))  # unset: the default (off)
    assert set(gconv.FASTRP_PARAM_FIELDS) == set(FastRPParams(dim=8).as_dict())  # the proto carries every field
    for bad, match in (({"dim": 8, "betta": 0.5}, "unknown FastRP parameters"), ({"dim": 8, "beta": "x"}, "beta"),
                       ({"dim": 8, "normalize": "no"}, "normalize"), ({"dim": "eight"}, "dim"),
                       ({"dim": 8, "iteration_weights": ["a"]}, "iteration_weights")):
        with pytest.raises(InvalidArgument, match=match):
            gconv.fastrp_params_to_proto(bad)
