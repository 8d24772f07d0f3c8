"""Tuned FastRP vs a spectral embedding vs FastRP's fixed settings, on every labelled graph we ship.

Graphs: BlogCatalog and PPI (multi-label, ``.mat``), Cora and CiteSeer (Planetoid, single-label). Only the
graph structure is embedded (no node features), at one dimension d (default 128) for every method:

- ``spectral``: the d eigenvectors of the largest eigenvalues of ``D^-1/2 A D^-1/2``
  (``scipy.sparse.linalg.eigsh``, which="LA", seeded start vector), columns standardised;
- ``fastrp_paper``: the FastRP paper's BlogCatalog setting (weights [0, 0, 1, 6.67], beta -0.64, s = sqrt(n));
- ``fastrp_default``: our defaults (the Neo4j GDS ones: weights [0, 1, 1], beta 0, s 3);
- ``fastrp_tuned``: :func:`retrieval.graph.fastrp_tune.tune_fastrp` on the *training* labels of each
  split (the test nodes are unlabeled for the tuner), then :func:`fastrp` with the chosen parameters;
  its time includes the tuning.

Evaluation: the FastRP paper's protocol (:func:`bench.graph.fastrp_blogcatalog.evaluate_embedding`):
one-vs-rest logistic regression (C = 0.1, liblinear) on a random 10 / 50 / 90% of the labelled nodes,
top-k labels per test node, Micro- / Macro-F1 averaged over shuffles. Every timed call runs with one
BLAS thread (threadpoolctl); wall and CPU seconds are both recorded (the machine is shared).

    python -m bench.graph.fastrp_tune [--graphs blogcatalog ppi cora citeseer] [--dim 128] [--shuffles 3]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import scipy.sparse as sp

from bench.graph.common import DATA, environment, md_table, write_results
from bench.graph.fastrp_blogcatalog import evaluate_embedding, split_nodes
from retrieval.graph.fastrp import describe_params

GRAPHS = {"blogcatalog": DATA / "blogcatalog" / "blogcatalog.mat", "ppi": DATA / "ppi" / "PPI_subgraph.mat",
          "cora": DATA / "cora", "citeseer": DATA / "citeseer"}
METHODS = ("spectral", "fastrp_paper", "fastrp_default", "fastrp_tuned")


def spectral_embedding(A, d: int, seed: int = 0) -> np.ndarray:
    """The top-d eigenvectors of ``D^-1/2 A D^-1/2`` (isolated nodes: 0 rows), standardised columns."""
    from scipy.sparse.linalg import eigsh

    A = sp.csr_matrix(A, dtype=np.float64)
    deg = np.asarray(A.sum(axis=1)).ravel()
    dinv = np.zeros_like(deg)
    dinv[deg > 0] = 1.0 / np.sqrt(deg[deg > 0])
    M = sp.diags(dinv) @ A @ sp.diags(dinv)
    _, U = eigsh(M, k=d, which="LA", v0=np.random.default_rng(seed).random(A.shape[0]))
    E = U[:, ::-1].astype(np.float32)
    sd = E.std(0)
    sd[sd == 0] = 1.0
    return (E - E.mean(0)) / sd


def _warm_up() -> None:
    """Load every BLAS the timed code uses before threadpoolctl limits them (it limits only loaded ones)."""
    import scipy.sparse.linalg  # noqa: F401  (ARPACK and its BLAS)
    from threadpoolctl import threadpool_info

    spectral_embedding(sp.random(64, 64, density=0.2, random_state=0, format="csr") + sp.eye(64), 4)
    assert threadpool_info(), "threadpoolctl sees no BLAS"


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _labels(g):
    """(labelled node ids, 0/1 matrix [labelled, L]) of a graph's single- or multi-labels."""
    L = g.labels
    if L.multilabel:
        lab = np.flatnonzero(np.diff(L.Y.indptr) > 0)
        return lab, L.Y[lab].toarray().astype(np.int8)
    lab = np.flatnonzero(L.y >= 0)
    Y = np.zeros((len(lab), int(L.y.max()) + 1), np.int8)
    Y[np.arange(len(lab)), L.y[lab]] = 1
    return lab, Y


