"""The graphs engine of :class:`retrieval.AsyncClient`: graphs, edges, features, embeddings, link models."""

from __future__ import annotations

import contextlib

import numpy as np

from retrieval import client_convert as cc
from retrieval import errors
from retrieval.client import types


class AsyncGraphsMixin:
    """Graphs: the async twins of :class:`retrieval.client.graphs.GraphsMixin` (over
    :class:`~retrieval.client.aio_transport.AsyncTransport`; job-starting methods wait with ``_run_job``)."""

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
                         index=None, metric: str = "", wait: bool = True, *, tune: bool = False,
                         tune_options: dict | None = None, progress: bool | None = None,
                         detach: bool = False, timeout: float | None = None, **params) -> dict:
        """As :meth:`retrieval.Client.run_fastrp`."""
        from retrieval.graph import convert as gconv
        from retrieval.v1 import graphs_pb2 as gpb

        req = gpb.RunFastRPRequest(graph=graph, embedding=embedding, use_features=use_features, metric=metric,
                                   params=gconv.fastrp_params_to_proto(dict(params, dim=dim)),
                                   **gconv.tune_fields(tune, tune_options))
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
        call = self._server_stream(self._stub("Graphs").GetEmbeddings, req,
                                   timeout if timeout is not None else max(self.timeout, 600.0))
        async with contextlib.aclosing(call) as msgs:
            chunks = [msg async for msg in msgs]
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
