"""Result files of a run: JSON (everything), Markdown (summary + all rows), PNG (recall vs QPS).

The plot follows ann-benchmarks: x = recall@k, y = queries per second on a log scale, one line per
algorithm (and build setting) drawn through its Pareto frontier (:func:`bench.ann.metrics.pareto_frontier`),
the dominated points shown faint. Two panels: one query per call, and batches. The machine, library
versions and run settings are printed under the plot.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ann.metrics import best_qps_at, pareto_frontier

RECALL_LEVELS = (0.9, 0.95, 0.99)
REFERENCE = "hnswlib"


def _atomic_write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def write_json(doc: dict[str, Any], path: Path) -> None:
    _atomic_write(path, json.dumps(doc, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "error" not in r]


def _series(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by algorithm label (algorithm + build setting)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(rows):
        out[r["label"]].append(r)
    return dict(out)


def summary(rows: Sequence[dict[str, Any]], key: str) -> dict[str, dict[float, float | None]]:
    """Best ``key`` QPS at each recall level, per algorithm name (best over its build settings)."""
    by_alg: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in _ok(rows):
        rec = r["recall"] if key == "qps_single" else r["recall_batch"]
        by_alg[r["algorithm"]].append((rec, r[key]))
    return {a: {lv: best_qps_at(p, lv) for lv in RECALL_LEVELS} for a, p in by_alg.items()}


def _fmt_qps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _fmt_params(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "—"


def _header_lines(doc: dict[str, Any]) -> list[str]:
    ds, m, st = doc["dataset"], doc["machine"], doc["settings"]
    vers = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    return [
        f"dataset {ds['name']}: n={ds['n']:,}, d={ds['d']}, nq={ds['nq']:,}, metric {ds['metric']}; source {ds['source']}",
        f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; {m['platform']}"
        + (f"; load average {m['load_average_1m']} at the end" if m.get("load_average_1m") is not None else ""),
        f"versions: {vers}",
        f"settings: k={st['k']}, threads={st['threads']}, best of {st['runs']} runs, batch size "
        f"{st['batch_size'] or 'all'}, recall epsilon {st['epsilon']:g}; {doc['started']}"
        + (f" (+ rows from {len(doc['previous_runs'])} earlier run(s): "
           + ", ".join(str(p['started']) for p in doc["previous_runs"]) + ")" if doc.get("previous_runs") else ""),
    ]


def write_markdown(doc: dict[str, Any], path: Path, plot_name: str | None = None) -> None:
    rows = doc["results"]
    k = doc["settings"]["k"]
    lines = [f"# ANN benchmark: {doc['dataset']['name']} (recall@{k})", ""]
    lines += [f"- {h}" for h in _header_lines(doc)]
    lines += ["", f"Command: `{doc['command']}`", ""]
    if plot_name:
        lines += [f"![recall vs QPS]({plot_name})", ""]
    for key, title in (("qps_single", "one query per call"), ("qps_batch", "batch")):
        sm = summary(rows, key)
        ref = sm.get(REFERENCE)
        lines += [f"## Best QPS at recall@{k} >= level ({title})", ""]
        head = "| algorithm | " + " | ".join(f"QPS @ {lv:g}" for lv in RECALL_LEVELS)
        head += f" | vs {REFERENCE} @ 0.95 |" if ref else " |"
        lines += [head, "|---" * (len(RECALL_LEVELS) + 1 + (1 if ref else 0)) + "|"]
        for alg, v in sorted(sm.items()):
            cells = [_fmt_qps(v[lv]) for lv in RECALL_LEVELS]
            if ref:
                a, b = v[0.95], ref[0.95]
                cells.append(f"{a / b:.2f}x" if a and b else "—")
            lines.append(f"| {alg} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## All settings", ""]
    lines += [
        "| algorithm | build | query | recall | recall (ids) | recall batch | QPS 1-by-1 | p50 ms | p99 ms "
        "| QPS batch | build s | index MiB | RSS Δ MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _ok(rows):
        rss = r.get("rss_delta_bytes")
        lines.append(
            f"| {r['algorithm']} | {_fmt_params(r['build'])} | {_fmt_params(r['query'])} | {r['recall']:.4f} | "
            f"{r['recall_ids']:.4f} | {r['recall_batch']:.4f} | {r['qps_single']:,.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['qps_batch']:,.0f} | {r['build_s']:.2f} | {r['index_bytes'] / 2**20:.2f} | "
            f"{'—' if rss is None else f'{rss / 2**20:.1f}'} |"
        )
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['algorithm']} {_fmt_params(r['build'])}: {r['error']}" for r in errors]
    _atomic_write(path, "\n".join(lines) + "\n")


_SERVICE_FAMILY = {"hnsw": "hnswlib", "ivf-flat": "faiss-ivf-flat", "ivfpq": "faiss-ivfpq", "exact": "exact-numpy"}


def _family(algorithm: str) -> str:
    """The in-process library a ``service-*`` algorithm corresponds to (for plot colours)."""
    if algorithm.startswith("service-"):
        rest = algorithm[len("service-"):]
        return _SERVICE_FAMILY.get(rest, rest)
    return algorithm


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(doc["results"])
    k = doc["settings"]["k"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), sharex=True)
    # an algorithm and its service counterpart share a colour; the service line is dashed
    families = sorted({_family(rs[0]["algorithm"]) for rs in series.values()})
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colors = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    markers = "os^vD<>ph*Xd8"
    all_recalls = [r["recall"] for rs in series.values() for r in rs] + [
        r["recall_batch"] for rs in series.values() for r in rs
    ]
    for ax, key, rkey, title in (
        (axes[0], "qps_single", "recall", "one query per call"),
        (axes[1], "qps_batch", "recall_batch", "batch"),
    ):
        for i, (label, rs) in enumerate(sorted(series.items())):
            pts = [(r[rkey], r[key]) for r in rs]
            front = pareto_frontier(pts)
            alg = rs[0]["algorithm"]
            color, marker = colors[_family(alg)], markers[i % len(markers)]
            style = "-" if rs[0].get("in_process", not alg.startswith("service-")) else "--"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.25, s=14, marker=marker)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=color, marker=marker, ms=5, lw=1.5,
                    ls=style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{k}")
        ax.set_ylabel("queries per second (log)")
        ax.set_title(f"{doc['dataset']['name']}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    if all_recalls:
        lo = min(all_recalls)
        axes[0].set_xlim(max(0.0, math.floor(lo * 20) / 20 - 0.02), 1.005)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, max(1, len(labels))), fontsize=8,
               frameon=False)
    fig.text(0.01, 0.01, "\n".join(_header_lines(doc)), fontsize=7, family="monospace", va="bottom")
    n_leg_rows = math.ceil(len(labels) / 4) if labels else 1
    fig.tight_layout(rect=(0, 0.1, 1, 1 - 0.035 * n_leg_rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def merge_previous(doc: dict[str, Any], path: Path, algorithms: Sequence[str]) -> dict[str, Any]:
    """``doc`` plus the rows of ``path`` (an earlier run) for algorithms not in ``algorithms``.

    The earlier run must be on the same dataset (name, n, nq) with the same k; its header (command,
    machine, start time) is kept under ``previous_runs`` and each row keeps its ``run_started``.
    """
    from retrieval.errors import FailedPrecondition

    if not path.exists():
        return doc
    old = json.loads(path.read_text())
    same = all(old["dataset"].get(f) == doc["dataset"].get(f) for f in ("name", "n", "nq")) and \
        old["settings"]["k"] == doc["settings"]["k"]
    if not same:
        raise FailedPrecondition(
            f"cannot append to {str(path)!r}: it holds dataset {old['dataset']['name']} (n={old['dataset']['n']}, "
            f"nq={old['dataset']['nq']}) with k={old['settings']['k']}; this run is {doc['dataset']['name']} "
            f"(n={doc['dataset']['n']}, nq={doc['dataset']['nq']}) with k={doc['settings']['k']}"
        )
    kept = [r for r in old["results"] if r["algorithm"] not in set(algorithms)]
    for r in kept:
        r.setdefault("run_started", old.get("started"))
    prev = old.get("previous_runs", []) + [
        {f: old.get(f) for f in ("command", "started", "machine", "versions", "settings")}
    ]
    return {**doc, "results": kept + doc["results"], "previous_runs": prev}


def write_all(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json(doc, paths["json"])
    plot(doc, paths["png"])
    write_markdown(doc, paths["md"], plot_name=paths["png"].name)
    return paths
