"""The vector engine's client methods: collections (payload indexes too), points, search."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

import grpc
import numpy as np

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client.streams import _Requests
from retrieval.client.types import CollectionInfo, PayloadIndexInfo
from retrieval.client_convert import Hits, Points
from retrieval.v1 import collections_pb2, search_pb2


class VectorsMixin:
    """Collections, points and search (``client.vectors``). Needs a :class:`~retrieval.client.transport.Transport`
    and the client's search stream pool (``self._pool``)."""

    # --- collections -------------------------------------------------------------------------------
    def create_collection(self, name: str, dimension: int, metric: str = "l2", index=None, shards: int = 1) -> CollectionInfo:
        """Create a collection. ``index``: "hnsw" | "exact" | {"type": "faiss", "factory": "IVF256,PQ16"} |
        {"type": "hnsw", "m": 32, "ef_construction": 400}. Returns its description."""
        req = cc.create_collection_request(name, dimension, metric, index, shards)
        return types.collection_info(self._call(self._collections.Create, req))

    def list_collections(self, include_internal: bool = False) -> list[CollectionInfo]:
        """The collections. ``include_internal``: also those the server keeps for itself (the FastRP
        collections of graphs, ``g-<graph>-<embedding>-<token>``), hidden by default."""
        req = collections_pb2.ListCollectionsRequest(include_internal=bool(include_internal))
        return types.collection_list(self._call(self._collections.List, req))

    def describe_collection(self, name: str) -> CollectionInfo:
        return types.collection_info(self._call(self._collections.Describe, cc.describe_collection_request(name)))

    def create_payload_index(self, collection: str, key: str, type: str) -> PayloadIndexInfo:
        """Index payload ``key`` (dotted path) of ``collection`` as ``type``: "keyword", "integer",
        "float", "bool" or "datetime". Returns ``{"key", "type", "points"}`` once it is built."""
        req = cc.create_payload_index_request(collection, key, type)
        return types.payload_index(self._call(self._collections.CreatePayloadIndex, req))

    def drop_payload_index(self, collection: str, key: str) -> None:
        self._call(self._collections.DropPayloadIndex, cc.drop_payload_index_request(collection, key))

    def list_payload_indexes(self, collection: str) -> list[PayloadIndexInfo]:
        """``[{"key", "type", "points"}]`` of the collection's payload indexes."""
        req = cc.list_payload_indexes_request(collection)
        return types.payload_index_list(self._call(self._collections.ListPayloadIndexes, req))

    def drop_collection(self, name: str) -> None:
        self._call(self._collections.Drop, cc.drop_collection_request(name))

    def repair_collection(self, name: str, index=None) -> CollectionInfo:
        """Open a quarantined or unavailable collection again (its ``state`` / ``reason`` in
        :meth:`describe_collection` say why it is not served); with ``index`` (as in
        :meth:`create_collection`) its index is rebuilt from the stored points with that spec.
        Returns its description."""
        return types.collection_info(self._call(self._collections.Repair, cc.repair_collection_request(name, index)))

    def import_collection(self, name: str, path: str, replace: bool = False, timeout: float | None = None, *,
                          check_only: bool = False) -> CollectionInfo:
        """Attach a collection folder built offline (``index_builder build``) that the server can read
        at ``path`` (inside its allowed folders) as ``name``; with ``replace`` the old collection serves
        until the new one is ready. The server copies the folder, so this may take a while: ``timeout``
        defaults to an hour. Returns the collection's description.

        ``check_only``: only ask whether the server would accept it (``path`` inside its allowed
        folders, it need not exist yet; ``name`` free or ``replace``): raises what the import would
        (``PermissionDenied`` naming the setting, ``AlreadyExists``), changes nothing."""
        req = cc.import_collection_request(name, path, replace, check_only)
        if check_only:
            return types.collection_info(self._call(self._collections.Import, req, timeout))
        return types.collection_info(self._call(self._collections.Import, req, timeout, floor=3600.0))

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
                wait = cc.retry_after_s(e)
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
                raise self._error(e) from None
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
