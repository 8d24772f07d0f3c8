"""Points over gRPC on a real server: upsert, upsert_stream, get, delete (ids and filter), count,
scroll; uint64 ids above 2**63; payloads and vectors round-tripped exactly."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from retrieval.errors import InvalidArgument, ResourceExhausted
from retrieval.v1 import points_pb2, points_pb2_grpc
from tests.vectors.helpers import all_points, ref_eval, to_filter

D = 6
BIG = np.array([0, 1, 7, 2**63 - 1, 2**63, 2**63 + 5, 2**64 - 2], np.uint64)


def make(n, seed=0, start=100):
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.uint64)
    x = rng.standard_normal((n, D)).astype(np.float32)
    pls = [{"i": int(i), "g": int(i) % 5, "name": f"p{i}", "tags": ["even" if i % 2 == 0 else "odd"],
            "price": float(i % 100) / 4} for i in ids.tolist()]
    return ids, x, pls


@pytest.fixture(scope="module", params=[1, 3], ids=["1shard", "3shards"])
def col(request, client):
    name = f"points-{request.param}"
    client.create_collection(name, dimension=D, metric="l2", index="hnsw", shards=request.param)
    return name


def test_upsert_get_round_trip(client, col):
    x = np.random.default_rng(1).standard_normal((len(BIG), D)).astype(np.float32)
    x[0, 0] = -0.0
    x[1, 1] = np.float32(1e-42)  # subnormal
    pls = [{"k": i, "s": "ü\n\"q\"", "nested": {"a": [1, None, True]}} for i in range(len(BIG) - 1)] + [None]
    client.upsert(col, BIG, x, pls)
    got = client.get(col, BIG[::-1])
    assert got.ids.dtype == np.uint64 and got.ids.tolist() == sorted(BIG.tolist())  # id order
    order = np.argsort(BIG)
    assert got.vectors.tobytes() == x[order].tobytes()  # bit-exact
    assert got.payloads == [pls[i] for i in order]
    # missing ids are omitted; vectors / payloads only when asked
    got = client.get(col, [5, 2**63, 2**64 - 3], with_vectors=False, with_payloads=False)
    assert got.ids.tolist() == [2**63] and got.vectors is None and got.payloads is None


def test_upsert_replaces(client, col):
    ids, x, pls = make(50, seed=2)
    client.upsert(col, ids, x, pls)
    x2 = x[:10] + 1
    client.upsert(col, ids[:10], x2, [{"v": 2}] * 10)
    got = client.get(col, ids[:12])
    assert np.array_equal(got.vectors[:10], x2) and np.array_equal(got.vectors[10:], x[10:12])
    assert got.payloads[:10] == [{"v": 2}] * 10 and got.payloads[10] == pls[10]
    # an upsert without payloads clears them (upsert replaces the whole point)
    client.upsert(col, ids[:1], x[:1])
    assert client.get(col, ids[:1]).payloads == [None]


def test_count_scroll_and_filters(client, col):
    ids, x, pls = make(400, seed=3, start=1000)
    client.upsert(col, ids, x, pls)
    stored_ids, stored_x, stored_p = all_points(client, col)
    assert stored_ids.tolist() == sorted(stored_ids.tolist()) and len(set(stored_ids.tolist())) == len(stored_ids)
    assert client.count(col) == len(stored_ids)
    payload_of = dict(zip(stored_ids.tolist(), stored_p))
    for fd in ({"must": [{"key": "g", "equals": 3}]},
               {"must": [{"key": "tags", "any_of": ["even"]}, {"key": "price", "range": {"gte": 5, "lt": 12.5}}]},
               {"should": [{"key": "g", "equals": 1}, {"key": "name", "equals": "p1003"}],
                "must_not": [{"key": "price", "range": {"gt": 20}}]},
               {"must": [{"key": "i", "is_null": True}]}):
        f = to_filter(fd)
        want = sorted(i for i, p in payload_of.items() if ref_eval(f, p))
        assert client.count(col, filter=fd) == len(want), fd
        got, start = [], None
        while True:  # page through with a small limit
            page = client.scroll(col, filter=fd, start_id=start, limit=37)
            assert all(ref_eval(f, p) for p in page.payloads)
            got.extend(page.ids.tolist())
            if page.next_id is None:
                break
            assert page.next_id > page.ids[-1]
            start = page.next_id
        assert got == want, fd
    # scroll from an id above 2**63, with vectors
    page = client.scroll(col, start_id=2**63, limit=100, with_vectors=True)
    assert page.ids.tolist() == [i for i in sorted(stored_ids.tolist()) if i >= 2**63]
    assert page.vectors.shape == (len(page.ids), D)


def test_delete_by_ids_and_filter(client, col):
    ids, x, pls = make(200, seed=4, start=5000)
    client.upsert(col, ids, x, pls)
    before = client.count(col)
    n = client.delete(col, ids=np.concatenate([ids[:20], [999_999_999]]))
    assert n == 20 and client.count(col) == before - 20
    assert len(client.get(col, ids[:20]).ids) == 0
    assert client.delete(col, ids=ids[:20]) == 0  # already gone
    fd = {"must": [{"key": "g", "equals": 4}, {"key": "i", "range": {"gte": 5000, "lt": 5200}}]}
    expected = sum(1 for p in pls[20:] if p["g"] == 4)
    assert client.delete(col, filter=fd) == expected
    assert client.count(col, filter=fd) == 0
    assert client.count(col) == before - 20 - expected
    left = client.get(col, ids)
    assert all(p["g"] != 4 for p in left.payloads) and len(left.ids) == 180 - expected
    with pytest.raises(InvalidArgument, match="exactly one of: ids, a non-empty filter"):
        client.delete(col)
    with pytest.raises(InvalidArgument, match="exactly one of: ids, a non-empty filter"):
        client.delete(col, ids=ids[20:30], filter=fd)
    assert client.count(col) == before - 20 - expected


def test_upsert_stream(client, col):
    ids, x, pls = make(1000, seed=5, start=20000)
    batches = [(ids[i : i + 128], x[i : i + 128], pls[i : i + 128]) for i in range(0, 1000, 128)]
    assert client.upsert_stream(col, iter(batches)) == 1000
    got = client.get(col, ids)
    assert got.ids.tolist() == ids.tolist() and np.array_equal(got.vectors, x) and got.payloads == pls


def test_upsert_stream_error_keeps_earlier_batches(client, col):
    ids, x, _ = make(300, seed=6, start=40000)
    bad = (ids[200:300], np.full((100, D), np.nan, np.float32))
    with pytest.raises(InvalidArgument, match="NaN"):
        client.upsert_stream(col, iter([(ids[:100], x[:100]), (ids[100:200], x[100:200]), bad]))
    got = client.get(col, ids)
    assert got.ids.tolist() == ids[:200].tolist()  # the batches before the failing one are committed


def test_scroll_limit(client, col):
    with pytest.raises(ResourceExhausted, match="scroll limit 10001 is above the maximum of 10000"):
        client.scroll(col, limit=10_001)


def test_get_and_count_via_raw_stub(client, col, server):
    """The wire format directly: payloads are JSON strings, vectors packed float32."""
    with grpc.insecure_channel(server.address) as ch:
        stub = points_pb2_grpc.PointsStub(ch)
        resp = stub.Get(points_pb2.GetRequest(collection=col, ids=[2**63], with_vectors=True, with_payloads=True))
        assert list(resp.ids) == [2**63] and resp.vectors.n == 1 and resp.vectors.d == D
        assert len(resp.vectors.data) == D * 4 and json.loads(resp.payloads[0])["k"] == 4
