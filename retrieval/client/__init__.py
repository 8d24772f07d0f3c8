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

Bad input is refused here, before anything is sent, with ``InvalidArgument`` naming the argument:
ids must be non-negative integers (not ``-1``, ``1.5`` or ``"7"``; pass ids of 2**63 and above as
uint64), and ``k``, ``ef``, ``nprobe``, ``limit`` must fit uint32.

Thread-safety: one Client may be shared by the threads of a web server, and their calls run
concurrently. Every method is a call on the shared ``grpc.Channel`` (thread-safe); single-query
``search`` runs over long-lived bidirectional streams (the lowest latency gRPC offers in Python) from
a pool: a thread takes an idle stream or opens one, up to ``search_streams`` (default 8), and gives it
back after its call; past that, concurrent searches are unary calls. No lock is held across a call.
Measured (``bench/client_threads.py``, BIGANN-10k HNSW, k=10, a loaded 2-core machine): 8 threads on
one Client 1,199 QPS vs 562 for one thread (2.1x); one stream + unary fallback 568, unary only 381.
:meth:`Client.close` while other threads are mid-call ends their calls with ``Cancelled``. A
:class:`DraftSession` (one generation's stream) is used by one thread at a time.

Long work runs as server jobs (FastRP, link-model training, cross-encoder and datastore builds,
``run_job`` for any kind): the method that starts one waits for it with a tqdm bar on stderr driven by
``Jobs.Watch`` (``progress``: None, the default, draws it only when stderr is a terminal), and cancels
the job on the server when the wait is given up (Ctrl-C, its ``timeout``: :class:`JobTimeout`);
``detach=True`` returns the job's record at once and leaves it running.

For asyncio applications, :class:`retrieval.AsyncClient` (:mod:`retrieval.aio`) has the same methods
as coroutines, built on the same request builders and parsers (:mod:`retrieval.client_convert`).
"""

from __future__ import annotations

import json  # noqa: F401
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np

from retrieval import client_convert as cc
from retrieval import convert, errors
from retrieval.client_convert import Hits, JobTimeout, Points  # re-exported: retrieval.client.Hits
from retrieval.v1 import (collections_pb2, collections_pb2_grpc, common_pb2, jobs_pb2,  # noqa: F401
                          jobs_pb2_grpc, points_pb2, points_pb2_grpc, search_pb2, search_pb2_grpc)

log = logging.getLogger(__name__)

# the shared helpers under their historical names (engine sections below use them)
_CODES = cc.CODES
_SERVICE_CONFIG = cc.SERVICE_CONFIG
_retry_after_s = cc.retry_after_s
_pem = cc.pem
_read_key = cc.read_key
_raise = cc.raise_rpc
_payloads_out = cc.payloads_out
_payloads_in = cc.payloads_in
_filter = cc.filter_to_proto
_index_spec = cc.index_spec


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
    creds = cc.tls_credentials(tls, root_certificates, client_cert, client_key)
    if creds is not None:
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if api_key:
        channel = grpc.intercept_channel(channel, _KeyInterceptor(api_key))
    return channel


class _Stream:
    """A long-lived SearchStream: one request in, one response out, in order. Used by one thread at a
    time (the pool hands it out)."""

    def __init__(self, stub: search_pb2_grpc.SearchStub) -> None:
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


class _StreamPool:
    """The search streams of one Client, at most ``size`` open. :meth:`take` hands a thread an idle
    stream (or opens one) for one request / response, :meth:`give_back` returns it; when all ``size``
    are busy :meth:`take` returns None (the caller makes a unary call instead). Thread-safe: the lock
    is held only to move streams between the idle list and the callers, never across a call."""

    def __init__(self, stub: search_pb2_grpc.SearchStub, size: int) -> None:
        self._stub, self.size = stub, size
        self._lock = threading.Lock()
        self._idle: list[_Stream] = []
        self._open: set[_Stream] = set()
        self._opening = 0
        self.closed = False

    def take(self, fresh: bool = False) -> _Stream | None:
        """An idle stream, or (``fresh``, or none idle) a new one while fewer than ``size`` are open."""
        with self._lock:
            if self.closed:
                raise cc.closed_error()
            if self._idle and not fresh:
                return self._idle.pop()
            if len(self._open) + self._opening >= self.size:
                return None
            self._opening += 1
        try:
            s = _Stream(self._stub)  # starts the call; does not wait for the server
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            with self._lock:
                self._opening -= 1
            raise cc.closed_error() from None
        with self._lock:
            self._opening -= 1
            if not self.closed:
                self._open.add(s)
                return s
        s.close()
        raise cc.closed_error()

    def give_back(self, s: _Stream) -> None:
        with self._lock:
            if not self.closed and s in self._open:
                self._idle.append(s)
                return
        s.close()

    def drop(self, s: _Stream, idle_too: bool = False) -> None:
        """Close a broken stream; ``idle_too``: and the idle ones (the connection broke: they are dead too)."""
        with self._lock:
            self._open.discard(s)
            dead = [s]
            if idle_too:
                dead += self._idle
                self._open.difference_update(self._idle)
                self._idle = []
        for d in dead:
            d.close()

    def close(self) -> None:
        """Close every stream, the busy ones too: their callers get Cancelled."""
        with self._lock:
            self.closed = True
            dead, self._open, self._idle = list(self._open), set(), []
        for d in dead:
            d.close()


class _Requests:
    """A request iterator for a client-streaming call that remembers an exception raised while
    building requests (gRPC only logs "Exception iterating requests!" and cancels the call), so the
    caller gets that exception instead of a bare CANCELLED."""

    def __init__(self, it: Iterable) -> None:
        self._it = it
        self.error: BaseException | None = None

    def __iter__(self):
        try:
            yield from self._it
        except Exception as e:
            self.error = e
            raise

    def call(self, client: "Client", fn, timeout: float | None):
        try:
            return client._stream_call(fn, iter(self), timeout)
        except errors.RetrievalError:
            if self.error is not None:
                raise self.error from None
            raise


class Client:
    """A connection to one server; see the module docstring.

    ``timeout``: seconds per call (default 30); ``max_busy_retries``: retries of a call the saturated
    server refused with a retry-after hint; ``search_streams``: at most this many search streams open
    at once (one per thread calling :meth:`search` concurrently; past that, concurrent searches are
    unary calls on the shared channel; 0: unary calls only).

    Thread-safety: one Client may be shared by any number of threads and its calls run concurrently:
    every method is a call on the shared ``grpc.Channel`` (thread-safe) or on a search stream taken
    from the pool for the length of one call; no lock is held across a call. :meth:`close` may be
    called while other threads are mid-call: their calls end with :class:`errors.Cancelled`.
    A :class:`DraftSession` is one generation's stream and is used by one thread at a time.
    """

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5, search_streams: int = 8) -> None:
        self.address = address
        self.timeout = timeout
        self.max_busy_retries = max_busy_retries
        self._channel = channel or make_channel(
            address, _read_key(api_key, api_key_file), tls, root_certificates, client_cert, client_key, server_name,
            options=cc.channel_options(max_message_bytes))
        self._collections = collections_pb2_grpc.CollectionsStub(self._channel)
        self._points = points_pb2_grpc.PointsStub(self._channel)
        self._search = search_pb2_grpc.SearchStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._pool = _StreamPool(self._search, search_streams)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the streams and the channel. Idempotent; calls in flight in other threads end with
        :class:`errors.Cancelled`, later calls raise it at once."""
        self._closed = True
        self._pool.close()
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

    def _call(self, fn, request, timeout: float | None = None):
        """``fn(request)`` with the deadline ``timeout`` (default: the client's), retried after the
        server's hint while it refuses because it is busy (``max_busy_retries`` times)."""
        t_end = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(self.max_busy_retries + 1):
            if self._closed:
                raise cc.closed_error()
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
            except ValueError:
                if self._closed:  # "Cannot invoke RPC on closed channel!"
                    raise cc.closed_error() from None
                raise

    def _stream_call(self, fn, request_iterator, timeout: float | None):
        """A client-streaming call (no busy retries: the iterator cannot be replayed)."""
        if self._closed:
            raise cc.closed_error()
        try:
            return fn(request_iterator, timeout=timeout)
        except grpc.RpcError as e:
            _raise(e)
        except ValueError:
            if self._closed:
                raise cc.closed_error() from None
            raise

    # --- collections -------------------------------------------------------------------------------
    def create_collection(self, name: str, dimension: int, metric: str = "l2", index=None, shards: int = 1) -> dict:
        """Create a collection. ``index``: "hnsw" | "exact" | {"type": "faiss", "factory": "IVF256,PQ16"} |
        {"type": "hnsw", "m": 32, "ef_construction": 400}. Returns its description."""
        req = cc.create_collection_request(name, dimension, metric, index, shards)
        return cc.collection_info(self._call(self._collections.Create, req))

    def list_collections(self, include_internal: bool = False) -> list[dict]:
        """The collections. ``include_internal``: also those the server keeps for itself (the FastRP
        collections of graphs, ``g-<graph>-<embedding>-<token>``), hidden by default."""
        req = collections_pb2.ListCollectionsRequest(include_internal=bool(include_internal))
        return cc.collection_list(self._call(self._collections.List, req))

    def describe_collection(self, name: str) -> dict:
        return cc.collection_info(self._call(self._collections.Describe, cc.describe_collection_request(name)))

    def create_payload_index(self, collection: str, key: str, type: str) -> dict:
        """Index payload ``key`` (dotted path) of ``collection`` as ``type``: "keyword", "integer",
        "float", "bool" or "datetime". Returns ``{"key", "type", "points"}`` once it is built."""
        req = cc.create_payload_index_request(collection, key, type)
        return cc.payload_index(self._call(self._collections.CreatePayloadIndex, req))

    def drop_payload_index(self, collection: str, key: str) -> None:
        self._call(self._collections.DropPayloadIndex, cc.drop_payload_index_request(collection, key))

    def list_payload_indexes(self, collection: str) -> list[dict]:
        """``[{"key", "type", "points"}]`` of the collection's payload indexes."""
        req = cc.list_payload_indexes_request(collection)
        return cc.payload_index_list(self._call(self._collections.ListPayloadIndexes, req))

    def drop_collection(self, name: str) -> None:
        self._call(self._collections.Drop, cc.drop_collection_request(name))

    def repair_collection(self, name: str, index=None) -> dict:
        """Open a quarantined or unavailable collection again (its ``state`` / ``reason`` in
        :meth:`describe_collection` say why it is not served); with ``index`` (as in
        :meth:`create_collection`) its index is rebuilt from the stored points with that spec.
        Returns its description."""
        return cc.collection_info(self._call(self._collections.Repair, cc.repair_collection_request(name, index)))

    def import_collection(self, name: str, path: str, replace: bool = False, timeout: float | None = None) -> dict:
        """Attach a collection folder built offline (``index_builder build``) that the server can read
        at ``path`` (inside its allowed folders) as ``name``; with ``replace`` the old collection serves
        until the new one is ready. The server copies the folder, so this may take a while: ``timeout``
        defaults to an hour. Returns the collection's description."""
        req = cc.import_collection_request(name, path, replace)
        return cc.collection_info(self._call(self._collections.Import, req,
                                             timeout if timeout is not None else max(self.timeout, 3600.0)))

    # --- points ------------------------------------------------------------------------------------
    _upsert_request = staticmethod(cc.upsert_request)

    def upsert(self, collection: str, ids, vectors, payloads: list | None = None) -> int:
        """Insert or replace points; durable when this returns. ``ids`` (n,) integers in [0, 2**64 - 2];
        ``vectors`` (n, d); ``payloads`` dicts or None. Returns the write sequence number."""
        return self._call(self._points.Upsert, cc.upsert_request(collection, ids, vectors, payloads)).seq

    def upsert_stream(self, collection: str, batches: Iterable[tuple], timeout: float | None = None) -> int:
        """Bulk load over one stream: ``batches`` yields (ids, vectors) or (ids, vectors, payloads).
        Returns the number of points written. A bad batch (or an exception raised by ``batches``)
        cancels the stream and is raised here."""
        reqs = _Requests(cc.upsert_batch_request(collection, b) for b in batches)
        return reqs.call(self, self._points.UpsertStream, timeout).count

    def get(self, collection: str, ids, with_vectors: bool = True, with_payloads: bool = True) -> Points:
        req = cc.get_request(collection, ids, with_vectors, with_payloads)
        return cc.points_from_proto(self._call(self._points.Get, req), with_vectors, with_payloads)

    _points_out = staticmethod(cc.points_from_proto)

    def delete(self, collection: str, ids=None, filter=None) -> int:
        """Delete by ids or by filter (exactly one); returns how many points were deleted."""
        return self._call(self._points.Delete, cc.delete_request(collection, ids, filter)).count

    def count(self, collection: str, filter=None) -> int:
        return self._call(self._points.Count, cc.count_request(collection, filter)).count

    def scroll(self, collection: str, filter=None, start_id: int | None = None, limit: int = 100,
               with_vectors: bool = False, with_payloads: bool = True) -> Points:
        """One page of points in id order; pass ``result.next_id`` as ``start_id`` for the next one."""
        req = cc.scroll_request(collection, filter, start_id, limit, with_vectors, with_payloads)
        return cc.points_from_proto(self._call(self._points.Scroll, req), with_vectors, with_payloads)

    # --- search ------------------------------------------------------------------------------------
    _search_request = staticmethod(cc.search_request)
    _arrays = staticmethod(cc.search_arrays)

    def search_batch(self, collection: str, xq, k: int = 10, ef: int = 0, nprobe: int = 0, exact: bool = False,
                     filter=None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of every row of ``xq`` (nq, d) in one call -> (D, I), each (nq, k)."""
        req = cc.search_request(collection, xq, k, ef, nprobe, exact, filter)
        return cc.search_arrays(self._call(self._search.SearchBatch, req))

    def search(self, collection: str, q, k: int = 10, ef: int = 0, nprobe: int = 0, exact: bool = False,
               filter=None, with_payloads: bool = False, with_vectors: bool = False) -> Hits:
        """k-NN of one query vector ``q`` (d,) -> :class:`Hits`, over a search stream of the client's
        pool (a unary call when all ``search_streams`` are busy)."""
        q = cc.vectors_in(q, "q", ndim=1).reshape(1, -1)
        req = cc.search_request(collection, q, k, ef, nprobe, exact, filter, with_payloads, with_vectors)
        return cc.hits_from_proto(self._search_one(req), with_payloads, with_vectors)

    def _search_one(self, req: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        """One request over a pooled stream. A stream that breaks (server restart, idle reset) is
        dropped with the idle ones and the call retried once on a fresh stream; a stream the server
        refused because it is saturated is retried after its hint (``max_busy_retries``, within the
        deadline); other errors drop the stream (the server ends a stream on an error) and raise."""
        t_end = time.monotonic() + self.timeout
        fresh, broken_retries, busy_retries = False, 1, 0
        while True:
            s = self._pool.take(fresh)
            if s is None:  # every stream busy: a unary call on the shared channel
                return self._call(self._search.Search, req)
            try:
                resp = s.call(req)
            except grpc.RpcError as e:
                code = e.code()
                broken = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                self._pool.drop(s, idle_too=broken)
                if self._closed:
                    raise cc.closed_error() from None
                wait = _retry_after_s(e)
                if wait is not None and busy_retries < self.max_busy_retries:
                    wait *= random.uniform(1.0, 1.5)
                    if time.monotonic() + wait < t_end:
                        busy_retries += 1
                        time.sleep(wait)
                        fresh = True
                        continue
                if broken and broken_retries:
                    broken_retries -= 1
                    fresh = True
                    continue
                _raise(e)
            except StopIteration:
                self._pool.drop(s, idle_too=True)
                if self._closed:
                    raise cc.closed_error() from None
                if not broken_retries:
                    raise errors.Unavailable("the search stream closed") from None
                broken_retries -= 1
                fresh = True
                continue
            self._pool.give_back(s)
            return resp

    # --- jobs --------------------------------------------------------------------------------------
    def start_job(self, kind: str, **params) -> dict:
        """Start a job (e.g. ``start_job("build_index", ...)``); returns its record at once."""
        return cc.job(self._call(self._jobs.Start, cc.start_job_request(kind, params)))

    def get_job(self, job_id: str) -> dict:
        return cc.job(self._call(self._jobs.Get, cc.job_ref(job_id)))

    def list_jobs(self, kind: str = "", state: str = "") -> list[dict]:
        return cc.job_list(self._call(self._jobs.List, cc.list_jobs_request(kind, state)))

    def cancel_job(self, job_id: str) -> dict:
        return cc.job(self._call(self._jobs.Cancel, cc.job_ref(job_id)))

    def watch_job(self, job_id: str, timeout: float | None = None) -> Iterator[dict]:
        """The job's record now and at every change, until it ends."""
        if self._closed:
            raise cc.closed_error()
        try:
            call = self._jobs.Watch(cc.job_ref(job_id), timeout=timeout)
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            raise cc.closed_error() from None
        try:
            for msg in call:
                yield cc.job(msg)
        except grpc.RpcError as e:
            _raise(e)
        finally:
            call.cancel()  # no-op when the stream ended; ends it when the caller stopped early

    def wait_job(self, job_id: str, timeout: float | None = None, progress: bool | None = False) -> dict:
        """Block until the job ends; returns its final record (check ``state`` and ``error``).
        ``timeout``: seconds (the watch's deadline; the job is left running when it passes: it is
        not this call's job to cancel). ``progress``: a tqdm bar on stderr (None: when stderr is a
        terminal)."""
        last = None
        bar = cc.JobBar(cc.show_progress(progress), {"id": job_id})
        try:
            for last in self.watch_job(job_id, timeout):
                bar.update(last)
        finally:
            bar.close()
        return last if last is not None else self.get_job(job_id)

    def run_job(self, kind: str, *, progress: bool | None = None, detach: bool = False,
                timeout: float | None = None, **params) -> dict:
        """Start a job of ``kind`` (see :meth:`job_kinds`; e.g. ``build_index``) and wait for it, like
        every job-starting method: see :meth:`_run_job` for ``progress`` / ``detach`` / ``timeout``."""
        return self._run_job(self.start_job(kind, **params), progress, detach, timeout)

    def _run_job(self, job: dict, progress: bool | None = None, detach: bool = False,
                 timeout: float | None = None) -> dict:
        """Follow a job this client just started (record ``job``) until it ends; returns its final
        record (``state`` "succeeded" | "failed" | "cancelled"; a failed job is returned, not raised).

        ``progress``: a tqdm bar on stderr driven by ``Jobs.Watch`` (None, the default: only when
        stderr is a terminal; True: always; False: never). ``detach``: return ``job`` at once and
        leave the job running. ``timeout``: seconds to wait (None: no limit); past it the job is
        cancelled on the server and :class:`JobTimeout` raised. A ``KeyboardInterrupt`` (Ctrl-C)
        while waiting cancels the job too, then propagates."""
        if detach:
            return job
        try:
            return self._follow_job(job, progress, timeout)
        except (KeyboardInterrupt, JobTimeout):
            self._cancel_quietly(job["id"])
            raise

    def _follow_job(self, job: dict, progress: bool | None, timeout: float | None) -> dict:
        t_end = None if timeout is None else time.monotonic() + timeout
        bar = cc.JobBar(cc.show_progress(progress), job)
        rec = job
        try:
            while rec["state"] not in cc.JOB_FINAL:
                left = None if t_end is None else t_end - time.monotonic()
                if left is not None and left <= 0:
                    raise cc.job_timeout_error(rec, timeout)
                try:
                    for rec in self.watch_job(job["id"], left):
                        bar.update(rec)
                except errors.RetrievalError as e:
                    if getattr(e, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise cc.job_timeout_error(rec, timeout) from None
                    raise
                if rec["state"] not in cc.JOB_FINAL:  # a watch may end on a stale record
                    time.sleep(0.05)
                    rec = self.get_job(job["id"])
                    bar.update(rec)
            return rec
        finally:
            bar.close()

    def _cancel_quietly(self, job_id: str) -> None:
        """Cancel a job this client gave up on; a job that ended meanwhile, or a server that cannot be
        reached, is logged, not raised (the interrupt or timeout is what the caller must see)."""
        try:
            self._call(self._jobs.Cancel, cc.job_ref(job_id), min(self.timeout, 10.0))
            log.info("cancelled job %s", job_id)
        except (errors.RetrievalError, ValueError) as e:
            log.warning("could not cancel job %s: %s", job_id, e)

    def job_kinds(self) -> list[dict]:
        return cc.job_kinds(self._call(self._jobs.Kinds, cc.job_kinds_request()))

    # --- drafts (speculative decoding) -------------------------------------------------------------
    def _drafts_stub(self):
        stub = getattr(self, "_drafts", None)
        if stub is None:
            from retrieval.v1 import drafts_pb2_grpc

            stub = self._drafts = drafts_pb2_grpc.DraftsStub(self._channel)
        return stub

    def draft_session(self, prompt_ids, vocab_size: int, datastore: str | None = None, sources=None,
                      max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *,
                      tokenizer=None) -> "DraftSession":
        """Open a draft session (one bidirectional stream per generation); ``session.draft`` is the
        first draft. Then ``session.append(accepted_ids, topk=None) -> Draft`` per verification step, and
        ``session.close()`` (or a ``with`` block) at the end. 0 budgets: server default.

        ``tokenizer`` (optional, recommended): the model's tokenizer (a Hugging Face / ``tokenizers`` /
        SentencePiece object, a tokenizer file) or its fingerprint string
        (:func:`retrieval.drafting.tokenizer.tokenizer_fingerprint`, computed once per object and cached).
        The server then keeps learned state for that tokenizer alone and refuses a datastore built with
        another one (``FailedPrecondition``). Without it, state is shared by every tokenizer of
        ``vocab_size`` ids that names none.

        A message the server refuses (bad ids, malformed top-k...) raises the matching error from
        ``append`` and leaves the session open and as it was."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget

        budget = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        return DraftSession(self._drafts_stub(), dconv.open_to_proto(prompt_ids, vocab_size, datastore, sources, budget,
                                                                     _fingerprint(tokenizer)))

    def draft(self, context_ids, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
              max_depth: int = 0, chain: bool = False, *, tokenizer=None):
        """Stateless draft for ``context_ids`` -> :class:`retrieval.drafting.Draft` (``tokenizer``: as in
        :meth:`draft_session`)."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget

        req = dconv.draft_request_to_proto(context_ids, vocab_size, datastore, sources,
                                           DraftBudget(max_nodes or 64, max_depth or 10, not chain),
                                           _fingerprint(tokenizer))
        return dconv.draft_from_proto(self._call(self._drafts_stub().Draft, req).draft)

    def draft_batch(self, contexts, vocab_size: int, datastore: str | None = None, sources=None, max_nodes: int = 0,
                    max_depth: int = 0, chain: bool = False, *, tokenizer=None) -> list:
        """Stateless drafts for several contexts in one call (``tokenizer``: as in :meth:`draft_session`)."""
        from retrieval.drafting import convert as dconv
        from retrieval.drafting.draft import DraftBudget
        from retrieval.v1 import drafts_pb2

        b = DraftBudget(max_nodes or 64, max_depth or 10, not chain)
        fp = _fingerprint(tokenizer)
        req = drafts_pb2.DraftBatchRequest(
            requests=[dconv.draft_request_to_proto(c, vocab_size, datastore, sources, b, fp) for c in contexts])
        return [dconv.draft_from_proto(r.draft) for r in self._call(self._drafts_stub().DraftBatch, req).replies]

    def build_datastore(self, name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                        input_format: str = "auto", text_fields=None, overwrite: bool = False, wait: bool = True, *,
                        progress: bool | None = None, detach: bool = False, timeout: float | None = None,
                        tokenizer_fingerprint=None) -> dict:
        """Build a corpus datastore from files the server can read (a job, kind ``build_datastore``).
        Returns the final job record; ``detach`` (or ``wait=False``): the record at once.
        ``progress`` / ``timeout`` / Ctrl-C: as in :meth:`_run_job`. ``tokenizer_fingerprint`` (id inputs):
        the tokenizer that made the ids (an object or a fingerprint, as ``tokenizer=`` of :meth:`draft_session`),
        recorded so sessions naming another tokenizer are refused (a text build records its tokenizer's)."""
        from retrieval.drafting import convert as dconv

        req = dconv.build_request_to_proto(name, inputs, tokenizer, vocab_size, input_format, text_fields, overwrite,
                                           _fingerprint(tokenizer_fingerprint))
        job = convert.job_from_proto(self._call(self._drafts_stub().BuildDatastore, req))
        return self._run_job(job, progress, detach or not wait, timeout)

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
                       params: dict | None = None, wait: bool = True, timeout: float | None = None, *,
                       progress: bool | None = None, detach: bool = False) -> dict:
        """Build a cross-encoder index (a job, kind ``crossencoder_build``). ``scorer``:
        ``{"name": "minilm-joint" | "hf" | "joint-encoder", "model_dir"?, "batch_size"?, "device"?,
        "precision"?, "max_length"?}``; ``items``: ``[{"id", "text", "payload"?}]`` (or ``items_path`` on
        the server); ``params``: build params (``k_i``, ``anchor_method``, ...). Returns the job's final
        record; ``detach`` (or ``wait=False``): the record at once. ``timeout``: seconds for the call
        that starts it and for the wait (None: 600 s to start, no limit to wait); ``progress`` /
        ``timeout`` / Ctrl-C: as in :meth:`_run_job`."""
        from retrieval.crossencoder import convert as cconv

        req = cconv.build_request_to_proto(name, scorer, items, items_path, anchor_queries, query_log, k_q,
                                           query_seed, dual_encoder, params)
        job = convert.job_from_proto(self._ce_long_call(self._ce_stub().BuildIndex, req, timeout))
        return self._run_job(job, progress, detach or not wait, timeout)

    def ce_add_items(self, index: str, ids, texts, payloads: list | None = None, timeout: float | None = None) -> dict:
        """Add items (``k_q`` cross-encoder calls each); returns added, calls, seconds, truncated_items."""
        from retrieval.crossencoder import convert as cconv
        from retrieval.v1 import crossencoder_pb2 as cpb

        items = [{"id": i, "text": t, "payload": p}
                 for i, t, p in zip(cc.ids_to_list(ids), texts, payloads if payloads is not None else [None] * len(texts), strict=True)]
        req = cpb.AddCrossEncoderItemsRequest(index=index, items=cconv.items_to_proto(items))
        return cconv.add_result_from_proto(self._ce_long_call(self._ce_stub().AddItems, req, timeout))

    def ce_delete_items(self, index: str, ids) -> int:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.DeleteCrossEncoderItemsRequest(index=index, ids=cc.ids_to_list(ids))
        return int(self._call(self._ce_stub().DeleteItems, req).deleted)

    _ce_params = staticmethod(cc.ce_params)

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
                     timeout: float | None = None, self_loops: str = "") -> dict:
        """Stream edges in chunks of ``chunk``; stored in one atomic step at the end (a bad chunk stores
        nothing). Ids are checked here first (a fraction, a negative id or a string names its position);
        ids >= n are refused by the server, naming the position too. ``self_loops``: ``drop`` (the
        server's default on undirected graphs), ``keep`` (default on directed ones) or ``reject``.
        Returns ``{"received", "added", "m", "version", "self_loops_dropped"}``."""
        from retrieval.graph import convert as gconv

        src, dst = gconv.node_ids_in(src, "src"), gconv.node_ids_in(dst, "dst")
        reqs = cc.edge_requests(graph, src, dst, weights, duplicates, chunk)
        reqs[0].self_loops = self_loops or ""
        resp = self._stream_call(self._graphs_stub().AppendEdges, iter(reqs),
                                 timeout if timeout is not None else max(self.timeout, 600.0))
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

        req = cc.neighbors_request(graph, nodes, direction)
        return gconv.neighbors_from_proto(self._call(self._graphs_stub().Neighbors, req))

    def run_fastrp(self, graph: str, dim: int, embedding: str = "fastrp", use_features: bool = False, index=None,
                   metric: str = "", wait: bool = True, *, progress: bool | None = None, detach: bool = False,
                   timeout: float | None = None, **params) -> dict:
        """FastRP as a job (kind ``fastrp``); ``params``: iteration_weights, beta, s, self_influence,
        property_ratio, normalize, propagate_normalized, standardize, seed. Returns the final job
        record; ``detach`` (or ``wait=False``): the record at once. ``progress`` / ``timeout`` /
        Ctrl-C: as in :meth:`_run_job` (the job is cancelled when the wait is given up)."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.RunFastRPRequest(graph=graph, embedding=embedding, use_features=use_features, metric=metric,
                                   params=gconv.fastrp_params_to_proto(dict(params, dim=dim)))
        if index is not None:
            req.index.CopyFrom(_index_spec(index))
        job = convert.job_from_proto(self._call(self._graphs_stub().RunFastRP, req))
        return self._run_job(job, progress, detach or not wait, timeout)

    def _finish_job(self, job: dict) -> dict:
        return self._run_job(job, progress=False)

    def import_graph(self, name: str, path: str, format: str = "auto", *, mode: str = "auto",
                     delimiter: str | None = None, header: bool | None = None, directed: bool | None = None,
                     weighted: bool | None = None, index_base=0, num_nodes: int | None = None,
                     self_loops: str | None = None, duplicates: str | None = None, progress: bool | None = None,
                     detach: bool = False, timeout: float | None = None) -> dict:
        """Read a graph file *on the server* into graph ``name`` (job kind ``import_graph``).

        ``path``: a file or folder inside the server's allowed folders (``security.client_file_dirs``).
        ``format``: ``auto`` (from the suffix / folder layout), ``csv``, ``tsv``, ``edgelist`` (text;
        ``delimiter`` None = sniffed), ``mat`` (adjacency ``network`` + labels ``group``, as BlogCatalog
        ships), ``planetoid`` (features and labels too) or ``ogbl``. ``mode``: ``auto`` (create the graph
        when missing, else append), ``create`` or ``append``. ``header``: None = detected. ``index_base``:
        0 (ids as written, the default), 1 (1-based files) or "auto" (1 when no id 0 appears). ``self_loops``:
        drop | keep | reject (default: drop on undirected graphs). Returns the final job record (its
        ``result``: nodes, edges added, ...); ``detach``: at once. ``progress`` / ``timeout`` / Ctrl-C: as
        in :meth:`_run_job`."""
        params = {"graph": name, "path": path, "format": format, "mode": mode, "delimiter": delimiter,
                  "header": header, "directed": directed, "weighted": weighted, "index_base": index_base,
                  "num_nodes": num_nodes, "self_loops": self_loops, "duplicates": duplicates}
        params = {k: v for k, v in params.items() if v is not None}
        return self._run_job(self.start_job("import_graph", **params), progress, detach, timeout)

    def get_embeddings(self, graph: str, name: str = "fastrp", nodes=None, timeout: float | None = None) -> np.ndarray:
        """Stored node embeddings of ``graph``: float32 ``[len(nodes), d]`` in the order of ``nodes``, or
        ``[n, d]`` for every node when ``nodes`` is None (streamed in chunks)."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.GetEmbeddingsRequest(graph=graph, embedding=name, all=nodes is None)
        if nodes is not None:
            ids = gconv.node_ids_in(nodes, "nodes")
            if ids.size == 0:
                return np.zeros((0, 0), np.float32)
            req.nodes.extend(ids.tolist())
        if self._closed:
            raise cc.closed_error()
        try:
            call = self._graphs_stub().GetEmbeddings(req, timeout=timeout if timeout is not None else
                                                     max(self.timeout, 600.0))
        except ValueError:
            raise cc.closed_error() from None
        try:
            X, _ = gconv.embeddings_from_chunks(call)
        except grpc.RpcError as e:
            _raise(e)
        finally:
            call.cancel()
        return X

    def similar_nodes(self, graph: str, nodes, k: int = 10, embedding: str = "fastrp", ef: int = 0,
                      exact: bool = False, include_self: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, distances)]`` per query node: its nearest nodes by FastRP embedding (cosine: 1 - cos)."""
        from retrieval.graph import convert as gconv

        req = cc.similar_nodes_request(graph, nodes, k, embedding, ef, exact, include_self)
        return gconv.hits_from_proto(self._call(self._graphs_stub().SimilarNodes, req).results)

    def train_link_model(self, graph: str, model: str = "ncn", preset: str = "", config: dict | None = None,
                         seed: int = 0, val_frac: float | None = None, test_frac: float | None = None,
                         device: str = "", wait: bool = True, *, progress: bool | None = None, detach: bool = False,
                         timeout: float | None = None, evaluate: str = "") -> dict:
        """Train an NCN / NCNC / GCN link model (job kind ``link_model_train``); ``config``: NCNConfig
        overrides, e.g. ``{"predictor": "ncnc", "input": "learnable", "epochs": 50}``. ``evaluate``:
        ``holdout`` (default: 70/10/20 split, held-out edges masked when the model serves) or ``none``
        (every edge trains, no metrics). Returns the final job record; ``detach`` (or ``wait=False``): the
        record at once. ``progress`` / ``timeout`` / Ctrl-C: as in :meth:`_run_job`."""
        from retrieval.graph import convert as gconv

        p = {"graph": graph, "model": model, "preset": preset, "config": config or {}, "seed": seed, "device": device,
             "evaluate": evaluate}
        if val_frac is not None:
            p["val_frac"] = val_frac
        if test_frac is not None:
            p["test_frac"] = test_frac
        job = convert.job_from_proto(self._call(self._graphs_stub().TrainLinkModel, gconv.train_params_to_request(p)))
        return self._run_job(job, progress, detach or not wait, timeout)

    def score_links(self, graph: str, src, dst, model: str = "ncn") -> np.ndarray:
        """Link probabilities float32 ``[P]`` for the pairs ``(src[i], dst[i])``."""

        return cc.link_probabilities(self._call(self._graphs_stub().ScoreLinks,
                                                cc.score_links_request(graph, src, dst, model)))

    def predict_links(self, graph: str, nodes, k: int = 10, model: str = "ncn", candidates=None,
                      embedding: str = "", num_candidates: int = 0,
                      include_neighbors: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, probabilities)]`` per node: its top-k predicted new neighbours among ``candidates``,
        or the ``num_candidates`` nearest nodes in ``embedding``'s collection, or every node."""
        from retrieval.graph import convert as gconv

        req = cc.predict_links_request(graph, nodes, k, model, candidates, embedding, num_candidates,
                                       include_neighbors)
        return gconv.hits_from_proto(self._call(self._graphs_stub().PredictLinks, req).results)


