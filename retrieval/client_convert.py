"""What :class:`retrieval.client.Client` and :class:`retrieval.aio.AsyncClient` share: request
builders, response parsers, input checks, error mapping and channel settings.

The two clients differ only in how they call (the sync stub vs the ``grpc.aio`` stub); everything
that turns Python arguments into a request message, and a response message into numpy arrays,
:class:`Hits`, :class:`Points` or dicts, is a function here (one per message, like qdrant-client's
``conversions/``). All functions are pure and thread-safe.

Input checks raise :class:`retrieval.errors.InvalidArgument` naming the argument and the value, before
anything is sent: ids must be integers in ``[0, 2**64 - 1]`` (uint64; the server refuses the padding
id ``2**64 - 1``),
scalar fields must fit their proto type (``k``, ``ef``, ``nprobe``, ``limit`` are uint32).
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor as _pd

from retrieval import convert, errors
from retrieval.indexes import registry
from retrieval.v1 import collections_pb2, common_pb2, jobs_pb2, points_pb2, search_pb2
from retrieval.vectors import filters as flt

# --- errors ---------------------------------------------------------------------------------------
CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


def error_from_rpc(e: grpc.RpcError) -> errors.RetrievalError:
    """The package's exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = e.code() if hasattr(e, "code") else None
    cls = CODES.get(code, errors.RetrievalError)
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE and details and "Socket closed" in details:
        details += (" (the server closed the connection; if it serves TLS, connect with tls=True or "
                    "root_certificates=..., on the command line --tls / --ca-file)")
    err = cls(details)
    if cls is errors.RetrievalError and code is not None:
        err.code = code
    return err


def raise_rpc(e: grpc.RpcError):
    raise error_from_rpc(e) from None


def retry_after_s(e: grpc.RpcError) -> float | None:
    """The server's retry-after hint (seconds) of a RESOURCE_EXHAUSTED error, else None."""
    try:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        for key, value in e.trailing_metadata() or ():
            if key == "retry-after-ms":
                return max(0.0, float(value) / 1000)
    except Exception:  # noqa: BLE001  (a malformed hint is no hint)
        return None
    return None


def closed_error() -> errors.Cancelled:
    return errors.Cancelled("this client is closed")


# --- channel settings -----------------------------------------------------------------------------
_IDEMPOTENT = [
    {"service": "retrieval.v1.Collections", "method": m} for m in ("List", "Describe")
] + [{"service": "retrieval.v1.Points", "method": m} for m in ("Upsert", "Get", "Count", "Scroll")] + [
    {"service": "retrieval.v1.Search", "method": m} for m in ("Search", "SearchBatch")] + [
    {"service": "retrieval.v1.Jobs", "method": m} for m in ("Get", "List", "Kinds")]

SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": _IDEMPOTENT,
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})


def channel_options(max_message_bytes: int, server_name: str | None = None) -> list[tuple]:
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", SERVICE_CONFIG)]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def pem(value, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    path = Path(os.path.expanduser(str(value)))
    try:
        return path.read_bytes()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_key(api_key: str | None, api_key_file) -> str | None:
    if api_key is not None:
        return api_key.strip() or None
    path = api_key_file or os.environ.get("RETRIEVAL_API_KEY_FILE")
    if path:
        try:
            key = Path(os.path.expanduser(str(path))).read_text().split("#", 1)[0].split()
        except OSError as e:
            raise errors.InvalidArgument(f"cannot read API key file {path}: {e.strerror or e}") from None
        if not key:
            raise errors.InvalidArgument(f"API key file {path} holds no key")
        return key[0]
    return os.environ.get("RETRIEVAL_API_KEY", "").strip() or None


