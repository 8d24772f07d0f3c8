"""Exact k-NN: a kernel (``knn``) and the ``exact`` index backend built on it.

``knn`` computes distances with one matmul (torch; GPU when present) and takes the top-k:
``l2``: ||q||^2 - 2 <q, x> + ||x||^2 (clamped at 0); ``ip``: 1 - <q, x>.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from retrieval.device import torch_device
from retrieval.indexes.base import Capabilities, ExactSpec, IndexStats, QueryParams, pad_results


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor over ``a`` without a copy where possible. Read-only arrays (memory maps,
    snapshot labels) are shared too: the tensors made here are only ever read."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def knn(xq: np.ndarray, xb: np.ndarray | torch.Tensor, k: int, metric: str,
        mask: np.ndarray | None = None, xb_norms: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``xq`` (nq, d) in ``xb`` (n, d) -> (D (nq, k) float32, I (nq, k) int64 row numbers).

    ``mask``: optional bool (n,), False rows are never returned. Rows past ``n`` are padded with
    inf / -1. Runs where ``xb`` lives (a torch tensor may be on the GPU).
    """
    nq = len(xq)
    n = xb.shape[0]
    if n == 0 or k == 0:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    B = xb if isinstance(xb, torch.Tensor) else _tensor(xb)
    Q = _tensor(xq).to(B.device)
    with torch.no_grad():
        dots = Q @ B.T
        if metric == "l2":
            bn = xb_norms if xb_norms is not None else (B * B).sum(1)
            dist = (Q * Q).sum(1, keepdim=True) - 2 * dots + bn[None, :]
            dist.clamp_(min=0)
        else:
            dist = 1 - dots
        if mask is not None:
            dist[:, ~torch.from_numpy(np.asarray(mask, dtype=bool)).to(B.device)] = float("inf")
        kk = min(k, n)
        D, I = torch.topk(dist, kk, dim=1, largest=False, sorted=True)
        D = D.cpu().numpy()
        I = I.cpu().numpy().astype(np.int64)
    I[~np.isfinite(D)] = -1
    return pad_results(D, I, k)


class ExactIndex:
    """Brute-force index: vectors in one torch matrix (on the GPU when present).

    Removal marks rows dead; dead rows are compacted away once they are a quarter of the matrix.
    """

    kind: ClassVar[str] = "exact"

    def __init__(self, d: int, metric: str, spec: ExactSpec | None = None, threads: int = 0) -> None:
        self.d = d
        self.metric = metric
        self.device = torch_device()
        self.capabilities = Capabilities(native_delete=True, filter_in_index=True, needs_training=False,
                                         gpu=self.device == "cuda")
        self._x = torch.empty((0, d), dtype=torch.float32, device=self.device)
        self._norms = torch.empty((0,), dtype=torch.float32, device=self.device)
        self._labels = np.zeros(0, np.int64)   # sorted: labels are added in increasing order
        self._alive = np.zeros(0, bool)
        self._n = 0

    def is_trained(self) -> bool:
        return True

    def train_size(self) -> int:
        return 0

    def train(self, xt: np.ndarray) -> None:
        pass

    def reserve(self, n: int) -> None:
        need = self._n + n
        cap = self._x.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 1024)
        x = torch.empty((new_cap, self.d), dtype=torch.float32, device=self.device)
        x[: self._n] = self._x[: self._n]
        norms = torch.empty((new_cap,), dtype=torch.float32, device=self.device)
        norms[: self._n] = self._norms[: self._n]
        self._x, self._norms = x, norms
        labels = np.zeros(new_cap, np.int64)
        labels[: self._n] = self._labels[: self._n]
        alive = np.zeros(new_cap, bool)
        alive[: self._n] = self._alive[: self._n]
        self._labels, self._alive = labels, alive

    def add(self, xb: np.ndarray, labels: np.ndarray) -> None:
        n = len(xb)
        self.reserve(n)
        t = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self.device)
        self._x[self._n : self._n + n] = t
        self._norms[self._n : self._n + n] = (t * t).sum(1)
        self._labels[self._n : self._n + n] = labels
        self._alive[self._n : self._n + n] = True
        self._n += n

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        labs = self._labels[: self._n]
        pos = np.searchsorted(labs, labels)
        pos = np.clip(pos, 0, max(self._n - 1, 0))
        ok = (self._n > 0) & (labs[pos] == labels) if self._n else np.zeros(len(labels), bool)
        return pos[ok]

    def remove(self, labels: np.ndarray) -> int:
        rows = self._rows(np.asarray(labels, np.int64))
        rows = rows[self._alive[rows]]
        self._alive[rows] = False
        if self._n and (~self._alive[: self._n]).sum() > max(1024, self._n // 4):
            self._compact()
        return len(rows)

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[: self._n])
        idx = torch.from_numpy(keep).to(self.device)
        self._x[: len(keep)] = self._x[idx]
        self._norms[: len(keep)] = self._norms[idx]
        self._labels[: len(keep)] = self._labels[keep]
        self._alive[: len(keep)] = True
        self._alive[len(keep) : self._n] = False
        self._n = len(keep)

    def search(self, xq, k, params: QueryParams, allowed=None):
        if self._n == 0:  # nothing added yet (the label array may not even be allocated)
            return np.full((len(xq), k), np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        mask = self._alive[: self._n]
        if allowed is not None:
            labs = self._labels[: self._n]
            ok = np.zeros(self._n, bool)
            inside = labs < len(allowed)
            ok[inside] = allowed[labs[inside]]
            mask = mask & ok
        elif mask.all():
            mask = None
        D, R = knn(xq, self._x[: self._n], k, self.metric, mask, self._norms[: self._n])
        I = np.where(R >= 0, self._labels[np.maximum(R, 0)], -1)
        return D, I

    def get_vectors(self, labels: np.ndarray) -> np.ndarray:
        rows = self._rows(np.asarray(labels, np.int64))
        return self._x[torch.from_numpy(rows).to(self.device)].cpu().numpy()

    def save(self, folder: Path) -> list[str]:
        keep = np.flatnonzero(self._alive[: self._n])
        np.save(folder / "exact_vectors.npy", self._x[: self._n].cpu().numpy()[keep])
        np.save(folder / "exact_labels.npy", self._labels[keep])
        return ["exact_vectors.npy", "exact_labels.npy"]

    @classmethod
    def load(cls, folder: Path, spec: ExactSpec, d: int, metric: str, threads: int = 0) -> "ExactIndex":
        idx = cls(d, metric, spec, threads)
        x = np.load(folder / "exact_vectors.npy")
        labels = np.load(folder / "exact_labels.npy")
        if x.shape != (len(labels), d):
            raise ValueError(f"exact snapshot has vectors {x.shape} for {len(labels)} labels, d={d}")
        idx.add(x, labels)
        return idx

    def stats(self) -> IndexStats:
        live = int(self._alive[: self._n].sum())
        return IndexStats(live=live, hidden=self._n - live, memory_bytes=int(self._x.shape[0]) * (self.d * 4 + 4 + 9))
