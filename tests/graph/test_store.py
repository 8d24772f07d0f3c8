import json
import os

import numpy as np
import pytest

from retrieval.errors import AlreadyExists, InvalidArgument, NotFound
from retrieval.graph import store as store_mod
from retrieval.graph.graph import Graph
from retrieval.graph.readers import read_graph
from retrieval.graph.store import GraphStore


@pytest.fixture
def st(tmp_path):
    return GraphStore(tmp_path / "graphs")


def _files(p):
    return sorted(f.name for f in p.iterdir())


def test_create_append_describe_neighbours_drop(st):
    st.create("g1", 5)
    assert st.list() == ["g1"]
    r = st.append_edges("g1", [0, 1, 1, 3], [1, 0, 2, 3], self_loops="keep")
    assert r["added"] == 3 and r["m"] == 3  # (1,0) repeats (0,1); (3,3) is a self-loop, kept on request
    r = st.append_edges("g1", [2], [4])
    assert r["added"] == 1 and r["m"] == 4
    d = st.describe("g1")
    assert d["n"] == 5 and d["m"] == 4 and d["self_loops"] == 1 and d["version"] == 3
    ids, w = st.neighbors("g1", 2)
    assert ids.tolist() == [1, 4] and w.tolist() == [1.0, 1.0]
    st.drop("g1")
    assert st.list() == []
    with pytest.raises(NotFound, match="does not exist"):
        st.describe("g1")
    with pytest.raises(NotFound):
        st.drop("g1")


def test_weighted_append_last_wins_and_persistence(st, tmp_path):
    st.create("w", 3, weighted=True)
    st.append_edges("w", [0, 1], [1, 2], [0.5, 2.0])
    st.append_edges("w", [1], [0], [7.0])  # same undirected edge {0, 1}: newest weight wins
    again = GraphStore(tmp_path / "graphs")  # a fresh instance reads the same files
    ids, w = again.neighbors("w", 0)
    assert ids.tolist() == [1] and w.tolist() == [7.0]
    with pytest.raises(InvalidArgument, match="unweighted"):
        st.create("u", 2) and st.append_edges("u", [0], [1], [1.0])


def test_features_labels_and_add_nodes(st):
    st.create("f", 3)
    st.append_edges("f", [0], [1])
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    st.set_features("f", x)
    st.set_labels("f", [1, -1, 0])
    g = st.load("f")
    assert np.array_equal(g.features, x) and g.labels.y.tolist() == [1, -1, 0]
    st.add_nodes("f", 2)
    g = st.load("f")
    assert g.n == 5 and g.features.shape == (5, 2) and g.features[3:].sum() == 0
    assert g.labels.y.tolist() == [1, -1, 0, -1, -1]
    st.append_edges("f", [4], [0])  # features and labels survive an edge append
    g = st.load("f")
    assert np.array_equal(g.features[:3], x) and g.num_edges == 2
    with pytest.raises(InvalidArgument, match=r"shape \(5, f\)"):
        st.set_features("f", np.ones((4, 2)))
    st.set_labels("f", np.eye(5, 3, dtype=np.int8))  # multi-label
    assert st.describe("f")["labels"]["multilabel"]


def test_put_real_graph_round_trip(st, data_dir):
    r = read_graph(data_dir / "cora")
    st.put("cora", r.graph)
    g = st.load("cora")
    assert g.n == 2708 and g.num_edges == 5278
    assert np.array_equal(g.indices, r.graph.indices) and np.array_equal(g.features, r.graph.features)
    assert np.array_equal(g.labels.y, r.graph.labels.y)
    with pytest.raises(AlreadyExists):
        st.put("cora", r.graph)


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", ".hidden", "x" * 200, "sp ace", None, "..", "ok\n"])
def test_names_cannot_escape(st, bad):
    with pytest.raises(InvalidArgument, match="not valid"):
        st.create(bad, 1)


def test_bad_input_changes_nothing(st):
    st.create("g", 4, weighted=True)
    st.append_edges("g", [0, 1], [1, 2], [1.0, 2.0])
    folder = st.path("g")
    before_files, before_man = _files(folder), (folder / "manifest.json").read_bytes()
    for src, dst, w, msg in [([0, 9], [1, 1], None, "outside the graph"),
                             ([0], [1], [-1.0], "finite and >= 0"),
                             ([0], [1], [float("nan")], "finite and >= 0"),
                             ([0, 1], [1], None, "same length")]:
        with pytest.raises(InvalidArgument, match=msg):
            st.append_edges("g", src, dst, w)
    with pytest.raises(InvalidArgument):
        st.set_features("g", np.ones((3, 2)))
    assert _files(folder) == before_files and (folder / "manifest.json").read_bytes() == before_man
    assert st.load("g").num_edges == 2


