"""Graph import as a job (``import_graph``), GetEmbeddings, the ListCollections filter and AppendEdges
input checks, against a real loopback server (tests/conftest.py's: clients may name files under the
tests' temporary folders and bench/)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from retrieval.graph.readers import read_graph
from retrieval.graph.store import GraphStore

from .conftest import DATA


def _ok(job):
    assert job["state"] == "succeeded", job
    assert job["done"] == job["total"] == 100  # progress reported to the end
    return job["result"]


def test_import_blogcatalog_mat(client, server):
    """BlogCatalog as shipped (.mat: adjacency 'network', multi-labels 'group'), read by the server."""
    ref = read_graph(DATA / "blogcatalog" / "blogcatalog.mat").graph
    res = _ok(client.import_graph("blog", str(DATA / "blogcatalog" / "blogcatalog.mat")))
    assert res["created"] and res["format"] == "mat" and res["labels"] and not res["features"]
    assert (res["n"], res["m"]) == (ref.n, ref.num_edges) == (10312, 333983)
    d = client.describe_graph("blog")
    assert d["labels"] == {"multilabel": True, "num_classes": 39, "num_labeled": ref.labels.num_labeled}
    # congruence: what the server stored is the graph the reader gives in-process
    stored = GraphStore(server.data_dir / "graphs").load("blog")
    assert np.array_equal(stored.indptr, ref.indptr) and np.array_equal(stored.indices, ref.indices)
    assert (stored.labels.Y != ref.labels.Y).nnz == 0
    with pytest.raises(AlreadyExists, match="already exists"):
        client.import_graph("blog", str(DATA / "blogcatalog" / "blogcatalog.mat"), mode="create")


def test_import_cora_planetoid_folder(client):
    ref = read_graph(DATA / "cora").graph
    res = _ok(client.import_graph("cora-imp", str(DATA / "cora"), format="planetoid"))
    assert res["format"] == "planetoid" and res["features"] and res["labels"]
    d = client.describe_graph("cora-imp")
    assert (d["n"], d["m"], d["feature_dim"]) == (ref.n, ref.num_edges, 1433) == (2708, 5278, 1433)
    assert d["labels"]["num_classes"] == 7 and d["self_loops"] == 0
    nb = client.neighbors("cora-imp", [0, 633])
    assert [ids.tolist() for ids, _ in nb] == [ref.neighbors(0)[0].tolist(), ref.neighbors(633)[0].tolist()]


def test_import_csv_tsv_create_then_append(client, tmp_path):
    (tmp_path / "e.csv").write_text("source,target\n0,1\n1,2\n2,2\n2,0\n")  # header; one self-loop
    res = _ok(client.import_graph("csvg", str(tmp_path / "e.csv"), format="csv"))
    assert res["created"] and res["n"] == 3 and res["m"] == 3 and res["self_loops_dropped"] == 1
    # a TSV without header, delimiter sniffed: appended, the graph grows to the highest id
    (tmp_path / "more.tsv").write_text("# comment\n2\t3\n3\t4\n4\t4\n")
    res = _ok(client.import_graph("csvg", str(tmp_path / "more.tsv"), header=False, self_loops="keep"))
    assert not res["created"] and res["delimiter"] == "\t" and res["added"] == 3
    d = client.describe_graph("csvg")
    assert d["n"] == 5 and d["m"] == 6 and d["self_loops"] == 1
    # a file with only a space separator: whitespace split; weights ignored on an unweighted graph
    (tmp_path / "w.txt").write_text("0 4 2.5\n")
    res = _ok(client.import_graph("csvg", str(tmp_path / "w.txt"), mode="append"))
    assert res["added"] == 1 and res["ignored"] == ["weights"]
    # self_loops="reject": the job fails, the graph is unchanged
    before = client.describe_graph("csvg")["version"]
    (tmp_path / "loop.csv").write_text("0,0\n")
    job = client.import_graph("csvg", str(tmp_path / "loop.csv"), self_loops="reject")
    assert job["state"] == "failed" and "self-loop" in job["error"], job
    assert client.describe_graph("csvg")["version"] == before


def test_import_bad_input(client, tmp_path):
    (tmp_path / "bad.csv").write_text("0,1\n1.5,2\n")
    job = client.import_graph("badg", str(tmp_path / "bad.csv"))
    assert job["state"] == "failed" and "line 2: source id '1.5' is not an integer" in job["error"], job
    with pytest.raises(NotFound):
        client.describe_graph("badg")  # nothing was created
    with pytest.raises(NotFound, match="does not exist"):
        client.import_graph("badg", str(tmp_path / "missing.csv"))
    with pytest.raises(NotFound, match="does not exist"):
        client.import_graph("nope", str(tmp_path / "bad.csv"), mode="append")
    with pytest.raises(PermissionDenied, match="outside the folders"):
        client.import_graph("badg", "/etc/passwd", format="csv")
    os.symlink("/etc/hostname", tmp_path / "link.csv")  # a link leading out of the allowed folders
    with pytest.raises(PermissionDenied, match="outside the folders"):
        client.import_graph("badg", str(tmp_path / "link.csv"))
    for kw, words in (({"format": "graphml"}, "format must be one of"), ({"mode": "replace"}, "mode must be"),
                      ({"self_loops": "maybe"}, "self_loops must be one of"),
                      ({"header": "yes"}, "header must be"), ({"index_base": 2}, "index_base must be")):
        with pytest.raises(InvalidArgument, match=words):
            client.import_graph("badg", str(tmp_path / "bad.csv"), **kw)
    with pytest.raises(InvalidArgument, match="unknown import_graph parameter"):
        client.start_job("import_graph", graph="badg", path=str(tmp_path / "bad.csv"), colour="red")


def test_append_edges_checks_and_self_loops(client):
    client.create_graph("ap", 4)
    with pytest.raises(InvalidArgument, match=r"src must be integers, got 1.5 at src\[1\]"):
        client.append_edges("ap", [0, 1.5], [1, 2])
    with pytest.raises(InvalidArgument, match=r"dst must be >= 0, got -1 at dst\[0\]"):
        client.append_edges("ap", [0], [-1])
    with pytest.raises(InvalidArgument, match=r"src must be integers, got 'abc' at src\[1\]"):
        client.append_edges("ap", [0, "abc"], [1, 2])
    with pytest.raises(InvalidArgument, match=r"edge chunk 1: dst\[0\] = 9 \(edge 2 of the stream\) is outside"):
        client.append_edges("ap", [0, 1, 2], [1, 2, 9], chunk=2)
    r = client.append_edges("ap", [0, 1, 2], [1, 1, 3])  # undirected: the self-loop is dropped by default
    assert r["added"] == 2 and r["self_loops_dropped"] == 1
    with pytest.raises(InvalidArgument, match=r"edge 0 \(3, 3\) is a self-loop and self_loops='reject'"):
        client.append_edges("ap", [3], [3], self_loops="reject")
    with pytest.raises(InvalidArgument, match="self_loops must be one of"):
        client.append_edges("ap", [3], [3], self_loops="sometimes")
    assert client.append_edges("ap", [3], [3], self_loops="keep")["added"] == 1
    assert client.describe_graph("ap")["self_loops"] == 1


def test_get_embeddings_and_internal_collections(client, server):
    ref = read_graph(DATA / "celegans" / "Celegans.txt").graph
    client.create_graph("emb", ref.n)
    s, d, _ = ref.edges()
    client.append_edges("emb", s, d)
    client.create_collection("user-col", 4)
    assert _ok_job(client.run_fastrp("emb", dim=16, seed=3))
    X = client.get_embeddings("emb")
    stored, meta = GraphStore(server.data_dir / "graphs").load_embeddings("emb", "fastrp")
    assert X.dtype == np.float32 and X.shape == (ref.n, 16) and np.array_equal(X, stored)
    sub = client.get_embeddings("emb", nodes=[5, 0, 5])
    assert np.array_equal(sub, stored[[5, 0, 5]])
    from retrieval.graph.convert import embeddings_to_chunks  # several chunks when the rows are many

    assert len(list(embeddings_to_chunks(np.zeros((40000, 16), np.float32), 1, 1))) == 2
    with pytest.raises(NotFound, match="no embeddings 'other'"):
        client.get_embeddings("emb", "other")
    with pytest.raises(NotFound):
        client.get_embeddings("nope")
    with pytest.raises(InvalidArgument, match="outside the graph"):
        client.get_embeddings("emb", nodes=[ref.n])
    with pytest.raises(InvalidArgument, match=r"nodes must be integers, got 0.5 at nodes\[0\]"):
        client.get_embeddings("emb", nodes=[0.5])
    # the FastRP collection is internal: hidden from ListCollections unless asked for
    internal = meta["collection"]
    names = [c["name"] for c in client.list_collections()]
    assert "user-col" in names and internal not in names
    names_all = [c["name"] for c in client.list_collections(include_internal=True)]
    assert internal in names_all and "user-col" in names_all
    client.drop_collection("user-col")


def _ok_job(job):
    assert job["state"] == "succeeded", job
    return True
