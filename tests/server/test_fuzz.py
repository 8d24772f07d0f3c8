"""Fuzzing every RPC of every service (discovered from the generated descriptors, so services added
later are fuzzed too): random and malformed messages from hypothesis strategies built from the proto
descriptors, and raw bytes that are not valid protobuf, sent with a generic channel call.

The server must never crash, every answer must be a proper status (never UNKNOWN or INTERNAL, a
message with every error), and data the fuzzer never named must be unchanged; data it named may only
change through calls that succeeded.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.client import Client
from retrieval.server.process import ServerProcess
from tests.server.rpc import all_rpcs, hosted_services, raw_call

RPCS = all_rpcs()
KEEP = "keep-5b1e0c9a"          # never named by the fuzzer: must stay exactly as it was
TARGET = "fz"                   # named by the fuzzer (d = 8): may change only through OK writes
D = 8
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

_INT_EDGES = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
              F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
              F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
              F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1)}
#: JSON nested far deeper than any parser's recursion limit (Python's json raises RecursionError)
DEEP = ["[" * 10_000 + "]" * 10_000, '{"a": ' * 5_000 + "1" + "}" * 5_000, '{"collection": ' + "[" * 3_000 + "]" * 3_000 + "}"]
NAMES = st.sampled_from([TARGET, TARGET, "", "nope", "../fz", "fz\x00", "a" * 200]) | st.text(max_size=12)
PAYLOADS = st.sampled_from([*DEEP, '{"a": 1}', '{"g": "x", "n": [1, 2]}', "[]", "{", '"x"', "null", '{"a": NaN}',
                            '{"a": {"b": {"c": 1}}}', "{}" + " " * 70000, ""]) | st.text(max_size=20)
JSONS = st.sampled_from(["{}", '{"collection": "fz"}', '{"name": "x", "inputs": ["/etc/passwd"]}', "[1]", "{",
                         '{"a": 1e999}', "null", *DEEP]) | st.text(max_size=30)
#: faiss factory strings that parse but would abort or break the process if built: zero or huge
#: parameters, unknown codecs, missing parts
FACTORIES = st.sampled_from(["HNSW0", "HNSW0,Flat", "IVF0,Flat", "IVF1000000000,Flat", "IVF4,PQ0", "IVF4,PQ999",
                             "PQ0", "PQ8x99", "Foo12", "IVF4,SQ99", "OPQ0,IVF4,PQ4", "HNSW-1", "NSG0", "IVF4,Flat,Flat",
                             "IDMap,HNSW0", "LSH0", "PCA0,Flat", "RR0,Flat", "IVF4(IVF0),Flat", "HNSW99999999", ""]) \
    | st.text(alphabet="HNSWIVFPQFlat,0123456789x_()", max_size=14)


def _int(f):
    lo, hi = _INT_EDGES[f.type]
    return st.sampled_from([0, 1, 2, 3, 8, 10, lo, hi, -1 if lo < 0 else hi - 1]) | st.integers(lo, hi)


@st.composite
def _vectors(draw):
    """Vectors: mostly shaped right (so validation goes deep), sometimes wrong, NaN, or mismatched."""
    n = draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1]))
    d = draw(st.sampled_from([D, D, 0, 1, 9, 2**32 - 1]))
    if n * d <= 64 and draw(st.booleans()):
        vals = draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=n * d,
                             max_size=n * d))
        data = np.asarray(vals, "<f4").tobytes()
    else:
        data = draw(st.binary(max_size=80))
    return {"data": data, "n": n, "d": d}


def _field(f, depth: int):
    if f.message_type is not None:
        if f.message_type.full_name == "retrieval.v1.Vectors":
            inner = _vectors()
        elif depth >= 3:
            inner = st.just({})
        else:
            inner = _message(f.message_type, depth + 1)
    elif f.type in _INT_EDGES:
        inner = _int(f)
    elif f.type == F.TYPE_BOOL:
        inner = st.booleans()
    elif f.type == F.TYPE_FLOAT:
        inner = st.floats(width=32)
    elif f.type == F.TYPE_DOUBLE:
        inner = st.floats()
    elif f.type == F.TYPE_BYTES:
        inner = st.binary(max_size=64)
    elif f.type == F.TYPE_STRING:
        n = f.name
        if n in ("collection", "name", "datastore", "index", "graph"):
            inner = NAMES
        elif "payload" in n:
            inner = PAYLOADS
        elif n.endswith("_json"):
            inner = JSONS
        elif n == "factory":
            inner = FACTORIES
        elif n == "kind":
            inner = st.sampled_from(["build_index", "build_datastore", "crossencoder_build", "nope"]) | st.text(max_size=8)
        else:
            inner = st.text(max_size=24)
    else:
        inner = st.nothing()
    if f.is_repeated:
        return st.lists(inner, max_size=4 if depth else 6)
    return inner


def _message(desc, depth: int = 0):
    return st.fixed_dictionaries({}, optional={f.name: _field(f, depth) for f in desc.fields})


def _vec(n: int) -> dict:
    return {"data": np.arange(n * D, dtype="<f4").tobytes(), "n": n, "d": D}


_FLT = {"must": [{"condition": {"key": "g", "equals": {"string_value": "x"}}}],
        "must_not": [{"condition": {"key": "n", "range": {"gt": 90.0}}}]}
#: Valid requests of the known services; the fuzzer also mutates one field of them at a time, so
#: the checks deep inside (after the first validation) are fuzzed too. New services are fuzzed with
#: random messages (and may add seeds here).
SEEDS: dict[str, list[dict]] = {
    "retrieval.v1.Points/Upsert": [{"collection": TARGET, "ids": [1000, 1001], "vectors": _vec(2),
                                    "payloads": ['{"g": "y", "n": 1}', ""]}],
    "retrieval.v1.Points/UpsertStream": [{"collection": TARGET, "ids": [1002], "vectors": _vec(1)}],
    "retrieval.v1.Points/Get": [{"collection": TARGET, "ids": [1, 2, 1000], "with_vectors": True,
                                 "with_payloads": True}],
    "retrieval.v1.Points/Delete": [{"collection": TARGET, "ids": [1000]}, {"collection": TARGET, "filter":
                                   {"must": [{"condition": {"key": "g", "equals": {"string_value": "y"}}}]}}],
    "retrieval.v1.Points/Count": [{"collection": TARGET, "filter": _FLT}],
    "retrieval.v1.Points/Scroll": [{"collection": TARGET, "limit": 5, "start_id": 3, "with_vectors": True,
                                    "filter": _FLT}],
    "retrieval.v1.Search/Search": [{"collection": TARGET, "queries": _vec(1), "k": 3, "with_payloads": True,
                                    "filter": _FLT}],
    "retrieval.v1.Search/SearchBatch": [{"collection": TARGET, "queries": _vec(3), "k": 5,
                                         "params": {"ef": 16, "nprobe": 2}, "with_vectors": True}],
    "retrieval.v1.Search/SearchStream": [{"collection": TARGET, "queries": _vec(1), "k": 2}],
    "retrieval.v1.Collections/Create": [{"name": "fz2", "dimension": 4, "metric": "cosine",
                                         "index": {"faiss": {"factory": "IVF4,Flat"}}, "shards": 2}],
    "retrieval.v1.Collections/Describe": [{"name": TARGET}],
    "retrieval.v1.Graphs/RunFastRP": [{"graph": "fzg", "embedding": "e", "params": {"dim": 4},
                                       "index": {"faiss": {"factory": "HNSW8"}}}],
    "retrieval.v1.Jobs/Start": [{"kind": "fastrp", "params_json": '{"graph": "fzg", "dim": 4}'}],
    "retrieval.v1.Jobs/List": [{"kind": "build_index", "state": "running"}],
    "retrieval.v1.Drafts/Draft": [{"context_ids": [1, 2, 3, 1, 2], "vocab_size": 10,
                                   "budget": {"max_nodes": 8, "max_depth": 3}}],
    "retrieval.v1.Drafts/Session": [{"open": {"prompt_ids": [1, 2, 3, 1, 2], "vocab_size": 10}},
                                    {"append": {"accepted_ids": [3, 1], "topk_ids": [2, 3, -1, 4], "topk_k": 2}}],
}


@st.composite
def _mutated(draw, rpc):
    """A seed request with one top-level field replaced by a random value (or removed)."""
    seed = dict(draw(st.sampled_from(SEEDS[str(rpc)])))
    fields = rpc.input.DESCRIPTOR.fields
    f = fields[draw(st.integers(0, len(fields) - 1))]
    if draw(st.integers(0, 4)) == 0:
        seed.pop(f.name, None)
    else:
        seed[f.name] = draw(_field(f, 1))
    return seed


def _request(rpc):
    rand = _message(rpc.input.DESCRIPTOR)
    return (st.one_of(rand, _mutated(rpc), _mutated(rpc)) if str(rpc) in SEEDS else rand)


def _build(cls, values: dict):
    msg = cls()
    _fill(msg, values)
    return msg


def _fill(msg, values: dict) -> None:
    for name, v in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        if f.message_type is not None:
            if f.is_repeated:
                for item in v:
                    _fill(getattr(msg, name).add(), item)
            else:
                sub = getattr(msg, name)
                sub.SetInParent()
                _fill(sub, v)
        elif f.is_repeated:
            getattr(msg, name).extend(v)
        else:
            setattr(msg, name, v)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data",
                        env={"RETRIEVAL_LIMITS__MAX_MESSAGE_BYTES": str(4 << 20), "RETRIEVAL_DRAFTS__IDLE_TIMEOUT_S": "30",
                             # a request that asks for huge memory must get RESOURCE_EXHAUSTED, not an OOM kill
                             "RETRIEVAL_LIMITS__MAX_MEMORY_BYTES": str(3 << 30)})
    srv.start()
    rng = np.random.default_rng(0)
    x = rng.random((300, D), dtype=np.float32)
    c = Client(srv.address, timeout=30)
    c.create_collection(KEEP, D)
    c.upsert(KEEP, np.arange(300), x, [{"i": i} for i in range(300)])
    c.create_collection(TARGET, D)
    c.upsert(TARGET, np.arange(100), x[:100], [{"g": "x", "n": i} for i in range(100)])
    c.create_graph("fzg", num_nodes=50)
    c.append_edges("fzg", np.arange(49), np.arange(1, 50))
    before = c.get(KEEP, np.arange(400))
    ch = grpc.insecure_channel(srv.address)
    state = {"srv": srv, "client": c, "channel": ch, "keep": before, "codes": {}, "hosted": hosted_services(ch)}
    yield state
    ch.close()
    c.close()
    srv.stop()


def _hosted(state, rpc) -> bool:
    """Whether the server hosts the RPC's service (test_every_generated_service_is_hosted checks all are)."""
    return rpc.service in state["hosted"]


