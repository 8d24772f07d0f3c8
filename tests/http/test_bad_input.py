"""Bad input over HTTP: wrong types, NaN and infinity (as JSON tokens and as strings), huge bodies,
unknown fields, malformed JSON, unknown routes -> a 4xx with a sentence, never a 500; and the server
keeps serving."""

from __future__ import annotations

import pytest

from tests.http.conftest import MAX_BODY


@pytest.fixture(scope="module")
def col(http):
    http.delete("/v1/collections/bad")
    assert http.post("/v1/collections", json={"name": "bad", "dimension": 3}).status_code == 201
    assert http.put("/v1/collections/bad/points", json={"ids": [1, 2], "vectors": [[1, 0, 0], [0, 1, 0]]}).status_code == 200
    return "bad"


def _err(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["message"] and body["request_id"] == r.headers["x-request-id"]
    for w in words:
        assert w in body["message"], (w, body["message"])
    return body["message"]


RAW_BAD = [
    # (route, body text, words the sentence must hold)
    ("/v1/collections/bad/search", '{"vector": [NaN, 0, 0], "k": 1}', ["NaN or infinity"]),
    ("/v1/collections/bad/search", '{"vector": [Infinity, 0, 0], "k": 1}', ["NaN or infinity"]),
    ("/v1/collections/bad/search", '{"vector": [1e39, 0, 0], "k": 1}', ["NaN or infinity"]),
    ("/v1/collections/bad/search", '{"vector": ["NaN", 0, 0], "k": 1}', ["vector.0", "number", "'NaN'"]),
    ("/v1/collections/bad/search", '{"vector": ["1.5", 0, 0], "k": 1}', ["vector.0", "number"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "k": "10"}', ["k", "integer"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "k": 1.5}', ["k", "integer"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "k": -1}', ["k must be"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "k": true}', ["k", "integer"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "colour": "red"}', ["unknown field", "colour"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0], "k": 1}', ["dimension", "3"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "vectors": [[1, 0, 0]]}', ["exactly one"]),
    ("/v1/collections/bad/search", '{"k": 1}', ["exactly one"]),
    ("/v1/collections/bad/search", '{"vectors": [[1, 0, 0], [1, 0]]}', ["same length"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "filter": {"must": [{"key": "a"}]}}', ["filter"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "filter": {"nope": []}}', ["unknown fields"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "filter": "lang = en"}', ["filter"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0], "k": 100000}', ["k = 100000", "limit"]),
    ("/v1/collections/bad/search", '{"vector": [1, 0, 0', ["not valid JSON"]),
    ("/v1/collections/bad/search", '[1, 2, 3]', ["body"]),
    ("/v1/collections/bad/search", '', ["body"]),
    ("/v1/collections/bad/points/get", '{"ids": [-1]}', ["ids must be >= 0"]),
    ("/v1/collections/bad/points/get", '{"ids": ["1"]}', ["ids.0", "integer"]),
    ("/v1/collections/bad/points/get", '{"ids": [18446744073709551616]}', ["ids"]),
    ("/v1/collections/bad/points/scroll", '{"limit": 1000000}', ["limit"]),
    ("/v1/collections/bad/points/delete", '{"ids": [1], "extra": 1}', ["unknown field", "extra"]),
    ("/v1/collections", '{"name": "x y", "dimension": 3}', ["name"]),
    ("/v1/collections", '{"name": "okname", "dimension": 0}', ["dimension"]),
    ("/v1/collections", '{"name": "okname", "dimension": 3, "metric": "manhattan"}', ["metric"]),
    ("/v1/collections", '{"name": "okname", "dimension": 3, "index": {"type": "annoy"}}', ["annoy"]),
    ("/v1/collections", '{"name": "okname", "dimension": 3, "index": {"type": "hnsw", "mm": 3}}', ["mm"]),
    ("/v1/collections", '{"name": "okname"}', ["dimension is required"]),
    ("/v1/jobs", '{"kind": "nope", "params": {}}', ["nope"]),
    ("/v1/jobs", '{"kind": "build_index", "params": {"input": "/etc/passwd", "collection": "c"}}', ["outside"]),
    ("/v1/drafts", '{"context_ids": [1, 2], "vocab_size": 10, "max_nodes": 100000}', ["max_nodes"]),
    ("/v1/drafts", '{"context_ids": [99999999999], "vocab_size": 10}', ["context_ids"]),
    ("/v1/graphs/none/similar", '{"nodes": [0], "k": "3"}', ["k", "integer"]),
]


@pytest.mark.parametrize("route,text,words", RAW_BAD, ids=[f"{r}:{t[:40]}" for r, t, _ in RAW_BAD])
def test_bad_body_is_a_4xx_with_a_sentence(http, col, route, text, words):
    r = http.post(route, content=text, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _err(r, r.status_code, *words)


def test_nan_sentence_is_the_grpc_one(http, col, grpc_client):
    import numpy as np

    from retrieval.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        grpc_client.upsert("bad", ids=[5], vectors=np.float32([[np.nan, 0, 0]]))
    r = http.put("/v1/collections/bad/points", content='{"ids": [5], "vectors": [[NaN, 0, 0]]}')
    assert _err(r, 400) == str(e.value)
    assert grpc_client.count("bad") == 2  # nothing stored


def test_wrong_method_and_route(http, col):
    _err(http.get("/v1/nope"), 404, "no such route")
    _err(http.patch("/v1/collections/bad"), 405, "no such route")
    _err(http.get("/v1/collections/nope"), 404, "nope")
    _err(http.put("/v1/collections/nope/points", json={"ids": [1], "vectors": [[1, 2, 3]]}), 404, "nope")


def test_huge_bodies_are_refused(http, col):
    big = b'{"ids": [1], "vectors": [[' + b"0," * (MAX_BODY // 2) + b'0]]}'
    _err(http.put("/v1/collections/bad/points", content=big), 413, "limits.max_message_bytes")

    def chunks():  # no Content-Length: counted while read
        yield b'{"ids": [1], "vectors": [['
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"0," * 32768
        yield b'0]]}'

    _err(http.put("/v1/collections/bad/points", content=chunks()), 413, "limits.max_message_bytes")
    # too many points (limits.max_batch) in a body under the size limit
    n = 10_001
    r = http.put("/v1/collections/bad/points", json={"ids": list(range(n)), "vectors": [[0, 0, 1]] * n})
    assert r.status_code in (400, 429) and "10000" in r.json()["error"]["message"]
    assert http.get("/healthz").status_code == 200
    assert http.post("/v1/collections/bad/points/count").json()["count"] == 2


def test_payload_must_be_an_object(http, col):
    _err(http.put("/v1/collections/bad/points", json={"ids": [3], "vectors": [[0, 0, 1]], "payloads": [[1, 2]]}),
         400, "payloads.0")
    _err(http.put("/v1/collections/bad/points", json={"ids": [3, 4], "vectors": [[0, 0, 1]]}), 400)
    deep = {"a": 1}
    for _ in range(100):
        deep = {"a": deep}
    r = http.put("/v1/collections/bad/points", json={"ids": [3], "vectors": [[0, 0, 1]], "payloads": [deep]})
    assert 400 <= r.status_code < 500, r.text
