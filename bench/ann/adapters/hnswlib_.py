"""hnswlib (Malkov & Yashunin, HNSW), in process.

Build: ``M`` (links per node, default 16), ``ef_construction`` (default 200). Query: ``ef`` (the
search beam; hnswlib uses ``max(ef, k)``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.ann.adapters import register
from bench.ann.adapters.base import Algorithm

EF_SWEEP = (10, 20, 40, 80, 160, 320)


@register
class Hnswlib(Algorithm):
    name = "hnswlib"
    default_build = ({"M": 16, "ef_construction": 200},)
    default_query = tuple({"ef": ef} for ef in EF_SWEEP)

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, ("M", "ef_construction", "seed"), "build")
        self._index: Any = None

    def fit(self, xb: np.ndarray) -> None:
        import hnswlib

        space = "l2" if self.metric == "l2" else "ip"  # cosine data arrive normalised
        self._index = hnswlib.Index(space=space, dim=self.dim)
        self._index.init_index(
            max_elements=len(xb),
            M=self._param(self.build, "M"),
            ef_construction=self._param(self.build, "ef_construction"),
            random_seed=int(self.build.get("seed", 100)),
        )
        self._index.add_items(xb, np.arange(len(xb)), num_threads=self.threads)

    def set_query_params(self, params: Mapping[str, Any]) -> None:
        self._unknown(params, ("ef",), "query")
        self._index.set_ef(self._param(params, "ef"))

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        labels, _ = self._index.knn_query(q[None, :], k=k, num_threads=1)
        return labels[0].astype(np.int64)

    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        labels, _ = self._index.knn_query(xq, k=k, num_threads=self.threads)
        return labels.astype(np.int64)

    def index_bytes(self) -> int:
        with tempfile.TemporaryDirectory(prefix="bench-hnswlib-") as tmp:
            p = os.path.join(tmp, "index.bin")
            self._index.save_index(p)
            return os.path.getsize(p)

    def close(self) -> None:
        self._index = None
