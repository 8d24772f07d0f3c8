"""The asyncio client: :class:`AsyncClient`, the same methods and results as :class:`retrieval.Client`
over ``grpc.aio``.

    import asyncio
    from retrieval import AsyncClient

    async def main():
        async with AsyncClient("127.0.0.1:50051") as c:
            hits = await c.search("docs", q, k=5)                       # Hits(ids, distances, ...)
            many = await asyncio.gather(*(c.search("docs", x, k=5) for x in xq))
            D, I = await c.search_batch("docs", xq, k=10)

    asyncio.run(main())

Requests and responses go through the same builders and parsers as :class:`retrieval.Client`
(:mod:`retrieval.client_convert`), so both return the same types (:class:`Hits`, :class:`Points`,
dicts, numpy arrays) and raise the same :mod:`retrieval.errors` exceptions for the same status; the
same options (``api_key`` / ``api_key_file`` / ``$RETRIEVAL_API_KEY``, TLS, ``timeout``, the
``UNAVAILABLE`` retry policy, ``max_busy_retries``) mean the same. Single-query :meth:`search` is a
unary call (in ``grpc.aio`` concurrent unary calls multiplex on the one connection; a stream would
serialise them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import grpc
import grpc.aio
import numpy as np

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client_convert import Hits, JobTimeout, Points
from retrieval.v1 import collections_pb2_grpc, jobs_pb2_grpc, points_pb2_grpc, search_pb2_grpc

log = logging.getLogger(__name__)


def make_aio_channel(address: str, tls: bool | None = None, root_certificates=None, client_cert=None,
                     client_key=None, server_name: str | None = None, options=()) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel with the client's TLS settings (the API key is sent per call)."""
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = cc.tls_credentials(tls, root_certificates, client_cert, client_key)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


