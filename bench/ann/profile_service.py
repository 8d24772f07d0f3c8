"""Where a service query's time goes: ``python -m bench.ann.profile_service --dataset bigann-10k``.

Compares one query through our server (``service-hnsw``, one query per call on the client's search
stream) with the same query in process (``hnswlib``, same build settings and ``ef``), and splits the
difference:

- **unprofiled timings** (``time.perf_counter``, mean per query over ``--repeat`` passes of the query
  set): in-process hnswlib search; service end to end; the client's serialization (building and
  encoding the request, decoding the response into numpy), timed alone without the network;
- **server profile**: the server runs under ``cProfile``, switched on only for the timed query loop
  (SIGUSR1 / SIGUSR2 through a ``sitecustomize`` hook, so no server code changes), and its time is
  grouped into: index search, proto <-> numpy conversion, collection / shard logic, servicer and
  interceptors, gRPC + asyncio machinery (event loop, completion queue), other;
- **client profile**: the same grouping for the client's side of the loop, where "waiting" is time
  blocked on the stream's response (the network round trip plus all server time).

The profiler slows Python code down, so the profiles give shares, not absolute times. Writes
``profile-<dataset>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

_HOOK = '''
import os
if os.environ.get("BENCH_PROFILE_OUT"):
    import cProfile, signal
    _prof = cProfile.Profile()
    def _on(signum, frame):
        _prof.enable()
    def _off(signum, frame):
        _prof.disable()
        _prof.dump_stats(os.environ["BENCH_PROFILE_OUT"])
    signal.signal(signal.SIGUSR1, _on)
    signal.signal(signal.SIGUSR2, _off)
'''

CATEGORIES = (
    ("idle: event loop waiting in epoll", ("select.epoll' objects>", "method 'poll' of")),
    ("index search", ("retrieval/indexes/", "knn_query", "hnswlib")),
    ("proto <-> numpy conversion", ("retrieval/convert.py", "google/protobuf", "SerializeToString",
                                    "FromString", "ParseFromString", "frombuffer", "tobytes", "google._upb",
                                    "numpy.asarray")),
    ("collection / shard logic", ("retrieval/vectors/",)),
    ("servicer + interceptors + metrics", ("retrieval/server/", "prometheus_client")),
    ("waiting for the response", ("queue.py", "threading.py", "_thread.lock", "acquire", "wait")),
    ("gRPC + asyncio machinery", ("grpc/", "grpc._cython", "cygrpc", "asyncio/", "selectors", "epoll",
                                  "_asyncio", "select.", "_contextvars", "SimpleQueue")),
)


IDLE = CATEGORIES[0][0]


def categorize(stats: pstats.Stats) -> dict[str, float]:
    """Own time (tottime) in seconds per category; functions are matched by file path or name."""
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other Python"] = 0.0
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{file}:{func}"
        for name, pats in CATEGORIES:
            if any(p in key for p in pats):
                out[name] += tt
                break
        else:
            out["other Python"] += tt
    return out


def _matches(file: str, func: str) -> bool:
    return any(p in f"{file}:{func}" for _, pats in CATEGORIES for p in pats)


def _top(stats: pstats.Stats, n: int = 12, other_only: bool = False) -> list[tuple[str, float]]:
    items = [kv for kv in stats.stats.items() if not (other_only and _matches(kv[0][0], kv[0][2]))]  # type: ignore[attr-defined]
    rows = sorted(items, key=lambda kv: -kv[1][2])[:n]
    return [(f"{Path(f).name}:{ln}({fn})", tt) for (f, ln, fn), (_c, _n, tt, _ct, _cl) in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ann.profile_service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bigann-10k")
    p.add_argument("--ef", type=int, default=0, help="hnsw ef (default: the smallest of the sweep reaching recall 0.95)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5, help="passes over the query set per timing")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "ann"))
    args = p.parse_args(argv)

    from bench.ann import datasets, machine
    from bench.ann.adapters.hnswlib_ import EF_SWEEP, Hnswlib
    from bench.ann.adapters.service import COLLECTION, ServiceHNSW
    from bench.ann.metrics import distances, recall_per_query
    from retrieval.v1 import search_pb2

    machine.set_threads(1)
    ds = datasets.load(args.dataset)
    k, build = args.k, {"M": 16, "ef_construction": 200}
    lib = Hnswlib(ds.metric, ds.d, build)
    lib.fit(ds.xb)
    ef = args.ef
    if not ef:
        for ef in EF_SWEEP:
            lib.set_query_params({"ef": ef})
            ids = lib.batch_query(ds.xq, k)
            if recall_per_query(ds.gt_dist, ids, distances(ds.xq, ds.xb, ids, ds.metric), k).mean() >= 0.95:
                break
    lib.set_query_params({"ef": ef})
    xq = ds.xq

    def loop(fn) -> float:
        best = np.inf
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for q in xq:
                fn(q)
            best = min(best, time.perf_counter() - t0)
        return best / len(xq)

    t_lib = loop(lambda q: lib.query(q, k))

    hook = Path(tempfile.mkdtemp(prefix="bench-profile-hook-"))
    (hook / "sitecustomize.py").write_text(_HOOK)
    prof_out = hook / "server.prof"

    class Profiled(ServiceHNSW):
        extra_env: ClassVar[dict[str, str]] = {
            "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", ""), os.getcwd()]),
            "BENCH_PROFILE_OUT": str(prof_out),
        }

    svc = Profiled(ds.metric, ds.d, build)
    try:
        svc.fit(ds.xb)
        svc.set_query_params({"ef": ef})
        client = svc._client
        for q in xq[:50]:  # warm the stream
            svc.query(q, k)
        t_svc = loop(lambda q: svc.query(q, k))

        # the client's serialization alone: request build + encode, response decode + numpy
        resp = client._stream_call(client._search_request(COLLECTION, xq[:1], k, ef, 0, False, None, False, False))
        raw = resp.SerializeToString()

        def ser(q: np.ndarray) -> None:
            client._search_request(COLLECTION, q.reshape(1, -1), k, ef, 0, False, None, False, False).SerializeToString()
            client._arrays(search_pb2.SearchResponse.FromString(raw))

        t_ser = loop(ser)

        # profiles of the same loop on both sides
        pid = svc._server.proc.pid
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.2)
        cprof = cProfile.Profile()
        cprof.enable()
        for q in xq:
            svc.query(q, k)
        cprof.disable()
        os.kill(pid, signal.SIGUSR2)
        for _ in range(100):
            if prof_out.exists():
                break
            time.sleep(0.1)
        time.sleep(0.5)
        server_stats = pstats.Stats(str(prof_out))
    finally:
        svc.close()
    client_stats = pstats.Stats(cprof)
    s_cat, c_cat = categorize(server_stats), categorize(client_stats)
    nq = len(xq)
    doc: dict[str, Any] = {
        "dataset": ds.info(),
        "ef": ef,
        "k": k,
        "build": build,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.machine_info(),
        "versions": machine.versions(),
        "per_query_us": {
            "hnswlib in process": t_lib * 1e6,
            "service end to end (Client.search)": t_svc * 1e6,
            "client serialization alone": t_ser * 1e6,
        },
        "server_profile_share": {c: v / max(sum(s_cat.values()) - s_cat[IDLE], 1e-12)
                                 for c, v in s_cat.items() if c != IDLE},
        "server_idle_us_per_query": s_cat[IDLE] / nq * 1e6,
        "client_profile_share": {c: v / max(sum(c_cat.values()), 1e-12) for c, v in c_cat.items()},
        "server_profiled_us_per_query": {c: v / nq * 1e6 for c, v in s_cat.items() if c != IDLE},
        "client_profiled_us_per_query": {c: v / nq * 1e6 for c, v in c_cat.items()},
        "server_top": _top(server_stats),
        "client_top": _top(client_stats),
        "server_other_top": _top(server_stats, other_only=True),
        "client_other_top": _top(client_stats, other_only=True),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{ds.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = _markdown(doc)
    (out / f"profile-{ds.name}.md").write_text(md)
    print(md)
    return 0


def _markdown(doc: dict[str, Any]) -> str:
    t = doc["per_query_us"]
    lib, svc = t["hnswlib in process"], t["service end to end (Client.search)"]
    m = doc["machine"]
    lines = [
        f"# Where a service query's time goes: {doc['dataset']['name']}, hnsw M=16, ef={doc['ef']}, k={doc['k']}",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; single-threaded; {doc['started']}. "
        f"Command: `python -m bench.ann.profile_service --dataset {doc['dataset']['name']}`.",
        "",
        "| per query (unprofiled, best of passes) | µs |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {v:,.1f} |" for name, v in t.items()]
    lines += [f"| overhead of the service (end to end − in process) | {svc - lib:,.1f} |",
              f"| service / in-process QPS ratio | {lib / svc:.3f} |", ""]
    for side in ("server", "client"):
        busy = "; shares of the server's busy time (its idle wait in epoll excluded)" if side == "server" else ""
        lines += [f"## {side.capitalize()} profile (cProfile, own time, during the query loop{busy})", "",
                  "| category | share | µs per query (profiled) |", "|---|---:|---:|"]
        share, us = doc[f"{side}_profile_share"], doc[f"{side}_profiled_us_per_query"]
        for c in sorted(share, key=lambda c: -share[c]):
            lines.append(f"| {c} | {share[c]:.1%} | {us[c]:,.1f} |")
        lines += ["", f"Top functions ({side}, own time, seconds over the loop): "
                  + "; ".join(f"`{f}` {tt:.3f}" for f, tt in doc[f"{side}_top"][:8]), "",
                  f"Largest in \"other Python\" ({side}): "
                  + "; ".join(f"`{f}` {tt:.3f}" for f, tt in doc[f"{side}_other_top"][:8]), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
