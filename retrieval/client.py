"""The Python client: numpy in, numpy out.

    from retrieval import Client

    with Client("127.0.0.1:50051") as c:
        c.create_collection("docs", dimension=128, metric="l2", index={"type": "hnsw", "m": 16})
        c.upsert("docs", ids=np.arange(1000), vectors=xb, payloads=[{"lang": "en"}] * 1000)
        D, I = c.search_batch("docs", xq, k=10, ef=64)          # (nq, k) each
        hits = c.search("docs", xq[0], k=5, filter={"must": [{"key": "lang", "equals": "en"}]},
                        with_payloads=True)

Results follow faiss: ``D`` float32 distances ascending (``inf`` padding), ``I`` int64 ids (``-1``
padding). Ids are uint64 on the wire; ids of 2**63 and above read back negative in the int64 view
(``I.view(np.uint64)`` recovers them).

Errors are raised as :class:`retrieval.errors.RetrievalError` subclasses matching the status
(``InvalidArgument``, ``NotFound``, ...), so client code handles the same exceptions as the server.
Idempotent calls are retried on ``UNAVAILABLE`` (gRPC retry policy, up to 5 attempts with backoff);
every call has a deadline (``timeout`` seconds, default 30). A call the server refused because it was
saturated (``RESOURCE_EXHAUSTED`` with a ``retry-after-ms`` hint: nothing was done) is retried after
the hint, up to ``max_busy_retries`` times within the deadline; limits that retrying cannot help
(``k`` too large, a full collection) raise at once.

Security (see docs/operations.md): ``api_key`` (default: ``$RETRIEVAL_API_KEY``, or the file named by
``api_key_file`` / ``$RETRIEVAL_API_KEY_FILE``) is sent on every call as ``authorization: Bearer``;
``tls=True`` or any of ``root_certificates`` (the server's CA, PEM bytes or a path), ``client_cert`` +
``client_key`` (mutual TLS) connects over TLS::

    Client("db.internal:50051", api_key_file="~/.retrieval/key", root_certificates="ca.pem")

Thread-safety: a Client may be shared between threads. Single-query ``search`` uses one long-lived
bidirectional stream per client (the lowest latency gRPC offers in Python), guarded by a lock.
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from dataclasses import dataclass

import grpc
import numpy as np

from retrieval import convert, errors
from retrieval.indexes import registry
from retrieval.indexes.base import QueryParams
from retrieval.v1 import (collections_pb2, collections_pb2_grpc, common_pb2, jobs_pb2, jobs_pb2_grpc, points_pb2,
                          points_pb2_grpc, search_pb2, search_pb2_grpc)
from retrieval.vectors import filters as flt

_CODES = {
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

_IDEMPOTENT = [
    {"service": "retrieval.v1.Collections", "method": m} for m in ("List", "Describe")
] + [{"service": "retrieval.v1.Points", "method": m} for m in ("Upsert", "Get", "Count", "Scroll")] + [
    {"service": "retrieval.v1.Search", "method": m} for m in ("Search", "SearchBatch")] + [
    {"service": "retrieval.v1.Jobs", "method": m} for m in ("Get", "List", "Kinds")]

_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": _IDEMPOTENT,
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})


def _retry_after_s(e: grpc.RpcError) -> float | None:
    """The server's retry-after hint (seconds) of a RESOURCE_EXHAUSTED error, else None."""
    try:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return None
        for key, value in e.trailing_metadata() or ():
            if key == "retry-after-ms":
                return max(0.0, float(value) / 1000)
    except Exception:
        return None
    return None


def _pem(value, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    path = Path(os.path.expanduser(str(value)))
    try:
        return path.read_bytes()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read {what} {path}: {e.strerror or e}") from None


def _read_key(api_key: str | None, api_key_file) -> str | None:
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


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata) -> None:
        self.method, self.timeout, self.credentials = d.method, d.timeout, d.credentials
        self.wait_for_ready, self.compression = getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        self.metadata = metadata


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, key: str) -> None:
        self._md = ("authorization", f"Bearer {key}")

    def _details(self, d):
        return _Details(d, [*(d.metadata or ()), self._md])

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)

    def intercept_stream_stream(self, continuation, d, request_iterator):
        return continuation(self._details(d), request_iterator)


def make_channel(address: str, api_key: str | None = None, tls: bool | None = None, root_certificates=None,
                 client_cert=None, client_key=None, server_name: str | None = None, options=()) -> grpc.Channel:
    """A channel with the client's security settings (see :class:`Client`); usable for any stub."""
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    if (client_cert is None) != (client_key is None):
        raise errors.InvalidArgument("mutual TLS needs both client_cert and client_key")
    if tls or (tls is None and (root_certificates is not None or client_cert is not None)):
        creds = grpc.ssl_channel_credentials(root_certificates=_pem(root_certificates, "root certificates"),
                                             private_key=_pem(client_key, "client key"),
                                             certificate_chain=_pem(client_cert, "client certificate"))
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if api_key:
        channel = grpc.intercept_channel(channel, _KeyInterceptor(api_key))
    return channel


