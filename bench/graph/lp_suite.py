"""Shared machinery of the link-prediction benchmarks (random 70/10/20 splits, several seeds).

For each dataset and seed: one split; CN and Adamic-Adar on the training graph; then each requested
trained model (plain GCN, NCN, NCNC) on the same split. Test Hits@K is taken at the epoch with the best
validation Hits@K (the reference code's selection). Results are saved after every run, so an
interrupted benchmark keeps what it finished.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from bench.graph.common import DATA, RESULTS, environment, md_table, write_results

logger = logging.getLogger(__name__)

# name -> (reader path, reader options, preset, input)
DATASETS = {
    "cora": ("cora", {}, "cora", "features"),
    "citeseer": ("citeseer", {}, "citeseer", "features"),
    "facebook": ("facebook_ego/facebook.txt", {"index_base": 0}, "cora", "learnable"),
    "usair": ("usair/USAir.txt", {"index_base": 1}, "cora", "learnable"),
    "ns": ("ns/NS.txt", {"index_base": 1, "num_nodes": 1589}, "cora", "learnable"),
    "pb": ("pb/PB.txt", {"index_base": 1}, "cora", "learnable"),
    "yeast": ("yeast/Yeast.txt", {"index_base": 0}, "cora", "learnable"),
    "celegans": ("celegans/Celegans.txt", {"index_base": 0}, "cora", "learnable"),
    "power": ("power/Power.txt", {"index_base": 0}, "cora", "learnable"),
    "router": ("router/Router.txt", {"index_base": 0}, "cora", "learnable"),
    "ecoli": ("ecoli/Ecoli.mat", {}, "cora", "learnable"),
    "ppi": ("ppi/PPI_subgraph.mat", {"self_loops": False}, "cora", "learnable"),
}

# Hits@100 from Wang et al. 2024 (Table 2), random 70/10/20 splits, 10 seeds
PAPER_HITS100 = {
    "cora": {"GCN": 66.79, "NCN": 89.05, "NCNC": 89.65},
    "citeseer": {"GCN": 67.08, "NCN": 91.56, "NCNC": 93.47},
}


def load_dataset(name: str):
    from retrieval.graph.readers import read_graph

    if name not in DATASETS:
        raise SystemExit(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    path, opts, preset, inp = DATASETS[name]
    g = read_graph(DATA / path, **opts).graph
    return g, preset, inp


def run_suite(*, name: str, datasets: list[str], models: list[str], seeds: list[int], epochs: int | None,
              gcn_epochs: int | None, device: str, overrides: dict, out_dir: str | None, ks=(20, 50, 100),
              hits_k: int = 100, title: str = "", command: str = "", fresh: bool = False) -> dict:
    import torch

    from retrieval.graph.linkpred import heuristic_results, split_edges, train_link_model
    from retrieval.graph.ncn import make_config

    out = Path(out_dir) if out_dir else RESULTS
    json_path = out / f"{name}.json"
    settings = {"epochs": epochs, "gcn_epochs": gcn_epochs, "device": device, "overrides": overrides,
                "hits_k": hits_k}
    results = {"runs": [], "env": environment(device), "command": command, "settings": settings}
    if json_path.exists() and not fresh:  # resume: keep finished runs made with the same settings
        try:
            prev = json.loads(json_path.read_text())
            if prev.get("settings") == settings:
                results["runs"] = prev.get("runs", [])
        except (OSError, ValueError):
            pass
    done = {(r["dataset"], r["seed"], r["model"]) for r in results["runs"]}
    for ds in datasets:
        g, preset, inp = load_dataset(ds)
        for seed in seeds:
            split = split_edges(g, seed=seed)
            if "heuristics" in models and (ds, seed, "CN") not in done:
                for hname, res in heuristic_results(split, ks).items():
                    results["runs"].append({"dataset": ds, "seed": seed, "model": hname, "test": res,
                                            "split": split.describe()})
                _save(name, results, out, title, hits_k)
            for model in [m for m in models if m != "heuristics"]:
                label = {"gcn": "GCN", "ncn": "NCN", "ncnc": "NCNC"}[model]
                if (ds, seed, label) in done:
                    continue
                if model == "gcn":
                    cfg_kw = dict(input=inp, hits_k=hits_k)
                    if gcn_epochs:
                        cfg_kw["epochs"] = gcn_epochs
                    cfg = make_config("gcn", **cfg_kw)
                else:
                    cfg_kw = dict(predictor=model, input=inp, hits_k=hits_k)
                    if epochs:
                        cfg_kw["epochs"] = epochs
                    cfg_kw.update(overrides)
                    cfg = make_config(preset, **cfg_kw)
                t0 = time.perf_counter()
                res = train_link_model(split, g.features, cfg, seed=seed, device=device, ks=ks)
                total = time.perf_counter() - t0
                run = {"dataset": ds, "seed": seed, "model": label, "test": res.best.get("test", {}),
                       "valid": res.best.get("valid", {}), "best_epoch": res.best.get("epoch"),
                       "epochs_run": len(res.epoch_seconds),
                       "train_seconds_per_epoch": float(np.mean(res.epoch_seconds)),
                       "total_seconds": total, "config": cfg.as_dict(), "split": split.describe(),
                       "device": res.device}
                results["runs"].append(run)
                print(f"{ds} seed={seed} {label}: test hits@{hits_k} {run['test'].get(f'hits@{hits_k}', float('nan')):.4f} "
                      f"(best epoch {run['best_epoch']}, {run['train_seconds_per_epoch']:.2f} s/epoch, {total:.0f} s)",
                      flush=True)
                _save(name, results, out, title, hits_k)
                del res
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    _save(name, results, out, title, hits_k)
    return results


def summarize(results: dict, hits_k: int) -> dict:
    """dataset -> model -> {mean, std, n, seconds_per_epoch} of test Hits@K (in %)."""
    out: dict = {}
    for r in results["runs"]:
        v = r["test"].get(f"hits@{hits_k}")
        if v is None:
            continue
        d = out.setdefault(r["dataset"], {}).setdefault(r["model"], {"values": [], "auc": [], "spe": []})
        d["values"].append(100 * v)
        d["auc"].append(100 * r["test"].get("auc", float("nan")))
        if "train_seconds_per_epoch" in r:
            d["spe"].append(r["train_seconds_per_epoch"])
    for ds in out.values():
        for m, d in ds.items():
            vals = np.array(d["values"])
            ds[m] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(len(vals)),
                     "auc_mean": float(np.nanmean(d["auc"])) if d["auc"] else float("nan"),
                     "seconds_per_epoch": float(np.mean(d["spe"])) if d["spe"] else None}
    return out


def add_common_args(ap, datasets: list[str], seeds: list[int], epochs: int | None) -> None:
    ap.add_argument("--datasets", nargs="+", default=datasets, choices=sorted(DATASETS))
    ap.add_argument("--models", nargs="+", default=["heuristics", "gcn", "ncn", "ncnc"],
                    choices=["heuristics", "gcn", "ncn", "ncnc"])
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--epochs", type=int, default=epochs, help="NCN / NCNC epochs (default: the preset's 100)")
    ap.add_argument("--gcn-epochs", type=int, default=None, help="GCN baseline epochs (default 100)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="NCNConfig overrides for NCN / NCNC, e.g. --set hidden=128 batch_size=2048")
    ap.add_argument("--name", default=None, help="result file name (default: derived from the device)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/graph)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing result file")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _save(name: str, results: dict, out: Path, title: str, hits_k: int) -> None:
    summ = summarize(results, hits_k)
    results["summary"] = summ
    models = [m for m in ("CN", "AA", "GCN", "NCN", "NCNC") if any(m in v for v in summ.values())]
    rows = []
    for ds, v in summ.items():
        row = [ds]
        for m in models:
            if m in v:
                cell = f"{v[m]['mean']:.2f} ± {v[m]['std']:.2f} (n={v[m]['n']})"
                paper = PAPER_HITS100.get(ds, {}).get(m) if hits_k == 100 else None
                if paper is not None:
                    cell += f" [paper {paper:.2f}, {v[m]['mean'] - paper:+.2f}]"
                row.append(cell)
            else:
                row.append("-")
        rows.append(row)
    table = md_table(["dataset"] + models, rows)
    auc_rows = [[ds] + [f"{v[m]['auc_mean']:.2f}" if m in v else "-" for m in models] for ds, v in summ.items()]
    spe_rows = [[ds] + [f"{v[m]['seconds_per_epoch']:.2f}" if m in v and v[m]["seconds_per_epoch"] else "-"
                        for m in models] for ds, v in summ.items()]
    cfgs = {}
    for r in results["runs"]:
        if "config" in r:
            cfgs.setdefault(f"{r['dataset']}/{r['model']}", r["config"])
    cfg_lines = "\n".join(f"- `{k}`: `{json.dumps(_short_cfg(v), sort_keys=True)}`" for k, v in sorted(cfgs.items()))
    env = results["env"]
    md = f"""# {title or name}