def tls_credentials(tls, root_certificates, client_cert, client_key) -> grpc.ChannelCredentials | None:
    """SSL credentials when TLS is asked for (``tls`` or any certificate given), else None."""
    if (client_cert is None) != (client_key is None):
        raise errors.InvalidArgument("mutual TLS needs both client_cert and client_key")
    if tls or (tls is None and (root_certificates is not None or client_cert is not None)):
        return grpc.ssl_channel_credentials(root_certificates=pem(root_certificates, "root certificates"),
                                            private_key=pem(client_key, "client key"),
                                            certificate_chain=pem(client_cert, "client certificate"))
    return None


# --- input checks ---------------------------------------------------------------------------------
_UINT64_MAX_ID = 2**64 - 1  # the server refuses the padding id 2**64 - 1 itself, saying it is reserved
_RANGES = {_pd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), _pd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
           _pd.FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), _pd.FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1)}


def _expected(cls, name: str) -> str:
    f = cls.DESCRIPTOR.fields_by_name.get(name)
    if f is None:
        return "a known field"
    if f.type in _RANGES:
        lo, hi = _RANGES[f.type]
        return f"an integer in [{lo}, {hi}]"
    if f.type == _pd.FieldDescriptor.TYPE_BOOL:
        return "a bool"
    if f.type == _pd.FieldDescriptor.TYPE_STRING:
        return "a string"
    if f.type in (_pd.FieldDescriptor.TYPE_FLOAT, _pd.FieldDescriptor.TYPE_DOUBLE):
        return "a number"
    return f"a {f.message_type.name if f.message_type else 'value'}"


def message(cls, **fields):
    """``cls(**fields)``; a value the proto type cannot hold (``ef=-1``, ``k="10"``, ``k=1.5``) raises
    InvalidArgument naming the argument instead of protobuf's ``ValueError: Value out of range``."""
    try:
        return cls(**fields)
    except (ValueError, TypeError, OverflowError) as e:
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (ValueError, TypeError, OverflowError):
                raise errors.InvalidArgument(
                    f"{name} must be {_expected(cls, name)}, got {value!r}") from None
        raise errors.InvalidArgument(f"bad {cls.__name__}: {e}") from None


def ids_array(ids, what: str = "ids", max_id: int = _UINT64_MAX_ID) -> np.ndarray:
    """``ids`` (any integer array-like, scalar or 1-D) as uint64 ``(n,)`` in ``[0, max_id]``. Negative,
    fractional, non-numeric or too large ids raise InvalidArgument (ids are uint64 on the wire; pass
    ids of 2**63 and above as uint64, e.g. ``I.view(np.uint64)``, not as their negative int64 view)."""
    if isinstance(ids, (str, bytes)):
        raise errors.InvalidArgument(f"{what} must be integers, got the string {ids!r}")
    try:
        a = np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as e:
        raise errors.InvalidArgument(f"{what} must be a flat sequence of integers: {e}") from None
    if a.dtype.kind in "fO" and not isinstance(ids, np.ndarray):
        # a list mixing ints below and above 2**63 becomes float64 in numpy: read its ints exactly
        a = np.asarray(ids, dtype=object)
    a = a.ravel()
    if a.size == 0:
        return np.zeros(0, np.uint64)
    kind = a.dtype.kind
    if kind == "u":
        if int(a.max()) > max_id:
            raise errors.InvalidArgument(f"{what} must be <= {max_id}, got {int(a.max())}")
        return a.astype(np.uint64, copy=False)
    if kind == "i":
        lo = int(a.min())
        if lo < 0:
            raise errors.InvalidArgument(f"{what} must be >= 0, got {lo} (ids of 2**63 and above: pass them as "
                                         f"uint64, e.g. I.view(np.uint64))")
        if int(a.max()) > max_id:
            raise errors.InvalidArgument(f"{what} must be <= {max_id}, got {int(a.max())}")
        return a.astype(np.uint64)
    if kind == "f":
        bad = ~np.isfinite(a) | (a != np.trunc(a))
        if bad.any():
            raise errors.InvalidArgument(f"{what} must be integers, got {a[bad][0].item()!r}")
        # float64 holds integers exactly only up to 2**53; above that a float id is a rounded one
        if a.min() < 0 or a.max() > min(2**53, max_id):
            v = a.min() if a.min() < 0 else a.max()
            raise errors.InvalidArgument(f"{what} must be integers in [0, {min(2**53, max_id)}] when given as "
                                         f"floats, got {v.item()!r}")
        return a.astype(np.uint64)
    if kind == "O":
        out = []
        for v in a.tolist():
            if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__"):
                raise errors.InvalidArgument(f"{what} must be integers, got {v!r}")
            v = operator.index(v)
            if not 0 <= v <= max_id:
                raise errors.InvalidArgument(f"{what} must be in [0, {max_id}], got {v}")
            out.append(v)
        return np.array(out, np.uint64)
    raise errors.InvalidArgument(f"{what} must be integers, got {a.dtype.name} values such as {a[0].item()!r}")


