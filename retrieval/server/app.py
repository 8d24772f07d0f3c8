"""The server: grpc.aio, health checking, reflection, interceptors, graceful shutdown.

``serve(settings)`` runs until SIGTERM / SIGINT (or ``stop`` is set): it then reports NOT_SERVING,
gives in-flight calls ``grace_s`` seconds, stops the services and closes the collections (writing
final index snapshots). Only one server may use a data folder at a time (an exclusive lock file).

Before opening anything it checks its security settings (:func:`retrieval.server.auth.check_startup`):
a server reachable from other machines refuses to start without an API key. Every RPC passes the
:class:`retrieval.server.interceptors.CallInterceptor` (keys, limits, metrics, errors, request ids);
Prometheus metrics are served on ``metrics_port`` when set. docs/operations.md describes production use.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retrieval import crashes, jsonlimits
from retrieval.config import Settings
from retrieval.core import extras
from retrieval.core.net import bind_address, unbracket
from retrieval.errors import FailedPrecondition
from retrieval.jobs.manager import JobManager
from retrieval.server import auth, metrics
from retrieval.server.interceptors import CallInterceptor, JsonFormatter, RequestContextFilter, TextFormatter
from retrieval.server.limits import Admission
from retrieval.server.services import SERVICES, ServerContext
from retrieval.vectors.collection import CollectionManager, Limits
from retrieval.vectors.shard import ShardSettings

logger = logging.getLogger(__name__)


def _lock_data_dir(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FailedPrecondition(f"data folder {data_dir} is in use by {holder}; "
                                 "stop that server or choose another --data-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _cap_memory(nbytes: int) -> None:
    """RLIMIT_DATA: allocations past ``nbytes`` raise MemoryError (answered RESOURCE_EXHAUSTED) instead of
    the kernel's OOM killer ending the process."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    logger.info("heap capped at %.1f GiB (limits.max_memory_bytes)", cap / 2**30)


class HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer (Check, Watch) plus ``List``, which grpcio-health-checking leaves
    unimplemented: the status of every service this server reports."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._final = False

    async def set(self, service: str, status) -> None:
        if not self._final:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        if not self._final:
            self._final = True
            self._statuses = {name: health_pb2.HealthCheckResponse.NOT_SERVING for name in self._statuses}
        await super().enter_graceful_shutdown()

    def statuses(self) -> dict[str, int]:
        """The status of every service this server reports (``""``: the whole server), for the HTTP API."""
        return dict(self._statuses)

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in sorted(self._statuses.items())})


def shard_settings(s: Settings) -> ShardSettings:
    return ShardSettings(index_threads=s.indexing.threads, synchronous=s.durability,
                         snapshot_every=s.indexing.snapshot_every, snapshot_interval_s=s.indexing.snapshot_interval_s,
                         filter_exact_threshold=s.indexing.filter_exact_threshold, indexer_slice_ms=s.indexing.slice_ms,
                         filter_exact_in_memory=s.indexing.filter_exact_in_memory,
                         search_threads=s.indexing.search_threads,
                         coalesce_max_queries=s.indexing.coalesce_max_queries)


def limits(s: Settings) -> Limits:
    lim = s.limits
    return Limits(max_k=lim.max_k, max_batch=lim.max_batch, max_payload_bytes=lim.max_payload_bytes,
                  max_ef=lim.max_ef, max_scroll=lim.max_scroll, max_points=lim.max_points_per_collection,
                  max_pending_bytes=lim.max_pending_bytes, retry_after_ms=lim.retry_after_ms,
                  search_chunk=lim.search_chunk)


