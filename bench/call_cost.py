"""CPU per single-query search call, client and server, beside the gRPC Python floor (same run).

    python -m bench.call_cost              # ~1 min
    python -m bench.call_cost --calls 1000

Three setups, one client process (this one) calling back to back, BIGANN-10k, HNSW M=16, ef=10, k=10:

* ``stream``: :meth:`retrieval.Client.search` (the long-lived search stream) against our server;
* ``unary``: ``search_batch`` with one query (a unary ``SearchBatch`` call) against our server;
* ``floor``: the same ``Client.search`` against a ``grpc.aio`` server whose handlers return an empty reply
  (:mod:`bench.grpc_floor`'s server): what any Python gRPC service costs before it does anything.

CPU is read from the kernel's counters (``getrusage`` for the client, psutil ``cpu_times`` of the server
process) over the timed calls, divided by the calls. On a machine whose cores are shared by client and
server, ``1 / (client + server CPU per call)`` bounds the QPS of the pair. Writes
``bench/results/service/call_cost.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "service"


def _timed(call, n: int, server_pid: int) -> dict:
    import psutil

    sp = psutil.Process(server_pid)
    for i in range(min(300, n)):
        call(i)
    t0, r0, s0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), sp.cpu_times()
    for i in range(n):
        call(i)
    t1, r1, s1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), sp.cpu_times()
    client = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n
    server = (s1.user + s1.system - s0.user - s0.system) / n
    return {"calls": n, "qps": n / (t1 - t0), "latency_us": (t1 - t0) / n * 1e6, "client_cpu_us": client * 1e6,
            "server_cpu_us": server * 1e6}


def measure(calls: int = 3000) -> dict:
    from bench.concurrency import load_bigann
    from bench.grpc_floor import _serve
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    ds = load_bigann(None)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp) / "data",
                                                             env={"RETRIEVAL_LOG_LEVEL": "WARNING"}) as srv:
        with Client(srv.address, timeout=600) as c:
            c.create_collection("b", dimension=ds.xb.shape[1], index={"type": "hnsw", "m": 16, "ef_construction": 200})
            for i in range(0, len(ds.xb), 2000):
                c.upsert("b", ids=np.arange(i, min(i + 2000, len(ds.xb))), vectors=ds.xb[i:i + 2000])
            while c.describe_collection("b").pending:
                time.sleep(0.2)
            xq = ds.xq
            out["stream"] = _timed(lambda i: c.search("b", xq[i % len(xq)], k=10, ef=10), calls, srv.proc.pid)
            out["unary"] = _timed(lambda i: c.search_batch("b", xq[i % len(xq)][None], k=10, ef=10), calls,
                                  srv.proc.pid)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q,), daemon=True)
    proc.start()
    try:
        with Client(f"127.0.0.1:{q.get(timeout=60)}", timeout=60) as c:
            x = ds.xq[0]

            def empty(_i):
                try:
                    c.search("b", x, k=10, ef=10)
                except ValueError:  # the empty reply has no result rows: parsing it fails, after the call
                    pass

            out["floor"] = _timed(empty, calls, proc.pid)
    finally:
        proc.terminate()
    return out


LABELS = {"stream": "ours, Client.search (stream)", "unary": "ours, search_batch of 1 (unary)",
          "floor": "empty grpc.aio server, Client.search (floor)"}


def report(res: dict, calls: int) -> str:
    rows = ["| setup | QPS | latency us | client CPU us / call | server CPU us / call |", "|---|---:|---:|---:|---:|"]
    for k in ("stream", "unary", "floor"):
        r = res[k]
        rows.append(f"| {LABELS[k]} | {r['qps']:,.0f} | {r['latency_us']:.0f} | {r['client_cpu_us']:.0f} | "
                    f"{r['server_cpu_us']:.0f} |")
    s, f = res["stream"], res["floor"]
    return "\n".join([
        "# CPU per single-query search call (client and server) beside the gRPC Python floor", "",
        f"Command: `python -m bench.call_cost --calls {calls}`; {platform.machine()}, {mp.cpu_count()} CPUs; "
        "BIGANN-10k, HNSW M=16, ef=10, k=10, one client calling back to back; CPU from the kernel's counters.", "",
        *rows, "",
        f"Our server spends {s['server_cpu_us'] - f['server_cpu_us']:.0f} us per stream call above the floor's "
        f"{f['server_cpu_us']:.0f} us; the client {s['client_cpu_us']:.0f} us (against the empty server: "
        f"{f['client_cpu_us']:.0f} us). With client and server on the same cores, QPS is bounded near "
        f"1 / (client + server CPU) = {1e6 / (s['client_cpu_us'] + s['server_cpu_us']):,.0f}.", ""])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["stream", "unary", "floor"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    y = np.arange(len(keys))
    cl = [res[k]["client_cpu_us"] for k in keys]
    sv = [res[k]["server_cpu_us"] for k in keys]
    ax.barh(y, cl, label="client CPU")
    ax.barh(y, sv, left=cl, label="server CPU")
    ax.set_yticks(y, [LABELS[k] for k in keys], fontsize=8)
    ax.set_xlabel("CPU microseconds per call")
    ax.legend(fontsize=8)
    ax.set_title("One search call: where the CPU goes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    res = measure(a.calls)
    a.out.mkdir(parents=True, exist_ok=True)
    md = report(res, a.calls)
    print(md)
    (a.out / "call_cost.md").write_text(md)
    (a.out / "call_cost.json").write_text(json.dumps({"calls": a.calls, "results": res}, indent=1))
    plot(res, a.out / "call_cost.png")


if __name__ == "__main__":
    main()
