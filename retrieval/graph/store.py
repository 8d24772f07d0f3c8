"""Named graphs on disk.

Layout under the store's root folder (one sub-folder per graph)::

    <root>/<name>/manifest.json        the commit point: names the current version's files
    <root>/<name>/csr.v<k>.npz         indptr, indices[, weights]   (np.savez, never pickled)
    <root>/<name>/features.v<k>.npy    float32 [n, f]               (optional)
    <root>/<name>/labels.v<k>.npz      y int64 [n] or the CSR of a 0/1 matrix [n, L] (optional)
    <root>/<name>/embeddings/<emb>.npy + <emb>.json   FastRP outputs (written by the FastRP job)
    <root>/<name>/models/<model>/                     NCN / NCNC checkpoints (written by training)

Durability: every change writes new, versioned files (temp file + fsync + rename), then replaces
``manifest.json`` the same way; only then are the files of the previous version deleted. A crash at
any point leaves either the old or the new version readable, never a half-written graph. Files that
no manifest names (left by a crash) are removed when the graph is next written. A graph is created
in a temporary folder and renamed into place; drop renames it away before deleting it.

Thread-safety: all methods may be called from several threads. Writes to one graph are serialised
by a per-graph lock; reads return immutable :class:`Graph` snapshots (cached per version).
Several *processes* must not write the same store at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from retrieval.graph.graph import Graph, Labels, as_features, as_labels, as_node_ids, as_weights
from retrieval.graph.names import NAME_RE, check_name
from retrieval.graph.store_outputs import StoredOutputs
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_NODES = 100_000_000  # per graph: the CSR row pointer alone is 8 bytes a node


def check_num_nodes(n: int, max_nodes: int = MAX_NODES) -> None:
    if n > max_nodes:
        raise ResourceExhausted(f"a graph of {n} nodes exceeds the limit of {max_nodes} nodes")


SELF_LOOP_POLICIES = ("drop", "keep", "reject")


def resolve_self_loops(policy: str | None, directed: bool) -> str:
    """The self-loop policy of an append: ``policy``, or when it is None / empty the default (``drop`` on
    undirected graphs, ``keep`` on directed ones)."""
    if policy in (None, ""):
        return "keep" if directed else "drop"
    if policy not in SELF_LOOP_POLICIES:
        raise InvalidArgument(f"self_loops must be one of {list(SELF_LOOP_POLICIES)}, got {policy!r}")
    return policy


# --------------------------------------------------------------------------------------------------
# atomic file helpers
# --------------------------------------------------------------------------------------------------
# The store's names for the package's one set of crash-safe writers (:mod:`retrieval.storage.atomic`).
_fsync_dir = atomic.fsync_dir
atomic_write_bytes = atomic.write_bytes
atomic_save_npz = atomic.save_npz
atomic_save_npy = atomic.save_npy


def atomic_write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------------
class GraphStore(StoredOutputs):
    """Named graphs under ``root``. See the module docstring for layout, durability and threads.

    ``cache_size``: how many loaded graph versions to keep in memory.
    """

    def __init__(self, root: str | os.PathLike, cache_size: int = 4) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._cache: OrderedDict[tuple[str, int], Graph] = OrderedDict()
        self._cache_size = int(cache_size)
        self._cache_guard = threading.Lock()
        self._clean_debris()

    def _clean_debris(self) -> None:
        """Remove folders left by a crash during drop (any age) or create (older than an hour)."""
        now = time.time()
        for p in self.root.glob(".dropped-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".creating-*"):
            try:
                if now - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass

    # ---- paths and locks ----------------------------------------------------------------------
    def _lock(self, name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.RLock())

    def path(self, name: str) -> Path:
        """The folder of graph ``name`` (validated; it may not exist)."""
        return self.root / check_name(name)

    def _manifest(self, name: str) -> dict:
        p = self.path(name) / "manifest.json"
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise NotFound(f"graph {name!r} does not exist (known graphs: {self.list()})") from None

    def exists(self, name: str) -> bool:
        return (self.path(name) / "manifest.json").exists()

    # ---- lifecycle ----------------------------------------------------------------------------
    def list(self) -> list[str]:
        """Names of the stored graphs, sorted."""
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and NAME_RE.fullmatch(p.name) and (p / "manifest.json").exists():
                out.append(p.name)
        return sorted(out)

    def create(self, name: str, num_nodes: int = 0, *, directed: bool = False, weighted: bool = False) -> dict:
        """Create an empty graph with ``num_nodes`` isolated nodes. Raises AlreadyExists."""
        check_name(name)
        if isinstance(num_nodes, (int, np.integer)) and not isinstance(num_nodes, bool):
            check_num_nodes(int(num_nodes))
        g = Graph.from_edges(num_nodes, [], [], None, directed=directed, weighted=weighted)
        return self.put(name, g)

    def put(self, name: str, graph: Graph, *, overwrite: bool = False) -> dict:
        """Store ``graph`` (edges, features, labels) under ``name``; returns :meth:`describe`.

        With ``overwrite=False`` an existing name raises AlreadyExists; with ``overwrite=True`` the
        graph is replaced atomically (its embeddings and models are kept, and marked stale by version).
        """
        check_name(name)
        check_num_nodes(graph.n)
        with self._lock(name):
            final = self.path(name)
            if final.exists() and (final / "manifest.json").exists():
                if not overwrite:
                    raise AlreadyExists(f"graph {name!r} already exists; drop it first or pass overwrite=True")
                self._commit(name, graph, features=graph.features, labels=graph.labels, replace_all=True)
                return self.describe(name)
            if final.exists():  # a folder without manifest: debris of a crashed create; clear it
                shutil.rmtree(final, ignore_errors=True)
            tmp = self.root / f".creating-{name}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                self._write_version(tmp, name, graph, graph.features, graph.labels, version=1, created=time.time())
                os.replace(tmp, final)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if final.exists():
                    raise AlreadyExists(f"graph {name!r} already exists") from e
                raise
            _fsync_dir(self.root)
            logger.info("created graph %s: n=%d m=%d", name, graph.n, graph.num_edges)
            return self.describe(name)

    def drop(self, name: str) -> None:
        """Delete graph ``name`` and everything stored with it. Raises NotFound."""
        with self._lock(name):
            p = self.path(name)
            if not (p / "manifest.json").exists():
                raise NotFound(f"graph {name!r} does not exist (known graphs: {self.list()})")
            trash = self.root / f".dropped-{name}-{uuid.uuid4().hex}"
            os.replace(p, trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            self._evict(name)
            logger.info("dropped graph %s", name)

    # ---- reads --------------------------------------------------------------------------------
    def version(self, name: str) -> int:
        return int(self._manifest(name)["version"])

    def load(self, name: str) -> Graph:
        """The current version of graph ``name`` (an immutable snapshot, cached)."""
        with self._lock(name):
            man = self._manifest(name)
            key = (name, int(man["version"]))
            with self._cache_guard:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            g = self._read_version(self.path(name), man)
            with self._cache_guard:
                self._cache[key] = g
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return g

    def describe(self, name: str) -> dict:
        g = self.load(name)
        man = self._manifest(name)
        out = {"name": name, "version": int(man["version"]), "created": man.get("created"),
               "updated": man.get("updated")}
        out.update(g.describe())
        out["embeddings"] = self.list_embeddings(name)
        out["models"] = self.list_models(name)
        out["model_info"] = {m: self.model_summary(name, m) for m in out["models"]}
        return out

    def model_summary(self, name: str, model_name: str) -> dict:
        """What ``describe`` shows of a stored link model: how it was evaluated (``holdout``: its held-out
        edges are masked when it serves; ``none``: trained on every edge), whether it is a cancelled
        run's best epoch (``partial``), and the graph version it was trained on."""
        try:
            meta = json.loads((self.path(name) / "models" / model_name / "model.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        ev = meta.get("evaluate", "holdout")
        return {"evaluate": ev, "held_out_edges": int(meta.get("held_out_edges", 0)),
                "masked_at_serving": ev == "holdout" and int(meta.get("held_out_edges", 0)) > 0,
                "partial": bool(meta.get("partial", False)), "graph_version": meta.get("graph_version")}

    def neighbors(self, name: str, node: int, direction: str = "out") -> tuple[np.ndarray, np.ndarray]:
        """``(ids, weights)`` of the neighbours of ``node``; see :meth:`Graph.neighbors`."""
        return self.load(name).neighbors(node, direction)

    # ---- writes -------------------------------------------------------------------------------
    def append_edges(self, name: str, src, dst, weights=None, *, duplicates: str = "last",
                     self_loops: str | None = None, num_nodes: int | None = None) -> dict:
        """Add edges to graph ``name``. Validation happens before anything is written.

        Node ids must already exist (see :meth:`add_nodes`); each is checked before any cast (a fraction,
        a negative id, a string or an id >= n is an InvalidArgument naming its position). ``weights``:
        finite and >= 0, only for a weighted graph (default 1). A repeated edge is stored once; on a
        weighted graph its weight follows ``duplicates`` (``last``: the newest row wins).

        ``self_loops`` (rows ``u == u``): ``drop`` (skip them; the default on undirected graphs, the
        ones link prediction trains on: a self-loop is never a link to predict and inflates common
        neighbours), ``keep`` (store them; the default on directed graphs) or ``reject`` (the whole call
        fails, naming the first one). ``num_nodes``: grow the graph to this many nodes in the same atomic
        step (as :meth:`add_nodes`; never shrinks it). Returns ``{"added": new edges, "m": edges now,
        "version": ..., "self_loops_dropped": rows skipped}``. Each call rewrites the CSR (O(m)): append in
        batches.
        """
        with self._lock(name):
            g = self.load(name)
            policy = resolve_self_loops(self_loops, g.directed)
            if num_nodes is not None and int(num_nodes) > g.n:
                check_num_nodes(int(num_nodes))
                g = _grown(g, int(num_nodes))
            src = as_node_ids(src, "src", g.n)
            dst = as_node_ids(dst, "dst", g.n)
            if src.shape != dst.shape:
                raise InvalidArgument(f"src and dst must have the same length, got {src.shape[0]} and {dst.shape[0]}")
            if weights is not None and not g.weighted:
                raise InvalidArgument(f"graph {name!r} is unweighted: send no weights, or create it with weighted=True")
            w_new = as_weights(weights, src.shape[0]) if weights is not None else None
            loops = src == dst
            dropped = 0
            if loops.any():
                if policy == "reject":
                    i = int(np.flatnonzero(loops)[0])
                    raise InvalidArgument(f"edge {i} ({int(src[i])}, {int(dst[i])}) is a self-loop and self_loops="
                                          f"'reject'; pass self_loops='drop' or 'keep'")
                if policy == "drop":
                    dropped = int(loops.sum())
                    src, dst = src[~loops], dst[~loops]
                    w_new = w_new[~loops] if w_new is not None else None
            if src.size == 0 and g.n == self.load(name).n:
                return {"added": 0, "m": g.num_edges, "version": self.version(name), "self_loops_dropped": dropped}
            s0, d0, w0 = g.edges()
            if g.weighted:
                w0 = w0 if w0 is not None else np.ones(s0.shape[0], np.float32)
                w_new = w_new if w_new is not None else np.ones(src.shape[0], np.float32)
                w_all = np.concatenate([w0, w_new])
            else:
                w_all = None
            new = Graph.from_edges(g.n, np.concatenate([s0, src]), np.concatenate([d0, dst]), w_all,
                                   directed=g.directed, weighted=g.weighted, duplicates=duplicates)
            added = new.num_edges - g.num_edges
            self._commit(name, new, features=g.features, labels=g.labels)
            return {"added": int(added), "m": new.num_edges, "version": self.version(name),
                    "self_loops_dropped": dropped}

    def add_nodes(self, name: str, count: int) -> dict:
        """Append ``count`` isolated nodes (ids ``n .. n+count-1``); features pad with 0, labels with -1."""
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise InvalidArgument(f"count must be a non-negative integer, got {count!r}")
        with self._lock(name):
            g = self.load(name)
            n2 = g.n + int(count)
            check_num_nodes(n2)
            new = _grown(g, n2)
            self._commit(name, new, features=new.features, labels=new.labels)
            return {"n": n2, "version": self.version(name)}

    def set_features(self, name: str, features) -> dict:
        """Attach node features: float32 ``[n, f]``, finite. ``None`` removes them."""
        with self._lock(name):
            g = self.load(name)
            x = None if features is None else as_features(features, g.n)
            self._commit(name, g.with_features(x), features=x, labels=g.labels, features_changed=True)
            return {"feature_dim": 0 if x is None else int(x.shape[1]), "version": self.version(name)}

    def set_labels(self, name: str, labels) -> dict:
        """Attach labels: int ``[n]`` (-1 unlabeled) or a 0/1 ``[n, L]`` matrix. ``None`` removes them."""
        with self._lock(name):
            g = self.load(name)
            lab = None if labels is None else as_labels(labels, g.n)
            self._commit(name, g.with_labels(lab), features=g.features, labels=lab, labels_changed=True)
            return {"version": self.version(name)}

    # ---- internals ----------------------------------------------------------------------------
    def _evict(self, name: str) -> None:
        with self._cache_guard:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    def _commit(self, name: str, graph: Graph, *, features, labels, replace_all: bool = False,
                features_changed: bool = False, labels_changed: bool = False) -> None:
        folder = self.path(name)
        man = self._manifest(name)
        version = int(man["version"]) + 1
        # unchanged feature / label files are reused instead of rewritten
        reuse = {}
        if not replace_all and not features_changed and features is not None and man.get("features") \
                and features.shape[0] == man.get("n"):
            reuse["features"] = man["features"]
        if not replace_all and not labels_changed and labels is not None and man.get("labels") \
                and _labels_n(labels) == man.get("n") and graph.n == man.get("n"):
            reuse["labels"] = man["labels"]
        if graph.n != man.get("n"):
            reuse.pop("features", None)
            reuse.pop("labels", None)
        self._write_version(folder, name, graph, features, labels, version=version, created=man.get("created"),
                            reuse=reuse)
        self._gc(folder)

    def _write_version(self, folder: Path, name: str, g: Graph, features, labels, *, version: int,
                       created, reuse: dict | None = None) -> None:
        reuse = reuse or {}
        man = {"format": FORMAT_VERSION, "name": name, "version": version, "n": g.n, "m": g.num_edges,
               "directed": g.directed, "weighted": g.weighted, "created": created or time.time(),
               "updated": time.time()}
        csr_file = f"csr.v{version}.npz"
        arrays = {"indptr": g.indptr, "indices": g.indices.astype(np.int32 if g.n < 2**31 else np.int64)}
        if g.weights is not None:
            arrays["weights"] = g.weights
        atomic_save_npz(folder / csr_file, **arrays)
        man["csr"] = csr_file
        if features is not None:
            if "features" in reuse:
                man["features"] = reuse["features"]
            else:
                man["features"] = f"features.v{version}.npy"
                atomic_save_npy(folder / man["features"], np.ascontiguousarray(features, dtype=np.float32))
            man["feature_dim"] = int(features.shape[1])
        if labels is not None:
            if "labels" in reuse:
                man["labels"] = reuse["labels"]
            else:
                man["labels"] = f"labels.v{version}.npz"
                if labels.multilabel:
                    Y = labels.Y
                    atomic_save_npz(folder / man["labels"], kind=np.array("multi"), indptr=Y.indptr,
                                    indices=Y.indices, shape=np.array(Y.shape, np.int64))
                else:
                    atomic_save_npz(folder / man["labels"], kind=np.array("single"), y=labels.y)
        atomic_write_json(folder / "manifest.json", man)  # commit point

    def _read_version(self, folder: Path, man: dict) -> Graph:
        if man.get("format") != FORMAT_VERSION:
            raise FailedPrecondition(f"graph folder {folder} has format {man.get('format')}, expected {FORMAT_VERSION}")
        with np.load(folder / man["csr"], allow_pickle=False) as z:
            indptr, indices = z["indptr"], z["indices"].astype(np.int64)
            weights = z["weights"] if "weights" in z.files else None
        g = Graph(n=int(man["n"]), directed=bool(man["directed"]), weighted=weights is not None,
                  indptr=indptr, indices=indices, weights=weights)
        if man.get("features"):
            x = np.load(folder / man["features"], allow_pickle=False)
            g = Graph(n=g.n, directed=g.directed, weighted=g.weighted, indptr=g.indptr, indices=g.indices,
                      weights=g.weights, features=x)
        if man.get("labels"):
            with np.load(folder / man["labels"], allow_pickle=False) as z:
                if str(z["kind"]) == "multi":
                    shape = tuple(int(s) for s in z["shape"])
                    Y = sp.csr_matrix((np.ones(z["indices"].shape[0], np.int8), z["indices"], z["indptr"]), shape=shape)
                    lab = Labels(Y=Y)
                else:
                    lab = Labels(y=z["y"])
            g = Graph(n=g.n, directed=g.directed, weighted=g.weighted, indptr=g.indptr, indices=g.indices,
                      weights=g.weights, features=g.features, labels=lab)
        return g

    def _gc(self, folder: Path) -> None:
        """Delete versioned files the manifest does not name (older versions, crash debris)."""
        man = json.loads((folder / "manifest.json").read_text())
        live = {man.get("csr"), man.get("features"), man.get("labels"), "manifest.json"}
        for p in folder.iterdir():
            if p.is_file() and p.name not in live and (re.match(r"^(csr|features|labels)\.v\d+\.", p.name)
                                                        or p.name.endswith(".tmp")):
                try:
                    p.unlink()
                except OSError:
                    pass


def _grown(g: Graph, n2: int) -> Graph:
    """``g`` with isolated nodes ``g.n .. n2-1`` added (features pad with 0, labels with -1)."""
    count = n2 - g.n
    if count <= 0:
        return g
    indptr = np.concatenate([g.indptr, np.full(count, g.indptr[-1], np.int64)])
    feats = None
    if g.features is not None:
        feats = np.zeros((n2, g.features.shape[1]), np.float32)
        feats[: g.n] = g.features
    labels = None
    if g.labels is not None:
        if g.labels.multilabel:
            Y = g.labels.Y
            labels = sp.vstack([Y, sp.csr_matrix((count, Y.shape[1]), dtype=Y.dtype)]).tocsr()
        else:
            labels = np.concatenate([g.labels.y, np.full(count, -1, np.int64)])
    return Graph(n=n2, directed=g.directed, weighted=g.weighted, indptr=indptr, indices=g.indices,
                 weights=g.weights).with_features(feats).with_labels(labels)


def _labels_n(labels: Labels) -> int:
    return int(labels.Y.shape[0]) if labels.multilabel else int(labels.y.shape[0])
