import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.errors import InvalidArgument
from retrieval.graph.graph import Graph, as_labels


def test_undirected_dedupes_reverse_rows_and_keeps_self_loops():
    g = Graph.from_edges(4, [0, 1, 1, 2, 3, 2], [1, 0, 2, 1, 3, 2])
    assert g.num_edges == 4  # {0,1}, {1,2}, {3,3}, {2,2}
    assert g.num_self_loops == 2
    assert list(g.neighbors(1)[0]) == [0, 2]
    assert list(g.neighbors(3)[0]) == [3]
    A = g.adjacency().toarray()
    assert (A == A.T).all()
    s, d, _ = g.edges()
    assert sorted(zip(s.tolist(), d.tolist())) == [(0, 1), (1, 2), (2, 2), (3, 3)]


def test_self_loops_dropped_on_request():
    g = Graph.from_edges(3, [0, 1, 2], [0, 2, 2], self_loops=False)
    assert g.num_edges == 1 and g.num_self_loops == 0


@pytest.mark.parametrize("policy,expected", [("last", 5.0), ("first", 2.0), ("sum", 10.0), ("max", 5.0), ("min", 2.0)])
def test_duplicate_weight_policies(policy, expected):
    g = Graph.from_edges(3, [0, 1, 0], [1, 0, 1], [2.0, 3.0, 5.0], duplicates=policy)
    ids, w = g.neighbors(0)
    assert list(ids) == [1] and w[0] == pytest.approx(expected)
    ids, w = g.neighbors(1)
    assert w[0] == pytest.approx(expected)  # both directions carry the same weight


def test_directed_keeps_both_arcs_and_in_neighbours():
    g = Graph.from_edges(3, [0, 1, 2], [1, 0, 0], directed=True)
    assert g.num_edges == 3
    assert list(g.neighbors(0, "out")[0]) == [1]
    assert list(g.neighbors(0, "in")[0]) == [1, 2]
    assert list(g.neighbors(0, "both")[0]) == [1, 2]


def test_describe_counts():
    g = Graph.from_edges(5, [0, 0, 1], [1, 2, 2], labels=[0, 1, -1, 1, 0], features=np.ones((5, 3)))
    d = g.describe()
    assert d["n"] == 5 and d["m"] == 3 and d["isolated"] == 2 and d["feature_dim"] == 3
    assert d["degree"] == {"min": 0, "max": 2, "mean": pytest.approx(6 / 5)}
    assert d["labels"] == {"multilabel": False, "num_classes": 2, "num_labeled": 4}


def test_from_scipy_detects_direction_and_weights():
    A = sp.csr_matrix(np.array([[0, 2.0, 0], [2.0, 0, 1.0], [0, 1.0, 0]]))
    g = Graph.from_scipy(A)
    assert not g.directed and g.weighted and g.num_edges == 2
    B = sp.csr_matrix(np.array([[0, 1.0], [0, 0]]))
    assert Graph.from_scipy(B).directed


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(src=[0, 5], dst=[1, 1]), r"src\[1\] = 5 is outside the graph"),
        (dict(src=[0, -1], dst=[1, 1]), r"src\[1\] = -1 is outside"),
        (dict(src=[0, 1], dst=[1, 2], weights=[1.0, -2.0]), r"weights\[1\] = -2.0"),
        (dict(src=[0, 1], dst=[1, 2], weights=[np.nan, 1.0]), r"weights\[0\] = nan"),
        (dict(src=[0, 1], dst=[1, 2], weights=[np.inf, 1.0]), r"finite"),
        (dict(src=[0.5], dst=[1]), r"not an integer node id"),
        (dict(src=[0, 1], dst=[1]), r"same length"),
        (dict(src=[0], dst=[1], weights=[1.0, 2.0]), r"one per edge"),
    ],
)
def test_bad_edges_are_rejected(kw, msg):
    with pytest.raises(InvalidArgument, match=msg):
        Graph.from_edges(3, **kw)


def test_bad_features_and_labels():
    g = Graph.from_edges(3, [0], [1])
    with pytest.raises(InvalidArgument, match=r"shape \(3, f\)"):
        g.with_features(np.ones((2, 4)))
    with pytest.raises(InvalidArgument, match="finite"):
        g.with_features(np.array([[1.0], [np.nan], [0.0]]))
    with pytest.raises(InvalidArgument, match="class ids"):
        g.with_labels([0, -2, 1])
    with pytest.raises(InvalidArgument, match="0/1"):
        as_labels(np.array([[0, 2], [1, 0], [0, 0]]), 3)
    with pytest.raises(InvalidArgument, match="num_nodes"):
        Graph.from_edges(-1, [], [])


def test_empty_graph():
    g = Graph.from_edges(0, [], [])
    assert g.n == 0 and g.num_edges == 0
    assert g.describe()["degree"]["max"] == 0
