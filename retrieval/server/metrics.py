"""Prometheus metrics: per-RPC counters and latency histograms (from the interceptor, so every service
gets them), backpressure, collections, jobs, and gauges that services own.

Served over HTTP by :func:`start_http` when ``metrics_port`` is set (off by default; on
``metrics_host``, 127.0.0.1 by default; over TLS with the server's certificate when it has one).

Per RPC (labels ``service``, ``method``; ``code`` = gRPC status name)::

    retrieval_requests_total{service,method,code}         calls finished
    retrieval_request_errors_total{service,method,code}    calls finished with a status other than OK
    retrieval_request_duration_seconds{service,method}     histogram, whole call (a stream: its lifetime)
    retrieval_stream_message_duration_seconds{service,method}  histogram, request -> next response on
                                                           bidirectional streams (e.g. one search)
    retrieval_inflight{kind}                               unary / streams / sessions / write_bytes
    retrieval_open_streams{service,method}                 streams open now (Drafts/Session: draft sessions)
    retrieval_rejected_total{reason}                       RESOURCE_EXHAUSTED from backpressure

State, refreshed every ``REFRESH_S`` seconds on the event loop::

    retrieval_collection_points{collection}          live points (indexed + pending)
    retrieval_collection_indexed_points{collection}  / retrieval_collection_pending_points{collection}
    retrieval_collection_memory_bytes{collection}    / retrieval_collection_ready{collection} (1 ready)
    retrieval_collections{state}                     collections by state: served / quarantined / unavailable
    retrieval_collection_unserved{collection,state}  1 per collection held but not served (quarantined,
                                                     unavailable), so an alert can name it
    retrieval_jobs{state}                            jobs by state
    retrieval_job_progress_ratio{job,kind}           done / total of running jobs

Services add their own with :func:`gauge` / :func:`counter` / :func:`histogram` (get-or-create, so a
service restarting in tests does not register twice) and :func:`add_refresher` for values read from
their state on the event loop, e.g. the drafts service (``retrieval.server.drafts_servicer.register``)::

    from retrieval.server import metrics
    sessions = metrics.gauge("retrieval_draft_sessions", "draft sessions open (all tokenizers)")
    metrics.add_refresher(lambda: sessions.set(engine.open_sessions()))

Drafts (exported by the drafts service)::

    retrieval_draft_sessions             draft sessions open (all tokenizers)
    retrieval_draft_session_bytes        their memory (Session.nbytes summed), bytes
    retrieval_draft_session_max_bytes    the largest open session, bytes
    retrieval_draft_state_slots          per-tokenizer state slots held (recycling, history, calibration)

Thread-safety: prometheus_client metrics are thread-safe; refreshers run on the event loop, so they may
read engine state that is only safe to touch there; the HTTP thread only reads finished values.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

REFRESH_S = 2.0
REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_made: dict[str, object] = {}


def _get_or_create(cls, name: str, documentation: str, labelnames=(), **kw):
    m = _made.get(name)
    if m is None:
        m = cls(name, documentation, labelnames=tuple(labelnames), registry=REGISTRY, **kw)
        _made[name] = m
    elif not isinstance(m, cls):
        raise ValueError(f"metric {name!r} already exists as a {type(m).__name__}")
    return m


def gauge(name: str, documentation: str, labelnames=()) -> Gauge:
    """A gauge in the server's registry (created once; later calls return the same one)."""
    return _get_or_create(Gauge, name, documentation, labelnames)


def counter(name: str, documentation: str, labelnames=()) -> Counter:
    return _get_or_create(Counter, name, documentation, labelnames)


def histogram(name: str, documentation: str, labelnames=(), buckets=_LATENCY_BUCKETS) -> Histogram:
    return _get_or_create(Histogram, name, documentation, labelnames, buckets=buckets)


REQUESTS = counter("retrieval_requests_total", "RPCs finished", ("service", "method", "code"))
ERRORS = counter("retrieval_request_errors_total", "RPCs finished with a status other than OK",
                 ("service", "method", "code"))
LATENCY = histogram("retrieval_request_duration_seconds", "RPC duration (a stream: its lifetime)",
                    ("service", "method"))
STREAM_MESSAGE_LATENCY = histogram("retrieval_stream_message_duration_seconds",
                                   "bidirectional streams: time from a request to the next response",
                                   ("service", "method"))
INFLIGHT = gauge("retrieval_inflight", "calls and write bytes in flight", ("kind",))
OPEN_STREAMS = gauge("retrieval_open_streams", "streaming calls open (e.g. Drafts/Session: draft sessions)",
                     ("service", "method"))
REJECTED = counter("retrieval_rejected_total", "calls refused with RESOURCE_EXHAUSTED by backpressure", ("reason",))

_refreshers: list[Callable[[], None]] = []


def add_refresher(fn: Callable[[], None]) -> None:
    """Call ``fn()`` on the event loop every REFRESH_S seconds (and before each status summary)."""
    _refreshers.append(fn)


