"""faiss (Johnson, Douze & Jégou), in process, through factory strings.

Registered names and their settings:

=================  =========================================  ==========================
name               build                                      query
=================  =========================================  ==========================
``faiss-hnsw``     ``M`` (16), ``ef_construction`` (200):     ``ef`` (``efSearch``)
                   ``IndexHNSWFlat``, factory ``HNSW{M},Flat``
``faiss-ivf-flat`` ``nlist`` (``auto`` = round(sqrt(n))):     ``nprobe``
                   factory ``IVF{nlist},Flat``
``faiss-ivfpq``    ``nlist`` (auto), ``m`` (``auto``: the     ``nprobe``
                   divisor of d nearest d/4), ``nbits`` (8):
                   factory ``IVF{nlist},PQ{m}x{nbits}np``
``faiss``          ``factory``: any faiss factory string       any ``ParameterSpace``
                                                              names (``nprobe``, ``efSearch``...)
=================  =========================================  ==========================

Cosine data arrive normalised and use ``METRIC_INNER_PRODUCT``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.ann.adapters import register
from bench.ann.adapters.base import Algorithm
from bench.ann.adapters.hnswlib_ import EF_SWEEP
from retrieval.errors import InvalidArgument

NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)


def auto_nlist(n: int) -> int:
    """Default number of IVF lists: round(sqrt(n)), at least 1 and at most n // 39 (faiss's minimum
    training points per centroid), so 10k points get 100 lists and 1M get 1000."""
    return max(1, min(int(round(math.sqrt(n))), n // 39 if n >= 39 else 1))


def auto_pq_m(d: int) -> int:
    """Default number of PQ sub-quantizers: the divisor of ``d`` nearest ``d / 4`` (4-dim sub-vectors)."""
    divisors = [m for m in range(1, d + 1) if d % m == 0]
    return min(divisors, key=lambda m: (abs(m - d / 4), -m))


class _Faiss(Algorithm):
    """Shared body: build from :meth:`factory`, query parameters through ``faiss.ParameterSpace``."""

    query_names: tuple[str, ...] = ()

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._index: Any = None

    def factory(self, n: int) -> str:
        raise NotImplementedError

    def _configure(self, index: Any) -> None:
        """Set build-time fields after the factory (e.g. HNSW efConstruction)."""

    def fit(self, xb: np.ndarray) -> None:
        import faiss

        fs = self.factory(len(xb))
        faiss_metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        try:
            index = faiss.index_factory(self.dim, fs, faiss_metric)
        except RuntimeError as e:
            raise InvalidArgument(f"{self.name}: faiss cannot build factory string {fs!r}: {e}") from e
        self._configure(index)
        if not index.is_trained:
            index.train(xb)
        index.add(xb)
        self._index = index
        self._ps = faiss.ParameterSpace()

    def set_query_params(self, params: Mapping[str, Any]) -> None:
        if self.query_names:
            self._unknown(params, self.query_names, "query")
        for key, value in params.items():
            name = {"ef": "efSearch"}.get(key, key)
            try:
                self._ps.set_index_parameter(self._index, name, float(value))
            except RuntimeError as e:
                raise InvalidArgument(f"{self.name}: cannot set query parameter {key}={value!r}: {e}") from e

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        _, ids = self._index.search(q[None, :], k)
        return ids[0]

    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        _, ids = self._index.search(xq, k)
        return ids

    def index_bytes(self) -> int:
        import faiss

        with tempfile.TemporaryDirectory(prefix="bench-faiss-") as tmp:
            p = os.path.join(tmp, "index.faiss")
            faiss.write_index(self._index, p)
            return os.path.getsize(p)

    def close(self) -> None:
        self._index = None


@register
class FaissHNSW(_Faiss):
    name = "faiss-hnsw"
    default_build = ({"M": 16, "ef_construction": 200},)
    default_query = tuple({"ef": ef} for ef in EF_SWEEP)
    query_names = ("ef",)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, ("M", "ef_construction"), "build")

    def factory(self, n: int) -> str:
        return f"HNSW{self._param(self.build, 'M')},Flat"

    def _configure(self, index: Any) -> None:
        index.hnsw.efConstruction = self._param(self.build, "ef_construction")


def _resolve_nlist(alg: Algorithm, n: int) -> int:
    v = alg.build.get("nlist", "auto")
    nlist = auto_nlist(n) if v == "auto" else alg._param(alg.build, "nlist")
    alg.build["nlist"] = nlist
    return nlist


@register
class FaissIVFFlat(_Faiss):
    name = "faiss-ivf-flat"
    default_build = ({"nlist": "auto"},)
    default_query = tuple({"nprobe": p} for p in NPROBE_SWEEP)
    query_names = ("nprobe",)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, ("nlist",), "build")

    def factory(self, n: int) -> str:
        return f"IVF{_resolve_nlist(self, n)},Flat"


@register
class FaissIVFPQ(_Faiss):
    name = "faiss-ivfpq"
    default_build = ({"nlist": "auto", "m": "auto", "nbits": 8},)
    default_query = tuple({"nprobe": p} for p in NPROBE_SWEEP)
    query_names = ("nprobe",)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, ("nlist", "m", "nbits"), "build")

    def factory(self, n: int) -> str:
        nlist = _resolve_nlist(self, n)
        m = auto_pq_m(self.dim) if self.build.get("m", "auto") == "auto" else self._param(self.build, "m")
        if self.dim % m:
            raise InvalidArgument(f"{self.name}: m={m} must divide the dimension {self.dim}")
        nbits = int(self.build.get("nbits", 8))
        self.build.update(m=m, nbits=nbits)
        # "np": no polysemous training (on by default for factory PQ codes; it only serves Hamming-threshold
        # search, unused here, and makes training ~7x slower)
        return f"IVF{nlist},PQ{m}x{nbits}np"


@register
class FaissFactory(_Faiss):
    name = "faiss"
    default_build = ({"factory": "Flat"},)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, ("factory",), "build")

    def factory(self, n: int) -> str:
        return self._param(self.build, "factory", str)
