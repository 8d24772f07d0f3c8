"""The cross-encoder k-NN client methods (ANNCUR / adaptive): index builds (a job), items, search."""

from __future__ import annotations

import time

from retrieval import client_convert as cc
from retrieval.client import types
from retrieval.client.transport import LONG_CALL_S
from retrieval.client.types import CeAddResult, CeHits, CeIndexInfo, JobInfo
from retrieval.v1 import crossencoder_pb2 as cpb


def _cconv():
    """``retrieval.crossencoder.convert``, imported on the first call that needs it: it loads the
    cross-encoder engine package (~0.6 s; scorers, optional model dependencies)."""
    from retrieval.crossencoder import convert

    return convert


class CrossEncoderMixin:
    """Cross-encoder indexes (``client.crossencoder``); needs a :class:`~retrieval.client.transport.Transport`."""

    # --- cross-encoder k-NN (ANNCUR / adaptive) ---------------------------------------------------
    def _ce_stub(self):
        return self._ce

    def _ce_long_call(self, fn, request, timeout: float | None):
        """A cross-encoder call that may score for a while: the deadline is at least 600 s by default."""
        return self._call(fn, request, timeout, floor=LONG_CALL_S)

    def build_ce_index(self, name: str, scorer: dict, items: list[dict] | None = None, items_path: str | None = None,
                       anchor_queries: list[str] | None = None, query_log: list[str] | None = None,
                       k_q: int | None = None, query_seed: int = 0, dual_encoder: dict | None = None,
                       params: dict | None = None, wait: bool = True, timeout: float | None = None, *,
                       progress: bool | None = None, detach: bool = False) -> JobInfo:
        """Build a cross-encoder index (a job, kind ``crossencoder_build``). ``scorer``:
        ``{"name": "minilm-joint" | "hf" | "joint-encoder", "model_dir"?, "batch_size"?, "device"?,
        "precision"?, "max_length"?}``; ``items``: ``[{"id", "text", "payload"?}]`` (or ``items_path`` on
        the server); ``params``: build params (``k_i``, ``anchor_method``, ...). Returns the job's final
        record; ``detach`` (or ``wait=False``): the record at once. ``timeout``: seconds for the call
        that starts it and for the wait (None: 600 s to start, no limit to wait); ``progress`` /
        ``timeout`` / Ctrl-C: as in :meth:`_run_job`."""
        req = _cconv().build_request_to_proto(name, scorer, items, items_path, anchor_queries, query_log, k_q,
                                           query_seed, dual_encoder, params)
        job = types.job(self._ce_long_call(self._ce_stub().BuildIndex, req, timeout))
        return self._run_job(job, progress, detach or not wait, timeout)

    def ce_add_items(self, index: str, ids, texts, payloads: list | None = None, timeout: float | None = None) -> CeAddResult:
        """Add items (``k_q`` cross-encoder calls each); returns added, calls, seconds, truncated_items."""
        req = cpb.AddCrossEncoderItemsRequest(index=index, items=cc.ce_items(ids, texts, payloads))
        return types.ce_add_result(self._ce_long_call(self._ce_stub().AddItems, req, timeout))

    def ce_delete_items(self, index: str, ids) -> int:
        req = cpb.DeleteCrossEncoderItemsRequest(index=index, ids=cc.ids_to_list(ids))
        return int(self._call(self._ce_stub().DeleteItems, req).deleted)

    _ce_params = staticmethod(cc.ce_params)

    def ce_search(self, index: str, query: str, k: int = 10, mode: str = "", budget: int | None = None,
                  k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None, ridge: float | None = None,
                  with_payloads: bool = False, timeout: float | None = None) -> CeHits:
        """Top-``k`` items for ``query`` within ``budget`` cross-encoder calls (``budget`` None, other
        fields 0 / "": server defaults; an explicit ``budget`` below what the mode needs, 0 included,
        raises InvalidArgument).
        Returns ``ids`` int64 (<= k,), ``scores`` float32 exact CE scores, ``calls``, the server's
        ``scorer_seconds`` / ``other_seconds``, and ``latency_seconds`` measured here (the wire and
        the server's gRPC layer are ``latency - scorer - other``)."""
        req = cpb.CrossEncoderSearchRequest(index=index, query=query, k=k, with_payloads=with_payloads,
                                            params=self._ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        t0 = time.perf_counter()
        resp = self._ce_long_call(self._ce_stub().Search, req, timeout)
        return types.ce_hits(resp, latency_seconds=time.perf_counter() - t0)

    def ce_search_batch(self, index: str, queries: list[str], k: int = 10, mode: str = "", budget: int | None = None,
                        k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None, ridge: float | None = None,
                        with_payloads: bool = False, timeout: float | None = None) -> list[CeHits]:
        """:meth:`ce_search` for several queries in one call (each round is one scorer batch)."""
        req = cpb.CrossEncoderSearchBatchRequest(index=index, queries=list(queries), k=k, with_payloads=with_payloads,
                                                 params=self._ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        return [types.ce_hits(r) for r in self._ce_long_call(self._ce_stub().SearchBatch, req, timeout).results]

    def describe_ce_index(self, index: str) -> CeIndexInfo:
        return types.ce_index_info(self._ce_long_call(self._ce_stub().Describe, cpb.CrossEncoderIndexRef(index=index),
                                                        None))

    def list_ce_indexes(self) -> list[CeIndexInfo]:
        resp = self._ce_long_call(self._ce_stub().ListIndexes, cpb.ListCrossEncoderIndexesRequest(), None)
        return [types.ce_index_info(i) for i in resp.indexes]

    def drop_ce_index(self, index: str) -> None:
        self._call(self._ce_stub().DropIndex, cpb.CrossEncoderIndexRef(index=index))

    def ce_set_anchor_items(self, index: str, k_i: int = 0, anchor_method: str = "", seed: int | None = None) -> CeIndexInfo:
        """Re-choose the anchor items / ``k_i`` and re-solve from the stored scores (no cross-encoder call)."""
        req = _cconv().set_anchor_items_to_proto(index, k_i, anchor_method, seed)
        return types.ce_index_info(self._ce_long_call(self._ce_stub().SetAnchorItems, req, None))
