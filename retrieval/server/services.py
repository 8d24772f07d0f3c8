"""The services one server hosts, and the context they share.

Adding an engine's gRPC service: write a class with ``service_names`` and async ``start``/``stop``
(see :class:`Service`) and add a factory for it to :data:`SERVICES`. ``start`` registers servicers on
the server and may use ``ctx.collections`` (vector collections), ``ctx.jobs`` (the job manager) and
``ctx.data_dir`` (a folder of its own: ``ctx.data_dir / <engine>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import grpc

if TYPE_CHECKING:
    from retrieval.config import Settings
    from retrieval.jobs.manager import JobManager
    from retrieval.vectors.collection import CollectionManager


@dataclass
class ServerContext:
    settings: "Settings"
    data_dir: Path
    collections: "CollectionManager"
    jobs: "JobManager"                     # register job kinds in start(); opened after every start()
    extras: dict[str, Any] = field(default_factory=dict)


class Service(Protocol):
    #: full proto service names, e.g. ("retrieval.v1.Search",), for health checking and reflection
    service_names: tuple[str, ...]

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None: ...

    async def stop(self) -> None: ...


class VectorsService:
    service_names = ("retrieval.v1.Collections", "retrieval.v1.Points", "retrieval.v1.Search")

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None:
        from retrieval.server.vectors_servicer import CollectionsServicer, PointsServicer, SearchServicer
        from retrieval.v1 import collections_pb2_grpc, points_pb2_grpc, search_pb2_grpc

        collections_pb2_grpc.add_CollectionsServicer_to_server(
            CollectionsServicer(ctx.collections, ctx.settings, ctx.data_dir), server)
        points_pb2_grpc.add_PointsServicer_to_server(PointsServicer(ctx.collections), server)
        search_pb2_grpc.add_SearchServicer_to_server(
            SearchServicer(ctx.collections, ctx.settings.limits.max_message_bytes), server)
        from retrieval import plugins  # job kinds of installed plugins (index_builder: `build_index`)

        for kind in plugins.job_kinds(ctx):
            ctx.jobs.register(kind)

    async def stop(self) -> None:
        pass


class JobsService:
    """The Jobs service. Its manager is created by the server before any service starts (so every
    service can register job kinds in ``start``) and opened after all of them started."""

    service_names = ("retrieval.v1.Jobs",)

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None:
        from retrieval.server.jobs_servicer import JobsServicer
        from retrieval.v1 import jobs_pb2_grpc

        jobs_pb2_grpc.add_JobsServicer_to_server(JobsServicer(ctx.jobs), server)

    async def stop(self) -> None:
        pass


class DraftsService:
    """N-gram draft lookups (``retrieval.drafting``): sessions, stateless drafts, datastores under
    ``<data_dir>/drafting``. Draft sessions idle for ``drafts.idle_timeout_s`` (default 300) are evicted."""

    service_names = ("retrieval.v1.Drafts",)

    def __init__(self) -> None:
        self._sweeper = None

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None:
        from retrieval.server.drafts_servicer import register

        engine, self._sweeper = register(server, ctx, ctx.settings.drafts.idle_timeout_s)
        ctx.extras["drafts"] = engine

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class CrossEncoderService:
    """Cross-encoder k-NN search (``retrieval.crossencoder``): named CUR / adaptive indexes under
    ``<data_dir>/crossencoder``; building one is the job kind ``crossencoder_build``."""

    service_names = ("retrieval.v1.CrossEncoder",)

    def __init__(self) -> None:
        self.engine = None

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None:
        from retrieval.server.crossencoder_servicer import register

        self.engine = register(server, ctx)
        ctx.extras["crossencoder"] = self.engine

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()


class GraphsService:
    """Graph retrieval (``retrieval.graph``): named graphs under ``<data_dir>/graphs``; FastRP (job kind
    ``fastrp``, embeddings indexed into a vector collection) and NCN / NCNC link models (job kind
    ``link_model_train``)."""

    service_names = ("retrieval.v1.Graphs",)

    def __init__(self) -> None:
        self.engine = None

    async def start(self, server: grpc.aio.Server, ctx: ServerContext) -> None:
        from retrieval.server.graphs_servicer import register

        self.engine = register(server, ctx)
        ctx.extras["graphs"] = self.engine

    async def stop(self) -> None:
        pass


#: Factories of every service the server hosts, in start order.
SERVICES: list[Callable[[], Service]] = [VectorsService, JobsService, DraftsService, CrossEncoderService,
                                         GraphsService]
