"""A collection's configuration (``collection.json``): name, dimension, metric, index spec, shards.

Its own module so that what reads collection folders (:mod:`retrieval.vectors.importing`, the
builders) needs nothing of the serving code in :mod:`retrieval.vectors.collection`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from retrieval.errors import InvalidArgument
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec
from retrieval.storage.names import validate_name

METRICS = ("l2", "ip", "cosine")
MAX_DIM = 65536
MAX_SHARDS = 64


@dataclass(frozen=True)
class CollectionConfig:
    name: str
    dimension: int
    metric: str
    index: IndexSpec
    shards: int = 1
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {"name": self.name, "dimension": self.dimension, "metric": self.metric,
                "index": registry.spec_to_dict(self.index), "shards": self.shards, "created_at": self.created_at}

    @classmethod
    def from_json(cls, d: dict) -> "CollectionConfig":
        return cls(name=d["name"], dimension=int(d["dimension"]), metric=d["metric"],
                   index=registry.spec_from_dict(d["index"]), shards=int(d["shards"]),
                   created_at=float(d.get("created_at", 0)))

    def __post_init__(self) -> None:
        if isinstance(self.metric, str):  # "COSINE", "Cosine" and "cosine" name one metric
            object.__setattr__(self, "metric", self.metric.lower())

    def validate(self) -> "CollectionConfig":
        validate_name(self.name, "collection name")
        if not isinstance(self.dimension, int) or not 1 <= self.dimension <= MAX_DIM:
            raise InvalidArgument(f"dimension must be in [1, {MAX_DIM}], got {self.dimension}")
        if self.metric not in METRICS:
            raise InvalidArgument(f"unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise InvalidArgument(f"shards must be in [1, {MAX_SHARDS}], got {self.shards}")
        return self
