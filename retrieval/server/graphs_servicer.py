"""The Graphs gRPC service (``proto/retrieval/v1/graphs.proto``, docs/graph.md).

Everything that touches the disk or computes (loading graphs, appending edges, scoring links) runs in
the default executor; collection searches are awaited on the loop. FastRP and link-model training are
the job kinds ``fastrp`` and ``link_model_train``.
"""

from __future__ import annotations

import logging

import numpy as np

from retrieval import convert
from retrieval.config import LimitsSettings
from retrieval.core.calls import check_count, check_k, run_blocking
from retrieval.errors import InvalidArgument
from retrieval.graph import convert as gconv
from retrieval.graph.engine import FASTRP_KIND, IMPORT_KIND, MAX_DIM, TRAIN_KIND, GraphEngine
from retrieval.graph.store import resolve_self_loops
from retrieval.v1 import graphs_pb2 as pb
from retrieval.v1 import graphs_pb2_grpc

logger = logging.getLogger(__name__)

MAX_NODES = 10_000          # query nodes per SimilarNodes / Neighbors call
MAX_PREDICT_NODES = 1024    # nodes per PredictLinks call
MAX_PAIRS = 1_000_000       # pairs per ScoreLinks call
MAX_STREAM_EDGES = 50_000_000
MAX_CANDIDATES = 100_000
MAX_EMBEDDING_NODES = 1_000_000  # listed nodes per GetEmbeddings call (all=true streams any number)


class GraphsServicer(graphs_pb2_grpc.GraphsServicer):
    def __init__(self, engine: GraphEngine, jobs, limits: LimitsSettings | None = None) -> None:
        self.engine = engine
        self.store = engine.store
        self.jobs = jobs
        self.limits = limits or LimitsSettings()

    async def _info(self, graph: str) -> pb.GraphInfo:
        return gconv.graph_info_to_proto(await run_blocking(self.store.describe, graph))

    async def CreateGraph(self, request, context):
        await run_blocking(self.store.create, request.graph, int(request.num_nodes), directed=request.directed,
                   weighted=request.weighted)
        return await self._info(request.graph)

    async def ListGraphs(self, request, context):
        def work():
            return pb.ListGraphsResponse(graphs=[gconv.graph_info_to_proto(self.store.describe(g))
                                                 for g in self.store.list()])

        return await run_blocking(work)

    async def DescribeGraph(self, request, context):
        return await self._info(request.graph)

    async def DropGraph(self, request, context):
        def work():
            cols = []
            for e in self.store.list_embeddings(request.graph):
                c = self.store.embedding_info(request.graph, e).get("collection")
                if c:
                    cols.append(c)
            self.store.drop(request.graph)
            return cols

        for c in await run_blocking(work):  # the embeddings' collections go with the graph
            try:
                await self.engine.collections.drop(c)
            except Exception:
                logger.warning("could not drop collection %s of dropped graph %s", c, request.graph)
        return pb.DropGraphResponse()

    async def AddNodes(self, request, context):
        await run_blocking(self.store.add_nodes, request.graph, int(request.count))
        return await self._info(request.graph)

    async def AppendEdges(self, request_iterator, context):
        graph, dup, loops = None, "", ""
        srcs, dsts, ws = [], [], []
        total = 0
        n = None
        async for msg in request_iterator:
            if graph is None:
                if not msg.graph:
                    raise InvalidArgument("the first AppendEdges message must name the graph")
                graph = msg.graph
                g = await run_blocking(self.store.load, graph)
                n, weighted, directed = g.n, g.weighted, g.directed
            elif msg.graph and msg.graph != graph:
                raise InvalidArgument(f"one stream appends to one graph: got {msg.graph!r} after {graph!r}")
            if msg.duplicates:
                dup = msg.duplicates
            if msg.self_loops:
                loops = resolve_self_loops(msg.self_loops, directed)  # a bad policy fails at once
            s, d, w = gconv.edges_from_proto(msg)
            for arr, what in ((s, "src"), (d, "dst")):  # fail at the bad chunk, before reading the rest
                if arr.size and arr.max() >= n:
                    i = int(np.flatnonzero(arr >= n)[0])
                    raise InvalidArgument(f"edge chunk {len(srcs)}: {what}[{i}] = {int(arr[i])} (edge {total + i} of "
                                          f"the stream) is outside graph {graph!r} (n = {n})")
            if w is not None and not weighted:
                raise InvalidArgument(f"graph {graph!r} is unweighted: send no weights")
            total += s.size
            check_count(total, MAX_STREAM_EDGES, "edges")
            srcs.append(s)
            dsts.append(d)
            ws.append(w if w is not None else (np.ones(s.size, np.float32) if weighted else None))
        if graph is None:
            raise InvalidArgument("AppendEdges got no messages")
        src = np.concatenate(srcs) if srcs else np.zeros(0, np.int64)
        dst = np.concatenate(dsts) if dsts else np.zeros(0, np.int64)
        w = np.concatenate(ws) if ws and ws[0] is not None else None
        res = await run_blocking(self.store.append_edges, graph, src, dst, w, duplicates=dup or "last",
                         self_loops=loops or None)
        return gconv.append_result_to_proto(dict(res, received=int(src.size)))

    async def SetFeatures(self, request, context):
        x = None
        if request.features.n:
            x = convert.vectors_from_proto(request.features, "features")
        await run_blocking(self.store.set_features, request.graph, x)
        return await self._info(request.graph)

    async def SetLabels(self, request, context):
        def work():
            g = self.store.load(request.graph)
            self.store.set_labels(request.graph, gconv.labels_from_proto(request, g.n))

        await run_blocking(work)
        return await self._info(request.graph)

    async def Neighbors(self, request, context):
        nodes = gconv.ids_from_proto(request.nodes, "nodes")
        check_count(nodes.size, MAX_NODES, "nodes")

        def work():
            g = self.store.load(request.graph)
            return gconv.neighbors_to_proto([g.neighbors(int(u), request.direction or "out") for u in nodes])

        return await run_blocking(work)

    async def RunFastRP(self, request, context):
        params = {"graph": request.graph, "embedding": request.embedding or "fastrp",
                  "params": gconv.fastrp_params_from_proto(request.params), "use_features": request.use_features,
                  "metric": request.metric or "cosine"}
        tune_options = gconv.tune_options_from_proto(request)
        if request.tune or tune_options is not None:
            params["tune"] = request.tune
        if tune_options is not None:
            params["tune_options"] = tune_options
        if request.HasField("index"):
            from retrieval.indexes import registry

            spec = convert.index_spec_from_proto(request.index)
            params["index"] = registry.spec_to_dict(spec)
            if 0 < params["params"]["dim"] <= MAX_DIM and params["metric"] in ("cosine", "l2", "ip"):
                # the trial of a faiss spec runs off the event loop here; the job's check then finds it cached
                await registry.avalidate(spec, params["params"]["dim"], params["metric"])
        rec = await self.jobs.start(FASTRP_KIND, params)
        return convert.job_to_proto(rec)

    async def SimilarNodes(self, request, context):
        nodes = gconv.ids_from_proto(request.nodes, "nodes")
        check_count(nodes.size, MAX_NODES, "nodes")
        res = await self.engine.similar_nodes(request.graph, request.embedding or "fastrp", nodes,
                                              check_k(request.k, self.limits.max_k),
                                              convert.query_params_from_proto(request.params), request.include_self)
        return pb.SimilarNodesResponse(results=gconv.hits_to_proto(res))

    async def GetEmbeddings(self, request, context):
        nodes = gconv.ids_from_proto(request.nodes, "nodes")
        check_count(nodes.size, MAX_EMBEDDING_NODES, "nodes")
        if not request.all and nodes.size == 0:
            raise InvalidArgument("GetEmbeddings needs nodes, or all=true for every node")
        if request.all and nodes.size:
            raise InvalidArgument("GetEmbeddings takes nodes or all=true, not both")
        X, meta, current = await run_blocking(self.engine.get_embeddings, request.graph, request.embedding or "fastrp",
                                      None if request.all else nodes)
        for chunk in gconv.embeddings_to_chunks(X, int(meta.get("graph_version", 0)), current):
            await context.write(chunk)

    async def TrainLinkModel(self, request, context):
        rec = await self.jobs.start(TRAIN_KIND, gconv.train_request_to_params(request))
        return convert.job_to_proto(rec)

    async def ScoreLinks(self, request, context):
        src = gconv.ids_from_proto(request.src, "src")
        dst = gconv.ids_from_proto(request.dst, "dst")
        check_count(src.size, MAX_PAIRS, "pairs")
        probs = await run_blocking(self.engine.score_links, request.graph, request.model or "ncn", src, dst)
        return pb.ScoreLinksResponse(probabilities=probs.tolist())

    async def PredictLinks(self, request, context):
        nodes = gconv.ids_from_proto(request.nodes, "nodes")
        check_count(nodes.size, MAX_PREDICT_NODES, "nodes")
        cands = gconv.ids_from_proto(request.candidates, "candidates")
        check_count(cands.size, MAX_CANDIDATES, "candidates")
        num_c = int(request.num_candidates) or 100
        check_count(num_c, self.limits.max_k, "candidates per node (num_candidates)")
        res = await self.engine.predict_links(request.graph, request.model or "ncn", nodes,
                                              check_k(request.k, self.limits.max_k),
                                              cands if cands.size else None, request.embedding, num_c,
                                              request.include_neighbors)
        return pb.PredictLinksResponse(results=gconv.hits_to_proto(res))


