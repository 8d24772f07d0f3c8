"""Proto <-> domain conversion, in one place: one function per message, both directions.

Vectors travel as packed little-endian float32 (``Vectors``); ``vectors_from_proto`` wraps the bytes
without copying them through Python lists.
"""

from __future__ import annotations

import json

import numpy as np

from retrieval.errors import InvalidArgument
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec, IndexSpec, QueryParams
from retrieval.v1 import collections_pb2, common_pb2, jobs_pb2
from retrieval.vectors import filters as flt

F32 = np.dtype("<f4")


# --- Packed repeated floats -----------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def append_floats(msg, field_number: int, values: np.ndarray):
    """Append ``values`` to the repeated ``float`` field ``field_number`` of ``msg`` by parsing their
    packed wire bytes (the raw little-endian float32 array): ~70x faster than
    ``extend(values.tolist())`` for the 10,000 distances of a 1,000-query batch."""
    data = np.ascontiguousarray(values, F32).tobytes()
    if data:
        msg.MergeFromString(_varint(field_number << 3 | 2) + _varint(len(data)) + data)
    return msg


# --- Vectors --------------------------------------------------------------------------------------
def vectors_to_proto(x: np.ndarray, out: common_pb2.Vectors | None = None) -> common_pb2.Vectors:
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim == 1:
        x = x[None, :]
    msg = out if out is not None else common_pb2.Vectors()
    msg.data = x.tobytes()
    msg.n, msg.d = x.shape
    return msg


def vectors_from_proto(msg: common_pb2.Vectors, what: str = "vectors") -> np.ndarray:
    """(n, d) float32 view of the bytes; raises InvalidArgument when the shape does not match."""
    n, d = msg.n, msg.d
    if d == 0:
        raise InvalidArgument(f"{what}: d (the dimension) must be > 0")
    if len(msg.data) != n * d * 4:
        raise InvalidArgument(f"{what}: {len(msg.data)} bytes of data for n={n} x d={d} float32 "
                              f"(expected {n * d * 4})")
    return np.frombuffer(msg.data, dtype=F32).reshape(n, d)


# --- Index specs ----------------------------------------------------------------------------------
def index_spec_from_proto(msg: common_pb2.IndexSpec) -> IndexSpec:
    kind = msg.WhichOneof("kind")
    if kind is None or kind == "hnsw":
        h = msg.hnsw
        return HnswSpec(m=h.m or 16, ef_construction=h.ef_construction or 200)
    if kind == "faiss":
        f = msg.faiss
        return FaissSpec(factory=f.factory or "HNSW32", train_size=f.train_size, ef_construction=f.ef_construction)
    return ExactSpec()


def index_spec_to_proto(spec: IndexSpec) -> common_pb2.IndexSpec:
    if isinstance(spec, HnswSpec):
        return common_pb2.IndexSpec(hnsw=common_pb2.HnswSpec(m=spec.m, ef_construction=spec.ef_construction))
    if isinstance(spec, FaissSpec):
        return common_pb2.IndexSpec(faiss=common_pb2.FaissSpec(
            factory=spec.factory, train_size=spec.train_size, ef_construction=spec.ef_construction))
    return common_pb2.IndexSpec(exact=common_pb2.ExactSpec())


# --- Query params ---------------------------------------------------------------------------------
def query_params_from_proto(msg: common_pb2.SearchParams) -> QueryParams:
    return QueryParams(ef=msg.ef, nprobe=msg.nprobe, exact=msg.exact)


def query_params_to_proto(p: QueryParams) -> common_pb2.SearchParams:
    return common_pb2.SearchParams(ef=p.ef, nprobe=p.nprobe, exact=p.exact)


# --- Filters --------------------------------------------------------------------------------------
def _value_from_proto(v: common_pb2.Value):
    kind = v.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("filter value is empty; set one of string_value, int_value, double_value, bool_value")
    return getattr(v, kind)


def _value_to_proto(v) -> common_pb2.Value:
    if isinstance(v, bool):
        return common_pb2.Value(bool_value=v)
    if isinstance(v, int):
        return common_pb2.Value(int_value=v)
    if isinstance(v, float):
        return common_pb2.Value(double_value=v)
    if isinstance(v, str):
        return common_pb2.Value(string_value=v)
    raise InvalidArgument(f"filter value must be a string, number or bool, got {type(v).__name__}")


