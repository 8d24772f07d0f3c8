"""How the CLI prints a finished job without ``--json``: a few lines a person reads, not the record.

One line ``ID KIND STATE (N s)``, then what the job made, by kind (FastRP: the embedding, the chosen
parameters and the tuning; link-model training: the best epoch's validation and test metrics, how it was
evaluated, the preset), and for any other kind the result's fields, one per line, long values cut.
``--json`` prints the whole record.
"""

from __future__ import annotations

import json
from collections.abc import Callable

_WIDTH = 160


def summary_lines(j: dict) -> list[str]:
    """The text summary of a job record (a dict as the client returns it)."""
    took = _seconds(j)
    lines = [f"{j['id']} {j['kind']} {j['state']}" + (f" ({took:.1f} s)" if took is not None else "")]
    res = j.get("result") or {}
    if res:
        fn = _BY_KIND.get(j["kind"], _generic)
        try:
            lines += fn(res)
        except (KeyError, TypeError, ValueError, IndexError):  # a result of another shape: show it as it is
            lines += _generic(res)
        lines.append("(--json prints the whole record)")
    return lines


def _seconds(j: dict) -> float | None:
    start, end = j.get("started_at") or j.get("created_at"), j.get("finished_at")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 < start <= end:
        return float(end - start)
    return None


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _metrics(d: dict) -> str:
    return "  ".join(f"{k} {_num(v)}" for k, v in d.items())


def _fastrp(r: dict) -> list[str]:
    lines = [(f"embedding {r['embedding']!r} of graph {r['graph']!r}: {r['n']} x {r['dim']} float32, "
              f"{r.get('indexed', 0)} indexed into collection {r.get('collection', '?')}")]
    from retrieval.graph.fastrp import describe_params

    lines.append("params: " + describe_params(r["params"]))
    t = r.get("tuning")
    if t:
        early = f", stopped early: {t['stopped_early']}" if t.get("stopped_early") else ""
        lines.append(f"tuned by {t['task']} ({t['metric']}): {t['base_score']:.4f} (base) -> "
                     f"{t['score']:.4f}, {t['candidates']} candidates in {t['seconds']:.2f} s{early}")
    return lines


def _train(r: dict) -> list[str]:
    s = r.get("summary") or {}
    best = s.get("best") or r.get("metrics") or {}
    lines = [f"model {r['model']!r} of graph {r['graph']!r}: best epoch {best.get('epoch', '?')} of "
             f"{s.get('epochs_run', '?')}" + (" (stopped early)" if s.get("stopped_early") else "")
             + (f", {s['mean_epoch_seconds']:.1f} s an epoch" if s.get("mean_epoch_seconds") else "")
             + (f" on {s['device']}" if s.get("device") else "")]
    for split in ("valid", "test"):
        if best.get(split):
            lines.append(f"{split}: {_metrics(best[split])}")
    ev = r.get("evaluate")
    if ev == "holdout":
        lines.append(f"evaluated on held-out edges: {r.get('held_out_edges', '?')} validation and test "
                     "edges stay out of the graph it serves from (--evaluate none serves every edge)")
    elif ev:
        lines.append(f"evaluate: {ev}")
    pre = r.get("preset")
    if isinstance(pre, dict):
        why = f" ({pre['why']})" if pre.get("why") else ""
        lines.append(f"preset: {pre.get('preset')} -> {pre.get('chosen')}{why}")
    return lines


def _generic(r: dict) -> list[str]:
    lines = []
    for k, v in r.items():
        line = f"{k}: " + (v if isinstance(v, str) else json.dumps(v, default=str, separators=(", ", ": ")))
        lines.append(line if len(line) <= _WIDTH else line[: _WIDTH - 3] + "...")
    return lines


_BY_KIND: dict[str, Callable[[dict], list[str]]] = {"fastrp": _fastrp, "link_model_train": _train}
