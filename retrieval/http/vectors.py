"""``/v1/collections``: collections, points and search over HTTP.

Each route builds the gRPC request with the Python client's request builders
(:mod:`retrieval.client_convert`: the same argument checks and sentences) and calls the gRPC servicer's
method through the gate. Vectors are JSON arrays of numbers; payloads JSON objects; filters the dict
form the Python client takes (``{"must": [{"key": "lang", "equals": "en"}]}``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, StrictStr

from retrieval import client_convert as cc
from retrieval import convert
from retrieval.http.common import MAX_ID, Body, Number, call, handle, jsonable, payload
from retrieval.v1 import collections_pb2

router = APIRouter(prefix="/v1/collections", tags=["collections"])

C, P, S = "/retrieval.v1.Collections/", "/retrieval.v1.Points/", "/retrieval.v1.Search/"


def info(msg) -> dict:
    return jsonable(convert.collection_info_from_proto(msg))


class CreateCollection(Body):
    name: StrictStr
    dimension: StrictInt
    metric: StrictStr = "l2"
    index: dict[str, Any] | StrictStr | None = Field(None, description='e.g. {"type": "hnsw", "m": 16}, '
                                                     '{"type": "faiss", "factory": "IVF256,Flat"}, "exact"')
    shards: StrictInt = 1


class Upsert(Body):
    ids: list[StrictInt]
    vectors: list[list[Number]]
    payloads: list[dict[str, Any] | None] | None = None


class GetPoints(Body):
    ids: list[StrictInt]
    with_vectors: StrictBool = False
    with_payloads: StrictBool = True


class DeletePoints(Body):
    ids: list[StrictInt] | None = None
    filter: dict[str, Any] | None = None


class CountPoints(Body):
    filter: dict[str, Any] | None = None


class ScrollPoints(Body):
    filter: dict[str, Any] | None = None
    start_id: StrictInt | None = None
    limit: StrictInt = 100
    with_vectors: StrictBool = False
    with_payloads: StrictBool = True


class SearchBody(Body):
    vector: list[Number] | None = Field(None, description="one query (d numbers)")
    vectors: list[list[Number]] | None = Field(None, description="several queries (nq x d)")
    k: StrictInt = 10
    ef: StrictInt = 0
    nprobe: StrictInt = 0
    exact: StrictBool = False
    filter: dict[str, Any] | None = None
    with_payloads: StrictBool = False
    with_vectors: StrictBool = False


def _vectors(rows, d_hint: str = "vectors") -> np.ndarray:
    if not rows:
        return np.zeros((0, 1), np.float32)
    d = len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != d), None)
    if bad is not None:
        from retrieval.errors import InvalidArgument

        raise InvalidArgument(f"{d_hint} must all have the same length: row 0 has {d} numbers, row {bad} has "
                              f"{len(rows[bad])}")
    return np.asarray(rows, np.float64).astype(np.float32)


def points_json(resp, with_vectors: bool, with_payloads: bool) -> list[dict]:
    ids = list(resp.ids)
    vecs = convert.vectors_from_proto(resp.vectors) if with_vectors and resp.vectors.d else None
    out = []
    for i, pid in enumerate(ids):
        p: dict = {"id": pid}
        if with_payloads:
            p["payload"] = payload(resp.payloads[i]) if i < len(resp.payloads) else None
        if vecs is not None:
            p["vector"] = jsonable(vecs[i])
        out.append(p)
    return out


def hits_json(resp, with_payloads: bool, with_vectors: bool) -> list[list[dict]]:
    nq, k = resp.nq, resp.k
    ids = np.asarray(resp.ids, np.uint64).reshape(nq, k)
    dist = np.asarray(resp.distances, np.float32).reshape(nq, k)
    vecs = convert.vectors_from_proto(resp.vectors).reshape(nq, k, -1) if with_vectors and resp.vectors.d else None
    out = []
    for q in range(nq):
        row = []
        for j in range(k):
            pid = int(ids[q, j])
            if pid == MAX_ID:
                continue
            h: dict = {"id": pid, "distance": float(dist[q, j])}
            if with_payloads:
                h["payload"] = payload(resp.payloads[q * k + j])
            if vecs is not None:
                h["vector"] = jsonable(vecs[q, j])
            row.append(h)
        out.append(row)
    return out


@router.get("", summary="List collections (Collections.List)")
async def list_collections(request: Request):
    h = handle(request)
    resp = await call(request, C + "List", h.collections.List, collections_pb2.ListCollectionsRequest())
    return {"collections": [info(c) for c in resp.collections]}


@router.post("", status_code=201, summary="Create a collection (Collections.Create)")
async def create_collection(request: Request, body: CreateCollection):
    h = handle(request)
    req = cc.create_collection_request(body.name, body.dimension, body.metric, body.index, body.shards)
    return info(await call(request, C + "Create", h.collections.Create, req))


@router.get("/{name}", summary="Describe a collection (Collections.Describe)")
async def describe_collection(request: Request, name: str):
    h = handle(request)
    return info(await call(request, C + "Describe", h.collections.Describe, cc.describe_collection_request(name)))


@router.delete("/{name}", summary="Drop a collection (Collections.Drop)")
async def drop_collection(request: Request, name: str):
    h = handle(request)
    await call(request, C + "Drop", h.collections.Drop, cc.drop_collection_request(name))
    return {"dropped": name}


@router.get("/{name}/payload-indexes", summary="Payload indexes of a collection (Collections.ListPayloadIndexes)")
async def payload_indexes(request: Request, name: str):
    h = handle(request)
    resp = await call(request, C + "ListPayloadIndexes", h.collections.ListPayloadIndexes,
                      cc.list_payload_indexes_request(name))
    return {"payload_indexes": [cc.payload_index(e) for e in resp.indexes]}


@router.put("/{name}/points", summary="Upsert points (Points.Upsert)")
async def upsert(request: Request, name: str, body: Upsert):
    h = handle(request)
    req = cc.upsert_request(name, body.ids, _vectors(body.vectors), body.payloads)
    resp = await call(request, P + "Upsert", h.points.Upsert, req)
    return {"count": resp.count, "seq": resp.seq}


@router.post("/{name}/points/get", summary="Get points by id (Points.Get)")
async def get_points(request: Request, name: str, body: GetPoints):
    h = handle(request)
    req = cc.get_request(name, body.ids, body.with_vectors, body.with_payloads)
    resp = await call(request, P + "Get", h.points.Get, req)
    return {"points": points_json(resp, body.with_vectors, body.with_payloads)}


@router.post("/{name}/points/delete", summary="Delete points by ids or filter (Points.Delete)")
async def delete_points(request: Request, name: str, body: DeletePoints):
    h = handle(request)
    resp = await call(request, P + "Delete", h.points.Delete, cc.delete_request(name, body.ids, body.filter))
    return {"count": resp.count}


@router.post("/{name}/points/count", summary="Count points, optionally filtered (Points.Count)")
async def count_points(request: Request, name: str, body: CountPoints | None = None):
    h = handle(request)
    flt = body.filter if body is not None else None
    resp = await call(request, P + "Count", h.points.Count, cc.count_request(name, flt))
    return {"count": resp.count}


@router.post("/{name}/points/scroll", summary="Page through points in id order (Points.Scroll)")
async def scroll_points(request: Request, name: str, body: ScrollPoints | None = None):
    h = handle(request)
    b = body or ScrollPoints()
    req = cc.scroll_request(name, b.filter, b.start_id, b.limit, b.with_vectors, b.with_payloads)
    resp = await call(request, P + "Scroll", h.points.Scroll, req)
    return {"points": points_json(resp, b.with_vectors, b.with_payloads),
            "next_id": resp.next_id if resp.HasField("next_id") else None}


@router.post("/{name}/search", summary="k-NN search: one query (vector) or many (vectors) (Search.Search / "
             "SearchBatch)")
async def search(request: Request, name: str, body: SearchBody):
    from retrieval.errors import InvalidArgument

    h = handle(request)
    if (body.vector is None) == (body.vectors is None):
        raise InvalidArgument("search needs exactly one of 'vector' (one query) and 'vectors' (several)")
    xq = _vectors([body.vector] if body.vector is not None else body.vectors, "queries")
    req = cc.search_request(name, xq, body.k, body.ef, body.nprobe, body.exact, body.filter, body.with_payloads,
                            body.with_vectors)
    if body.vector is not None:
        resp = await call(request, S + "Search", h.search.Search, req)
        return {"hits": hits_json(resp, body.with_payloads, body.with_vectors)[0]}
    resp = await call(request, S + "SearchBatch", h.search.SearchBatch, req)
    return {"results": [{"hits": row} for row in hits_json(resp, body.with_payloads, body.with_vectors)]}
