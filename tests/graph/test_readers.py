import gzip
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.errors import InvalidArgument, NotFound
from retrieval.graph.readers import (READERS, detect_format, get_reader, load_torch_arrays, parse_edge_text,
                                     read_graph, safe_unpickle)


# ---- real files (copied from the shared data with their SOURCE.md) --------------------------------
def test_usair_crlf_weights_one_based(data_dir):
    r = read_graph(data_dir / "usair" / "USAir.txt", index_base=1)
    g = r.graph
    assert (g.n, g.num_edges, g.weighted) == (332, 2126, True)
    assert g.weights.min() > 0


def test_pb_reverse_duplicates_collapse(data_dir):
    g = read_graph(data_dir / "pb" / "PB.txt", index_base=1).graph
    assert (g.n, g.num_edges, g.num_self_loops) == (1222, 16714, 0)


def test_ns_isolated_nodes_with_num_nodes(data_dir):
    g = read_graph(data_dir / "ns" / "NS.txt", index_base=1, num_nodes=1589).graph
    assert (g.n, g.num_edges) == (1589, 2742)
    assert g.describe()["isolated"] == 128


def test_mat_network_and_group(data_dir):
    g = read_graph(data_dir / "blogcatalog" / "blogcatalog.mat").graph
    assert (g.n, g.num_edges) == (10312, 333983)
    assert g.labels.multilabel and g.labels.Y.shape == (10312, 39) and g.labels.Y.nnz == 14476


def test_mat_net_with_self_loops(data_dir):
    keep = read_graph(data_dir / "ppi" / "PPI_subgraph.mat").graph
    drop = read_graph(data_dir / "ppi" / "PPI_subgraph.mat", self_loops=False).graph
    assert keep.num_self_loops == 894 and keep.num_edges == 37845 + 894
    assert drop.num_self_loops == 0 and drop.num_edges == 37845
    g = read_graph(data_dir / "ecoli" / "Ecoli.mat").graph
    assert (g.n, g.num_edges) == (1805, 14660)


def test_planetoid_pickles_equal_the_pickle_free_npz(data_dir):
    a = read_graph(data_dir / "cora", prefer="npz")
    b = read_graph(data_dir / "cora", prefer="pickle")
    assert a.info["format"] == "npz" and b.info["format"] == "pickle"
    ga, gb = a.graph, b.graph
    assert (ga.n, ga.num_edges) == (2708, 5278)
    assert np.array_equal(ga.indptr, gb.indptr) and np.array_equal(ga.indices, gb.indices)
    assert np.array_equal(ga.features, gb.features)
    assert np.array_equal(ga.labels.y, gb.labels.y)
    for k in ("train_index", "val_index", "test_index", "feature_mask"):
        assert np.array_equal(a.splits[k], b.splits[k]), k
    assert np.bincount(ga.labels.y).tolist() == [351, 217, 418, 818, 426, 298, 180]


def test_citeseer_npz(data_dir):
    g = read_graph(data_dir / "citeseer").graph
    assert (g.n, g.num_edges, g.features.shape[1]) == (3327, 4552, 3703)
    assert (g.labels.y >= 0).sum() == 3312


@pytest.mark.slow
def test_ogbl_ddi_official_split(data_dir):
    r = read_graph(data_dir / "ogbl-ddi")
    assert (r.graph.n, r.graph.num_edges) == (4267, 1067911)
    assert r.splits["valid"]["edge"].shape == (133489, 2)
    assert r.splits["test"]["edge_neg"].shape == (95599, 2)


# ---- hand-written edge cases -------------------------------------------------------------------
def test_edge_text_variants(tmp_path):
    text = "# comment\r\n% other comment\r\nsrc,dst,weight\r\n0,1,0.5\r\n\r\n1\t2\t1.5\r\n 2  0  2 \r\n1,0,9\r\n3 3 1\r\n"
    p = tmp_path / "g.csv"
    p.write_bytes(text.encode())
    g = read_graph(p).graph
    assert g.weighted and g.n == 4 and g.num_edges == 4  # (1,0) repeats (0,1); (3,3) self-loop
    ids, w = g.neighbors(0)
    assert ids.tolist() == [1, 2] and w.tolist() == [0.5, 2.0]  # duplicates="first"
    gz = tmp_path / "g.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    g2 = read_graph(gz).graph
    assert np.array_equal(g2.indices, g.indices)
    g3 = read_graph(p, self_loops=False, weighted=False).graph
    assert g3.num_edges == 3 and not g3.weighted


