"""bench.grpc_floor runs (it is part of bench.service_speed's report) and measures real round trips."""

from bench.grpc_floor import measure


def test_floor_measures_both_paths():
    r = measure(n=50)
    assert r["n"] == 50
    for key in ("stream_p50_us", "stream_p99_us", "unary_p50_us", "unary_p99_us"):
        assert 1.0 < r[key] < 1e6, (key, r[key])  # a loopback round trip: microseconds to milliseconds
    assert r["stream_p50_us"] <= r["stream_p99_us"] and r["unary_p50_us"] <= r["unary_p99_us"]
