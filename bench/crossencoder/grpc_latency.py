"""Query latency of the CrossEncoder service over gRPC, split into scorer time and the rest.

Starts a real server (loopback), builds an index with the live MiniLM joint scorer through the
client (a job), then sends single-query searches in every mode and records, per query: the client's
round-trip latency, the server's time inside the scorer, the server's time outside it (embedding
solve, vector search, dual encoder, bookkeeping), and what is left (gRPC, serialisation, executor
hand-off, the wire). The issue's goal: the rest under 10% of a query's time.

    nohup python -m bench.crossencoder.grpc_latency --precision fp32 > /tmp/ce-grpc.log 2>&1 &

Writes ``bench/results/crossencoder/grpc_latency_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.crossencoder.fixture import load_fixture
from bench.crossencoder.live import pick_task

RESULTS = Path(__file__).resolve().parents[1] / "results" / "crossencoder"
MODES = ("cur", "adaptive", "adaptive-seeded", "rerank")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-items", type=int, default=60)
    ap.add_argument("--k-q", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=5)
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from bench.ann.machine import machine_info, versions
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    fx = load_fixture()
    t = pick_task(args.n_items, args.n_test, args.k_q)
    items = [{"id": c, "text": fx.items[c], "payload": {"fixture_col": c}} for c in t["item_cols"]]
    queries = [fx.queries[r] for r in t["test_rows"]]
    anchors = [fx.queries[r] for r in t["anchor_rows"]]
    scorer = {"name": "minilm-joint", "precision": args.precision, "device": args.device, "batch_size": 32}
    de = {"name": "minilm", "device": args.device}
    tmp = Path(tempfile.mkdtemp(prefix="ce-grpc-"))
    srv = ServerProcess(tmp / "data", env={"OMP_NUM_THREADS": str(args.threads)})
    rows: list[dict[str, Any]] = []
    try:
        srv.start()
        with Client(srv.address, timeout=600) as c:
            t0 = time.perf_counter()
            job = c.build_ce_index("bench", scorer, items=items, anchor_queries=anchors, dual_encoder=de,
                                   params={"k_i": min(100, max(2, len(items) // 4)), "chunk_size": 8})
            build_s = time.perf_counter() - t0
            if job["state"] != "succeeded":
                raise SystemExit(f"build failed: {job}")
            print(f"built over gRPC: {job['result']['calls']} calls in {build_s:.1f}s", flush=True)
            c.ce_search("bench", queries[0], k=args.k, mode="cur", budget=args.budget)  # warm-up (model load)
            for mode in MODES:
                per = [c.ce_search("bench", q, k=args.k, mode=mode, budget=args.budget) for q in queries]
                lat = np.array([p["latency_seconds"] for p in per])
                sc = np.array([p["scorer_seconds"] for p in per])
                ot = np.array([p["other_seconds"] for p in per])
                row = {"mode": mode, "budget": args.budget, "calls_per_query": float(np.mean([p["calls"] for p in per])),
                       "latency_ms": 1000 * float(lat.mean()), "scorer_ms": 1000 * float(sc.mean()),
                       "server_other_ms": 1000 * float(ot.mean()),
                       "grpc_and_wire_ms": 1000 * float((lat - sc - ot).mean()),
                       "rest_share": float((lat.sum() - sc.sum()) / lat.sum())}
                rows.append(row)
                print(f"{mode:<16s} latency={row['latency_ms']:.0f}ms scorer={row['scorer_ms']:.0f}ms "
                      f"server-other={row['server_other_ms']:.1f}ms grpc+wire={row['grpc_and_wire_ms']:.1f}ms "
                      f"rest={100 * row['rest_share']:.1f}%", flush=True)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "crossencoder.grpc_latency", "tag": args.tag, "scorer": scorer, "dual_encoder": de,
              "n_items": len(items), "k_q": len(anchors), "n_queries": len(queries), "k": args.k,
              "build": {"calls": job["result"]["calls"], "seconds": build_s,
                        "scorer_seconds": job["result"]["scorer_seconds"]},
              "rows": rows, "machine": machine_info(), "versions": versions()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"grpc_latency_{args.tag}.json").write_text(json.dumps(result, indent=1))
    L = [f"# Cross-encoder search over gRPC: where a query's time goes ({args.tag})", "",
         f"A real server on loopback, the MiniLM joint scorer ({args.precision}, device {args.device}, "
         f"{args.threads} thread(s)), {len(items)} items, k_q = {len(anchors)}, {len(queries)} single-query "
         f"searches per mode, k = {args.k}, budget {args.budget} calls. Index built over gRPC as a job: "
         f"{job['result']['calls']} calls in {build_s:.1f} s. Machine: {result['machine']['cpu']}.", "",
         "| mode | calls | latency ms | scorer ms | server other ms | gRPC + wire ms | rest share |",
         "|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['mode']} | {r['calls_per_query']:.0f} | {r['latency_ms']:.1f} | {r['scorer_ms']:.1f} | "
                 f"{r['server_other_ms']:.2f} | {r['grpc_and_wire_ms']:.2f} | {100 * r['rest_share']:.1f}% |")
    L += ["", "rest = latency - scorer time (server other + gRPC + wire). Produced by "
          "`python -m bench.crossencoder.grpc_latency`.", ""]
    (args.out / f"grpc_latency_{args.tag}.md").write_text("\n".join(L))
    return result


if __name__ == "__main__":
    main()
