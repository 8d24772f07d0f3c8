"""The Python client: numpy in, numpy out.

    from retrieval import Client

    with Client("127.0.0.1:50051") as c:
        c.create_collection("docs", dimension=128, metric="l2", index={"type": "hnsw", "m": 16})
        c.upsert("docs", ids=np.arange(1000), vectors=xb, payloads=[{"lang": "en"}] * 1000)
        D, I = c.search_batch("docs", xq, k=10, ef=64)          # (nq, k) each
        hits = c.search("docs", xq[0], k=5, filter={"must": [{"key": "lang", "equals": "en"}]},
                        with_payloads=True)

Results follow faiss: ``D`` float32 distances ascending (``inf`` padding), ``I`` int64 ids (``-1``
padding). Ids are uint64 on the wire; ids of 2**63 and above read back negative in the int64 view
(``I.view(np.uint64)`` recovers them).

Errors are raised as :class:`retrieval.errors.RetrievalError` subclasses matching the status
(``InvalidArgument``, ``NotFound``, ...), so client code handles the same exceptions as the server.
Idempotent calls are retried on ``UNAVAILABLE`` (gRPC retry policy, up to 5 attempts with backoff);
every call has a deadline (``timeout`` seconds, default 30). A call the server refused because it was
saturated (``RESOURCE_EXHAUSTED`` with a ``retry-after-ms`` hint: nothing was done) is retried after
the hint, up to ``max_busy_retries`` times within the deadline; limits that retrying cannot help
(``k`` too large, a full collection) raise at once.

Security (see docs/operations.md): ``api_key`` (default: ``$RETRIEVAL_API_KEY``, or the file named by
``api_key_file`` / ``$RETRIEVAL_API_KEY_FILE``) is sent on every call as ``authorization: Bearer``;
``tls=True`` or any of ``root_certificates`` (the server's CA, PEM bytes or a path), ``client_cert`` +
``client_key`` (mutual TLS) connects over TLS::

    Client("db.internal:50051", api_key_file="~/.retrieval/key", root_certificates="ca.pem")

Bad input is refused here, before anything is sent, with ``InvalidArgument`` naming the argument:
ids must be non-negative integers (not ``-1``, ``1.5`` or ``"7"``; pass ids of 2**63 and above as
uint64), and ``k``, ``ef``, ``nprobe``, ``limit`` must fit uint32.

Thread-safety: one Client may be shared by the threads of a web server, and their calls run
concurrently. Every method is a call on the shared ``grpc.Channel`` (thread-safe); single-query
``search`` runs over long-lived bidirectional streams (the lowest latency gRPC offers in Python) from
a pool: a thread takes an idle stream or opens one, up to ``search_streams`` (default 8), and gives it
back after its call; past that, concurrent searches are unary calls. No lock is held across a call.
Measured (``bench/client_threads.py``, BIGANN-10k HNSW, k=10, a loaded 2-core machine): 8 threads on
one Client 1,199 QPS vs 562 for one thread (2.1x); one stream + unary fallback 568, unary only 381.
:meth:`Client.close` while other threads are mid-call ends their calls with ``Cancelled``. A
:class:`DraftSession` (one generation's stream) is used by one thread at a time.

Long work runs as server jobs (FastRP, link-model training, cross-encoder and datastore builds,
``run_job`` for any kind): the method that starts one waits for it with a tqdm bar on stderr driven by
``Jobs.Watch`` (``progress``: None, the default, draws it only when stderr is a terminal), and cancels
the job on the server when the wait is given up (Ctrl-C, its ``timeout``: :class:`JobTimeout`);
``detach=True`` returns the job's record at once and leaves it running.

Results: numpy arrays, :class:`Hits` / :class:`Points`, and for descriptions and job records small
frozen dataclasses (:mod:`retrieval.client.types`: :class:`CollectionInfo`, :class:`JobInfo`,
:class:`GraphInfo`, ...). Read them by attribute (``info.dimension``, ``job.state``): that is the typed
way. Each is also a read-only ``dict`` of its fields, so ``info["dimension"]``, ``"x" in info``,
``dict(info)`` keep working, and ``info.to_dict()`` is a plain, JSON-ready copy.

Shape: the methods are grouped by engine, one module each: :mod:`~retrieval.client.vectors`
(collections, points, search), :mod:`~retrieval.client.jobs`, :mod:`~retrieval.client.drafts`,
:mod:`~retrieval.client.crossencoder`, :mod:`~retrieval.client.graphs`, over one
:class:`~retrieval.client.transport.Transport` (channel, deadlines, busy retries, error mapping: one
path for every call). :class:`Client` is composed of them; every method is available flat
(``client.search``) and under its engine (``client.vectors.search``, ``client.graphs.create_graph``).

For asyncio applications, :class:`retrieval.AsyncClient` (:mod:`retrieval.aio`) has the same methods
as coroutines, built on the same request builders and
parsers (:mod:`retrieval.client_convert`) and the same result types.
"""

