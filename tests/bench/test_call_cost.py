"""bench.call_cost runs end to end on a real server and the floor server, and writes its report."""

import json

from bench.call_cost import main


def test_call_cost_measures_three_setups_and_writes_its_files(tmp_path):
    main(["--calls", "60", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "call_cost.json").read_text())["results"]
    assert set(res) == {"stream", "unary", "floor"}
    for r in res.values():
        assert r["calls"] == 60 and r["qps"] > 0
        # each call costs both processes real CPU (the counters tick at ~1-10 ms, so over 60 calls a few
        # microseconds at least), and no call takes a second of it
        assert 1.0 < r["client_cpu_us"] < 1e6 and 0.0 <= r["server_cpu_us"] < 1e6, r
    md = (tmp_path / "call_cost.md").read_text()
    assert "| ours, Client.search (stream) |" in md and (tmp_path / "call_cost.png").stat().st_size > 1000
