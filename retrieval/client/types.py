"""The client's typed results: small frozen dataclasses, converted from the proto here and nowhere else.

Every method of :class:`retrieval.Client` / :class:`retrieval.AsyncClient` that used to return a
``dict`` returns one of these (lists of them for the ``list_*`` methods)::

    info = client.describe_collection("docs")
    info.dimension, info.metric, info.points           # the typed way: attributes (IDEs and mypy see them)
    info["dimension"], "points" in info, dict(info)    # still works: every record is a read-only dict too

A record is a ``dict`` of its fields (plus ``extra``: keys the server sent that have no field yet, e.g.
a graph's ``in_degree`` or a datastore manifest's entries), so code written against the old dicts keeps
working unchanged: ``rec["state"]``, ``rec.get("total")``, ``"labels" in info``, ``dict(rec)``,
``json.dumps(rec.to_dict())`` (the CLI's ``--json``), ``rec == {...}``. The dict view is read-only, like the
dataclass (``rec["x"] = 1`` raises ``TypeError``); :meth:`Record.to_dict` gives a plain, mutable,
deep copy and :func:`dataclasses.replace` a changed record. Attribute access is the typed way; the dict
view is there for compatibility.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from retrieval import convert

__all__ = [
    "AppendEdgesResult", "CeAddResult", "CeHits", "CeIndexInfo", "CollectionInfo", "DatastoreInfo",
    "DegreeStats", "GraphInfo", "JobInfo", "JobKind", "PayloadIndexInfo", "Record", "ShardInfo",
]

_OMIT_NONE = {"omit_none": True}  # field metadata: the key is left out of the dict view while the value is None


def _rebuild(cls, kwargs):
    return cls(**kwargs)


def _plain(v):
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # an index spec: its JSON form
        from retrieval.indexes import registry

        return registry.spec_to_dict(v)
    return v


class Record(dict):
    """Base of the typed results: a frozen dataclass whose fields are also a read-only ``dict``.

    Subclasses are ``@dataclass(frozen=True, eq=False)`` (equality is the dict's: a record equals a
    dict with the same keys and values). ``_nested`` names fields whose dicts become records."""

    _nested: ClassVar[dict[str, type]] = {}

    def __post_init__(self) -> None:
        view: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            view[f.name] = v
        for k, v in (getattr(self, "extra", None) or {}).items():
            view.setdefault(k, v)
        dict.update(self, view)

    @classmethod
    def from_dict(cls, d: dict):
        """The record of a parsed message (``d``: the dict the engine's converter made): known keys
        become fields (nested ones records), the rest ``extra`` (when the class has it)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            if k in names and k != "extra":
                sub = cls._nested.get(k)
                if sub is not None and v is not None:
                    v = [sub.from_dict(x) for x in v] if isinstance(v, list) else sub.from_dict(v)
                kw[k] = v
            else:
                extra[k] = v
        if "extra" in names:
            kw["extra"] = extra
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A plain (mutable, deep) ``dict`` copy, nested records and index specs included: JSON-ready."""
        return {k: _plain(v) for k, v in self.items()}

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only (a frozen dataclass); use .to_dict() for a "
                        "mutable copy or dataclasses.replace() for a changed record")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = __ior__ = _read_only

    def __reduce__(self):
        return _rebuild, (type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return _rebuild(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def _record(cls):
    return dataclass(frozen=True, eq=False, repr=True)(cls)


# --- collections ----------------------------------------------------------------------------------
@_record
class PayloadIndexInfo(Record):
    """One payload index: ``key`` (dotted path), ``type`` (keyword, integer, float, bool, datetime),
    ``points`` (stored points with a value indexed under the key)."""

    key: str = ""
    type: str = ""
    points: int = 0


@_record
class ShardInfo(Record):
    shard: int = 0
    points: int = 0
    indexed: int = 0
    pending: int = 0
    deleted_in_index: int = 0
    last_seq: int = 0
    snapshot_seq: int = 0
    memory_bytes: int = 0
    state: str = ""
    location: str = ""
    extra: dict = field(default_factory=dict, repr=False)


@_record
class CollectionInfo(Record):
    """A collection's description (``describe_collection``, ``create_collection``, ...). ``index``: its
    :class:`retrieval.indexes.IndexSpec` (None: its settings could not be read); ``state`` "ready",
    "indexing", ... or, not served, "quarantined" / "unavailable" / "opening" with ``reason``."""

    _nested: ClassVar[dict[str, type]] = {"shard_info": ShardInfo, "payload_indexes": PayloadIndexInfo}

    name: str = ""
    dimension: int = 0
    metric: str = ""
    index: Any = None
    shards: int = 0
    points: int = 0
    indexed: int = 0
    pending: int = 0
    memory_bytes: int = 0
    state: str = ""
    device: str = ""
    shard_info: list[ShardInfo] = field(default_factory=list)
    created_at: float = 0.0
    reason: str = ""
    payload_indexes: list[PayloadIndexInfo] = field(default_factory=list)
    extra: dict = field(default_factory=dict, repr=False)


# --- jobs -----------------------------------------------------------------------------------------
@_record
class JobInfo(Record):
    """A job's record: ``state`` "queued" | "running" | "succeeded" | "failed" | "cancelled"; ``done`` /
    ``total`` progress (``total`` None: unknown); ``result`` the kind's result once it succeeded."""

    FINAL: ClassVar[tuple[str, ...]] = ("succeeded", "failed", "cancelled")

    id: str = ""
    kind: str = ""
    state: str = ""
    done: float = 0.0
    total: float | None = None
    message: str = ""
    error: str = ""
    result: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        """True once the job ended (succeeded, failed or cancelled)."""
        return self.state in self.FINAL


@_record
class JobKind(Record):
    name: str = ""
    description: str = ""
    resumable: bool = False


# --- graphs ---------------------------------------------------------------------------------------
@_record
class DegreeStats(Record):
    min: float = 0
    max: float = 0
    mean: float = 0.0


@_record
class GraphInfo(Record):
    """A graph's description: ``n`` nodes, ``m`` edges, flags, degree statistics, the stored
    ``embeddings`` and link ``models``; ``labels`` only when labels are attached (else absent from the
    dict view); the rest the server describes (``in_degree``, ``weight``, ``model_info``, ...) in ``extra``."""

    _nested: ClassVar[dict[str, type]] = {"degree": DegreeStats}

    name: str = ""
    n: int = 0
    m: int = 0
    directed: bool = False
    weighted: bool = False
    self_loops: int = 0
    isolated: int = 0
    degree: DegreeStats | None = None
    feature_dim: int = 0
    version: int = 0
    embeddings: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    labels: dict | None = field(default=None, metadata=_OMIT_NONE)
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.n

    @property
    def num_edges(self) -> int:
        return self.m


@_record
class AppendEdgesResult(Record):
    """``received`` edges, ``added`` new ones, ``m`` edges now, the graph's ``version``, ``self_loops_dropped``."""

    received: int = 0
    added: int = 0
    m: int = 0
    version: int = 0
    self_loops_dropped: int = 0


# --- cross-encoder --------------------------------------------------------------------------------
@_record
class CeIndexInfo(Record):
    name: str = ""
    n_items: int = 0
    k_q: int = 0
    k_i: int = 0
    anchor_queries: list[str] = field(default_factory=list)
    anchor_item_ids: list[int] = field(default_factory=list)
    scorer: dict | None = None
    dual_encoder: dict | None = None
    build: dict | None = None
    search_defaults: dict | None = None
    modes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict, repr=False)


