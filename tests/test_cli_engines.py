"""The engine commands of the ``retrieval`` CLI (points, search, jobs, graphs, ce, drafts, ground-truth,
--version) against a real loopback server, run in-process with typer's CliRunner (a few as
subprocesses, to see exactly what a user sees)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.cli import app, read_edge_list

D = 4
N = 30


def run(*args, address=None, input=None):
    argv = list(args)
    if address is not None:
        argv += ["--address", address]
    return CliRunner().invoke(app, argv, input=input)


def ok(r):
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r.stdout


def one_line_error(r, words):
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception  # not an uncaught exception
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert words in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fixed-seed vectors (N, D), ids 100.., payloads {"i", "even"} as files."""
    d = tmp_path_factory.mktemp("cli-data")
    xb = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    np.save(d / "xb.npy", xb)
    np.save(d / "ids.npy", np.arange(100, 100 + N, dtype=np.int64))
    (d / "p.jsonl").write_text("".join(json.dumps({"i": i, "even": i % 2 == 0}) + "\n" for i in range(N)))
    np.save(d / "xq.npy", xb[:3])
    np.save(d / "wrong.npy", np.zeros((2, D + 1), np.float32))
    return d, xb


@pytest.fixture(scope="module")
def coll(server, client, data):
    d, _ = data
    client.create_collection("cli-pts", D, "l2", "exact")
    r = run("points", "upsert", "cli-pts", "--vectors", str(d / "xb.npy"), "--ids", str(d / "ids.npy"),
            "--payloads", str(d / "p.jsonl"), "--batch-size", "7", "--json", address=server.address)
    assert json.loads(ok(r)) == {"collection": "cli-pts", "upserted": N}
    return "cli-pts"


def test_version():
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "retrieval", "--version"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip() == f"retrieval {version('retrieval-service')}"


def test_help_of_every_group():
    for group in ("points", "search", "jobs", "graphs", "ce", "drafts", "ground-truth"):
        assert "--help" in ok(run(group, "--help")) or "Usage" in ok(run(group, "--help"))


def test_points_upsert_get_count_scroll_delete(server, client, coll, data):
    a = server.address
    d, xb = data
    assert client.count(coll) == N
    got = client.get(coll, [100, 129])
    assert np.allclose(got.vectors, xb[[0, 29]]) and got.payloads[1] == {"i": 29, "even": False}
    # --start-id and no payloads: a second collection
    client.create_collection("cli-pts2", D, "l2", "exact")
    assert "upserted 30 points into cli-pts2" in ok(run("points", "upsert", "cli-pts2", "--vectors",
                                                        str(d / "xb.npy"), "--start-id", "5", "-q", address=a))
    assert sorted(client.get("cli-pts2", [5, 34, 35]).ids.tolist()) == [5, 34]

    rows = json.loads(ok(run("points", "get", coll, "100", "101,102", "999", "--vectors", "--json", address=a)))
    assert [r["id"] for r in rows] == [100, 101, 102] and rows[1]["payload"] == {"i": 1, "even": False}
    assert np.allclose(rows[2]["vector"], xb[2], atol=1e-6)
    table = ok(run("points", "get", coll, "100", address=a)).splitlines()
    assert table[0].split() == ["id", "payload"] and table[1].startswith("100 ")

    even = '{"must": [{"key": "even", "equals": true}]}'
    assert ok(run("points", "count", coll, address=a)).strip() == str(N)
    assert json.loads(ok(run("points", "count", coll, "--filter", even, "--json", address=a)))["count"] == N // 2

    lines = ok(run("points", "scroll", coll, "--limit", "12", "--page-size", "5", address=a)).splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == list(range(100, 112))
    lines = ok(run("points", "scroll", coll, "--limit", "0", "--filter", even, address=a)).splitlines()
    assert [json.loads(ln)["id"] for ln in lines] == list(range(100, 130, 2))

    assert "deleted 2 points" in ok(run("points", "delete", "cli-pts2", "--ids", "5,6", address=a))
    r = json.loads(ok(run("points", "delete", "cli-pts2", "--filter", '{"must": [{"key": "x", "is_null": true}]}',
                          "--json", address=a)))
    assert r["deleted"] == N - 2 and client.count("cli-pts2") == 0