def ids_to_list(ids, what: str = "ids", max_id: int = _UINT64_MAX_ID) -> list[int]:
    """:func:`ids_array` as Python ints (for repeated uint64 fields)."""
    return ids_array(ids, what, max_id).tolist()


def id_scalar(value, what: str) -> int:
    if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) != 0:
        raise errors.InvalidArgument(f"{what} must be one integer id, got {value!r}")
    return ids_to_list([value], what)[0]


def vectors_in(x, what: str = "vectors", ndim: int = 2) -> np.ndarray:
    try:
        a = np.asarray(x, np.float32)
    except (ValueError, TypeError) as e:
        raise errors.InvalidArgument(f"{what} must be numbers: {e}") from None
    if ndim == 2 and a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != ndim:
        hint = "; for several queries use search_batch" if ndim == 1 and a.ndim == 2 and len(a) > 1 else ""
        raise errors.InvalidArgument(f"{what} must be a {ndim}-D float array, got shape {a.shape}{hint}")
    return a


# --- results --------------------------------------------------------------------------------------
@dataclass
class Points:
    ids: np.ndarray                 # uint64 (n,)
    vectors: np.ndarray | None      # float32 (n, d)
    payloads: list[dict | None] | None
    next_id: int | None = None      # scroll: the start id of the next page


@dataclass
class Hits:
    """Results of one query: ``ids`` int64 (k,), ``distances`` float32 (k,), padding removed."""

    ids: np.ndarray
    distances: np.ndarray
    payloads: list[dict | None] | None = None
    vectors: np.ndarray | None = None


def payloads_out(pls) -> list[dict | None]:
    return [json.loads(p) if p else None for p in pls]


def payloads_in(payloads) -> list[str]:
    if payloads is None:
        return []
    return ["" if p is None else (p if isinstance(p, str) else json.dumps(p, separators=(",", ":")))
            for p in payloads]


def filter_to_proto(f) -> common_pb2.Filter | None:
    if f is None:
        return None
    if isinstance(f, flt.Filter):
        return convert.filter_to_proto(f)
    return convert.filter_to_proto(flt.from_dict(f))


def index_spec(index) -> common_pb2.IndexSpec:
    return convert.index_spec_to_proto(registry.spec_from_dict(index))


def search_params(ef: int = 0, nprobe: int = 0, exact: bool = False) -> common_pb2.SearchParams:
    return message(common_pb2.SearchParams, ef=ef, nprobe=nprobe, exact=exact)


# --- collections ----------------------------------------------------------------------------------
def create_collection_request(name, dimension, metric="l2", index=None, shards=1):
    return message(collections_pb2.CreateCollectionRequest, name=name, dimension=dimension, metric=metric,
                   index=index_spec(index), shards=shards)


def list_collections_request():
    return collections_pb2.ListCollectionsRequest()


def describe_collection_request(name):
    return message(collections_pb2.DescribeCollectionRequest, name=name)


def drop_collection_request(name):
    return message(collections_pb2.DropCollectionRequest, name=name)


