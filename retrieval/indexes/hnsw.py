"""hnswlib HNSW backend (Malkov & Yashunin, TPAMI 2018).

Removal uses hnswlib's ``mark_deleted``; the slots of removed labels are reused by later adds
(``allow_replace_deleted`` / ``replace_deleted=True``). Labels are never reused, which is what
``replace_deleted`` requires to be safe. A payload filter runs inside the graph search through
hnswlib's filter callback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import hnswlib
import numpy as np

from retrieval.indexes.base import Capabilities, HnswSpec, IndexStats, QueryParams, pad_results
from retrieval.indexes.exact import knn


def _threads(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


class HnswIndex:
    kind: ClassVar[str] = "hnsw"
    capabilities = Capabilities(native_delete=True, filter_in_index=True, needs_training=False)

    def __init__(self, d: int, metric: str, spec: HnswSpec, threads: int = 0, _index=None) -> None:
        self.d = d
        self.metric = metric
        self.spec = spec
        self.threads = _threads(threads)
        if _index is None:
            _index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=d)
            _index.init_index(max_elements=1024, M=spec.m, ef_construction=spec.ef_construction,
                              random_seed=100, allow_replace_deleted=True)
        self._index = _index
        self._ef = -1
        self._hidden = 0

    def is_trained(self) -> bool:
        return True

    def train_size(self) -> int:
        return 0

    def train(self, xt: np.ndarray) -> None:
        pass

    def reserve(self, n: int) -> None:
        cur = self._index.get_current_count()
        reusable = min(self._hidden, n)
        need = cur + n - reusable
        cap = self._index.get_max_elements()
        if need > cap:
            self._index.resize_index(max(need, 2 * cap))

    def add(self, xb: np.ndarray, labels: np.ndarray) -> None:
        self.reserve(len(xb))
        self._index.add_items(xb, labels.astype(np.uint64, copy=False), num_threads=self.threads,
                              replace_deleted=True)
        self._hidden = max(0, self._hidden - len(xb))

    def remove(self, labels: np.ndarray) -> int:
        n = 0
        for lab in np.asarray(labels, np.int64).tolist():
            try:
                self._index.mark_deleted(lab)
                n += 1
            except RuntimeError:  # unknown or already removed label
                pass
        self._hidden += n
        return n

    def live(self) -> int:
        return self._index.get_current_count() - self._hidden

    def search(self, xq, k, params: QueryParams, allowed=None):
        nq = len(xq)
        live = self.live()
        kk = min(k, live)
        if kk <= 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        ef = params.ef_for(k)
        if ef != self._ef:
            self._index.set_ef(ef)
            self._ef = ef
        if allowed is None:
            try:
                I, D = self._index.knn_query(xq, k=kk, num_threads=self.threads if nq > 1 else 1)
                return pad_results(D, I.view(np.int64), k)
            except RuntimeError:  # fewer than kk reachable (tiny or heavily deleted graph)
                return self._brute(xq, k, None)
        n_allowed = len(allowed)

        def flt(label: int) -> bool:
            return label < n_allowed and bool(allowed[label])

        try:
            I, D = self._index.knn_query(xq, k=kk, num_threads=1, filter=flt)
            return pad_results(D, I.view(np.int64), k)
        except RuntimeError:  # the filter leaves fewer than kk points reachable: search them exactly
            return self._brute(xq, k, allowed)

    def _brute(self, xq, k, allowed):
        """Exact search over the live labels (or the allowed ones: callers mark only live labels)."""
        if allowed is not None:
            labels = np.flatnonzero(allowed).astype(np.int64)
        else:  # rare: the graph lost connectivity to fewer than k points; check each label
            labels = np.asarray(self._index.get_ids_list(), np.int64)
            labels = labels[~self._deleted_mask(labels)]
        if len(labels) == 0:
            return np.full((len(xq), k), np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        D, R = knn(xq, self.get_vectors(labels), k, self.metric)
        return D, np.where(R >= 0, labels[np.maximum(R, 0)], -1)

    def _deleted_mask(self, labels: np.ndarray) -> np.ndarray:
        # hnswlib has no bulk "is deleted" query; get_items raises for deleted labels.
        out = np.zeros(len(labels), bool)
        for i, lab in enumerate(labels.tolist()):
            try:
                self._index.get_items([lab])
            except RuntimeError:
                out[i] = True
        return out

    def get_vectors(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(self._index.get_items(np.asarray(labels, np.uint64), return_type="numpy"), np.float32)

    def save(self, folder: Path) -> list[str]:
        self._index.save_index(str(folder / "hnsw.bin"))
        (folder / "hnsw_hidden.txt").write_text(str(self._hidden))
        return ["hnsw.bin", "hnsw_hidden.txt"]

    @classmethod
    def load(cls, folder: Path, spec: HnswSpec, d: int, metric: str, threads: int = 0) -> "HnswIndex":
        index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=d)
        index.load_index(str(folder / "hnsw.bin"), max_elements=0, allow_replace_deleted=True)
        if index.dim != d:
            raise ValueError(f"hnsw snapshot has dimension {index.dim}, expected {d}")
        out = cls(d, metric, spec, threads, _index=index)
        out._hidden = int((folder / "hnsw_hidden.txt").read_text())
        return out

    def stats(self) -> IndexStats:
        cap = self._index.get_max_elements()
        m = self.spec.m
        per = self.d * 4 + (2 * m) * 4 + 4 + 8       # level-0 vector + links + count + label
        upper = self._index.get_current_count() * (m * 4 + 4) // max(1, int(np.log(max(m, 2))))
        return IndexStats(live=self.live(), hidden=self._hidden, memory_bytes=int(cap * per + upper))
