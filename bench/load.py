"""Load test: many concurrent clients mixing searches, upserts and deletes against one server.

    python -m bench.load [--clients 32] [--duration 180] [--processes 4] [--out bench/results/load]
                         [--saturate 60]

One server on loopback (a fresh data folder; ``--address`` to use a running one), a collection of
BIGANN-10k (d=128, HNSW M=16 / ef_construction=200), then ``--clients`` clients (threads spread over
``--processes`` processes, each client with its own channel) run for ``--duration`` seconds, each op
chosen at random (seeded per client):

* 75% single-query search (the client's search stream; k=10, ef=64), 5% batch search (16 queries),
  5% filtered search (a payload filter matching a quarter of the points), 10% upsert (50 points, new
  or updates of the client's own; only updates once it holds OWN_CAP points, so the collection stops
  growing at about 10k + 32k points), 5% delete (10 of the client's own points).

Reported: ops/s per kind and in total, p50 / p99 / max latency per kind, errors by status (the goal:
none but intended RESOURCE_EXHAUSTED, which the client retries after the server's hint), the server's
RSS and CPU sampled every second (start, end, peak), and a final check that every acknowledged write
is there and no deleted point came back. ``--saturate S`` adds a second run of S seconds against a
server with tight admission limits (few in-flight calls and streams), where RESOURCE_EXHAUSTED is the
intended answer: it shows how many calls were refused, retried and finally succeeded.

Writes ``load.json``, ``load.md`` and ``load.png`` under ``--out``. The machine is shared (2 cores for
server and clients together): read the numbers as what this box does, not as a ceiling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "datasets" / "vectors" / "bigann-128-euclidean-10k"
KINDS = ("search", "batch", "filtered", "upsert", "delete")
MIX = (0.75, 0.05, 0.05, 0.10, 0.05)
D = 128
OWN_CAP = 1000  # live points per client at most


def _client_loop(address: str, cid: int, duration: float, t_start: float, xb: np.ndarray, out: list,
                 acked: dict, lock: threading.Lock) -> None:
    from retrieval import errors
    from retrieval.client import Client

    rng = random.Random(cid)
    nrng = np.random.default_rng(cid)
    own: list[int] = []           # this client's live points
    next_id = (cid + 1) * 10**9
    flt = {"must": [{"key": "g", "equals": cid % 4}]}
    with Client(address, timeout=30, max_busy_retries=8) as c:
        while time.time() < t_start:
            time.sleep(0.01)
        t_end = t_start + duration
        while True:
            now = time.time()
            if now >= t_end:
                break
            r = rng.random()
            kind = KINDS[next(i for i, acc in enumerate(np.cumsum(MIX)) if r < acc)]
            if kind in ("upsert", "delete") and kind == "delete" and len(own) < 20:
                kind = "upsert"
            t0 = time.perf_counter()
            status = "OK"
            try:
                if kind == "search":
                    q = xb[rng.randrange(len(xb))] + nrng.normal(0, 2, D).astype(np.float32)
                    c.search("load", q, k=10, ef=64)
                elif kind == "batch":
                    idx = [rng.randrange(len(xb)) for _ in range(16)]
                    c.search_batch("load", xb[idx], k=10, ef=64)
                elif kind == "filtered":
                    c.search("load", xb[rng.randrange(len(xb))], k=10, ef=64, filter=flt)
                elif kind == "upsert":
                    # new points and updates; past OWN_CAP live points only updates (the data stops
                    # growing, so the server's memory at the end compares with the start)
                    n_upd = 50 if len(own) >= OWN_CAP else min(len(own), rng.randint(0, 25))
                    ids = rng.sample(own, n_upd) + list(range(next_id, next_id + 50 - n_upd))
                    x = xb[[rng.randrange(len(xb)) for _ in ids]] + nrng.normal(0, 1, (len(ids), D)).astype(np.float32)
                    c.upsert("load", ids, x, [{"g": cid % 4, "c": cid} for _ in ids])
                    next_id += 50 - n_upd
                    own.extend(ids[n_upd:])
                    with lock:
                        for i, v in zip(ids, x):
                            acked[i] = v
                else:
                    ids = rng.sample(own, 10)
                    c.delete("load", ids=ids)
                    gone = set(ids)
                    own[:] = [i for i in own if i not in gone]
                    with lock:
                        for i in ids:
                            acked[i] = None
            except errors.RetrievalError as e:
                status = getattr(e, "code", None).name if hasattr(getattr(e, "code", None), "name") else type(e).__name__
            out.append((time.time() - t_start, kind, (time.perf_counter() - t0) * 1e3, status))


def _worker(address: str, cids: list[int], duration: float, t_start: float, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    xb = np.load(DATA / "base.u8.npy").astype(np.float32)
    out: list = []
    acked: dict = {}
    lock = threading.Lock()
    threads = [threading.Thread(target=_client_loop, args=(address, cid, duration, t_start, xb, out, acked, lock))
               for cid in cids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send((out, {int(k): (None if v is None else np.asarray(v, np.float32)) for k, v in acked.items()}))
    conn.close()


def _sampler(pid: int, stop: threading.Event, samples: list) -> None:
    import psutil

    p = psutil.Process(pid)
    t0 = time.time()
    cpu0 = sum(p.cpu_times()[:2])
    while not stop.is_set():
        try:
            samples.append((time.time() - t0, p.memory_info().rss, sum(p.cpu_times()[:2]) - cpu0))
        except psutil.Error:
            return
        stop.wait(1.0)


def run_load(address: str, pid: int | None, clients: int, processes: int, duration: float) -> dict:
    ctx = mp.get_context("spawn")
    t_start = time.time() + 8.0  # every worker process imports and connects before the clock starts
    groups = [list(range(p, clients, processes)) for p in range(processes)]
    pipes, procs = [], []
    for g in groups:
        a, b = ctx.Pipe(duplex=False)
        pr = ctx.Process(target=_worker, args=(address, g, duration, t_start, b))
        pr.start()
        pipes.append(a)
        procs.append(pr)
    samples: list = []
    stop = threading.Event()
    sampler = None
    if pid is not None:
        while time.time() < t_start:
            time.sleep(0.05)
        sampler = threading.Thread(target=_sampler, args=(pid, stop, samples), daemon=True)
        sampler.start()
    records, acked = [], {}
    for a in pipes:
        out, ack = a.recv()
        records += out
        acked.update(ack)
    for pr in procs:
        pr.join()
    stop.set()
    if sampler is not None:
        sampler.join()
    return summarize(records, samples, duration, clients) | {"_acked": acked, "_records": records, "_samples": samples}


def summarize(records, samples, duration, clients) -> dict:
    by_kind: dict = {}
    statuses: dict = {}
    for _, kind, ms, st in records:
        by_kind.setdefault(kind, []).append(ms)
        statuses[st] = statuses.get(st, 0) + 1
    lat_ok = {k: [] for k in KINDS}
    for _, kind, ms, st in records:
        if st == "OK":
            lat_ok[kind].append(ms)
    kinds = {}
    for k in KINDS:
        v = np.asarray(lat_ok[k])
        kinds[k] = {"ops": len(by_kind.get(k, [])), "ok": len(v), "ops_per_s": len(v) / duration,
                    "p50_ms": float(np.percentile(v, 50)) if len(v) else None,
                    "p99_ms": float(np.percentile(v, 99)) if len(v) else None,
                    "max_ms": float(v.max()) if len(v) else None}
    all_ok = np.asarray([ms for _, _, ms, st in records if st == "OK"])
    errors = {k: v for k, v in statuses.items() if k != "OK"}
    out = {"clients": clients, "duration_s": duration, "ops": len(records), "ok_ops": int(len(all_ok)),
           "ops_per_s": len(all_ok) / duration,
           "p50_ms": float(np.percentile(all_ok, 50)) if len(all_ok) else None,
           "p99_ms": float(np.percentile(all_ok, 99)) if len(all_ok) else None,
           "kinds": kinds, "errors": errors,
           "unintended_errors": sum(v for k, v in errors.items() if k != "RESOURCE_EXHAUSTED")}
    if samples:
        rss = [s[1] for s in samples]
        out["server"] = {"rss_start_mb": rss[0] / 2**20, "rss_end_mb": rss[-1] / 2**20, "rss_peak_mb": max(rss) / 2**20,
                         "cpu_s": samples[-1][2], "cpu_cores_used": samples[-1][2] / max(samples[-1][0], 1e-9)}
    return out


def verify(address: str, acked: dict) -> dict:
    """Every acknowledged write is there with its last vector; no deleted point came back."""
    from retrieval.client import Client

    live = {i: v for i, v in acked.items() if v is not None}
    dead = [i for i, v in acked.items() if v is None]
    lost = wrong = back = 0
    with Client(address, timeout=120) as c:
        ids = sorted(live)
        for j in range(0, len(ids), 5000):
            got = c.get("load", ids[j:j + 5000], with_vectors=True, with_payloads=False)
            have = dict(zip(got.ids.tolist(), got.vectors))
            for i in ids[j:j + 5000]:
                if i not in have:
                    lost += 1
                elif not np.array_equal(have[i], live[i]):
                    wrong += 1
        for j in range(0, len(dead), 5000):
            back += len(c.get("load", dead[j:j + 5000], with_vectors=False, with_payloads=False).ids)
        total = c.count("load")
    return {"acknowledged_live": len(live), "acknowledged_deleted": len(dead), "lost": lost, "wrong_version": wrong,
            "deleted_came_back": back, "points_now": total}


def _start_server(env: dict):
    from retrieval.server.process import ServerProcess

    folder = Path(tempfile.mkdtemp(prefix="retrieval-load-"))
    srv = ServerProcess(folder / "data", env=env, log_path=folder / "server.log")
    srv.start()
    return srv, folder


def _load_base(address: str) -> None:
    from retrieval.client import Client

    xb = np.load(DATA / "base.u8.npy").astype(np.float32)
    with Client(address, timeout=300) as c:
        c.create_collection("load", D, index={"type": "hnsw", "m": 16, "ef_construction": 200})
        c.upsert_stream("load", ((np.arange(i, i + 1000), xb[i:i + 1000], [{"g": (i // 1000) % 4}] * 1000)
                                 for i in range(0, len(xb), 1000)))
        t_end = time.time() + 600
        while c.describe_collection("load")["pending"] and time.time() < t_end:
            time.sleep(0.5)


def one_run(args, env: dict, duration: float, label: str) -> dict:
    srv = folder = None
    address = args.address
    if address is None:
        srv, folder = _start_server(env)
        address = srv.address
    try:
        _load_base(address)
        res = run_load(address, srv.proc.pid if srv else None, args.clients, args.processes, duration)
        res["check"] = verify(address, res["_acked"])
        res["label"] = label
        res["limits"] = {k: v for k, v in env.items() if k.startswith("RETRIEVAL_LIMITS")}
    finally:
        if srv is not None:
            srv.stop()
    return res


def _table(res: dict) -> str:
    lines = [f"### {res['label']}: {res['clients']} clients, {res['duration_s']:.0f} s",
             "", "| op | ops | ok | ops/s | p50 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, v in res["kinds"].items():
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {k} | {v['ops']} | {v['ok']} | {v['ops_per_s']:.1f} | {f(v['p50_ms'])} | {f(v['p99_ms'])} | "
                     f"{f(v['max_ms'])} |")
    lines.append(f"| **all** | {res['ops']} | {res['ok_ops']} | {res['ops_per_s']:.1f} | {res['p50_ms']:.2f} | "
                 f"{res['p99_ms']:.2f} | |")
    lines.append("")
    lines.append(f"errors by status: {res['errors'] or 'none'}; unintended: {res['unintended_errors']}")
    if "server" in res:
        s = res["server"]
        lines.append(f"server RSS: start {s['rss_start_mb']:.0f} MiB, end {s['rss_end_mb']:.0f} MiB, peak "
                     f"{s['rss_peak_mb']:.0f} MiB; CPU {s['cpu_cores_used']:.2f} cores on average")
    ch = res["check"]
    lines.append(f"after the run: {ch['acknowledged_live']} acknowledged live points, {ch['lost']} lost, "
                 f"{ch['wrong_version']} with a wrong version, {ch['deleted_came_back']} of "
                 f"{ch['acknowledged_deleted']} deleted points came back; {ch['points_now']} points stored")
    if res.get("limits"):
        lines.append(f"limits: {res['limits']}")
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)), squeeze=False)
    for row, res in zip(axes, runs):
        rec = res["_records"]
        t = np.array([r[0] for r in rec if r[1] == "search" and r[3] == "OK"])
        ms = np.array([r[2] for r in rec if r[1] == "search" and r[3] == "OK"])
        if len(t):
            bins = np.arange(0, res["duration_s"] + 5, 5)
            idx = np.digitize(t, bins)
            mids, p50, p99, qps = [], [], [], []
            for b in range(1, len(bins)):
                sel = ms[idx == b]
                if len(sel):
                    mids.append(bins[b - 1] + 2.5)
                    p50.append(np.percentile(sel, 50))
                    p99.append(np.percentile(sel, 99))
            row[0].plot(mids, p50, label="search p50")
            row[0].plot(mids, p99, label="search p99")
            row[0].set_ylabel("ms")
            row[0].set_xlabel("s")
            row[0].set_yscale("log")
            row[0].legend()
            row[0].set_title(f"{res['label']}: single-search latency (5 s windows)")
        if res.get("_samples"):
            s = np.array(res["_samples"])
            row[1].plot(s[:, 0], s[:, 1] / 2**20, label="server RSS (MiB)")
            row[1].set_xlabel("s")
            row[1].set_ylabel("MiB")
            row[1].set_title(f"{res['label']}: server memory; {res['ops_per_s']:.0f} ops/s total")
            row[1].set_ylim(bottom=0)
            row[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--saturate", type=float, default=0.0, help="seconds of a second run with tight limits")
    ap.add_argument("--address", default=None, help="use a running server (no RSS sampling)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [one_run(args, {"OMP_NUM_THREADS": "1"}, args.duration, "default limits")]
    print(_table(runs[-1]), flush=True)
    if args.saturate and args.address is None:
        tight = {"OMP_NUM_THREADS": "1", "RETRIEVAL_LIMITS__MAX_INFLIGHT_REQUESTS": "2",
                 "RETRIEVAL_LIMITS__MAX_STREAMS": str(max(1, args.clients * 3 // 4)),
                 "RETRIEVAL_LIMITS__RETRY_AFTER_MS": "20"}
        runs.append(one_run(args, tight, args.saturate, "saturated (tight admission limits)"))
        print(_table(runs[-1]), flush=True)
    import psutil

    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "ram_gb": psutil.virtual_memory().total / 2**30, "mix": dict(zip(KINDS, MIX)), "data": "BIGANN-10k base",
            "index": "hnsw M=16 ef_construction=200, search ef=64 k=10"}
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    (args.out / "load.json").write_text(json.dumps({"meta": meta, "runs": clean}, indent=2))
    (args.out / "load.md").write_text("# Load test\n\n" + f"{meta}\n\n" + "\n\n".join(_table(r) for r in runs) + "\n")
    _plot(runs, args.out / "load.png")
    print(f"wrote {args.out / 'load.json'}, load.md, load.png")


if __name__ == "__main__":
    main()
