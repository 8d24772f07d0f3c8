"""Pieces the route modules share: the strict request base model, the per-app handle on the servicers,
and turning results into JSON values."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict

from retrieval.http.gate import Gate

#: A JSON number (never a string such as "1.5" or "NaN"; the JSON tokens NaN / Infinity parse as numbers
#: and are refused by the engines with the sentence gRPC clients get).
Number = float  # in a strict model: ints and floats, no strings
MAX_ID = 2**64 - 1  # the padding id of search results


class Body(BaseModel):
    """Request bodies: unknown fields and values of the wrong JSON type are refused (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass
class Handle:
    """The servicers the routes call (the same classes gRPC serves, over the same engines) and the gate."""

    gate: Gate
    collections: Any
    points: Any
    search: Any
    jobs: Any
    graphs: Any = None
    crossencoder: Any = None
    drafts: Any = None
    health: Any = None              # () -> {service: status int}
    settings: Any = None
    extras: dict = field(default_factory=dict)


def handle(request: Request) -> Handle:
    return request.app.state.handle


async def call(request: Request, method: str, fn, msg):
    """Run servicer method ``fn`` for gRPC ``method`` through the gate."""
    return await handle(request).gate.call(request.headers, method, fn, msg)


def jsonable(x):
    """Results as JSON values: numpy arrays as lists, non-finite floats as None, dataclasses (index
    specs) as their dict form."""
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        from retrieval.indexes import registry
        from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec

        if isinstance(x, (HnswSpec, FaissSpec, ExactSpec)):
            return registry.spec_to_dict(x)
        return jsonable(dataclasses.asdict(x))
    return x


def payload(text: str):
    return json.loads(text) if text else None
