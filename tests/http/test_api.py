"""The HTTP API over a real loopback port, congruent with gRPC: the same operations through both give
the same results (collections, points, search, jobs, graphs, drafts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import NotFound
from tests.http.conftest import ensure_engines, slow_build_input, slow_job_params

D = 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xb = rng.random((300, D), dtype=np.float32)
    payloads = [{"lang": "en" if i % 3 else "de", "year": 2000 + i % 25, "tags": ["a", "b"][: i % 3]}
                for i in range(300)]
    return xb, payloads


@pytest.fixture(scope="module")
def twins(http, grpc_client, data):
    """Collection ``h`` written over HTTP and ``g`` written over gRPC, with the same points."""
    xb, payloads = data
    for name in ("h", "g"):
        if name in [c["name"] for c in grpc_client.list_collections()]:
            grpc_client.drop_collection(name)
    r = http.post("/v1/collections", json={"name": "h", "dimension": D, "metric": "l2",
                                          "index": {"type": "hnsw", "m": 16, "ef_construction": 100}})
    assert r.status_code == 201, r.text
    grpc_client.create_collection("g", dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 100})
    for s in range(0, 300, 100):
        r = http.put("/v1/collections/h/points", json={"ids": list(range(s, s + 100)), "vectors": xb[s:s + 100].tolist(),
                                                      "payloads": payloads[s:s + 100]})
        assert r.status_code == 200 and r.json()["count"] == 100, r.text
    grpc_client.upsert("g", ids=np.arange(300), vectors=xb, payloads=payloads)
    return "h", "g"


def test_setting_and_error_table():
    import grpc

    from retrieval.config import Settings, load_settings
    from retrieval.http.errors import HTTP_STATUS

    assert Settings().http_port is None  # off by default
    assert load_settings(http_port=0).http_port == 0
    assert set(HTTP_STATUS) == set(grpc.StatusCode)  # every code has its HTTP status, in one table
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED] == 403 and HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401


def test_health_docs_and_request_ids(http):
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "SERVING"
    assert r.json()["services"]["retrieval.v1.Search"] == "SERVING"
    spec = http.get("/openapi.json").json()
    for path in ("/v1/collections", "/v1/collections/{name}/search", "/v1/collections/{name}/points",
                 "/v1/jobs/{job_id}/events", "/v1/graphs/{graph}/similar", "/v1/crossencoder/{index}/search",
                 "/v1/drafts"):
        assert path in spec["paths"], path
    assert "swagger" in http.get("/docs").text.lower()
    r = http.get("/v1/collections", headers={"x-request-id": "my-request-1"})
    assert r.headers["x-request-id"] == "my-request-1"
    assert http.get("/v1/collections").headers["x-request-id"]  # generated when not given


def test_collections_congruent(http, grpc_client, twins):
    h = http.get("/v1/collections/h").json()
    g = grpc_client.describe_collection("g")
    for key in ("dimension", "metric", "points", "shards"):
        assert h[key] == g[key], key
    assert h["index"] == {"type": "hnsw", "m": 16, "ef_construction": 100}
    names = [c["name"] for c in http.get("/v1/collections").json()["collections"]]
    assert {"h", "g"} <= set(names)
    assert grpc_client.describe_collection("h")["points"] == 300  # HTTP writes are seen over gRPC


def test_search_congruent(http, grpc_client, twins, data):
    xb, _ = data
    flt = {"must": [{"key": "lang", "equals": "de"}, {"key": "year", "range": {"gte": 2005, "lt": 2020}}]}
    for q in (xb[3], xb[100] + 0.01):
        for name in twins:  # same points written either way: the same answers, through either API
            hits = grpc_client.search(name, q, k=7, ef=64, with_payloads=True)
            r = http.post(f"/v1/collections/{name}/search", json={"vector": q.tolist(), "k": 7, "ef": 64,
                                                                   "with_payloads": True})
            assert r.status_code == 200, r.text
            got = r.json()["hits"]
            assert [x["id"] for x in got] == hits.ids.tolist()
            assert np.array_equal(np.float32([x["distance"] for x in got]), hits.distances)
            assert [x["payload"] for x in got] == hits.payloads
        fh = grpc_client.search("g", q, k=5, filter=flt, with_payloads=True)
        r = http.post("/v1/collections/h/search", json={"vector": q.tolist(), "k": 5, "filter": flt,
                                                        "with_payloads": True}).json()["hits"]
        assert [x["id"] for x in r] == fh.ids.tolist() and all(p["lang"] == "de" for p in fh.payloads)
    D_, I_ = grpc_client.search_batch("g", xb[:20], k=4, exact=True)
    res = http.post("/v1/collections/h/search", json={"vectors": xb[:20].tolist(), "k": 4, "exact": True}).json()
    assert [[x["id"] for x in row["hits"]] for row in res["results"]] == I_.tolist()
    assert np.allclose([[x["distance"] for x in row["hits"]] for row in res["results"]], D_)


def test_points_congruent(http, grpc_client, twins, data):
    xb, payloads = data
    r = http.post("/v1/collections/h/points/get", json={"ids": [5, 6, 999], "with_vectors": True}).json()["points"]
    p = grpc_client.get("g", [5, 6, 999])
    assert [x["id"] for x in r] == p.ids.tolist() == [5, 6]
    assert np.array_equal(np.float32([x["vector"] for x in r]), p.vectors)
    assert [x["payload"] for x in r] == p.payloads == payloads[5:7]
    flt = {"must": [{"key": "tags", "any_of": ["b"]}]}
    assert http.post("/v1/collections/h/points/count", json={"filter": flt}).json()["count"] == \
        grpc_client.count("g", filter=flt) == 100
    assert http.post("/v1/collections/h/points/count", json={}).json()["count"] == 300
    page = http.post("/v1/collections/h/points/scroll", json={"filter": flt, "limit": 10, "start_id": 20}).json()
    gp = grpc_client.scroll("g", filter=flt, limit=10, start_id=20)
    assert [x["id"] for x in page["points"]] == gp.ids.tolist() and page["next_id"] == gp.next_id
    # deletes by ids and by filter, through both
    assert http.post("/v1/collections/h/points/delete", json={"ids": [0, 1, 2]}).json()["count"] == 3
    assert grpc_client.delete("g", ids=[0, 1, 2]) == 3
    old = {"must": [{"key": "year", "range": {"lt": 2002}}]}
    assert http.post("/v1/collections/h/points/delete", json={"filter": old}).json()["count"] == \
        grpc_client.delete("g", filter=old)
    assert grpc_client.count("h") == grpc_client.count("g") == http.post("/v1/collections/g/points/count").json()["count"]
    r = http.post("/v1/collections/h/search", json={"vector": xb[1].tolist(), "k": 3}).json()["hits"]
    assert 1 not in [x["id"] for x in r]


def test_create_and_drop(http, grpc_client):
    r = http.post("/v1/collections", json={"name": "tmp1", "dimension": 4, "metric": "cosine", "index": "exact"})
    assert r.status_code == 201 and r.json()["index"] == {"type": "exact"}
    r = http.post("/v1/collections", json={"name": "tmp1", "dimension": 4})
    assert r.status_code == 409 and r.json()["error"]["code"] == "ALREADY_EXISTS"
    assert "tmp1" in r.json()["error"]["message"]
    assert http.delete("/v1/collections/tmp1").json() == {"dropped": "tmp1"}
    r = http.get("/v1/collections/tmp1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    with pytest.raises(NotFound) as e:
        grpc_client.describe_collection("tmp1")
    assert str(e.value) == r.json()["error"]["message"]  # the same sentence through both


def test_payload_indexes_listed(http, grpc_client, twins):
    grpc_client.create_payload_index("h", "lang", "keyword")
    r = http.get("/v1/collections/h/payload-indexes").json()["payload_indexes"]
    assert r == grpc_client.list_payload_indexes("h")
    assert http.get("/v1/collections/h").json()["payload_indexes"][0]["key"] == "lang"


def _events(http, job_id, until=None):
    """Records of a job's event stream (all, or until ``until(record)`` is true)."""
    out = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if until is not None and until(out[-1]):
                    break
    return out