def test_crash_during_commit_keeps_old_version(st, monkeypatch):
    st.create("c", 3)
    st.append_edges("c", [0], [1])
    real = store_mod.atomic_write_json

    def crash(path, obj):  # the new CSR file is written, then the process "dies" before the commit point
        raise OSError("simulated crash")

    monkeypatch.setattr(store_mod, "atomic_write_json", crash)
    with pytest.raises(OSError):
        st.append_edges("c", [1], [2])
    monkeypatch.setattr(store_mod, "atomic_write_json", real)
    fresh = GraphStore(st.root)
    g = fresh.load("c")
    assert g.num_edges == 1 and fresh.version("c") == 2  # the old version, whole
    # a half-written temp file and the orphan new version are cleaned by the next write
    (st.path("c") / ".csr.v9.npz.abc.tmp").write_bytes(b"partial")
    fresh.append_edges("c", [1], [2])
    names = _files(st.path("c"))
    assert names == ["csr.v3.npz", "manifest.json"], names
    assert fresh.load("c").num_edges == 2


def test_crashed_create_and_drop_debris_is_ignored(st):
    (st.root / ".creating-x-123").mkdir()
    (st.root / ".dropped-y-456").mkdir()
    (st.root / "half").mkdir()  # a folder without manifest is not a graph
    assert st.list() == []
    st.create("half", 2)  # and can be created over
    assert st.list() == ["half"]
    GraphStore(st.root)
    assert not (st.root / ".dropped-y-456").exists()


def test_embeddings_are_stored_with_the_graph(st):
    st.create("e", 3)
    meta = st.put_embeddings("e", "fastrp", np.ones((3, 4), np.float32), {"graph_version": 1})
    assert meta["dim"] == 4
    arr, info = st.load_embeddings("e", "fastrp")
    assert arr.shape == (3, 4) and info["graph_version"] == 1
    assert st.describe("e")["embeddings"] == ["fastrp"]
    with pytest.raises(InvalidArgument):
        st.put_embeddings("e", "x", np.ones((2, 4)), {})
    with pytest.raises(NotFound):
        st.load_embeddings("e", "nope")
    meta2 = st.put_embeddings("e", "fastrp", np.zeros((3, 2), np.float32), {"graph_version": 2})
    assert meta2["dim"] == 2 and st.load_embeddings("e", "fastrp")[0].shape == (3, 2)
    files = sorted(p.name for p in (st.path("e") / "embeddings").iterdir())
    assert files == sorted([meta2["file"], "fastrp.json"])  # the replaced file is gone


def test_empty_graph_can_be_stored(st):
    st.put("empty", Graph.from_edges(0, [], []))
    d = st.describe("empty")
    assert d["n"] == 0 and d["m"] == 0
    assert os.path.exists(st.path("empty") / "manifest.json")


def test_self_loop_policies(st):
    st.create("u", 4)
    r = st.append_edges("u", [0, 1, 2], [1, 1, 2])  # undirected: self-loops dropped by default
    assert r["added"] == 1 and r["self_loops_dropped"] == 2 and st.describe("u")["self_loops"] == 0
    v = st.version("u")
    with pytest.raises(InvalidArgument, match=r"edge 1 \(3, 3\) is a self-loop and self_loops='reject'"):
        st.append_edges("u", [0, 3], [2, 3], self_loops="reject")
    assert st.version("u") == v  # nothing written
    assert st.append_edges("u", [3], [3], self_loops="keep")["added"] == 1
    with pytest.raises(InvalidArgument, match="self_loops must be one of"):
        st.append_edges("u", [0], [1], self_loops="maybe")
    st.create("d", 3, directed=True)
    r = st.append_edges("d", [0, 1], [0, 2])  # directed: kept by default
    assert r["added"] == 2 and r["self_loops_dropped"] == 0 and st.describe("d")["self_loops"] == 1


@pytest.mark.parametrize("src,words", [
    ([0, 1.5], r"src\[1\] = 1.5 is not an integer node id"),
    ([0, -1], r"src\[1\] = -1 is outside the graph: node ids are >= 0"),
    (["0", "abc"], r"src\[0\] = '0' is not an integer node id"),
    ([0, "abc"], r"src\[1\] = 'abc' is not an integer node id"),
    ([0, 1, 4], r"src\[2\] = 4 is outside the graph: expected an id in \[0, 4\)"),
    (np.array([0, 2**63 + 1], np.uint64), r"src\[1\] = 9223372036854775809 is outside the graph"),
    ([float("nan")], r"src\[0\] = nan is not an integer node id"),
    ([True], r"src\[0\] = True is a boolean"),
])
def test_append_ids_checked_before_cast(st, src, words):
    st.create("ids", 4)
    with pytest.raises(InvalidArgument, match=words):
        st.append_edges("ids", src, [0] * len(src))
    assert st.describe("ids")["m"] == 0 and st.version("ids") == 1


def test_append_grows_the_graph_in_the_same_step(st):
    st.create("grow", 2)
    st.set_labels("grow", [0, 1])
    with pytest.raises(InvalidArgument, match="self-loop"):
        st.append_edges("grow", [0, 3], [1, 3], self_loops="reject", num_nodes=4)
    assert st.describe("grow")["n"] == 2 and st.version("grow") == 2  # nothing written
    r = st.append_edges("grow", [0, 1], [3, 2], num_nodes=4)
    d = st.describe("grow")
    assert r["added"] == 2 and d["n"] == 4 and d["version"] == 3 and st.load("grow").labels.y.tolist() == [0, 1, -1, -1]
    assert st.append_edges("grow", [], [], num_nodes=5)["m"] == 2 and st.describe("grow")["n"] == 5
