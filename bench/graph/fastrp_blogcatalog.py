"""FastRP on BlogCatalog: multi-label node classification, the paper's protocol.

Protocol (Chen et al. 2019, authors' notebook + DeepWalk's scoring script): d = 512, iteration weights
[0, 0, 1, 6.67] on A^1..A^4, beta = -0.64, s = sqrt(n), per-power L2 normalisation, column
standardisation; one-vs-rest logistic regression (C = 0.1, liblinear) trained on a random 10 / 50 / 90%
of the nodes; each test node gets its true number of labels (the top-k probabilities); Micro- and
Macro-F1 averaged over shuffles. The authors report 0.372 / 0.228, 0.412 / 0.275, 0.426 / 0.280.

A second configuration runs the Neo4j GDS defaults (iteration weights [0, 1, 1], beta 0, s 3) at the
same dimension, for comparison.

    python -m bench.graph.fastrp_blogcatalog [--seeds 0 1 2] [--shuffles 5] [--percents 10 50 90]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np

from bench.graph.common import DATA, RESULTS, environment, md_table, write_results

PAPER = {10: (0.372, 0.228), 50: (0.412, 0.275), 90: (0.426, 0.280)}


def split_nodes(n: int, percent: float, shuffle_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) node positions :func:`evaluate_embedding` uses for this percent and shuffle."""
    perm = np.random.default_rng(shuffle_seed).permutation(n)
    ntr = int(round(percent / 100 * n))
    return perm[:ntr], perm[ntr:]