@pytest.mark.parametrize("args,words", [
    (("points", "count", "missing"), "collection 'missing' does not exist"),
    (("points", "count", "cli-pts", "--filter", "{bad"), "--filter '{bad' is not valid JSON"),
    (("points", "count", "cli-pts", "--filter", '{"nope": 1}'), "unknown fields"),
    (("points", "delete", "cli-pts"), "exactly one of --ids or --filter"),
    (("points", "get", "cli-pts", "abc"), "'abc' is not an integer id"),
    (("points", "upsert", "cli-pts", "--vectors", "{d}/wrong.npy"), "dimension"),
    (("points", "upsert", "cli-pts", "--vectors", "{d}/nothere.npy"), "does not exist"),
    (("points", "upsert", "cli-pts", "--vectors", "{d}/p.jsonl"), "is not a readable .npy array"),
    (("points", "upsert", "cli-pts", "--vectors", "{d}/xb.npy", "--payloads", "{d}/xq.npy"), "payloads file"),
    (("points", "upsert", "cli-pts", "--vectors", "{d}/xq.npy", "--ids", "{d}/ids.npy"), "has 30 ids but"),
])
def test_points_errors(server, coll, data, args, words):
    d, _ = data
    one_line_error(run(*(a.replace("{d}", str(d)) for a in args), address=server.address), words)


def test_search(server, coll, data):
    a = server.address
    d, xb = data
    vec = ",".join(str(float(v)) for v in xb[3])
    res = json.loads(ok(run("search", coll, "--vector", vec, "-k", "3", "--payloads", "--json", address=a)))
    assert len(res) == 1 and res[0]["ids"][0] == 103 and res[0]["distances"][0] < 1e-5
    assert res[0]["payloads"][0] == {"i": 3, "even": False} and len(res[0]["ids"]) == 3
    # several queries from a file, filtered, against the exact reference
    res = json.loads(ok(run("search", coll, "--vectors", str(d / "xq.npy"), "-k", "5", "--filter",
                            '{"must": [{"key": "even", "equals": true}]}', "--json", address=a)))
    for q, r in zip(xb[:3], res):
        dist = ((xb[::2] - q) ** 2).sum(1)
        assert r["ids"] == (100 + 2 * np.argsort(dist, kind="stable")[:5]).tolist()
        assert np.allclose(r["distances"], np.sort(dist)[:5], rtol=1e-4, atol=1e-5)
    table = ok(run("search", coll, "--vectors", str(d / "xq.npy"), "-k", "2", "--ef", "16", address=a)).splitlines()
    assert table[0].split() == ["query", "rank", "id", "distance"] and len(table) == 1 + 3 * 2
    assert table[1].split()[:3] == ["0", "1", "100"]


@pytest.mark.parametrize("args,words", [
    (("search", "missing", "--vector", "1,2,3,4"), "collection 'missing' does not exist"),
    (("search", "cli-pts", "--vector", "1,2,3"), "dimension"),
    (("search", "cli-pts", "--vector", "1,x,3,4"), "comma-separated numbers"),
    (("search", "cli-pts", "--vector", "1,2,3,4", "--filter", "[1"), "is not valid JSON"),
    (("search", "cli-pts"), "exactly one of --vector or --vectors"),
    (("search", "cli-pts", "--vector", "1,2,3,4", "-k", "0"), "k"),
])
def test_search_errors(server, coll, args, words):
    one_line_error(run(*args, address=server.address), words)


