"""PredictLinks / ScoreLinks / SimilarNodes latency over gRPC, beside the same calls in process.

Starts a real server on a loopback port, streams a graph in (edges, and features when it has them), runs
FastRP (d = 128) and trains the link models (NCN and / or NCNC, Cora preset, ``--epochs``) through the
service, then times, one call at a time: SimilarNodes (k = 10), PredictLinks for one node (k = 10;
candidates = the 100 nearest FastRP nodes, or 200 given candidates, or every node with ``--every-calls``),
and ScoreLinks of ``--pairs`` random pairs (fresh pairs on every call, so no call is answered from what an
earlier one computed). The in-process peer is the same stored model loaded with :class:`LinkScorer` (and
the same candidate lists), so the ratio is the cost of the service (gRPC, conversion, the vector search
for candidates).

    python -m bench.graph.predict_latency [--epochs 5] [--calls 200]                       # Cora, NCN
    python -m bench.graph.predict_latency --graph blogcatalog --predictors ncn ncnc \\
        --epochs 1 --max-batches 10 --calls 100 --score-calls 10 --every-calls 3            # BlogCatalog

BlogCatalog has no node features: its models use ``input="learnable"`` and train on every edge
(``evaluate="none"``, a few batches: the numbers here are about speed, not accuracy). ``--quantize int8``
also times each model served with int8 weights (opt-in), in process, beside the exact one, with how far
it moves the answers. ``--baseline``
names an earlier result JSON of the same bench (e.g. measured before a change) to print beside this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.graph.common import DATA, environment, md_table, write_results

GRAPHS = {
    "cora": dict(path=DATA / "cora", fmt=None, title="Cora", config={}, evaluate="holdout"),
    "blogcatalog": dict(path=DATA / "blogcatalog" / "blogcatalog.mat", fmt=None, title="BlogCatalog",
                        config={"input": "learnable"}, evaluate="none"),
}


def _stats(lat) -> dict:
    lat = np.array(lat) * 1000
    return {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()), "calls": len(lat)}


def _timed_pair(fa, fb, calls: int, warmup: int = 5) -> tuple[dict, dict]:
    """Time two functions call by call, alternating, so load on a shared machine hits both alike.
    Call ``i`` of both gets the same argument ``i`` (warm-up calls use ``calls + 0 .. warmup - 1``)."""
    for i in range(warmup):
        fa(calls + i)
        fb(calls + i)
    la, lb = [], []
    for i in range(calls):
        t0 = time.perf_counter()
        fa(i)
        t1 = time.perf_counter()
        fb(i)
        t2 = time.perf_counter()
        la.append(t1 - t0)
        lb.append(t2 - t1)
    return _stats(la), _stats(lb)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph", choices=sorted(GRAPHS), default="cora")
    ap.add_argument("--predictors", nargs="+", choices=["ncn", "ncnc"], default=["ncn"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-batches", type=int, default=None, help="training batches per epoch (None: all)")
    ap.add_argument("--calls", type=int, default=200, help="timed SimilarNodes / PredictLinks calls")
    ap.add_argument("--score-calls", type=int, default=None, help="timed ScoreLinks calls (default calls // 10, >= 20)")
    ap.add_argument("--pairs", type=int, default=1000, help="pairs per ScoreLinks call")
    ap.add_argument("--every-calls", type=int, default=0, help="timed PredictLinks calls over every node (0: none)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--res-deg", type=int, default=0,
                    help="also an NCNC model with test_res_deg = this (sampled completion, the reference's --tstdeg)")
    ap.add_argument("--quantize", choices=["int8"], default=None,
                    help="also time each model served with this opt-in quantisation, in process, beside the exact one")
    ap.add_argument("--baseline", default=None, help="an earlier result JSON of this bench to compare with")
    ap.add_argument("--note", default="", help="a line for the report (what this run measures)")
    ap.add_argument("--name", default=None, help="result file name (default predict_latency[_<graph>])")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process peer (the server: 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.score_calls = args.score_calls or max(20, args.calls // 10)
    return args


def _cases(c, sc, model, nodes, cands, given, pair_sets, args, n):
    """name -> (gRPC call, in-process call, timed calls) for one model."""
    cases = {
        "PredictLinks k=10, 100 FastRP candidates": (
            lambda i: c.predict_links("g", [nodes[i]], k=10, model=model, embedding="fastrp", num_candidates=100),
            lambda i: sc.predict(int(nodes[i]), cands[i], 10), args.calls),
        "PredictLinks k=10, 200 given candidates": (
            lambda i: c.predict_links("g", [nodes[i]], k=10, model=model, candidates=given),
            lambda i: sc.predict(int(nodes[i]), given, 10), args.calls),
        f"ScoreLinks {args.pairs:,} pairs": (
            lambda i: c.score_links("g", pair_sets[i][:, 0], pair_sets[i][:, 1], model=model),
            lambda i: sc.score(pair_sets[i]), args.score_calls),
    }
    if args.every_calls:
        cases[f"PredictLinks k=10, every node ({n:,})"] = (
            lambda i: c.predict_links("g", [nodes[i]], k=10, model=model),
            lambda i: sc.predict(int(nodes[i]), None, 10), args.every_calls)
    return cases


def _agreement(exact, capped, nodes, cands, pair_sets, args) -> dict:
    """How far an approximate serving (the sampled completion ``test_res_deg``, or int8 weights) moves the
    answers: top-10 overlap of PredictLinks (100 FastRP candidates) and |delta p| of ScoreLinks, against the
    exact model (the same weights)."""
    same = all(a.equal(b) for a, b in zip(exact.model.state_dict().values(), capped.model.state_dict().values()))
    overlap = [len(set(exact.predict(int(u), cands[i], 10)[0]) & set(capped.predict(int(u), cands[i], 10)[0])) / 10
               for i, u in enumerate(nodes[: args.calls])]
    dp = np.concatenate([np.abs(exact.score(q) - capped.score(q)) for q in pair_sets[:3]])
    return {"res_deg": args.res_deg, "same_weights": bool(same), "top10_overlap_mean": float(np.mean(overlap)),
            "top10_overlap_min": float(np.min(overlap)), "score_abs_diff_mean": float(dp.mean()),
            "score_abs_diff_max": float(dp.max())}


def _quantized(store, scorers, models, nodes, cands, given, pair_sets, args, n) -> dict:
    """Each model served exact and with ``--quantize`` (a second copy of the stored model), in process, the
    two calls alternating: p50 / p95 of both and the agreement (:func:`_agreement`)."""
    from retrieval.graph.linkpred import LinkScorer

    out = {}
    for p in models:
        if "deg" in p:
            continue
        exact = scorers[p]
        q = LinkScorer.load(store, "g", p, device="cpu", quantize=args.quantize)
        cases = {"PredictLinks k=10, 100 FastRP candidates": (lambda i, s: s.predict(int(nodes[i]), cands[i], 10), args.calls),
                 "PredictLinks k=10, 200 given candidates": (lambda i, s: s.predict(int(nodes[i]), given, 10), args.calls),
                 f"ScoreLinks {args.pairs:,} pairs": (lambda i, s: s.score(pair_sets[i]), args.score_calls)}
        if args.every_calls:
            cases[f"PredictLinks k=10, every node ({n:,})"] = (lambda i, s: s.predict(int(nodes[i]), None, 10),
                                                               args.every_calls)
        res = {}
        for name, (f, calls) in cases.items():
            a, b = _timed_pair(lambda i, f=f, s=exact: f(i, s), lambda i, f=f, s=q: f(i, s), calls, args.warmup)
            res[name] = {"exact": a, args.quantize: b}
            print(f"{p.upper()} {name}: exact {a['p50_ms']:.2f} ms, {args.quantize} {b['p50_ms']:.2f} ms", flush=True)
        agree = _agreement(exact, q, nodes, cands, pair_sets, args)
        agree.pop("res_deg")
        out[p] = {"calls": res, "agreement": agree}
    return out


def _measure(args) -> dict:
    import torch

    from retrieval.client import Client
    from retrieval.graph.linkpred import LinkScorer
    from retrieval.graph.readers import read_graph
    from retrieval.graph.store import GraphStore
    from retrieval.server.process import ServerProcess

    torch.set_num_threads(args.threads)
    spec = GRAPHS[args.graph]
    g = read_graph(spec["path"]).graph
    s, d, _ = g.edges()
    rng = np.random.default_rng(0)
    nodes = rng.integers(0, g.n, args.calls + args.warmup + 5)
    pair_sets = rng.integers(0, g.n, (args.score_calls + args.warmup, args.pairs, 2))
    given = rng.choice(g.n, 200, replace=False)
    out = {"grpc": {}, "in_process": {}, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp) / "data", env={"OMP_NUM_THREADS": "1"})
        srv.start()
        try:
            with Client(srv.address, timeout=3600) as c:
                c.create_graph("g", g.n)
                c.append_edges("g", s, d)
                if g.features is not None:
                    c.set_node_features("g", g.features)
                job = c.run_fastrp("g", dim=128, seed=0)
                assert job["state"] == "succeeded", job
                models = {p: dict(spec["config"], predictor=p, epochs=args.epochs) for p in args.predictors}
                if args.res_deg and "ncnc" in models:  # the reference's --tstdeg: an opt-in sampled completion
                    models[f"ncnc-deg{args.res_deg}"] = dict(models["ncnc"], test_res_deg=args.res_deg)
                for p, cfg in models.items():
                    if args.max_batches:
                        cfg["max_batches"] = args.max_batches
                    t0 = time.perf_counter()
                    job = c.train_link_model("g", model=p, preset="cora", config=cfg, seed=0, device="cpu",
                                             evaluate=spec["evaluate"])
                    assert job["state"] == "succeeded", job
                    out["train"][p] = {"config": cfg, "seconds": time.perf_counter() - t0,
                                       "metrics": job["result"].get("metrics")}
                # the in-process peer reads the same stored models (read-only) while the server runs
                store = GraphStore(Path(tmp) / "data" / "graphs")
                emb, _ = store.load_embeddings("g", "fastrp")
                En = emb / np.linalg.norm(emb, axis=1, keepdims=True)
                cands = [c.similar_nodes("g", [u], k=100)[0][0] for u in nodes]
                cases = {"SimilarNodes k=10": (lambda i: c.similar_nodes("g", [nodes[i]], k=10),
                                               lambda i: np.argsort(-(En @ En[nodes[i]]))[:11], args.calls)}
                for name, (fa, fb, calls) in cases.items():
                    out["grpc"][name], out["in_process"][name] = _timed_pair(fa, fb, calls, args.warmup)
                scorers = {}
                for p in models:
                    sc = scorers[p] = LinkScorer.load(store, "g", p, device="cpu")
                    for name, (fa, fb, calls) in _cases(c, sc, p, nodes, cands, given, pair_sets, args, g.n).items():
                        key = f"{p.upper()} {name}"
                        out["grpc"][key], out["in_process"][key] = _timed_pair(fa, fb, calls, args.warmup)
                        if name.startswith("ScoreLinks"):
                            for side in ("grpc", "in_process"):
                                out[side][key]["pairs_per_s"] = args.pairs / (out[side][key]["p50_ms"] / 1000)
                        print(f"{key}: gRPC p50 {out['grpc'][key]['p50_ms']:.2f} ms, in process "
                              f"{out['in_process'][key]['p50_ms']:.2f} ms", flush=True)
                capped = f"ncnc-deg{args.res_deg}"
                if capped in scorers:
                    out["res_deg"] = _agreement(scorers["ncnc"], scorers[capped], nodes, cands, pair_sets, args)
                if args.quantize:
                    out["quantized"] = _quantized(store, scorers, models, nodes, cands, given, pair_sets, args, g.n)
        finally:
            srv.stop()
    out["graph"] = {"name": spec["title"], "n": g.n, "m": int(g.num_edges),
                    "features": None if g.features is None else int(g.features.shape[1])}
    return out


def _table(res: dict) -> str:
    rows = []
    for name in res["grpc"]:
        a, b = res["grpc"][name], res["in_process"][name]
        rows.append([name, f"{a['p50_ms']:.2f}", f"{a['p95_ms']:.2f}", f"{b['p50_ms']:.2f}", f"{b['p95_ms']:.2f}",
                     f"{a['p50_ms'] / b['p50_ms']:.2f}x"])
    return md_table(["call", "gRPC p50 ms", "gRPC p95 ms", "in-process p50 ms", "in-process p95 ms",
                     "gRPC / in-process (p50)"], rows)


def _score_rate_table(res: dict) -> str:
    rows = [[name, f"{res['grpc'][name]['pairs_per_s']:,.0f}", f"{res['in_process'][name]['pairs_per_s']:,.0f}"]
            for name in res["grpc"] if "pairs_per_s" in res["grpc"][name]]
    return md_table(["call", "gRPC pairs/s (p50)", "in-process pairs/s (p50)"], rows) if rows else ""


def _quantized_md(res: dict, mode: str) -> str:
    """The in-process exact vs quantised table and the agreement lines."""
    rows, lines = [], []
    for p, r in res.items():
        for name, c in r["calls"].items():
            a, b = c["exact"], c[mode]
            rows.append([f"{p.upper()} {name}", f"{a['p50_ms']:.2f}", f"{b['p50_ms']:.2f}", f"{a['p95_ms']:.2f}",
                         f"{b['p95_ms']:.2f}", f"{a['p50_ms'] / b['p50_ms']:.2f}x"])
        g = r["agreement"]
        lines.append(f"{p.upper()} {mode} against exact: PredictLinks top-10 overlap {g['top10_overlap_mean']:.3f} on "
                     f"average (lowest {g['top10_overlap_min']:.1f}), ScoreLinks |delta p| "
                     f"{g['score_abs_diff_mean']:.4f} on average ({g['score_abs_diff_max']:.4f} at most).")
    table = md_table(["call (in process)", "exact p50 ms", f"{mode} p50 ms", "exact p95 ms", f"{mode} p95 ms",
                      "speed-up (p50)"], rows)
    return (f"\n## Opt-in {mode} serving (in process)\n\nThe same stored models loaded a second time with "
            f"`LinkScorer.load(..., quantize=\"{mode}\")` (the hidden x hidden linear layers of the pair MLPs "
            "dynamically quantised; the cached node products stay fp32); the exact and the quantised call "
            "alternate. Not reachable over gRPC yet (no request or config field carries it).\n\n"
            + table + "\n\n" + "\n".join(lines) + "\n")


def _baseline_table(res: dict, base: dict) -> str:
    rows = []
    for name in res["grpc"]:
        if name not in base.get("grpc", {}):
            continue
        row = [name]
        for side in ("grpc", "in_process"):
            before, after = base[side][name]["p50_ms"], res[side][name]["p50_ms"]
            row += [f"{before:.2f}", f"{after:.2f}", f"{before / after:.1f}x"]
        rows.append(row)
    return md_table(["call (p50 ms)", "gRPC before", "gRPC after", "speed-up", "in-process before",
                     "in-process after", "speed-up"], rows) if rows else ""


def _plot(res: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(res["grpc"])
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [res["grpc"][n]["p50_ms"] for n in names], 0.4, label="gRPC p50")
        ax.bar(x + 0.2, [res["in_process"][n]["p50_ms"] for n in names], 0.4, label="in process p50")
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace(", ", "\n") for n in names], fontsize=6)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    except Exception as e:  # the numbers matter more than the picture
        print("plot failed:", e)


def main(argv=None) -> dict:
    args = _parse(argv)
    res = _measure(args)
    env = environment("cpu")
    name = args.name or ("predict_latency" if args.graph == "cora" else f"predict_latency_{args.graph}")
    command = "python -m bench.graph.predict_latency " + " ".join(argv if argv is not None else sys.argv[1:])
    from retrieval.graph.ncn import SERVE_CHUNK, serving_linear

    kernel = "oneDNN (`torch.ops.mkldnn._linear_pointwise`)" if serving_linear() else "`F.linear` (MKL)"
    results = dict(res, epochs=args.epochs, max_batches=args.max_batches, pairs=args.pairs, env=env,
                   command=command, note=args.note, serving_linear=kernel)
    table, rates = _table(res), _score_rate_table(res)
    gi = res["graph"]
    feats = f"{gi['features']:,} features" if gi["features"] else "no node features"
    trained = []
    for p, t in res["train"].items():
        hits = (t.get("metrics") or {}).get("test", {}).get("hits@100")
        trained.append(f"{p.upper()} ({t['config']}, {t['seconds']:.0f} s to train"
                       + (f", test Hits@100 {100 * hits:.2f}" if hits is not None else ", trained on every edge")
                       + ")")
    cap_md = ""
    if "res_deg" in res:
        r = res["res_deg"]
        cap_md = (f"\nNCNC-DEG{r['res_deg']} is the NCNC model (the same weights: {r['same_weights']}) serving with "
                  f"`test_res_deg = {r['res_deg']}` (opt-in; the reference's `--tstdeg`): at most {r['res_deg']} "
                  "residual neighbours per side of a target are sampled (with replacement, reweighted) for the "
                  "completion, so its scores are random and approximate. Against the exact model: PredictLinks "
                  f"top-10 overlap {r['top10_overlap_mean']:.3f} on average (lowest {r['top10_overlap_min']:.1f}), "
                  f"ScoreLinks |delta p| {r['score_abs_diff_mean']:.4f} on average ({r['score_abs_diff_max']:.4f} "
                  "at most).\n")
    quant_md = _quantized_md(res["quantized"], args.quantize) if res.get("quantized") else ""
    base_md = ""
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        results["baseline"] = {"file": args.baseline, "command": base.get("command"),
                               "git": base.get("env", {}).get("git"), "grpc": base["grpc"],
                               "in_process": base["in_process"]}
        base_md = (f"\n## Before / after\n\nBefore: `{args.baseline}` (git {base.get('env', {}).get('git')}, "
                   f"`{base.get('command')}`), an earlier run on the same shared machine (so the load can differ "
                   "between the two columns).\n\n"
                   + _baseline_table(res, base) + "\n")
    md = f"""# Link-prediction serving latency on {gi['name']} (gRPC vs in process)

