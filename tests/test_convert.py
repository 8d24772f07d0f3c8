"""Proto <-> domain conversions: a round trip for every message retrieval/convert.py handles."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import convert
from retrieval.errors import InvalidArgument
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec, QueryParams
from retrieval.jobs.manager import JobRecord
from retrieval.v1 import collections_pb2, common_pb2, jobs_pb2
from retrieval.vectors import filters as flt
from retrieval.vectors.filters import Condition, Filter, Range


def _wire(msg):
    """Serialise and parse again, so the round trip crosses real protobuf bytes."""
    return type(msg).FromString(msg.SerializeToString())


def test_vectors_round_trip_bit_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    x[0, 0], x[1, 1], x[2, 2] = -0.0, np.finfo(np.float32).tiny / 2, np.finfo(np.float32).max
    msg = _wire(convert.vectors_to_proto(x))
    assert (msg.n, msg.d) == (7, 5) and len(msg.data) == 7 * 5 * 4
    y = convert.vectors_from_proto(msg)
    assert y.dtype == np.float32 and y.tobytes() == x.tobytes()
    # one vector is one row; float64 and non-contiguous input are packed as float32 little-endian
    assert convert.vectors_from_proto(convert.vectors_to_proto(x[0])).shape == (1, 5)
    z = convert.vectors_from_proto(convert.vectors_to_proto(x.astype(np.float64)[:, ::2]))
    assert np.array_equal(z, x[:, ::2])
    assert msg.data[:4] == np.float32(x[0, 0]).astype("<f4").tobytes()
    # fill an existing message in place
    out = common_pb2.Vectors()
    assert convert.vectors_to_proto(x, out) is out and out.n == 7


@pytest.mark.parametrize("n", [0, 1, 10, 127, 128, 20_000])
def test_append_floats_equals_extend(n):
    """Distances are appended as packed wire bytes: the same message, bit for bit, as extend(list)."""
    from retrieval.v1 import search_pb2

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    if n:
        x[0] = np.inf
        x[-1] = -0.0
    a = search_pb2.SearchResponse(nq=1, k=n, ids=list(range(n)))
    b = search_pb2.SearchResponse(nq=1, k=n, ids=list(range(n)))
    convert.append_floats(a, search_pb2.SearchResponse.DISTANCES_FIELD_NUMBER, x)
    b.distances.extend(x.tolist())
    assert a.SerializeToString() == b.SerializeToString()
    assert np.asarray(a.distances, np.float32).tobytes() == x.tobytes()
    convert.append_floats(a, search_pb2.SearchResponse.DISTANCES_FIELD_NUMBER, x[:3])  # appends
    assert len(a.distances) == n + min(3, n)


@pytest.mark.parametrize("n,d,nbytes,words", [
    (2, 3, 20, "20 bytes of data for n=2 x d=3 float32 \\(expected 24\\)"),
    (2, 0, 0, "d \\(the dimension\\) must be > 0"),
    (1, 4, 17, "expected 16"),
])
def test_vectors_shape_mismatch(n, d, nbytes, words):
    with pytest.raises(InvalidArgument, match=words):
        convert.vectors_from_proto(common_pb2.Vectors(data=b"\0" * nbytes, n=n, d=d), "queries")


@pytest.mark.parametrize("spec", [HnswSpec(), HnswSpec(m=32, ef_construction=400), FaissSpec("HNSW32"),
                                  FaissSpec("IVF256,PQ16", train_size=5000), FaissSpec("HNSW16", ef_construction=80),
                                  ExactSpec()])
def test_index_spec_round_trip(spec):
    assert convert.index_spec_from_proto(_wire(convert.index_spec_to_proto(spec))) == spec


def test_index_spec_defaults():
    assert convert.index_spec_from_proto(common_pb2.IndexSpec()) == HnswSpec(16, 200)
    assert convert.index_spec_from_proto(common_pb2.IndexSpec(hnsw=common_pb2.HnswSpec())) == HnswSpec(16, 200)
    assert convert.index_spec_from_proto(common_pb2.IndexSpec(faiss=common_pb2.FaissSpec())) == FaissSpec("HNSW32")
    with pytest.raises(InvalidArgument, match="hnsw m must be in"):
        convert.index_spec_from_proto(common_pb2.IndexSpec(hnsw=common_pb2.HnswSpec(m=1000)))


@pytest.mark.parametrize("p", [QueryParams(), QueryParams(ef=128), QueryParams(nprobe=16, exact=True),
                               QueryParams(ef=7, nprobe=3, exact=False)])
def test_query_params_round_trip(p):
    assert convert.query_params_from_proto(_wire(convert.query_params_to_proto(p))) == p


FILTERS = [
    Filter(),
    Filter(must=(Condition("color", equals="red"),)),
    Filter(must=(Condition("n", equals=-(2**63)), Condition("m", equals=2**63 - 1), Condition("f", equals=0.25),
                 Condition("b", equals=True), Condition("c", equals=False), Condition("s", equals=""))),
    Filter(should=(Condition("tags", any_of=("a", 1, 2.5, True)), Condition("x", is_null=True),
                   Condition("y", is_null=False))),
    Filter(must_not=(Condition("p", range=Range(gte=1.0, lt=2.5)), Condition("q", range=Range(gt=-3.0)),
                     Condition("r", range=Range(lte=0.0)))),
    Filter(must=(Filter(should=(Condition("a.b", equals=1), Filter(must_not=(Condition("c", equals="x"),)))),),
           must_not=(Filter(),)),
]


@pytest.mark.parametrize("f", FILTERS)
def test_filter_round_trip(f):
    msg = _wire(convert.filter_to_proto(f))
    back = convert.filter_from_proto(msg)
    assert back == f
    # value kinds survive: a bool stays a bool, an int an int
    for a, b in zip(_conditions(back), _conditions(f)):
        assert type(a.equals) is type(b.equals)
        if a.any_of is not None:
            assert [type(v) for v in a.any_of] == [type(v) for v in b.any_of]


def _conditions(f: Filter):
    for c in (*f.must, *f.should, *f.must_not):
        if isinstance(c, Filter):
            yield from _conditions(c)
        else:
            yield c


def test_range_zero_bound_is_kept():
    f = Filter(must=(Condition("a", range=Range(gte=0.0)),))
    assert convert.filter_from_proto(_wire(convert.filter_to_proto(f))).must[0].range == Range(gte=0.0)


def test_optional_filter():
    from retrieval.v1 import points_pb2

    req = points_pb2.CountRequest(collection="c")
    assert convert.optional_filter(req) is None
    req.filter.CopyFrom(common_pb2.Filter())
    assert convert.optional_filter(req) is None  # an empty filter is no filter
    req.filter.CopyFrom(convert.filter_to_proto(FILTERS[1]))
    assert convert.optional_filter(req) == FILTERS[1]
    req.filter.CopyFrom(convert.filter_to_proto(Filter(must=(Condition("bad key", equals=1),))))
    with pytest.raises(InvalidArgument, match="filter key 'bad key' is not valid"):
        convert.optional_filter(req)


def test_filter_from_proto_errors():
    with pytest.raises(InvalidArgument, match="filter clause is empty"):
        convert.filter_from_proto(common_pb2.Filter(must=[common_pb2.Clause()]))
    with pytest.raises(InvalidArgument, match="has no match"):
        convert.filter_from_proto(common_pb2.Filter(must=[common_pb2.Clause(condition=common_pb2.Condition(key="a"))]))
    with pytest.raises(InvalidArgument, match="filter value is empty"):
        convert.filter_from_proto(common_pb2.Filter(must=[common_pb2.Clause(
            condition=common_pb2.Condition(key="a", equals=common_pb2.Value()))]))
    deep = common_pb2.Filter(must=[common_pb2.Clause(condition=common_pb2.Condition(key="a", is_null=True))])
    for _ in range(flt.MAX_DEPTH + 2):
        deep = common_pb2.Filter(must=[common_pb2.Clause(filter=deep)])
    with pytest.raises(InvalidArgument, match="nested more than"):
        convert.filter_from_proto(deep)
    with pytest.raises(InvalidArgument, match="must be a string, number or bool"):
        convert.filter_to_proto(Filter(must=(Condition("a", equals=[1]),)))


def _info():
    return {"name": "docs", "dimension": 128, "metric": "cosine", "index": FaissSpec("IVF64,Flat", train_size=3000),
            "shards": 2, "points": 2**40 + 3, "indexed": 10, "pending": 5, "memory_bytes": 123456789012,
            "state": "indexing", "device": "cpu", "created_at": 1700000000.25,
            "shard_info": [{"shard": i, "points": 7 + i, "indexed": 5, "pending": 2 + i, "deleted_in_index": 1,
                            "last_seq": 2**40 + i, "snapshot_seq": 3, "memory_bytes": 99, "state": "ready",
                            "location": "local"} for i in range(2)]}


def test_collection_info_round_trip():
    info = _info()
    back = convert.collection_info_from_proto(_wire(convert.collection_info_to_proto(info)))
    assert back["index"] == info["index"]
    for key in ("name", "dimension", "metric", "shards", "points", "indexed", "pending", "memory_bytes", "state",
                "device", "created_at"):
        assert back[key] == info[key], key
        assert type(back[key]) is type(info[key]), key
    assert back["shard_info"] == info["shard_info"]


def test_collection_info_zero_fields():
    info = _info()
    info.update(points=0, indexed=0, pending=0, memory_bytes=0, shards=1,
                shard_info=[{"shard": 0, "points": 0, "indexed": 0, "pending": 0, "deleted_in_index": 0,
                             "last_seq": 0, "snapshot_seq": 0, "memory_bytes": 0, "state": "ready",
                             "location": "local"}])
    back = convert.collection_info_from_proto(_wire(convert.collection_info_to_proto(info)))
    assert back["points"] == 0 and back["shard_info"] == info["shard_info"]
    assert isinstance(convert.collection_info_to_proto(info), collections_pb2.CollectionInfo)


@pytest.mark.parametrize("total,result", [(None, {}), (100.0, {"built": 3, "files": ["a", "b"], "x": None})])
def test_job_round_trip(total, result):
    rec = JobRecord(id="abc123", kind="build_index", params={"collection": "c", "n": 5, "nested": {"a": [1]}},
                    state="succeeded", done=42.5, total=total, message="adding", error="", result=result,
                    created_at=1.5, started_at=2.5, finished_at=3.5)
    msg = _wire(convert.job_to_proto(rec))
    assert isinstance(msg, jobs_pb2.Job)
    assert convert.job_from_proto(msg) == rec.public()