def repair_collection_request(name, index=None):
    req = message(collections_pb2.RepairCollectionRequest, name=name)
    if index is not None:
        req.index.CopyFrom(index_spec(index))
    return req


def import_collection_request(name, path, replace=False, check_only=False):
    return message(collections_pb2.ImportCollectionRequest, name=name, path=str(path), replace=replace,
                   check_only=check_only)


collection_info = convert.collection_info_from_proto


def collection_list(resp) -> list[dict]:
    return [convert.collection_info_from_proto(c) for c in resp.collections]


# --- points ---------------------------------------------------------------------------------------
def upsert_request(collection, ids, vectors, payloads=None) -> points_pb2.UpsertRequest:
    req = message(points_pb2.UpsertRequest, collection=collection, payloads=payloads_in(payloads))
    req.ids.extend(ids_to_list(ids))
    convert.vectors_to_proto(vectors_in(vectors), req.vectors)
    return req


def upsert_batch_request(collection, batch) -> points_pb2.UpsertRequest:
    """One ``upsert_stream`` batch: (ids, vectors) or (ids, vectors, payloads)."""
    return upsert_request(collection, batch[0], batch[1], batch[2] if len(batch) > 2 else None)


def get_request(collection, ids, with_vectors=True, with_payloads=True):
    req = message(points_pb2.GetRequest, collection=collection, with_vectors=with_vectors,
                  with_payloads=with_payloads)
    req.ids.extend(ids_to_list(ids))
    return req


def points_from_proto(resp, with_vectors, with_payloads) -> Points:
    return Points(ids=np.asarray(resp.ids, np.uint64),
                  vectors=convert.vectors_from_proto(resp.vectors) if with_vectors and resp.vectors.d else (
                      np.zeros((0, 0), np.float32) if with_vectors else None),
                  payloads=payloads_out(resp.payloads) if with_payloads else None,
                  next_id=resp.next_id if resp.HasField("next_id") else None)


def delete_request(collection, ids=None, filter=None):
    req = message(points_pb2.DeleteRequest, collection=collection)
    if ids is not None:
        req.ids.extend(ids_to_list(ids))
    f = filter_to_proto(filter)
    if f is not None:
        req.filter.CopyFrom(f)
    return req


def count_request(collection, filter=None):
    req = message(points_pb2.CountRequest, collection=collection)
    f = filter_to_proto(filter)
    if f is not None:
        req.filter.CopyFrom(f)
    return req


def scroll_request(collection, filter=None, start_id=None, limit=100, with_vectors=False, with_payloads=True):
    req = message(points_pb2.ScrollRequest, collection=collection, limit=limit, with_vectors=with_vectors,
                  with_payloads=with_payloads)
    if start_id is not None:
        req.start_id = id_scalar(start_id, "start_id")
    f = filter_to_proto(filter)
    if f is not None:
        req.filter.CopyFrom(f)
    return req


# --- search ---------------------------------------------------------------------------------------
def search_request(collection, xq, k=10, ef=0, nprobe=0, exact=False, filter=None, with_payloads=False,
                   with_vectors=False) -> search_pb2.SearchRequest:
    """``xq`` (nq, d), or (d,) for one query."""
    req = message(search_pb2.SearchRequest, collection=collection, k=k, with_payloads=with_payloads,
                  with_vectors=with_vectors, params=search_params(ef, nprobe, exact))
    convert.vectors_to_proto(vectors_in(xq, "queries"), req.queries)
    f = filter_to_proto(filter)
    if f is not None:
        req.filter.CopyFrom(f)
    return req