def test_every_generated_service_is_hosted(fuzzed):
    missing = sorted({r.service for r in RPCS} - fuzzed["hosted"])
    assert not missing, (f"{missing} have generated code in retrieval/v1 but the server does not host them "
                         "(add them to retrieval/server/services.py SERVICES)")


def _check(state, rpc, out, target_count_before=None):
    assert out.code not in BAD, (str(rpc), out)
    assert isinstance(out.code, grpc.StatusCode)
    if out.code != grpc.StatusCode.OK:
        assert out.details, (str(rpc), out)
    state["codes"].setdefault(str(rpc), set()).add(out.code.name)
    if target_count_before is not None and out.code != grpc.StatusCode.OK:
        assert state["client"].count(TARGET) == target_count_before, f"a failed {rpc} changed stored data"


def _target_count(state) -> int:
    """Points in the fuzzed collection (re-created when a fuzzed Drop removed it)."""
    from retrieval import errors

    c = state["client"]
    try:
        return c.count(TARGET)
    except errors.NotFound:
        c.create_collection(TARGET, D)
        c.upsert(TARGET, np.arange(10), np.ones((10, D), np.float32))
        return c.count(TARGET)


def _alive(state):
    assert state["srv"].proc.poll() is None, "the server died:\n" + state["srv"].log_tail()
    h = health_pb2_grpc.HealthStub(state["channel"]).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert h.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_structured_fuzz(fuzzed, rpc):
    n_msgs = st.integers(1, 3) if rpc.client_streaming else st.just(1)
    if not _hosted(fuzzed, rpc):  # test_every_generated_service_is_hosted fails for it
        pytest.skip(f"{rpc.service} is not hosted by the server")
    # a failed unary write must leave the data as it was (a write stream commits message by message:
    # the batches before a bad one stay, by design)
    writes = rpc.service == "retrieval.v1.Points" and rpc.name in ("Upsert", "Delete")

    @settings(max_examples=40, **SETTINGS)
    @given(msgs=n_msgs.flatmap(lambda k: st.lists(_request(rpc), min_size=k, max_size=k)))
    def run(msgs):
        payloads = [_build(rpc.input, m).SerializeToString() for m in msgs]
        before = _target_count(fuzzed) if writes else None
        out = raw_call(fuzzed["channel"], rpc, payloads, timeout=20)
        _check(fuzzed, rpc, out, before)

    run()
    _alive(fuzzed)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_raw_bytes_fuzz(fuzzed, rpc):
    if not _hosted(fuzzed, rpc):  # test_every_generated_service_is_hosted fails for it
        pytest.skip(f"{rpc.service} is not hosted by the server")
    garbage = st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, b"\x0a\x05ab",
                               b"\x12\x80\x80\x80\x80\x10", b"\x0b", b"\x00\x00", b"\x0a\x02fz\x1a\x03\xff\xfe\xfd"])

    @settings(max_examples=25, **SETTINGS)
    @given(chunks=st.lists(garbage | st.binary(min_size=1, max_size=120), min_size=1, max_size=3))
    def run(chunks):
        payloads = chunks if rpc.client_streaming else chunks[:1]
        out = raw_call(fuzzed["channel"], rpc, payloads, timeout=20)
        _check(fuzzed, rpc, out)

    run()
    # bytes that are certainly not protobuf (a truncated length-delimited field) -> INVALID_ARGUMENT
    out = raw_call(fuzzed["channel"], rpc, [b"\x0a\x05ab"] * (2 if rpc.client_streaming else 1), timeout=20)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in out.details, (str(rpc), out)
    _alive(fuzzed)


