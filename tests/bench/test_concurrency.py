"""bench.concurrency --quick runs end to end (our server only: no --pg-dsn) and writes sane results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_writes_expected_rows(tmp_path):
    out = tmp_path / "concurrency"
    p = subprocess.run([sys.executable, "-m", "bench.concurrency", "--quick", "--no-progress", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "pgvector peer skipped" in p.stdout
    res = json.loads((out / "concurrency.json").read_text())
    assert (out / "concurrency.png").stat().st_size > 0
    md = (out / "concurrency.md").read_text()
    assert "python -m bench.concurrency --quick" in md and "## Targets" in md
    assert "skipped" in res["pgvector"]
    assert all(r["system"] == "ours" for r in res["runs"])

    def check(r):
        assert r["qps"] > 0, r
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
        assert r["errors"] == {}, r
        assert r["server_cpu_cores"] >= 0, r

    datasets = list(res["settings"]["datasets"])
    search = [r for r in res["runs"] if r["kind"] == "search"]
    assert sorted((r["dataset"], r["clients"]) for r in search) == sorted(
        (d, c) for d in datasets for c in res["settings"]["clients"])
    for r in search:
        check(r)
        assert 0.0 <= r["recall"] <= 1.0 and r["ef"] in res["settings"]["ef_grid"]
    assert sorted(r["threads"] for r in res["runs"] if r["kind"] == "threads") == [1, res["settings"]["threads"]]
    filtered = [r for r in res["runs"] if r["kind"] == "filtered"]
    assert sorted((r["field"], r["selectivity"]) for r in filtered) == sorted(
        (f, s) for f in ("tag", "num") for s in (0.5, 0.1, 0.01, 0.001))
    for r in filtered:
        check(r)
        assert 0.0 <= r["recall"] <= 1.0 and r["matching"] >= 1
        assert r["payload_index"]  # indexed, or the reason it is not
    mixed = {r["writers"]: r for r in res["runs"] if r["kind"] == "mixed"}
    assert sorted(mixed) == [0, res["settings"]["mixed_writers"]]
    for r in mixed.values():
        check(r)
    assert mixed[res["settings"]["mixed_writers"]]["write_ops_per_s"] > 0
    assert res["targets"] and all(t["reached"] in (True, False, None) for t in res["targets"])
