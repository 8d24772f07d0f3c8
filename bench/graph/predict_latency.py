"""PredictLinks / ScoreLinks / SimilarNodes latency over gRPC, beside the same calls in process.

Starts a real server on a loopback port, streams Cora in (edges + features), runs FastRP (d = 128) and
trains an NCN link model (``--epochs``, Cora preset) through the service, then times, one call at a time:
SimilarNodes (k = 10), PredictLinks for one node (k = 10; candidates = the 100 nearest FastRP nodes, or
200 given candidates), and ScoreLinks of 1,000 pairs. The in-process peer is the same stored model
loaded with :class:`LinkScorer` (and the same candidate lists), so the ratio is the cost of the
service (gRPC, conversion, the vector search for candidates).

    python -m bench.graph.predict_latency [--epochs 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.graph.common import DATA, environment, md_table, write_results


def _timed_pair(fa, fb, calls: int) -> tuple[dict, dict]:
    """Time two functions call by call, alternating, so load on a shared machine hits both alike."""
    for i in range(5):
        fa(i)
        fb(i)
    la, lb = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        fa(i)
        t1 = time.perf_counter()
        fb(i)
        t2 = time.perf_counter()
        la.append(t1 - t0)
        lb.append(t2 - t1)

    def stats(lat):
        lat = np.array(lat) * 1000
        return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()), "calls": calls}

    return stats(la), stats(lb)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from retrieval.client import Client
    from retrieval.graph.linkpred import LinkScorer
    from retrieval.graph.readers import read_graph
    from retrieval.graph.store import GraphStore
    from retrieval.server.process import ServerProcess

    g = read_graph(DATA / "cora").graph
    s, d, _ = g.edges()
    rng = np.random.default_rng(0)
    nodes = rng.integers(0, g.n, args.calls + 10)
    pairs = rng.integers(0, g.n, (1000, 2))
    given = rng.choice(g.n, 200, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp) / "data", env={"OMP_NUM_THREADS": "1"})
        srv.start()
        try:
            with Client(srv.address, timeout=600) as c:
                c.create_graph("cora", g.n)
                c.append_edges("cora", s, d)
                c.set_node_features("cora", g.features)
                job = c.run_fastrp("cora", dim=128, seed=0)
                assert job["state"] == "succeeded", job
                job = c.train_link_model("cora", model="ncn", preset="cora", config={"epochs": args.epochs}, seed=0,
                                         device="cpu")
                assert job["state"] == "succeeded", job
                metrics = job["result"]["metrics"]
                # the in-process peer reads the same stored model (read-only) while the server runs
                store = GraphStore(Path(tmp) / "data" / "graphs")
                sc = LinkScorer.load(store, "cora", "ncn", device="cpu")
                emb, _ = store.load_embeddings("cora", "fastrp")
                En = emb / np.linalg.norm(emb, axis=1, keepdims=True)
                cands = [c.similar_nodes("cora", [u], k=100)[0][0] for u in nodes[: args.calls + 5]]
                cases = {
                    "SimilarNodes k=10": (lambda i: c.similar_nodes("cora", [nodes[i]], k=10),
                                          lambda i: np.argsort(-(En @ En[nodes[i]]))[:11], args.calls),
                    "PredictLinks k=10, 100 FastRP candidates": (
                        lambda i: c.predict_links("cora", [nodes[i]], k=10, embedding="fastrp", num_candidates=100),
                        lambda i: sc.predict(int(nodes[i]), cands[i % len(cands)], 10), args.calls),
                    "PredictLinks k=10, 200 given candidates": (
                        lambda i: c.predict_links("cora", [nodes[i]], k=10, candidates=given),
                        lambda i: sc.predict(int(nodes[i]), given, 10), args.calls),
                    "ScoreLinks 1,000 pairs": (lambda i: c.score_links("cora", pairs[:, 0], pairs[:, 1]),
                                               lambda i: sc.score(pairs), max(20, args.calls // 10)),
                }
                grpc_res, local = {}, {}
                for name, (f_grpc, f_local, calls) in cases.items():
                    grpc_res[name], local[name] = _timed_pair(f_grpc, f_local, calls)
        finally:
            srv.stop()
    rows = []
    for name in grpc_res:
        a, b = grpc_res[name], local[name]
        rows.append([name, f"{a['p50_ms']:.2f}", f"{a['p95_ms']:.2f}", f"{b['p50_ms']:.2f}", f"{b['p95_ms']:.2f}",
                     f"{a['p50_ms'] / b['p50_ms']:.2f}x"])
    table = md_table(["call", "gRPC p50 ms", "gRPC p95 ms", "in-process p50 ms", "in-process p95 ms",
                      "gRPC / in-process (p50)"], rows)
    print(table)
    env = environment("cpu")
    results = {"grpc": grpc_res, "in_process": local, "model_metrics": metrics, "epochs": args.epochs, "env": env,
               "command": "python -m bench.graph.predict_latency " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = f"""# Link-prediction serving latency (gRPC vs in process)

Command: `{results['command']}`

Cora (2,708 nodes, 5,278 edges, 1,433 features) streamed into a server on a loopback port; FastRP d = 128
(GDS defaults, seed 0) indexed into an HNSW collection; NCN (Cora preset, {args.epochs} epochs, CPU) trained by
the service (test Hits@100 of this short run: {100 * metrics['test']['hits@100']:.2f}). One call at a time,
after 5 warm-up calls, the gRPC and the in-process call alternating; the in-process column runs the same stored model through `LinkScorer` (for
SimilarNodes: an exact numpy cosine search over the same embeddings). The in-process PredictLinks with
FastRP candidates reuses the candidate lists the service returned, so it excludes the vector search.
Machine: {env['cpu']}, 1 server thread for torch (OMP_NUM_THREADS=1), shared with other jobs.

{table}
"""
    out = write_results("predict_latency", results, md, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(grpc_res)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [grpc_res[n]["p50_ms"] for n in names], 0.4, label="gRPC p50")
        ax.bar(x + 0.2, [local[n]["p50_ms"] for n in names], 0.4, label="in process p50")
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace(", ", "\n") for n in names], fontsize=7)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title("Graph serving latency (Cora)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "predict_latency.png", dpi=120)
        plt.close(fig)
    except Exception as e:  # the numbers matter more than the picture
        print("plot failed:", e)
    return results


if __name__ == "__main__":
    main()