class AsyncClient:
    """An asyncio connection to one server: ``async with AsyncClient(address) as c: await c.search(...)``.

    Same constructor arguments as :class:`retrieval.Client` (``search_streams`` aside: searches are
    unary calls). Every method is a coroutine returning what the :class:`~retrieval.Client` method
    of the same name returns, except :meth:`watch_job`, an async iterator.

    Concurrency: one AsyncClient serves any number of concurrent tasks of its event loop
    (``asyncio.gather``); create and use it inside one loop. :meth:`close` while calls are in flight
    ends them with :class:`errors.Cancelled`.

    Ported: collections (payload indexes too), points (``upsert_stream`` takes a sync or async iterable), search,
    search_batch, jobs (``watch_job`` is an async iterator), graphs, cross-encoder k-NN and the
    stateless drafts (``draft``, ``draft_batch``, datastores). Not ported: ``draft_session`` (one
    generation's bidirectional stream; use :class:`retrieval.Client` in a thread for it).
    """

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.aio.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5) -> None:
        self.address = address
        self.timeout = timeout
        self.max_busy_retries = max_busy_retries
        key = cc.read_key(api_key, api_key_file)
        self._md = (("authorization", f"Bearer {key}"),) if key else None
        self._channel = channel or make_aio_channel(address, tls, root_certificates, client_cert, client_key,
                                                    server_name, options=cc.channel_options(max_message_bytes))
        self._collections = collections_pb2_grpc.CollectionsStub(self._channel)
        self._points = points_pb2_grpc.PointsStub(self._channel)
        self._search = search_pb2_grpc.SearchStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._stubs: dict[str, object] = {}
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------
    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls in flight end with :class:`errors.Cancelled` (after ``grace`` s)."""
        self._closed = True
        await self._channel.close(grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server answers (raises Unavailable after ``timeout`` seconds)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise errors.Unavailable(f"no server answered at {self.address} within {timeout} s") from None

    def _stub(self, name: str):
        stub = self._stubs.get(name)
        if stub is None:
            import importlib

            mod = importlib.import_module(f"retrieval.v1.{name.lower()}_pb2_grpc")
            stub = self._stubs[name] = getattr(mod, f"{name}Stub")(self._channel)
        return stub

    def _check_open(self) -> None:
        if self._closed:
            raise cc.closed_error()

    async def _call(self, fn, request, timeout: float | None = None):
        """``await fn(request)`` with the deadline ``timeout`` (default: the client's), retried after
        the server's hint while it refuses because it is busy (``max_busy_retries`` times)."""
        t_end = time.monotonic() + (self.timeout if timeout is None else timeout)
        for attempt in range(self.max_busy_retries + 1):
            self._check_open()
            try:
                return await fn(request, timeout=max(0.001, t_end - time.monotonic()), metadata=self._md)
            except grpc.RpcError as e:
                if self._closed:
                    raise cc.closed_error() from None
                wait = cc.retry_after_s(e)
                if wait is None or attempt == self.max_busy_retries:
                    cc.raise_rpc(e)
                wait *= random.uniform(1.0, 1.5)  # spread the retries of clients refused together
                if time.monotonic() + wait >= t_end:
                    cc.raise_rpc(e)
                await asyncio.sleep(wait)
            except (grpc.aio.UsageError, asyncio.CancelledError, RuntimeError):
                if self._closed:  # the channel was closed before or during the call
                    raise cc.closed_error() from None
                raise
        raise AssertionError("unreachable")

    async def _stream_call(self, fn, requests, timeout: float | None):
        """A client-streaming call (no busy retries: the requests cannot be replayed)."""
        self._check_open()
        try:
            return await fn(requests, timeout=timeout, metadata=self._md)
        except grpc.RpcError as e:
            if self._closed:
                raise cc.closed_error() from None
            cc.raise_rpc(e)
        except (grpc.aio.UsageError, asyncio.CancelledError, RuntimeError):
            if self._closed:
                raise cc.closed_error() from None
            raise

    # --- collections -------------------------------------------------------------------------------
    async def create_collection(self, name: str, dimension: int, metric: str = "l2", index=None,
                                shards: int = 1) -> dict:
        req = cc.create_collection_request(name, dimension, metric, index, shards)
        return types.collection_info(await self._call(self._collections.Create, req))

    async def list_collections(self, include_internal: bool = False) -> list[dict]:
        """As :meth:`retrieval.Client.list_collections`."""
        from retrieval.v1 import collections_pb2

        req = collections_pb2.ListCollectionsRequest(include_internal=bool(include_internal))
        return types.collection_list(await self._call(self._collections.List, req))

    async def describe_collection(self, name: str) -> dict:
        return types.collection_info(await self._call(self._collections.Describe, cc.describe_collection_request(name)))

    async def create_payload_index(self, collection: str, key: str, type: str) -> dict:
        req = cc.create_payload_index_request(collection, key, type)
        return types.payload_index(await self._call(self._collections.CreatePayloadIndex, req))

    async def drop_payload_index(self, collection: str, key: str) -> None:
        await self._call(self._collections.DropPayloadIndex, cc.drop_payload_index_request(collection, key))

    async def list_payload_indexes(self, collection: str) -> list[dict]:
        req = cc.list_payload_indexes_request(collection)
        return types.payload_index_list(await self._call(self._collections.ListPayloadIndexes, req))

    async def drop_collection(self, name: str) -> None:
        await self._call(self._collections.Drop, cc.drop_collection_request(name))

    async def repair_collection(self, name: str, index=None) -> dict:
        return types.collection_info(await self._call(self._collections.Repair,
                                                   cc.repair_collection_request(name, index)))

    async def import_collection(self, name: str, path: str, replace: bool = False,
                                timeout: float | None = None, *, check_only: bool = False) -> types.CollectionInfo:
        req = cc.import_collection_request(name, path, replace, check_only)
        if timeout is None and not check_only:
            timeout = max(self.timeout, 3600.0)
        return types.collection_info(await self._call(self._collections.Import, req, timeout))

    # --- points ------------------------------------------------------------------------------------
    async def upsert(self, collection: str, ids, vectors, payloads: list | None = None) -> int:
        return (await self._call(self._points.Upsert, cc.upsert_request(collection, ids, vectors, payloads))).seq

    async def upsert_stream(self, collection: str, batches: Iterable[tuple] | AsyncIterable[tuple],
                            timeout: float | None = None) -> int:
        """Bulk load over one stream; ``batches``: a sync or async iterable of (ids, vectors[, payloads]).
        A bad batch (or an exception raised by ``batches``) cancels the stream and is raised here."""
        failed: list[BaseException] = []

        async def gen() -> AsyncIterator:
            try:
                if hasattr(batches, "__aiter__"):
                    async for b in batches:
                        yield cc.upsert_batch_request(collection, b)
                else:
                    for b in batches:
                        yield cc.upsert_batch_request(collection, b)
            except Exception as e:
                failed.append(e)
                raise

        try:
            return (await self._stream_call(self._points.UpsertStream, gen(), timeout)).count
        except errors.RetrievalError:
            if failed:
                raise failed[0] from None
            raise

    async def get(self, collection: str, ids, with_vectors: bool = True, with_payloads: bool = True) -> Points:
        req = cc.get_request(collection, ids, with_vectors, with_payloads)
        return cc.points_from_proto(await self._call(self._points.Get, req), with_vectors, with_payloads)

    async def delete(self, collection: str, ids=None, filter=None) -> int:
        return (await self._call(self._points.Delete, cc.delete_request(collection, ids, filter))).count

    async def count(self, collection: str, filter=None) -> int:
        return (await self._call(self._points.Count, cc.count_request(collection, filter))).count

    async def scroll(self, collection: str, filter=None, start_id: int | None = None, limit: int = 100,
                     with_vectors: bool = False, with_payloads: bool = True) -> Points:
        req = cc.scroll_request(collection, filter, start_id, limit, with_vectors, with_payloads)
        return cc.points_from_proto(await self._call(self._points.Scroll, req), with_vectors, with_payloads)

    # --- search ------------------------------------------------------------------------------------
    async def search_batch(self, collection: str, xq, k: int = 10, ef: int = 0, nprobe: int = 0,
                           exact: bool = False, filter=None) -> tuple[np.ndarray, np.ndarray]:
        req = cc.search_request(collection, xq, k, ef, nprobe, exact, filter)
        return cc.search_arrays(await self._call(self._search.SearchBatch, req))

    async def search(self, collection: str, q, k: int = 10, ef: int = 0, nprobe: int = 0, exact: bool = False,
                     filter=None, with_payloads: bool = False, with_vectors: bool = False) -> Hits:
        q = cc.vectors_in(q, "q", ndim=1).reshape(1, -1)
        req = cc.search_request(collection, q, k, ef, nprobe, exact, filter, with_payloads, with_vectors)
        return cc.hits_from_proto(await self._call(self._search.Search, req), with_payloads, with_vectors)

    # --- jobs --------------------------------------------------------------------------------------
    async def start_job(self, kind: str, **params) -> dict:
        return types.job(await self._call(self._jobs.Start, cc.start_job_request(kind, params)))

    async def get_job(self, job_id: str) -> dict:
        return types.job(await self._call(self._jobs.Get, cc.job_ref(job_id)))

    async def list_jobs(self, kind: str = "", state: str = "") -> list[dict]:
        return types.job_list(await self._call(self._jobs.List, cc.list_jobs_request(kind, state)))

    async def cancel_job(self, job_id: str) -> dict:
        return types.job(await self._call(self._jobs.Cancel, cc.job_ref(job_id)))

    async def watch_job(self, job_id: str, timeout: float | None = None) -> AsyncIterator[dict]:
        """The job's record now and at every change, until it ends: ``async for rec in c.watch_job(id)``."""
        self._check_open()
        call = self._jobs.Watch(cc.job_ref(job_id), timeout=timeout, metadata=self._md)
        try:
            async for msg in call:
                yield types.job(msg)
        except grpc.RpcError as e:
            if self._closed:
                raise cc.closed_error() from None
            cc.raise_rpc(e)
        finally:
            call.cancel()  # no-op when the stream ended; ends it when the caller stopped early

    async def wait_job(self, job_id: str, timeout: float | None = None, progress: bool | None = False) -> dict:
        """As :meth:`retrieval.Client.wait_job` (the job is left running when ``timeout`` passes)."""
        last = None
        bar = cc.JobBar(cc.show_progress(progress), {"id": job_id})
        try:
            async for last in self.watch_job(job_id, timeout):
                bar.update(last)
        finally:
            bar.close()
        return last if last is not None else await self.get_job(job_id)

    async def run_job(self, kind: str, *, progress: bool | None = None, detach: bool = False,
                      timeout: float | None = None, **params) -> dict:
        """Start a job of ``kind`` and wait for it (see :meth:`_run_job`)."""
        return await self._run_job(await self.start_job(kind, **params), progress, detach, timeout)

    async def _run_job(self, job: dict, progress: bool | None = None, detach: bool = False,
                       timeout: float | None = None) -> dict:
        """As :meth:`retrieval.Client._run_job`: follow a job this client just started until it ends
        and return its final record; ``progress`` (a tqdm bar on stderr; None: when stderr is a
        terminal), ``detach`` (return ``job`` at once), ``timeout`` (seconds; past it the job is
        cancelled and :class:`JobTimeout` raised). Cancelling the awaiting task
        (``asyncio.CancelledError``, e.g. ``asyncio.wait_for`` giving up) cancels the server job too."""
        if detach:
            return job
        try:
            return await self._follow_job(job, progress, timeout)
        except (asyncio.CancelledError, KeyboardInterrupt, JobTimeout):
            await asyncio.shield(self._cancel_quietly(job["id"]))
            raise

    async def _follow_job(self, job: dict, progress: bool | None, timeout: float | None) -> dict:
        t_end = None if timeout is None else time.monotonic() + timeout
        bar = cc.JobBar(cc.show_progress(progress), job)
        rec = job
        try:
            while rec["state"] not in cc.JOB_FINAL:
                left = None if t_end is None else t_end - time.monotonic()
                if left is not None and left <= 0:
                    raise cc.job_timeout_error(rec, timeout)
                try:
                    async for rec in self.watch_job(job["id"], left):
                        bar.update(rec)
                except errors.RetrievalError as e:
                    if getattr(e, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise cc.job_timeout_error(rec, timeout) from None
                    raise
                if rec["state"] not in cc.JOB_FINAL:  # a watch may end on a stale record
                    await asyncio.sleep(0.05)
                    rec = await self.get_job(job["id"])
                    bar.update(rec)
            return rec
        finally:
            bar.close()

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self._call(self._jobs.Cancel, cc.job_ref(job_id), min(self.timeout, 10.0))
            log.info("cancelled job %s", job_id)
        except (errors.RetrievalError, ValueError) as e:
            log.warning("could not cancel job %s: %s", job_id, e)

    async def _finish_job(self, job: dict) -> dict:
        return await self._run_job(job, progress=False)

    async def job_kinds(self) -> list[dict]:
        return types.job_kinds(await self._call(self._jobs.Kinds, cc.job_kinds_request()))

    # --- drafts (stateless) ------------------------------------------------------------------------
    @staticmethod
    def _budget(max_nodes, max_depth, chain):
        from retrieval.drafting.draft import DraftBudget

        return DraftBudget(max_nodes or 64, max_depth or 10, not chain)

    async def draft(self, context_ids, vocab_size: int, datastore: str | None = None, sources=None,
                    max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *, tokenizer=None):
        """As :meth:`retrieval.Client.draft` (``tokenizer``: an object, a file or a fingerprint)."""
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv

        req = dconv.draft_request_to_proto(context_ids, vocab_size, datastore, sources,
                                           self._budget(max_nodes, max_depth, chain), _fingerprint(tokenizer))
        return dconv.draft_from_proto((await self._call(self._stub("Drafts").Draft, req)).draft)

    async def draft_batch(self, contexts, vocab_size: int, datastore: str | None = None, sources=None,
                          max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *, tokenizer=None) -> list:
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv
        from retrieval.v1 import drafts_pb2

        b = self._budget(max_nodes, max_depth, chain)
        fp = _fingerprint(tokenizer)
        req = drafts_pb2.DraftBatchRequest(
            requests=[dconv.draft_request_to_proto(c, vocab_size, datastore, sources, b, fp) for c in contexts])
        return [dconv.draft_from_proto(r.draft) for r in (await self._call(self._stub("Drafts").DraftBatch, req)).replies]

    async def build_datastore(self, name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                              input_format: str = "auto", text_fields=None, overwrite: bool = False,
                              wait: bool = True, *, progress: bool | None = None, detach: bool = False,
                              timeout: float | None = None, tokenizer_fingerprint=None) -> dict:
        """As :meth:`retrieval.Client.build_datastore`."""
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv

        req = dconv.build_request_to_proto(name, inputs, tokenizer, vocab_size, input_format, text_fields, overwrite,
                                           _fingerprint(tokenizer_fingerprint))
        job = types.job(await self._call(self._stub("Drafts").BuildDatastore, req))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def list_datastores(self) -> list[dict]:
        from retrieval.v1 import drafts_pb2

        resp = await self._call(self._stub("Drafts").ListDatastores, drafts_pb2.ListDatastoresRequest())
        return [types.datastore_info(d) for d in resp.datastores]

    async def describe_datastore(self, name: str) -> dict:
        from retrieval.v1 import drafts_pb2

        return types.datastore_info(await self._call(self._stub("Drafts").DescribeDatastore,
                                                                drafts_pb2.DatastoreRef(name=name)))

    async def drop_datastore(self, name: str) -> None:
        from retrieval.v1 import drafts_pb2

        await self._call(self._stub("Drafts").DropDatastore, drafts_pb2.DatastoreRef(name=name))

    # --- cross-encoder k-NN ------------------------------------------------------------------------
    async def _ce_long_call(self, name: str, request, timeout: float | None):
        fn = getattr(self._stub("CrossEncoder"), name)
        return await self._call(fn, request, timeout if timeout is not None else max(self.timeout, 600.0))

    async def build_ce_index(self, name: str, scorer: dict, items: list[dict] | None = None,
                             items_path: str | None = None, anchor_queries: list[str] | None = None,
                             query_log: list[str] | None = None, k_q: int | None = None, query_seed: int = 0,
                             dual_encoder: dict | None = None, params: dict | None = None, wait: bool = True,
                             timeout: float | None = None, *, progress: bool | None = None,
                             detach: bool = False) -> dict:
        """As :meth:`retrieval.Client.build_ce_index`."""
        from retrieval.crossencoder import convert as cconv

        req = cconv.build_request_to_proto(name, scorer, items, items_path, anchor_queries, query_log, k_q,
                                           query_seed, dual_encoder, params)
        job = types.job(await self._ce_long_call("BuildIndex", req, timeout))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def ce_add_items(self, index: str, ids, texts, payloads: list | None = None,
                           timeout: float | None = None) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.AddCrossEncoderItemsRequest(index=index, items=cc.ce_items(ids, texts, payloads))
        return types.ce_add_result(await self._ce_long_call("AddItems", req, timeout))

    async def ce_delete_items(self, index: str, ids) -> int:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.DeleteCrossEncoderItemsRequest(index=index, ids=cc.ids_to_list(ids))
        return int((await self._call(self._stub("CrossEncoder").DeleteItems, req)).deleted)

    async def ce_search(self, index: str, query: str, k: int = 10, mode: str = "", budget: int | None = None,
                        k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None,
                        ridge: float | None = None, with_payloads: bool = False,
                        timeout: float | None = None) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cc.message(cpb.CrossEncoderSearchRequest, index=index, query=query, k=k, with_payloads=with_payloads,
                         params=cc.ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        t0 = time.perf_counter()
        resp = await self._ce_long_call("Search", req, timeout)
        return types.ce_hits(resp, latency_seconds=time.perf_counter() - t0)

    async def ce_search_batch(self, index: str, queries: list[str], k: int = 10, mode: str = "",
                              budget: int | None = None, k_i: int = 0, rounds: int = 0,
                              seed_fraction: float | None = None, ridge: float | None = None,
                              with_payloads: bool = False, timeout: float | None = None) -> list[dict]:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cc.message(cpb.CrossEncoderSearchBatchRequest, index=index, queries=list(queries), k=k,
                         with_payloads=with_payloads,
                         params=cc.ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        return [types.ce_hits(r) for r in (await self._ce_long_call("SearchBatch", req, timeout)).results]

    async def describe_ce_index(self, index: str) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        return types.ce_index_info(await self._ce_long_call("Describe", cpb.CrossEncoderIndexRef(index=index), None))

    async def list_ce_indexes(self) -> list[dict]:
        from retrieval.v1 import crossencoder_pb2 as cpb

        resp = await self._ce_long_call("ListIndexes", cpb.ListCrossEncoderIndexesRequest(), None)
        return [types.ce_index_info(i) for i in resp.indexes]

    async def drop_ce_index(self, index: str) -> None:
        from retrieval.v1 import crossencoder_pb2 as cpb

        await self._call(self._stub("CrossEncoder").DropIndex, cpb.CrossEncoderIndexRef(index=index))

    async def ce_set_anchor_items(self, index: str, k_i: int = 0, anchor_method: str = "",
                                  seed: int | None = None) -> dict:
        from retrieval.crossencoder import convert as cconv

        req = cconv.set_anchor_items_to_proto(index, k_i, anchor_method, seed)
        return types.ce_index_info(await self._ce_long_call("SetAnchorItems", req, None))

    # --- graphs ------------------------------------------------------------------------------------
    async def create_graph(self, name: str, num_nodes: int = 0, directed: bool = False,
                           weighted: bool = False) -> dict:
        from retrieval.v1 import graphs_pb2 as gpb

        req = cc.message(gpb.CreateGraphRequest, graph=name, num_nodes=num_nodes, directed=directed, weighted=weighted)
        return types.graph_info(await self._call(self._stub("Graphs").CreateGraph, req))

    async def list_graphs(self) -> list[dict]:
        from retrieval.v1 import graphs_pb2 as gpb

        resp = await self._call(self._stub("Graphs").ListGraphs, gpb.ListGraphsRequest())
        return [types.graph_info(g) for g in resp.graphs]

    async def describe_graph(self, name: str) -> dict:
        from retrieval.v1 import graphs_pb2 as gpb

        return types.graph_info(await self._call(self._stub("Graphs").DescribeGraph,
                                                            gpb.GraphRef(graph=name)))

    async def drop_graph(self, name: str) -> None:
        from retrieval.v1 import graphs_pb2 as gpb

        await self._call(self._stub("Graphs").DropGraph, gpb.GraphRef(graph=name))

    async def add_nodes(self, graph: str, count: int) -> dict:
        from retrieval.v1 import graphs_pb2 as gpb

        return types.graph_info(await self._call(self._stub("Graphs").AddNodes,
                                                            cc.message(gpb.AddNodesRequest, graph=graph, count=count)))

    async def append_edges(self, graph: str, src, dst, weights=None, duplicates: str = "", chunk: int = 100_000,
                           timeout: float | None = None, self_loops: str = "") -> dict:
        """As :meth:`retrieval.Client.append_edges`."""
        from retrieval.graph import convert as gconv

        src, dst = gconv.node_ids_in(src, "src"), gconv.node_ids_in(dst, "dst")
        reqs = cc.edge_requests(graph, src, dst, weights, duplicates, chunk)
        reqs[0].self_loops = self_loops or ""
        resp = await self._stream_call(self._stub("Graphs").AppendEdges, iter(reqs),
                                       timeout if timeout is not None else max(self.timeout, 600.0))
        return types.append_result(resp)

    async def set_node_features(self, graph: str, features) -> dict:
        from retrieval import convert
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.SetFeaturesRequest(graph=graph)
        if features is not None:
            x = np.asarray(features, np.float32)
            if x.ndim != 2:
                raise errors.InvalidArgument(f"features must be a 2-D array [n, f], got shape {x.shape}")
            convert.vectors_to_proto(x, req.features)
        return types.graph_info(await self._call(self._stub("Graphs").SetFeatures, req))

    async def set_node_labels(self, graph: str, labels) -> dict:
        from retrieval.graph import convert as gconv

        return types.graph_info(await self._call(self._stub("Graphs").SetLabels,
                                                            gconv.labels_to_proto(graph, labels)))

    async def neighbors(self, graph: str, nodes, direction: str = "out") -> list[tuple[np.ndarray, np.ndarray]]:
        from retrieval.graph import convert as gconv

        return gconv.neighbors_from_proto(await self._call(self._stub("Graphs").Neighbors,
                                                           cc.neighbors_request(graph, nodes, direction)))

    async def run_fastrp(self, graph: str, dim: int, embedding: str = "fastrp", use_features: bool = False,
                         index=None, metric: str = "", wait: bool = True, *, progress: bool | None = None,
                         detach: bool = False, timeout: float | None = None, **params) -> dict:
        """As :meth:`retrieval.Client.run_fastrp`."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.RunFastRPRequest(graph=graph, embedding=embedding, use_features=use_features, metric=metric,
                                   params=gconv.fastrp_params_to_proto(dict(params, dim=dim)))
        if index is not None:
            req.index.CopyFrom(cc.index_spec(index))
        job = types.job(await self._call(self._stub("Graphs").RunFastRP, req))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def import_graph(self, name: str, path: str, format: str = "auto", *, mode: str = "auto",
                           progress: bool | None = None, detach: bool = False, timeout: float | None = None,
                           **options) -> dict:
        """As :meth:`retrieval.Client.import_graph` (``options``: delimiter, header, directed, weighted,
        index_base, num_nodes, self_loops, duplicates)."""
        params = {"graph": name, "path": path, "format": format, "mode": mode,
                  **{k: v for k, v in options.items() if v is not None}}
        return await self._run_job(await self.start_job("import_graph", **params), progress, detach, timeout)

    async def get_embeddings(self, graph: str, name: str = "fastrp", nodes=None,
                             timeout: float | None = None) -> np.ndarray:
        """As :meth:`retrieval.Client.get_embeddings`."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.GetEmbeddingsRequest(graph=graph, embedding=name, all=nodes is None)
        if nodes is not None:
            ids = gconv.node_ids_in(nodes, "nodes")
            if ids.size == 0:
                return np.zeros((0, 0), np.float32)
            req.nodes.extend(ids.tolist())
        self._check_open()
        call = self._stub("Graphs").GetEmbeddings(req, timeout=timeout if timeout is not None else
                                                  max(self.timeout, 600.0), metadata=self._md)
        try:
            chunks = [msg async for msg in call]
        except grpc.RpcError as e:
            if self._closed:
                raise cc.closed_error() from None
            cc.raise_rpc(e)
        finally:
            call.cancel()
        return gconv.embeddings_from_chunks(chunks)[0]

    async def similar_nodes(self, graph: str, nodes, k: int = 10, embedding: str = "fastrp", ef: int = 0,
                            exact: bool = False, include_self: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        from retrieval.graph import convert as gconv

        req = cc.similar_nodes_request(graph, nodes, k, embedding, ef, exact, include_self)
        return gconv.hits_from_proto((await self._call(self._stub("Graphs").SimilarNodes, req)).results)

    async def train_link_model(self, graph: str, model: str = "ncn", preset: str = "", config: dict | None = None,
                               seed: int = 0, val_frac: float | None = None, test_frac: float | None = None,
                               device: str = "", wait: bool = True, *, progress: bool | None = None,
                               detach: bool = False, timeout: float | None = None, evaluate: str = "") -> dict:
        """As :meth:`retrieval.Client.train_link_model`."""
        from retrieval.graph import convert as gconv

        p = {"graph": graph, "model": model, "preset": preset, "config": config or {}, "seed": seed, "device": device,
             "evaluate": evaluate}
        if val_frac is not None:
            p["val_frac"] = val_frac
        if test_frac is not None:
            p["test_frac"] = test_frac
        job = types.job(await self._call(self._stub("Graphs").TrainLinkModel, gconv.train_params_to_request(p)))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def score_links(self, graph: str, src, dst, model: str = "ncn") -> np.ndarray:
        return cc.link_probabilities(await self._call(self._stub("Graphs").ScoreLinks,
                                                      cc.score_links_request(graph, src, dst, model)))

    async def predict_links(self, graph: str, nodes, k: int = 10, model: str = "ncn", candidates=None,
                            embedding: str = "", num_candidates: int = 0,
                            include_neighbors: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        from retrieval.graph import convert as gconv

        req = cc.predict_links_request(graph, nodes, k, model, candidates, embedding, num_candidates,
                                       include_neighbors)
        return gconv.hits_from_proto((await self._call(self._stub("Graphs").PredictLinks, req)).results)


__all__ = ["AsyncClient", "Hits", "JobTimeout", "Points", "make_aio_channel"]
