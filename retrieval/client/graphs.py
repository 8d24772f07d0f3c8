"""The graph client methods: graphs (nodes, edges, features, labels, file imports), FastRP embeddings
(a job) and NCN / NCNC link models (a job to train, then scoring and prediction)."""

from __future__ import annotations

import numpy as np

from retrieval import client_convert as cc
from retrieval import convert, errors
from retrieval.client import types
from retrieval.client.transport import LONG_CALL_S
from retrieval.client.types import AppendEdgesResult, GraphInfo, JobInfo
from retrieval.v1 import graphs_pb2 as gpb


def _gconv():
    """``retrieval.graph.convert``, imported on the first call that needs it: it loads the graph engine
    package (~0.4 s: scipy sparse graphs, readers, FastRP), which a vector-search client never needs."""
    from retrieval.graph import convert as gconv

    return gconv


class GraphsMixin:
    """Graphs (``client.graphs``); needs a :class:`~retrieval.client.transport.Transport` and
    :class:`~retrieval.client.jobs.JobsMixin` (the job-starting methods wait with ``_run_job``)."""

    # --- graphs (FastRP, NCN / NCNC link prediction) ------------------------------------------------
    def _graphs_stub(self):
        return self._graphs

    def create_graph(self, name: str, num_nodes: int = 0, directed: bool = False, weighted: bool = False) -> GraphInfo:
        """Create an empty graph with ``num_nodes`` isolated nodes; returns its description."""
        req = gpb.CreateGraphRequest(graph=name, num_nodes=num_nodes, directed=directed, weighted=weighted)
        return types.graph_info(self._call(self._graphs_stub().CreateGraph, req))

    def list_graphs(self) -> list[GraphInfo]:
        resp = self._call(self._graphs_stub().ListGraphs, gpb.ListGraphsRequest())
        return [types.graph_info(g) for g in resp.graphs]

    def describe_graph(self, name: str) -> GraphInfo:
        return types.graph_info(self._call(self._graphs_stub().DescribeGraph, gpb.GraphRef(graph=name)))

    def drop_graph(self, name: str) -> None:
        self._call(self._graphs_stub().DropGraph, gpb.GraphRef(graph=name))

    def add_nodes(self, graph: str, count: int) -> GraphInfo:
        return types.graph_info(self._call(self._graphs_stub().AddNodes,
                                                      gpb.AddNodesRequest(graph=graph, count=count)))

    def append_edges(self, graph: str, src, dst, weights=None, duplicates: str = "", chunk: int = 100_000,
                     timeout: float | None = None, self_loops: str = "") -> AppendEdgesResult:
        """Stream edges in chunks of ``chunk``; stored in one atomic step at the end (a bad chunk stores
        nothing). Ids are checked here first (a fraction, a negative id or a string names its position);
        ids >= n are refused by the server, naming the position too. ``self_loops``: ``drop`` (the
        server's default on undirected graphs), ``keep`` (default on directed ones) or ``reject``.
        Returns ``{"received", "added", "m", "version", "self_loops_dropped"}``."""
        src, dst = _gconv().node_ids_in(src, "src"), _gconv().node_ids_in(dst, "dst")
        reqs = cc.edge_requests(graph, src, dst, weights, duplicates, chunk)
        reqs[0].self_loops = self_loops or ""
        resp = self._call(self._graphs_stub().AppendEdges, iter(reqs), timeout, floor=LONG_CALL_S, retry=False)
        return types.append_result(resp)

    def set_node_features(self, graph: str, features) -> GraphInfo:
        """Attach node features ``[n, f]`` (float32, packed); ``None`` removes them."""
        req = gpb.SetFeaturesRequest(graph=graph)
        if features is not None:
            x = np.asarray(features, np.float32)
            if x.ndim != 2:
                raise errors.InvalidArgument(f"features must be a 2-D array [n, f], got shape {x.shape}")
            convert.vectors_to_proto(x, req.features)
        return types.graph_info(self._call(self._graphs_stub().SetFeatures, req))

    def set_node_labels(self, graph: str, labels) -> GraphInfo:
        """Attach labels: int ``[n]`` (-1 = unlabeled) or a 0/1 matrix ``[n, L]``; ``None`` removes them."""
        return types.graph_info(self._call(self._graphs_stub().SetLabels,
                                                      _gconv().labels_to_proto(graph, labels)))

    def neighbors(self, graph: str, nodes, direction: str = "out") -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, weights)]`` per node."""
        req = cc.neighbors_request(graph, nodes, direction)
        return _gconv().neighbors_from_proto(self._call(self._graphs_stub().Neighbors, req))

    def run_fastrp(self, graph: str, dim: int, embedding: str = "fastrp", use_features: bool = False, index=None,
                   metric: str = "", wait: bool = True, *, tune: bool = False, tune_options: dict | None = None,
                   progress: bool | None = None, detach: bool = False, timeout: float | None = None,
                   **params) -> JobInfo:
        """FastRP as a job (kind ``fastrp``); ``params``: iteration_weights, beta, s, self_influence,
        property_ratio, normalize, propagate_normalized, standardize, whiten, seed (another key is an
        InvalidArgument). ``tune``: choose the weights, beta and propagation first
        (:func:`retrieval.graph.fastrp_tune.tune_fastrp`, scored on the graph's labels, else on held-out
        edges; ``params`` are the base); ``tune_options``: its options (dims,
        betas, max_power, time_limit, ...). The result then holds the chosen ``params`` and the ``tuning``
        report. Returns the final job record; ``detach`` (or ``wait=False``): the record at once.
        ``progress`` / ``timeout`` / Ctrl-C: as in :meth:`_run_job` (the job is cancelled when the wait is
        given up)."""
        req = gpb.RunFastRPRequest(graph=graph, embedding=embedding, use_features=use_features, metric=metric,
                                   params=_gconv().fastrp_params_to_proto(dict(params, dim=dim)),
                                   **_gconv().tune_fields(tune, tune_options))
        if index is not None:
            req.index.CopyFrom(cc.index_spec(index))
        job = types.job(self._call(self._graphs_stub().RunFastRP, req))
        return self._run_job(job, progress, detach or not wait, timeout)

    def import_graph(self, name: str, path: str, format: str = "auto", *, mode: str = "auto",
                     delimiter: str | None = None, header: bool | None = None, directed: bool | None = None,
                     weighted: bool | None = None, index_base=0, num_nodes: int | None = None,
                     self_loops: str | None = None, duplicates: str | None = None, progress: bool | None = None,
                     detach: bool = False, timeout: float | None = None) -> JobInfo:
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
        gconv = _gconv()
        req = gpb.GetEmbeddingsRequest(graph=graph, embedding=name, all=nodes is None)
        if nodes is not None:
            ids = gconv.node_ids_in(nodes, "nodes")
            if ids.size == 0:
                return np.zeros((0, 0), np.float32)
            req.nodes.extend(ids.tolist())
        X, _ = gconv.embeddings_from_chunks(self._server_stream(self._graphs_stub().GetEmbeddings, req, timeout,
                                                                floor=LONG_CALL_S))
        return X

    def similar_nodes(self, graph: str, nodes, k: int = 10, embedding: str = "fastrp", ef: int = 0,
                      exact: bool = False, include_self: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(ids, distances)]`` per query node: its nearest nodes by FastRP embedding (cosine: 1 - cos)."""
        req = cc.similar_nodes_request(graph, nodes, k, embedding, ef, exact, include_self)
        return _gconv().hits_from_proto(self._call(self._graphs_stub().SimilarNodes, req).results)

    def train_link_model(self, graph: str, model: str = "ncn", preset: str = "", config: dict | None = None,
                         seed: int = 0, val_frac: float | None = None, test_frac: float | None = None,
                         device: str = "", wait: bool = True, *, progress: bool | None = None, detach: bool = False,
                         timeout: float | None = None, evaluate: str = "") -> JobInfo:
        """Train an NCN / NCNC / GCN link model (job kind ``link_model_train``); ``config``: NCNConfig
        overrides, e.g. ``{"predictor": "ncnc", "input": "learnable", "epochs": 50}``; ``preset`` ``""`` /
        ``"auto"``: chosen from the graph (features, size, density; early stopping on), or a name in
        ``retrieval.graph.ncn.PRESETS``; the result's ``preset`` says which. ``evaluate``:
        ``holdout`` (default: 70/10/20 split, held-out edges masked when the model serves) or ``none``
        (every edge trains, no metrics). Returns the final job record; ``detach`` (or ``wait=False``): the
        record at once. ``progress`` / ``timeout`` / Ctrl-C: as in :meth:`_run_job`."""
        p = {"graph": graph, "model": model, "preset": preset, "config": config or {}, "seed": seed, "device": device,
             "evaluate": evaluate}
        if val_frac is not None:
            p["val_frac"] = val_frac
        if test_frac is not None:
            p["test_frac"] = test_frac
        job = types.job(self._call(self._graphs_stub().TrainLinkModel, _gconv().train_params_to_request(p)))
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
        req = cc.predict_links_request(graph, nodes, k, model, candidates, embedding, num_candidates,
                                       include_neighbors)
        return _gconv().hits_from_proto(self._call(self._graphs_stub().PredictLinks, req).results)
