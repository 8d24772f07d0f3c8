"""Bad input over gRPC, one test each: the status code, a message that says what was wrong, and
nothing already stored changes (checked after every test by an autouse guard)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from retrieval import convert
from retrieval.client import Client
from retrieval.server.process import ServerProcess
from retrieval.v1 import (collections_pb2, collections_pb2_grpc, common_pb2, points_pb2, points_pb2_grpc, search_pb2,
                          search_pb2_grpc)
from tests.vectors.helpers import all_points

D = 4
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def stubs(server, client):
    rng = np.random.default_rng(0)
    client.create_collection("bad", dimension=D, metric="l2", index="hnsw")
    client.upsert("bad", np.arange(50), rng.standard_normal((50, D)).astype(np.float32),
                  [{"i": i, "tags": ["x"]} for i in range(50)])
    client.create_collection("bad-cos", dimension=D, metric="cosine", index="exact")
    client.upsert("bad-cos", [1, 2**63], rng.standard_normal((2, D)).astype(np.float32))
    ch = grpc.insecure_channel(server.address)
    yield (collections_pb2_grpc.CollectionsStub(ch), points_pb2_grpc.PointsStub(ch), search_pb2_grpc.SearchStub(ch),
           ch)
    ch.close()


def _state(client, server):
    cols = {}
    for c in client.list_collections():
        ids, x, pls = all_points(client, c["name"])
        cols[c["name"]] = (c["dimension"], c["metric"], c["index"], ids.tolist(),
                           None if x is None else x.tobytes(), pls,
                           [s["last_seq"] for s in c["shard_info"]])
    folders = sorted(p.name for p in (server.data_dir / "collections").iterdir())
    return cols, folders


@pytest.fixture(autouse=True)
def unchanged(stubs, client, server):
    before = _state(client, server)
    yield
    after = _state(client, server)
    assert after == before, "a rejected request changed stored data"
    client.search_batch("bad", np.zeros((1, D), np.float32), k=1)  # and the server still serves


def expect(code, *words):
    """Context: the call fails with ``code`` and a message containing every one of ``words``."""
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, tp, e, tb):
            assert e is not None, f"no error; expected {code.name}"
            got = e.code() if isinstance(e, grpc.RpcError) else getattr(e, "code", None)
            msg = e.details() if isinstance(e, grpc.RpcError) else str(e)
            assert got == code, f"expected {code.name}, got {got}: {msg}"
            for w in words:
                assert w in msg, f"message {msg!r} does not say {w!r}"
            self.message = msg
            return True

    return _Ctx()


def upsert_req(collection="bad", ids=(100,), x=None, payloads=()):
    req = points_pb2.UpsertRequest(collection=collection, ids=list(ids), payloads=list(payloads))
    if x is None:
        x = np.ones((len(ids), D), np.float32)
    convert.vectors_to_proto(np.asarray(x, np.float32), req.vectors)
    return req


def search_req(collection="bad", xq=None, k=5, **kw):
    req = search_pb2.SearchRequest(collection=collection, k=k)
    convert.vectors_to_proto(np.ones((1, D), np.float32) if xq is None else np.asarray(xq, np.float32), req.queries)
    for key, v in kw.items():
        if key == "filter":
            req.filter.CopyFrom(v)
        else:
            setattr(req.params, key, v)
    return req


# ------------------------------------------------------------------------------------------------
# Vectors and queries
# ------------------------------------------------------------------------------------------------
def test_wrong_dimension_upsert(client):
    with expect(INVALID, "dimension 5", "collection 'bad' has dimension 4"):
        client.upsert("bad", [100, 101], np.ones((2, 5), np.float32))


def test_wrong_dimension_query(client):
    with expect(INVALID, "queries have dimension 3", "dimension 4"):
        client.search_batch("bad", np.ones((2, 3), np.float32), k=3)
    with expect(INVALID, "queries have dimension 3"):
        client.search("bad", np.ones(3, np.float32), k=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors(client, bad):
    x = np.ones((3, D), np.float32)
    x[1, 2] = bad
    with expect(INVALID, "vectors row 1 contains NaN or infinity"):
        client.upsert("bad", [100, 101, 102], x)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_queries(client, bad):
    xq = np.ones((2, D), np.float32)
    xq[1, 0] = bad
    with expect(INVALID, "queries row 1 contains NaN or infinity"):
        client.search_batch("bad", xq, k=3)


def test_zero_vector_in_cosine(client):
    with expect(INVALID, "row 0 has zero length", "cosine"):
        client.upsert("bad-cos", [5], np.zeros((1, D), np.float32))
    with expect(INVALID, "queries row 0 has zero length"):
        client.search_batch("bad-cos", np.zeros((1, D), np.float32), k=1)


def test_vector_bytes_do_not_match_shape(stubs):
    _, points, search, _ = stubs
    req = points_pb2.UpsertRequest(collection="bad", ids=[100, 101],
                                   vectors=common_pb2.Vectors(data=b"\0" * 20, n=2, d=D))
    with expect(INVALID, "20 bytes of data for n=2 x d=4 float32 (expected 32)"):
        points.Upsert(req)
    with expect(INVALID, "upsert needs vectors"):
        points.Upsert(points_pb2.UpsertRequest(collection="bad", ids=[100]))
    with expect(INVALID, "search needs queries"):
        search.SearchBatch(search_pb2.SearchRequest(collection="bad", k=3))
    with expect(INVALID, "queries: d (the dimension) must be > 0"):
        search.SearchBatch(search_pb2.SearchRequest(collection="bad", k=3, queries=common_pb2.Vectors(n=1)))


def test_empty_batches(client, stubs):
    _, points, search, _ = stubs
    with expect(INVALID, "upsert: the batch is empty"):
        client.upsert("bad", [], np.zeros((0, D), np.float32))
    with expect(INVALID, "search: the batch is empty"):
        client.search_batch("bad", np.zeros((0, D), np.float32), k=3)
    with expect(INVALID, "get: the batch is empty"):
        client.get("bad", [])
    with expect(INVALID, "delete needs exactly one of: ids, a non-empty filter"):
        client.delete("bad", ids=[])
    with expect(INVALID, "delete needs exactly one of"):
        points.Delete(points_pb2.DeleteRequest(collection="bad", filter=common_pb2.Filter()))


def test_batch_above_limit(client):
    with expect(EXHAUSTED, "upsert: 10001 items in one request; the limit is 10000"):
        client.upsert("bad", np.arange(1000, 11001), np.ones((10001, D), np.float32))
    with expect(EXHAUSTED, "search: 10001 items in one request; the limit is 10000"):
        client.search_batch("bad", np.ones((10001, D), np.float32), k=1)


def test_search_rpc_takes_one_query(stubs):
    _, _, search, _ = stubs
    with expect(INVALID, "Search takes exactly one query, got 2; use SearchBatch"):
        search.Search(search_req(xq=np.ones((2, D))))


# ------------------------------------------------------------------------------------------------
# k and ef
# ------------------------------------------------------------------------------------------------
def test_k_zero(client, stubs):
    with expect(INVALID, "k must be >= 1, got 0"):
        client.search_batch("bad", np.ones((1, D), np.float32), k=0)
    with expect(INVALID, "k must be >= 1, got 0"):
        client.search("bad", np.ones(D, np.float32), k=0)


def test_k_negative_is_refused_before_sending(client):
    with pytest.raises(ValueError):  # k is uint32 on the wire
        client.search_batch("bad", np.ones((1, D), np.float32), k=-1)


def test_k_above_limit(client):
    with expect(EXHAUSTED, "k = 1025 is above the limit of 1024"):
        client.search_batch("bad", np.ones((1, D), np.float32), k=1025)


def test_ef_above_limit(client):
    with expect(INVALID, "ef = 100001 is above the limit of 100000"):
        client.search_batch("bad", np.ones((1, D), np.float32), k=3, ef=100_001)


# ------------------------------------------------------------------------------------------------
# Collections
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", ["upsert", "search", "search1", "get", "delete", "count", "scroll", "describe", "drop"])
def test_unknown_collection(client, call):
    x = np.ones((1, D), np.float32)
    fn = {"upsert": lambda: client.upsert("nope", [1], x), "search": lambda: client.search_batch("nope", x, k=1),
          "search1": lambda: client.search("nope", x[0], k=1), "get": lambda: client.get("nope", [1]),
          "delete": lambda: client.delete("nope", ids=[1]), "count": lambda: client.count("nope"),
          "scroll": lambda: client.scroll("nope"), "describe": lambda: client.describe_collection("nope"),
          "drop": lambda: client.drop_collection("nope")}[call]
    with expect(NOT_FOUND, "collection 'nope' does not exist"):
        fn()


def test_duplicate_create(client):
    with expect(EXISTS, "collection 'bad' already exists"):
        client.create_collection("bad", dimension=8, metric="ip", index="exact")


@pytest.mark.parametrize("name,words", [
    ("a/b", "not valid"), ("../x", "not valid"), ("..", "not valid"), (".", "not valid"), ("a\\b", "not valid"),
    ("/tmp", "not valid"), ("", "must not be empty"), ("x" * 129, "129 characters long; the limit is 128"),
    ("caf\u00e9", "not valid"), ("\u0430bc", "not valid"), ("a b", "not valid"), ("a\0b", "not valid"),
    ("-x", "not valid"),
])
def test_invalid_collection_names(client, name, words):
    with expect(INVALID, "collection name", words):
        client.create_collection(name, dimension=D)
    # other calls with such a name are refused as invalid, not "not found"
    if name:
        with expect(INVALID, "collection name"):
            client.describe_collection(name)


def test_non_utf8_name(stubs):
    _, _, _, ch = stubs
    raw = b"\x0a\x03\xffab\x10\x04"  # CreateCollectionRequest{name: b"\xffab", dimension: 4}
    with expect(INVALID, "not a valid message", "Collections/Create"):
        ch.unary_unary("/retrieval.v1.Collections/Create")(raw, timeout=10)


@pytest.mark.parametrize("kw,words", [
    (dict(dimension=0), "dimension must be in [1, 65536], got 0"),
    (dict(dimension=70000), "dimension must be in [1, 65536], got 70000"),
    (dict(dimension=4, metric="hamming"), "unknown metric 'hamming'; valid: l2, ip, cosine"),
    (dict(dimension=4, shards=65), "shards must be in [1, 64], got 65"),
    (dict(dimension=8, index={"type": "faiss", "factory": "IVFxyz,PQ"}), "faiss cannot build factory string 'IVFxyz,PQ'"),
    (dict(dimension=8, index={"type": "faiss", "factory": "IVF16,PQ3"}), "faiss cannot build factory string"),
])
def test_bad_create_settings(client, kw, words):
    with expect(INVALID, words):
        client.create_collection("new-col", **kw)


def test_bad_hnsw_params(stubs):
    cols, _, _, _ = stubs
    req = collections_pb2.CreateCollectionRequest(name="new-col", dimension=4,
                                                  index=common_pb2.IndexSpec(hnsw=common_pb2.HnswSpec(m=1000)))
    with expect(INVALID, "hnsw m must be in [2, 256], got 1000"):
        cols.Create(req)


# ------------------------------------------------------------------------------------------------
# Filters (sent as raw protos: the client would refuse them before sending)
# ------------------------------------------------------------------------------------------------
def _cond(key="i", **match):
    return common_pb2.Clause(condition=common_pb2.Condition(key=key, **match))


def _deep(levels):
    f = common_pb2.Filter(must=[_cond(equals=common_pb2.Value(int_value=1))])
    for _ in range(levels):
        f = common_pb2.Filter(must=[common_pb2.Clause(filter=f)])
    return f


BAD_FILTERS = {
    "bad key": (common_pb2.Filter(must=[_cond("a b", equals=common_pb2.Value(int_value=1))]), "filter key 'a b' is not valid"),
    "json path injection": (common_pb2.Filter(must=[_cond('a"]$', equals=common_pb2.Value(int_value=1))]), "is not valid"),
    "empty key": (common_pb2.Filter(must=[_cond("", is_null=True)]), "filter key '' is not valid"),
    "empty any_of": (common_pb2.Filter(must=[_cond(any_of=common_pb2.ValueList())]), "any_of on 'i' is empty"),
    "range without bounds": (common_pb2.Filter(must=[_cond(range=common_pb2.Range())]), "filter range on 'i' has no bound"),
    "nan bound": (common_pb2.Filter(must=[_cond(range=common_pb2.Range(gt=float("nan")))]), "must be a finite number"),
    "nan value": (common_pb2.Filter(must=[_cond(equals=common_pb2.Value(double_value=float("inf")))]), "must be finite"),
    "no match": (common_pb2.Filter(must=[_cond()]), "has no match; set equals, any_of, range or is_null"),
    "empty value": (common_pb2.Filter(must=[_cond(equals=common_pb2.Value())]), "filter value is empty"),
    "empty clause": (common_pb2.Filter(should=[common_pb2.Clause()]), "filter clause is empty"),
    "too deep": (_deep(12), "nested more than 8 levels deep"),
}


@pytest.mark.parametrize("case", list(BAD_FILTERS))
def test_malformed_filters(stubs, case):
    _, points, search, _ = stubs
    f, words = BAD_FILTERS[case]
    with expect(INVALID, words):
        search.SearchBatch(search_req(filter=f))
    with expect(INVALID, words):
        points.Count(points_pb2.CountRequest(collection="bad", filter=f))
    with expect(INVALID, words):
        points.Delete(points_pb2.DeleteRequest(collection="bad", filter=f))
    with expect(INVALID, words):
        points.Scroll(points_pb2.ScrollRequest(collection="bad", filter=f))


def test_malformed_filter_from_client_dict(client):
    with expect(INVALID, "filter has unknown fields"):
        client.search_batch("bad", np.ones((1, D), np.float32), k=1, filter={"must": [], "mustnt": []})


# ------------------------------------------------------------------------------------------------
# Payloads and ids
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload,words", [
    ("[1, 2]", "must be a JSON object, got a JSON list"),
    ("3", "must be a JSON object, got a JSON int"),
    ('"text"', "must be a JSON object, got a JSON str"),
    ("null", "must be a JSON object"),
    ("true", "must be a JSON object"),
    ("{a: 1}", "is not valid JSON"),
    ('{"a": 1', "is not valid JSON"),
    ('{"a": NaN}', "is not valid JSON", ),
    ('{"a": Infinity}', "is not valid JSON"),
    ('{"a": -Infinity}', "is not valid JSON"),
    ("{}" + " " * 70_000, "characters; the limit is 65536"),
    ("[" * 100_000 + "]" * 100_000, "payload of point 101"),
])
def test_bad_payloads(client, payload, words):
    with expect(INVALID, words, "payload of point 101"):
        client.upsert("bad", [100, 101], np.ones((2, D), np.float32), [{"ok": 1}, payload])


def test_payload_count_mismatch(client):
    with expect(INVALID, "1 payloads for 2 points; give one per point or none"):
        client.upsert("bad", [100, 101], np.ones((2, D), np.float32), [{"a": 1}])


def test_ids_count_not_vectors_count(stubs, client):
    _, points, _, _ = stubs
    with expect(INVALID, "3 ids but 2 vectors"):
        points.Upsert(upsert_req(ids=[100, 101, 102], x=np.ones((2, D))))
    with expect(INVALID, "1 ids but 2 vectors"):
        client.upsert("bad", [100], np.ones((2, D), np.float32))


def test_duplicate_ids_in_batch(client):
    with expect(INVALID, "ids must be unique within a request; 7 appears 2 times"):
        client.upsert("bad", [7, 8, 7], np.ones((3, D), np.float32))


def test_reserved_id(client):
    with expect(INVALID, "18446744073709551615", "reserved"):
        client.upsert("bad", [5, 2**64 - 1], np.ones((2, D), np.float32))
    with expect(INVALID, "reserved"):
        client.delete("bad", ids=[2**64 - 1])


# ------------------------------------------------------------------------------------------------
# Bytes that are not a valid protobuf
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["/retrieval.v1.Points/Upsert", "/retrieval.v1.Search/SearchBatch",
                                    "/retrieval.v1.Search/Search", "/retrieval.v1.Collections/Create",
                                    "/retrieval.v1.Points/Delete"])
def test_invalid_protobuf_bytes(stubs, method):
    _, _, _, ch = stubs
    with expect(INVALID, "not a valid message", method):
        ch.unary_unary(method)(b"\xff\xff", timeout=10)


def test_invalid_protobuf_on_streams(stubs):
    _, _, _, ch = stubs
    with expect(INVALID, "not a valid message"):
        list(ch.stream_stream("/retrieval.v1.Search/SearchStream")(iter([b"\xff\xff"]), timeout=10))
    with expect(INVALID, "not a valid message"):
        ch.stream_unary("/retrieval.v1.Points/UpsertStream")(iter([b"\x0a\xff"]), timeout=10)


# ------------------------------------------------------------------------------------------------
# Oversize messages: a server with a 64 KiB message limit
# ------------------------------------------------------------------------------------------------
def test_oversize_messages(tmp_path):
    srv = ServerProcess(tmp_path / "data", env={"RETRIEVAL_LIMITS__MAX_MESSAGE_BYTES": "65536"})
    srv.start()
    try:
        with Client(srv.address) as c:
            c.create_collection("small", dimension=128, index="exact")
            x = np.random.default_rng(0).standard_normal((100, 128)).astype(np.float32)  # 51 KiB
            c.upsert("small", np.arange(100), x)
            # a request above the limit
            with expect(EXHAUSTED, "larger than max", "65536"):
                c.upsert("small", np.arange(100, 300), np.ones((200, 128), np.float32))
            with expect(EXHAUSTED, "larger than max"):
                c.search_batch("small", np.ones((200, 128), np.float32), k=1)
            # a response above the limit: 2 queries x 100 hits x 512-byte vectors, refused before searching
            with grpc.insecure_channel(srv.address) as ch:
                req = search_pb2.SearchRequest(collection="small", k=100, with_vectors=True)
                convert.vectors_to_proto(x[:2], req.queries)
                with expect(EXHAUSTED, "limits.max_message_bytes", "65536", "at most 1 query"):
                    search_pb2_grpc.SearchStub(ch).SearchBatch(req, timeout=30)
            assert c.count("small") == 100
            got = c.get("small", np.arange(100))
            assert got.vectors.tobytes() == x.tobytes()
    finally:
        srv.stop()