def _fingerprint(tokenizer) -> str | None:
    """The vocabulary fingerprint of ``tokenizer`` (None stays None), cached on objects that allow it."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        from retrieval.drafting.tokenizer import is_fingerprint, tokenizer_fingerprint

        return tokenizer if is_fingerprint(tokenizer) or not os.path.exists(tokenizer) else tokenizer_fingerprint(tokenizer)
    fp = getattr(tokenizer, "_retrieval_vocab_fingerprint", None)
    if fp is None:
        from retrieval.drafting.tokenizer import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        try:
            tokenizer._retrieval_vocab_fingerprint = fp  # hashing a 32k vocabulary costs ~10 ms: once per object
        except (AttributeError, TypeError):  # objects without a __dict__
            pass
    return fp


class DraftSession:
    """One generation's draft stream (see :meth:`Client.draft_session`). Not shared between threads.

    A message the server refuses gets an error reply: :meth:`append` raises the matching
    :class:`retrieval.errors.RetrievalError` and the session stays open, as it was (the next ``append``
    continues from the last accepted ids). Only a failed ``open``, an evicted session (``NotFound``), a
    broken stream or an internal error end it (``closed`` becomes True)."""

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
        if reply.HasField("error"):
            raise dconv.session_error_from_proto(reply.error)
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
