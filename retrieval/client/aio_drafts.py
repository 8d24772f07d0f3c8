"""The drafts engine of :class:`retrieval.AsyncClient`: the stateless drafts and the datastores
(``draft_session`` is not ported: use :class:`retrieval.Client` in a thread for it)."""

from __future__ import annotations

from retrieval.client import types


class AsyncDraftsMixin:
    """Stateless drafts and datastores: the async twins of :class:`retrieval.client.drafts.DraftsMixin`
    (over :class:`~retrieval.client.aio_transport.AsyncTransport`; job-starting methods wait with ``_run_job``)."""

    # --- drafts (stateless) ------------------------------------------------------------------------
    @staticmethod
    def _budget(max_nodes, max_depth, chain):
        from retrieval.drafting.draft import DraftBudget

        return DraftBudget(max_nodes or 64, max_depth or 10, not chain)

    async def draft(self, context_ids, vocab_size: int, datastore: str | None = None, sources=None,
                    max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *, tokenizer=None):
        """As :meth:`retrieval.Client.draft` (``tokenizer``: an object, a file or a fingerprint)."""
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv

        req = dconv.draft_request_to_proto(context_ids, vocab_size, datastore, sources,
                                           self._budget(max_nodes, max_depth, chain), _fingerprint(tokenizer))
        return dconv.draft_from_proto((await self._call(self._stub("Drafts").Draft, req)).draft)

    async def draft_batch(self, contexts, vocab_size: int, datastore: str | None = None, sources=None,
                          max_nodes: int = 0, max_depth: int = 0, chain: bool = False, *, tokenizer=None) -> list:
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv
        from retrieval.v1 import drafts_pb2

        b = self._budget(max_nodes, max_depth, chain)
        fp = _fingerprint(tokenizer)
        req = drafts_pb2.DraftBatchRequest(
            requests=[dconv.draft_request_to_proto(c, vocab_size, datastore, sources, b, fp) for c in contexts])
        return [dconv.draft_from_proto(r.draft) for r in (await self._call(self._stub("Drafts").DraftBatch, req)).replies]

    async def build_datastore(self, name: str, inputs, tokenizer: str | None = None, vocab_size: int | None = None,
                              input_format: str = "auto", text_fields=None, overwrite: bool = False,
                              wait: bool = True, *, progress: bool | None = None, detach: bool = False,
                              timeout: float | None = None, tokenizer_fingerprint=None) -> dict:
        """As :meth:`retrieval.Client.build_datastore`."""
        from retrieval.client import _fingerprint
        from retrieval.drafting import convert as dconv

        req = dconv.build_request_to_proto(name, inputs, tokenizer, vocab_size, input_format, text_fields, overwrite,
                                           _fingerprint(tokenizer_fingerprint))
        job = types.job(await self._call(self._stub("Drafts").BuildDatastore, req))
        return await self._run_job(job, progress, detach or not wait, timeout)

    async def list_datastores(self) -> list[dict]:
        from retrieval.v1 import drafts_pb2

        resp = await self._call(self._stub("Drafts").ListDatastores, drafts_pb2.ListDatastoresRequest())
        return [types.datastore_info(d) for d in resp.datastores]

    async def describe_datastore(self, name: str) -> dict:
        from retrieval.v1 import drafts_pb2

        return types.datastore_info(await self._call(self._stub("Drafts").DescribeDatastore,
                                                                drafts_pb2.DatastoreRef(name=name)))

    async def drop_datastore(self, name: str) -> None:
        from retrieval.v1 import drafts_pb2

        await self._call(self._stub("Drafts").DropDatastore, drafts_pb2.DatastoreRef(name=name))
