"""Observability: Prometheus metrics per RPC (every service, from the interceptor), state gauges, the
registry API for services, JSON logs carrying request ids, and `retrieval status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from retrieval import errors
from retrieval.client import Client
from retrieval.server import metrics
from retrieval.server.process import ServerProcess
from tests.server.rpc import hosted_rpcs, raw_call


def _scrape(url: str) -> dict:
    """{(name, frozenset(labels)): value}"""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(page: dict, name: str, **labels) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def test_registry_api_for_services():
    g = metrics.gauge("retrieval_test_widgets", "widgets", ("kind",))
    assert metrics.gauge("retrieval_test_widgets", "widgets", ("kind",)) is g  # get-or-create
    g.labels("a").set(3)
    seen = []
    fn = lambda: seen.append(1) or g.labels("b").set(len(seen))  # noqa: E731
    metrics.add_refresher(fn)
    import asyncio

    asyncio.run(metrics.refresh())
    metrics.remove_refresher(fn)
    page = metrics.render()
    assert 'retrieval_test_widgets{kind="a"} 3.0' in page and 'retrieval_test_widgets{kind="b"} 1.0' in page
    with pytest.raises(ValueError, match="already exists"):
        metrics.counter("retrieval_test_widgets", "x")


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("metrics") / "data",
                        args=["--metrics-port", "0", "--log-format", "json", "--access-log"])
    srv.start()
    m = re.search(r"metrics on (\S+)", srv.log_path.read_text())
    assert m, srv.log_tail()
    yield srv, m.group(1)
    srv.stop()


def test_every_rpc_is_counted_with_latency_and_errors(observed):
    srv, url = observed
    rng = np.random.default_rng(0)
    x = rng.random((50, 8), dtype=np.float32)
    with Client(srv.address) as c:
        c.create_collection("obs", 8)
        c.upsert("obs", np.arange(50), x)
        for i in range(5):
            c.search("obs", x[i], k=3)
        c.search_batch("obs", x[:4], k=3)
        with pytest.raises(errors.NotFound):
            c.count("missing")
        c.list_jobs()
        time.sleep(metrics.REFRESH_S + 0.5)
        page = _scrape(url)
    hosted = hosted_rpcs(srv.address)
    with grpc.insecure_channel(srv.address) as ch:  # every RPC of every service, once, with an empty request
        for rpc in hosted:
            raw_call(ch, rpc, [b""])
    page2 = _scrape(url)
    assert _value(page, "retrieval_requests_total", service="retrieval.v1.Points", method="Upsert", code="OK") == 1
    assert _value(page, "retrieval_requests_total", service="retrieval.v1.Points", method="Count", code="NOT_FOUND") == 1
    assert _value(page, "retrieval_request_errors_total", service="retrieval.v1.Points", method="Count",
                  code="NOT_FOUND") == 1
    assert _value(page, "retrieval_request_duration_seconds_count", service="retrieval.v1.Search",
                  method="SearchBatch") == 1
    # the five single searches went over one bidirectional stream: per-message latency
    assert _value(page, "retrieval_stream_message_duration_seconds_count", service="retrieval.v1.Search",
                  method="SearchStream") == 5
    assert _value(page, "retrieval_open_streams", service="retrieval.v1.Search", method="SearchStream") == 1  # open
    # state gauges
    assert _value(page, "retrieval_collection_points", collection="obs") == 50
    assert _value(page, "retrieval_collection_ready", collection="obs") in (0.0, 1.0)
    assert ("retrieval_jobs", frozenset({("state", "running")})) in page
    assert _value(page, "retrieval_inflight", kind="unary") >= 0
    for rpc in hosted:
        total = sum(v for (name, labels), v in page2.items() if name == "retrieval_requests_total"
                    and ("service", rpc.service) in labels and ("method", rpc.name) in labels)
        assert total >= 1, f"{rpc} is not counted"


def test_json_logs_carry_the_request_id(observed):
    srv, _ = observed
    with grpc.insecure_channel(srv.address) as ch:
        describe = ch.unary_unary("/retrieval.v1.Collections/Describe")
        with pytest.raises(grpc.RpcError) as e:
            describe(b"\x0a\x07nothere", metadata=(("x-request-id", "req-42-abc"),), timeout=10)
    assert dict(e.value.trailing_metadata())["x-request-id"] == "req-42-abc"
    time.sleep(0.3)
    records = []
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every server log line is one JSON object
    mine = [r for r in records if r.get("request_id") == "req-42-abc"]
    assert mine, "no log record with the request id"
    access = [r for r in mine if r.get("code") == "NOT_FOUND"]
    assert access and access[-1]["rpc"] == "/retrieval.v1.Collections/Describe" and "duration_ms" in access[-1]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_status_command(observed):
    srv, url = observed
    with Client(srv.address) as c:
        if "obs" not in [col["name"] for col in c.list_collections()]:
            c.create_collection("obs", 8)
    r = subprocess.run([sys.executable, "-m", "retrieval", "status", "--address", srv.address,
                        "--metrics-url", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"server {srv.address}: SERVING" in out
    for svc in ("retrieval.v1.Collections", "retrieval.v1.Points", "retrieval.v1.Search", "retrieval.v1.Jobs"):
        assert re.search(rf"{re.escape(svc)}\s+SERVING", out)
    assert re.search(r"obs\s+8\s+l2\s+hnsw", out)
    assert "jobs:" in out and "requests (since start)" in out and "p99 ms" in out
    js = subprocess.run([sys.executable, "-m", "retrieval", "status", "--address", srv.address, "--json",
                         "--metrics-url", url], capture_output=True, text=True, timeout=120)
    st = json.loads(js.stdout)
    assert st["health"] == "SERVING" and any(c["name"] == "obs" for c in st["collections"])
    assert st["metrics"]["rpcs"]["retrieval.v1.Collections/List"]["requests"] >= 1
    down = subprocess.run([sys.executable, "-m", "retrieval", "status", "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "unreachable" in down.stdout


def test_collections_by_state_count_the_quarantined_and_unavailable(tmp_path):
    """Collections the server holds but does not serve are counted (and named) on the metrics page."""
    data = tmp_path / "data"
    cols = data / "collections"
    # "bad": the last start died of a native abort while it was being opened, so it is quarantined (the
    # server does not open it: its settings and the marker are all it reads)
    (cols / "bad").mkdir(parents=True)
    (cols / "bad" / "collection.json").write_text(json.dumps({"name": "bad", "dimension": 4, "metric": "l2",
                                                              "index": {"type": "exact"}, "shards": 1}))
    (cols / "bad" / ".opening").write_text(json.dumps({"deaths": 0, "pid": 1, "at": 0}))
    (data / ".fatal-error").write_text("Fatal Python error: Aborted\n\nCurrent thread 0x1 (most recent call "
                                       "first):\n  File \"/x/retrieval/vectors/shard.py\", line 1 in _indexer\n")
    # "broken": its settings cannot be read, so it is unavailable (retried in the background)
    (cols / "broken").mkdir()
    (cols / "broken" / "collection.json").write_text("{not json")
    srv = ServerProcess(data, args=["--metrics-port", "0"], log_path=tmp_path / "server.log")
    srv.start()
    try:
        url = re.search(r"metrics on (\S+)", srv.log_path.read_text()).group(1)
        with Client(srv.address, timeout=60) as c:
            c.create_collection("good", 4, index="exact")
            c.upsert("good", np.arange(3), np.eye(3, 4, dtype=np.float32))
            states = {col["name"]: col["state"] for col in c.list_collections()}
        assert states["bad"] == "quarantined" and states["broken"] == "unavailable", states
        page = _scrape(url)
        for _ in range(50):  # the gauges are rebuilt every REFRESH_S
            if _value(page, "retrieval_collections", state="served") == 1:
                break
            time.sleep(0.2)
            page = _scrape(url)
        assert _value(page, "retrieval_collections", state="served") == 1
        assert _value(page, "retrieval_collections", state="quarantined") == 1
        assert _value(page, "retrieval_collections", state="unavailable") == 1
        assert _value(page, "retrieval_collection_unserved", collection="bad", state="quarantined") == 1
        assert _value(page, "retrieval_collection_unserved", collection="broken", state="unavailable") == 1
        assert not [k for k in page if k[0] == "retrieval_collection_unserved" and ("collection", "good") in k[1]]
        assert _value(page, "retrieval_collection_points", collection="good") == 3
    finally:
        srv.stop()