def test_directed_edge_list(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("0 1\n1 0\n1 2\n")
    g = read_graph(p, directed=True).graph
    assert g.directed and g.num_edges == 3


@pytest.mark.parametrize(
    "text,msg",
    [
        ("0 1\n1 2 3 4\n", r"line 2: expected 2 or 3 fields"),
        ("0 1\n1\n", r"line 2: expected 2 or 3 fields"),
        ("0 1\nx 2\n", r"line 2: source id 'x' is not an integer"),
        ("0 1\n1 2.5\n", r"line 2: target id '2.5' is not an integer"),
        ("0 1 1\n1 2 -1\n", r"line 2: weight '-1' must be finite and >= 0"),
        ("0 1 1\n1 2 nan\n", r"line 2: weight 'nan' must be finite"),
        ("0 1 1\n1 2 abc\n", r"line 2: weight 'abc' is not a number"),
        ("# c\n0 -1\n", r"line 2: target id '-1' is negative"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(InvalidArgument, match=msg) as e:
        read_graph(p)
    assert "bad.txt" in str(e.value)


def test_index_base_and_num_nodes_checks(tmp_path):
    p = tmp_path / "g.txt"
    p.write_text("0 1\n")
    with pytest.raises(InvalidArgument, match="below index_base=1"):
        read_graph(p, index_base=1)
    with pytest.raises(InvalidArgument, match="outside num_nodes=1"):
        read_graph(p, num_nodes=1)
    assert read_graph(p, num_nodes=5).graph.n == 5


def test_empty_edge_list(tmp_path):
    p = tmp_path / "e.txt"
    p.write_text("# nothing\n")
    g = read_graph(p, num_nodes=3).graph
    assert g.n == 3 and g.num_edges == 0
    u, v, w = parse_edge_text("")
    assert u.size == 0 and w is None


# ---- untrusted pickles --------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    p = tmp_path / "ind.evil.x"
    p.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(InvalidArgument, match="refused to unpickle: global (posix|os).system is not allowed"):
        safe_unpickle(p)


def test_restricted_unpickler_reads_arrays(tmp_path):
    p = tmp_path / "ok.pkl"
    obj = {"a": np.arange(5), "m": sp.csr_matrix(np.eye(3))}
    p.write_bytes(pickle.dumps(obj, protocol=2))
    out = safe_unpickle(p)
    assert np.array_equal(out["a"], obj["a"]) and (out["m"] != obj["m"]).nnz == 0


def test_legacy_torch_split_files(tmp_path):
    import torch

    d = tmp_path / "ogbl-toy"
    (d / "raw").mkdir(parents=True)
    (d / "split" / "target").mkdir(parents=True)
    (d / "raw" / "edge.csv.gz").write_bytes(gzip.compress(b"0,1\n1,2\n2,3\n"))
    (d / "raw" / "num-node-list.csv.gz").write_bytes(gzip.compress(b"5\n"))
    for part in ("valid", "test"):
        torch.save({"edge": np.array([[0, 2]]), "edge_neg": np.array([[0, 4], [1, 4]])}, d / "split" / "target" / f"{part}.pt",
                   _use_new_zipfile_serialization=False)
    r = read_graph(d)
    assert detect_format(d) == "ogbl"
    assert r.graph.n == 5 and r.graph.num_edges == 3
    assert r.splits["test"]["edge_neg"].tolist() == [[0, 4], [1, 4]]
    evil = d / "split" / "target" / "valid.pt"
    torch.save({"edge": _Evil()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(InvalidArgument, match="refused or failed to load"):
        load_torch_arrays(evil)


# ---- registry --------------------------------------------------------------------------------
def test_registry_lists_valid_names(tmp_path):
    assert sorted(READERS) == ["edgelist", "mat", "ogbl", "planetoid"]
    with pytest.raises(InvalidArgument, match=r"unknown graph reader .*; valid: edgelist, mat, ogbl, planetoid"):
        get_reader("graphml")
    for r in READERS.values():
        assert isinstance(r.provides_features, bool) and isinstance(r.suffixes, tuple)
    with pytest.raises(NotFound):
        read_graph(tmp_path / "missing.txt")
    p = tmp_path / "x.weird"
    p.write_text("0 1\n")
    with pytest.raises(InvalidArgument, match="unknown file type"):
        read_graph(p)
    assert read_graph(p, format="edgelist").graph.num_edges == 1


def test_corrupt_mat_file(tmp_path):
    p = tmp_path / "bad.mat"
    p.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(InvalidArgument, match="bad.mat"):
        read_graph(p)
