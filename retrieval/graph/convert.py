"""Proto <-> domain conversion for the Graphs service (``proto/retrieval/v1/graphs.proto``).

One function per message and direction; ``tests/graph/test_convert.py`` round-trips all of them.
"""

from __future__ import annotations

import json
import math

import numpy as np

from retrieval.errors import InvalidArgument
from retrieval.graph.fastrp import FastRPParams
from retrieval.v1 import graphs_pb2 as pb

U63 = np.uint64(2**63)


def ids_from_proto(values, what: str) -> np.ndarray:
    """Repeated uint64 -> int64 array (ids >= 2^63 cannot be node ids)."""
    arr = np.fromiter(values, dtype=np.uint64, count=len(values))
    if arr.size and (arr >= U63).any():
        i = int(np.flatnonzero(arr >= U63)[0])
        raise InvalidArgument(f"{what}[{i}] = {int(arr[i])} is not a node id (node ids are below 2**63)")
    return arr.astype(np.int64)


def node_ids_in(x, what: str) -> np.ndarray:
    """Client side: ``x`` checked entry by entry before any cast (a fraction, a negative id, a string is
    an InvalidArgument naming the position, e.g. ``src must be integers, got 1.5 at src[1] (...)``); int64."""
    from retrieval.graph.graph import as_node_ids

    try:
        return as_node_ids(x, what)
    except InvalidArgument as e:
        msg = str(e)
        # "src[1] = 1.5 is not an integer node id" -> "src must be integers, got 1.5 (src[1]): ..."
        head, sep, rest = msg.partition(" = ")
        if not sep or not head.startswith(what + "["):
            raise
        value, _, why = rest.partition(" ")
        lead = f"{what} must be >= 0" if why.endswith("node ids are >= 0") else f"{what} must be integers"
        raise InvalidArgument(f"{lead}, got {value} at {head} ({why.removeprefix('is ')})") from None


# ---- GraphInfo -------------------------------------------------------------------------------------
def graph_info_to_proto(d: dict) -> pb.GraphInfo:
    deg = d.get("degree") or {}
    return pb.GraphInfo(
        graph=d["name"], num_nodes=d["n"], num_edges=d["m"], directed=d["directed"], weighted=d["weighted"],
        self_loops=d.get("self_loops", 0), isolated=d.get("isolated", 0),
        degree=pb.DegreeStats(min=deg.get("min", 0), max=deg.get("max", 0), mean=deg.get("mean", 0.0)),
        feature_dim=d.get("feature_dim", 0), version=d.get("version", 0), embeddings=d.get("embeddings", []),
        models=d.get("models", []), labels_json=json.dumps(d["labels"]) if d.get("labels") else "",
        describe_json=json.dumps(d, sort_keys=True), labels=_labels_to_proto(d.get("labels")))


def _labels_to_proto(lab: dict | None) -> pb.GraphLabels | None:
    if not lab:
        return None
    return pb.GraphLabels(multilabel=bool(lab["multilabel"]), num_classes=int(lab["num_classes"]),
                          num_labeled=int(lab["num_labeled"]))


def graph_info_from_proto(msg: pb.GraphInfo) -> dict:
    if msg.describe_json:
        return json.loads(msg.describe_json)
    out = {"name": msg.graph, "n": msg.num_nodes, "m": msg.num_edges, "directed": msg.directed,
           "weighted": msg.weighted, "self_loops": msg.self_loops, "isolated": msg.isolated,
           "degree": {"min": msg.degree.min, "max": msg.degree.max, "mean": msg.degree.mean},
           "feature_dim": msg.feature_dim, "version": msg.version, "embeddings": list(msg.embeddings),
           "models": list(msg.models)}
    if msg.HasField("labels"):
        lab = msg.labels
        out["labels"] = {"multilabel": lab.multilabel, "num_classes": lab.num_classes, "num_labeled": lab.num_labeled}
    elif msg.labels_json:  # a server from before GraphInfo.labels
        out["labels"] = json.loads(msg.labels_json)
    return out


# ---- edges -----------------------------------------------------------------------------------------
def edges_to_proto(graph: str, src, dst, weights=None, duplicates: str = "",
                   self_loops: str = "") -> pb.AppendEdgesRequest:
    src = np.asarray(src)
    dst = np.asarray(dst)
    if (src.size and src.min() < 0) or (dst.size and dst.min() < 0):
        raise InvalidArgument("node ids must be >= 0")
    msg = pb.AppendEdgesRequest(graph=graph, src=src.astype(np.uint64).tolist(), dst=dst.astype(np.uint64).tolist(),
                                duplicates=duplicates, self_loops=self_loops)
    if weights is not None:
        msg.weights.extend(np.asarray(weights, np.float32).tolist())
    return msg


