"""The cross-encoder k-NN engine of :class:`retrieval.AsyncClient`."""

from __future__ import annotations

import time

from retrieval import client_convert as cc
from retrieval.client import types


class AsyncCrossEncoderMixin:
    """Cross-encoder indexes: the async twins of :class:`retrieval.client.crossencoder.CrossEncoderMixin`
    (over :class:`~retrieval.client.aio_transport.AsyncTransport`; job-starting methods wait with ``_run_job``)."""

    # --- cross-encoder k-NN ------------------------------------------------------------------------
    async def _ce_long_call(self, name: str, request, timeout: float | None):
        fn = getattr(self._stub("CrossEncoder"), name)
        return await self._call(fn, request, timeout if timeout is not None else max(self.timeout, 600.0))

    async def build_ce_index(self, name: str, scorer: dict, items: list[dict] | None = None,
                             items_path: str | None = None, anchor_queries: list[str] | None = None,
                             query_log: list[str] | None = None, k_q: int | None = None, query_seed: int = 0,
                             dual_encoder: dict | None = None, params: dict | None = None, wait: bool = True,
                             timeout: float | None = None, *, progress: bool | None = None,
                             detach: bool = False) -> dict:
        """As :meth:`retrieval.Client.build_ce_index`."""
        from retrieval.crossencoder import convert as cconv

        req = cconv.build_request_to_proto(name, scorer, items, items_path, anchor_queries, query_log, k_q,
                                           query_seed, dual_encoder, params)
        job = types.job(await self._ce_long_call("BuildIndex", req, timeout))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def ce_add_items(self, index: str, ids, texts, payloads: list | None = None,
                           timeout: float | None = None) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.AddCrossEncoderItemsRequest(index=index, items=cc.ce_items(ids, texts, payloads))
        return types.ce_add_result(await self._ce_long_call("AddItems", req, timeout))

    async def ce_delete_items(self, index: str, ids) -> int:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cpb.DeleteCrossEncoderItemsRequest(index=index, ids=cc.ids_to_list(ids))
        return int((await self._call(self._stub("CrossEncoder").DeleteItems, req)).deleted)

    async def ce_search(self, index: str, query: str, k: int = 10, mode: str = "", budget: int | None = None,
                        k_i: int = 0, rounds: int = 0, seed_fraction: float | None = None,
                        ridge: float | None = None, with_payloads: bool = False,
                        timeout: float | None = None) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cc.message(cpb.CrossEncoderSearchRequest, index=index, query=query, k=k, with_payloads=with_payloads,
                         params=cc.ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        t0 = time.perf_counter()
        resp = await self._ce_long_call("Search", req, timeout)
        return types.ce_hits(resp, latency_seconds=time.perf_counter() - t0)

    async def ce_search_batch(self, index: str, queries: list[str], k: int = 10, mode: str = "",
                              budget: int | None = None, k_i: int = 0, rounds: int = 0,
                              seed_fraction: float | None = None, ridge: float | None = None,
                              with_payloads: bool = False, timeout: float | None = None) -> list[dict]:
        from retrieval.v1 import crossencoder_pb2 as cpb

        req = cc.message(cpb.CrossEncoderSearchBatchRequest, index=index, queries=list(queries), k=k,
                         with_payloads=with_payloads,
                         params=cc.ce_params(mode, budget, k_i, rounds, seed_fraction, ridge))
        return [types.ce_hits(r) for r in (await self._ce_long_call("SearchBatch", req, timeout)).results]

    async def describe_ce_index(self, index: str) -> dict:
        from retrieval.v1 import crossencoder_pb2 as cpb

        return types.ce_index_info(await self._ce_long_call("Describe", cpb.CrossEncoderIndexRef(index=index), None))

    async def list_ce_indexes(self) -> list[dict]:
        from retrieval.v1 import crossencoder_pb2 as cpb

        resp = await self._ce_long_call("ListIndexes", cpb.ListCrossEncoderIndexesRequest(), None)
        return [types.ce_index_info(i) for i in resp.indexes]

    async def drop_ce_index(self, index: str) -> None:
        from retrieval.v1 import crossencoder_pb2 as cpb

        await self._call(self._stub("CrossEncoder").DropIndex, cpb.CrossEncoderIndexRef(index=index))

    async def ce_set_anchor_items(self, index: str, k_i: int = 0, anchor_method: str = "",
                                  seed: int | None = None) -> dict:
        from retrieval.crossencoder import convert as cconv

        req = cconv.set_anchor_items_to_proto(index, k_i, anchor_method, seed)
        return types.ce_index_info(await self._ce_long_call("SetAnchorItems", req, None))
