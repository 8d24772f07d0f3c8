"""Draft latency, memory and datastore build throughput (in-process).

    python -m bench.drafts.speed            # ~3 min on one core
    python -m bench.drafts.speed --quick

Measures, on the shipped data:
* datastore build throughput (tokens/s) from the AlpacaEval texts with the SentencePiece ``.model`` and
  with the ``tokenizers`` JSON, and from pre-tokenized ``.npy`` id files; open time of the memory-mapped
  datastore (cold open = read the manifest + map three files);
* draft latency per step, p50 / p99, for a 64-node tree from all four sources merged with the ~1.3M-token
  AlpacaEval datastore, and per source and for the merge alone, on contexts taken along the recorded
  Spec-Bench generations (history filled with the earlier half of the outputs);
* memory: per session (context buffer + last candidates, and the Python heap measured with tracemalloc),
  the recycling matrix, the history store, the calibration table;
* 128 concurrent sessions stepped by 8 threads: per-step latency and total session memory.
Writes ``bench/results/drafts/speed.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.drafts.common import DATASTORE, RESULTS, catalog, corpus_inputs, make_manager
from bench.drafts.data import TOKENIZER_JSON, TOKENIZER_MODEL, VOCAB_SIZE, load_turns, sp_processor
from retrieval.drafting import DatastoreCatalog, DraftBudget, merge

logger = logging.getLogger("bench.drafts.speed")


def pct(a, q):
    return round(float(np.percentile(np.asarray(a) * 1e3, q)), 4)


def bench_build(quick: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cat = DatastoreCatalog(Path(d) / "stores")
        specs = [("text + SentencePiece .model", dict(tokenizer=str(TOKENIZER_MODEL)))]
        if not quick:
            specs.append(("text + tokenizers JSON", dict(tokenizer=str(TOKENIZER_JSON))))
        for i, (label, kw) in enumerate(specs):
            r = cat.build(f"b{i}", corpus_inputs(), text_fields=["instruction", "output"], **kw)
            rows.append({"input": label, "tokens": r["n_tokens"], "tokenize_s": round(r["tokenize_s"], 3),
                         "sort_s": round(r["sort_s"], 3), "total_s": round(r["total_s"], 3),
                         "tokens_per_s": round(r["tokens_per_s"])})
        # pre-tokenized ids: one .npy per document of the corpus
        ids_dir = Path(d) / "ids"
        ids_dir.mkdir()
        ds = cat.open("b0")
        cuts = np.flatnonzero(ds.tokens == ds.sep)
        start = 0
        for j, c in enumerate(cuts):
            np.save(ids_dir / f"doc{j:05d}.npy", np.asarray(ds.tokens[start:c], dtype=np.int32))
            start = c + 1
        r = cat.build("ids", sorted(str(p) for p in ids_dir.glob("*.npy")), vocab_size=VOCAB_SIZE, chunk_docs=1024)
        rows.append({"input": "pre-tokenized .npy id files", "tokens": r["n_tokens"], "tokenize_s": round(r["tokenize_s"], 3),
                     "sort_s": round(r["sort_s"], 3), "total_s": round(r["total_s"], 3),
                     "tokens_per_s": round(r["tokens_per_s"])})
        t0 = time.perf_counter()
        from retrieval.drafting import CorpusDatastore

        CorpusDatastore(Path(d) / "stores" / "ids")
        rows.append({"input": "open (memory-mapped)", "tokens": r["n_tokens"], "total_s": round(time.perf_counter() - t0, 5)})
    return rows


def contexts(turns, every: int) -> list[np.ndarray]:
    out = []
    for t in turns:
        full = np.concatenate([t.prompt, t.output]).astype(np.int32)
        for i in range(0, len(t.output), every):
            out.append(full[: len(t.prompt) + i])
    return out


def bench_latency(cat, turns, quick: bool) -> dict:
    budget = DraftBudget(64, 10)
    m = make_manager(cat, budget, warm_recycling=True)
    half = len(turns) // 2
    for t in turns[:half]:
        m.history.store.add(t.output)
    srcs = m.resolve_sources(None, DATASTORE)
    ctxs = contexts(turns[half:], 16 if quick else 4)
    # warm the calibration table the way a running server would have it: replay the first half
    from retrieval.drafting.teacher_forcing import replay

    replay(turns[: half // 2], open_session=lambda p: m.open(p, datastore=DATASTORE),
           close_session=lambda s: m.close(s.session_id, record=False), record_latency=False)
    per = {s.name: [] for s in srcs}
    per["merge"], per["total"], nodes = [], [], []
    for c in ctxs:
        t0 = time.perf_counter()
        cands = []
        for s in srcs:
            t1 = time.perf_counter()
            cands += s.propose(c, budget.max_depth, budget.max_nodes)
            per[s.name].append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        d = merge(cands, budget, m.calibrator)
        t2 = time.perf_counter()
        per["merge"].append(t2 - t1)
        per["total"].append(t2 - t0)
        nodes.append(len(d))
    # through the Session object (adds validation, calibration update, context append)
    sess_lat = []
    for t in turns[half: half + (8 if quick else 30)]:
        s = m.open(t.prompt, datastore=DATASTORE)
        out = t.output
        i = 0
        while i < len(out):
            t0 = time.perf_counter()
            d = s.draft()
            sess_lat.append(time.perf_counter() - t0)
            a = min(d.accepted_length(out[i: i + 11].tolist()), len(out) - i - 1)
            s.append(out[i: i + a + 1])
            i += a + 1
        m.close(s.session_id, record=False)
    return {"n_contexts": len(ctxs), "mean_context_tokens": round(float(np.mean([len(c) for c in ctxs])), 1),
            "mean_nodes": round(float(np.mean(nodes)), 2), "datastore_tokens": cat.open(DATASTORE).n_tokens,
            "history_tokens": m.history.store.n_tokens,
            "ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "mean": round(float(np.mean(v)) * 1e3, 4)} for k, v in per.items()},
            "session_draft_ms": {"p50": pct(sess_lat, 50), "p99": pct(sess_lat, 99), "steps": len(sess_lat)},
            "raw_total_ms": (np.asarray(per["total"]) * 1e3).round(4).tolist()}


def bench_memory(cat, turns) -> dict:
    m = make_manager(cat, DraftBudget(64, 10), warm_recycling=True)
    for t in turns:
        m.history.store.add(t.output)
    t = max(turns, key=lambda x: len(x.prompt) + len(x.output))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    sessions = []
    n = 50
    for _ in range(n):
        s = m.open(t.prompt, datastore=DATASTORE)
        s.draft()
        s.append(t.output[:-1])
        s.draft()
        sessions.append(s)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    heap = sum(st.size_diff for st in after.compare_to(before, "filename"))
    ds = cat.open(DATASTORE)
    return {"session_context_tokens": int(len(sessions[0].context)),
            "session_nbytes_reported": sessions[0].nbytes(),
            "session_heap_bytes_measured": int(heap / n),
            "recycling_matrix_bytes": m.recycling.nbytes(),
            "recycling_matrix_shape": list(m.recycling.matrix.M.shape),
            "history_tokens": m.history.store.n_tokens, "history_bytes": m.history.nbytes(),
            "history_bytes_per_token": round(m.history.nbytes() / max(m.history.store.n_tokens, 1), 2),
            "calibrator_bytes": m.calibrator.nbytes(), "datastore_mapped_bytes": ds.nbytes(),
            "datastore_bytes_per_token": round(ds.nbytes() / ds.n_tokens, 2)}


def bench_concurrent(cat, turns, n_sessions: int = 128, n_threads: int = 8, steps: int = 40) -> dict:
    m = make_manager(cat, DraftBudget(64, 10), warm_recycling=True)
    pool = [turns[i % len(turns)] for i in range(n_sessions)]
    sessions = [m.open(t.prompt, datastore=DATASTORE) for t in pool]
    pos = [0] * n_sessions
    lat: list[float] = []
    lock = threading.Lock()

    def worker(ix):
        mine = []
        for _ in range(steps):
            for k in ix:
                s, out = sessions[k], pool[k].output
                if pos[k] >= len(out) - 1:
                    continue
                t0 = time.perf_counter()
                d = s.draft()
                mine.append(time.perf_counter() - t0)
                i = pos[k]
                a = min(d.accepted_length(out[i: i + 11].tolist()), len(out) - i - 1)
                s.append(out[i: i + a + 1])
                pos[k] = i + a + 1
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(list(range(j, n_sessions, n_threads)),)) for j in range(n_threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    st = m.stats()
    for s in sessions:
        m.close(s.session_id)
    return {"sessions": n_sessions, "threads": n_threads, "steps": len(lat), "wall_s": round(wall, 2),
            "steps_per_s": round(len(lat) / wall, 1), "draft_ms_p50": pct(lat, 50), "draft_ms_p99": pct(lat, 99),
            "total_session_bytes": st["session_bytes"]}


def write_markdown(res: dict, path: Path) -> None:
    L = ["# Draft engine speed and memory (in-process)", "",
         f"`python -m bench.drafts.speed` on {res['machine']}, {res['date']}, one Python process "
         f"(the machine's 2 cores are shared with other jobs, load average {res['loadavg_at_start'][0]} at the start, "
         "so tails are noisy).", "",
         "## Datastore build (AlpacaEval, 4 x 801 records)", "", "| input | tokens | tokenize s | suffix sort s | total s | tokens/s |",
         "|---|---|---|---|---|---|"]
    for r in res["build"]:
        L.append(f"| {r['input']} | {r['tokens']:,} | {r.get('tokenize_s', '')} | {r.get('sort_s', '')} | {r['total_s']} | "
                 f"{r.get('tokens_per_s', ''):,} |" if "tokens_per_s" in r else
                 f"| {r['input']} | {r['tokens']:,} | | | {r['total_s']} | |")
    lat = res["latency"]
    L += ["", f"## Draft latency, 64-node tree, {lat['datastore_tokens']:,}-token datastore", "",
          f"{lat['n_contexts']} contexts along the second half of the Spec-Bench outputs (mean {lat['mean_context_tokens']} "
          f"tokens), history of {lat['history_tokens']:,} tokens, mean draft {lat['mean_nodes']} nodes.", "",
          "| stage | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
    for k, v in lat["ms"].items():
        L.append(f"| {k} | {v['p50']:.3f} | {v['p99']:.3f} | {v['mean']:.3f} |")
    s = lat["session_draft_ms"]
    L.append(f"| Session.draft() in a teacher-forced loop ({s['steps']} steps) | {s['p50']:.3f} | {s['p99']:.3f} | |")
    mem = res["memory"]
    L += ["", "## Memory", "", "| what | bytes |", "|---|---|",
          f"| one session, {mem['session_context_tokens']} context tokens (reported by `Session.nbytes`) | {mem['session_nbytes_reported']:,} |",
          f"| one session, Python heap measured with tracemalloc | {mem['session_heap_bytes_measured']:,} |",
          f"| recycling matrix {mem['recycling_matrix_shape'][0]} x {mem['recycling_matrix_shape'][1]} int32 | {mem['recycling_matrix_bytes']:,} |",
          f"| history store, {mem['history_tokens']:,} tokens ({mem['history_bytes_per_token']} B/token) | {mem['history_bytes']:,} |",
          f"| calibration table | {mem['calibrator_bytes']:,} |",
          f"| corpus datastore, memory-mapped ({mem['datastore_bytes_per_token']} B/token) | {mem['datastore_mapped_bytes']:,} |"]
    c = res["concurrent"]
    L += ["", "## Concurrent sessions (in-process)", "",
          f"{c['sessions']} sessions stepped by {c['threads']} threads: {c['steps']} draft steps in {c['wall_s']} s "
          f"({c['steps_per_s']} steps/s, GIL-bound), draft p50 {c['draft_ms_p50']:.3f} ms, p99 {c['draft_ms_p99']:.3f} ms, "
          f"total session memory {c['total_session_bytes']:,} bytes."]
    path.write_text("\n".join(L) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lat = res["latency"]
    ax = axes[0]
    ax.hist(lat["raw_total_ms"], bins=80, range=(0, max(3.0, float(np.percentile(lat["raw_total_ms"], 99.5)))))
    ax.axvline(lat["ms"]["total"]["p50"], color="k", ls="--", label=f"p50 {lat['ms']['total']['p50']:.2f} ms")
    ax.axvline(lat["ms"]["total"]["p99"], color="r", ls=":", label=f"p99 {lat['ms']['total']['p99']:.2f} ms")
    ax.set_xlabel("draft latency per step, ms (64-node tree, 4 sources)")
    ax.set_ylabel("steps")
    ax.legend()
    ax = axes[1]
    names = [k for k in lat["ms"] if k != "total"]
    ax.bar(names, [lat["ms"][k]["p50"] for k in names], label="p50")
    ax.bar(names, [lat["ms"][k]["p99"] - lat["ms"][k]["p50"] for k in names],
           bottom=[lat["ms"][k]["p50"] for k in names], alpha=0.4, label="p99")
    ax.set_ylabel("ms")
    ax.set_title("per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sp_processor()
    turns = load_turns()
    cat = catalog()
    res = {"machine": f"{platform.machine()} ({platform.node()})", "date": time.strftime("%Y-%m-%d"), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    res["build"] = bench_build(args.quick)
    for r in res["build"]:
        print(r, flush=True)
    res["latency"] = bench_latency(cat, turns, args.quick)
    print({k: v for k, v in res["latency"].items() if k != "raw_total_ms"}, flush=True)
    res["memory"] = bench_memory(cat, turns)
    print(res["memory"], flush=True)
    res["concurrent"] = bench_concurrent(cat, turns, steps=10 if args.quick else 40)
    print(res["concurrent"], flush=True)
    name = "speed_quick" if args.quick else "speed"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / f"{name}.md")
    plot(res, out / f"{name}.png")
    print(f"wrote {out / name}.json/.md/.png")
    return res


if __name__ == "__main__":
    main()
