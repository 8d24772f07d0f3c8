"""Recall vs cross-encoder calls on the shipped fixture (exact 400 x 1,000 matrix): ANNCUR, adaptive,
adaptive seeded with dual-encoder candidates, and dual-encoder retrieve-and-rerank.

Every search goes through the real index code (:class:`retrieval.crossencoder.CrossEncoderIndex`)
with a table scorer over the shipped matrix, so "calls" are counted by the scorer exactly as with a
live model; ground truth is the exact matrix row of each test query (no scorer call needed).

Run::

    python -m bench.crossencoder.recall            # ~3 minutes on 1 core
    python -m bench.crossencoder.recall --quick    # one seed, fewer variants

Writes ``bench/results/crossencoder/recall.{json,md,png}``. Metric: Top-k-Recall = |exact top-k ∩
returned top-k| / k against the cross-encoder's own exhaustive ranking (ties counted as hits), mean
over the 100 test queries; anchor queries (rows 100..399) are disjoint from test queries. ``k_q=100``
uses the first 100 anchor queries. Top-100 is reported only where the budget is >= 100 (a result
needs at least k exactly scored items).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.crossencoder.fixture import load_fixture, recall_at
from retrieval.crossencoder import CrossEncoderIndex, SearchParams, build_and_load

RESULTS = Path(__file__).resolve().parents[1] / "results" / "crossencoder"
BUDGETS = (50, 100, 200, 500)
KS = (1, 10, 100)
# The prototype on this fixture, Top-10-Recall at 100 calls (k_q = 300).
PROTOTYPE_T10_AT_100 = {"rerank": 0.78, "cur": 0.84, "adaptive": 0.96, "adaptive-seeded": 0.98}


def _recalls(S: np.ndarray, ids: np.ndarray, budget: int) -> dict[str, float | None]:
    return {f"top{k}": (float(recall_at(S, ids, k).mean()) if budget >= k else None) for k in KS}


def run_mode(index, fx, mode: str, budget: int, **kw: Any) -> dict[str, Any]:
    """Top-1/10/100 recall of one mode at one budget. The CUR split depends on k, so CUR runs one
    search per k (as a user asking for k results would); the other modes' candidates do not depend
    on k, so one search with the largest k serves all three."""
    S = fx.S[: fx.n_test]
    ks = [k for k in KS if k <= budget]
    t0 = time.perf_counter()
    recalls: dict[str, float | None] = {f"top{k}": None for k in KS}
    runs = [(k, [k]) for k in ks] if mode == "cur" and "k_i" not in kw else [(max(ks), ks)]
    calls, other, splits = [], [], {}
    for k_search, k_eval in runs:
        res = index.search_batch(fx.test_queries, k=k_search, params=SearchParams(mode=mode, budget=budget, **kw))
        ids = np.stack([r.ids for r in res])
        for k in k_eval:
            recalls[f"top{k}"] = float(recall_at(S, ids, k).mean())
        calls += [r.calls for r in res]
        other += [r.other_seconds for r in res]
        splits[f"k={k_search}"] = [res[0].k_i, res[0].k_r]
    wall = time.perf_counter() - t0
    row = {"mode": mode, "budget": budget, **recalls,
           "calls_per_query": float(np.mean(calls)),
           "other_ms_per_query": 1000 * float(np.mean(other)),
           "wall_s": wall, "k_i_k_r": splits, "rounds": res[0].rounds}
    row.update({f"param_{a}": b for a, b in kw.items()})
    return row


def build(fx, workdir: Path, k_q: int, method: str, seed: int, k_i: int = 100, **params: Any):
    tag = "-".join(f"{a}{b}" for a, b in sorted(params.items()))
    path = workdir / f"kq{k_q}-{method}-s{seed}-ki{k_i}-{tag}"
    if (path / "meta.json").exists():
        index = CrossEncoderIndex.load(path, fx.scorer(), fx.dual_encoder())
        return index, index.describe()["build_stats"]
    index, stats = build_and_load(path, scorer=fx.scorer(), dual_encoder=fx.dual_encoder(),
                                  items=fx.item_records(), anchor_queries=fx.anchor_pool[:k_q],
                                  params={"k_i": k_i, "anchor_method": method, "seed": seed, **params})
    return index, stats


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key in ("top1", "top10", "top100", "calls_per_query", "other_ms_per_query", "wall_s"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
        if key.startswith("top") and len(vals) > 1:
            out[key + "_std"] = float(np.std(vals))
    out["n_seeds"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one random seed, no solver / split sweeps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true", help="redraw the Markdown and PNG from recall.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.report_only:
        result = json.loads((args.out / "recall.json").read_text())
        (args.out / "recall.md").write_text(_markdown(result))
        _plot(result, args.out / "recall.png")
        return result
    from bench.ann.machine import machine_info, set_threads, versions

    set_threads(1)
    fx = load_fixture()
    seeds = (0,) if args.quick else (0, 1, 2)
    methods = ("random", "qr", "kmeans-r", "kmeans-de")
    work = Path(tempfile.mkdtemp(prefix="ce-recall-"))
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        # Baseline: independent of anchors.
        idx0, _ = build(fx, work, 300, "qr", 0)
        for b in BUDGETS:
            r = run_mode(idx0, fx, "rerank", b)
            r.update(k_q=None, anchor_method=None)
            rows.append(r)
            print(f"rerank            b={b:<4d} top1={r['top1']:.3f} top10={r['top10']:.3f} top100={r['top100'] if r['top100'] is None else round(r['top100'], 3)}")
        # CUR / adaptive / seeded for each k_q and anchor method (random averaged over seeds).
        for k_q in (100, 300):
            for method in methods:
                per_seed: dict[tuple[str, int], list[dict[str, Any]]] = {}
                build_s = []
                for seed in (seeds if method in ("random", "kmeans-r", "kmeans-de") else (0,)):
                    t0 = time.perf_counter()
                    index, stats = build(fx, work, k_q, method, seed)
                    build_s.append(time.perf_counter() - t0)
                    for mode in ("cur", "adaptive", "adaptive-seeded"):
                        for b in BUDGETS:
                            per_seed.setdefault((mode, b), []).append(run_mode(index, fx, mode, b))
                for (mode, b), rs in per_seed.items():
                    r = _mean_rows(rs)
                    r.update(k_q=k_q, anchor_method=method, index_build_s=float(np.mean(build_s)))
                    rows.append(r)
                    print(f"{mode:<17s} kq={k_q} {method:<9s} b={b:<4d} top1={r['top1']:.3f} top10={r['top10']:.3f}"
                          f" top100={'-' if r['top100'] is None else format(r['top100'], '.3f')}"
                          f" other={r['other_ms_per_query']:.2f}ms/q", flush=True)
        extra: dict[str, Any] = {}
        if not args.quick:
            extra["cur_split"] = _split_sweep(fx, work)
            extra["cur_solver"] = _solver_sweep(fx, work)
            extra["adaptive_rounds"] = _rounds_sweep(fx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "crossencoder.recall",
        "fixture": "bench/datasets/crossencoder (400 AlpacaEval instructions x 1,000 answers, MiniLM joint scorer)",
        "n_test_queries": fx.n_test,
        "n_items": len(fx.items),
        "defaults": {"k_i_index": 100, "cur_split": "auto = min(k_i, max((budget - k) // 2, budget // 4))", "rounds": 10,
                     "seed_fraction": 0.5, "ridge": 1e-3, "solver": "ridge 1e-3 (centred)"},
        "rows": rows,
        **extra,
        "targets": _targets(rows),
        "prototype_top10_at_100": PROTOTYPE_T10_AT_100,
        "machine": machine_info(),
        "versions": versions(),
        "seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recall.json").write_text(json.dumps(result, indent=1))
    (args.out / "recall.md").write_text(_markdown(result))
    _plot(result, args.out / "recall.png")
    print(json.dumps(result["targets"], indent=1))
    return result


def _split_sweep(fx, work: Path) -> list[dict[str, Any]]:
    out = []
    for k_q in (100, 300):
        index, _ = build(fx, work, k_q, "qr", 0, k_i=400)
        for b in (100, 200, 500):
            for frac in (0.25, 0.5, 0.75):
                k_i = int(b * frac)
                r = run_mode(index, fx, "cur", b, k_i=k_i)
                r.update(k_q=k_q, anchor_method="qr", split=frac, k_i=k_i)
                out.append(r)
                print(f"cur split kq={k_q} b={b} k_i={k_i}: top10={r['top10']:.3f} top100={r['top100']}")
    return out


def _solver_sweep(fx, work: Path) -> list[dict[str, Any]]:
    out = []
    for k_q in (100, 300):
        for solver, extra in (("ridge", {"ridge": 1e-3}), ("ridge", {"ridge": 1e-2}), ("truncated", {"rank": 50}),
                              ("pinv", {})):
            for k_i in (50, 100):
                index, _ = build(fx, work, k_q, "random", 0, k_i=k_i, solver=solver, **extra)
                for b in (100, 200):
                    r = run_mode(index, fx, "cur", b, k_i=k_i if b > k_i else b // 2)
                    r.update(k_q=k_q, anchor_method="random", solver=solver, solver_params=extra, index_k_i=k_i,
                             k_i=k_i if b > k_i else b // 2)
                    out.append(r)
                    print(f"cur solver kq={k_q} {solver} {extra} index k_i={k_i} b={b}: top10={r['top10']:.3f}")
    return out


def _rounds_sweep(fx, work: Path) -> list[dict[str, Any]]:
    out = []
    index, _ = build(fx, work, 300, "qr", 0)
    for rounds in (1, 2, 5, 10, 20):
        for b in (100, 200):
            r = run_mode(index, fx, "adaptive", b, rounds=rounds)
            r.update(k_q=300, anchor_method="qr")
            out.append(r)
            print(f"adaptive rounds={rounds} b={b}: top10={r['top10']:.3f} top100={r['top100']}")
    return out


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def get(mode, b, key, k_q=300, method="qr"):
        for r in rows:
            if r["mode"] == mode and r["budget"] == b and (mode == "rerank" or (r["k_q"] == k_q and r["anchor_method"] == method)):
                return r[key]
        return None

    t: dict[str, Any] = {}
    t["adaptive_top10_at_100 >= 0.95"] = {
        f"kq={kq},{m}": get("adaptive", 100, "top10", kq, m) for kq in (100, 300) for m in ("random", "qr", "kmeans-r", "kmeans-de")
    }
    t["adaptive_top100_at_200 >= 0.90"] = {
        f"kq={kq},{m}": get("adaptive", 200, "top100", kq, m) for kq in (100, 300) for m in ("random", "qr", "kmeans-r", "kmeans-de")
    }
    cur_vs = {}
    for kq in (100, 300):
        for m in ("random", "qr", "kmeans-r", "kmeans-de"):
            for b in (100, 200, 500):
                for key in ("top1", "top10", "top100"):
                    c, r = get("cur", b, key, kq, m), get("rerank", b, key)
                    if c is not None and r is not None:
                        cur_vs[f"kq={kq},{m},b={b},{key}"] = {"cur": c, "rerank": r, "above": c > r}
    t["every_cur_variant_above_rerank_from_100_calls"] = cur_vs
    t["summary"] = {
        "adaptive_top10_at_100_kq300_qr": get("adaptive", 100, "top10"),
        "adaptive_top100_at_200_kq300_qr": get("adaptive", 200, "top100"),
        "cur_top10_above_rerank_all": all(v["above"] for k, v in cur_vs.items() if k.endswith("top10")),
        "cur_top10_failures": [k for k, v in cur_vs.items() if k.endswith("top10") and not v["above"]],
        "cur_any_metric_failures": [k for k, v in cur_vs.items() if not v["above"]],
    }
    return t


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def _markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    L = ["# Cross-encoder k-NN: recall vs cross-encoder calls (shipped fixture)", ""]
    L.append(f"{res['n_test_queries']} test queries x {res['n_items']} items, exact MiniLM joint-encoder "
             "matrix as ground truth; anchor queries disjoint from test queries. Top-k-Recall = |exact top-k ∩ "
             "returned top-k| / k. Index: k_i = 100 stored anchor items; CUR split auto = min(100, max((budget - k) // 2, budget // 4)), "
             "so CUR runs one search per k; the other modes' candidates do not depend on k (one search, k = "
             "min(100, budget)); "
             "adaptive: 10 rounds, ridge 1e-3; seeded: half of round one from the dual encoder. Random, "
             "kmeans-r and kmeans-de anchors: mean of 3 seeds. Produced by `python -m bench.crossencoder.recall`.")
    L.append("")
    L.append(f"Machine: {res['machine']['cpu']} ({res['machine']['logical_cpus']} logical CPUs), 1 thread.")
    L.append("")
    for k_q in (300, 100):
        L.append(f"## k_q = {k_q}")
        L.append("")
        L.append("| mode | anchors | " + " | ".join(f"T1@{b} | T10@{b} | T100@{b}" for b in BUDGETS) + " |")
        L.append("|---|---|" + "---|" * (3 * len(BUDGETS)))
        for mode in ("rerank", "cur", "adaptive", "adaptive-seeded"):
            for m in ((None,) if mode == "rerank" else ("random", "qr", "kmeans-r", "kmeans-de")):
                cells = []
                for b in BUDGETS:
                    r = next(x for x in rows if x["mode"] == mode and x["budget"] == b and
                             (mode == "rerank" or (x["k_q"] == k_q and x["anchor_method"] == m)))
                    cells += [_fmt(r["top1"]), _fmt(r["top10"]), _fmt(r["top100"])]
                L.append(f"| {mode} | {m or 'dual encoder'} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Against the targets")
    L.append("")
    s = res["targets"]["summary"]
    L.append(f"- adaptive Top-10-Recall at 100 calls (k_q=300, qr anchors): **{_fmt(s['adaptive_top10_at_100_kq300_qr'])}** "
             "(target >= 0.95; prototype 0.96)")
    L.append(f"- adaptive Top-100-Recall at 200 calls (k_q=300, qr anchors): **{_fmt(s['adaptive_top100_at_200_kq300_qr'])}** "
             "(target >= 0.90)")
    L.append("- adaptive at every k_q / anchor method: Top-10@100 "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in res["targets"]["adaptive_top10_at_100 >= 0.95"].items())
             + "; Top-100@200 "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in res["targets"]["adaptive_top100_at_200 >= 0.90"].items()))
    L.append(f"- every CUR variant above retrieve-and-rerank in Top-10-Recall at 100, 200, 500 calls: "
             f"**{'yes' if s['cur_top10_above_rerank_all'] else 'no'}**"
             + ("" if s["cur_top10_above_rerank_all"] else f" (below or equal: {', '.join(s['cur_top10_failures'])})"))
    if s["cur_any_metric_failures"]:
        L.append(f"- CUR at or below retrieve-and-rerank in some metric: {', '.join(s['cur_any_metric_failures'])}")
    L.append("- prototype (issue), Top-10 at 100 calls, k_q=300: " + ", ".join(f"{k} {v}" for k, v in res["prototype_top10_at_100"].items()))
    L.append("")
    if "cur_split" in res:
        L.append("## CUR: split of the budget between anchor items (k_i) and reranking (k_r), qr anchors")
        L.append("")
        L.append("| k_q | budget | k_i / budget | k_i | T1 | T10 | T100 |")
        L.append("|---|---|---|---|---|---|---|")
        for r in res["cur_split"]:
            L.append(f"| {r['k_q']} | {r['budget']} | {r['split']} | {r['k_i']} | {_fmt(r['top1'])} | {_fmt(r['top10'])} | {_fmt(r['top100'])} |")
        L.append("")
        L.append("## CUR: pseudo-inverse solver (random anchors, seed 0, centred scores)")
        L.append("")
        L.append("| k_q | solver | index k_i | budget | k_i used | T10 | T100 |")
        L.append("|---|---|---|---|---|---|---|")
        for r in res["cur_solver"]:
            L.append(f"| {r['k_q']} | {r['solver']} {r['solver_params'] or ''} | {r['index_k_i']} | {r['budget']} | {r['k_i']} | {_fmt(r['top10'])} | {_fmt(r['top100'])} |")
        L.append("")
        L.append("## Adaptive: number of rounds (k_q=300, qr anchors)")
        L.append("")
        L.append("| rounds | budget | T1 | T10 | T100 | other ms/query |")
        L.append("|---|---|---|---|---|---|")
        for r in res["adaptive_rounds"]:
            L.append(f"| {r['param_rounds']} | {r['budget']} | {_fmt(r['top1'])} | {_fmt(r['top10'])} | {_fmt(r['top100'])} | {r['other_ms_per_query']:.2f} |")
        L.append("")
    L.append("## Time outside the scorer (ms per query, batch of 100 queries, 1 thread)")
    L.append("")
    L.append("| mode | " + " | ".join(f"b={b}" for b in BUDGETS) + " |")
    L.append("|---|" + "---|" * len(BUDGETS))
    for mode in ("rerank", "cur", "adaptive", "adaptive-seeded"):
        cells = []
        for b in BUDGETS:
            r = next(x for x in rows if x["mode"] == mode and x["budget"] == b and
                     (mode == "rerank" or (x["k_q"] == 300 and x["anchor_method"] == "qr")))
            cells.append(f"{r['other_ms_per_query']:.2f}")
        L.append(f"| {mode} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("![recall vs calls](recall.png)")
    L.append("")
    return "\n".join(L)


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    styles = {"cur": ("tab:blue", "CUR"), "adaptive": ("tab:green", "adaptive"),
              "adaptive-seeded": ("tab:purple", "adaptive + DE seed")}
    marks = {"random": ("o", "--"), "qr": ("s", "-"), "kmeans-r": ("^", ":"), "kmeans-de": ("v", "-.")}
    for i, k_q in enumerate((300, 100)):
        for j, k in enumerate(KS):
            ax = axes[i, j]
            key = f"top{k}"
            rr = [r for r in rows if r["mode"] == "rerank" and r[key] is not None]
            ax.plot([r["budget"] for r in rr], [r[key] for r in rr], color="black", marker="x", lw=2,
                    label="DE retrieve-and-rerank")
            for mode, (color, name) in styles.items():
                for m, (mk, ls) in marks.items():
                    pts = [r for r in rows if r["mode"] == mode and r["k_q"] == k_q and r["anchor_method"] == m
                           and r[key] is not None]
                    if mode != "cur" and m not in ("random", "qr"):
                        continue
                    ax.plot([r["budget"] for r in pts], [r[key] for r in pts], color=color, marker=mk, ls=ls,
                            label=f"{name} ({m})", alpha=0.9)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(BUDGETS)
            ax.set_xticklabels([str(b) for b in BUDGETS])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(f"Top-{k}-Recall, k_q = {k_q}")
            if i == 1:
                ax.set_xlabel("cross-encoder calls per query")
            if j == 0:
                ax.set_ylabel("recall vs exact CE top-k")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Cross-encoder k-NN on the shipped fixture (1,000 items, 100 test queries, MiniLM joint scorer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
