"""Draft latency over gRPC: a real server process on loopback, the AlpacaEval datastore (1.31M tokens).

    python -m bench.drafts.grpc_latency            # ~3 min
    python -m bench.drafts.grpc_latency --quick

Measures, in one run:
* the datastore build through the service (a ``build_datastore`` job) and its throughput;
* one session stream: the round trip of each ``append`` (accepted ids in, the next 64-node tree out)
  while replaying recorded Spec-Bench generations (teacher forcing), p50 / p99; the same replay
  in-process (``Session.draft``) in the same run, for the ratio;
* the stateless unary ``Draft`` call on the same contexts;
* 128 concurrent sessions driven by 16 client threads over one channel: steps/s, p50 / p99.
Writes ``bench/results/drafts/grpc.{json,md,png}``.
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
from pathlib import Path

import numpy as np

from bench.drafts.common import RESULTS, corpus_inputs, make_manager
from bench.drafts.data import CORPUS_DIR, TOKENIZER_MODEL, VOCAB_SIZE, load_turns
from retrieval.drafting import DatastoreCatalog, DraftBudget

logger = logging.getLogger("bench.drafts.grpc_latency")
NAME = "alpaca_eval"


def ms(a, q):
    return round(float(np.percentile(np.asarray(a) * 1e3, q)), 4) if len(a) else None


def replay_remote(client, turns, max_steps=None):
    lat, nodes = [], []
    for t in turns:
        with client.draft_session(t.prompt, VOCAB_SIZE, datastore=NAME, max_nodes=64, max_depth=10) as s:
            out, i, d = t.output, 0, s.draft
            while i < len(out):
                a = min(d.accepted_length(out[i:i + 11].tolist()), len(out) - i - 1)
                t0 = time.perf_counter()
                d = s.append(out[i:i + a + 1])
                lat.append(time.perf_counter() - t0)
                nodes.append(len(d))
                i += a + 1
                if max_steps and len(lat) >= max_steps:
                    return lat, nodes
    return lat, nodes


def replay_local(mgr, turns, max_steps=None):
    lat = []
    for t in turns:
        s = mgr.open(t.prompt, datastore=NAME)
        out, i = t.output, 0
        t0 = time.perf_counter()
        d = s.draft()
        lat.append(time.perf_counter() - t0)
        while i < len(out):
            a = min(d.accepted_length(out[i:i + 11].tolist()), len(out) - i - 1)
            t0 = time.perf_counter()
            s.append(out[i:i + a + 1], defer_feedback=True)  # the server's order: learn after replying
            d = s.draft()
            lat.append(time.perf_counter() - t0)
            s.flush_feedback()
            i += a + 1
            if max_steps and len(lat) >= max_steps:
                break
        mgr.close(s.session_id)
        if max_steps and len(lat) >= max_steps:
            break
    return lat


def concurrent(client, turns, n_sessions=128, n_threads=16, steps=20):
    lat, errors = [], []
    lock = threading.Lock()

    def worker(ix):
        mine = []
        try:
            sessions = [(client.draft_session(turns[k % len(turns)].prompt, VOCAB_SIZE, datastore=NAME),
                         turns[k % len(turns)].output) for k in ix]
            pos = [0] * len(sessions)
            for _ in range(steps):
                for j, (s, out) in enumerate(sessions):
                    i = pos[j]
                    if i >= len(out) - 1:
                        continue
                    a = min(s.draft.accepted_length(out[i:i + 11].tolist()), len(out) - i - 1)
                    t0 = time.perf_counter()
                    s.append(out[i:i + a + 1])
                    mine.append(time.perf_counter() - t0)
                    pos[j] = i + a + 1
            for s, _ in sessions:
                s.close(discard=True)
        except Exception as e:  # reported in the results
            errors.append(repr(e))
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker, args=(list(range(j, n_sessions, n_threads)),)) for j in range(n_threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t0
    return {"sessions": n_sessions, "client_threads": n_threads, "steps": len(lat), "wall_s": round(wall, 2),
            "steps_per_s": round(len(lat) / wall, 1), "p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99),
            "errors": errors[:5], "n_errors": len(errors)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    turns = load_turns()
    warm, test = turns[:140:4], turns[140::(8 if args.quick else 3)]
    res = {"machine": f"{platform.machine()} ({platform.node()})", "date": time.strftime("%Y-%m-%d"), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as d:
        # the server reads the corpus and tokenizer from bench/datasets: let clients name files there
        srv = ServerProcess(Path(d) / "data", env={
            "RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(CORPUS_DIR), str(TOKENIZER_MODEL.parent)])})
        srv.start()
        try:
            with Client(srv.address, timeout=120) as c:
                t0 = time.perf_counter()
                job = c.build_datastore(NAME, corpus_inputs(), tokenizer=str(TOKENIZER_MODEL),
                                        text_fields=["instruction", "output"])
                wall = time.perf_counter() - t0
                r = job["result"]
                res["build"] = {"state": job["state"], "tokens": r.get("n_tokens"), "job_total_s": round(r.get("total_s", 0), 3),
                                "client_wall_s": round(wall, 3), "tokens_per_s": round(r.get("tokens_per_s", 0))}
                print(res["build"], flush=True)
                # local twin: same datastore files, same warm-up, same configuration as the server
                cat = DatastoreCatalog(Path(d) / "data" / "drafting" / "datastores")
                from retrieval.drafting.engine import DraftsEngine

                local = make_manager(cat, DraftBudget(64, 10))
                local.history.store.rebuild_fraction = DraftsEngine(Path(d) / "twin").template.history_rebuild_fraction
                # warm both: calibration, recycling and history learn from earlier generations
                replay_remote(c, warm)
                replay_local(local, warm)
                steps = 600 if args.quick else None
                rl, nodes = replay_remote(c, test, steps)
                ll = replay_local(local, test, steps)
                res["stream"] = {"steps": len(rl), "mean_nodes": round(float(np.mean(nodes)), 2), "p50_ms": ms(rl, 50),
                                 "p90_ms": ms(rl, 90), "p99_ms": ms(rl, 99), "mean_ms": round(float(np.mean(rl)) * 1e3, 4)}
                res["in_process"] = {"steps": len(ll), "p50_ms": ms(ll, 50), "p99_ms": ms(ll, 99),
                                     "mean_ms": round(float(np.mean(ll)) * 1e3, 4)}
                res["stream_over_in_process_p50"] = round(res["stream"]["p50_ms"] / res["in_process"]["p50_ms"], 3)
                print("stream", res["stream"], "in-process", res["in_process"], flush=True)
                # stateless unary on contexts along the test generations
                ctxs = []
                for t in test[:10]:
                    full = np.concatenate([t.prompt, t.output])
                    ctxs += [full[: len(t.prompt) + i] for i in range(0, len(t.output), 9)]
                ul = []
                for x in ctxs[: (150 if args.quick else 600)]:
                    t0 = time.perf_counter()
                    c.draft(x, VOCAB_SIZE, datastore=NAME)
                    ul.append(time.perf_counter() - t0)
                res["unary"] = {"calls": len(ul), "p50_ms": ms(ul, 50), "p99_ms": ms(ul, 99)}
                print("unary", res["unary"], flush=True)
                # transport floor: the same stream round trip with a 1-node draft from the recycling row only
                fl = []
                with c.draft_session(test[0].prompt, VOCAB_SIZE, sources=["recycling"], max_nodes=1, max_depth=1) as s1:
                    for tok in test[0].output[:300].tolist():
                        t0 = time.perf_counter()
                        s1.append([tok])
                        fl.append(time.perf_counter() - t0)
                res["transport_floor"] = {"steps": len(fl), "p50_ms": ms(fl, 50), "p99_ms": ms(fl, 99)}
                print("floor", res["transport_floor"], flush=True)
                res["concurrent"] = concurrent(c, test, steps=8 if args.quick else 20)
                print("concurrent", res["concurrent"], flush=True)
                res["raw_stream_ms"] = (np.asarray(rl) * 1e3).round(4).tolist()
                res["raw_in_process_ms"] = (np.asarray(ll) * 1e3).round(4).tolist()
        finally:
            srv.stop()
    name = "grpc_quick" if args.quick else "grpc"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / f"{name}.md")
    plot(res, out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json/.md/.png")
    return res


def write_markdown(res, path: Path) -> None:
    s, p, u, c, b = res["stream"], res["in_process"], res["unary"], res["concurrent"], res["build"]
    L = ["# Draft latency over gRPC (loopback, one server process)", "",
         f"`python -m bench.drafts.grpc_latency` on {res['machine']}, {res['date']}; 2 cores shared by the server, "
         f"the client and other jobs (load average {res['loadavg_at_start'][0]} at the start). 64-node trees (mean "
         f"{s['mean_nodes']} nodes), all four sources, AlpacaEval datastore of {b['tokens']:,} tokens.", "",
         "| path | steps | p50 ms | p99 ms | mean ms |", "|---|---|---|---|---|",
         f"| session stream: append round trip (accepted ids in, next draft out) | {s['steps']} | {s['p50_ms']:.3f} | "
         f"{s['p99_ms']:.3f} | {s['mean_ms']:.3f} |",
         f"| in-process `Session.append` + `draft` (same replay, same run) | {p['steps']} | {p['p50_ms']:.3f} | "
         f"{p['p99_ms']:.3f} | {p['mean_ms']:.3f} |",
         f"| stateless unary `Draft` | {u['calls']} | {u['p50_ms']:.3f} | {u['p99_ms']:.3f} | |",
         f"| transport floor: stream round trip with a 1-node recycling draft | {res['transport_floor']['steps']} | "
         f"{res['transport_floor']['p50_ms']:.3f} | {res['transport_floor']['p99_ms']:.3f} | |",
         f"| {c['sessions']} concurrent sessions, {c['client_threads']} client threads | {c['steps']} | {c['p50_ms']:.3f} | "
         f"{c['p99_ms']:.3f} | |", "",
         f"Stream p50 / in-process p50 = {res['stream_over_in_process_p50']}. Concurrent: {c['steps_per_s']} steps/s, "
         f"{c['n_errors']} errors.", "",
         f"Datastore build through the service (job): {b['tokens']:,} tokens in {b['job_total_s']} s "
         f"({b['tokens_per_s']:,} tokens/s; {b['client_wall_s']} s as the client waited)."]
    path.write_text("\n".join(L) + "\n")


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    hi = max(4.0, float(np.percentile(res["raw_stream_ms"], 99)))
    ax.hist(res["raw_in_process_ms"], bins=100, range=(0, hi), alpha=0.6, label="in-process Session")
    ax.hist(res["raw_stream_ms"], bins=100, range=(0, hi), alpha=0.6, label="gRPC session stream")
    ax.axvline(1.0, color="k", ls=":", label="1 ms target")
    ax.set_xlabel("ms per step (64-node tree, 1.31M-token datastore)")
    ax.set_ylabel("steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
