"""The delta buffer: acknowledged points that are not in the index yet.

Every acknowledged upsert lands here first and is searched exactly (and merged with the index
results) until the indexer moves it into the index, so a client always reads its own writes.

Layout: rows ``[start, n)`` of growable arrays ``ids`` (uint64), ``vecs`` (float32, (cap, d), index-ready,
i.e. normalised for cosine), ``seqs`` (int64) and ``alive`` (bool); ``pos`` maps an id to its row.
An id has at most one alive row. Rows are consumed from the front (FIFO) by the indexer.

Thread-safety: none; used from the shard's event-loop thread only.
"""

from __future__ import annotations

import numpy as np

from retrieval.indexes.exact import knn

NO_ID = np.uint64(0xFFFFFFFFFFFFFFFF)


class Delta:
    def __init__(self, d: int) -> None:
        self.d = d
        self._alloc(1024)
        self.start = 0
        self.n = 0
        self.pos: dict[int, int] = {}

    def _alloc(self, cap: int) -> None:
        self.ids = np.zeros(cap, np.uint64)
        self.vecs = np.zeros((cap, self.d), np.float32)
        self.seqs = np.zeros(cap, np.int64)
        self.alive = np.zeros(cap, bool)

    def __len__(self) -> int:
        return len(self.pos)

    def memory_bytes(self) -> int:
        return self.vecs.nbytes + self.ids.nbytes + self.seqs.nbytes + self.alive.nbytes + 100 * len(self.pos)

    def _make_room(self, m: int) -> None:
        cap = len(self.ids)
        if self.n + m <= cap:
            return
        live = self.n - self.start
        if self.start and live + m <= cap // 2:  # compact in place
            sl = slice(self.start, self.n)
            self.ids[:live] = self.ids[sl]
            self.vecs[:live] = self.vecs[sl]
            self.seqs[:live] = self.seqs[sl]
            self.alive[:live] = self.alive[sl]
            self.alive[live:] = False
        else:
            old = (self.ids, self.vecs, self.seqs, self.alive)
            self._alloc(max(2 * cap, live + m))
            sl = slice(self.start, self.n)
            self.ids[:live], self.vecs[:live], self.seqs[:live], self.alive[:live] = (a[sl] for a in old)
        shift = self.start
        self.start, self.n = 0, live
        if shift:
            for key in self.pos:
                self.pos[key] -= shift

    def put(self, ids: np.ndarray, vecs: np.ndarray, seqs: np.ndarray | int) -> None:
        """Add (or replace) points. ``ids`` uint64 (m,) unique; ``vecs`` float32 (m, d)."""
        m = len(ids)
        if m == 0:
            return
        self._make_room(m)
        idl = ids.tolist()
        pos = self.pos
        old = [pos[i] for i in idl if i in pos] if pos else []
        if old:
            self.alive[old] = False
        r0 = self.n
        self.ids[r0 : r0 + m] = ids
        self.vecs[r0 : r0 + m] = vecs
        self.seqs[r0 : r0 + m] = seqs
        self.alive[r0 : r0 + m] = True
        pos.update(zip(idl, range(r0, r0 + m)))
        self.n += m

    def drop(self, ids: np.ndarray) -> int:
        """Remove points; returns how many were here."""
        rows = [r for r in (self.pos.pop(i, None) for i in ids.tolist()) if r is not None]
        if rows:
            self.alive[rows] = False
        return len(rows)

    def take(self, max_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The oldest ``max_rows`` alive rows: (row numbers, ids, vectors). Does not remove them."""
        end = min(self.n, self.start + max(4 * max_rows, 1024))
        rows = self.start + np.flatnonzero(self.alive[self.start : end])[:max_rows]
        if len(rows) < max_rows and end < self.n:  # the window was mostly dead (replaced / dropped) rows
            rows = self.start + np.flatnonzero(self.alive[self.start : self.n])[:max_rows]
        return rows, self.ids[rows], self.vecs[rows]

    def consume(self, rows: np.ndarray) -> None:
        """Forget rows that are now in the index."""
        for i in self.ids[rows].tolist():
            del self.pos[i]
        self.alive[rows] = False
        if len(self.pos) == 0:
            self.start = self.n = 0
            if len(self.ids) > 4096:  # caught up after a bulk load: give the buffer's memory back
                self._alloc(1024)
            return
        nz = np.flatnonzero(self.alive[self.start : self.n])
        self.start += int(nz[0]) if len(nz) else self.n - self.start

    def min_seq(self) -> int | None:
        if not self.pos:
            return None
        sl = slice(self.start, self.n)
        return int(self.seqs[sl][self.alive[sl]].min())

    def live_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, vecs, seqs) of every alive row (copies)."""
        sl = slice(self.start, self.n)
        a = self.alive[sl]
        return self.ids[sl][a], self.vecs[sl][a], self.seqs[sl][a]

    def search(self, xq: np.ndarray, k: int, metric: str,
               allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN over the alive rows -> (D (nq, k) float32, ids (nq, k) uint64, NO_ID padded)."""
        sl = slice(self.start, self.n)
        if self.n == self.start:  # empty: all padding
            return np.full((len(xq), k), np.inf, np.float32), np.full((len(xq), k), NO_ID, np.uint64)
        mask = self.alive[sl]
        if allowed_ids is not None:
            mask = mask & np.isin(self.ids[sl], allowed_ids)
        D, R = knn(xq, self.vecs[sl], k, metric, None if mask.all() else mask)
        ids = np.where(R >= 0, self.ids[sl][np.maximum(R, 0)], NO_ID)
        return D, ids
