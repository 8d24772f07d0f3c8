"""Threads sharing one Client: single-query search QPS vs thread count, for the ways a shared
Client can run concurrent searches, against a local server (BIGANN-10k, HNSW M=16, k=10, ef=64).

    python -m bench.client_threads [--threads 1 8] [--seconds 4] [--out bench/results/client/threads.json]

Modes (``Client(search_streams=...)``): ``pool`` (a stream per concurrent thread, up to 8; the
default), ``one-stream`` (one stream, concurrent searches beyond it are unary calls), ``unary``
(unary calls only), ``8 clients`` (8 Clients, one per thread: the upper reference), ``async``
(:class:`retrieval.AsyncClient`, ``threads`` concurrent tasks on one event loop).
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "datasets" / "vectors" / "bigann-128-euclidean-10k"


def _qps_threads(clients, xq, threads: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def work(i: int) -> None:
        c = clients[i % len(clients)]
        n, j = 0, i
        while time.perf_counter() < stop:
            c.search("b", xq[j % len(xq)], k=10, ef=64)
            n += 1
            j += threads
        counts[i] = n

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


async def _qps_async(address: str, xq, tasks: int, seconds: float) -> float:
    from retrieval import AsyncClient

    async with AsyncClient(address) as c:
        await c.search("b", xq[0], k=10, ef=64)
        stop = time.perf_counter() + seconds
        counts = [0] * tasks

        async def work(i: int) -> None:
            n, j = 0, i
            while time.perf_counter() < stop:
                await c.search("b", xq[j % len(xq)], k=10, ef=64)
                n += 1
                j += tasks
            counts[i] = n

        t0 = time.perf_counter()
        await asyncio.gather(*(work(i) for i in range(tasks)))
        return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "client" / "threads.json"))
    args = ap.parse_args()

    from retrieval import Client
    from retrieval.server.process import ServerProcess

    xb = np.load(DATA / "base.u8.npy").astype(np.float32)
    xq = np.load(DATA / "queries.u8.npy").astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp) / "data")
        srv.start()
        try:
            with Client(srv.address, timeout=120) as c:
                c.create_collection("b", 128, index={"type": "hnsw", "m": 16, "ef_construction": 200})
                c.upsert_stream("b", ((np.arange(s, s + 2000), xb[s:s + 2000]) for s in range(0, len(xb), 2000)))
                while c.describe_collection("b")["pending"]:
                    time.sleep(0.2)
            modes = {"pool": 8, "one-stream": 1, "unary": 0}
            for threads in args.threads:
                row = {"threads": threads}
                for mode, streams in modes.items():
                    with Client(srv.address, search_streams=streams) as c:
                        _qps_threads([c], xq, threads, 0.5)  # warm up: open the streams
                        row[mode] = _qps_threads([c], xq, threads, args.seconds)
                cs = [Client(srv.address) for _ in range(threads)]
                _qps_threads(cs, xq, threads, 0.5)
                row[f"{threads} clients"] = _qps_threads(cs, xq, threads, args.seconds)
                for c in cs:
                    c.close()
                row["async"] = asyncio.run(_qps_async(srv.address, xq, threads, args.seconds))
                rows.append(row)
        finally:
            srv.stop()

    cols = ["pool", "one-stream", "unary", "clients", "async"]
    print(f"single-query search QPS, BIGANN-10k HNSW M=16 k=10 ef=64, {os.cpu_count()} CPUs")
    print("threads | " + " | ".join(f"{c:>10}" for c in cols))
    for r in rows:
        vals = [r["pool"], r["one-stream"], r["unary"], r[f"{r['threads']} clients"], r["async"]]
        print(f"{r['threads']:>7} | " + " | ".join(f"{v:>10.0f}" for v in vals))
    base = next((r for r in rows if r["threads"] == 1), None)
    if base:
        for r in rows:
            if r is not base:
                print(f"{r['threads']} threads / 1 thread, pool: {r['pool'] / base['pool']:.2f}x; "
                      f"one-stream: {r['one-stream'] / base['pool']:.2f}x; unary: {r['unary'] / base['pool']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
