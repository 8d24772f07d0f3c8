"""FastRP time and peak memory: BlogCatalog (d = 512) and seeded synthetic graphs of 10^5 and 10^6 nodes.

Each measurement runs in its own child process so its peak memory is its own: we report the wall time
of the embedding (median of ``--repeats`` untraced runs), the peak of memory allocated during one more,
traced run (``tracemalloc``, which sees numpy's buffers), and the process's peak RSS above its RSS once
the graph was loaded (0 when loading the graph peaked higher). Edges/s = undirected edges / seconds.

Peer: the FastRP authors' pipeline written with the libraries their code uses (scikit-learn's
``SparseRandomProjection`` on the transition matrix, ``M @ U`` repeated with scipy, per-power
``sklearn.preprocessing.normalize``, weighted sum, ``scale``), run in the same way on the same graphs
(not on 10^6 nodes: its sparse intermediates fill in and do not fit here). Ratios are peer / ours.

Synthetic graphs: n nodes, ``5 n`` random edges (average degree ~10): one endpoint uniform, the other
drawn with probability proportional to a power-law weight (exponent 2.5), seeded; duplicates and
self-loops removed.

    python -m bench.graph.fastrp_speed [--sizes 100000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.graph.common import DATA, environment, md_table, write_results


def synthetic_graph(n: int, seed: int = 0):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    m = 5 * n
    w = (rng.pareto(1.5, n) + 1.0)  # density ~ x^-2.5
    p = w / w.sum()
    u = rng.integers(0, n, m)
    v = rng.choice(n, size=m, p=p)
    keep = u != v
    u, v = u[keep], v[keep]
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    key = np.unique(lo.astype(np.int64) * n + hi)
    lo, hi = key // n, key % n
    A = sp.coo_matrix((np.ones(2 * len(lo), np.float32), (np.r_[lo, hi], np.r_[hi, lo])), shape=(n, n)).tocsr()
    return A, int(len(lo))


def paper_pipeline(A, dim: int, weights, beta: float, seed: int):
    """The authors' fastrp.py steps with scikit-learn / scipy (our re-implementation of their calls)."""
    import scipy.sparse as sp
    from sklearn import random_projection
    from sklearn.preprocessing import normalize, scale

    n = A.shape[0]
    deg = np.asarray(A.sum(axis=1)).ravel()
    M = sp.diags(1.0 / np.where(deg > 0, deg, 1)) @ A
    tr = random_projection.SparseRandomProjection(n_components=dim, random_state=seed)
    tr.fit(M)
    tr.components_ = tr.components_ @ sp.diags(np.power(np.where(deg > 0, deg, 1), beta))
    U = tr.transform(M)
    Us = [U]
    for _ in range(2, len(weights) + 1):
        U = M @ U
        Us.append(U)
    Us = [u.toarray() if sp.issparse(u) else np.asarray(u) for u in Us]
    Us = [normalize(u, norm="l2", axis=1) for u in Us]
    out = np.zeros_like(Us[0])
    for u, w in zip(Us, weights):
        out += u * w
    return scale(out)