from __future__ import annotations

import os

import grpc

from retrieval import client_convert as cc
from retrieval.client.crossencoder import CrossEncoderMixin
from retrieval.client.drafts import DraftSession, DraftsMixin, _fingerprint
from retrieval.client.graphs import GraphsMixin
from retrieval.client.jobs import JobsMixin
from retrieval.client.streams import _Requests, _Stream, _StreamPool
from retrieval.client.transport import EngineView, Transport, _Details, _KeyInterceptor, engine, make_channel
from retrieval.client.types import (
    AppendEdgesResult,
    CeAddResult,
    CeHits,
    CeIndexInfo,
    CollectionInfo,
    DatastoreInfo,
    DegreeStats,
    GraphInfo,
    JobInfo,
    JobKind,
    PayloadIndexInfo,
    Record,
    ShardInfo,
)
from retrieval.client.vectors import VectorsMixin
from retrieval.client_convert import Hits, JobTimeout, Points  # re-exported: retrieval.client.Hits

# the shared helpers under their historical names
_CODES = cc.CODES
_SERVICE_CONFIG = cc.SERVICE_CONFIG
_retry_after_s = cc.retry_after_s
_pem = cc.pem
_read_key = cc.read_key
_raise = cc.raise_rpc
_payloads_out = cc.payloads_out
_payloads_in = cc.payloads_in
_filter = cc.filter_to_proto
_index_spec = cc.index_spec


class Client(VectorsMixin, JobsMixin, DraftsMixin, CrossEncoderMixin, GraphsMixin, Transport):
    """A connection to one server; see the module docstring.

    ``timeout``: seconds per call (default 30); ``max_busy_retries``: retries of a call the saturated
    server refused with a retry-after hint; ``search_streams``: at most this many search streams open
    at once (one per thread calling :meth:`search` concurrently; past that, concurrent searches are
    unary calls on the shared channel; 0: unary calls only).

    Thread-safety: one Client may be shared by any number of threads and its calls run concurrently:
    every method is a call on the shared ``grpc.Channel`` (thread-safe) or on a search stream taken
    from the pool for the length of one call; no lock is held across a call. :meth:`close` may be
    called while other threads are mid-call: their calls end with :class:`errors.Cancelled`.
    A :class:`DraftSession` is one generation's stream and is used by one thread at a time.

    Engines: ``client.vectors``, ``client.jobs``, ``client.drafts``, ``client.crossencoder``,
    ``client.graphs`` hold the same methods as the flat names, grouped.
    """

    vectors = engine(VectorsMixin)
    jobs = engine(JobsMixin)
    drafts = engine(DraftsMixin)
    crossencoder = engine(CrossEncoderMixin)
    graphs = engine(GraphsMixin)

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024, channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, api_key_file: str | os.PathLike | None = None,
                 tls: bool | None = None, root_certificates: bytes | str | os.PathLike | None = None,
                 client_cert: bytes | str | os.PathLike | None = None,
                 client_key: bytes | str | os.PathLike | None = None, server_name: str | None = None,
                 max_busy_retries: int = 5, search_streams: int = 8) -> None:
        super().__init__(address, timeout, max_message_bytes, channel, api_key=api_key, api_key_file=api_key_file,
                         tls=tls, root_certificates=root_certificates, client_cert=client_cert,
                         client_key=client_key, server_name=server_name, max_busy_retries=max_busy_retries)
        self._pool = _StreamPool(self._search, search_streams)

    def close(self) -> None:
        """Close the streams and the channel. Idempotent; calls in flight in other threads end with
        :class:`errors.Cancelled`, later calls raise it at once."""
        self._closed = True
        self._pool.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __repr__(self) -> str:
        return f"Client({self.address!r})"


__all__ = [
    "AppendEdgesResult", "CeAddResult", "CeHits", "CeIndexInfo", "Client", "CollectionInfo", "DatastoreInfo",
    "DegreeStats", "DraftSession", "EngineView", "GraphInfo", "Hits", "JobInfo", "JobKind", "JobTimeout",
    "PayloadIndexInfo", "Points", "Record", "ShardInfo", "Transport", "make_channel",
]
# kept importable for older code and the benches: the internals under their historical names
_INTERNAL = (_Details, _KeyInterceptor, _Requests, _Stream, _fingerprint)
