"""Read-only views of graphs, cross-encoder indexes and draft datastores, and those engines' searches:
similar nodes, link scores and predictions, cross-encoder search, a stateless draft.

Writes to these engines (ingesting graphs, building indexes and datastores) stay on gRPC and the
Python client; their jobs show under ``/v1/jobs``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, StrictStr

from retrieval import client_convert as cc
from retrieval.errors import FailedPrecondition, InvalidArgument
from retrieval.http.common import Body, Number, call, handle, jsonable

router = APIRouter(tags=["graphs, cross-encoder indexes, drafts"])

G, X, D = "/retrieval.v1.Graphs/", "/retrieval.v1.CrossEncoder/", "/retrieval.v1.Drafts/"


def _servicer(request: Request, name: str):
    s = getattr(handle(request), name)
    if s is None:
        raise FailedPrecondition(f"this server does not run the {name} engine")
    return s


def _node_hits(results, what: str) -> list[dict]:
    from retrieval.graph import convert as gconv

    return [{"ids": ids.tolist(), what: jsonable(scores)} for ids, scores in gconv.hits_from_proto(results)]


# --- graphs -----------------------------------------------------------------------------------------
class SimilarNodes(Body):
    nodes: list[StrictInt]
    k: StrictInt = 10
    embedding: StrictStr = "fastrp"
    ef: StrictInt = 0
    exact: StrictBool = False
    include_self: StrictBool = False


class ScoreLinks(Body):
    src: list[StrictInt]
    dst: list[StrictInt]
    model: StrictStr = "ncn"


class PredictLinks(Body):
    nodes: list[StrictInt]
    k: StrictInt = 10
    model: StrictStr = "ncn"
    candidates: list[StrictInt] | None = None
    embedding: StrictStr = ""
    num_candidates: StrictInt = 0
    include_neighbors: StrictBool = False


@router.get("/v1/graphs", summary="Graphs (Graphs.ListGraphs)")
async def list_graphs(request: Request):
    from retrieval.graph import convert as gconv
    from retrieval.v1 import graphs_pb2 as gpb

    s = _servicer(request, "graphs")
    resp = await call(request, G + "ListGraphs", s.ListGraphs, gpb.ListGraphsRequest())
    return {"graphs": [jsonable(gconv.graph_info_from_proto(g)) for g in resp.graphs]}


@router.get("/v1/graphs/{graph}", summary="Describe a graph (Graphs.DescribeGraph)")
async def describe_graph(request: Request, graph: str):
    from retrieval.graph import convert as gconv
    from retrieval.v1 import graphs_pb2 as gpb

    s = _servicer(request, "graphs")
    resp = await call(request, G + "DescribeGraph", s.DescribeGraph, cc.message(gpb.GraphRef, graph=graph))
    return jsonable(gconv.graph_info_from_proto(resp))


@router.post("/v1/graphs/{graph}/similar", summary="Nearest nodes by embedding (Graphs.SimilarNodes)")
async def similar_nodes(request: Request, graph: str, body: SimilarNodes):
    s = _servicer(request, "graphs")
    req = cc.similar_nodes_request(graph, body.nodes, body.k, body.embedding, body.ef, body.exact, body.include_self)
    resp = await call(request, G + "SimilarNodes", s.SimilarNodes, req)
    return {"results": _node_hits(resp.results, "distances")}


@router.post("/v1/graphs/{graph}/score-links", summary="Link probabilities of pairs (Graphs.ScoreLinks)")
async def score_links(request: Request, graph: str, body: ScoreLinks):
    s = _servicer(request, "graphs")
    resp = await call(request, G + "ScoreLinks", s.ScoreLinks, cc.score_links_request(graph, body.src, body.dst,
                                                                                      body.model))
    return {"probabilities": jsonable(cc.link_probabilities(resp))}


@router.post("/v1/graphs/{graph}/predict-links", summary="Top-k predicted new links (Graphs.PredictLinks)")
async def predict_links(request: Request, graph: str, body: PredictLinks):
    s = _servicer(request, "graphs")
    req = cc.predict_links_request(graph, body.nodes, body.k, body.model, body.candidates, body.embedding,
                                   body.num_candidates, body.include_neighbors)
    resp = await call(request, G + "PredictLinks", s.PredictLinks, req)
    return {"results": _node_hits(resp.results, "probabilities")}


# --- cross-encoder indexes ----------------------------------------------------------------------------
class CrossEncoderSearch(Body):
    query: StrictStr | None = Field(None, description="one query")
    queries: list[StrictStr] | None = Field(None, description="several queries")
    k: StrictInt = 10
    mode: StrictStr = ""
    budget: StrictInt | None = None
    k_i: StrictInt = 0
    rounds: StrictInt = 0
    seed_fraction: Number | None = None
    ridge: Number | None = None
    with_payloads: StrictBool = False


@router.get("/v1/crossencoder", summary="Cross-encoder indexes (CrossEncoder.ListIndexes)")
async def list_ce(request: Request):
    from retrieval.crossencoder import convert as cconv
    from retrieval.v1 import crossencoder_pb2 as cpb

    s = _servicer(request, "crossencoder")
    resp = await call(request, X + "ListIndexes", s.ListIndexes, cpb.ListCrossEncoderIndexesRequest())
    return {"indexes": [jsonable(cconv.info_from_proto(i)) for i in resp.indexes]}


@router.get("/v1/crossencoder/{index}", summary="Describe a cross-encoder index (CrossEncoder.Describe)")
async def describe_ce(request: Request, index: str):
    from retrieval.crossencoder import convert as cconv
    from retrieval.v1 import crossencoder_pb2 as cpb

    s = _servicer(request, "crossencoder")
    resp = await call(request, X + "Describe", s.Describe, cc.message(cpb.CrossEncoderIndexRef, index=index))
    return jsonable(cconv.info_from_proto(resp))


@router.post("/v1/crossencoder/{index}/search", summary="Cross-encoder k-NN (CrossEncoder.Search / SearchBatch)")
async def search_ce(request: Request, index: str, body: CrossEncoderSearch):
    from retrieval.crossencoder import convert as cconv
    from retrieval.v1 import crossencoder_pb2 as cpb

    s = _servicer(request, "crossencoder")
    if (body.query is None) == (body.queries is None):
        raise InvalidArgument("search needs exactly one of 'query' (one) and 'queries' (several)")
    params = cc.ce_params(body.mode, body.budget, body.k_i, body.rounds, body.seed_fraction, body.ridge)
    if body.query is not None:
        req = cc.message(cpb.CrossEncoderSearchRequest, index=index, query=body.query, k=body.k,
                         with_payloads=body.with_payloads, params=params)
        return jsonable(cconv.hits_from_proto(await call(request, X + "Search", s.Search, req)))
    req = cc.message(cpb.CrossEncoderSearchBatchRequest, index=index, queries=body.queries, k=body.k,
                     with_payloads=body.with_payloads, params=params)
    resp = await call(request, X + "SearchBatch", s.SearchBatch, req)
    return {"results": [jsonable(cconv.hits_from_proto(r)) for r in resp.results]}


# --- draft datastores and stateless drafts -------------------------------------------------------------
class DraftBody(Body):
    context_ids: list[StrictInt]
    vocab_size: StrictInt
    datastore: StrictStr | None = None
    sources: list[StrictStr] | None = None
    max_nodes: StrictInt = 0
    max_depth: StrictInt = 0
    chain: StrictBool = False


@router.get("/v1/datastores", summary="Draft datastores (Drafts.ListDatastores)")
async def list_datastores(request: Request):
    from retrieval.drafting import convert as dconv
    from retrieval.v1 import drafts_pb2

    s = _servicer(request, "drafts")
    resp = await call(request, D + "ListDatastores", s.ListDatastores, drafts_pb2.ListDatastoresRequest())
    return {"datastores": [jsonable(dconv.datastore_info_from_proto(m)) for m in resp.datastores]}


@router.get("/v1/datastores/{name}", summary="Describe a draft datastore (Drafts.DescribeDatastore)")
async def describe_datastore(request: Request, name: str):
    from retrieval.drafting import convert as dconv
    from retrieval.v1 import drafts_pb2

    s = _servicer(request, "drafts")
    resp = await call(request, D + "DescribeDatastore", s.DescribeDatastore, cc.message(drafts_pb2.DatastoreRef,
                                                                                         name=name))
    return jsonable(dconv.datastore_info_from_proto(resp))


@router.post("/v1/drafts", summary="A stateless draft for a context (Drafts.Draft)")
async def draft(request: Request, body: DraftBody):
    from retrieval.v1 import drafts_pb2

    s = _servicer(request, "drafts")
    budget = cc.message(drafts_pb2.DraftBudget, max_nodes=body.max_nodes or 64, max_depth=body.max_depth or 10,
                        chain=body.chain)
    req = cc.message(drafts_pb2.DraftRequest, vocab_size=body.vocab_size, datastore=body.datastore or "",
                     sources=list(body.sources or ()), budget=budget, context_ids=body.context_ids)
    d = (await call(request, D + "Draft", s.Draft, req)).draft
    return {"tokens": list(d.tokens), "parents": list(d.parents), "probs": jsonable(list(d.probs)),
            "source_index": list(d.source_index), "source_names": list(d.source_names)}
