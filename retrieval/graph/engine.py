"""The graph engine behind the Graphs gRPC service: a :class:`GraphStore`, FastRP and link-model jobs,
SimilarNodes over vector collections, and cached link scorers.

FastRP output goes two places: the embedding file stored with the graph (the query vectors of
SimilarNodes and the candidate search of PredictLinks) and a vector collection named
``g-<graph>-<embedding>-<token>`` (HNSW, cosine by default). A rerun writes a new file and a new
collection, then switches the embedding's JSON record to both in one atomic write, then drops the old
collection: a SimilarNodes call sees the old pair or the new pair, never a mix. Rows that are all zero
(isolated nodes without self-influence) are not indexed; such a node gets no similar nodes.

Thread-safety: synchronous methods run in executor threads and rely on the store's locks; the scorer
cache is guarded by a lock and each scorer serialises its own calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path

import numpy as np

from retrieval.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from retrieval.graph.engine_checks import MAX_DIM, GraphJobChecks  # noqa: F401 (MAX_DIM: graphs_servicer)
from retrieval.graph.fastrp import FastRPParams, fastrp
from retrieval.graph.graph import Graph
from retrieval.graph.store import GraphStore, check_name, resolve_self_loops
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

FASTRP_KIND = "fastrp"
TRAIN_KIND = "link_model_train"
IMPORT_KIND = "import_graph"
MAX_IMPORT_BYTES = 8 << 30       # what one import may copy from the client's folders
IMPORT_READ_UNITS, IMPORT_UNITS = 60, 100  # progress: 0-60 copying bytes, then parsing, then storing
# a folder input: only these subfolders are copied (the layouts of the Planetoid and OGB readers)
IMPORT_SUBFOLDERS = ("derived", "planetoid", "raw", "split")
#: names of the vector collections the engine keeps for FastRP embeddings (hidden by ListCollections)
INTERNAL_COLLECTION_RE = re.compile(r"g-[A-Za-z0-9][A-Za-z0-9_.\-]{0,59}-[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}-[0-9a-f]{8}")


def is_internal_collection(name: str) -> bool:
    """Whether ``name`` has the form of a collection this engine creates (``g-<graph>-<embedding>-<token>``)."""
    return bool(INTERNAL_COLLECTION_RE.fullmatch(name))


MAX_ALL_CANDIDATES = 50_000  # PredictLinks scores every node when no candidates are given, up to this n


def _collection_name(graph: str, embedding: str) -> str:
    return f"g-{graph[:60]}-{embedding[:40]}-{uuid.uuid4().hex[:8]}"


class GraphEngine(GraphJobChecks):
    """``root``: the store folder (``<data_dir>/graphs``). ``collections``: the server's CollectionManager
    (None outside the server: FastRP jobs then only store the embedding file). ``allowed_dirs``: a
    callable giving the folders ``import_graph`` may read client files from, through
    :mod:`retrieval.server.sandbox` (None: paths are read as given, for in-process use)."""

    def __init__(self, root: Path, collections=None, device: str | None = None, allowed_dirs=None) -> None:
        self.store = GraphStore(root)
        self._allowed_dirs = allowed_dirs  # () -> folders client files may come from (None: no sandbox)
        self.collections = collections
        self.device = device
        self._scorers: dict[tuple[str, str], tuple[tuple, object]] = {}
        self._scorers_lock = threading.Lock()

    def fastrp_body(self, ctx, *, graph: str, embedding: str = "fastrp", params: dict, use_features: bool = False,
                    index: dict | None = None, metric: str = "cosine", tune: bool = False,
                    tune_options: dict | None = None) -> dict:
        """Job body (kind ``fastrp``): compute, store with the graph, index into a fresh collection, switch.

        ``tune``: first choose the parameters with :func:`retrieval.graph.fastrp_tune.tune_fastrp`
        (``params`` = the base, ``tune_options`` its options; node classification on the graph's labels,
        else link prediction); the result and the embedding's record then hold the chosen ``params`` and
        the ``tuning`` report. Resumable: the embedding, the chosen parameters and the new collection's
        name are kept in the work folder; upserts are idempotent, so a resumed job repeats only the
        indexing."""
        work = Path(ctx.work_dir)
        g = self.store.load(graph)
        version = self.store.version(graph)
        fp = FastRPParams(**params)
        key = hashlib.sha256(json.dumps([graph, version, fp.as_dict(), use_features, bool(tune), tune_options or {}],
                                        sort_keys=True).encode()).hexdigest()[:16]
        state_f = work / "state.json"
        state = json.loads(state_f.read_text()) if state_f.exists() else {}
        if state.get("key") != key:
            state = {"key": key}
        emb_f = work / "embedding.npy"
        tuning = None
        if state.get("computed") and emb_f.exists():
            emb = np.load(emb_f, allow_pickle=False)
            if tune:
                fp, tuning = FastRPParams(**state["params"]), state["tuning"]
        else:
            feats = g.features if use_features else None
            if tune:
                from retrieval.graph.fastrp_tune import tune_fastrp

                ctx.progress(0, 5, "fastrp tuning")
                fp, tuning = tune_fastrp(g.adjacency(), g.labels, feats, base=fp, seed=fp.seed,
                                         progress=ctx.progress, check_cancelled=ctx.check_cancelled,
                                         **(tune_options or {}))
            k = len(fp.iteration_weights)
            ctx.progress(0, k, "fastrp iterations")
            emb = fastrp(g.adjacency(), fp, features=g.features if use_features else None, progress=ctx.progress,
                         check_cancelled=ctx.check_cancelled)
            atomic.save_npy(emb_f, emb)  # durable before the state that says it is computed
            state["computed"] = True
            if tune:
                state["params"], state["tuning"] = fp.as_dict(), tuning
            _write_json(state_f, state)
        result = {"graph": graph, "embedding": embedding, "n": int(emb.shape[0]), "dim": int(emb.shape[1]),
                  "graph_version": version, "params": fp.as_dict()}
        if tune:
            result["tuning"] = tuning
        if "file" not in state:
            state["file"] = self.store.write_embedding_file(graph, embedding, emb)
            _write_json(state_f, state)
        info = {"kind": "fastrp", "params": fp.as_dict(), "graph_version": version, "use_features": use_features,
                "metric": metric}
        if tune:
            info["tuning"] = tuning
        if self.collections is None:
            meta = self.store.commit_embeddings(graph, embedding, state["file"], info)
            return dict(result, collection=None, file=meta["file"])
        name = state.setdefault("collection", _collection_name(graph, embedding))
        _write_json(state_f, state)
        created_here = False
        try:
            try:
                col = self.collections.get(name)
            except NotFound:
                col = ctx.run_coroutine(self._create_collection(name, emb.shape[1], metric, index))
                created_here = True
            rows = np.flatnonzero(np.any(emb != 0, axis=1)) if metric == "cosine" else np.arange(emb.shape[0])
            step = max(1, min(self.collections.limits.max_batch, 10_000))
            total = len(rows)
            for s in range(0, total, step):
                ctx.check_cancelled()
                ids = rows[s:s + step]
                ctx.run_coroutine(col.upsert(ids.astype(np.uint64), np.ascontiguousarray(emb[ids]), None))
                ctx.progress(min(s + step, total), total, "indexing into the vector collection")
            ctx.run_coroutine(col.wait_indexed(600.0))
        except Cancelled:
            raise  # keep the collection: a resumed job continues with it
        except BaseException:
            if created_here:
                try:
                    ctx.run_coroutine(self.collections.drop(name))
                except Exception:
                    logger.exception("could not drop the unfinished collection %s", name)
            raise
        old = None
        try:
            old = self.store.embedding_info(graph, embedding).get("collection")
        except NotFound:
            pass
        meta = self.store.commit_embeddings(graph, embedding, state["file"], dict(info, collection=name,
                                                                                   indexed=int(len(rows))))
        if old and old != name:
            try:
                ctx.run_coroutine(self.collections.drop(old))
            except NotFound:
                pass
            except Exception:
                logger.exception("could not drop the replaced collection %s", old)
        return dict(result, collection=name, file=meta["file"], indexed=int(len(rows)))

    async def _create_collection(self, name: str, d: int, metric: str, index: dict | None):
        from retrieval.indexes import registry
        from retrieval.vectors.collection import CollectionConfig

        spec = registry.spec_from_dict(index or {"type": "hnsw", "m": 16, "ef_construction": 200})
        return await self.collections.create(CollectionConfig(name=name, dimension=int(d), metric=metric, index=spec))

    async def similar_nodes(self, graph: str, embedding: str, nodes: np.ndarray, k: int, query_params,
                            include_self: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each node: ``(ids, distances)`` of its k nearest nodes in the embedding's collection."""
        import asyncio

        loop = asyncio.get_running_loop()
        meta = await loop.run_in_executor(None, self.store.embedding_info, graph, embedding)
        if not meta.get("collection") or self.collections is None:
            raise FailedPrecondition(f"embedding {embedding!r} of graph {graph!r} has no vector collection; "
                                     "run RunFastRP first")
        X, _ = await loop.run_in_executor(None, lambda: self.store.load_embeddings(graph, embedding, mmap=True))
        nodes = _check_nodes(nodes, X.shape[0])
        col = self.collections.get(meta["collection"])
        xq = np.ascontiguousarray(X[nodes], dtype=np.float32)
        has = np.any(xq != 0, axis=1) if meta.get("metric", "cosine") == "cosine" else np.ones(len(nodes), bool)
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(nodes)
        if has.any():
            kk = k if include_self else k + 1
            res = await col.search(xq[has], kk, query_params)
            for qi, row in zip(np.flatnonzero(has), range(int(has.sum()))):
                ids = res.ids[row]
                dist = res.distances[row]
                keep = ids != np.uint64(2**64 - 1)
                if not include_self:
                    keep &= ids != np.uint64(nodes[qi])
                ids, dist = ids[keep][:k].astype(np.int64), dist[keep][:k]
                out[qi] = (ids, dist.astype(np.float32))
        return out

    # ---- import ----------------------------------------------------------------------------------
    def _allowed(self):
        return None if self._allowed_dirs is None else list(self._allowed_dirs())

    def import_body(self, ctx, *, graph: str, path: str, format: str = "auto", mode: str = "auto",
                    delimiter: str | None = None, header: bool | None = None, directed: bool | None = None,
                    weighted: bool | None = None, index_base=0, num_nodes: int | None = None,
                    self_loops: str | None = None, duplicates: str | None = None) -> dict:
        """Job body (kind ``import_graph``): copy the client's file (or folder) through the sandbox into
        the work folder (progress: bytes), parse it with the reader registry, then create the graph or
        append to it (one atomic store step each). Not resumable: a restart marks it failed, and what
        was stored before is either the old or the new graph."""
        from retrieval.graph.readers import detect_format, get_reader

        work = Path(ctx.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        copy = _copy_input(path, self._allowed(), work / "input", ctx)
        ctx.check_cancelled()
        fmt = format
        opts: dict = {}
        if fmt in ("csv", "tsv", "edgelist"):
            opts = {"delimiter": {"csv": ",", "tsv": "\t"}.get(fmt, delimiter)}
            fmt = "edgelist"
        elif fmt == "auto":
            fmt = detect_format(copy)
        if fmt == "edgelist":
            opts.setdefault("delimiter", delimiter)
            if opts["delimiter"] is None:
                opts["delimiter"] = "sniff"
            opts.update(header=header, index_base=index_base, num_nodes=num_nodes, self_loops=True,
                        duplicates=duplicates or "first", directed=bool(directed))
            if weighted is not None:
                opts["weighted"] = weighted
        elif fmt == "mat":
            opts.update(directed=directed, weighted=weighted, self_loops=True)
        elif fmt == "ogbl":
            opts.update(directed=bool(directed))
        ctx.progress(IMPORT_READ_UNITS, IMPORT_UNITS, f"parsing ({fmt})")
        try:
            res = get_reader(fmt).read(copy, **opts)
        except TypeError as e:
            raise InvalidArgument(f"reader {fmt!r} does not take these options: {e}") from None
        g = res.graph
        ctx.check_cancelled()
        ctx.progress(IMPORT_READ_UNITS + 10, IMPORT_UNITS, "storing")
        src, dst, w = g.edges()
        exists = self.store.exists(graph)
        created = not exists and mode != "append"
        if not exists and mode == "append":
            raise NotFound(f"graph {graph!r} was dropped while the import ran")
        if exists and mode == "create":
            raise AlreadyExists(f"graph {graph!r} was created while the import ran")
        out = {"graph": graph, "format": fmt, "source": res.source.replace(str(copy), path), "rows": res.info.get("rows"),
               "created": created, "file_nodes": g.n, "file_edges": g.num_edges}
        if res.info.get("delimiter") is not None:
            out["delimiter"] = res.info["delimiter"]
        if created:
            policy = resolve_self_loops(self_loops, g.directed)
            loops = src == dst
            if loops.any() and policy == "reject":
                i = int(np.flatnonzero(loops)[0])
                raise InvalidArgument(f"{path}: edge ({int(src[i])}, {int(dst[i])}) is a self-loop and "
                                      "self_loops='reject'")
            dropped = int(loops.sum()) if policy == "drop" else 0
            if dropped:
                g = Graph.from_edges(g.n, src[~loops], dst[~loops], None if w is None else w[~loops],
                                     directed=g.directed, weighted=g.weighted, duplicates="first",
                                     features=g.features, labels=g.labels)
            try:
                self.store.put(graph, g)
            except AlreadyExists:
                raise AlreadyExists(f"graph {graph!r} was created while the import ran") from None
            out.update(added=g.num_edges, self_loops_dropped=dropped, features=g.features is not None,
                       labels=g.labels is not None)
        else:
            cur = self.store.load(graph)
            ignored = [k for k, v in (("features", g.features), ("labels", g.labels)) if v is not None]
            if w is not None and not cur.weighted:
                w = None
                ignored.append("weights")
            # one atomic step: the graph grows to the file's node count with its edges, or not at all
            r = self.store.append_edges(graph, src, dst, w, duplicates=duplicates or "last", self_loops=self_loops,
                                        num_nodes=g.n)
            out.update(added=r["added"], self_loops_dropped=r["self_loops_dropped"], ignored=ignored)
        d = self.store.describe(graph)
        out.update(n=d["n"], m=d["m"], version=d["version"])
        ctx.progress(IMPORT_UNITS, IMPORT_UNITS, "stored")
        return out

    # ---- embeddings ------------------------------------------------------------------------------
    def get_embeddings(self, graph: str, embedding: str, nodes=None) -> tuple[np.ndarray, dict, int]:
        """``(rows float32 [len(nodes) or n, d], the embedding's record, the graph's current version)``;
        ``nodes`` None: every node (a memory map, read as it is sent)."""
        X, meta = self.store.load_embeddings(graph, embedding, mmap=True)
        current = self.store.version(graph)
        if nodes is None:
            return X, meta, current
        nodes = _check_nodes(nodes, X.shape[0])
        return np.ascontiguousarray(X[nodes], dtype=np.float32), meta, current

    def train_body(self, ctx, *, graph: str, model: str = "ncn", preset: str | None = None, config: dict | None = None,
                   seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2, device: str = "auto",
                   evaluate: str = "holdout") -> dict:
        """Job body (kind ``link_model_train``); resumable through ``last.pt`` in the work folder."""
        from retrieval.graph.linkpred import ncn_train_job

        out = ncn_train_job(ctx, store_root=str(self.store.root), graph=graph, model_name=model, preset=preset,
                            config=config, seed=seed, val_frac=val_frac, test_frac=test_frac,
                            device=None if device == "auto" else device, evaluate=evaluate)
        with self._scorers_lock:
            self._scorers.pop((graph, model), None)
        return out

    def scorer(self, graph: str, model: str):
        """The cached :class:`LinkScorer` of ``(graph, model)``, reloaded when either changed."""
        from retrieval.graph.linkpred import LinkScorer

        check_name(model, "model name")
        mfile = self.store.path(graph) / "models" / model / "model.json"
        version = self.store.version(graph)
        try:
            stamp = (version, os.stat(mfile).st_mtime_ns)
        except FileNotFoundError:
            raise NotFound(f"graph {graph!r} has no link model {model!r} (known: {self.store.list_models(graph)})") from None
        with self._scorers_lock:
            hit = self._scorers.get((graph, model))
            if hit is not None and hit[0] == stamp:
                return hit[1]
        sc = LinkScorer.load(self.store, graph, model, device=self.device)
        with self._scorers_lock:
            self._scorers[(graph, model)] = (stamp, sc)
        return sc

    def score_links(self, graph: str, model: str, src, dst) -> np.ndarray:
        src, dst = np.asarray(src), np.asarray(dst)
        if src.shape != dst.shape:
            raise InvalidArgument(f"src and dst must have the same length, got {src.size} and {dst.size}")
        if src.size == 0:
            return np.zeros(0, np.float32)
        return self.scorer(graph, model).score(np.stack([src, dst], 1))

    async def predict_links(self, graph: str, model: str, nodes, k: int, candidates=None, embedding: str = "",
                            num_candidates: int = 100, include_neighbors: bool = False):
        """For each node: ``(ids, probabilities)`` of its top-k predicted new neighbours."""
        import asyncio

        from retrieval.indexes.base import QueryParams

        loop = asyncio.get_running_loop()
        sc = await loop.run_in_executor(None, self.scorer, graph, model)
        n = sc.graph.n
        nodes = _check_nodes(nodes, n)
        if candidates is not None and len(candidates):
            cand_lists = [np.asarray(candidates)] * len(nodes)
        elif embedding:
            hits = await self.similar_nodes(graph, embedding, nodes, num_candidates,
                                            QueryParams(ef=max(64, num_candidates)))
            cand_lists = [h[0] for h in hits]
        else:
            if n > MAX_ALL_CANDIDATES:
                raise InvalidArgument(f"graph {graph!r} has {n} nodes: give candidates or an embedding to draw "
                                      f"them from (every node is scored only up to {MAX_ALL_CANDIDATES})")
            cand_lists = [None] * len(nodes)

        def work():
            return [sc.predict(int(u), c, k, exclude_neighbors=not include_neighbors) for u, c in zip(nodes, cand_lists)]

        return await loop.run_in_executor(None, work)


def _check_nodes(nodes, n: int) -> np.ndarray:
    from retrieval.graph.graph import as_node_ids

    arr = np.asarray(nodes, dtype=np.uint64).astype(np.int64) if np.asarray(nodes).dtype == np.uint64 else np.asarray(nodes)
    if np.asarray(nodes).dtype == np.uint64 and np.any(np.asarray(nodes) >= np.uint64(2**63)):
        raise InvalidArgument(f"node ids must be < {n}")
    return as_node_ids(arr, "nodes", n)


def _copy_input(path: str, allowed, dest: Path, ctx) -> Path:
    """Copy the client's file or folder ``path`` to ``dest`` (a fresh folder) and return the copy's path
    (same base name). With ``allowed`` every file is opened through :mod:`retrieval.server.sandbox` and
    copied from the opened descriptor (what was checked is what is read); a folder contributes its
    regular files and the subfolders :data:`IMPORT_SUBFOLDERS` (``split/<kind>/`` one level deeper).
    Progress: bytes copied, scaled to the first :data:`IMPORT_READ_UNITS` units."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    name = Path(path).name or "input"
    plan: list[tuple[object, str, Path, int]] = []  # (opened file, shown path, target, bytes)
    opened: list = []
    try:
        if allowed is None:
            src = Path(path)
            if not src.exists():
                raise NotFound(f"{path} does not exist")
            files = [src] if src.is_file() else sorted(
                q for q in src.rglob("*") if q.is_file() and (q.parent == src or q.relative_to(src).parts[0]
                                                             in IMPORT_SUBFOLDERS))
            for q in files:
                f = open(q, "rb")  # noqa: SIM115 - closed in the finally below, after the copy
                opened.append(f)
                rel = Path(name) if src.is_file() else Path(name) / q.relative_to(src)
                plan.append((f, str(q), dest / rel, os.fstat(f.fileno()).st_size))
        else:
            from retrieval.server import sandbox

            if not sandbox.is_dir(path):
                f = sandbox.open_file(path, allowed, "edge file")
                opened.append(f)
                plan.append((f, path, dest / name, os.fstat(f.fileno()).st_size))
            else:
                def walk(folder: str, rel: Path, depth: int) -> None:
                    d = sandbox.open_dir(folder, allowed, "graph folder")
                    opened.append(d)
                    for fn in d.files():
                        f = d.open(fn, "file in graph folder")
                        opened.append(f)
                        plan.append((f, os.path.join(folder, fn), dest / rel / fn, os.fstat(f.fileno()).st_size))
                    with os.scandir(d.fd) as it:
                        subs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
                    for sub in subs:
                        if depth == 0 and sub in IMPORT_SUBFOLDERS or depth == 1 and rel.name == "split":
                            walk(os.path.join(folder, sub), rel / sub, depth + 1)

                walk(path, Path(name), 0)
        total = sum(b for *_, b in plan)
        if total > MAX_IMPORT_BYTES:
            raise ResourceExhausted(f"{path}: {total} bytes to import; the limit is {MAX_IMPORT_BYTES}")
        done = 0
        ctx.progress(0, IMPORT_UNITS, f"reading {path}")
        for f, shown, target, _ in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                while True:
                    ctx.check_cancelled()
                    buf = f.read(1 << 22)
                    if not buf:
                        break
                    out.write(buf)
                    done += len(buf)
                    ctx.progress(IMPORT_READ_UNITS * done / max(total, 1), IMPORT_UNITS, f"reading {shown}")
    finally:
        for f in opened:
            f.close()
    return dest / name


def _write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, sort_keys=True)


__all__ = ["FASTRP_KIND", "IMPORT_KIND", "TRAIN_KIND", "GraphEngine", "is_internal_collection"]