def search_arrays(resp) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I)`` float32 / int64 ``(nq, k)``, padded with ``inf`` / ``-1``."""
    shape = (resp.nq, resp.k)
    D = np.asarray(resp.distances, np.float32).reshape(shape)
    I = np.asarray(resp.ids, np.uint64).view(np.int64).reshape(shape)
    return D, I


def hits_from_proto(resp, with_payloads=False, with_vectors=False) -> Hits:
    """The first query's results of ``resp`` as :class:`Hits`, padding removed."""
    D, I = search_arrays(resp)
    keep = I[0] != -1
    hits = Hits(ids=I[0][keep], distances=D[0][keep])
    if with_payloads:
        hits.payloads = [p for p, m in zip(payloads_out(resp.payloads), keep) if m]
    if with_vectors:
        hits.vectors = convert.vectors_from_proto(resp.vectors)[keep]
    return hits


# --- jobs -----------------------------------------------------------------------------------------
def start_job_request(kind, params: dict):
    return message(jobs_pb2.StartJobRequest, kind=kind, params_json=json.dumps(params))


def job_ref(job_id):
    return message(jobs_pb2.JobRef, id=job_id)


def list_jobs_request(kind="", state=""):
    return message(jobs_pb2.ListJobsRequest, kind=kind, state=state)


def job_kinds_request():
    return jobs_pb2.ListJobKindsRequest()


job = convert.job_from_proto

JOB_FINAL = ("succeeded", "failed", "cancelled")


class JobTimeout(errors.RetrievalError, TimeoutError):
    """A job-running client method gave up waiting after its ``timeout``; the job was cancelled on the
    server (``job_id``; ``job`` is its last record seen)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str, job_id: str = "", job: dict | None = None) -> None:
        super().__init__(message)
        self.job_id, self.job = job_id, job


def show_progress(progress: bool | None) -> bool:
    """``progress`` None: draw a bar only when stderr is a terminal (tests and logs stay clean)."""
    if progress is None:
        import sys

        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):  # replaced or closed stderr
            return False
    return bool(progress)


def _count(x):
    """A job's done / total for display: an int when it is whole (no ``10000.0/10000.0``)."""
    if x is None:
        return None
    x = float(x)
    return int(x) if x.is_integer() else round(x, 3)


