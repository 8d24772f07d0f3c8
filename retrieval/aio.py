"""The asyncio client: :class:`AsyncClient`, the same methods and results as :class:`retrieval.Client`
over ``grpc.aio``.

    import asyncio
    from retrieval import AsyncClient

    async def main():
        async with AsyncClient("127.0.0.1:50051") as c:
            hits = await c.search("docs", q, k=5)                       # Hits(ids, distances, ...)
            many = await asyncio.gather(*(c.search("docs", x, k=5) for x in xq))
            D, I = await c.search_batch("docs", xq, k=10)

    asyncio.run(main())

Requests and responses go through the same builders and parsers as :class:`retrieval.Client`
(:mod:`retrieval.client_convert`), so both return the same types (:class:`Hits`, :class:`Points`,
dicts, numpy arrays) and raise the same :mod:`retrieval.errors` exceptions for the same status; the
same options (``api_key`` / ``api_key_file`` / ``$RETRIEVAL_API_KEY``, TLS, ``timeout``, the
``UNAVAILABLE`` retry policy, ``max_busy_retries``) mean the same. Single-query :meth:`search` is a
unary call (in ``grpc.aio`` concurrent unary calls multiplex on the one connection; a stream would
serialise them).
"""

from __future__ import annotations

import logging

from retrieval.client.aio_crossencoder import AsyncCrossEncoderMixin
from retrieval.client.aio_drafts import AsyncDraftsMixin
from retrieval.client.aio_graphs import AsyncGraphsMixin
from retrieval.client.aio_jobs import AsyncJobsMixin
from retrieval.client.aio_transport import AsyncTransport, make_aio_channel
from retrieval.client.aio_vectors import AsyncVectorsMixin
from retrieval.client.transport import engine
from retrieval.client_convert import Hits, JobTimeout, Points

log = logging.getLogger(__name__)


class AsyncClient(AsyncVectorsMixin, AsyncJobsMixin, AsyncDraftsMixin, AsyncCrossEncoderMixin, AsyncGraphsMixin,
                  AsyncTransport):
    """An asyncio connection to one server: ``async with AsyncClient(address) as c: await c.search(...)``.

    Same constructor arguments as :class:`retrieval.Client` (``search_streams`` aside: searches are
    unary calls). Every method is a coroutine returning what the :class:`~retrieval.Client` method
    of the same name returns, except :meth:`watch_job`, an async iterator.

    Concurrency: one AsyncClient serves any number of concurrent tasks of its event loop
    (``asyncio.gather``); create and use it inside one loop. :meth:`close` while calls are in flight
    ends them with :class:`errors.Cancelled`.

    Ported: collections (payload indexes too), points (``upsert_stream`` takes a sync or async iterable), search,
    search_batch, jobs (``watch_job`` is an async iterator), graphs, cross-encoder k-NN and the
    stateless drafts (``draft``, ``draft_batch``, datastores). Not ported: ``draft_session`` (one
    generation's bidirectional stream; use :class:`retrieval.Client` in a thread for it).

    Engines: ``client.vectors``, ``client.jobs``, ``client.drafts``, ``client.crossencoder``,
    ``client.graphs`` hold the same methods as the flat names, grouped.
    """

    vectors = engine(AsyncVectorsMixin)
    jobs = engine(AsyncJobsMixin)
    drafts = engine(AsyncDraftsMixin)
    crossencoder = engine(AsyncCrossEncoderMixin)
    graphs = engine(AsyncGraphsMixin)

    def __repr__(self) -> str:
        return f"AsyncClient({self.address!r})"


__all__ = ["AsyncClient", "Hits", "JobTimeout", "Points", "make_aio_channel"]
