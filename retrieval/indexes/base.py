"""The vector-index family: one declared interface, build specs, query params, capabilities.

Contract (faiss's): ``search(xq, k, params, allowed) -> (D, I)``, both ``(nq, k)``, ``D`` float32
distances ascending, ``I`` int64 labels; short rows are padded with ``inf`` / ``-1``, never an
exception for "found fewer than k".

Distances, for every backend: ``"l2"`` squared Euclidean; ``"ip"`` ``1 - <q, x>``. (Cosine is
``"ip"`` over L2-normalised vectors; the shard normalises.)

Labels are int64 chosen by the caller (the shard hands out increasing labels and never reuses one),
so an update is "hide the old label, add a new one" in every backend.

Thread-safety: an index is not thread-safe. The shard calls every method from its event-loop
thread, except ``save`` (run in a worker thread while the shard adds nothing) and a rebuild, which
works on a separate index object.
"""

from __future__ import annotations

import numbers

from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import ClassVar, Protocol, Union, runtime_checkable

import numpy as np

from retrieval.errors import InvalidArgument


# --------------------------------------------------------------------------------------------------
# Build settings
# --------------------------------------------------------------------------------------------------
def _check_int(v, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InvalidArgument(f"{what} must be an integer, got {v!r}")


@dataclass(frozen=True)
class HnswSpec:
    """hnswlib HNSW: ``m`` links per node, ``ef_construction`` build beam width.

    ``M`` is accepted for ``m`` (hnswlib's and the paper's spelling): ``HnswSpec(M=32)``."""

    m: int = 16
    ef_construction: int = 200
    M: InitVar[int | None] = None
    kind: ClassVar[str] = "hnsw"

    def __post_init__(self, M: int | None = None) -> None:
        if M is not None:
            if self.m not in (16, M):
                raise InvalidArgument(f"hnsw m={self.m} and M={M} disagree; give one of them")
            object.__setattr__(self, "m", M)
        _check_int(self.m, "hnsw m")
        _check_int(self.ef_construction, "hnsw ef_construction")
        if not 2 <= self.m <= 256:
            raise InvalidArgument(f"hnsw m must be in [2, 256], got {self.m}")
        if not 1 <= self.ef_construction <= 10_000:
            raise InvalidArgument(f"hnsw ef_construction must be in [1, 10000], got {self.ef_construction}")


@dataclass(frozen=True)
class FaissSpec:
    """A faiss index from a factory string (``"HNSW32"``, ``"IVF256,Flat"``, ``"IVF256,PQ16"``...).

    ``train_size``: points needed before training (0: derived from the factory string).
    ``ef_construction``: HNSW factories only (0: faiss's default, 40).
    """

    factory: str = "HNSW32"
    train_size: int = 0
    ef_construction: int = 0
    kind: ClassVar[str] = "faiss"

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str):
            raise InvalidArgument(f"faiss factory must be a string, got {self.factory!r}")
        _check_int(self.train_size, "faiss train_size")
        _check_int(self.ef_construction, "faiss ef_construction")
        if not self.factory or len(self.factory) > 200 or any(c in self.factory for c in "\0\n\r"):
            raise InvalidArgument(f"faiss factory string {self.factory[:80]!r} is not valid")
        if self.train_size < 0 or self.ef_construction < 0:
            raise InvalidArgument("faiss train_size and ef_construction must be >= 0")


@dataclass(frozen=True)
class ExactSpec:
    """Exact search (torch matmul + top-k; GPU when present)."""

    kind: ClassVar[str] = "exact"


IndexSpec = Union[HnswSpec, FaissSpec, ExactSpec]


# --------------------------------------------------------------------------------------------------
# Query settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryParams:
    """Per-request settings; 0 means the default (ef = max(k, 64), nprobe = 8)."""

    ef: int = 0
    nprobe: int = 0
    exact: bool = False

    def ef_for(self, k: int) -> int:
        return max(k, self.ef or 64)

    def nprobe_or_default(self) -> int:
        return self.nprobe or 8


# --------------------------------------------------------------------------------------------------
# Capabilities and stats
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared rather than probed.

    ``native_delete``: hidden labels cost nothing at search time and their slots are reused.
    ``filter_in_index``: an ``allowed`` mask is applied inside the graph/list traversal.
    ``needs_training``: the index must see ``train_size`` points before ``add``.
    ``gpu``: this instance runs on a GPU.
    """

    native_delete: bool
    filter_in_index: bool
    needs_training: bool
    gpu: bool = False


@dataclass(frozen=True)
class IndexStats:
    live: int          # labels searchable
    hidden: int        # removed labels still occupying space (reused or rebuilt away)
    memory_bytes: int  # estimate of the index's memory


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class VectorIndex(Protocol):
    kind: ClassVar[str]
    capabilities: Capabilities
    d: int
    metric: str  # "l2" or "ip"

    def is_trained(self) -> bool:
        """False until ``train`` ran, for backends that need training."""

    def train_size(self) -> int:
        """Points needed before ``train`` (0 when no training is needed)."""

    def train(self, xt: np.ndarray) -> None:
        """Train on ``xt`` float32 (n, d). May be slow: callers run it off the event loop."""

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more vectors (may reallocate)."""

    def add(self, xb: np.ndarray, labels: np.ndarray) -> None:
        """Add ``xb`` float32 (n, d) under ``labels`` int64 (n,), labels never used before."""

    def remove(self, labels: np.ndarray) -> int:
        """Hide ``labels`` from every later search; returns how many were live."""

    def search(self, xq: np.ndarray, k: int, params: QueryParams,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of ``xq`` float32 (nq, d). ``allowed``: optional bool mask indexed by label."""

    def save(self, folder: Path) -> list[str]:
        """Write the index into ``folder``; returns the file names written."""

    def stats(self) -> IndexStats:
        """Live and hidden counts and a memory estimate."""


def pad_results(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (nq, k') results to (nq, k) with inf / -1."""
    nq, kk = I.shape
    if kk == k:
        return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)
    Dp = np.full((nq, k), np.inf, np.float32)
    Ip = np.full((nq, k), -1, np.int64)
    Dp[:, :kk] = D
    Ip[:, :kk] = I
    return Dp, Ip