def evaluate_embedding(E: np.ndarray, Y: np.ndarray, percent: int, shuffle_seed: int, C: float, solver: str):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier

    tr, te = split_nodes(E.shape[0], percent, shuffle_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "label not present in all training examples"
        clf = OneVsRestClassifier(LogisticRegression(C=C, solver=solver, max_iter=1000)).fit(E[tr], Y[tr])
        P = clf.predict_proba(E[te])
    k = Y[te].sum(1).astype(int)
    order = np.argsort(-P, axis=1, kind="stable")
    pred = np.zeros_like(Y[te])
    for i in range(len(te)):
        pred[i, order[i, : k[i]]] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (float(f1_score(Y[te], pred, average="micro", zero_division=0)),
                float(f1_score(Y[te], pred, average="macro", zero_division=0)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="FastRP random-projection seeds")
    ap.add_argument("--gds-seeds", type=int, nargs="+", default=[0], help="seeds for the GDS-defaults row")
    ap.add_argument("--gds-percents", type=int, nargs="+", default=[10], help="train percents for the GDS row")
    ap.add_argument("--shuffles", type=int, default=5, help="train/test shuffles per train percent")
    ap.add_argument("--percents", type=int, nargs="+", default=[10, 50, 90])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--C", type=float, default=0.1)
    ap.add_argument("--solver", default="liblinear")
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from retrieval.graph.fastrp import GDS_DEFAULTS, PAPER_BLOGCATALOG, FastRPParams, fastrp
    from retrieval.graph.readers import read_graph

    g = read_graph(DATA / "blogcatalog" / "blogcatalog.mat").graph
    A = g.adjacency()
    Y = g.labels.Y.toarray().astype(np.int8)
    configs = {
        "paper": (dict(PAPER_BLOGCATALOG, dim=args.dim), args.seeds, args.percents),
        "gds_defaults": (dict(GDS_DEFAULTS, dim=args.dim), args.gds_seeds, args.gds_percents),
    }
    results = {"graph": {"n": g.n, "m": g.num_edges}, "protocol": {
        "classifier": f"one-vs-rest LogisticRegression(C={args.C}, solver={args.solver})",
        "prediction": "top-k labels per test node, k = its true label count",
        "shuffles": args.shuffles, "percents": args.percents}, "configs": {}, "paper": PAPER,
        "env": environment("cpu")}
    for name, (params, seeds, percents) in configs.items():
        p_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        rows = {pc: {"micro": [], "macro": []} for pc in percents}
        times = []
        for seed in seeds:
            p = FastRPParams(**params, seed=seed)
            ts = []
            for _ in range(args.timing_repeats if seed == seeds[0] else 1):
                t0 = time.perf_counter()
                E = fastrp(A, p)
                ts.append(time.perf_counter() - t0)
            times += ts
            for pc in percents:
                for sh in range(args.shuffles):
                    mi, ma = evaluate_embedding(E, Y, pc, 1000 * seed + sh, args.C, args.solver)
                    rows[pc]["micro"].append(mi)
                    rows[pc]["macro"].append(ma)
                print(f"{name} seed={seed} {pc}%: micro {np.mean(rows[pc]['micro']):.4f} "
                      f"macro {np.mean(rows[pc]['macro']):.4f}", flush=True)
        results["configs"][name] = {
            "params": p_dict, "seeds": seeds,
            "embedding_seconds": {"median": float(np.median(times)), "min": float(np.min(times)), "runs": len(times)},
            "f1": {str(pc): {"micro_mean": float(np.mean(r["micro"])), "micro_std": float(np.std(r["micro"])),
                             "macro_mean": float(np.mean(r["macro"])), "macro_std": float(np.std(r["macro"])),
                             "runs": len(r["micro"])} for pc, r in rows.items()},
        }

    # ---- report --------------------------------------------------------------------------------
    hdr = ["config", "train %", "Micro-F1", "Macro-F1", "paper Micro", "paper Macro", "Micro - paper", "Macro - paper"]
    table = []
    for name, res in results["configs"].items():
        for pc in [int(p) for p in res["f1"]]:
            f = res["f1"][str(pc)]
            pm = PAPER.get(pc, (float("nan"), float("nan")))
            table.append([name, pc, f"{f['micro_mean']:.4f} ± {f['micro_std']:.4f}",
                          f"{f['macro_mean']:.4f} ± {f['macro_std']:.4f}", pm[0], pm[1],
                          f"{f['micro_mean'] - pm[0]:+.4f}", f"{f['macro_mean'] - pm[1]:+.4f}"])
    tmd = md_table(hdr, table)
    print(tmd)
    emb = results["configs"]["paper"]["embedding_seconds"]
    md = f"""# FastRP on BlogCatalog (node classification)

Command: `python -m bench.graph.fastrp_blogcatalog --seeds {' '.join(map(str, args.seeds))} --shuffles {args.shuffles} --percents {' '.join(map(str, args.percents))} --gds-percents {' '.join(map(str, args.gds_percents))} --dim {args.dim}`

Graph: BlogCatalog, n = {g.n:,}, m = {g.num_edges:,} (the FastRP authors' `blogcatalog.mat`).
Protocol: {results['protocol']['classifier']}; {results['protocol']['prediction']};
{args.shuffles} shuffles x {len(args.seeds)} projection seed(s) for `paper` (mean ± std over all runs).

- `paper`: {results['configs']['paper']['params']}
- `gds_defaults`: {results['configs']['gds_defaults']['params']}

{tmd}

Embedding time (`paper`, d = {args.dim}, 1 thread): median {emb['median']:.3f} s over {emb['runs']} runs
(the paper reports 1.17 s). Machine: {results['env']['cpu']}, numpy {results['env']['numpy']}, scipy {results['env']['scipy']}.
"""
    out = write_results("fastrp_blogcatalog", results, md, args.out)
    _plot(results, args.percents, out / "fastrp_blogcatalog.png")
    return results


def _plot(results: dict, percents, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, idx in ((axes[0], "micro", 0), (axes[1], "macro", 1)):
        for name, res in results["configs"].items():
            pcs = [int(p) for p in res["f1"]]
            m = [res["f1"][str(pc)][f"{metric}_mean"] for pc in pcs]
            s = [res["f1"][str(pc)][f"{metric}_std"] for pc in pcs]
            ax.errorbar(pcs, m, yerr=s, marker="o", capsize=3, label=f"ours: {name}")
        ax.plot([p for p in percents if p in PAPER], [PAPER[p][idx] for p in percents if p in PAPER], "k--x",
                label="paper (authors)")
        ax.set_xlabel("train %")
        ax.set_ylabel(f"{metric.capitalize()}-F1")
        ax.set_title(f"BlogCatalog {metric.capitalize()}-F1")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