def edges_from_proto(msg: pb.AppendEdgesRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    src = ids_from_proto(msg.src, "src")
    dst = ids_from_proto(msg.dst, "dst")
    if src.shape != dst.shape:
        raise InvalidArgument(f"src and dst must have the same length, got {src.size} and {dst.size}")
    w = None
    if len(msg.weights):
        w = np.fromiter(msg.weights, dtype=np.float32, count=len(msg.weights))
        if w.shape != src.shape:
            raise InvalidArgument(f"{w.size} weights for {src.size} edges; give one per edge or none")
    return src, dst, w


def append_result_to_proto(d: dict) -> pb.AppendEdgesResponse:
    return pb.AppendEdgesResponse(received=d["received"], added=d["added"], num_edges=d["m"], version=d["version"],
                                  self_loops_dropped=d.get("self_loops_dropped", 0))


def append_result_from_proto(msg: pb.AppendEdgesResponse) -> dict:
    return {"received": msg.received, "added": msg.added, "m": msg.num_edges, "version": msg.version,
            "self_loops_dropped": msg.self_loops_dropped}


# ---- embeddings --------------------------------------------------------------------------------------
EMBEDDING_CHUNK_BYTES = 2 << 20  # rows per EmbeddingsChunk: at most this many bytes (at least one row)


def embeddings_to_chunks(X: np.ndarray, graph_version: int, current_version: int,
                         chunk_bytes: int = EMBEDDING_CHUNK_BYTES):
    """float32 rows ``[r, d]`` -> EmbeddingsChunk messages of at most ``chunk_bytes`` of data each (a
    generator: one chunk is materialised at a time)."""
    from retrieval import convert

    r, d = X.shape
    step = max(1, chunk_bytes // max(1, 4 * d))
    for s in range(0, max(r, 1), step):
        msg = pb.EmbeddingsChunk(offset=s, total=r, graph_version=graph_version, current_version=current_version)
        convert.vectors_to_proto(np.ascontiguousarray(X[s:s + step], dtype=np.float32).reshape(-1, d), msg.vectors)
        yield msg


def embeddings_from_chunks(chunks) -> tuple[np.ndarray, dict]:
    """EmbeddingsChunk messages (in order) -> ``(float32 [total, d], {"graph_version", "current_version"})``."""
    from retrieval import convert

    out, info, at = None, {}, 0
    for msg in chunks:
        if out is None:
            out = np.empty((msg.total, msg.vectors.d), np.float32)
            info = {"graph_version": msg.graph_version, "current_version": msg.current_version}
        if msg.offset != at:
            raise InvalidArgument(f"embedding chunks out of order: offset {msg.offset}, expected {at}")
        if msg.vectors.n:
            rows = convert.vectors_from_proto(msg.vectors, "embeddings")
            out[at:at + rows.shape[0]] = rows
            at += rows.shape[0]
    if out is None:
        return np.zeros((0, 0), np.float32), info
    if at != out.shape[0]:
        raise InvalidArgument(f"the embedding stream ended after {at} of {out.shape[0]} rows")
    return out, info


# ---- labels ----------------------------------------------------------------------------------------
def labels_to_proto(graph: str, labels) -> pb.SetLabelsRequest:
    """``labels``: None (clear), an int array ``[n]`` or a 0/1 matrix ``[n, L]`` (dense or scipy sparse)."""
    import scipy.sparse as sp

    if labels is None:
        return pb.SetLabelsRequest(graph=graph, clear=True)
    if sp.issparse(labels) or np.ndim(labels) == 2:
        Y = sp.coo_matrix(labels)
        return pb.SetLabelsRequest(graph=graph, multi=pb.MultiLabels(
            num_classes=Y.shape[1], nodes=Y.row.astype(np.uint64).tolist(), classes=Y.col.astype(np.uint32).tolist()))
    return pb.SetLabelsRequest(graph=graph, single=pb.SingleLabels(labels=np.asarray(labels, np.int64).tolist()))


def labels_from_proto(msg: pb.SetLabelsRequest, n: int):
    """-> None (clear), an int64 array, or a scipy CSR 0/1 matrix ``[n, num_classes]``."""
    import scipy.sparse as sp

    if msg.clear:
        return None
    kind = msg.WhichOneof("labels")
    if kind == "single":
        return np.fromiter(msg.single.labels, dtype=np.int64, count=len(msg.single.labels))
    if kind == "multi":
        m = msg.multi
        rows = ids_from_proto(m.nodes, "labels.multi.nodes")
        cols = np.fromiter(m.classes, dtype=np.int64, count=len(m.classes))
        if rows.shape != cols.shape:
            raise InvalidArgument(f"multi labels: {rows.size} nodes but {cols.size} classes")
        if rows.size and rows.max() >= n:
            raise InvalidArgument(f"multi labels: node {int(rows.max())} is outside the graph (n = {n})")
        if cols.size and cols.max() >= m.num_classes:
            raise InvalidArgument(f"multi labels: class {int(cols.max())} >= num_classes = {m.num_classes}")
        return sp.csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, m.num_classes))
    raise InvalidArgument("SetLabels needs single labels, multi labels or clear=true")