Command: `{results.get('command', '')}`

Test Hits@{hits_k} in % (mean ± std over seeds; each seed = one random 70/10/20 split; the model's test
score is taken at its best validation epoch). CN / AA are computed on the training graph of the same split.
Machine: {env.get('cpu')} ({env.get('device')}{', ' + env['gpu'] if env.get('gpu') else ''}), torch {env.get('torch')}, {env.get('torch_threads')} thread(s).

{table}

AUC (%, mean):

{md_table(['dataset'] + models, auc_rows)}

Training seconds per epoch (mean):

{md_table(['dataset'] + models, spe_rows)}

Settings that produced these numbers (NCNConfig, see retrieval/graph/ncn.py):

{cfg_lines}
"""
    results["markdown_table"] = table
    write_results(name, results, md, out)
    try:
        _plot(summ, models, hits_k, out / f"{name}.png", title or name)
    except Exception as e:  # plotting must not lose the numbers
        logger.warning("plot failed: %s", e)


def _short_cfg(cfg: dict) -> dict:
    keep = ("predictor", "encoder", "input", "hidden", "mp_layers", "epochs", "batch_size", "gnn_lr", "pred_lr",
            "x_dropout", "gnn_dropout", "tail_dropout", "pred_dropout", "pred_edge_dropout", "twolayerlin", "res",
            "jk", "use_xlin", "tailact", "mask_target", "prob_scale", "prob_offset", "pt", "alpha", "hits_k",
            "train_res_deg", "test_res_deg")
    return {k: cfg[k] for k in keep if k in cfg}


def _plot(summ: dict, models: list[str], hits_k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = list(summ)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(dss) + 2), 4))
    x = np.arange(len(dss))
    for i, m in enumerate(models):
        means = [summ[d][m]["mean"] if m in summ[d] else np.nan for d in dss]
        stds = [summ[d][m]["std"] if m in summ[d] else 0 for d in dss]
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2, label=m)
        for j, d in enumerate(dss):
            p = PAPER_HITS100.get(d, {}).get(m) if hits_k == 100 else None
            if p is not None:
                ax.plot(x[j] + i * width - 0.4 + width / 2, p, "k*", markersize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(dss)
    ax.set_ylabel(f"test Hits@{hits_k} (%)")
    ax.set_title(title + ("  (* = paper)" if hits_k == 100 else ""))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