def remove_refresher(fn: Callable[[], None]) -> None:
    if fn in _refreshers:
        _refreshers.remove(fn)


class _StateCollector:
    """Collection and job gauges, built on the event loop and handed to the HTTP thread whole."""

    def __init__(self) -> None:
        self.families: list = []

    def collect(self):
        return list(self.families)

    def describe(self):
        return []


_STATE = _StateCollector()
REGISTRY.register(_STATE)


async def snapshot_state(collections=None, jobs=None) -> None:
    """Rebuild the collection and job gauges from the managers (call on the event loop)."""
    fams = []
    if collections is not None:
        from retrieval.vectors.collection import QUARANTINED, UNAVAILABLE

        pts = GaugeMetricFamily("retrieval_collection_points", "live points (indexed + pending)", labels=["collection"])
        idx = GaugeMetricFamily("retrieval_collection_indexed_points", "live points in the index", labels=["collection"])
        pend = GaugeMetricFamily("retrieval_collection_pending_points", "acknowledged points not yet indexed "
                                 "(searched exactly)", labels=["collection"])
        mem = GaugeMetricFamily("retrieval_collection_memory_bytes", "index + pending buffer, estimated",
                                labels=["collection"])
        ready = GaugeMetricFamily("retrieval_collection_ready", "1 when every shard is ready", labels=["collection"])
        for col in collections.list():
            infos = await asyncio.gather(*(s.ainfo() for s in col.shards))
            n_idx = sum(i["indexed"] for i in infos)
            n_pend = sum(i["pending"] for i in infos)
            pts.add_metric([col.name], n_idx + n_pend)
            idx.add_metric([col.name], n_idx)
            pend.add_metric([col.name], n_pend)
            mem.add_metric([col.name], sum(i["memory_bytes"] for i in infos))
            ready.add_metric([col.name], float(all(i["state"] == "ready" for i in infos)))
        by_state = GaugeMetricFamily("retrieval_collections", "collections by state: served, quarantined (its "
                                     "open killed the server; waits for repair or drop), unavailable (could "
                                     "not be opened; retried in the background)", labels=["state"])
        unserved = GaugeMetricFamily("retrieval_collection_unserved", "1 for each collection held but not "
                                     "served, with its state", labels=["collection", "state"])
        counts = {"served": len(collections.list()), QUARANTINED: 0, UNAVAILABLE: 0}
        for u in collections.unserved():
            counts[u.state] = counts.get(u.state, 0) + 1
            unserved.add_metric([u.name, u.state], 1)
        for state, n in counts.items():
            by_state.add_metric([state], n)
        fams += [pts, idx, pend, mem, ready, by_state, unserved]
    if jobs is not None:
        by_state = GaugeMetricFamily("retrieval_jobs", "jobs by state", labels=["state"])
        prog = GaugeMetricFamily("retrieval_job_progress_ratio", "done / total of running jobs", labels=["job", "kind"])
        counts: dict[str, int] = {}
        for rec in jobs.list():
            counts[rec.state] = counts.get(rec.state, 0) + 1
            if rec.state == "running":
                prog.add_metric([rec.id, rec.kind], (rec.done / rec.total) if rec.total else 0.0)
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            by_state.add_metric([state], counts.get(state, 0))
        fams += [by_state, prog]
    _STATE.families = fams


async def refresh(collections=None, jobs=None, admission=None) -> None:
    """Run every refresher and rebuild the state gauges (event loop)."""
    try:
        await snapshot_state(collections, jobs)
    except Exception:
        logger.exception("refreshing collection / job metrics failed")
    if admission is not None:
        c = admission.now
        INFLIGHT.labels("unary").set(c.unary)
        INFLIGHT.labels("streams").set(c.streams)
        INFLIGHT.labels("sessions").set(c.sessions)
        INFLIGHT.labels("write_bytes").set(c.write_bytes)
    for fn in list(_refreshers):
        try:
            fn()
        except Exception:
            logger.exception("metrics refresher %r failed", fn)


async def refresh_forever(collections, jobs, admission, interval: float = REFRESH_S) -> None:
    while True:
        await refresh(collections, jobs, admission)
        await asyncio.sleep(interval)


def start_http(port: int, host: str, security=None):
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns ``(httpd, bound_port)``."""
    from prometheus_client import start_http_server

    kw = {}
    if security is not None and security.tls_cert_file is not None:
        kw = dict(certfile=str(security.tls_cert_file), keyfile=str(security.tls_key_file))
        if security.tls_client_ca_file is not None:
            kw.update(client_cafile=str(security.tls_client_ca_file), client_auth_required=True)
    httpd, _thread = start_http_server(port, addr=host, registry=REGISTRY, **kw)
    return httpd, httpd.server_address[1]


def render() -> str:
    """The current metrics in the Prometheus text format."""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()