async def serve(settings: Settings, stop: asyncio.Event | None = None, on_ready=None) -> None:
    """Run the server until ``stop`` is set or a SIGTERM / SIGINT arrives.

    Every resource is entered into one :class:`contextlib.AsyncExitStack` as it is acquired, so a
    failure at any step of the start (a port in use, a service that cannot start) and the normal
    shutdown release the same things in reverse order: gRPC and HTTP stop taking calls, the services
    stop, jobs are cancelled, collections are closed, the data folder is unlocked."""
    keys = auth.KeyStore.from_settings(settings.security)
    auth.check_startup(settings, keys)
    if settings.http_port is not None and extras.missing("http"):
        raise FailedPrecondition(f"--http-port (the HTTP API and dashboard) needs the [http] extra: "
                                 f"{extras.pip_command('http')}")
    if settings.limits.max_memory_bytes:
        _cap_memory(settings.limits.max_memory_bytes)
    credentials = auth.server_credentials(settings.security)
    jsonlimits.set_max_depth(settings.limits.max_json_depth)
    data_dir = Path(settings.data_dir).resolve()
    from retrieval.vectors.ray_shards import factory_from_settings

    shard_factory = factory_from_settings(settings)  # None: shards in process; else Ray actors (--ray)
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_lock_data_dir(data_dir).close)
        crashes.arm(data_dir)  # record a native abort; keep the last run's (quarantine, see vectors.collection)
        ctx, admission = await _open_context(settings, data_dir, shard_factory, stack)
        server = grpc.aio.server(
            interceptors=[CallInterceptor(settings.access_log, auth.Authenticator(keys), admission)],
            options=[("grpc.max_receive_message_length", settings.limits.max_message_bytes),
                     ("grpc.max_send_message_length", settings.limits.max_message_bytes),
                     ("grpc.so_reuseport", 0)],
        )
        names = await _start_services(server, ctx, stack)
        await ctx.jobs.open()  # after every service registered its job kinds: resumes interrupted jobs
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = bind_address(settings.host, settings.port)
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as e:
            raise FailedPrecondition(f"cannot listen on {address}: {e}") from None
        _start_metrics(settings, stack)
        if settings.http_port is not None:  # the HTTP/JSON API and dashboard, on this loop (retrieval.http)
            from retrieval.http.server import HttpServer

            http = HttpServer(ctx, auth.Authenticator(keys), admission, health_servicer.statuses)
            await http.start()
            stack.push_async_callback(http.stop, settings.grace_s)
            print(f"retrieval: HTTP API and dashboard on {http.url}/", flush=True)
        refresher = asyncio.create_task(metrics.refresh_forever(ctx.collections, ctx.jobs, admission))
        stack.callback(refresher.cancel)
        await server.start()
        stack.push_async_callback(server.stop, settings.grace_s)
        # first on the way out: NOT_SERVING to every Check, Watch and List
        stack.push_async_callback(health_servicer.enter_graceful_shutdown)
        stack.callback(logger.info, "shutting down (grace %.1f s)", settings.grace_s)
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        bound = bind_address(settings.host, port)
        logger.info("serving on %s (%s, %s), data folder %s", bound, "TLS" if credentials else "plaintext",
                    f"{len(keys)} API keys" if keys.enabled else "no API keys", data_dir)
        print(f"retrieval: serving on {bound} (data folder {data_dir})", flush=True)
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
    logger.info("stopped")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass


async def _open_context(settings: Settings, data_dir: Path, shard_factory,
                        stack: contextlib.AsyncExitStack) -> tuple[ServerContext, Admission]:
    """The collections (opened) and the job manager (opened later, after the services registered their
    job kinds) every service shares."""
    ctx = ServerContext(settings=settings, data_dir=data_dir,
                        collections=CollectionManager(data_dir, shard_settings(settings), limits(settings),
                                                      shard_factory),
                        jobs=JobManager(data_dir, max_concurrent=settings.max_concurrent_jobs))
    await ctx.collections.open()
    stack.push_async_callback(ctx.collections.close)
    stack.push_async_callback(ctx.jobs.close)
    admission = Admission.from_settings(settings.limits, on_reject=lambda r: metrics.REJECTED.labels(r).inc())
    ctx.extras["admission"] = admission
    return ctx, admission


async def _start_services(server: grpc.aio.Server, ctx: ServerContext,
                          stack: contextlib.AsyncExitStack) -> list[str]:
    names: list[str] = []
    for factory in SERVICES:
        svc = factory()
        await svc.start(server, ctx)
        stack.push_async_callback(_stop_service, svc)
        names.extend(svc.service_names)
    return names


async def _stop_service(svc) -> None:
    try:
        await svc.stop()
    except Exception:
        logger.exception("stopping %s failed", type(svc).__name__)


def _start_metrics(settings: Settings, stack: contextlib.AsyncExitStack) -> None:
    """The Prometheus endpoint (``metrics_port``; None: off)."""
    if settings.metrics_port is None:
        return
    try:
        httpd, mport = metrics.start_http(settings.metrics_port, unbracket(settings.metrics_host), settings.security)
    except OSError as e:
        raise FailedPrecondition(f"cannot serve metrics on "
                                 f"{bind_address(settings.metrics_host, settings.metrics_port)}: {e}") from None
    stack.callback(httpd.server_close)
    stack.callback(httpd.shutdown)
    scheme = "https" if settings.security.tls_cert_file else "http"
    if not auth.is_loopback(settings.metrics_host):
        logger.warning("metrics are served on %s, reachable from other machines (no API key protects them)",
                       settings.metrics_host)
    print(f"retrieval: metrics on {scheme}://{bind_address(settings.metrics_host, mport)}/metrics", flush=True)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr; ``fmt`` "json" writes one JSON object per line. Every record carries the request
    id of the call that logged it (``request_id``; "" outside calls)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def run(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
