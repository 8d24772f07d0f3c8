"""A tiny real run of ``python -m bench.ann``: two algorithms on a BIGANN subset, all outputs written."""

from __future__ import annotations

import json

from bench.ann.__main__ import main


def test_tiny_run_writes_json_markdown_png(tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("algorithms:\n  hnswlib:\n    build: {M: 8, ef_construction: 64}\n    query: {ef: [10, 40]}\n")
    rc = main([
        "--dataset", "bigann-10k", "--max-n", "2000", "--max-queries", "50",
        "--algorithms", "hnswlib,exact-numpy", "--config", str(cfg), "--k", "10",
        "--runs", "1", "--batch-size", "16", "--out", str(tmp_path / "out"), "--no-progress",
    ])
    assert rc == 0
    stem = "bigann-10k-q50-n2000"
    doc = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    rows = doc["results"]
    assert [r["algorithm"] for r in rows] == ["hnswlib", "hnswlib", "exact-numpy"]
    assert all("error" not in r for r in rows)
    exact = rows[2]
    assert exact["recall"] == 1.0 and exact["recall_batch"] == 1.0 and exact["recall_ids"] == 1.0
    assert rows[0]["query"] == {"ef": 10} and rows[1]["query"] == {"ef": 40}
    assert 0.5 < rows[0]["recall"] <= rows[1]["recall"] <= 1.0 and rows[1]["recall"] >= 0.95
    for r in rows:
        assert r["qps_single"] > 0 and r["qps_batch"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert r["batch_size"] == 16 and r["index_bytes"] > 0
    assert doc["dataset"]["n"] == 2000 and doc["dataset"]["nq"] == 50
    assert doc["machine"]["logical_cpus"] >= 1 and "numpy" in doc["versions"]
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "| hnswlib | M=8, ef_construction=64 | ef=40 |" in md and "vs hnswlib" in md
    png = (tmp_path / "out" / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "exact-numpy" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main(["--dataset", "nope", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["--algorithms", "annoy", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown algorithm 'annoy'; valid: " in capsys.readouterr().err
