"""The CLI's text summary of a finished job (retrieval/cli_jobs.py) on records of every shape."""

from retrieval.cli_jobs import summary_lines
from retrieval.graph.fastrp import describe_params


def test_fastrp_params_in_words():  # (retrieval.graph.fastrp.describe_params, shown by the CLI and the bench)
    assert describe_params({"iteration_weights": [0, 0, 1, 6.67], "beta": -0.5, "propagate_normalized": False,
                               "dim": 128}) == "weights A^3:1,A^4:6.7, beta -0.5, paper propagation, dim 128"
    assert describe_params({"iteration_weights": [0, 1, 1, 1], "beta": 0}) == "powers 2-4 flat, beta 0, GDS propagation"
    assert describe_params({"iteration_weights": [0, 0, 2.0], "property_ratio": 0.5}).startswith(
        "power 3, beta 0, GDS propagation, property_ratio 0.5")
    assert describe_params({"iteration_weights": []}).startswith("no iteration weights")
    assert describe_params({"iteration_weights": [0, 1], "whiten": 0.5}) == "power 2, beta 0, GDS propagation, whiten 0.5"
    assert describe_params({}) == "powers 2-3 flat, beta 0, GDS propagation"  # the defaults


def test_generic_and_malformed_results():
    long = "x" * 500
    j = {"id": "j1", "kind": "build_index", "state": "succeeded", "started_at": 10.0, "finished_at": 12.5,
         "result": {"collection": "docs", "count": 3, "stats": {"a": [1, 2]}, "note": long}}
    lines = summary_lines(j)
    assert lines[0] == "j1 build_index succeeded (2.5 s)"
    assert lines[1:4] == ["collection: docs", "count: 3", 'stats: {"a": [1, 2]}']
    assert lines[4].startswith("note: xxx") and lines[4].endswith("...") and len(lines[4]) <= 160
    # a fastrp result missing the fields its summary reads falls back to the generic lines, not a crash
    odd = {"id": "j2", "kind": "fastrp", "state": "succeeded", "result": {"graph": "g"}}
    assert summary_lines(odd)[1] == "graph: g"
    # no result (failed, cancelled): the one line; no times: no seconds
    assert summary_lines({"id": "j3", "kind": "fastrp", "state": "failed", "result": {}}) == ["j3 fastrp failed"]
