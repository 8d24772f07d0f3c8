"""bench.grpc_floor runs (it is part of bench.service_speed's report) and measures real round trips."""

from bench.grpc_floor import measure


def test_floor_measures_both_paths():
    r = measure(n=50)
    assert r["n"] == 50
    for key in ("stream_p50_us", "stream_p99_us", "unary_p50_us", "unary_p99_us"):
        # a loopback round trip through grpc's Python stack: tens of microseconds at least (the C core
        # alone takes ~10 us), and well under the 20 ms of a round trip that went anywhere but loopback
        # (p99 on a loaded 2-core machine included)
        assert 10.0 < r[key] < 20_000.0, (key, r[key])
    assert r["stream_p50_us"] <= r["stream_p99_us"] and r["unary_p50_us"] <= r["unary_p99_us"]