# ---- neighbours ------------------------------------------------------------------------------------
def neighbors_to_proto(lists: list[tuple[np.ndarray, np.ndarray]]) -> pb.NeighborsResponse:
    offsets = np.zeros(len(lists) + 1, np.uint64)
    offsets[1:] = np.cumsum([len(ids) for ids, _ in lists])
    ids = np.concatenate([i for i, _ in lists]) if lists else np.zeros(0, np.int64)
    w = np.concatenate([w for _, w in lists]) if lists else np.zeros(0, np.float32)
    return pb.NeighborsResponse(offsets=offsets.tolist(), ids=ids.astype(np.uint64).tolist(), weights=w.tolist())


def neighbors_from_proto(msg: pb.NeighborsResponse) -> list[tuple[np.ndarray, np.ndarray]]:
    off = np.fromiter(msg.offsets, dtype=np.int64, count=len(msg.offsets))
    ids = np.fromiter(msg.ids, dtype=np.uint64, count=len(msg.ids)).astype(np.int64)
    w = np.fromiter(msg.weights, dtype=np.float32, count=len(msg.weights))
    return [(ids[off[i]:off[i + 1]], w[off[i]:off[i + 1]]) for i in range(max(0, len(off) - 1))]


# ---- FastRP ------------------------------------------------------------------------------------------
#: the FastRP parameters a request can carry (the fields of FastRPParams)
FASTRP_PARAM_FIELDS = tuple(f.name for f in pb.FastRPParams.DESCRIPTOR.fields)
_FASTRP_FLOATS = ("beta", "self_influence", "property_ratio", "whiten")


def fastrp_params_to_proto(p: dict | FastRPParams) -> pb.FastRPParams:
    """Client side; a key that is not a FastRP parameter (a typo) is an InvalidArgument, not dropped."""
    d = p.as_dict() if isinstance(p, FastRPParams) else dict(p)
    unknown = sorted(set(d) - set(FASTRP_PARAM_FIELDS), key=str)
    if unknown:
        raise InvalidArgument(f"unknown FastRP parameters {unknown}; valid: {list(FASTRP_PARAM_FIELDS)}")
    name = "dim"
    try:
        msg = pb.FastRPParams(dim=int(d.get("dim", 0)))
        name = "seed"
        msg.seed = int(d.get("seed", 0))
        name = "iteration_weights"
        if "iteration_weights" in d:
            msg.iteration_weights.extend(float(w) for w in d["iteration_weights"])
        if "s" in d:
            msg.s = str(d["s"])
        for name in _FASTRP_FLOATS:
            if name in d:
                setattr(msg, name, float(d[name]))
        for name in ("normalize", "propagate_normalized", "standardize"):
            if name in d:
                if not isinstance(d[name], (bool, np.bool_)):
                    raise TypeError(f"expected true or false, got {d[name]!r}")
                setattr(msg, name, bool(d[name]))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"FastRP parameter {name}: {e}") from None
    return msg


def fastrp_params_from_proto(msg: pb.FastRPParams) -> dict:
    """Only the fields that were set (the rest take :class:`FastRPParams` defaults)."""
    d: dict = {"dim": int(msg.dim), "seed": int(msg.seed)}
    if len(msg.iteration_weights):
        d["iteration_weights"] = [float(w) for w in msg.iteration_weights]
    if msg.s:
        try:
            val = float(msg.s)
            d["s"] = val if math.isfinite(val) else msg.s
        except ValueError:
            d["s"] = msg.s
    for f in (*_FASTRP_FLOATS, "normalize", "propagate_normalized", "standardize"):
        if msg.HasField(f):
            d[f] = getattr(msg, f)
    return d


