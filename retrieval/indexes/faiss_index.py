"""faiss backend: any index the faiss factory can build (Johnson, Douze & Jégou, 2019).

The factory index is wrapped in ``IndexIDMap2`` so faiss stores our labels. Removal hides labels
with an ``IDSelectorBitmap`` of live labels passed in the search parameters (works for flat, IVF
and HNSW indexes alike); hidden vectors are dropped for good when the shard rebuilds the index
(once they exceed a quarter of it). A payload filter is ANDed into the same bitmap.

GPU: when faiss-gpu sees a GPU, flat and IVF indexes are searched on it (HNSW has no GPU form);
hidden labels are then removed with ``remove_ids`` on the CPU copy before the GPU copy is refreshed.
This first version keeps the CPU index as the source of truth and uses the GPU for unfiltered
searches only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import faiss
import numpy as np

from retrieval.device import faiss_num_gpus
from retrieval.errors import InvalidArgument
from retrieval.indexes.base import Capabilities, FaissSpec, IndexStats, QueryParams, pad_results
from retrieval.indexes.faiss_factory import default_train_size, min_train_points

logger = logging.getLogger(__name__)


def _metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


class FaissIndex:
    kind: ClassVar[str] = "faiss"

    def __init__(self, d: int, metric: str, spec: FaissSpec, threads: int = 0, _index=None) -> None:
        self.d = d
        self.metric = metric
        self.spec = spec
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        if _index is None:
            try:
                base = faiss.index_factory(d, spec.factory, _metric(metric))
            except RuntimeError as e:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
                raise InvalidArgument(f"faiss cannot build factory string {spec.factory!r}: {msg}") from None
            hnsw = self._hnsw_of(base)
            if hnsw is not None and spec.ef_construction:
                hnsw.hnsw.efConstruction = spec.ef_construction
            _index = faiss.IndexIDMap2(base)
        self._index = _index
        base = faiss.downcast_index(self._index.index)
        self._ivf = faiss.try_extract_index_ivf(base) if hasattr(faiss, "try_extract_index_ivf") else None
        if self._ivf is None:
            try:
                self._ivf = faiss.extract_index_ivf(base)
            except RuntimeError:
                self._ivf = None
        if self._ivf is not None:
            # extracted from behind a transform (OPQ, PCA) it comes back as a plain IndexIVF, which hides
            # IndexIVFPQ's do_polysemous_training below
            self._ivf = faiss.downcast_index(self._ivf)
        if self._ivf is not None and self._ivf.direct_map.no():
            # get_vectors (exact=True searches) reconstructs by id: IVF needs its id -> list position map
            self._ivf.make_direct_map()
        self._hnsw = self._hnsw_of(base)
        # Polysemous training (on by default for PQ codes) costs minutes and only helps polysemous
        # search, which we do not use.
        for idx in (self._ivf, base):
            if idx is not None and hasattr(idx, "do_polysemous_training"):
                idx.do_polysemous_training = False
        # never fewer points than faiss accepts (a stored spec may predate that check)
        self._train_size = max(spec.train_size or default_train_size(spec.factory), min_train_points(spec.factory))
        self.capabilities = Capabilities(native_delete=False, filter_in_index=True,
                                         needs_training=not self._index.is_trained, gpu=False)
        self._alive = np.zeros(0, bool)   # indexed by label
        self._packed: np.ndarray | None = None
        self._hidden = 0
        self._live = int(self._index.ntotal)

    @staticmethod
    def _hnsw_of(index):
        idx = faiss.downcast_index(index)
        if isinstance(idx, faiss.IndexPreTransform):
            idx = faiss.downcast_index(idx.index)
        return idx if isinstance(idx, faiss.IndexHNSW) else None

    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train_size(self) -> int:
        return 0 if self._index.is_trained else max(self._train_size, 1)

    def train(self, xt: np.ndarray) -> None:
        faiss.omp_set_num_threads(self.threads)
        self._index.train(np.ascontiguousarray(xt, dtype=np.float32))

    def reserve(self, n: int) -> None:
        pass

    def _grow(self, max_label: int) -> None:
        if max_label >= len(self._alive):
            alive = np.zeros(max(max_label + 1, 2 * len(self._alive), 1024), bool)
            alive[: len(self._alive)] = self._alive
            self._alive = alive

    def add(self, xb: np.ndarray, labels: np.ndarray) -> None:
        labels = np.asarray(labels, np.int64)
        faiss.omp_set_num_threads(self.threads)
        self._index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), labels)
        self._grow(int(labels.max()))
        self._alive[labels] = True
        self._packed = None
        self._live += len(labels)

    def remove(self, labels: np.ndarray) -> int:
        labels = np.asarray(labels, np.int64)
        labels = labels[(labels >= 0) & (labels < len(self._alive))]
        labels = labels[self._alive[labels]]
        self._alive[labels] = False
        self._packed = None
        self._hidden += len(labels)
        self._live -= len(labels)
        return len(labels)

    def _params(self, k: int, qp: QueryParams, sel):
        if self._hnsw is not None:
            return faiss.SearchParametersHNSW(efSearch=qp.ef_for(k), sel=sel) if sel is not None else \
                faiss.SearchParametersHNSW(efSearch=qp.ef_for(k))
        if self._ivf is not None:
            nprobe = min(qp.nprobe_or_default(), self._ivf.nlist)
            return faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if sel is not None else \
                faiss.SearchParametersIVF(nprobe=nprobe)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(self, xq, k, params: QueryParams, allowed=None):
        nq = len(xq)
        if self._live <= 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        sel = None
        keep = None
        if allowed is not None:
            mask = np.zeros(len(self._alive), bool)
            n = min(len(allowed), len(mask))
            mask[:n] = allowed[:n] & self._alive[:n]
            keep = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(keep))
        elif self._hidden:
            if self._packed is None:
                self._packed = np.packbits(self._alive, bitorder="little")
            keep = self._packed
            sel = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(keep))
        faiss.omp_set_num_threads(self.threads if nq > 1 else 1)
        p = self._params(k, params, sel)
        D, I = self._index.search(np.ascontiguousarray(xq, dtype=np.float32), k, params=p)
        del keep  # the selector points into it until here
        D = D.astype(np.float32, copy=False)
        if self.metric == "ip":
            D = 1 - D
        D[I < 0] = np.inf
        # faiss returns ascending for L2 and descending similarity for IP; 1 - s keeps the order ascending.
        return pad_results(D, I, k)

    def get_vectors(self, labels: np.ndarray) -> np.ndarray:
        return np.vstack([self._index.reconstruct(int(l)) for l in labels]).astype(np.float32) if len(labels) else \
            np.zeros((0, self.d), np.float32)

    def save(self, folder: Path) -> list[str]:
        faiss.write_index(self._index, str(folder / "faiss.index"))
        np.save(folder / "faiss_alive.npy", self._alive)
        return ["faiss.index", "faiss_alive.npy"]

    @classmethod
    def load(cls, folder: Path, spec: FaissSpec, d: int, metric: str, threads: int = 0) -> "FaissIndex":
        index = faiss.read_index(str(folder / "faiss.index"))
        if index.d != d:
            raise ValueError(f"faiss snapshot has dimension {index.d}, expected {d}")
        out = cls(d, metric, spec, threads, _index=index)
        out._alive = np.load(folder / "faiss_alive.npy")
        out._live = int(out._alive.sum())
        out._hidden = int(index.ntotal) - out._live
        return out

    def stats(self) -> IndexStats:
        n = int(self._index.ntotal)
        base = faiss.downcast_index(self._index.index)
        try:
            code = int(base.sa_code_size())
        except RuntimeError:
            code = self.d * 4
        per = code + 8
        if self._hnsw is not None:
            per += 2 * self._hnsw.hnsw.nb_neighbors(0) * 4 + 8
        extra = self._ivf.nlist * self.d * 4 if self._ivf is not None else 0
        return IndexStats(live=self._live, hidden=self._hidden, memory_bytes=n * per + extra + len(self._alive))