def test_jobs_list_get_stream_cancel(http, grpc_client, hserver, tmp_path_factory):
    folder = hserver.data_dir.parent  # inside the folders clients may name (conftest)
    path = slow_build_input(folder)
    r = http.post("/v1/jobs", json={"kind": "build_index", "params": slow_job_params(path, "slow")})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "build_index" and job["state"] in ("queued", "running")
    seen = _events(http, job["id"], until=lambda rec: rec["state"] == "running" and rec["done"] > 0)
    assert seen[-1]["done"] > 0 and seen[-1]["total"] == 20_000
    assert http.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert job["id"] in [j["id"] for j in http.get("/v1/jobs", params={"kind": "build_index"}).json()["jobs"]]
    assert http.get("/v1/jobs", params={"kind": "fastrp"}).json()["jobs"] == [] or all(
        j["kind"] == "fastrp" for j in http.get("/v1/jobs", params={"kind": "fastrp"}).json()["jobs"])
    r = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    rest = _events(http, job["id"])  # the stream ends with the final record
    assert rest[-1]["state"] == "cancelled"
    assert grpc_client.get_job(job["id"])["state"] == "cancelled"
    assert "build_index" in [k["name"] for k in http.get("/v1/jobs/kinds").json()["kinds"]]
    r = http.get("/v1/jobs/nope/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def test_graphs_congruent(http, grpc_client):
    rng = np.random.default_rng(1)
    src, dst = rng.integers(0, 60, 400), rng.integers(0, 60, 400)
    grpc_client.create_graph("g1", 60)
    grpc_client.append_edges("g1", src, dst)
    grpc_client.run_fastrp("g1", dim=16, progress=False)
    listed = http.get("/v1/graphs").json()["graphs"]
    assert [g["name"] for g in listed] == ["g1"]
    assert http.get("/v1/graphs/g1").json() == json.loads(json.dumps(grpc_client.describe_graph("g1")))
    r = http.post("/v1/graphs/g1/similar", json={"nodes": [0, 5], "k": 4}).json()["results"]
    want = grpc_client.similar_nodes("g1", [0, 5], k=4)
    assert [x["ids"] for x in r] == [ids.tolist() for ids, _ in want]
    assert np.allclose([x["distances"] for x in r], [d for _, d in want])
    r = http.post("/v1/graphs/g1/similar", json={"nodes": [1000]})
    assert r.status_code == 400 and "outside the graph" in r.json()["error"]["message"]
    assert http.get("/v1/graphs/missing").status_code == 404
    r = http.post("/v1/graphs/g1/score-links", json={"src": [0], "dst": [1]})
    assert r.status_code == 404 and "ncn" in r.json()["error"]["message"]  # no model trained


def test_crossencoder_and_drafts_views(http, grpc_client):
    assert http.get("/v1/crossencoder").json() == {"indexes": []}
    r = http.get("/v1/crossencoder/none")
    assert r.status_code == 404
    with pytest.raises(NotFound) as e:
        grpc_client.describe_ce_index("none")
    assert r.json()["error"]["message"] == str(e.value)
    r = http.post("/v1/crossencoder/none/search", json={"query": "x", "k": 3})
    assert r.status_code == 404
    assert http.get("/v1/datastores").json() == {"datastores": []}
    assert http.get("/v1/datastores/none").status_code == 404
    ctx = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
    d = http.post("/v1/drafts", json={"context_ids": ctx, "vocab_size": 100, "sources": ["context"]})
    assert d.status_code == 200, d.text
    want = grpc_client.draft(ctx, 100, sources=["context"])
    assert d.json()["tokens"] == want.tokens.tolist() and d.json()["parents"] == want.parents.tolist()
    assert d.json()["tokens"][:1] == [4]  # prompt lookup continues the repeated pattern


def test_datastore_congruent(http, grpc_client, hserver):
    ensure_engines(grpc_client, hserver.data_dir.parent, crossencoder=False)
    ds = http.get("/v1/datastores/webds").json()
    want = grpc_client.describe_datastore("webds")
    assert ds["n_tokens"] == want["n_tokens"] == 14 and ds["n_docs"] == want["n_docs"] == 3
    assert [d["name"] for d in http.get("/v1/datastores").json()["datastores"]] == ["webds"]
    body = {"context_ids": [6, 1, 2], "vocab_size": 7, "datastore": "webds", "sources": ["corpus"], "max_nodes": 8}
    d = http.post("/v1/drafts", json=body)
    assert d.status_code == 200, d.text
    ref = grpc_client.draft([6, 1, 2], 7, datastore="webds", sources=["corpus"], max_nodes=8)
    assert d.json()["tokens"] == ref.tokens.tolist() and d.json()["parents"] == ref.parents.tolist()
    assert 3 in d.json()["tokens"]  # the corpus continues 1 2 with 3


@pytest.mark.slow  # builds a cross-encoder index with a tiny local model (about 10 s)
def test_crossencoder_congruent(http, grpc_client, hserver):
    ce = ensure_engines(grpc_client, hserver.data_dir.parent)
    if ce is None:
        pytest.skip("transformers is not installed: no cross-encoder index to compare")
    info = http.get(f"/v1/crossencoder/{ce}").json()
    assert info == json.loads(json.dumps(grpc_client.describe_ce_index(ce)))
    assert info["n_items"] == 10
    r = http.post(f"/v1/crossencoder/{ce}/search", json={"query": "what is the answer", "k": 3, "with_payloads": True})
    assert r.status_code == 200, r.text
    ref = grpc_client.ce_search(ce, "what is the answer", k=3, with_payloads=True)
    assert r.json()["ids"] == ref["ids"].tolist() and r.json()["payloads"] == ref["payloads"]
    assert np.allclose(r.json()["scores"], ref["scores"]) and r.json()["calls"] == ref["calls"]
    rb = http.post(f"/v1/crossencoder/{ce}/search", json={"queries": ["how to", "the good"], "k": 2}).json()["results"]
    refb = grpc_client.ce_search_batch(ce, ["how to", "the good"], k=2)
    assert [x["ids"] for x in rb] == [x["ids"].tolist() for x in refb]
    r = http.post(f"/v1/crossencoder/{ce}/search", json={"query": "x", "budget": 0})
    assert r.status_code == 400 and "budget" in r.json()["error"]["message"]


def test_metrics_count_http_calls(http):
    before = _requests(http.get("/v1/metrics").text, "Collections", "List")
    for _ in range(3):
        http.get("/v1/collections")
    text = http.get("/v1/metrics").text
    assert _requests(text, "Collections", "List") == before + 3
    assert 'retrieval_http_requests_total{route="/v1/collections",status="200"}' in text
    st = http.get("/v1/status").json()
    assert st["status"] == "SERVING" and st["inflight"]["unary"] == 0


def _requests(text: str, service: str, method: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("retrieval_requests_total{") and f'service="retrieval.v1.{service}"' in line \
                and f'method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