def filter_from_proto(msg: common_pb2.Filter, depth: int = 0) -> flt.Filter:
    if depth > flt.MAX_DEPTH:
        raise InvalidArgument(f"filter is nested more than {flt.MAX_DEPTH} levels deep")

    def clause(c: common_pb2.Clause):
        kind = c.WhichOneof("kind")
        if kind == "filter":
            return filter_from_proto(c.filter, depth + 1)
        if kind is None:
            raise InvalidArgument("filter clause is empty; set condition or filter")
        cond = c.condition
        m = cond.WhichOneof("match")
        if m is None:
            raise InvalidArgument(f"filter condition on {cond.key!r} has no match; set equals, any_of, range or is_null")
        if m == "equals":
            return flt.Condition(key=cond.key, equals=_value_from_proto(cond.equals))
        if m == "any_of":
            return flt.Condition(key=cond.key, any_of=tuple(_value_from_proto(v) for v in cond.any_of.values))
        if m == "range":
            r = cond.range
            return flt.Condition(key=cond.key, range=flt.Range(
                gt=r.gt if r.HasField("gt") else None, gte=r.gte if r.HasField("gte") else None,
                lt=r.lt if r.HasField("lt") else None, lte=r.lte if r.HasField("lte") else None))
        return flt.Condition(key=cond.key, is_null=cond.is_null)

    return flt.Filter(must=tuple(map(clause, msg.must)), should=tuple(map(clause, msg.should)),
                      must_not=tuple(map(clause, msg.must_not)))


def filter_to_proto(f: flt.Filter) -> common_pb2.Filter:
    def clause(c) -> common_pb2.Clause:
        if isinstance(c, flt.Filter):
            return common_pb2.Clause(filter=filter_to_proto(c))
        cond = common_pb2.Condition(key=c.key)
        if c.equals is not None:
            cond.equals.CopyFrom(_value_to_proto(c.equals))
        elif c.any_of is not None:
            cond.any_of.values.extend(_value_to_proto(v) for v in c.any_of)
        elif c.range is not None:
            for b in ("gt", "gte", "lt", "lte"):
                v = getattr(c.range, b)
                if v is not None:
                    setattr(cond.range, b, float(v))
        else:
            cond.is_null = bool(c.is_null)
        return common_pb2.Clause(condition=cond)

    return common_pb2.Filter(must=[clause(c) for c in f.must], should=[clause(c) for c in f.should],
                             must_not=[clause(c) for c in f.must_not])


def optional_filter(msg, field: str = "filter") -> flt.Filter | None:
    if not msg.HasField(field):
        return None
    f = filter_from_proto(getattr(msg, field))
    return None if f.is_empty() else flt.validate_filter(f)


# --- Collection info ------------------------------------------------------------------------------
def collection_info_to_proto(info: dict) -> collections_pb2.CollectionInfo:
    msg = collections_pb2.CollectionInfo(
        name=info["name"], dimension=info["dimension"], metric=info["metric"],
        index=index_spec_to_proto(info["index"]) if info["index"] is not None else None, shards=info["shards"],
        points=info["points"], indexed=info["indexed"], pending=info["pending"], memory_bytes=info["memory_bytes"],
        state=info["state"], device=info["device"], created_at=info["created_at"], reason=info.get("reason", ""))
    for s in info["shard_info"]:
        msg.shard_info.add(**{k: s[k] for k in ("shard", "indexed", "pending", "deleted_in_index", "last_seq",
                                                 "snapshot_seq", "memory_bytes", "state", "location")},
                           points=s.get("points", 0))
    for e in info.get("payload_indexes", []):
        msg.payload_indexes.append(payload_index_to_proto(e))
    return msg


def payload_index_to_proto(e: dict) -> collections_pb2.PayloadIndexInfo:
    return collections_pb2.PayloadIndexInfo(key=e["key"], type=e["type"], points=int(e["points"]))


def payload_index_from_proto(msg: collections_pb2.PayloadIndexInfo) -> dict:
    return {"key": msg.key, "type": msg.type, "points": int(msg.points)}


def collection_info_from_proto(msg: collections_pb2.CollectionInfo) -> dict:
    from google.protobuf.json_format import MessageToDict

    out = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    out["index"] = index_spec_from_proto(msg.index) if msg.HasField("index") else None  # None: settings unreadable
    out.setdefault("reason", "")
    for key in ("points", "indexed", "pending", "memory_bytes"):
        out[key] = int(out.get(key, 0))
    for s in out.get("shard_info", []):
        for key in ("points", "indexed", "pending", "deleted_in_index", "last_seq", "snapshot_seq", "memory_bytes"):
            s[key] = int(s.get(key, 0))
    out["payload_indexes"] = [payload_index_from_proto(e) for e in msg.payload_indexes]
    return out


# --- Jobs -----------------------------------------------------------------------------------------
def job_to_proto(rec) -> jobs_pb2.Job:
    return jobs_pb2.Job(id=rec.id, kind=rec.kind, state=rec.state, done=rec.done, total=rec.total or 0,
                        message=rec.message, error=rec.error, result_json=json.dumps(rec.result),
                        params_json=json.dumps(rec.params), created_at=rec.created_at,
                        started_at=rec.started_at, finished_at=rec.finished_at)


def job_from_proto(msg: jobs_pb2.Job) -> dict:
    return {"id": msg.id, "kind": msg.kind, "state": msg.state, "done": msg.done, "total": msg.total or None,
            "message": msg.message, "error": msg.error, "result": json.loads(msg.result_json or "{}"),
            "params": json.loads(msg.params_json or "{}"), "created_at": msg.created_at,
            "started_at": msg.started_at, "finished_at": msg.finished_at}