def tune_fields(tune, tune_options) -> dict:
    """The ``tune`` / ``tune_options`` fields of a RunFastRPRequest from a client's ``tune`` (bool) and
    ``tune_options`` (a dict with keys from :data:`TUNE_OPTION_FIELDS`, or None); a bad key or a value of
    the wrong type fails here, before the call. Ranges are the server's to check (the same sentence
    comes back as INVALID_ARGUMENT)."""
    if not isinstance(tune, bool):
        raise InvalidArgument(f"tune must be true or false, got {tune!r}")
    if tune_options is None:
        return {"tune": tune}
    return {"tune": tune, "tune_options": tune_options_to_proto(tune_options)}


#: the fields of FastRPTuneOptions, which are the keyword options of ``tune_fastrp``
TUNE_OPTION_FIELDS = tuple(f.name for f in pb.FastRPTuneOptions.DESCRIPTOR.fields)
_TUNE_LISTS = {"dims": "positive integers", "betas": "numbers"}


def tune_options_to_proto(options: dict) -> pb.FastRPTuneOptions:
    if not isinstance(options, dict):
        raise InvalidArgument(f"tune_options must be an object with keys from {list(TUNE_OPTION_FIELDS)}, "
                              f"got {options!r}")
    unknown = sorted(set(options) - set(TUNE_OPTION_FIELDS), key=str)
    if unknown:
        raise InvalidArgument(f"unknown tune_options {unknown}; valid: {list(TUNE_OPTION_FIELDS)}")
    msg = pb.FastRPTuneOptions()
    for name, value in options.items():
        if value is None:  # None = the tuner's default, as an unset field
            continue
        try:
            if name in _TUNE_LISTS:
                values = [value] if isinstance(value, (int, float, np.integer, np.floating)) else list(value)
                if any(isinstance(v, bool) for v in values):
                    raise TypeError("a boolean")
                getattr(msg, name).extend(values)
            else:
                if isinstance(value, bool):
                    raise TypeError("a boolean")
                setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            kind = _TUNE_LISTS.get(name, "a number")
            raise InvalidArgument(f"tune_options.{name} must be {kind}, got {value!r} ({e})") from None
    return msg


def tune_options_from_proto(request) -> dict | None:
    """Server side: a RunFastRPRequest's tune options as the dict ``tune_fastrp`` takes (only the fields
    that were set), from ``tune_options`` or the deprecated ``tune_options_json``; None when neither."""
    from retrieval.jsonlimits import loads_client_json

    typed = request.HasField("tune_options")
    if typed and request.tune_options_json:
        raise InvalidArgument("give tune_options or tune_options_json (deprecated), not both")
    if request.tune_options_json:
        return loads_client_json(request.tune_options_json, "tune_options_json", expect=dict)
    if not typed:
        return None
    msg = request.tune_options
    out: dict = {}
    for f in msg.DESCRIPTOR.fields:
        if f.is_repeated:
            if len(getattr(msg, f.name)):
                out[f.name] = list(getattr(msg, f.name))
        elif msg.HasField(f.name):
            out[f.name] = getattr(msg, f.name)
    return out


# ---- hits --------------------------------------------------------------------------------------------
def hits_to_proto(results: list[tuple[np.ndarray, np.ndarray]]) -> list[pb.NodeHits]:
    return [pb.NodeHits(ids=np.asarray(i, np.int64).astype(np.uint64).tolist(), scores=np.asarray(s, np.float32).tolist())
            for i, s in results]


def hits_from_proto(msgs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.fromiter(m.ids, dtype=np.uint64, count=len(m.ids)).astype(np.int64),
             np.fromiter(m.scores, dtype=np.float32, count=len(m.scores))) for m in msgs]


# ---- training ----------------------------------------------------------------------------------------
def train_request_to_params(msg: pb.TrainLinkModelRequest) -> dict:
    from retrieval.jsonlimits import loads_client_json

    config = loads_client_json(msg.config_json, "config_json", default={}, expect=dict)
    p = {"graph": msg.graph, "model": msg.model or "ncn", "preset": msg.preset or None, "config": config,
         "seed": int(msg.seed), "device": msg.device or "auto", "evaluate": msg.evaluate or "holdout"}
    if msg.HasField("val_frac"):
        p["val_frac"] = msg.val_frac
    if msg.HasField("test_frac"):
        p["test_frac"] = msg.test_frac
    return p


def train_params_to_request(p: dict) -> pb.TrainLinkModelRequest:
    msg = pb.TrainLinkModelRequest(graph=p["graph"], model=p.get("model") or "", preset=p.get("preset") or "",
                                   config_json=json.dumps(p.get("config") or {}), seed=int(p.get("seed", 0)),
                                   device=p.get("device") or "", evaluate=p.get("evaluate") or "")
    if "val_frac" in p:
        msg.val_frac = p["val_frac"]
    if "test_frac" in p:
        msg.test_frac = p["test_frac"]
    return msg
