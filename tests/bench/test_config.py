"""Sweep configuration: grids, lists, YAML checks."""

from __future__ import annotations

import pytest

from bench.ann import config
from retrieval.errors import InvalidArgument, NotFound


def test_grid_and_list_expansion():
    assert config.expand({"M": [8, 16], "ef_construction": 200}, "b") == [
        {"M": 8, "ef_construction": 200},
        {"M": 16, "ef_construction": 200},
    ]
    assert config.expand([{"nlist": 10}, {"nlist": [20, 40]}], "b") == [{"nlist": 10}, {"nlist": 20}, {"nlist": 40}]
    with pytest.raises(InvalidArgument, match="empty list"):
        config.expand({"ef": []}, "q")
    with pytest.raises(InvalidArgument, match=r"q\[1\] must be a mapping"):
        config.expand([{"ef": 1}, 3], "q")


def test_sweeps_use_config_then_defaults():
    sw = config.sweeps(["hnswlib", "faiss-ivf-flat"], {"hnswlib": {"query": {"ef": [5, 50]}}})
    assert sw[0].build == [{"M": 16, "ef_construction": 200}] and sw[0].query == [{"ef": 5}, {"ef": 50}]
    assert sw[1].query[0] == {"nprobe": 1}
    with pytest.raises(InvalidArgument, match="keys 'build' and/or 'query'"):
        config.sweeps(["hnswlib"], {"hnswlib": {"search": {}}})
    with pytest.raises(InvalidArgument, match="unknown algorithm"):
        config.sweeps(["nope"], None)


def test_yaml_checks(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("k: 5\nalgorithms:\n  hnswlib:\n    query: {ef: [10]}\n")
    assert config.load_yaml(p)["k"] == 5
    p.write_text("kk: 5\n")
    with pytest.raises(InvalidArgument, match=r"unknown keys \['kk'\]"):
        config.load_yaml(p)
    p.write_text("k: [unclosed\n")
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        config.load_yaml(p)
    with pytest.raises(NotFound):
        config.load_yaml(tmp_path / "missing.yaml")