@_record
class CeAddResult(Record):
    added: int = 0
    calls: int = 0
    scorer_seconds: float = 0.0
    seconds: float = 0.0
    truncated_items: int = 0


@_record
class CeHits(Record):
    """Cross-encoder search results: ``ids`` int64 (<= k,), ``scores`` float32 exact CE scores,
    ``calls``, the server's ``scorer_seconds`` / ``other_seconds``; ``latency_seconds`` (measured by
    the client, :meth:`Client.ce_search` only; absent from the dict view otherwise)."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    payloads: list | None = None
    calls: int = 0
    scorer_seconds: float = 0.0
    other_seconds: float = 0.0
    mode: str = ""
    k_i: int = 0
    k_r: int = 0
    rounds: int = 0
    truncated_pairs: int = 0
    query_truncated: bool = False
    latency_seconds: float | None = field(default=None, metadata=_OMIT_NONE)
    extra: dict = field(default_factory=dict, repr=False)


# --- drafts ---------------------------------------------------------------------------------------
@_record
class DatastoreInfo(Record):
    """A corpus datastore: sizes, vocabulary, the tokenizer's fingerprint; its manifest's other
    entries (tokenizer, inputs, build settings, ...) in ``extra``."""

    name: str = ""
    n_tokens: int = 0
    n_docs: int = 0
    vocab_size: int = 0
    tokenizer_fingerprint: str = ""
    bytes_on_disk: int = 0
    extra: dict = field(default_factory=dict, repr=False)


# --- from the proto: the one place ----------------------------------------------------------------
# The engines' converters (retrieval.graph / crossencoder / drafting .convert) pull in their engine
# packages (0.1-0.6 s, optional dependencies); they are imported when a message of theirs is parsed.
def collection_info(msg) -> CollectionInfo:
    return CollectionInfo.from_dict(convert.collection_info_from_proto(msg))


def collection_list(resp) -> list[CollectionInfo]:
    return [collection_info(c) for c in resp.collections]


def payload_index(msg) -> PayloadIndexInfo:
    return PayloadIndexInfo.from_dict(convert.payload_index_from_proto(msg))


def payload_index_list(resp) -> list[PayloadIndexInfo]:
    return [payload_index(e) for e in resp.indexes]


def job(msg) -> JobInfo:
    return JobInfo.from_dict(convert.job_from_proto(msg))


def job_list(resp) -> list[JobInfo]:
    return [job(j) for j in resp.jobs]


def job_kinds(resp) -> list[JobKind]:
    return [JobKind(name=k.name, description=k.description, resumable=k.resumable) for k in resp.kinds]


def graph_info(msg) -> GraphInfo:
    from retrieval.graph import convert as gconv

    return GraphInfo.from_dict(gconv.graph_info_from_proto(msg))


def append_result(msg) -> AppendEdgesResult:
    from retrieval.graph import convert as gconv

    return AppendEdgesResult.from_dict(gconv.append_result_from_proto(msg))


def ce_index_info(msg) -> CeIndexInfo:
    from retrieval.crossencoder import convert as cconv

    return CeIndexInfo.from_dict(cconv.info_from_proto(msg))


def ce_add_result(msg) -> CeAddResult:
    from retrieval.crossencoder import convert as cconv

    return CeAddResult.from_dict(cconv.add_result_from_proto(msg))


def ce_hits(msg, latency_seconds: float | None = None) -> CeHits:
    from retrieval.crossencoder import convert as cconv

    d = cconv.hits_from_proto(msg)
    if latency_seconds is not None:
        d["latency_seconds"] = latency_seconds
    return CeHits.from_dict(d)


def datastore_info(msg) -> DatastoreInfo:
    from retrieval.drafting import convert as dconv

    return DatastoreInfo.from_dict(dconv.datastore_info_from_proto(msg))