def register(server, ctx) -> GraphEngine:
    """Create the engine under ``ctx.data_dir / "graphs"``, register the servicer and the job kinds."""
    from retrieval.jobs.manager import JobKind
    from retrieval.server.auth import allowed_client_dirs, resolve_client_file

    # import_graph reads the client's file through the sandbox, confined to the folders the settings allow
    engine = GraphEngine(ctx.data_dir / "graphs", ctx.collections,
                         allowed_dirs=lambda: allowed_client_dirs(ctx.settings, ctx.data_dir))
    graphs_pb2_grpc.add_GraphsServicer_to_server(GraphsServicer(engine, ctx.jobs, ctx.settings.limits), server)
    ctx.jobs.register(JobKind(FASTRP_KIND, body=engine.fastrp_body, validate=engine.validate_fastrp, resumable=True,
                              description="FastRP node embeddings of a graph, stored with it and indexed into a "
                                          "vector collection (replaces the previous one atomically)"))
    ctx.jobs.register(JobKind(TRAIN_KIND, body=engine.train_body, validate=engine.validate_train, resumable=True,
                              description="train an NCN / NCNC / GCN link predictor on a graph (random 70/10/20 "
                                          "split, best validation epoch kept; resumes from its last epoch)"))

    def validate_import(params: dict) -> dict:
        # a path a client names must lie in the folders clients may read (security.client_file_dirs)
        params = dict(params)
        if isinstance(params.get("path"), str) and params["path"]:
            params["path"] = str(resolve_client_file(params["path"], ctx.settings, ctx.data_dir, "graph input"))
        return engine.validate_import(params)

    ctx.jobs.register(JobKind(IMPORT_KIND, body=engine.import_body, validate=validate_import, resumable=False,
                              description="read an edge file (CSV / TSV / text, .mat) or a Planetoid / OGB folder "
                                          "that the server may read into a new graph, or append it to one"))
    return engine