def _tuner_labels(g, lab, train_pos):
    """The graph's labels with every node outside the training split unlabeled (what the tuner may see)."""
    keep = np.zeros(g.n, bool)
    keep[lab[train_pos]] = True
    if g.labels.multilabel:
        return sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ g.labels.Y)
    y = g.labels.y.copy()
    y[~keep] = -1
    return y


def run_graph(name: str, args) -> dict:
    from threadpoolctl import threadpool_limits

    from retrieval.graph.fastrp import GDS_DEFAULTS, PAPER_BLOGCATALOG, FastRPParams, fastrp
    from retrieval.graph.fastrp_tune import tune_fastrp
    from retrieval.graph.readers import read_graph

    g = read_graph(GRAPHS[name]).graph
    A = g.adjacency()
    lab, Y = _labels(g)
    d = args.dim
    _warm_up()
    out = {"n": g.n, "m": g.num_edges, "labelled": int(len(lab)), "labels": int(Y.shape[1]),
           "multilabel": bool(g.labels.multilabel), "methods": {}}
    fixed = {"fastrp_paper": FastRPParams(**dict(PAPER_BLOGCATALOG, dim=d)),
             "fastrp_default": FastRPParams(**dict(GDS_DEFAULTS, dim=d))}
    embs, secs = {}, {}
    with threadpool_limits(1):
        runs = [_timed(lambda: spectral_embedding(A, d, 0)) for _ in range(args.timing_repeats)]
        embs["spectral"] = runs[0][0]
        secs["spectral"] = runs
        for m, p in fixed.items():
            runs = [_timed(lambda p=p: fastrp(A, p)) for _ in range(args.timing_repeats)]
            embs[m], secs[m] = runs[0][0], runs
    for m in ("spectral", *fixed):
        out["methods"][m] = {"wall_s": float(np.median([r[1] for r in secs[m]])),
                             "cpu_s": float(np.median([r[2] for r in secs[m]])), "f1": {}}
        if m in fixed:
            out["methods"][m]["params"] = fixed[m].as_dict()
    tuned = {"wall_s": [], "cpu_s": [], "tune_wall_s": [], "f1": {}, "runs": []}
    for pc in args.percents:
        for m in ("spectral", *fixed):
            f = [evaluate_embedding(embs[m][lab], Y, pc, sh, args.C, args.solver) for sh in range(args.shuffles)]
            out["methods"][m]["f1"][str(pc)] = _summary(f)
        f = []
        for sh in range(args.shuffles):
            tr, _ = split_nodes(len(lab), pc, sh)
            y_tune = _tuner_labels(g, lab, tr)
            with threadpool_limits(1):
                (params, report), tw, tc = _timed(lambda: tune_fastrp(A, y_tune, dims=(d,), seed=sh))
                E, ew, ec = _timed(lambda: fastrp(A, params))
            tuned["wall_s"].append(tw + ew)
            tuned["cpu_s"].append(tc + ec)
            tuned["tune_wall_s"].append(tw)
            f.append(evaluate_embedding(E[lab], Y, pc, sh, args.C, args.solver))
            report = {k: v for k, v in report.items() if k != "top"}
            tuned["runs"].append({"percent": pc, "shuffle": sh, "micro": f[-1][0], "macro": f[-1][1],
                                  "wall_s": tw + ew, "report": report})
            print(f"  {name} {pc}% shuffle {sh}: tuned micro {f[-1][0]:.4f} in {tw + ew:.2f}s "
                  f"(val {report['score']:.4f}, base {report['base_score']:.4f}; "
                  f"{describe_params(report['params'])})", flush=True)
        tuned["f1"][str(pc)] = _summary(f)
    out["methods"]["fastrp_tuned"] = {"wall_s": float(np.median(tuned["wall_s"])),
                                      "cpu_s": float(np.median(tuned["cpu_s"])),
                                      "wall_s_max": float(np.max(tuned["wall_s"])),
                                      "tune_wall_s": float(np.median(tuned["tune_wall_s"])),
                                      "f1": tuned["f1"], "runs": tuned["runs"]}
    sp_ = out["methods"]["spectral"]
    tu = out["methods"]["fastrp_tuned"]
    out["target"] = {str(pc): {"micro_ge_spectral": tu["f1"][str(pc)]["micro_mean"] >= sp_["f1"][str(pc)]["micro_mean"]}
                     for pc in args.percents}
    out["target_time"] = {"wall_ratio": tu["wall_s"] / sp_["wall_s"], "cpu_ratio": tu["cpu_s"] / sp_["cpu_s"],
                          "wall_le_half": tu["wall_s"] <= 0.5 * sp_["wall_s"],
                          "cpu_le_half": tu["cpu_s"] <= 0.5 * sp_["cpu_s"]}
    return out


