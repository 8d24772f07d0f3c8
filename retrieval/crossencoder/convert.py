"""Proto <-> domain conversions of the CrossEncoder service, one function per message and direction.

Zero / empty proto fields mean "default" (proto3 scalars cannot be absent); ``optional`` fields are
used where zero is a meaningful value (ridge, seed_fraction, seed) or must be told from "unset"
(the search budget: unset is the default, an explicit 0 is refused).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from retrieval.crossencoder.index import SearchParams, SearchResult
from retrieval.errors import InvalidArgument
from retrieval.v1 import crossencoder_pb2 as pb

#: scorer backends a remote client may ask for (``callable`` / ``table`` exist in process only)
REMOTE_SCORERS = ("minilm-joint", "hf", "joint-encoder")
REMOTE_DUAL_ENCODERS = ("minilm", "sentence-encoder")


# --- specs ------------------------------------------------------------------------------------------
def scorer_spec_from_proto(msg: pb.ScorerSpec) -> dict[str, Any]:
    if msg.backend not in REMOTE_SCORERS:
        raise InvalidArgument(f"scorer.backend must be one of {', '.join(REMOTE_SCORERS)}, got {msg.backend!r}")
    spec: dict[str, Any] = {"name": msg.backend}
    if msg.model_dir:
        spec["model_dir"] = msg.model_dir
    if msg.batch_size:
        spec["batch_size"] = int(msg.batch_size)
    if msg.device:
        spec["device"] = msg.device
    if msg.precision:
        spec["precision"] = msg.precision
    if msg.max_length:
        spec["max_length"] = int(msg.max_length)
    return spec


def scorer_spec_to_proto(spec: dict[str, Any]) -> pb.ScorerSpec:
    return pb.ScorerSpec(backend=spec["name"], model_dir=spec.get("model_dir", ""),
                         batch_size=spec.get("batch_size", 0), device=spec.get("device", ""),
                         precision=spec.get("precision", ""), max_length=spec.get("max_length", 0))


def dual_encoder_spec_from_proto(msg: pb.DualEncoderSpec) -> dict[str, Any] | None:
    if not msg.backend:
        return None
    if msg.backend not in REMOTE_DUAL_ENCODERS:
        raise InvalidArgument(
            f"dual_encoder.backend must be one of {', '.join(REMOTE_DUAL_ENCODERS)} (or empty for none), got {msg.backend!r}"
        )
    spec: dict[str, Any] = {"name": msg.backend}
    if msg.model_dir:
        spec["model_dir"] = msg.model_dir
    if msg.device:
        spec["device"] = msg.device
    return spec


def dual_encoder_spec_to_proto(spec: dict[str, Any] | None) -> pb.DualEncoderSpec:
    if not spec:
        return pb.DualEncoderSpec()
    return pb.DualEncoderSpec(backend=spec["name"], model_dir=spec.get("model_dir", ""), device=spec.get("device", ""))


# --- items ------------------------------------------------------------------------------------------
def _payload_from_json(text: str, where: str) -> dict | None:
    if not text:
        return None
    from retrieval.jsonlimits import loads_client_json

    pl = loads_client_json(text, f"{where}.payload_json")
    if pl is not None and not isinstance(pl, dict):
        raise InvalidArgument(f"{where}.payload_json must be a JSON object, got {type(pl).__name__}")
    return pl


def items_from_proto(items) -> list[dict[str, Any]]:
    """``[{"id", "text", "payload"}]``; payload JSON is parsed (InvalidArgument when not an object)."""
    return [{"id": int(it.id), "text": it.text, "payload": _payload_from_json(it.payload_json, f"items[{j}]")}
            for j, it in enumerate(items)]


def items_to_proto(items: list[dict[str, Any]]) -> list[pb.CrossEncoderItem]:
    return [pb.CrossEncoderItem(id=int(it["id"]), text=it["text"],
                                payload_json=json.dumps(it["payload"]) if it.get("payload") is not None else "")
            for it in items]


# --- build params -----------------------------------------------------------------------------------
def build_params_from_proto(msg: pb.CrossEncoderBuildParams) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if msg.k_i:
        p["k_i"] = int(msg.k_i)
    if msg.anchor_method:
        p["anchor_method"] = msg.anchor_method
    if msg.solver:
        p["solver"] = msg.solver
    if msg.HasField("ridge"):
        p["ridge"] = float(msg.ridge)
    if msg.rank:
        p["rank"] = int(msg.rank)
    if msg.seed:
        p["seed"] = int(msg.seed)
    if msg.chunk_size:
        p["chunk_size"] = int(msg.chunk_size)
    return p


def build_params_to_proto(p: dict[str, Any]) -> pb.CrossEncoderBuildParams:
    msg = pb.CrossEncoderBuildParams(k_i=p.get("k_i", 0), anchor_method=p.get("anchor_method", ""),
                                     solver=p.get("solver", ""), rank=p.get("rank") or 0, seed=p.get("seed", 0),
                                     chunk_size=p.get("chunk_size", 0))
    if p.get("ridge") is not None:
        msg.ridge = float(p["ridge"])
    return msg


def build_request_from_proto(msg: pb.BuildCrossEncoderIndexRequest) -> dict[str, Any]:
    """The job params of a build (items still inline; the servicer stages them into a file)."""
    return {
        "name": msg.name,
        "scorer": scorer_spec_from_proto(msg.scorer),
        "dual_encoder": dual_encoder_spec_from_proto(msg.dual_encoder),
        "items": items_from_proto(msg.items),
        "items_path": msg.items_path or None,
        "anchor_queries": list(msg.anchor_queries) or None,
        "query_log": list(msg.query_log) or None,
        "k_q": int(msg.k_q) or None,
        "query_seed": int(msg.query_seed),
        "params": build_params_from_proto(msg.params),
    }


def build_request_to_proto(name: str, scorer: dict[str, Any], items: list[dict[str, Any]] | None = None,
                           items_path: str | None = None, anchor_queries: list[str] | None = None,
                           query_log: list[str] | None = None, k_q: int | None = None, query_seed: int = 0,
                           dual_encoder: dict[str, Any] | None = None,
                           params: dict[str, Any] | None = None) -> pb.BuildCrossEncoderIndexRequest:
    return pb.BuildCrossEncoderIndexRequest(
        name=name, scorer=scorer_spec_to_proto(scorer), dual_encoder=dual_encoder_spec_to_proto(dual_encoder),
        items=items_to_proto(items or []), items_path=items_path or "", anchor_queries=anchor_queries or [],
        query_log=query_log or [], k_q=k_q or 0, query_seed=query_seed, params=build_params_to_proto(params or {}))


# --- search -----------------------------------------------------------------------------------------
def search_params_from_proto(msg: pb.CrossEncoderSearchParams) -> SearchParams:
    """Unset fields take the defaults. ``budget`` unset: the default (100 calls); set to 0:
    :class:`InvalidArgument` (a search needs at least ``k`` calls). Budgets below what the mode needs
    (``< k``, ``< k_i``) are refused by the index with the same status."""
    d = SearchParams()
    if msg.HasField("budget"):
        if msg.budget == 0:
            raise InvalidArgument(
                "params.budget is 0: a search spends at least k cross-encoder calls (and k_i in cur mode); "
                f"set a positive budget, or leave budget unset for the default ({d.budget} calls)"
            )
        budget = int(msg.budget)
    else:
        budget = d.budget
    return SearchParams(
        mode=msg.mode or d.mode,
        budget=budget,
        k_i=int(msg.k_i) or None,
        rounds=int(msg.rounds) or d.rounds,
        seed_fraction=float(msg.seed_fraction) if msg.HasField("seed_fraction") else d.seed_fraction,
        ridge=float(msg.ridge) if msg.HasField("ridge") else d.ridge,
    )


def search_params_to_proto(p: SearchParams) -> pb.CrossEncoderSearchParams:
    k_i = p.k_i if isinstance(p.k_i, int) else 0
    return pb.CrossEncoderSearchParams(mode=p.mode, budget=p.budget, k_i=k_i, rounds=p.rounds,
                                       seed_fraction=p.seed_fraction, ridge=p.ridge)


def hits_to_proto(r: SearchResult, payloads: list[dict | None] | None = None) -> pb.CrossEncoderHits:
    """Padding (-1 ids) is dropped: a hit list holds at most k items."""
    keep = r.ids >= 0
    msg = pb.CrossEncoderHits(
        ids=[int(i) for i in r.ids[keep]], scores=[float(s) for s in r.scores[keep]], calls=r.calls,
        scorer_seconds=r.scorer_seconds, other_seconds=r.other_seconds, mode=r.mode, k_i=r.k_i, k_r=r.k_r,
        rounds=r.rounds, truncated_pairs=r.truncated_pairs, query_truncated=r.query_truncated)
    if payloads is not None:
        msg.payloads_json.extend(json.dumps(p) if p is not None else "" for p in payloads)
    return msg


def hits_from_proto(msg: pb.CrossEncoderHits) -> dict[str, Any]:
    import numpy as np

    return {
        "ids": np.asarray(msg.ids, dtype=np.uint64).astype(np.int64),
        "scores": np.asarray(msg.scores, dtype=np.float32),
        "payloads": [json.loads(p) if p else None for p in msg.payloads_json] if msg.payloads_json else None,
        "calls": int(msg.calls),
        "scorer_seconds": float(msg.scorer_seconds),
        "other_seconds": float(msg.other_seconds),
        "mode": msg.mode,
        "k_i": int(msg.k_i),
        "k_r": int(msg.k_r),
        "rounds": int(msg.rounds),
        "truncated_pairs": int(msg.truncated_pairs),
        "query_truncated": bool(msg.query_truncated),
    }


# --- index info and mutations -----------------------------------------------------------------------
def info_to_proto(name: str, d: dict[str, Any], spec: dict[str, Any] | None = None) -> pb.CrossEncoderIndexInfo:
    """From :meth:`CrossEncoderIndex.describe` (plus the engine's scorer spec). The build settings,
    build statistics and search defaults go in typed fields, and also (deprecated) as the JSON
    fields clients before them read; the scorer and dual-encoder fingerprints stay JSON (their
    fields depend on the backend)."""
    scorer = {"spec": spec.get("scorer") if spec else None, "fingerprint": d["scorer"]}
    de = {"spec": spec.get("dual_encoder") if spec else None, "fingerprint": d.get("dual_encoder")}
    stats = d.get("build_stats") or {}
    msg = pb.CrossEncoderIndexInfo(
        name=name, n_items=d["n_items"], k_q=d["k_q"], k_i=d["k_i"], anchor_queries=d["anchor_queries"],
        anchor_item_ids=[int(i) for i in d["anchor_item_ids"]], scorer_json=json.dumps(scorer),
        dual_encoder_json=json.dumps(de) if de["fingerprint"] or de["spec"] else "",
        build_json=json.dumps({"params": d["build"], "stats": stats}),
        search_defaults_json=json.dumps({"defaults": d["search_defaults"], "min_budget": d["min_budget"]}),
        modes=d["modes"], build_params=build_params_to_proto(d["build"]),
        search_defaults=search_params_to_proto(SearchParams(**d["search_defaults"])), min_budget=d["min_budget"])
    if stats:
        msg.build_stats.CopyFrom(pb.CrossEncoderBuildStats(**stats))
    return msg


def _stored_build_params(msg: pb.CrossEncoderBuildParams) -> dict[str, Any]:
    """Every field of a built index's settings (``build_params_from_proto`` keeps only the set ones)."""
    return {"k_i": int(msg.k_i), "anchor_method": msg.anchor_method, "solver": msg.solver, "ridge": float(msg.ridge),
            "rank": int(msg.rank) or None, "seed": int(msg.seed), "chunk_size": int(msg.chunk_size)}


def info_from_proto(msg: pb.CrossEncoderIndexInfo) -> dict[str, Any]:
    if msg.HasField("build_params"):
        stats = {}  # an index built before build statistics were recorded has none
        if msg.HasField("build_stats"):  # every field: zeros are values here, not absences
            stats = {f.name: getattr(msg.build_stats, f.name) for f in msg.build_stats.DESCRIPTOR.fields}
        build = {"params": _stored_build_params(msg.build_params), "stats": stats}
        search_defaults = {"defaults": dataclasses.asdict(search_params_from_proto(msg.search_defaults)),
                           "min_budget": dict(msg.min_budget)}
    else:  # a server from before the typed fields
        build = json.loads(msg.build_json) if msg.build_json else None
        search_defaults = json.loads(msg.search_defaults_json) if msg.search_defaults_json else None
    return {
        "name": msg.name,
        "n_items": int(msg.n_items),
        "k_q": int(msg.k_q),
        "k_i": int(msg.k_i),
        "anchor_queries": list(msg.anchor_queries),
        "anchor_item_ids": [int(i) for i in msg.anchor_item_ids],
        "scorer": json.loads(msg.scorer_json) if msg.scorer_json else None,
        "dual_encoder": json.loads(msg.dual_encoder_json) if msg.dual_encoder_json else None,
        "build": build,
        "search_defaults": search_defaults,
        "modes": list(msg.modes),
    }


def add_result_to_proto(r) -> pb.AddCrossEncoderItemsResponse:
    return pb.AddCrossEncoderItemsResponse(added=r.added, calls=r.calls, scorer_seconds=r.scorer_seconds,
                                           seconds=r.seconds, truncated_items=r.truncated_items)


def add_result_from_proto(msg: pb.AddCrossEncoderItemsResponse) -> dict[str, Any]:
    return {"added": int(msg.added), "calls": int(msg.calls), "scorer_seconds": float(msg.scorer_seconds),
            "seconds": float(msg.seconds), "truncated_items": int(msg.truncated_items)}


def set_anchor_items_from_proto(msg: pb.SetAnchorItemsRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if msg.k_i:
        out["k_i"] = int(msg.k_i)
    if msg.anchor_method:
        out["anchor_method"] = msg.anchor_method
    if msg.HasField("seed"):
        out["seed"] = int(msg.seed)
    return out


def set_anchor_items_to_proto(index: str, k_i: int = 0, anchor_method: str = "",
                              seed: int | None = None) -> pb.SetAnchorItemsRequest:
    msg = pb.SetAnchorItemsRequest(index=index, k_i=k_i, anchor_method=anchor_method)
    if seed is not None:
        msg.seed = seed
    return msg
