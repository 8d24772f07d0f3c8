"""Index backends by name. An unknown name gets an error listing the valid ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from retrieval.core.registry import Registry
from retrieval.errors import InvalidArgument
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec, IndexSpec, VectorIndex

#: index classes by type name, imported on first use (faiss and torch load only when asked for)
BACKENDS: Registry[type[VectorIndex]] = Registry("index type")
BACKENDS.register_lazy("hnsw", "retrieval.indexes.hnsw:HnswIndex")
BACKENDS.register_lazy("faiss", "retrieval.indexes.faiss_index:FaissIndex")
BACKENDS.register_lazy("exact", "retrieval.indexes.exact:ExactIndex")

#: the spec dataclass of each index type
SPECS: Registry[type[IndexSpec]] = Registry("index type")
for _spec in (HnswSpec, FaissSpec, ExactSpec):
    SPECS.register(_spec.kind, _spec)


def backend(kind: str) -> type[VectorIndex]:
    return BACKENDS.get(kind)


def create(spec: IndexSpec, d: int, metric: str, threads: int = 0) -> VectorIndex:
    """A new empty index for ``spec`` (``metric`` "l2" or "ip")."""
    return backend(spec.kind)(d, metric, spec, threads)


def load(spec: IndexSpec, folder: Path, d: int, metric: str, threads: int = 0) -> VectorIndex:
    return backend(spec.kind).load(folder, spec, d, metric, threads)


def validate(spec: IndexSpec, d: int, metric: str = "l2") -> None:
    """Refuse (InvalidArgument) a spec that would crash or break the process; see
    :mod:`retrieval.indexes.validate`. Call it wherever a spec enters, before it is stored."""
    from retrieval.indexes.validate import check_spec

    check_spec(spec, d, metric)


async def avalidate(spec: IndexSpec, d: int, metric: str = "l2") -> None:
    """:func:`validate` from an event loop: the trial process runs in a worker thread."""
    from retrieval.indexes.validate import acheck_spec

    await acheck_spec(spec, d, metric)


def spec_from_dict(d: dict | str | None) -> IndexSpec:
    """``"hnsw"``, ``{"type": "faiss", "factory": "IVF256,PQ16"}`` or a spec (``HnswSpec(M=32)``) -> a spec."""
    if d is None:
        return HnswSpec()
    if dataclasses.is_dataclass(d) and not isinstance(d, type) and isinstance(getattr(d, "kind", None), str):
        SPECS.get(d.kind)  # a registered kind
        return d
    if isinstance(d, str):
        d = {"type": d}
    if not isinstance(d, dict):
        raise InvalidArgument(f"index spec must be a name or a dict, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("type", "hnsw")
    cls = SPECS.get(kind)
    names = {f.name.lower(): f.name for f in dataclasses.fields(cls)}
    params = {}
    for key, value in d.items():  # parameter names in any case: {"type": "hnsw", "M": 32} is m = 32
        name = names.get(str(key).lower())
        if name is None:
            raise InvalidArgument(f"unknown parameter {str(key)[:80]!r} for index type {kind!r}; valid: "
                                  f"{', '.join(sorted(names.values())) or 'none'}")
        params[name] = value
    try:
        return cls(**params)
    except TypeError as e:
        raise InvalidArgument(f"bad parameters for index type {kind!r}: {e}") from None


def spec_to_dict(spec: IndexSpec) -> dict:
    out = {"type": spec.kind}
    out.update({k: v for k, v in vars(spec).items()})
    return out