def _raise(e: grpc.RpcError) -> None:
    code = e.code() if hasattr(e, "code") else None
    cls = _CODES.get(code, errors.RetrievalError)
    err = cls(e.details() if hasattr(e, "details") else str(e))
    if cls is errors.RetrievalError and code is not None:
        err.code = code
    raise err from None


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


def _payloads_out(pls) -> list[dict | None]:
    return [json.loads(p) if p else None for p in pls]


def _payloads_in(payloads) -> list[str]:
    if payloads is None:
        return []
    return ["" if p is None else (p if isinstance(p, str) else json.dumps(p, separators=(",", ":")))
            for p in payloads]


def _filter(f) -> common_pb2.Filter | None:
    if f is None:
        return None
    if isinstance(f, flt.Filter):
        return convert.filter_to_proto(f)
    return convert.filter_to_proto(flt.from_dict(f))


def _index_spec(index) -> common_pb2.IndexSpec:
    return convert.index_spec_to_proto(registry.spec_from_dict(index))


class _Stream:
    """A long-lived SearchStream: one request in, one response out, in order."""

    def __init__(self, stub: search_pb2_grpc.SearchStub, timeout: float | None) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.SearchStream(iter(self._q.get, None), timeout=None)

    def call(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        self._q.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._q.put(None)
        try:
            self._responses.cancel()
        except Exception:
            pass


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5) -> None:
        self.address = address
        self.timeout = timeout
        self.max_busy_retries = max_busy_retries
        self._channel = channel or make_channel(
            address, _read_key(api_key, api_key_file), tls, root_certificates, client_cert, client_key, server_name,
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes),
                     ("grpc.enable_retries", 1),
                     ("grpc.service_config", _SERVICE_CONFIG)])
        self._collections = collections_pb2_grpc.CollectionsStub(self._channel)
        self._points = points_pb2_grpc.PointsStub(self._channel)
        self._search = search_pb2_grpc.SearchStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._stream: _Stream | None = None
        self._stream_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server answers (raises Unavailable after ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(f"no server answered at {self.address} within {timeout} s") from None

    def _call(self, fn, request):
        t_end = time.monotonic() + self.timeout
        for attempt in range(self.max_busy_retries + 1):
            try:
                return fn(request, timeout=max(0.001, t_end - time.monotonic()))
            except grpc.RpcError as e:
                wait = _retry_after_s(e)
                if wait is None or attempt == self.max_busy_retries:
                    _raise(e)
                wait *= random.uniform(1.0, 1.5)  # spread the retries of clients refused together
                if time.monotonic() + wait >= t_end:
                    _raise(e)
                time.sleep(wait)

    # --- collections -------------------------------------------------------------------------------
    def create_collection(self, name: str, dimension: int, metric: str = "l2", index=None, shards: int = 1) -> dict:
        """Create a collection. ``index``: "hnsw" | "exact" | {"type": "faiss", "factory": "IVF256,PQ16"} |
        {"type": "hnsw", "m": 32, "ef_construction": 400}. Returns its description."""
        req = collections_pb2.CreateCollectionRequest(name=name, dimension=dimension, metric=metric,
                                                      index=_index_spec(index), shards=shards)
        return convert.collection_info_from_proto(self._call(self._collections.Create, req))

    def list_collections(self) -> list[dict]:
        resp = self._call(self._collections.List, collections_pb2.ListCollectionsRequest())
        return [convert.collection_info_from_proto(c) for c in resp.collections]

    def describe_collection(self, name: str) -> dict:
        return convert.collection_info_from_proto(
            self._call(self._collections.Describe, collections_pb2.DescribeCollectionRequest(name=name)))

    def drop_collection(self, name: str) -> None:
        self._call(self._collections.Drop, collections_pb2.DropCollectionRequest(name=name))

    def repair_collection(self, name: str, index=None) -> dict:
        """Open a quarantined or unavailable collection again (its ``state`` / ``reason`` in
        :meth:`describe_collection` say why it is not served); with ``index`` (as in
        :meth:`create_collection`) its index is rebuilt from the stored points with that spec.
        Returns its description."""
        req = collections_pb2.RepairCollectionRequest(name=name)
        if index is not None:
            req.index.CopyFrom(_index_spec(index))
        return convert.collection_info_from_proto(self._call(self._collections.Repair, req))

    def import_collection(self, name: str, path: str, replace: bool = False, timeout: float | None = None) -> dict:
        """Attach a collection folder built offline (``index_builder build``) that the server can read
        at ``path`` (inside its allowed folders) as ``name``; with ``replace`` the old collection serves
        until the new one is ready. The server copies the folder, so this may take a while: ``timeout``
        defaults to an hour. Returns the collection's description."""
        req = collections_pb2.ImportCollectionRequest(name=name, path=str(path), replace=replace)
        try:
            resp = self._collections.Import(req, timeout=timeout if timeout is not None else max(self.timeout, 3600.0))
        except grpc.RpcError as e:
            _raise(e)
        return convert.collection_info_from_proto(resp)

    # --- points ------------------------------------------------------------------------------------
    @staticmethod
    def _upsert_request(collection, ids, vectors, payloads) -> points_pb2.UpsertRequest:
        req = points_pb2.UpsertRequest(collection=collection, payloads=_payloads_in(payloads))
        req.ids.extend(np.asarray(ids, np.uint64).tolist())
        convert.vectors_to_proto(np.asarray(vectors, np.float32), req.vectors)
        return req

    def upsert(self, collection: str, ids, vectors, payloads: list | None = None) -> int:
        """Insert or replace points; durable when this returns. ``vectors`` (n, d); ``payloads`` dicts or
        None. Returns the write sequence number."""
        resp = self._call(self._points.Upsert, self._upsert_request(collection, ids, vectors, payloads))
        return resp.seq

    def upsert_stream(self, collection: str, batches: Iterable[tuple], timeout: float | None = None) -> int:
        """Bulk load over one stream: ``batches`` yields (ids, vectors) or (ids, vectors, payloads).
        Returns the number of points written."""
        def gen() -> Iterator[points_pb2.UpsertRequest]:
            for b in batches:
                yield self._upsert_request(collection, b[0], b[1], b[2] if len(b) > 2 else None)

        try:
            return self._points.UpsertStream(gen(), timeout=timeout).count
        except grpc.RpcError as e:
            _raise(e)

    def get(self, collection: str, ids, with_vectors: bool = True, with_payloads: bool = True) -> Points:
        req = points_pb2.GetRequest(collection=collection, with_vectors=with_vectors, with_payloads=with_payloads)
        req.ids.extend(np.asarray(ids, np.uint64).ravel().tolist())
        return self._points_out(self._call(self._points.Get, req), with_vectors, with_payloads)

    @staticmethod
    def _points_out(resp, with_vectors, with_payloads) -> Points:
        return Points(ids=np.asarray(resp.ids, np.uint64),
                      vectors=convert.vectors_from_proto(resp.vectors) if with_vectors and resp.vectors.d else (
                          np.zeros((0, 0), np.float32) if with_vectors else None),
                      payloads=_payloads_out(resp.payloads) if with_payloads else None,
                      next_id=resp.next_id if resp.HasField("next_id") else None)

    def delete(self, collection: str, ids=None, filter=None) -> int:
        """Delete by ids or by filter (exactly one); returns how many points were deleted."""
        req = points_pb2.DeleteRequest(collection=collection)
        if ids is not None:
            req.ids.extend(np.asarray(ids, np.uint64).ravel().tolist())
        f = _filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return self._call(self._points.Delete, req).count

    def count(self, collection: str, filter=None) -> int:
        req = points_pb2.CountRequest(collection=collection)
        f = _filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return self._call(self._points.Count, req).count

    def scroll(self, collection: str, filter=None, start_id: int | None = None, limit: int = 100,
               with_vectors: bool = False, with_payloads: bool = True) -> Points:
        """One page of points in id order; pass ``result.next_id`` as ``start_id`` for the next one."""
        req = points_pb2.ScrollRequest(collection=collection, limit=limit, with_vectors=with_vectors,
                                       with_payloads=with_payloads)
        if start_id is not None:
            req.start_id = start_id
        f = _filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return self._points_out(self._call(self._points.Scroll, req), with_vectors, with_payloads)

    # --- search ------------------------------------------------------------------------------------
    @staticmethod
    def _search_request(collection, xq, k, ef, nprobe, exact, filter, with_payloads, with_vectors):
        req = search_pb2.SearchRequest(collection=collection, k=k, with_payloads=with_payloads,
                                       with_vectors=with_vectors,
                                       params=convert.query_params_to_proto(QueryParams(ef, nprobe, exact)))
        convert.vectors_to_proto(np.asarray(xq, np.float32), req.queries)
        f = _filter(filter)
        if f is not None:
            req.filter.CopyFrom(f)
        return req

    @staticmethod
    def _arrays(resp) -> tuple[np.ndarray, np.ndarray]:
        shape = (resp.nq, resp.k)
        D = np.asarray(resp.distances, np.float32).reshape(shape)
        I = np.asarray(resp.ids, np.uint64).view(np.int64).reshape(shape)
        return D, I

    def search_batch(self, collection: str, xq, k: int = 10, ef: int = 0, nprobe: int = 0, exact: bool = False,
                     filter=None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of every row of ``xq`` (nq, d) in one call -> (D, I), each (nq, k)."""
        req = self._search_request(collection, xq, k, ef, nprobe, exact, filter, False, False)
        return self._arrays(self._call(self._search.SearchBatch, req))

    def search(self, collection: str, q, k: int = 10, ef: int = 0, nprobe: int = 0, exact: bool = False,
               filter=None, with_payloads: bool = False, with_vectors: bool = False) -> Hits:
        """k-NN of one query vector ``q`` (d,) over the client's search stream -> :class:`Hits`."""
        q = np.asarray(q, np.float32).reshape(1, -1)
        req = self._search_request(collection, q, k, ef, nprobe, exact, filter, with_payloads, with_vectors)
        resp = self._stream_call(req)
        D, I = self._arrays(resp)
        keep = I[0] != -1
        hits = Hits(ids=I[0][keep], distances=D[0][keep])
        if with_payloads:
            hits.payloads = [p for p, m in zip(_payloads_out(resp.payloads), keep) if m]
        if with_vectors:
            hits.vectors = convert.vectors_from_proto(resp.vectors)[keep]
        return hits

    def _stream_call(self, req: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        with self._stream_lock:
            for attempt in range(2):
                if self._stream is None:
                    self._stream = _Stream(self._search, self.timeout)
                try:
                    return self._stream.call(req)
                except grpc.RpcError as e:
                    self._stream.close()
                    self._stream = None
                    # the stream broke (server restart, idle reset): one retry on a fresh stream;
                    # refused because the server is saturated: one retry after its hint
                    wait = _retry_after_s(e)
                    if wait is not None and attempt == 0:
                        time.sleep(min(wait * random.uniform(1.0, 1.5), self.timeout))
                        continue
                    if e.code() != grpc.StatusCode.UNAVAILABLE and e.code() != grpc.StatusCode.CANCELLED \
                            or attempt == 1:
                        _raise(e)
                except StopIteration:
                    self._stream = None
                    if attempt == 1:
                        raise errors.Unavailable("the search stream closed") from None
        raise errors.Unavailable("search stream failed")

    # --- jobs --------------------------------------------------------------------------------------
    def start_job(self, kind: str, **params) -> dict:
        """Start a job (e.g. ``start_job("build_index", ...)``); returns its record at once."""
        req = jobs_pb2.StartJobRequest(kind=kind, params_json=json.dumps(params))
        return convert.job_from_proto(self._call(self._jobs.Start, req))

    def get_job(self, job_id: str) -> dict:
        return convert.job_from_proto(self._call(self._jobs.Get, jobs_pb2.JobRef(id=job_id)))

    def list_jobs(self, kind: str = "", state: str = "") -> list[dict]:
        resp = self._call(self._jobs.List, jobs_pb2.ListJobsRequest(kind=kind, state=state))
        return [convert.job_from_proto(j) for j in resp.jobs]

    def cancel_job(self, job_id: str) -> dict:
        return convert.job_from_proto(self._call(self._jobs.Cancel, jobs_pb2.JobRef(id=job_id)))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[dict]:
        """The job's record now and at every change, until it ends."""
        try:
            for msg in self._jobs.Watch(jobs_pb2.JobRef(id=job_id), timeout=timeout):
                yield convert.job_from_proto(msg)
        except grpc.RpcError as e:
            _raise(e)

    def wait_job(self, job_id: str, timeout: float | None = None) -> dict:
        """Block until the job ends; returns its final record (check ``state`` and ``error``)."""
        last = None
        for last in self.watch_job(job_id, timeout):
            pass
        return last if last is not None else self.get_job(job_id)

    def job_kinds(self) -> list[dict]:
        resp = self._call(self._jobs.Kinds, jobs_pb2.ListJobKindsRequest())
        return [{"name": k.name, "description": k.description, "resumable": k.resumable} for k in resp.kinds]

    # --- drafts (speculative decoding) -------------------------------------------------------------
    def _drafts_stub(self):
        stub = getattr(self, "_drafts", None)
        if stub is None:
            from retrieval.v1 import drafts_pb2_grpc

            stub = self._drafts = drafts_pb2_grpc.DraftsStub(self._channel)
        return stub

    def draft_session(self, prompt_ids, vocab_size: int, datastore: str | None = None, sources=None,
                      max_nodes: int = 0, max_depth: int = 0, chain: bool = False) -> "DraftSession":
        """Open a draft session (one bidirectional stream per generation); ``session.draft`` is the
        first draft. Then ``session.append(accepted_ids, topk=None) -> Draft`` per verification step, and
        ``session.close()`` (or a ``with`` block) at the end. 0 budgets: server default."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget

        budget = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        return DraftSession(self._drafts_stub(), dconv.open_to_proto(prompt_ids, vocab_size, datastore, sources, budget))

    def draft(self, context_ids, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
              max_depth: int = 0, chain: bool = False):
        """Stateless draft for ``context_ids`` -> :class:`retrieval.drafting.Draft`."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget

        req = dconv.draft_request_to_proto(context_ids, vocab_size, datastore, sources,
                                           DraftBudget(max_nodes or 64, max_depth or 10, not chain))
        return dconv.draft_from_proto(self._call(self._drafts_stub().Draft, req).draft)

    def draft_batch(self, contexts, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
                    max_depth: int = 0, chain: bool = False) -> list:
        """Stateless drafts for several contexts in one call."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget
        from retrieval.v1 import drafts_pb2

        b = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        req = drafts_pb2.DraftBatchRequest(
            requests=[dconv.draft_request_to_proto(c, vocab_size, datastore, sources, b) for c in contexts])
        return [dconv.draft_from_proto(r.draft) for r in self._call(self._drafts_stub().DraftBatch, req).replies]

    def build_datastore(self, name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                        input_format: str = "auto", text_fields=None, overwrite: bool = False, wait: bool = True) -> dict:
        """Build a corpus datastore from files the server can read (a job). ``wait``: block until it ends
        and return the final job record, else the record at once."""
        from retrieval.drafting import convert as dconv

        req = dconv.build_request_to_proto(name, inputs, tokenizer, vocab_size, input_format, text_fields, overwrite)
        job = convert.job_from_proto(self._call(self._drafts_stub().BuildDatastore, req))
        if not wait:
            return job
        job = self.wait_job(job["id"])
        while job["state"] not in ("succeeded", "failed", "cancelled"):  # a watch may end on a stale record
            time.sleep(0.05)
            job = self.get_job(job["id"])
        return job

    def list_datastores(self) -> list[dict]:
        from retrieval.drafting import convert as dconv
        from retrieval.v1 import drafts_pb2

        resp = self._call(self._drafts_stub().ListDatastores, drafts_pb2.ListDatastoresRequest())
        return [dconv.datastore_info_from_proto(d) for d in resp.datastores]

    def describe_datastore(self, name: str) -> dict:
        from retrieval.drafting import convert as dconv
        from retrieval.v1 import drafts_pb2

        return dconv.datastore_info_from_proto(self._call(self._drafts_stub().DescribeDatastore,
                                                          drafts_pb2.DatastoreRef(name=name)))

    def drop_datastore(self, name: str) -> None:
        from retrieval.v1 import drafts_pb2

        self._call(self._drafts_stub().DropDatastore, drafts_pb2.DatastoreRef(name=name))


    # --- cross-encoder k-NN (ANNCUR / adaptive) ---------------------------------------------------
    def _ce_stub(self):
        stub = getattr(self, "_ce", None)
        if stub is None:
            from retrieval.v1 import crossencoder_pb2_grpc

            stub = self._ce = crossencoder_pb2_grpc.CrossEncoderStub(self._channel)
        return stub

    def _ce_long_call(self, fn, request, timeout: float | None):
        try:
            return fn(request, timeout=timeout if timeout is not None else max(self.timeout, 600.0))
        except grpc.RpcError as e:
            _raise(e)

    def build_ce_index(self, name: str, scorer: dict, items: list[dict] | None = None, items_path: str | None = None,
                       anchor_queries: list[str] | None = None, query_log: list[str] | None = None,
                       k_q: int | None = None, query_seed: int = 0, dual_encoder: dict | None = None,
                       params: dict | None = None, wait: bool = True, timeout: float | None = None) -> dict:
        """Build a cross-encoder index (a job, kind ``crossencoder_build``). ``scorer``:
        ``{"name": "minilm-joint" | "hf" | "joint-encoder", "model_dir"?, "batch_size"?, "device"?,
        "precision"?, "max_length"?}``; ``items``: ``[{"id", "text", "payload"?}]`` (or ``items_path`` on
        the server); ``params``: build params (``k_i``, ``anchor_method``, ...). ``wait``: block until the
        job ends and return its final record, else the record at once."""
        from retrieval.crossencoder import convert as cconv

        req = cconv.build_request_to_proto(name, scorer, items, items_path, anchor_queries, query_log, k_q,
                                           query_seed, dual_encoder, params)
        job = convert.job_from_proto(self._ce_long_call(self._ce_stub().BuildIndex, req, timeout))
        return self.wait_job(job["id"]) if wait else job

    def ce_add_items(self, index: str, ids, texts, payloads: list | None = None, timeout: float | None = None) -> dict:
        """Add items (``k_q`` cross-encoder calls each); returns added, calls, seconds, truncated_items."""
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        items = [{"id": int(i), "text": t, "payload": p}
                 for i, t, p in zip(ids, texts, payloads if payloads is not None else [None] * len(texts), strict=True)]
        req = cpb.AddCrossEncoderItemsRequest(index=index, items=cconv.items_to_proto(items))
        return cconv.add_result_from_proto(self._ce_long_call(self._ce_stub().AddItems, req, timeout))

    def ce_delete_items(self, index: str, ids) -> int:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.DeleteCrossEncoderItemsRequest(index=index, ids=[int(i) for i in ids])
        return int(self._call(self._ce_stub().DeleteItems, req).deleted)

    @staticmethod
    def _ce_params(mode, budget, k_i, rounds, seed_fraction, ridge):
        from retrieval.v1 import crossencoder_pb2 as cpb

        p = cpb.CrossEncoderSearchParams(mode=mode, k_i=k_i, rounds=rounds)
        if budget is not None:  # None: unset, the server's default; 0 is sent and refused
            p.budget = budget
        if seed_fraction is not None:
            p.seed_fraction = seed_fraction
        if ridge is not None:
            p.ridge = ridge
        return p

    def ce_search(self, index: str, query: str, k: int = 10, mode: str = "", budget: int | None = None,
                  k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None, ridge: float | None = None,
                  with_payloads: bool = False, timeout: float | None = None) -> dict:
        """Top-``k`` items for ``query`` within ``budget`` cross-encoder calls (``budget`` None, other
        fields 0 / "": server defaults; an explicit ``budget`` below what the mode needs, 0 included,
        raises InvalidArgument).
        Returns ``ids`` int64 (<= k,), ``scores`` float32 exact CE scores, ``calls``, the server's
        ``scorer_seconds`` / ``other_seconds``, and ``latency_seconds`` measured here (the wire and
        the server's gRPC layer are ``latency - scorer - other``)."""
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.CrossEncoderSearchRequest(index=index, query=query, k=k, with_payloads=with_payloads,
                                            params=self._ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        t0 = time.perf_counter()
        resp = self._ce_long_call(self._ce_stub().Search, req, timeout)
        out = cconv.hits_from_proto(resp)
        out["latency_seconds"] = time.perf_counter() - t0
        return out

    def ce_search_batch(self, index: str, queries: list[str], k: int = 10, mode: str = "", budget: int | None = None,
                        k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None, ridge: float | None = None,
                        with_payloads: bool = False, timeout: float | None = None) -> list[dict]:
        """:meth:`ce_search` for several queries in one call (each round is one scorer batch)."""
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.CrossEncoderSearchBatchRequest(index=index, queries=list(queries), k=k, with_payloads=with_payloads,
                                                 params=self._ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        return [cconv.hits_from_proto(r) for r in self._ce_long_call(self._ce_stub().SearchBatch, req, timeout).results]

    def describe_ce_index(self, index: str) -> dict:
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        return cconv.info_from_proto(self._ce_long_call(self._ce_stub().Describe, cpb.CrossEncoderIndexRef(index=index),
                                                        None))

    def list_ce_indexes(self) -> list[dict]:
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        resp = self._ce_long_call(self._ce_stub().ListIndexes, cpb.ListCrossEncoderIndexesRequest(), None)
        return [cconv.info_from_proto(i) for i in resp.indexes]

    def drop_ce_index(self, index: str) -> None:
        from retrieval.v1 import crossencoder_pb2 as cpb

        self._call(self._ce_stub().DropIndex, cpb.CrossEncoderIndexRef(index=index))

    def ce_set_anchor_items(self, index: str, k_i: int = 0, anchor_method: str = "", seed: int | None = None) -> dict:
        """Re-choose the anchor items / ``k_i`` and re-solve from the stored scores (no cross-encoder call)."""
        from retrieval.crossencoder import convert as cconv

        req = cconv.set_anchor_items_to_proto(index, k_i, anchor_method, seed)
        return cconv.info_from_proto(self._ce_long_call(self._ce_stub().SetAnchorItems, req, None))


    # --- graphs (FastRP, NCN / NCNC link prediction) ------------------------------------------------
    def _graphs_stub(self):
        stub = getattr(self, "_graphs", None)
        if stub is None:
            from retrieval.v1 import graphs_pb2_grpc

            stub = self._graphs = graphs_pb2_grpc.GraphsStub(self._channel)
        return stub

    def create_graph(self, name: str, num_nodes: int = 0, directed: bool = False, weighted: bool = False) -> dict:
        """Create an empty graph with ``num_nodes`` isolated nodes; returns its description."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.CreateGraphRequest(graph=name, num_nodes=num_nodes, directed=directed, weighted=weighted)
        return gconv.graph_info_from_proto(self._call(self._graphs_stub().CreateGraph, req))

    def list_graphs(self) -> list[dict]:
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        resp = self._call(self._graphs_stub().ListGraphs, gpb.ListGraphsRequest())
        return [gconv.graph_info_from_proto(g) for g in resp.graphs]

    def describe_graph(self, name: str) -> dict:
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        return gconv.graph_info_from_proto(self._call(self._graphs_stub().DescribeGraph, gpb.GraphRef(graph=name)))

    def drop_graph(self, name: str) -> None:
        from retrieval.v1 import graphs_pb2 as gpb

        self._call(self._graphs_stub().DropGraph, gpb.GraphRef(graph=name))

    def add_nodes(self, graph: str, count: int) -> dict:
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        return gconv.graph_info_from_proto(self._call(self._graphs_stub().AddNodes,
                                                      gpb.AddNodesRequest(graph=graph, count=count)))

    def append_edges(self, graph: str, src, dst, weights=None, duplicates: str = "", chunk: int = 100_000,
                     timeout: float | None = None) -> dict:
        """Stream edges in chunks of ``chunk``; stored in one atomic step at the end (a bad chunk stores
        nothing). Returns ``{"received", "added", "m", "version"}``."""
        from retrieval.graph import convert as gconv

        src, dst = np.asarray(src), np.asarray(dst)
        if src.shape != dst.shape:
            raise errors.InvalidArgument(f"src and dst must have the same length, got {src.size} and {dst.size}")
        w = None if weights is None else np.asarray(weights, np.float32)

        def gen():
            if src.size == 0:
                yield gconv.edges_to_proto(graph, src, dst, None, duplicates)
            for s in range(0, src.size, chunk):
                yield gconv.edges_to_proto(graph if s == 0 else "", src[s:s + chunk], dst[s:s + chunk],
                                           None if w is None else w[s:s + chunk], duplicates)

        try:
            resp = self._graphs_stub().AppendEdges(gen(), timeout=timeout if timeout is not None else max(self.timeout, 600.0))
        except grpc.RpcError as e:
            _raise(e)
        return gconv.append_result_from_proto(resp)

    def set_node_features(self, graph: str, features) -> dict:
        """Attach node features ``[n, f]`` (float32, packed); ``None`` removes them."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.SetFeaturesRequest(graph=graph)
        if features is not None:
            x = np.asarray(features, np.float32)
            if x.ndim != 2:
                raise errors.InvalidArgument(f"features must be a 2-D array [n, f], got shape {x.shape}")
            convert.vectors_to_proto(x, req.features)
        return gconv.graph_info_from_proto(self._call(self._graphs_stub().SetFeatures, req))

    def set_node_labels(self, graph: str, labels) -> dict:
        """Attach labels: int ``[n]`` (-1 = unlabeled) or a 0/1 matrix ``[n, L]``; ``None`` removes them."""
        from retrieval.graph import convert as gconv

        return gconv.graph_info_from_proto(self._call(self._graphs_stub().SetLabels,
                                                      gconv.labels_to_proto(graph, labels)))

    def neighbors(self, graph: str, nodes, direction: str = "out") -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, weights)]`` per node."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        nodes = np.atleast_1d(np.asarray(nodes, np.int64))
        req = gpb.NeighborsRequest(graph=graph, nodes=nodes.astype(np.uint64).tolist(), direction=direction)
        return gconv.neighbors_from_proto(self._call(self._graphs_stub().Neighbors, req))

    def run_fastrp(self, graph: str, dim: int, embedding: str = "fastrp", use_features: bool = False, index=None,
                   metric: str = "", wait: bool = True, **params) -> dict:
        """FastRP as a job (kind ``fastrp``); ``params``: iteration_weights, beta, s, self_influence,
        property_ratio, normalize, propagate_normalized, standardize, seed. ``wait``: return the final
        job record (else the record at once)."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.RunFastRPRequest(graph=graph, embedding=embedding, use_features=use_features, metric=metric,
                                   params=gconv.fastrp_params_to_proto(dict(params, dim=dim)))
        if index is not None:
            req.index.CopyFrom(_index_spec(index))
        job = convert.job_from_proto(self._call(self._graphs_stub().RunFastRP, req))
        return self._finish_job(job) if wait else job

    def _finish_job(self, job: dict) -> dict:
        job = self.wait_job(job["id"])
        while job["state"] not in ("succeeded", "failed", "cancelled"):  # a watch may end on a stale record
            time.sleep(0.05)
            job = self.get_job(job["id"])
        return job

    def similar_nodes(self, graph: str, nodes, k: int = 10, embedding: str = "fastrp", ef: int = 0,
                      exact: bool = False, include_self: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, distances)]`` per query node: its nearest nodes by FastRP embedding (cosine: 1 - cos)."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        nodes = np.atleast_1d(np.asarray(nodes, np.int64))
        req = gpb.SimilarNodesRequest(graph=graph, embedding=embedding, nodes=nodes.astype(np.uint64).tolist(), k=k,
                                      params=convert.query_params_to_proto(QueryParams(ef=ef, exact=exact)),
                                      include_self=include_self)
        return gconv.hits_from_proto(self._call(self._graphs_stub().SimilarNodes, req).results)

    def train_link_model(self, graph: str, model: str = "ncn", preset: str = "", config: dict | None = None,
                         seed: int = 0, val_frac: float | None = None, test_frac: float | None = None,
                         device: str = "", wait: bool = True) -> dict:
        """Train an NCN / NCNC / GCN link model (job kind ``link_model_train``); ``config``: NCNConfig
        overrides, e.g. ``{"predictor": "ncnc", "input": "learnable", "epochs": 50}``."""
        from retrieval.graph import convert as gconv

        p = {"graph": graph, "model": model, "preset": preset, "config": config or {}, "seed": seed, "device": device}
        if val_frac is not None:
            p["val_frac"] = val_frac
        if test_frac is not None:
            p["test_frac"] = test_frac
        job = convert.job_from_proto(self._call(self._graphs_stub().TrainLinkModel, gconv.train_params_to_request(p)))
        return self._finish_job(job) if wait else job

    def score_links(self, graph: str, src, dst, model: str = "ncn") -> np.ndarray:
        """Link probabilities float32 ``[P]`` for the pairs ``(src[i], dst[i])``."""
        from retrieval.v1 import graphs_pb2 as gpb

        src = np.atleast_1d(np.asarray(src, np.int64))
        dst = np.atleast_1d(np.asarray(dst, np.int64))
        req = gpb.ScoreLinksRequest(graph=graph, model=model, src=src.astype(np.uint64).tolist(),
                                    dst=dst.astype(np.uint64).tolist())
        resp = self._call(self._graphs_stub().ScoreLinks, req)
        return np.fromiter(resp.probabilities, dtype=np.float32, count=len(resp.probabilities))

    def predict_links(self, graph: str, nodes, k: int = 10, model: str = "ncn", candidates=None,
                      embedding: str = "", num_candidates: int = 0,
                      include_neighbors: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, probabilities)]`` per node: its top-k predicted new neighbours among ``candidates``,
        or the ``num_candidates`` nearest nodes in ``embedding``'s collection, or every node."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        nodes = np.atleast_1d(np.asarray(nodes, np.int64))
        req = gpb.PredictLinksRequest(graph=graph, model=model, nodes=nodes.astype(np.uint64).tolist(), k=k,
                                      embedding=embedding, num_candidates=num_candidates,
                                      include_neighbors=include_neighbors)
        if candidates is not None:
            req.candidates.extend(np.asarray(candidates, np.int64).astype(np.uint64).tolist())
        return gconv.hits_from_proto(self._call(self._graphs_stub().PredictLinks, req).results)


class DraftSession:
    """One generation's draft stream (see :meth:`Client.draft_session`). Not shared between threads."""

    def __init__(self, stub, open_request) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = stub.Session(iter(self._q.get, None), timeout=None)
        self.closed = False
        reply = self._send(open_request)
        self.session_id: str = reply.session_id

    def _send(self, req):
        from retrieval.drafting import convert as dconv

        if self.closed:
            raise errors.FailedPrecondition("this draft session is closed")
        self._q.put(req)
        try:
            reply = next(self._responses)
        except grpc.RpcError as e:
            self.closed = True
            _raise(e)
        except StopIteration:
            self.closed = True
            raise errors.Unavailable("the draft stream ended") from None
        self.step = reply.step
        self.draft = dconv.draft_from_proto(reply.draft)
        return reply

    def append(self, accepted_ids, topk=None, max_nodes: int = 0, max_depth: int = 0, chain: bool | None = None):
        """Send the accepted ids (accepted draft tokens + the bonus token), optionally the model's top-k
        ids per position (``(len(accepted_ids), k)``); returns the next draft."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget

        budget = None
        if max_nodes or max_depth or chain is not None:
            budget = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        self._send(dconv.append_to_proto(accepted_ids, topk, budget))
        return self.draft

    def close(self, discard: bool = False) -> None:
        """End the generation; the server records its output in the shared history unless ``discard``."""
        from retrieval.drafting import convert as dconv

        if self.closed:
            return
        self._q.put(dconv.close_to_proto(discard))
        self._q.put(None)
        self.closed = True
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                _raise(e)

    def abort(self) -> None:
        """Drop the stream without ending the generation cleanly (nothing is recorded)."""
        self.closed = True
        self._responses.cancel()

    def __enter__(self) -> "DraftSession":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