def _child(spec: dict) -> dict:
    """Runs in a child process: build the graph, then time and measure one method."""
    import tracemalloc

    from retrieval.graph.fastrp import FastRPParams, fastrp
    from retrieval.graph.readers import read_graph

    if spec["graph"] == "blogcatalog":
        g = read_graph(DATA / "blogcatalog" / "blogcatalog.mat").graph
        A, m = g.adjacency(), g.num_edges
    else:
        A, m = synthetic_graph(int(spec["graph"]), seed=0)
    params = dict(spec["params"])

    def once(r):
        if spec["method"] == "ours":
            return fastrp(A, FastRPParams(**params, seed=r))
        return paper_pipeline(A, params["dim"], params["iteration_weights"], params["beta"], seed=r)

    import psutil

    rss_before = psutil.Process().memory_info().rss
    times, cpu = [], []
    load = os.getloadavg()[0]
    for r in range(spec["repeats"]):  # timing runs, no tracing
        t0, c0 = time.perf_counter(), time.process_time()
        E = once(r)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del E
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()  # one more run for the allocation peak (tracing slows it down)
    E = once(0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del E
    return {"n": int(A.shape[0]), "m": m, "nnz": int(A.nnz), "seconds": times, "median_seconds": float(np.median(times)),
            "cpu_seconds": cpu, "median_cpu_seconds": float(np.median(cpu)), "loadavg_1min": load,
            "tracemalloc_peak_bytes": int(peak), "rss_before_bytes": int(rss_before), "rss_peak_bytes": int(rss_peak),
            "rss_peak_growth_bytes": int(max(0, rss_peak - rss_before)), "edges_per_second": m / float(np.median(times)),
            "edges_per_cpu_second": m / max(1e-9, float(np.median(cpu)))}


def run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "bench.graph.fastrp_speed", "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr or "")[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="dimensions for synthetic graphs")
    ap.add_argument("--peer-max-n", type=int, default=100_000, help="largest graph the peer runs on")
    ap.add_argument("--max-dim-1m", type=int, default=128, help="largest dimension at 10^6 nodes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render-only", action="store_true", help="redo the report from the saved JSON")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    if args.render_only:
        from bench.graph.common import RESULTS

        src = Path(args.out) if args.out else RESULTS
        return render(json.loads((src / "fastrp_speed.json").read_text()), args.out)

    paper = {"iteration_weights": [0.0, 0.0, 1.0, 6.67], "beta": -0.64, "s": "li", "normalize": True,
             "propagate_normalized": False, "standardize": True}
    cases = [("blogcatalog", 512)]
    for n in args.sizes:
        for d in args.dims:
            if n >= 1_000_000 and d > args.max_dim_1m:
                continue
            cases.append((str(n), d))
    results = {"cases": [], "env": environment("cpu"), "params": paper, "repeats": args.repeats,
               "command": "python -m bench.graph.fastrp_speed " + " ".join(argv if argv is not None else sys.argv[1:])}
    for graph, d in cases:
        spec = {"graph": graph, "params": dict(paper, dim=d), "repeats": args.repeats}
        ours = run_child(dict(spec, method="ours"), args.timeout)
        n_nodes = ours.get("n", 0) if graph != "blogcatalog" else 10312
        peer = run_child(dict(spec, method="peer"), args.timeout) if n_nodes <= args.peer_max_n else {"skipped": True}
        results["cases"].append({"graph": graph, "dim": d, "ours": ours, "peer": peer})
        print(graph, d, json.dumps(ours)[:300], json.dumps(peer)[:300], flush=True)
    return render(results, args.out)


def render(results: dict, out_dir=None) -> dict:
    """Table, Markdown, JSON and PNG from the measurements (``--render-only`` redoes this from the JSON)."""
    rows = []
    for c in results["cases"]:
        ours, peer = c["ours"], c["peer"]
        if "error" in ours:
            rows.append([c["graph"], c["dim"], "error", "", "", "", "", "", "", ""])
            continue
        if "median_cpu_seconds" in peer:
            pc = (f"{peer['median_seconds']:.2f} / {peer['median_cpu_seconds']:.2f} "
                  f"({peer['median_cpu_seconds'] / ours['median_cpu_seconds']:.2f}x)")
            pm = f"{peer['tracemalloc_peak_bytes'] / 2**20:.0f} ({peer['tracemalloc_peak_bytes'] / ours['tracemalloc_peak_bytes']:.2f}x)"
        else:
            pc = "-" if peer.get("skipped") else str(peer.get("error", "-"))[:40]
            pm = "-"
        rows.append([c["graph"], c["dim"], f"{ours['n']:,}", f"{ours['m']:,}",
                     f"{ours['median_seconds']:.3f} / {ours['median_cpu_seconds']:.3f} (load {ours['loadavg_1min']:.1f})",
                     f"{ours['edges_per_second']:,.0f} / {ours['edges_per_cpu_second']:,.0f}",
                     f"{ours['tracemalloc_peak_bytes'] / 2**20:.0f}", f"{ours['rss_peak_growth_bytes'] / 2**20:.0f}", pc, pm])
    table = md_table(["graph", "d", "n", "m", "ours wall / CPU s", "edges/s (wall / CPU)", "ours peak MiB (tracemalloc)",
                      "ours RSS growth MiB", "peer wall / CPU s (CPU peer/ours)", "peer peak MiB (peer/ours)"], rows)
    print(table)
    env = results["env"]
    paper = results["params"]
    md = f"""# FastRP speed and memory

Command: `{results.get('command', 'python -m bench.graph.fastrp_speed')}`

Wall time is the median wall-clock time, CPU the median process CPU time of the same runs. The machine
was shared with other jobs (the 1-minute load average at the start of each case is shown; 2 cores), so
wall times are inflated several-fold; CPU time is the figure to compare. Edges/s = undirected edges per
wall second and per CPU second. Settings: the paper's BlogCatalog configuration at every size ({paper});
1 thread; median of {results['repeats']} runs; graph loading not timed. Peer = the authors' scikit-learn /
scipy pipeline (see the module docstring), ratio on CPU time. The paper reports 1.17 s for BlogCatalog at
d = 512. Memory: n x d float32 is {10312 * 512 * 4 / 2**20:.0f} MiB for BlogCatalog at d = 512,
{100_000 * 128 * 4 / 2**20:.0f} MiB for 10^5 x 128, {100_000 * 512 * 4 / 2**20:.0f} MiB for 10^5 x 512,
{1_000_000 * 128 * 4 / 2**20:.0f} MiB for 10^6 x 128: the peak is about three of those.
Machine: {env['cpu']}, numpy {env['numpy']}, scipy {env['scipy']}.

{table}
"""
    out = write_results("fastrp_speed", results, md, out_dir)
    _plot(results, out / "fastrp_speed.png")
    return results


def _plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels, ours_t, peer_t, ours_m, peer_m = [], [], [], [], []
    for c in results["cases"]:
        if "median_seconds" not in c["ours"]:
            continue
        labels.append(f"{c['graph']}\nd={c['dim']}")
        ours_t.append(c["ours"]["median_cpu_seconds"])
        peer_t.append(c["peer"].get("median_cpu_seconds", np.nan))
        ours_m.append(c["ours"]["tracemalloc_peak_bytes"] / 2**20)
        peer_m.append(c["peer"].get("tracemalloc_peak_bytes", np.nan) / 2**20)
    x = np.arange(len(labels))
    for ax, a, b, yl in ((axes[0], ours_t, peer_t, "CPU seconds"), (axes[1], ours_m, peer_m, "peak MiB (tracemalloc)")):
        ax.bar(x - 0.2, a, 0.4, label="ours")
        ax.bar(x + 0.2, b, 0.4, label="authors' pipeline (sklearn)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(yl)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("FastRP embedding time")
    axes[1].set_title("FastRP peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
