"""The CLI's graph commands added with the import job: ``graphs import --on-server``, ``graphs
embeddings`` and ``collections list --all``, against a real loopback server (tests/conftest.py's)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.graph.store import GraphStore

from .conftest import DATA


def run(*args, address):
    return CliRunner().invoke(app, [*args, "--address", address])


def ok(r):
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r.stdout


def one_line_error(r, words):
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.stdout, r.stderr, r.exception)
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and words in err, err


def test_import_on_server_embeddings_and_internal_collections(server, client, tmp_path):
    a = server.address
    out = json.loads(ok(run("graphs", "import", "cli-cora", str(DATA / "cora"), "--on-server", "--format",
                            "planetoid", "-q", "--json", address=a)))
    assert out["state"] == "succeeded" and out["kind"] == "import_graph", out
    assert (out["result"]["n"], out["result"]["m"]) == (2708, 5278) and out["result"]["features"]
    (tmp_path / "t.tsv").write_text("0\t2708\n2708\t2708\n")  # grows the graph; the self-loop is rejected
    r = run("graphs", "import", "cli-cora", str(tmp_path / "t.tsv"), "--on-server", "--no-header",
            "--self-loops", "reject", "-q", address=a)
    assert r.exit_code == 1 and "self-loop" in r.stderr and "failed" in r.stderr, (r.stdout, r.stderr)
    assert client.describe_graph("cli-cora")["n"] == 2708  # a failed import stores nothing, not even nodes
    r = ok(run("graphs", "import", "cli-cora", str(tmp_path / "t.tsv"), "--on-server", "--no-header", "-q",
               address=a))
    assert "succeeded" in r and client.describe_graph("cli-cora")["n"] == 2709

    assert json.loads(ok(run("graphs", "fastrp", "cli-cora", "--dim", "8", "-q", "--json", address=a)))["state"] \
        == "succeeded"
    tuned = json.loads(ok(run("graphs", "fastrp", "cli-cora", "--dim", "8", "--embedding", "tuned", "--tune-option",
                              "max_power=4", "--tune-option", "dims=[8]", "-q", "--json", address=a)))
    assert tuned["state"] == "succeeded" and len(tuned["result"]["params"]["iteration_weights"]) <= 4, tuned
    assert "tuning" in tuned["result"]
    for bad, said in (("maxpower=4", "unknown tune_options"), ("max_power", "KEY=VALUE"),
                      ("max_power=abc", "max_power must be")):
        r = run("graphs", "fastrp", "cli-cora", "--dim", "8", "--tune-option", bad, "-q", address=a)
        assert r.exit_code == 1 and said in r.stderr, (bad, r.stdout, r.stderr)
    assert "wrote 2709 x 8 float32 embeddings" in ok(run("graphs", "embeddings", "cli-cora",
                                                         str(tmp_path / "e.npy"), address=a))
    X = np.load(tmp_path / "e.npy")
    stored, meta = GraphStore(server.data_dir / "graphs").load_embeddings("cli-cora", "fastrp")
    assert X.dtype == np.float32 and np.array_equal(X, stored)
    ok(run("graphs", "embeddings", "cli-cora", str(tmp_path / "s.npy"), "--nodes", "7,0", address=a))
    assert np.array_equal(np.load(tmp_path / "s.npy"), stored[[7, 0]])

    # the FastRP collection is internal: `collections list` hides it, `--all` shows it
    assert meta["collection"] not in ok(run("collections", "list", address=a))
    assert meta["collection"] in ok(run("collections", "list", "--all", address=a))


def test_errors(server, tmp_path):
    a = server.address
    one_line_error(run("graphs", "import", "cli-x", "/etc/hostname", "--on-server", address=a),
                   "outside the folders")
    one_line_error(run("graphs", "import", "cli-x", str(tmp_path / "none.csv"), "--on-server", address=a),
                   "does not exist")
    one_line_error(run("graphs", "embeddings", "nope", str(tmp_path / "e.npy"), address=a), "nope")
    one_line_error(run("graphs", "embeddings", "nope", str(tmp_path / "e.npy"), "--nodes", "1.5", address=a),
                   "1.5")
