"""Exact (brute-force) search: numpy (BLAS) and torch (CUDA when present).

No build or query parameters. Distances for ranking: ``||x||^2 - 2<q, x>`` (l2), ``-<q, x>`` (ip and
normalised cosine); ``k`` smallest by partial selection, then sorted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.ann.adapters import register
from bench.ann.adapters.base import Algorithm

_BATCH_SCORES = 1 << 24  # cap on the (chunk, n) score matrix of a batch query (64 MiB of float32)


@register
class ExactNumpy(Algorithm):
    name = "exact-numpy"

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, (), "build")

    def fit(self, xb: np.ndarray) -> None:
        self._xb = np.ascontiguousarray(xb, dtype=np.float32)
        self._xx = (self._xb * self._xb).sum(axis=1) if self.metric == "l2" else None

    def set_query_params(self, params: Mapping[str, Any]) -> None:
        self._unknown(params, (), "query")

    def _topk(self, s: np.ndarray, k: int) -> np.ndarray:
        k = min(k, s.shape[1])
        part = np.argpartition(s, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1).astype(np.int64)

    def _scores(self, xq: np.ndarray) -> np.ndarray:
        s = xq @ self._xb.T
        return self._xx[None, :] - 2.0 * s if self._xx is not None else -s

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self._topk(self._scores(q[None, :]), k)[0]

    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        chunk = max(1, _BATCH_SCORES // max(1, len(self._xb)))
        return np.concatenate([self._topk(self._scores(xq[a : a + chunk]), k) for a in range(0, len(xq), chunk)])

    def index_bytes(self) -> int:
        return int(self._xb.nbytes + (self._xx.nbytes if self._xx is not None else 0))

    def close(self) -> None:
        self._xb = self._xx = None  # type: ignore[assignment]


@register
class ExactTorch(Algorithm):
    name = "exact-torch"

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, (), "build")

    def fit(self, xb: np.ndarray) -> None:
        import torch

        from retrieval.device import torch_device

        self._torch = torch
        self._dev = torch.device(torch_device())
        self._xb = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self._dev)
        self._xx = (self._xb * self._xb).sum(dim=1) if self.metric == "l2" else None

    def set_query_params(self, params: Mapping[str, Any]) -> None:
        self._unknown(params, (), "query")

    def _search(self, xq: np.ndarray, k: int) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self._dev)
            s = q @ self._xb.T
            s = self._xx[None, :] - 2.0 * s if self._xx is not None else -s
            ids = torch.topk(s, min(k, s.shape[1]), dim=1, largest=False, sorted=True).indices
            return ids.cpu().numpy()

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self._search(q[None, :], k)[0]

    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        chunk = max(1, _BATCH_SCORES // max(1, int(self._xb.shape[0])))
        return np.concatenate([self._search(xq[a : a + chunk], k) for a in range(0, len(xq), chunk)])

    def index_bytes(self) -> int:
        n = self._xb.numel() * 4
        return int(n + (self._xx.numel() * 4 if self._xx is not None else 0))

    def close(self) -> None:
        self._xb = self._xx = None
