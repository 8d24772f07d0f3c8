"""Teacher-forced acceptance (MAT) of the draft sources on the Spec-Bench dev half.

    python -m bench.drafts.mat                 # all configurations (~15 min on 1 core)
    python -m bench.drafts.mat --quick         # every 4th turn, fewer configurations
    python -m bench.drafts.mat --split train   # even questions only (holdout: odd); with --only merged
    python -m bench.drafts.mat --grpc          # the same through a real server (spawned, loopback)
    python -m bench.drafts.mat --server HOST:PORT   # through a running server (its state as it is)
    python -m bench.drafts.mat --questions Q.jsonl --answers A.jsonl --corpus C.json --tokenizer T.model

Data flags: ``--questions`` / ``--answers`` (Spec-Bench's question.jsonl and a model_answer jsonl of
recorded greedy outputs, any model), ``--corpus`` (files for the datastore, json/jsonl/text, fields
``--text-fields``), ``--tokenizer`` (the model's SentencePiece ``.model`` or ``tokenizers`` ``.json``),
``--bos-id`` / ``--eos-id``. Prompts use the ``vicuna_v1.1`` template. Defaults: the shipped Spec-Bench dev
half (Vicuna-7B) and AlpacaEval corpus.

Through gRPC (``--grpc``): a server process is started on loopback with a temporary data folder, the
datastore is built by the service (a ``build_datastore`` job), and the server is restarted before each
configuration, so each starts, as in process, from an empty history, fresh calibration and a fresh
recycling matrix, which the server warm-starts from the datastore the first session names (the served
configuration; sessions without a datastore get no warm start). Sessions name the tokenizer's
fingerprint. Configurations that need a server-side knob the API does not expose (no calibration, ``max``
instead of noisy-or, no warm start with a datastore) are skipped there. Draft latency is then the
``append`` round trip.

Method (see ``retrieval/drafting/teacher_forcing.py``): the 280 recorded greedy Vicuna-7B turns are
replayed; at each step the draft is compared with the true next tokens, a tree counts its longest
accepted path, and MAT = tokens / steps (bonus token included). Sessions see only what a real client
sends back (the accepted ids); nothing uses model logits. Turns are replayed in file order and each
configuration starts from an empty history, a fresh calibration table and a fresh recycling matrix.

Held-out split (``--split train|holdout``): questions are numbered in file order and the even-numbered
ones (0, 2, ...) form ``train``, the odd-numbered ones ``holdout`` (both turns of a two-turn question stay
together; every category is split in half). Constants of the draft engine are tuned on ``train`` only
and reported on both. ``--only SUBSTR,...`` keeps the configurations whose label contains one of the
substrings; ``--budgets`` the budgets run (e.g. ``tree64``). Results of a split or a selection are written
with a suffix (``mat_train.json``, ...) so the full table is not overwritten.

Token recycling without logits: the paper fills its matrix with the model's top-8 candidates at each
verified position. We do not have them, so the matrix is fed with the accepted ids only (the successor
seen after a token moves to the front of its row), and optionally warm-started with the 8 most frequent
successors of each token in the AlpacaEval corpus ("+warm"). These rows are labelled as such.

Projected speed-up (verification cost model, stated): one verification step with ``n`` draft nodes
costs ``t_tok * (1 + c * n) + t_draft``, plain decoding ``t_tok`` per token, so
``speedup = MAT / (1 + c * n + t_draft / t_tok)``. ``c`` is calibrated on Token Recycling's published
A100 figures (MAT 2.73 -> 2.22x with 80 nodes, so ``1 + 80 c = 2.73 / 2.22``, ``c = 0.0029``), ``t_tok = 25
ms`` (Vicuna-7B fp16, HF, A100, about 40 tokens/s), ``t_draft`` our measured mean draft latency on this CPU.
Writes ``bench/results/drafts/mat.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from bench.drafts.common import DATASTORE, RESULTS, catalog, make_manager
from bench.drafts.data import CATEGORIES, load_turns
from retrieval.drafting import Draft, DraftBudget
from retrieval.drafting.kernels import pld_chain
from retrieval.drafting.teacher_forcing import ReplayStats, replay

logger = logging.getLogger("bench.drafts.mat")

C_NODE = (2.73 / 2.22 - 1) / 80  # verification cost per draft node, relative to one decoding step
T_TOK_S = 0.025  # Vicuna-7B fp16 decoding step on an A100 (HF), seconds
PUBLISHED = {"PLD (Spec-Bench, A100)": 1.75, "REST": 1.82, "Lookahead": 1.64, "Token Recycling (80 nodes, logits)": 2.73}
SOURCE_MD_PLD = {"mt_bench": 1.731, "translation": 1.105, "summarization": 2.615, "qa": 1.285,
                 "math_reasoning": 1.832, "rag": 1.692, "overall": 1.731}

BUDGETS = {"chain10": DraftBudget.chain(10), "tree64": DraftBudget(64, 10), "tree80": DraftBudget(80, 10),
           "tree64d16": DraftBudget(64, 16)}
#: the singles and merged rows of the full table run these (tree64d16: only the merged row)
TABLE_BUDGETS = ["chain10", "tree64", "tree80"]
#: the engine before issue 19: the corpus source's longest match only, no per-session recalibration
BEFORE_19 = dict(source_params={"corpus": {"levels": 1}}, session_correction=None)
ALL = ["context", "corpus", "recycling", "history"]


def configs(quick: bool) -> list[dict]:
    out = []
    singles = [("context", ["context"], False), ("corpus", ["corpus"], False), ("history", ["history"], False),
               ("recycling (accepted ids only)", ["recycling"], False),
               ("recycling (accepted ids + corpus warm start)", ["recycling"], True)]
    for bname in (["chain10", "tree64"] if quick else TABLE_BUDGETS):
        for label, names, warm in singles:
            out.append(dict(label=label, sources=names, warm=warm, budget=bname, group="single"))
        out.append(dict(label="merged (all four)", sources=ALL, warm=True, budget=bname, group="merged"))
    if not quick:
        for drop in ALL:
            out.append(dict(label=f"merged without {drop}", sources=[s for s in ALL if s != drop], warm=True,
                            budget="tree64", group="ablation"))
        out.append(dict(label="merged, recycling not warm-started", sources=ALL, warm=False, budget="tree64",
                        group="ablation"))
        out.append(dict(label="merged, no calibration (priors only)", sources=ALL, warm=True, budget="tree64",
                        group="ablation", calibrate=False, session_correction=None))
        out.append(dict(label="merged, max instead of noisy-or", sources=ALL, warm=True, budget="tree64",
                        group="ablation", combine="max"))
        out.append(dict(label="merged, no per-session recalibration", sources=ALL, warm=True, budget="tree64",
                        group="ablation", session_correction=None))
        out.append(dict(label="merged, corpus longest match only", sources=ALL, warm=True, budget="tree64",
                        group="ablation", source_params={"corpus": {"levels": 1}}))
        out.append(dict(label="merged, before issue 19 (both of the above)", sources=ALL, warm=True, budget="tree64",
                        group="ablation", **BEFORE_19))
        out.append(dict(label="merged (all four)", sources=ALL, warm=True, budget="tree64d16", group="merged"))
    return out


def split_turns(turns, split: str):
    """``train``: the turns of the even-numbered questions (file order), ``holdout``: the odd ones."""
    if split == "all":
        return list(turns)
    if split not in ("train", "holdout"):
        raise SystemExit(f"--split {split!r}: expected all, train or holdout")
    order: dict = {}
    for t in turns:
        order.setdefault(t.question_id, len(order))
    return [t for t in turns if (order[t.question_id] % 2 == 0) == (split == "train")]


def run_pld_reference(turns, require_full: bool) -> ReplayStats:
    def drafter(ctx):
        return Draft.from_chain(pld_chain(ctx, 3, 1, 10, require_full=require_full), "pld")
    return replay(turns, drafter=drafter)


def load_turns_from(questions, answers, tokenizer, bos: int = 1, eos: int = 2):
    """Turns of any Spec-Bench-format recorded answers (as :func:`bench.drafts.data.load_turns`, with the
    files and tokenizer given): ``vicuna_v1.1`` prompts, answers re-encoded with EOS appended."""
    from bench.drafts.data import MT_BENCH, SYSTEM, Turn
    from retrieval.drafting.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    qs = {}
    for line in Path(questions).read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            qs[q["question_id"]] = q
    turns = []
    for line in Path(answers).read_text().splitlines():
        if not line.strip():
            continue
        a = json.loads(line)
        q, ch = qs[a["question_id"]], a["choices"][0]
        sub = a.get("category") or q.get("category", "unknown")
        cat = "mt_bench" if sub in MT_BENCH else sub
        done, history = [bos], SYSTEM
        for ti, (qtext, atext) in enumerate(zip(q["turns"], ch["turns"])):
            prompt_text = f"{history} USER: {qtext} ASSISTANT:" if history else f"USER: {qtext} ASSISTANT:"
            prompt = np.array(done + tok.encode(prompt_text), dtype=np.int32)
            out = np.array(tok.encode(atext) + [eos], dtype=np.int32)
            new = ch.get("new_tokens", [len(out)] * len(ch["turns"]))[ti]
            turns.append(Turn(a["question_id"], ti + 1, cat, sub, prompt, out, int(new)))
            done = done + tok.encode(f"{prompt_text} {atext}") + [eos]
            history = ""
    return turns


class _RemoteSession:
    """A gRPC :class:`retrieval.client.DraftSession` with the in-process session's ``draft()`` /
    ``append()``; the latency of each ``append`` round trip (accepted ids in, next draft out) is kept."""

    def __init__(self, rs, latency: list) -> None:
        self.rs, self.latency = rs, latency

    def draft(self):
        return self.rs.draft

    def append(self, ids) -> None:
        t0 = time.perf_counter()
        self.rs.append(ids)
        self.latency.append(time.perf_counter() - t0)


def grpc_servable(cfg) -> bool:
    """Configurations a client can ask a server for (sources and budget; warm start = the server's rule)."""
    if cfg.get("calibrate", True) is False or cfg.get("combine", "noisy_or") != "noisy_or":
        return False
    if "source_params" in cfg or "session_correction" in cfg:  # engine knobs a client cannot set
        return False
    return "recycling" not in cfg["sources"] or cfg["warm"] == bool(cfg.get("datastore_named", True))


def run_config_grpc(turns, client, cfg, datastore: str, vocab_size: int, fingerprint: str) -> ReplayStats:
    budget = BUDGETS[cfg["budget"]]
    lat: list = []
    # the datastore is named when the configuration warm-starts recycling (the server's rule) or uses the corpus
    ds = datastore if ("corpus" in cfg["sources"] or cfg["warm"]) else None

    def open_session(p):
        return _RemoteSession(client.draft_session(p, vocab_size, datastore=ds, sources=cfg["sources"],
                                                   max_nodes=budget.max_nodes, max_depth=budget.max_depth,
                                                   chain=not budget.tree, tokenizer=fingerprint), lat)

    st = replay(turns, open_session=open_session, close_session=lambda s: s.rs.close(), record_latency=True)
    st.latency_s = lat
    return st


def run_config(turns, cat, cfg) -> ReplayStats:
    budget = BUDGETS[cfg["budget"]]
    extra = {"session_correction": cfg["session_correction"]} if "session_correction" in cfg else {}
    m = make_manager(cat, budget, warm_recycling=cfg["warm"], calibrate=cfg.get("calibrate", True),
                     combine=cfg.get("combine", "noisy_or"), source_params=cfg.get("source_params"), **extra)
    ds = DATASTORE if "corpus" in cfg["sources"] else None
    return replay(turns, open_session=lambda p: m.open(p, sources=cfg["sources"], datastore=ds),
                  close_session=lambda s: m.close(s.session_id))


def summarize(label, st: ReplayStats, extra: dict) -> dict:
    lat = np.asarray(st.latency_s) * 1e3
    nodes = float(np.mean(st.draft_nodes)) if st.draft_nodes else 0.0
    t_draft = float(lat.mean() / 1e3) if len(lat) else 0.0
    speedup = st.mat / (1 + C_NODE * nodes + t_draft / T_TOK_S)
    row = {"label": label, **extra, "mat": round(st.mat, 4),
           "by_category": {c: round(v, 4) for c, v in st.mat_by_cat().items()},
           "steps": st.steps, "tokens": st.tokens, "mean_nodes": round(nodes, 2),
           "draft_ms_p50": round(float(np.median(lat)), 4) if len(lat) else None,
           "draft_ms_p99": round(float(np.percentile(lat, 99)), 4) if len(lat) else None,
           "draft_ms_mean": round(float(lat.mean()), 4) if len(lat) else None,
           "projected_speedup": round(speedup, 3)}
    return row


def write_markdown(res: dict, path) -> None:
    cats = list(CATEGORIES)
    lines = ["# Draft acceptance on the Spec-Bench dev half (teacher forcing)", "",
             f"Generated by `python -m bench.drafts.mat` on {res['machine']}, {res['date']}. "
             f"{res['n_turns']} turns, {res['n_tokens']} generated tokens; corpus datastore `{DATASTORE}` "
             f"({res['datastore_tokens']:,} AlpacaEval tokens). No model logits anywhere.", "",
             "MAT = mean tokens per verification step including the bonus token. Projected speed-up = "
             f"MAT / (1 + {C_NODE:.4f} n + t_draft / {T_TOK_S * 1e3:.0f} ms), n = mean draft nodes "
             "(cost model in the script's docstring).", "",
             "## Harness check: prompt lookup, n=3..1, earliest match, chain of 10", "",
             "| rule | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
    for r in res["pld_reference"]:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['by_category'].get(c, 0):.3f}" for c in cats)
                     + f" | **{r['mat']:.3f}** |")
    lines.append("| SOURCE.md / ANCHORS.md (truncated rule) | " + " | ".join(f"{SOURCE_MD_PLD[c]:.3f}" for c in cats)
                 + f" | {SOURCE_MD_PLD['overall']:.3f} |")
    lines += ["", "## Sources alone and merged", "",
              "| source(s) | budget | " + " | ".join(cats) + " | overall | mean nodes | draft p50 / p99 ms | proj. speed-up |",
              "|---" * (len(cats) + 6) + "|"]
    for r in res["runs"]:
        if r["group"] == "ablation":
            continue
        lines.append(f"| {r['label']} | {r['budget']} | " + " | ".join(f"{r['by_category'].get(c, 0):.3f}" for c in cats)
                     + f" | **{r['mat']:.3f}** | {r['mean_nodes']:.1f} | {r['draft_ms_p50']:.2f} / {r['draft_ms_p99']:.2f}"
                     f" | {r['projected_speedup']:.2f}x |")
    abl = [r for r in res["runs"] if r["group"] == "ablation"]
    if abl:
        full = next((r for r in res["runs"] if r["group"] == "merged" and r["budget"] == "tree64"), None)
        lines += ["", "## What each part adds (tree of 64 nodes)", "",
                  "| configuration | overall MAT | change vs merged |", "|---|---|---|"]
        if full:
            lines.append(f"| merged (all four) | {full['mat']:.3f} | |")
        for r in abl:
            lines.append(f"| {r['label']} | {r['mat']:.3f} | {r['mat'] - full['mat']:+.3f} |" if full else
                         f"| {r['label']} | {r['mat']:.3f} | |")
    lines += ["", "## Published figures (Spec-Bench, Vicuna-7B, A100; ANCHORS.md)", "",
              "| method | MAT |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in PUBLISHED.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in res["runs"] if r["group"] != "ablation"]
    budgets = [b for b in BUDGETS if any(r["budget"] == b for r in runs)]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    w = 0.8 / len(budgets)
    for bi, b in enumerate(budgets):
        vals = [next((r["mat"] for r in runs if r["label"] == lab and r["budget"] == b), 0) for lab in labels]
        ax.barh(np.arange(len(labels)) + bi * w, vals, height=w, label=b)
    ax.axvline(res["pld_reference"][0]["mat"], color="k", ls="--", lw=1, label="PLD reference")
    ax.axvline(2.73, color="r", ls=":", lw=1, label="Token Recycling (logits) 2.73")
    ax.set_yticks(np.arange(len(labels)) + w * (len(budgets) - 1) / 2)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("MAT (tokens per step)")
    ax.set_title("Overall MAT, Spec-Bench dev half")
    ax.legend(fontsize=8)
    ax = axes[1]
    cats = list(CATEGORIES)
    sel = [r for r in runs if r["budget"] == "tree64"] or runs
    for r in sel:
        ax.plot(cats, [r["by_category"].get(c, 0) for c in cats], marker="o", label=r["label"])
    ax.plot(cats, [res["pld_reference"][0]["by_category"].get(c, 0) for c in cats], "k--", label="PLD reference (chain 10)")
    ax.set_ylabel("MAT")
    ax.set_title("MAT per category (tree, 64 nodes)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    from bench.drafts.common import corpus_inputs
    from bench.drafts.data import ANSWERS, QUESTIONS, TOKENIZER_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every 4th turn and fewer configurations")
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N turns (0: all)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--split", default="all", choices=["all", "train", "holdout"],
                    help="held-out split of the questions: train = even-numbered, holdout = odd-numbered")
    ap.add_argument("--only", default="", help="comma-separated label substrings of the configurations to run")
    ap.add_argument("--budgets", default="", help="comma-separated budgets to run (chain10, tree64, tree80)")
    ap.add_argument("--grpc", action="store_true", help="run through a real server on loopback (spawned)")
    ap.add_argument("--server", default="", help="run through this running server (HOST:PORT) instead")
    ap.add_argument("--questions", default=str(QUESTIONS), help="Spec-Bench question.jsonl")
    ap.add_argument("--answers", default=str(ANSWERS), help="recorded greedy answers (Spec-Bench model_answer jsonl)")
    ap.add_argument("--corpus", nargs="+", default=None, help="datastore input files (default: AlpacaEval)")
    ap.add_argument("--text-fields", default="instruction,output", help="json fields joined into a document")
    ap.add_argument("--tokenizer", default=str(TOKENIZER_MODEL), help="the model's .model or tokenizer .json")
    ap.add_argument("--bos-id", type=int, default=1)
    ap.add_argument("--eos-id", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_data = (args.questions == str(QUESTIONS) and args.answers == str(ANSWERS) and args.corpus is None
                    and args.tokenizer == str(TOKENIZER_MODEL))
    turns = load_turns() if default_data else load_turns_from(args.questions, args.answers, args.tokenizer,
                                                              args.bos_id, args.eos_id)
    turns = split_turns(turns, args.split)
    if args.quick:
        turns = turns[::4]
    if args.limit:
        turns = turns[:args.limit]
    corpus = [str(Path(p).resolve()) for p in (args.corpus or corpus_inputs())]
    fields = [f for f in args.text_fields.split(",") if f]
    remote = args.grpc or bool(args.server)
    if default_data:
        cat = catalog()
    else:  # a catalog for these inputs, under the results folder
        from retrieval.drafting import DatastoreCatalog

        cat = DatastoreCatalog(out / "datastores")
        if DATASTORE in cat.names():
            cat.drop(DATASTORE)
        cat.build(DATASTORE, corpus, tokenizer=args.tokenizer, text_fields=fields)
    ds = cat.open(DATASTORE)
    res = {"machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()})".strip(),
           "date": time.strftime("%Y-%m-%d"), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "n_turns": len(turns), "n_tokens": int(sum(len(t.output) for t in turns)),
           "datastore_tokens": ds.n_tokens, "cost_model": {"c_node": C_NODE, "t_tok_s": T_TOK_S},
           "published": PUBLISHED, "source_md_pld": SOURCE_MD_PLD, "pld_reference": [], "runs": []}
    print(f"{'configuration':48s} {'budget':8s} " + " ".join(f"{c[:8]:>8s}" for c in CATEGORIES)
          + f" {'overall':>8s} {'nodes':>6s} {'p50ms':>6s} {'p99ms':>6s} {'speedup':>7s}", flush=True)

    def show(r):
        print(f"{r['label'][:48]:48s} {r.get('budget', 'chain10'):8s} "
              + " ".join(f"{r['by_category'].get(c, 0):8.3f}" for c in CATEGORIES)
              + f" {r['mat']:8.3f} {r['mean_nodes']:6.1f} {r['draft_ms_p50']:6.2f} {r['draft_ms_p99']:6.2f}"
              f" {r['projected_speedup']:6.2f}x", flush=True)

    for rf, label in ((False, "PLD reference, truncated continuations allowed"),
                      (True, "PLD reference, Spec-Bench rule (full 10 tokens)")):
        r = summarize(label, run_pld_reference(turns, rf), {"budget": "chain10", "group": "reference"})
        res["pld_reference"].append(r)
        show(r)
    res["mode"] = ("grpc (spawned server)" if args.grpc else f"grpc ({args.server})") if remote else "in-process"
    res["data"] = {"questions": args.questions, "answers": args.answers, "corpus": corpus, "tokenizer": args.tokenizer}
    if remote:
        from retrieval.drafting.tokenizer import tokenizer_fingerprint

        _run_remote(args, turns, corpus, fields, res, show, tokenizer_fingerprint(args.tokenizer), ds.vocab_size)
    else:
        for cfg in selected_configs(args):
            t0 = time.perf_counter()
            st = run_config(turns, cat, cfg)
            r = summarize(cfg["label"], st, {k: v for k, v in cfg.items() if k != "label"})
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            res["runs"].append(r)
            show(r)
    name = ("mat_quick" if args.quick else "mat") + ("_grpc" if remote else "")
    name += "" if args.split == "all" else f"_{args.split}"
    name += "_partial" if (args.only or args.budgets or args.limit) and not args.quick else ""
    res["split"] = args.split
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    write_markdown(res, out / f"{name}.md")
    plot(res, out / f"{name}.png")
    print(f"wrote {out / name}.json/.md/.png")
    return res


def selected_configs(args) -> list[dict]:
    only = [x for x in args.only.split(",") if x]
    budgets = [x for x in args.budgets.split(",") if x]
    return [c for c in configs(args.quick) if (not only or any(o in c["label"] for o in only))
            and (not budgets or c["budget"] in budgets)]


def _run_remote(args, turns, corpus, fields, res, show, fingerprint, vocab_size) -> None:
    """Each servable configuration through gRPC (see the module docstring)."""
    import tempfile

    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    srv = None
    tmp = tempfile.TemporaryDirectory(prefix="mat-grpc-")
    try:
        if args.grpc:
            dirs = sorted({str(Path(p).resolve().parent) for p in [*corpus, args.tokenizer]})
            srv = ServerProcess(Path(tmp.name) / "data", env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps(dirs)})
            address = srv.start()
        else:
            address = args.server
        with Client(address, timeout=600) as c:
            job = c.build_datastore(DATASTORE, corpus, tokenizer=str(Path(args.tokenizer).resolve()),
                                    text_fields=fields, overwrite=True)
            if job["state"] != "succeeded":
                raise SystemExit(f"building the datastore through the service failed: {job.get('error')}")
        for i, cfg in enumerate(selected_configs(args)):
            cfg = {**cfg, "datastore_named": "corpus" in cfg["sources"] or cfg["warm"]}
            if not grpc_servable(cfg):
                logger.info("skipped over gRPC (needs a server-side knob): %s %s", cfg["label"], cfg["budget"])
                continue
            if srv is not None and i:
                srv.stop()  # a fresh state per configuration (the datastore survives the restart)
                address = srv.start()
            t0 = time.perf_counter()
            with Client(address, timeout=600) as c:
                st = run_config_grpc(turns, c, cfg, DATASTORE, vocab_size, fingerprint)
            r = summarize(cfg["label"], st, {k: v for k, v in cfg.items() if k not in ("label", "datastore_named")})
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            res["runs"].append(r)
            show(r)
    finally:
        if srv is not None:
            srv.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