def test_stored_data_is_unchanged(fuzzed):
    c = fuzzed["client"]
    _alive(fuzzed)
    after = c.get(KEEP, np.arange(400))
    before = fuzzed["keep"]
    assert np.array_equal(after.ids, before.ids) and len(after.ids) == 300
    assert np.array_equal(after.vectors, before.vectors) and after.payloads == before.payloads
    assert c.count(KEEP) == 300
    D_, I_ = c.search_batch(KEEP, before.vectors[:20], k=1)
    assert I_[:, 0].tolist() == list(range(20))
    # the fuzzed collection is still consistent: every stored point is found by an exact search
    n = c.count(TARGET)
    pts = c.scroll(TARGET, limit=10_000, with_vectors=True, with_payloads=False)
    assert len(pts.ids) == n
    if n:
        D2, _ = c.search_batch(TARGET, pts.vectors[:50], k=1, exact=True)  # (ties on duplicates: by distance)
        assert np.allclose(D2[:, 0], 0, atol=1e-5)
    assert "INVALID_ARGUMENT" in set().union(*fuzzed["codes"].values())


HOSTILE_FACTORIES = ["HNSW0", "HNSW0,Flat", "IVF0,Flat", "IVF1000000000,Flat", "IVF4,PQ0", "IVF4,PQ999", "PQ0",
                     "Foo12", "IVF4,SQ99", "OPQ0,IVF4,PQ4", "HNSW-1", "IDMap,HNSW0", "PCA0,Flat", "HNSW99999999"]