class JobBar:
    """A tqdm bar (on stderr) following a job's records from ``Jobs.Watch``: ``update(rec)`` for each,
    ``close()`` at the end. ``enabled`` False: does nothing. Used by one thread / task at a time."""

    def __init__(self, enabled: bool, job: dict) -> None:
        self._bar = None
        if not enabled:
            return
        import sys

        from tqdm.auto import tqdm

        self._bar = tqdm(total=_count(job.get("total")), desc=f"{job.get('kind') or 'job'} {job.get('id', '')}",
                         file=sys.stderr, dynamic_ncols=True, leave=True)
        self.update(job)

    def update(self, rec: dict) -> None:
        bar = self._bar
        if bar is None:
            return
        total = _count(rec.get("total"))
        if total is not None and total != bar.total:
            bar.total = total
        done = _count(rec.get("done")) or 0
        bar.n = min(done, total) if total is not None else done
        bar.set_postfix_str(f"{rec.get('state', '')}{': ' + rec['message'] if rec.get('message') else ''}",
                            refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def job_timeout_error(job: dict, timeout: float) -> JobTimeout:
    return JobTimeout(f"job {job['id']} ({job.get('kind', '')}) did not finish within timeout={timeout:g} s; "
                      "it was cancelled on the server (pass detach=True to leave a job running)",
                      job["id"], job)


def job_list(resp) -> list[dict]:
    return [convert.job_from_proto(j) for j in resp.jobs]


def job_kinds(resp) -> list[dict]:
    return [{"name": k.name, "description": k.description, "resumable": k.resumable} for k in resp.kinds]


# --- graphs ---------------------------------------------------------------------------------------
def edge_requests(graph, src, dst, weights=None, duplicates="", chunk=100_000) -> list:
    """The AppendEdges stream: ``src`` / ``dst`` node ids (checked here, before anything is sent),
    ``chunk`` edges per message, the graph named in the first."""
    from retrieval.graph import convert as gconv

    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise errors.InvalidArgument(f"chunk must be a positive integer, got {chunk!r}")
    src, dst = ids_array(src, "src"), ids_array(dst, "dst")
    if src.shape != dst.shape:
        raise errors.InvalidArgument(f"src and dst must have the same length, got {src.size} and {dst.size}")
    w = None if weights is None else vectors_in(weights, "weights", ndim=1)
    if src.size == 0:
        return [gconv.edges_to_proto(graph, src, dst, None, duplicates)]
    return [gconv.edges_to_proto(graph if s == 0 else "", src[s:s + chunk], dst[s:s + chunk],
                                 None if w is None else w[s:s + chunk], duplicates)
            for s in range(0, src.size, chunk)]


def neighbors_request(graph, nodes, direction="out"):
    from retrieval.v1 import graphs_pb2 as gpb

    return message(gpb.NeighborsRequest, graph=graph, nodes=ids_to_list(nodes, "nodes"), direction=direction)


def similar_nodes_request(graph, nodes, k=10, embedding="fastrp", ef=0, exact=False, include_self=False):
    from retrieval.v1 import graphs_pb2 as gpb

    return message(gpb.SimilarNodesRequest, graph=graph, embedding=embedding, nodes=ids_to_list(nodes, "nodes"),
                   k=k, params=search_params(ef, 0, exact), include_self=include_self)


def score_links_request(graph, src, dst, model="ncn"):
    from retrieval.v1 import graphs_pb2 as gpb

    return message(gpb.ScoreLinksRequest, graph=graph, model=model, src=ids_to_list(src, "src"),
                   dst=ids_to_list(dst, "dst"))


def link_probabilities(resp) -> np.ndarray:
    return np.fromiter(resp.probabilities, dtype=np.float32, count=len(resp.probabilities))


def predict_links_request(graph, nodes, k=10, model="ncn", candidates=None, embedding="", num_candidates=0,
                          include_neighbors=False):
    from retrieval.v1 import graphs_pb2 as gpb

    req = message(gpb.PredictLinksRequest, graph=graph, model=model, nodes=ids_to_list(nodes, "nodes"), k=k,
                  embedding=embedding, num_candidates=num_candidates, include_neighbors=include_neighbors)
    if candidates is not None:
        req.candidates.extend(ids_to_list(candidates, "candidates"))
    return req


# --- cross-encoder --------------------------------------------------------------------------------
def ce_params(mode="", budget=None, k_i=0, rounds=0, seed_fraction=None, ridge=None):
    """Search params; ``budget`` / ``seed_fraction`` / ``ridge`` None: unset, the server's default
    (an explicit budget of 0 is sent, and refused)."""
    from retrieval.v1 import crossencoder_pb2 as cpb

    fields = {"mode": mode, "k_i": k_i, "rounds": rounds, "budget": budget, "seed_fraction": seed_fraction,
              "ridge": ridge}
    return message(cpb.CrossEncoderSearchParams, **{k: v for k, v in fields.items() if v is not None})


def ce_items(ids, texts, payloads=None) -> list:
    from retrieval.crossencoder import convert as cconv

    items = [{"id": i, "text": t, "payload": p}
             for i, t, p in zip(ids_to_list(ids), texts, payloads if payloads is not None else [None] * len(texts),
                                strict=True)]
    return cconv.items_to_proto(items)


# --- payload indexes ------------------------------------------------------------------------------
def create_payload_index_request(collection, key, type):
    return message(collections_pb2.CreatePayloadIndexRequest, collection=collection, key=key, type=type)


def drop_payload_index_request(collection, key):
    return message(collections_pb2.DropPayloadIndexRequest, collection=collection, key=key)


def list_payload_indexes_request(collection):
    return message(collections_pb2.ListPayloadIndexesRequest, collection=collection)


def payload_index(msg) -> dict:
    return convert.payload_index_from_proto(msg)


def payload_index_list(resp) -> list[dict]:
    return [convert.payload_index_from_proto(e) for e in resp.indexes]
