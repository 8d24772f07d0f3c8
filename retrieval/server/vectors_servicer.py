"""Servicers of the Collections, Points and Search services (proto/retrieval/v1)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path, PurePath

import numpy as np

from retrieval import convert
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound
from retrieval.indexes.base import QueryParams
from retrieval.server import limits
from retrieval.v1 import (collections_pb2, collections_pb2_grpc, points_pb2, points_pb2_grpc,
                          search_pb2, search_pb2_grpc)
from retrieval.vectors.collection import CollectionConfig, CollectionManager


class CollectionsServicer(collections_pb2_grpc.CollectionsServicer):
    def __init__(self, manager: CollectionManager, settings=None, data_dir: Path | None = None) -> None:
        """``settings`` / ``data_dir``: where Import may read folders from (``security.client_file_dirs``,
        default ``<data_dir>/imports``); without them Import is refused."""
        self.manager = manager
        self.settings = settings
        self.data_dir = Path(data_dir) if data_dir is not None else None

    async def Create(self, request, context):
        config = CollectionConfig(
            name=request.name, dimension=request.dimension, metric=request.metric or "l2",
            index=convert.index_spec_from_proto(request.index), shards=request.shards or 1)
        col = await self.manager.create(config)
        return convert.collection_info_to_proto(await col.describe())

    async def List(self, request, context):
        # served collections and the ones held but not served (quarantined, unavailable), with a state;
        # the graph engine's FastRP collections (g-<graph>-<embedding>-<token>) only with include_internal
        from retrieval.graph.engine import is_internal_collection

        out = collections_pb2.ListCollectionsResponse()
        for col in self.manager.all():
            if not request.include_internal and is_internal_collection(col.name):
                continue
            out.collections.append(convert.collection_info_to_proto(await col.describe()))
        return out

    async def Describe(self, request, context):
        return convert.collection_info_to_proto(await self.manager.lookup(request.name).describe())

    async def Repair(self, request, context):
        index = convert.index_spec_from_proto(request.index) if request.HasField("index") else None
        col = await self.manager.repair(request.name, index)
        return convert.collection_info_to_proto(await col.describe())

    async def Drop(self, request, context):
        await self.manager.drop(request.name)
        return collections_pb2.DropCollectionResponse()

    async def Import(self, request, context):
        if request.check_only:
            import_path(request.path, self.settings, self.data_dir, must_exist=False)
            self.manager.check_import(request.name, replace=request.replace)
            return collections_pb2.CollectionInfo(name=request.name)
        source = import_path(request.path, self.settings, self.data_dir)
        col = await self.manager.import_folder(source, request.name, replace=request.replace)
        return convert.collection_info_to_proto(await col.describe())

    async def CreatePayloadIndex(self, request, context):
        col = self.manager.get(request.collection)
        return convert.payload_index_to_proto(await col.create_payload_index(request.key, request.type))

    async def DropPayloadIndex(self, request, context):
        await self.manager.get(request.collection).drop_payload_index(request.key)
        return collections_pb2.DropPayloadIndexResponse()

    async def ListPayloadIndexes(self, request, context):
        col = self.manager.get(request.collection)
        return collections_pb2.ListPayloadIndexesResponse(
            indexes=[convert.payload_index_to_proto(e) for e in col.list_payload_indexes()])


def import_path(path: str, settings, data_dir: Path | None, must_exist: bool = True) -> Path:
    """The folder a client asked to import, checked: no ``..`` components, inside the folders clients
    may name (symbolic links resolved), not inside the server's own collections, a folder (when
    ``must_exist``)."""
    from retrieval.server.auth import resolve_client_file

    if settings is None or data_dir is None:
        raise FailedPrecondition("this server does not import collection folders")
    if not isinstance(path, str) or not path:
        raise InvalidArgument("path must name a collection folder on the server")
    if ".." in PurePath(path).parts:
        raise InvalidArgument(f"path {path[:200]!r} contains '..'; give the folder's own path")
    folder = resolve_client_file(path, settings, data_dir, "collection folder")
    own = (Path(data_dir) / "collections").resolve()
    if folder == own or own in folder.parents:
        raise InvalidArgument(f"{str(folder)!r} is inside the server's own collections folder")
    if must_exist and not folder.is_dir():
        raise NotFound(f"collection folder {str(folder)!r} does not exist on the server")
    return folder


def _points_response(ids: np.ndarray, vecs, pls, next_id=None) -> points_pb2.PointsResponse:
    out = points_pb2.PointsResponse()
    out.ids.extend(ids.tolist())
    if vecs is not None:
        convert.vectors_to_proto(vecs, out.vectors)
    if pls is not None:
        out.payloads.extend(p or "" for p in pls)
    if next_id is not None:
        out.next_id = next_id
    return out


class PointsServicer(points_pb2_grpc.PointsServicer):
    def __init__(self, manager: CollectionManager) -> None:
        self.manager = manager

    async def _upsert(self, request) -> tuple[int, int]:
        col = self.manager.get(request.collection)
        ids = np.asarray(request.ids, np.uint64)
        if not request.HasField("vectors"):
            raise InvalidArgument("upsert needs vectors")
        x = convert.vectors_from_proto(request.vectors)
        return await col.upsert(ids, x, list(request.payloads))

    async def Upsert(self, request, context):
        n, seq = await self._upsert(request)
        return points_pb2.WriteResult(count=n, seq=seq)

    async def UpsertStream(self, request_iterator, context):
        # Pipelined: batch i+1 is received and validated while batch i commits. Commits still happen
        # in arrival order (one writer thread per shard), and a failing batch stops the stream with
        # every batch before it committed.
        inflight: list[asyncio.Task] = []
        total, seq = 0, 0
        first: str | None = None
        nmsg = 0
        try:
            async for request in request_iterator:
                nmsg += 1
                if first is None:
                    first = request.collection
                elif request.collection != first:  # refused before anything of this message is written
                    raise InvalidArgument(
                        f"an UpsertStream writes to one collection: it started with {first[:200]!r} and message "
                        f"{nmsg} names {request.collection[:200]!r}; open one stream per "
                        "collection")
                inflight.append(asyncio.ensure_future(self._upsert(request)))
                await asyncio.sleep(0)  # let it validate and reach its shard's writer queue in order
                if inflight[0].done() or len(inflight) >= 4:
                    n, seq = await inflight.pop(0)
                    total += n
            while inflight:
                n, seq = await inflight.pop(0)
                total += n
        finally:
            for t in inflight:  # an error stopped the stream: let queued batches finish, report the first error
                with contextlib.suppress(Exception):
                    await t
        return points_pb2.WriteResult(count=total, seq=seq)

    async def Get(self, request, context):
        col = self.manager.get(request.collection)
        ids, vecs, pls = await col.get(np.asarray(request.ids, np.uint64), request.with_vectors, request.with_payloads)
        return _points_response(ids, vecs, pls)

    async def Delete(self, request, context):
        col = self.manager.get(request.collection)
        n = await col.delete(ids=np.asarray(request.ids, np.uint64) if len(request.ids) else None,
                             filter=convert.optional_filter(request))
        return points_pb2.WriteResult(count=n)

    async def Count(self, request, context):
        col = self.manager.get(request.collection)
        return points_pb2.CountResponse(count=await col.count(convert.optional_filter(request)))

    async def Scroll(self, request, context):
        col = self.manager.get(request.collection)
        start = request.start_id if request.HasField("start_id") else 0
        ids, vecs, pls, nxt = await col.scroll(convert.optional_filter(request), start, request.limit,
                                               request.with_vectors, request.with_payloads)
        return _points_response(ids, vecs, pls, nxt)


class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, manager: CollectionManager, max_message_bytes: int | None = None) -> None:
        """``max_message_bytes``: the server's ``limits.max_message_bytes``; a search whose reply could
        not be sent is refused before it runs (default: the setting's default)."""
        self.manager = manager
        if max_message_bytes is None:
            from retrieval.config import LimitsSettings

            max_message_bytes = LimitsSettings().max_message_bytes
        self.max_message_bytes = max_message_bytes

    async def _search(self, request, single: bool) -> search_pb2.SearchResponse:
        col = self.manager.get(request.collection)
        if not request.HasField("queries"):
            raise InvalidArgument("search needs queries")
        xq = convert.vectors_from_proto(request.queries, "queries")
        if single and len(xq) != 1:
            raise InvalidArgument(f"Search takes exactly one query, got {len(xq)}; use SearchBatch")
        p = request.params
        params = QueryParams(ef=p.ef, nprobe=p.nprobe, exact=p.exact)
        flt = convert.optional_filter(request) if request.HasField("filter") else None
        col.check_batch(len(xq), "search")  # request limits first, then the reply's size, then the work
        col.check_k(request.k)
        limits.check_search_reply_estimate(self.max_message_bytes, len(xq), request.k, col.d, request.with_vectors,
                                           request.with_payloads)  # before the work
        res = await col.search(xq, request.k, params, flt, request.with_payloads, request.with_vectors)
        limits.check_search_reply(self.max_message_bytes, res.ids, res.payloads, col.d, request.with_vectors)
        out = search_pb2.SearchResponse(nq=len(xq), k=request.k)
        out.ids.extend(res.ids.ravel().tolist())
        convert.append_floats(out, search_pb2.SearchResponse.DISTANCES_FIELD_NUMBER, res.distances)
        if res.payloads is not None:
            out.payloads.extend(res.payloads)
        if res.vectors is not None:
            convert.vectors_to_proto(res.vectors, out.vectors)
        return out

    async def Search(self, request, context):
        return await self._search(request, True)

    async def SearchBatch(self, request, context):
        return await self._search(request, False)

    async def SearchStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._search(request, False)


__all__ = ["CollectionsServicer", "PointsServicer", "SearchServicer"]
