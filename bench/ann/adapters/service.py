"""Our retrieval service end to end: a real server process, reached over gRPC by the Python client.

Each adapter instance starts its own server (``python -m retrieval serve --port 0`` on 127.0.0.1, a
temporary data folder, through :class:`retrieval.server.process.ServerProcess`) when it is created, so
server start-up is not counted as build time. ``fit`` creates a collection, bulk-loads the base over
one ``UpsertStream`` and waits until every point is in the index: ``build_s`` is what a user waits
between the first upsert and the moment every point is served from the index (durable writes
included). ``close`` stops the server (SIGTERM) and deletes the folder.

Queries go through :class:`retrieval.Client`: ``query`` is ``Client.search`` (one query per call, on the
client's long-lived ``SearchStream``), ``batch_query`` is ``Client.search_batch`` (``SearchBatch``, one
unary call). The server gets ``threads`` for indexing and batch search (``RETRIEVAL_INDEXING__THREADS``
and ``OMP_NUM_THREADS``), like the in-process baselines.

=======================  ===========================================  ====================
name                     collection index (build settings)            query settings
=======================  ===========================================  ====================
``service-hnsw``         ``{"type": "hnsw", "m": M, "ef_construction"}``  ``ef``
``service-faiss-hnsw``   faiss ``HNSW{M}`` with ``ef_construction``      ``ef``
``service-ivf-flat``     faiss ``IVF{nlist},Flat`` (nlist auto)         ``nprobe``
                         ``train_size`` = n: trained on the whole base
``service-ivfpq``        faiss ``IVF{nlist},PQ{m}x{nbits}np``           ``nprobe``
                         ``train_size`` = n
``service-exact``        ``exact``                                      —
=======================  ===========================================  ====================

Memory: ``index_bytes`` is the server's own estimate (``memory_bytes`` of the collection);
``rss_delta_bytes`` is the growth of the server process's RSS over ``fit`` (points store, index, caches).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.ann.adapters import register
from bench.ann.adapters.base import Algorithm
from bench.ann.adapters.faiss_ import NPROBE_SWEEP, auto_nlist, auto_pq_m
from bench.ann.adapters.hnswlib_ import EF_SWEEP
from retrieval.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)

COLLECTION = "bench"
UPSERT_BYTES = 8 << 20
"""Bytes of vectors per upsert batch on the bulk-load stream."""
INDEX_TIMEOUT_S = 4 * 3600.0
UNTRAINED_GRACE_S = 15.0


class _Service(Algorithm):
    """Shared body: server lifecycle, bulk load, search through the client."""

    in_process = False
    extra_env: ClassVar[dict[str, str]] = {}
    """Extra environment of the server process (e.g. a profiling hook)."""
    build_names: tuple[str, ...] = ()
    query_names: tuple[str, ...] = ()

    def __init__(self, metric: str, dim: int, build: Mapping[str, Any], threads: int = 1) -> None:
        super().__init__(metric, dim, build, threads)
        self._unknown(build, self.build_names, "build")
        from retrieval import Client
        from retrieval.server.process import ServerProcess

        self._tmp = Path(tempfile.mkdtemp(prefix="bench-ann-service-"))
        env = {"OMP_NUM_THREADS": str(threads), "RETRIEVAL_INDEXING__THREADS": str(threads),
               "RETRIEVAL_LOG_LEVEL": "WARNING", **self.extra_env}
        self._server = ServerProcess(self._tmp / "data", env=env, log_path=self._tmp / "server.log")
        try:
            self._server.start()
            self._client = Client(self._server.address, timeout=3600.0)
            self._client.wait_ready(60.0)
        except Exception:
            self.close()
            raise
        self._params: dict[str, int] = {}
        self._rss_delta: int | None = None
        self._memory_bytes = 0

    def index_spec(self, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def _server_rss(self) -> int | None:
        try:
            import psutil

            return int(psutil.Process(self._server.proc.pid).memory_info().rss)
        except Exception:  # the process is gone: no number rather than a wrong one
            return None

    def fit(self, xb: np.ndarray) -> None:
        n = len(xb)
        spec = self.index_spec(n)
        rss0 = self._server_rss()
        self._client.create_collection(COLLECTION, self.dim, self.metric, spec)
        rows = max(1, min(10_000, UPSERT_BYTES // (4 * self.dim)))
        ids = np.arange(n, dtype=np.uint64)
        written = self._client.upsert_stream(
            COLLECTION, ((ids[a : a + rows], xb[a : a + rows]) for a in range(0, n, rows)), timeout=INDEX_TIMEOUT_S
        )
        if written != n:
            raise FailedPrecondition(f"{self.name}: the server stored {written} of {n} points")
        t_end = time.monotonic() + INDEX_TIMEOUT_S
        delay = 0.005
        untrained_since: float | None = None
        while True:
            info = self._client.describe_collection(COLLECTION)
            if info["pending"] == 0 and info["indexed"] >= n and info["state"] == "ready":
                break
            if info["state"] == "failed":
                raise FailedPrecondition(f"{self.name}: the collection failed while indexing: {info}")
            # every point is written: an index still untrained after a grace period never trains
            if info["state"] == "untrained":
                untrained_since = untrained_since or time.monotonic()
                if time.monotonic() - untrained_since > UNTRAINED_GRACE_S:
                    raise FailedPrecondition(
                        f"{self.name}: the index is still untrained {UNTRAINED_GRACE_S:.0f} s after all {n} points "
                        f"were written (it waits for more training points): {info}"
                    )
            else:
                untrained_since = None
            if time.monotonic() > t_end:
                raise FailedPrecondition(f"{self.name}: not indexed after {INDEX_TIMEOUT_S} s: {info}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self._memory_bytes = int(info.get("memory_bytes", 0))
        rss1 = self._server_rss()
        self._rss_delta = (rss1 - rss0) if rss0 is not None and rss1 is not None else None

    def set_query_params(self, params: Mapping[str, Any]) -> None:
        self._unknown(params, self.query_names, "query")
        self._params = {name: self._param(params, name) for name in self.query_names}

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self._client.search(COLLECTION, q, k=k, **self._params).ids

    def batch_query(self, xq: np.ndarray, k: int) -> np.ndarray:
        _, ids = self._client.search_batch(COLLECTION, xq, k=k, **self._params)
        return ids

    def index_bytes(self) -> int:
        return self._memory_bytes

    def rss_delta_bytes(self) -> int | None:
        return self._rss_delta

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken channel must not hide the real error
                pass
            self._client = None
        server = getattr(self, "_server", None)
        if server is not None:
            try:
                code = server.stop(timeout=120.0)
                if code not in (0, None):
                    logger.warning("%s: server exited with %s; log tail:\n%s", self.name, code, server.log_tail())
            finally:
                self._server = None
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None


@register
class ServiceHNSW(_Service):
    name = "service-hnsw"
    default_build = ({"M": 16, "ef_construction": 200},)
    default_query = tuple({"ef": ef} for ef in EF_SWEEP)
    build_names = ("M", "ef_construction")
    query_names = ("ef",)

    def index_spec(self, n: int) -> dict[str, Any]:
        return {"type": "hnsw", "m": self._param(self.build, "M"),
                "ef_construction": self._param(self.build, "ef_construction")}


@register
class ServiceFaissHNSW(_Service):
    name = "service-faiss-hnsw"
    default_build = ({"M": 16, "ef_construction": 200},)
    default_query = tuple({"ef": ef} for ef in EF_SWEEP)
    build_names = ("M", "ef_construction")
    query_names = ("ef",)

    def index_spec(self, n: int) -> dict[str, Any]:
        return {"type": "faiss", "factory": f"HNSW{self._param(self.build, 'M')}",
                "ef_construction": self._param(self.build, "ef_construction")}


def _nlist(alg: Algorithm, n: int) -> int:
    v = alg.build.get("nlist", "auto")
    nlist = auto_nlist(n) if v == "auto" else alg._param(alg.build, "nlist")
    alg.build["nlist"] = nlist
    return nlist


@register
class ServiceIVFFlat(_Service):
    name = "service-ivf-flat"
    default_build = ({"nlist": "auto"},)
    default_query = tuple({"nprobe": p} for p in NPROBE_SWEEP)
    build_names = ("nlist",)
    query_names = ("nprobe",)

    def index_spec(self, n: int) -> dict[str, Any]:
        # train on the whole base once it is loaded, as the in-process faiss adapter does
        return {"type": "faiss", "factory": f"IVF{_nlist(self, n)},Flat", "train_size": n}


@register
class ServiceIVFPQ(_Service):
    name = "service-ivfpq"
    default_build = ({"nlist": "auto", "m": "auto", "nbits": 8},)
    default_query = tuple({"nprobe": p} for p in NPROBE_SWEEP)
    build_names = ("nlist", "m", "nbits")
    query_names = ("nprobe",)

    def index_spec(self, n: int) -> dict[str, Any]:
        nlist = _nlist(self, n)
        m = auto_pq_m(self.dim) if self.build.get("m", "auto") == "auto" else self._param(self.build, "m")
        if self.dim % m:
            raise InvalidArgument(f"{self.name}: m={m} must divide the dimension {self.dim}")
        nbits = int(self.build.get("nbits", 8))
        self.build.update(m=m, nbits=nbits)
        # "np": no polysemous training (faiss's factory default trains it; it only serves Hamming-threshold
        # search, unused here, and makes training several times slower)
        return {"type": "faiss", "factory": f"IVF{nlist},PQ{m}x{nbits}np", "train_size": n}


@register
class ServiceExact(_Service):
    name = "service-exact"

    def index_spec(self, n: int) -> dict[str, Any]:
        return {"type": "exact"}
