"""The checks of the graph engine's job parameters (FastRP, import, link-model training), run when a job
is started so a bad request is refused before it queues (:class:`GraphJobChecks`, a mixin of
:class:`retrieval.graph.engine.GraphEngine`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from retrieval.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from retrieval.graph.fastrp import FastRPParams, check_params
from retrieval.graph.fastrp_tune import check_tune_options
from retrieval.graph.graph import DUPLICATE_POLICIES
from retrieval.graph.store import SELF_LOOP_POLICIES, check_name

logger = logging.getLogger("retrieval.graph.engine")

IMPORT_FORMATS = ("auto", "csv", "tsv", "edgelist", "mat", "planetoid", "ogbl")
IMPORT_PARAMS = ("graph", "path", "format", "mode", "delimiter", "header", "directed", "weighted", "index_base",
                 "num_nodes", "self_loops", "duplicates")
MAX_DIM = 4096
MAX_ITERATIONS = 100
MAX_EMBEDDING_BYTES = 16 << 30  # n x dim x float32, times the ~3 arrays FastRP holds
MAX_LEARNABLE = 200_000_000     # n x hidden parameters of a learnable embedding table


class GraphJobChecks:
    """Methods of :class:`GraphEngine` (see the module docstring); mixed into it, not used alone."""

    # ---- FastRP --------------------------------------------------------------------------------
    def validate_fastrp(self, p: dict) -> dict:
        """Check a FastRP job's params before the job is accepted."""
        p = dict(p)
        graph = check_name(p.get("graph"), "graph name")
        g = self.store.load(graph)
        p.setdefault("embedding", "fastrp")
        check_name(p["embedding"], "embedding name")
        params = dict(p.get("params") or {})
        if "dim" not in params:
            raise InvalidArgument("FastRP params need dim (the embedding dimension)")
        try:
            fp = FastRPParams(**params)
        except TypeError as e:
            raise InvalidArgument(f"unknown FastRP parameter: {e}") from None
        if g.n == 0:
            raise InvalidArgument(f"graph {graph!r} is empty (0 nodes): nothing to embed")
        if isinstance(fp.dim, int) and fp.dim > MAX_DIM:
            raise ResourceExhausted(f"dim = {fp.dim} is above the limit of {MAX_DIM}")
        if len(fp.iteration_weights or ()) > MAX_ITERATIONS:
            raise InvalidArgument(f"{len(fp.iteration_weights)} iteration weights; the limit is {MAX_ITERATIONS}")
        if isinstance(fp.dim, int) and 3 * 4 * g.n * max(fp.dim, 0) > MAX_EMBEDDING_BYTES:
            raise ResourceExhausted(f"FastRP of {g.n} nodes at dim {fp.dim} needs more than "
                                    f"{MAX_EMBEDDING_BYTES >> 30} GiB")
        use_features = bool(p.get("use_features", False))
        if use_features and g.features is None:
            raise InvalidArgument(f"graph {graph!r} has no node features; attach them or set use_features=false")
        for w in check_params(fp, g.n, use_features):
            logger.warning("FastRP on %s: %s", graph, w)
        self._validate_tune(p, g.n)
        metric = p.get("metric") or "cosine"
        if metric not in ("cosine", "l2", "ip"):
            raise InvalidArgument(f"metric must be cosine, l2 or ip, got {metric!r}")
        if p.get("index") is not None:
            from retrieval.indexes import registry

            spec = registry.spec_from_dict(p["index"])
            registry.validate(spec, fp.dim, metric)  # a spec that would crash the job (or the server): refused now
        p["metric"] = metric
        p["params"] = fp.as_dict()
        p["use_features"] = use_features
        return p

    @staticmethod
    def _validate_tune(p: dict, n: int) -> None:
        """``tune`` (bool) and ``tune_options`` (see :func:`retrieval.graph.fastrp_tune.check_tune_options`),
        checked and normalised in ``p``; a false ``tune`` is dropped."""
        tune = p.get("tune")
        if tune is not None and not isinstance(tune, bool):
            raise InvalidArgument(f"tune must be true or false, got {tune!r}")
        if not tune:
            if p.get("tune_options"):
                raise InvalidArgument("tune_options are given but tune is not true")
            p.pop("tune", None)
            p.pop("tune_options", None)
            return
        opts = check_tune_options(p.get("tune_options"))
        for d in opts.get("dims", ()):
            if d > MAX_DIM:
                raise ResourceExhausted(f"tune_options.dims holds {d}, above the limit of {MAX_DIM}")
            if 3 * 4 * n * d > MAX_EMBEDDING_BYTES:
                raise ResourceExhausted(f"FastRP of {n} nodes at dim {d} (tune_options.dims) needs more than "
                                        f"{MAX_EMBEDDING_BYTES >> 30} GiB")
        p["tune"] = True
        p["tune_options"] = opts

    def validate_import(self, p: dict) -> dict:
        """Check an ``import_graph`` job's params (names, format, options, the input path through the
        sandbox: a symlink, hard link or a path outside the allowed folders is refused now)."""
        p = dict(p)
        unknown = set(p) - set(IMPORT_PARAMS)
        if unknown:
            raise InvalidArgument(f"unknown import_graph parameter(s) {sorted(unknown)}; valid: {sorted(IMPORT_PARAMS)}")
        graph = check_name(p.get("graph"), "graph name")
        path = p.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidArgument("import_graph needs path: the edge file or dataset folder to read (on the server)")
        fmt = p.get("format") or "auto"
        if fmt not in IMPORT_FORMATS:
            raise InvalidArgument(f"format must be one of {list(IMPORT_FORMATS)}, got {fmt!r}")
        mode = p.get("mode") or "auto"
        if mode not in ("auto", "create", "append"):
            raise InvalidArgument(f"mode must be auto, create or append, got {mode!r}")
        exists = self.store.exists(graph)
        if mode == "create" and exists:
            raise AlreadyExists(f"graph {graph!r} already exists; drop it first or import with mode='append'")
        if mode == "append" and not exists:
            raise NotFound(f"graph {graph!r} does not exist (known graphs: {self.store.list()}); "
                           "import with mode='create' or 'auto'")
        delim = p.get("delimiter")
        if delim is not None and (not isinstance(delim, str) or not delim or len(delim) > 4):
            raise InvalidArgument(f"delimiter must be a short non-empty string (e.g. ',' or '\\t'), got {delim!r}")
        header = p.get("header")
        if header is not None and not isinstance(header, bool):
            raise InvalidArgument(f"header must be true, false or null (detect), got {header!r}")
        for f in ("directed", "weighted"):
            if p.get(f) is not None and not isinstance(p[f], bool):
                raise InvalidArgument(f"{f} must be true, false or null, got {p[f]!r}")
        if p.get("index_base", 0) not in ("auto", 0, 1) or isinstance(p.get("index_base"), bool):
            raise InvalidArgument(f"index_base must be 0, 1 or 'auto', got {p['index_base']!r}")
        nn = p.get("num_nodes")
        if nn is not None and (isinstance(nn, bool) or not isinstance(nn, int) or nn < 0):
            raise InvalidArgument(f"num_nodes must be a non-negative integer, got {nn!r}")
        if p.get("self_loops") not in (None, "", *SELF_LOOP_POLICIES):
            raise InvalidArgument(f"self_loops must be one of {list(SELF_LOOP_POLICIES)}, got {p['self_loops']!r}")
        if (p.get("duplicates") or "first") not in DUPLICATE_POLICIES:
            raise InvalidArgument(f"duplicates must be one of {list(DUPLICATE_POLICIES)}, got {p['duplicates']!r}")
        allowed = self._allowed()
        if allowed is not None:  # open (and close) it now: a refused file fails the start, not the job
            from retrieval.server import sandbox

            if sandbox.is_dir(path):
                sandbox.open_dir(path, allowed, "graph folder").close()
            else:
                sandbox.open_file(path, allowed, "edge file").close()
        elif not Path(path).exists():
            raise NotFound(f"{path} does not exist")
        p.update(graph=graph, path=path, format=fmt, mode=mode)
        return p

    # ---- link models -----------------------------------------------------------------------------
    def validate_train(self, p: dict) -> dict:
        from retrieval.graph.ncn import config_for_graph

        p = dict(p)
        graph = check_name(p.get("graph"), "graph name")
        g = self.store.load(graph)
        if g.directed:
            raise InvalidArgument(f"graph {graph!r} is directed; link models here need an undirected graph")
        p["model"] = check_name(p.get("model") or "ncn", "model name")
        cfg, _ = config_for_graph(p.get("preset") or None, g.n, g.num_edges - g.num_self_loops,
                                  g.features is not None, p.get("config") or {})
        if cfg.input == "features" and g.features is None:
            raise InvalidArgument(f"graph {graph!r} has no node features: pass config input='learnable' or 'fastrp'")
        if cfg.input == "learnable" and g.n * cfg.hidden > MAX_LEARNABLE:
            raise ResourceExhausted(f"a learnable table of {g.n} x {cfg.hidden} exceeds {MAX_LEARNABLE} parameters")
        for f, default in (("val_frac", 0.1), ("test_frac", 0.2)):
            v = p.get(f, default)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
                raise InvalidArgument(f"{f} must be in [0, 1), got {v!r}")
        if not 0 < p.get("test_frac", 0.2) or p.get("val_frac", 0.1) + p.get("test_frac", 0.2) >= 1:
            raise InvalidArgument("need test_frac > 0 and val_frac + test_frac < 1")
        if g.num_edges - g.num_self_loops < 10:
            raise InvalidArgument(f"graph {graph!r} has {g.num_edges} edges; link prediction needs at least 10")
        ev = p.get("evaluate") or "holdout"
        if ev not in ("holdout", "none"):
            raise InvalidArgument(f"evaluate must be 'holdout' (train on 70%, held-out edges masked when serving) "
                                  f"or 'none' (train on every edge, no metrics), got {ev!r}")
        p["evaluate"] = ev
        dev = p.get("device") or "auto"
        if dev not in ("auto", "cpu", "cuda"):
            raise InvalidArgument(f"device must be auto, cpu or cuda, got {dev!r}")
        p["device"] = dev
        p["seed"] = int(p.get("seed") or 0) % (2**63)
        return p