def _summary(f):
    mi, ma = [x[0] for x in f], [x[1] for x in f]
    return {"micro_mean": float(np.mean(mi)), "micro_std": float(np.std(mi)), "macro_mean": float(np.mean(ma)),
            "macro_std": float(np.std(ma)), "runs": len(f)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shuffles", type=int, default=3)
    ap.add_argument("--percents", type=int, nargs="+", default=[10, 50, 90])
    ap.add_argument("--C", type=float, default=0.1)
    ap.add_argument("--solver", default="liblinear")
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore", FutureWarning)

    results = {"protocol": {"dim": args.dim, "percents": args.percents, "shuffles": args.shuffles,
                            "classifier": f"one-vs-rest LogisticRegression(C={args.C}, solver={args.solver})",
                            "threads": 1, "tuner": "tune_fastrp(A, training labels, dims=(dim,), seed=shuffle)"},
               "graphs": {}, "env": environment("cpu")}
    for name in args.graphs:
        print(f"== {name}", flush=True)
        results["graphs"][name] = run_graph(name, args)

    md = _report(results, args)
    print(md)
    out = write_results("fastrp_tune", results, md, args.out)
    _plot(results, args, out / "fastrp_tune.png")
    return results


def _report(results: dict, args) -> str:
    hdr = ["graph", "method"] + [f"Micro {pc}%" for pc in args.percents] + [f"Macro {pc}%" for pc in args.percents] \
        + ["wall s", "CPU s"]
    rows = []
    for name, r in results["graphs"].items():
        for m in METHODS:
            x = r["methods"][m]
            rows.append([name, m] + [f"{x['f1'][str(pc)]['micro_mean']:.4f}" for pc in args.percents]
                        + [f"{x['f1'][str(pc)]['macro_mean']:.4f}" for pc in args.percents]
                        + [f"{x['wall_s']:.3f}", f"{x['cpu_s']:.3f}"])
    thdr = ["graph", "n", "m"] + [f"tuned >= spectral Micro {pc}%" for pc in args.percents] \
        + ["tuned / spectral wall", "tuned / spectral CPU", "target met"]
    trows = []
    for name, r in results["graphs"].items():
        ok_f1 = [r["target"][str(pc)]["micro_ge_spectral"] for pc in args.percents]
        t = r["target_time"]
        met = all(ok_f1) and t["wall_le_half"] and t["cpu_le_half"]
        trows.append([name, f"{r['n']:,}", f"{r['m']:,}"] + ["yes" if o else "no" for o in ok_f1]
                     + [f"{t['wall_ratio']:.2f}", f"{t['cpu_ratio']:.2f}", "yes" if met else "no"])
    chosen = []
    for name, r in results["graphs"].items():
        for run in r["methods"]["fastrp_tuned"]["runs"]:
            rep = run["report"]
            chosen.append([name, run["percent"], run["shuffle"], describe_params(rep["params"]), f"{rep['score']:.4f}",
                           f"{rep['base_score']:.4f}", rep["candidates"], f"{run['wall_s']:.3f}", f"{run['micro']:.4f}"])
    gaps = []
    for name, r in results["graphs"].items():
        d = [r["methods"]["fastrp_tuned"]["f1"][str(pc)]["micro_mean"] - r["methods"]["spectral"]["f1"][str(pc)]["micro_mean"]
             for pc in args.percents]
        gaps.append(f"{name} " + " / ".join(f"{x:+.4f}" for x in d))
    env = results["env"]
    notes = f"""Tuned minus spectral Micro-F1 at {' / '.join(f'{pc}%' for pc in args.percents)}: {'; '.join(gaps)}.

Notes. Every timed call runs with one BLAS thread (the tuner limits itself to one by default; a 2-thread
OpenBLAS on this shared 2-core machine made `eigsh` 10x slower, not faster). The tuner sees only the
training split's labels; the test nodes of each shuffle are unlabeled for it. CiteSeer has 438 connected
components, so the eigenvalue 1 of D^-1/2 A D^-1/2 has multiplicity 438 > d: any basis of that eigenspace
is a valid spectral embedding, and which one `eigsh` returns (and its F1) can vary slightly between runs.
Dense, fast-mixing graphs (BlogCatalog, PPI: mean degree 65 and 20) are where FastRP stays below the
spectral embedding at the same d. A FastRP embedding is `U f(Lambda) U^T R`: d random mixtures of every
eigenvector the filter `f` (a polynomial of `D^-1 A`, degree <= a few here) lets through. On BlogCatalog
lambda_128 = 0.225 and lambda_200 = 0.203, so no low-degree filter passes the top 128 and stops the next
ones, and a random 128-mixing of more than 128 directions costs much: the exact top-200 eigenvectors
mixed down to 128 columns score 0.340 / 0.388 Micro-F1 at 10 / 50% (shuffle 0), the top 128 mixed 0.370 /
0.410, unmixed 0.379 / 0.418. The tuner's whitening of the final columns (`whiten`, stage 5) undoes
part of the mixing and lets higher powers sharpen the band.
"""
    return f"""# Tuned FastRP vs a spectral embedding (node classification)

Command: `python -m bench.graph.fastrp_tune --graphs {' '.join(results['graphs'])} --dim {args.dim} --shuffles {args.shuffles} --percents {' '.join(map(str, args.percents))}`

Structure only (no node features), d = {args.dim} for every method. {results['protocol']['classifier']}, top-k labels
per test node, {args.shuffles} shuffles per train percent (mean). `spectral`: top-{args.dim} eigenvectors of
D^-1/2 A D^-1/2 (`eigsh`, which="LA"), standardised. `fastrp_paper`: the paper's BlogCatalog setting;
`fastrp_default`: our defaults (GDS). `fastrp_tuned`: `tune_fastrp` on the training nodes' labels only
(test nodes unlabeled for it), then `fastrp` with the chosen parameters; its seconds include the tuning
(median over the {len(args.percents) * args.shuffles} tuning runs). Timed with one BLAS thread; spectral and
fixed FastRP: median of {args.timing_repeats} runs. Machine: {env['cpu']} ({env['cpu_count']} vCPUs, shared), numpy {env['numpy']}, scipy {env['scipy']}.

{md_table(hdr, rows)}

Target (issue 17): tuned Micro-F1 >= spectral at every train percent, in at most half the spectral time.

{md_table(thdr, trows)}

{notes}
Chosen settings (validation score = the tuner's cross-validated ridge Micro-F1 on the training nodes):

{md_table(["graph", "train %", "shuffle", "chosen", "val score", "base val score", "candidates", "wall s", "test Micro-F1"], chosen)}
"""


def _plot(results: dict, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["graphs"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.8))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        r = results["graphs"][name]
        for m in METHODS:
            f = r["methods"][m]["f1"]
            ax.errorbar(args.percents, [f[str(pc)]["micro_mean"] for pc in args.percents],
                        yerr=[f[str(pc)]["micro_std"] for pc in args.percents], marker="o", capsize=3, label=m)
        ax.set_title(f"{name} (d = {args.dim})")
        ax.set_xlabel("train %")
        ax.set_ylabel("Micro-F1")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    x = np.arange(len(names))
    for j, m in enumerate(METHODS):
        ax.bar(x + (j - 1.5) * 0.2, [results["graphs"][nm]["methods"][m]["wall_s"] for nm in names], 0.2, label=m)
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("wall seconds (1 thread, tuned incl. tuning)")
    ax.set_title("time")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
