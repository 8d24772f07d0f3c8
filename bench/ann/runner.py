"""The measurement protocol (ann-benchmarks'): build once per build setting, sweep the query settings.

For every algorithm and build setting:

1. ``fit`` the base, timing it (``build_s``) and measuring the process RSS growth (``rss_delta_bytes``;
   in-process algorithms only) and the library's own index size (``index_bytes``);
2. for every query setting, after a short warm-up (``warmup`` queries, not timed):
   - **one query per call**: ``runs`` passes over all queries, each query timed alone with
     ``time.perf_counter``; the fastest pass gives ``qps_single = nq / sum(times)`` and the latency
     percentiles (p50 / p95 / p99 / mean);
   - **batches**: ``runs`` passes of ``batch_query`` over batches of ``batch_size`` queries (default:
     all in one call); the fastest gives ``qps_batch``;
   - recall@k of the single-query results (and of the batch results, reported apart) by
     :mod:`bench.ann.metrics`.

A failing algorithm is recorded with its error and the run goes on with the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.ann import adapters
from bench.ann.config import AlgorithmSweep
from bench.ann.datasets import Dataset
from bench.ann.metrics import (
    DEFAULT_EPSILON,
    distances,
    latency_stats,
    recall_ids_per_query,
    recall_per_query,
)
from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSettings:
    """Settings shared by every algorithm of a run.

    k: neighbours per query. runs: timed passes, best kept (default 3). batch_size: queries per batch
    call (0 = all). threads: threads given to the algorithms (default 1). epsilon: recall distance
    tolerance. warmup: untimed queries before each setting. progress: show tqdm bars.
    """

    k: int = 10
    runs: int = 3
    batch_size: int = 0
    threads: int = 1
    epsilon: float = DEFAULT_EPSILON
    warmup: int = 10
    progress: bool = True


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _measure_query_setting(
    alg: adapters.Algorithm, ds: Dataset, s: RunSettings
) -> dict[str, Any]:
    xq, k = ds.xq, s.k
    nq = len(xq)
    for q in xq[: min(s.warmup, nq)]:
        alg.query(q, k)
    best_total, best_times, ids_single = np.inf, None, None
    for _ in range(s.runs):
        times = np.empty(nq)
        ids = np.full((nq, k), -1, dtype=np.int64)
        pc = time.perf_counter
        for i in range(nq):
            t0 = pc()
            r = alg.query(xq[i], k)
            times[i] = pc() - t0
            r = np.asarray(r, dtype=np.int64)[:k]
            ids[i, : len(r)] = r
        total = float(times.sum())
        if total < best_total:
            best_total, best_times = total, times
        ids_single = ids
    bs = s.batch_size if s.batch_size and s.batch_size > 0 else nq
    best_batch, ids_batch = np.inf, None
    for _ in range(s.runs):
        parts = []
        t0 = time.perf_counter()
        for a in range(0, nq, bs):
            parts.append(np.asarray(alg.batch_query(xq[a : a + bs], k), dtype=np.int64))
        total = time.perf_counter() - t0
        best_batch = min(best_batch, total)
        ids_batch = np.concatenate(parts)
    if ids_batch is None or ids_batch.shape[0] != nq:
        raise InvalidArgument(f"{alg.name}: batch_query returned {None if ids_batch is None else ids_batch.shape}, "
                              f"expected ({nq}, {k})")
    out: dict[str, Any] = {}
    for label, ids in (("", ids_single), ("_batch", ids_batch)):
        dist = distances(xq, ds.xb, ids, ds.metric)
        out["recall" + label] = float(recall_per_query(ds.gt_dist, ids, dist, k, s.epsilon).mean())
        out["recall_ids" + label] = float(recall_ids_per_query(ds.gt_ids, ids, k).mean())
    out["qps_single"] = nq / best_total
    out.update(latency_stats(best_times))
    out["qps_batch"] = nq / best_batch
    out["batch_size"] = bs
    return out


def run_algorithm(
    sweep: AlgorithmSweep,
    ds: Dataset,
    s: RunSettings,
    on_step: Callable[[str], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """All build x query settings of one algorithm; one result dict per (build, query) pair.

    ``on_step(message)`` is called before each build and each query setting, ``on_done()`` after.
    """
    cls = adapters.get(sweep.name)
    rows: list[dict[str, Any]] = []
    for build in sweep.build:
        base = {"algorithm": sweep.name, "build": dict(build)}
        alg = None
        try:
            alg = cls(ds.metric, ds.d, build, threads=s.threads)
            if on_step:
                on_step(f"{sweep.name} build {build}")
            rss0 = _rss()
            t0 = time.perf_counter()
            alg.fit(ds.xb)
            build_s = time.perf_counter() - t0
            rss1 = _rss()
            if on_done:
                on_done()
            info = {
                "build": dict(alg.build),  # with "auto" values resolved
                "label": alg.describe(),
                "build_s": build_s,
                "index_bytes": int(alg.index_bytes()),
                "rss_delta_bytes": (rss1 - rss0) if cls.in_process else alg.rss_delta_bytes(),
                "in_process": cls.in_process,
            }
            logger.info("%s built in %.2f s", info["label"], build_s)
            for q in sweep.query:
                if on_step:
                    on_step(f"{sweep.name} {q}")
                alg.set_query_params(q)
                m = _measure_query_setting(alg, ds, s)
                rows.append({**base, **info, "query": dict(q), **m})
                if on_done:
                    on_done()
                logger.info("%s %s: recall %.4f, %.0f QPS single, %.0f QPS batch", info["label"], q,
                            m["recall"], m["qps_single"], m["qps_batch"])
        except Exception as e:  # one broken algorithm must not lose the others' results
            logger.error("%s %s failed: %s", sweep.name, build, e)
            rows.append({**base, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        finally:
            if alg is not None:
                alg.close()
    return rows


def run(ds: Dataset, sweeps: Sequence[AlgorithmSweep], s: RunSettings) -> list[dict[str, Any]]:
    """Every algorithm of ``sweeps`` on ``ds``, with a progress bar over the steps."""
    if s.k > ds.gt_ids.shape[1]:
        raise InvalidArgument(f"k={s.k} exceeds the dataset's ground truth depth {ds.gt_ids.shape[1]}")
    if s.k < 1 or s.runs < 1:
        raise InvalidArgument(f"k and runs must be >= 1, got k={s.k}, runs={s.runs}")
    total = sum(len(w.build) * (1 + len(w.query)) for w in sweeps)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=ds.name, disable=not s.progress, dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    done = 0
    try:
        for w in sweeps:
            results.extend(
                run_algorithm(w, ds, s, on_step=lambda m: bar.set_postfix_str(m[:70]), on_done=lambda: bar.update(1))
            )
            # a build that failed skipped its query steps: keep the bar honest
            done += len(w.build) * (1 + len(w.query))
            bar.n = done
            bar.refresh()
    finally:
        bar.close()
    return results
