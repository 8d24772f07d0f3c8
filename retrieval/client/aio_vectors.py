"""The vector engine of :class:`retrieval.AsyncClient`: collections, payload indexes, points, search."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

import numpy as np

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types
from retrieval.client_convert import Hits, Points


class AsyncVectorsMixin:
    """Collections, points and search: the async twins of :class:`retrieval.client.vectors.VectorsMixin`
    (over :class:`~retrieval.client.aio_transport.AsyncTransport`)."""

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