def test_search_error_as_a_user_sees_it(server, coll):
    r = subprocess.run([sys.executable, "-m", "retrieval", "search", "cli-pts", "--vector", "1,2", "--address",
                        server.address], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "dimension" in r.stderr


def test_jobs(server, client, data):
    a = server.address
    d, _ = data
    kinds = json.loads(ok(run("jobs", "kinds", "--json", address=a)))
    assert "build_index" in {k["name"] for k in kinds}
    assert "build_index" in ok(run("jobs", "kinds", address=a))
    job = client.start_job("build_index", input=str(d / "xb.npy"), collection="cli-job", index="exact")
    r = run("jobs", "watch", job["id"], "--json", address=a)
    final = json.loads(ok(r))
    assert final["state"] == "succeeded" and client.count("cli-job") == N
    assert json.loads(ok(run("jobs", "get", job["id"], address=a)))["state"] == "succeeded"
    rows = json.loads(ok(run("jobs", "list", "--kind", "build_index", "--json", address=a)))
    assert job["id"] in {j["id"] for j in rows}
    table = ok(run("jobs", "list", address=a)).splitlines()
    assert table[0].split()[:4] == ["id", "kind", "state", "progress"] and any(job["id"] in ln for ln in table)
    # cancelling a finished job leaves it as it was
    assert json.loads(ok(run("jobs", "cancel", job["id"], "--json", address=a)))["state"] == "succeeded"


def test_jobs_errors(server):
    one_line_error(run("jobs", "get", "no-such-job", address=server.address), "no-such-job")
    one_line_error(run("jobs", "watch", "no-such-job", address=server.address), "no-such-job")


def test_read_edge_list(tmp_path):
    from retrieval.errors import InvalidArgument

    (tmp_path / "a.csv").write_text("source,target\n0,1\n1,2\n# comment\n\n2,0\n")
    s, t, w = read_edge_list(tmp_path / "a.csv")
    assert s.tolist() == [0, 1, 2] and t.tolist() == [1, 2, 0] and w is None
    (tmp_path / "b.tsv").write_text("0\t1\t0.5\n3\t4\t2\n")
    s, t, w = read_edge_list(tmp_path / "b.tsv", weighted=True, delimiter="\t")
    assert s.tolist() == [0, 3] and w.tolist() == [0.5, 2.0]
    assert read_edge_list(tmp_path / "b.tsv")[2] is None  # an unweighted graph ignores the third column
    (tmp_path / "c.txt").write_text("1 2\n3 4\n")
    assert read_edge_list(tmp_path / "c.txt", header=True)[0].tolist() == [3]  # forced header
    with pytest.raises(InvalidArgument, match="line 1: --no-header"):
        read_edge_list(tmp_path / "a.csv", header=False)
    (tmp_path / "d.csv").write_text("0,1\n1.5,2\n")
    with pytest.raises(InvalidArgument, match="line 2: source id '1.5' is not an integer"):
        read_edge_list(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("0,1\n-1,2\n")
    with pytest.raises(InvalidArgument, match="line 2: source id '-1' is negative"):
        read_edge_list(tmp_path / "e.csv")
    import scipy.io
    import scipy.sparse as sp

    A = sp.coo_matrix(([1, 1, 1, 1], ([0, 1, 1, 2], [1, 0, 2, 1])), shape=(4, 4)).tocsc()
    scipy.io.savemat(tmp_path / "g.mat", {"network": A})
    s, t, w = read_edge_list(tmp_path / "g.mat")
    assert sorted(zip(s.tolist(), t.tolist())) == [(0, 1), (1, 2)] and w is None


def test_graphs(server, client, tmp_path):
    a = server.address
    # a ring of 12 nodes with chords, as CSV with a header
    edges = [(i, (i + 1) % 12) for i in range(12)] + [(i, (i + 5) % 12) for i in range(0, 12, 2)]
    (tmp_path / "ring.csv").write_text("src,dst\n" + "".join(f"{u},{v}\n" for u, v in edges))
    out = json.loads(ok(run("graphs", "import", "ring", str(tmp_path / "ring.csv"), "--batch-size", "5",
                            "--json", address=a)))
    assert out["created"] and out["nodes"] == 12 and out["edges"] == len(edges)
    g = client.describe_graph("ring")
    assert g["n"] == 12 and g["m"] == len(edges)
    assert sorted(client.neighbors("ring", [0])[0][0].tolist()) == [1, 5, 11]
    # appending a TSV without header that names a new node grows the graph
    (tmp_path / "more.tsv").write_text("11\t12\n")
    assert "now 13 nodes" in ok(run("graphs", "import", "ring", str(tmp_path / "more.tsv"), "--no-header",
                                    "--delimiter", "\\t", "-q", address=a))
    assert "created graph g2 (3 nodes)" in ok(run("graphs", "create", "g2", "--nodes", "3", "--directed", address=a))
    table = ok(run("graphs", "list", address=a)).splitlines()
    assert table[0].split()[:3] == ["name", "nodes", "edges"]
    assert any(ln.split()[:3] == ["ring", "13", str(len(edges) + 1)] for ln in table)
    assert json.loads(ok(run("graphs", "describe", "g2", address=a)))["directed"] is True
    assert "dropped g2" in ok(run("graphs", "drop", "g2", "--yes", address=a))
    assert "g2" not in {x["name"] for x in client.list_graphs()}

    text = ok(run("graphs", "fastrp", "ring", "--dim", "8", "--seed", "1", "-q", address=a)).splitlines()
    assert " fastrp succeeded (" in text[0] and text[1].startswith("embedding 'fastrp' of graph 'ring': 13 x 8"), text
    assert text[2] == "params: powers 2-3 flat, beta 0, GDS propagation, dim 8", text
    res = json.loads(ok(run("graphs", "similar", "ring", "0", "3", "-k", "4", "--exact", "--json", address=a)))
    ref = client.similar_nodes("ring", [0, 3], k=4, exact=True)
    assert [r["ids"] for r in res] == [ids.tolist() for ids, _ in ref] and len(res[0]["ids"]) == 4
    table = ok(run("graphs", "similar", "ring", "0", "-k", "2", address=a)).splitlines()
    assert table[0].split() == ["node", "rank", "id", "distance"] and len(table) == 3

    r = json.loads(ok(run("graphs", "train", "ring", "--config", '{"input": "learnable", "epochs": 1, "hidden": 8}',
                          "-q", "--json", address=a)))
    assert r["state"] == "succeeded", r
    # without --json a finished job is a few lines a person reads: what it made and how well
    text = ok(run("jobs", "watch", r["id"], "-q", address=a)).splitlines()
    assert text[0].startswith(f"{r['id']} link_model_train succeeded ("), text
    assert text[1].startswith("model 'ncn' of graph 'ring': best epoch 1 of 1"), text
    assert any(ln.startswith("valid: hits@20 ") for ln in text) and text[-1] == "(--json prints the whole record)"
    res = json.loads(ok(run("graphs", "predict", "ring", "0", "-k", "3", "--candidates", "2,3,4,6,7", "--json",
                            address=a)))
    assert len(res[0]["ids"]) == 3 and set(res[0]["ids"]) <= {2, 3, 4, 6, 7}
    assert all(0 < p < 1 for p in res[0]["probabilities"])

    # a job cancelled from the CLI: watch says so and exits 1
    job = client.train_link_model("ring", config={"input": "learnable", "epochs": 100_000, "hidden": 8}, wait=False)
    assert "cancel requested" in ok(run("jobs", "cancel", job["id"], address=a))
    r = run("jobs", "watch", job["id"], "-q", address=a)
    assert r.exit_code == 1 and "cancelled" in r.stdout, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: job {job['id']} cancelled")


@pytest.mark.parametrize("args,words", [
    (("graphs", "describe", "nope"), "nope"),
    (("graphs", "similar", "nope", "0"), "nope"),
    (("graphs", "import", "gbad", "{d}/bad.csv"), "line 2: source id '1.5' is not an integer"),
    (("graphs", "import", "gbad", "{d}/missing.csv"), "does not exist"),
    (("graphs", "train", "gbad", "--config", "{x"), "--config '{x' is not valid JSON"),
])
def test_graphs_errors(server, tmp_path, args, words):
    (tmp_path / "bad.csv").write_text("0,1\n1.5,2\n")
    one_line_error(run(*(x.replace("{d}", str(tmp_path)) for x in args), address=server.address), words)


def test_drafts(server, client, tmp_path):
    a = server.address
    (tmp_path / "t.ids").write_text("1 2 3 4\n2 3 4 5\n")
    job = json.loads(ok(run("drafts", "build", "cli-ds", str(tmp_path / "t.ids"), "--vocab-size", "7", "-q",
                            "--json", address=a)))
    assert job["state"] == "succeeded" and job["kind"] == "build_datastore", job
    one_line_error(run("drafts", "build", "cli-ds", str(tmp_path / "t.ids"), "--vocab-size", "7", "-q", address=a),
                   "cli-ds")  # exists already, no --overwrite
    ds = json.loads(ok(run("drafts", "list", "--json", address=a)))
    assert [x["name"] for x in ds] == ["cli-ds"] and ds[0]["n_tokens"] == 8
    table = ok(run("drafts", "list", address=a)).splitlines()
    assert table[0].split()[:2] == ["name", "tokens"] and table[1].split()[:2] == ["cli-ds", "8"]
    assert json.loads(ok(run("drafts", "describe", "cli-ds", address=a)))["vocab_size"] == 7
    assert "dropped cli-ds" in ok(run("drafts", "drop", "cli-ds", "-y", address=a))
    assert "no datastores" in ok(run("drafts", "list", address=a))
    one_line_error(run("drafts", "describe", "cli-ds", address=a), "cli-ds")


def test_crossencoder(server, client, tmp_path):
    pytest.importorskip("transformers")
    from tests.crossencoder.conftest import make_tiny_hf_model

    a = server.address
    model = make_tiny_hf_model(tmp_path / "model", seed=0)
    items = [{"id": i, "text": f"answer {i} of the question", "payload": {"n": i}} for i in range(10)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "q.txt").write_text("what is a\nhow to\n\nthe good\n")
    spec = json.dumps({"name": "hf", "model_dir": str(model), "device": "cpu"})
    job = json.loads(ok(run("ce", "build", "cli-ce", "--items", str(tmp_path / "items.jsonl"), "--anchor-queries",
                            str(tmp_path / "q.txt"), "--scorer", spec, "--params", '{"k_i": 2}', "-q", "--json",
                            address=a)))
    assert job["state"] == "succeeded" and job["kind"] == "crossencoder_build", job
    assert client.describe_ce_index("cli-ce")["k_q"] == 3  # the blank line is no query
    one_line_error(run("ce", "build", "cli-x", "--anchor-queries", str(tmp_path / "q.txt"), address=a),
                   "give exactly one of --items")
    one_line_error(run("ce", "build", "cli-x", "--items", str(tmp_path / "q.txt"), "--anchor-queries",
                       str(tmp_path / "q.txt"), address=a), "is not JSON Lines")
    assert "cli-ce" in ok(run("ce", "list", address=a))
    assert json.loads(ok(run("ce", "list", "--json", address=a)))[0]["n_items"] == 10
    assert json.loads(ok(run("ce", "describe", "cli-ce", address=a)))["n_items"] == 10
    res = json.loads(ok(run("ce", "search", "cli-ce", "what is the answer", "how to", "-k", "3", "--payloads",
                            "--json", address=a)))
    ref = client.ce_search("cli-ce", "what is the answer", k=3, with_payloads=True)
    assert len(res) == 2 and res[0]["ids"] == ref["ids"].tolist() and len(res[1]["ids"]) == 3
    assert res[0]["payloads"][0] == {"n": res[0]["ids"][0]}
    table = ok(run("ce", "search", "cli-ce", "how to", "-k", "2", address=a)).splitlines()
    assert table[0].split() == ["query", "rank", "id", "score"] and len(table) == 3
    one_line_error(run("ce", "search", "nope", "q", address=a), "nope")
    assert "dropped cli-ce" in ok(run("ce", "drop", "cli-ce", "--yes", address=a))
    assert "no cross-encoder indexes" in ok(run("ce", "list", address=a))


def test_ground_truth(data, tmp_path):
    d, xb = data
    out = tmp_path / "gt.npy"
    res = json.loads(ok(run("ground-truth", "--base", str(d / "xb.npy"), "--queries", str(d / "xq.npy"),
                            "--out", str(out), "--k", "4", "--device", "cpu", "-q")))
    assert res
    I = np.load(out)
    ref = np.argsort(((xb[None, :3] - xb[:, None]) ** 2).sum(-1).T[:3], axis=1, kind="stable")[:, :4]
    assert I.shape == (3, 4) and (I[:, 0] == [0, 1, 2]).all() and (np.sort(I, 1) == np.sort(ref, 1)).all()