Command: `{command}`
{args.note}

{gi['name']} ({gi['n']:,} nodes, {gi['m']:,} edges, {feats}) streamed into a server on a loopback port;
FastRP d = 128 (GDS defaults, seed 0) indexed into an HNSW collection; models trained by the service:
{'; '.join(trained)}. One call at a time, after {args.warmup} warm-up calls, the gRPC and the in-process call
alternating; the in-process column runs the same stored model through `LinkScorer` (for SimilarNodes: an
exact numpy cosine search over the same embeddings). The in-process PredictLinks with FastRP candidates
reuses the candidate lists the service returned, so it excludes the vector search. ScoreLinks draws fresh
random pairs for every call. Machine: {env['cpu']}, {env['cpu_count']} vCPUs shared with other jobs, 1 torch
thread in the server (OMP_NUM_THREADS=1) and {env['torch_threads']} in the bench process. The served NCN / NCNC
pair MLPs run in chunks of {SERVE_CHUNK} pairs, their fp32 linear layers through {kernel}.

{table}

{rates}
{cap_md}{quant_md}{base_md}"""
    out = write_results(name, results, md, args.out)
    _plot(res, out / f"{name}.png", f"Graph serving latency ({gi['name']})")
    print(table)
    if rates:
        print(rates)
    return results


if __name__ == "__main__":
    main()
