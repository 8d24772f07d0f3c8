"""Filtered search and payload indexes of a :class:`retrieval.vectors.shard.Shard` (a mixin).

A filter over indexed keys is evaluated from the payload indexes to the matching slots and planned
by :func:`retrieval.vectors.payload_index.plan_filtered` (exact over the matches, or the vector index
with an allowed-label mask and a wider beam); any other filter runs as SQL over the stored payloads.
Both paths redo exactly the rows a graph search left short of ``k`` among few allowed points.

The methods read the shard's state (``store``, ``index``, ``delta``, label maps, ``pidx``) and run on
the event-loop thread that opened it, like the shard's own methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np

from retrieval.indexes.base import QueryParams
from retrieval.indexes.exact import knn
from retrieval.storage.points import scan_payloads
from retrieval.vectors import filters as flt
from retrieval.vectors import payload_index as pidx_mod
from retrieval.vectors.delta import NO_ID
from retrieval.vectors.results import empty_results, merge_topk

logger = logging.getLogger("retrieval.vectors.shard")


class FilteredSearch:
    """``search_filtered`` and the payload-index lifecycle of a shard."""

    async def search_filtered(self, xq: np.ndarray, k: int, params: QueryParams, where: tuple[str, list]):
        """k-NN among the points matching a filter: from the payload indexes when they answer it
        exactly (``where`` is a :class:`filters.SqlWhere` carrying the filter; see
        :mod:`retrieval.vectors.payload_index`), else by SQL over the payloads."""
        self._check_open()
        f = getattr(where, "filter", None)
        if f is not None and self.pidx.columns:
            mask = self.pidx.evaluate(f)
            if mask is not None:
                return await self._search_matching(xq, k, params, np.flatnonzero(mask))
            dk = self.pidx.datetime_keys()
            if dk and self.pidx.touches(f, dk):  # range conditions on datetime keys also read timestamps
                where = flt.to_sql(f, datetime_keys=dk)
        thr = self.settings.filter_exact_threshold
        ids, vecs = await self._on_reader(lambda: self.store.match(where, thr + 1, True))
        if len(ids) <= thr or params.exact:
            if params.exact and len(ids) > thr:
                ids, vecs = await self._on_reader(lambda: self.store.match(where, None, True))
            return self._exact_over(xq, k, ids, vecs)
        ids, _ = await self._on_reader(lambda: self.store.match(where, None, False))
        allowed = np.zeros(self.next_label, bool)
        labs = [lab for lab in map(self.lab_of_ext.get, ids.tolist()) if lab is not None]
        allowed[np.asarray(labs, np.int64)] = True
        if self.index.is_trained() and labs:
            D, L = self.index.search(xq, k, params, allowed)
            I = np.where(L >= 0, self.ext_of_lab[np.maximum(L, 0)], NO_ID)
        else:
            D, I = empty_results(len(xq), k)
        if len(self.delta):
            D2, I2 = self.delta.search(xq, k, self.index_metric, allowed_ids=ids)
            D, I = merge_topk(D, I, D2, I2, k)
        return await self._redo_stranded(xq, k, D, I, ids)

    async def _search_matching(self, xq: np.ndarray, k: int, params: QueryParams, slots: np.ndarray):
        """k-NN among the points in payload-index ``slots`` (the matches of a filter), as planned by
        :func:`payload_index.plan_filtered`: exact over the matches when few, else the vector index
        with an allowed-label mask (and a wider beam when the selectivity is low)."""
        p = self.pidx
        nq = len(xq)
        D, I = empty_results(nq, k)
        thr = self.settings.filter_exact_threshold
        if p.vec is not None:
            thr = max(thr, self.settings.filter_exact_in_memory)
        plan = pidx_mod.plan_filtered(len(slots), p.count_live(), k, thr, params.ef, params.exact)
        if plan.kind == "none":
            return D, I
        if plan.kind == "exact" and p.vec is not None:  # every matching point's vector is in memory
            return p.exact_knn(xq, slots, k, self.index_metric)
        p.sync_labels(self.index, self.ext_of_lab, self.next_label)
        ext = p.ext_of_slot[slots]
        labs = p.lab[slots]
        in_idx = labs >= 0
        if len(self.delta) and not in_idx.all():  # points not indexed yet are in the delta
            D, I = self.delta.search(xq, k, self.index_metric, allowed_ids=ext[~in_idx])
        li = labs[in_idx]
        if plan.kind == "exact":
            if len(li):
                if self.spec.kind in ("hnsw", "exact"):  # these keep the exact (index-ready) vectors
                    D2, R = knn(xq, self.index.get_vectors(li), k, self.index_metric)
                    ei = ext[in_idx]
                    I2 = np.where(R >= 0, ei[np.maximum(R, 0)], NO_ID)
                else:  # lossy codes (PQ, SQ): the original vectors from the store
                    got, vecs, _ = await self._on_reader(lambda: self.store.get(ext[in_idx], True, False))
                    D2, I2 = self._exact_over(xq, k, got, vecs)
                D, I = merge_topk(D, I, D2, I2, k)
            return D, I
        if len(li) and self.index.is_trained():
            allowed = np.zeros(self.next_label, bool)
            allowed[li] = True
            D2, L = self.index.search(xq, k, dataclasses.replace(params, ef=plan.ef), allowed)
            I2 = np.where(L >= 0, self.ext_of_lab[np.maximum(L, 0)], NO_ID)
            D, I = merge_topk(D, I, D2, I2, k)
        return await self._redo_stranded(xq, k, D, I, ext)

    async def _redo_stranded(self, xq: np.ndarray, k: int, D: np.ndarray, I: np.ndarray, ids: np.ndarray):
        """A graph search may strand a query among too few allowed points (``ids``): redo those rows
        exactly over the allowed points' stored vectors."""
        short = np.flatnonzero((I != NO_ID).sum(1) < min(k, len(ids)))
        if len(short):
            got, vecs, _ = await self._on_reader(lambda: self.store.get(ids, True, False))
            D[short], I[short] = self._exact_over(xq[short], k, got, vecs)
        return D, I

    # ------------------------------------------------------------------------------------------
    # Payload indexes (definitions are the collection's; contents derive from the point store)
    # ------------------------------------------------------------------------------------------
    def _build_payload_index(self, specs: dict[str, str]):
        """Worker thread: ``(seq, PayloadIndexSet)`` of every stored point as of write ``seq``."""
        t0 = time.perf_counter()
        seq, rows = scan_payloads(self.store.path, dim=self.d)
        pset = pidx_mod.scan_build(specs, rows, self.d, self.prepare)
        logger.info("shard %s: built payload indexes %s over %d points in %.2f s", self.name, sorted(specs),
                    pset.count_live(), time.perf_counter() - t0)
        return seq, pset

    async def set_payload_indexes(self, specs: dict[str, str]) -> None:
        """Make the payload indexes exactly ``specs`` (``{key: type}``). Dropped keys go at once; new
        ones are built from the point store on a worker thread while writes go on, then the writes
        applied meanwhile are caught up from the store (in-memory application paused) and the new
        set replaces the old one."""
        self._check_open()
        cur = self.pidx.specs()
        if all(cur.get(key) == t for key, t in specs.items()):
            for key in set(cur) - set(specs):
                self.pidx.drop(key)
            if not self.pidx.columns:
                self.pidx = pidx_mod.PayloadIndexSet()
            return
        loop = asyncio.get_running_loop()
        seq, pset = await loop.run_in_executor(None, self._build_payload_index, dict(specs))
        self._paused = True
        try:
            it = self.store.changes_since(seq, with_payloads=True)
            while True:
                block = await self._on_reader(next, it, None)
                if block is None:
                    break
                kind, ids, vecs, _, pls = block
                if kind == "delete":
                    pset.delete(ids)
                else:
                    pset.upsert(ids, pls, self.prepare(vecs))
            self.pidx = pset
        finally:
            self._paused = False
            self._drain()

    def payload_index_info(self) -> list[dict]:
        """``[{"key", "type", "points"}]``: points = live points with at least one indexed value."""
        return self.pidx.info()

    def _exact_over(self, xq, k, ids: np.ndarray, vecs: np.ndarray):
        if len(ids) == 0:
            return empty_results(len(xq), k)
        D, R = knn(xq, self.prepare(vecs), k, self.index_metric)
        return D, np.where(R >= 0, ids[np.maximum(R, 0)], NO_ID)