@pytest.mark.parametrize("factory", HOSTILE_FACTORIES)
def test_hostile_index_specs_never_take_the_server_down(fuzzed, factory):
    """A factory string that parses but would abort faiss, break every search or allocate without bound
    is refused at Create and at RunFastRP with INVALID_ARGUMENT; the server stays up."""
    from retrieval import errors

    c = fuzzed["client"]
    with pytest.raises(errors.InvalidArgument):
        c.create_collection("hostile", D, index={"type": "faiss", "factory": factory})
    assert "hostile" not in [x["name"] for x in c.list_collections()]
    with pytest.raises(errors.InvalidArgument):  # the same index for graph embeddings
        c.run_fastrp("fzg", dim=4, embedding="hostile", index={"type": "faiss", "factory": factory})
    _alive(fuzzed)


@pytest.mark.parametrize("field", ["params_json"])
def test_deeply_nested_json_is_invalid_argument(fuzzed, field):
    from retrieval.v1 import jobs_pb2

    rpc = next(r for r in RPCS if str(r) == "retrieval.v1.Jobs/Start")
    for deep in DEEP:
        out = raw_call(fuzzed["channel"], rpc, [jobs_pb2.StartJobRequest(kind="fastrp", params_json=deep)
                                                .SerializeToString()], timeout=20)
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and "nest" in out.details, out
    _alive(fuzzed)


def test_health_service_fuzz(fuzzed):
    """Check, Watch and List of grpc.health.v1 with any service name: proper statuses, never INTERNAL."""
    stub = health_pb2_grpc.HealthStub(fuzzed["channel"])
    names = ["", "retrieval.v1.Points", "retrieval.v1.Search", "nope", "\x00", "a" * 5000, "../x", "é"]

    @settings(max_examples=30, **SETTINGS)
    @given(name=st.sampled_from(names) | st.text(max_size=40))
    def run(name):
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert r.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, (name, e.code(), e.details())
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=1.0)
        try:
            first = next(watch)  # the current status comes at once; then the stream waits for changes
            assert first.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING,
                                    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN), (name, first)
        except grpc.RpcError as e:
            assert e.code() not in BAD, (name, e.code(), e.details())
        finally:
            watch.cancel()

    run()
    try:
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10)
        assert "retrieval.v1.Points" in listed.statuses
    except grpc.RpcError as e:
        assert e.code() not in BAD - {grpc.StatusCode.UNIMPLEMENTED}, (e.code(), e.details())
    _alive(fuzzed)
