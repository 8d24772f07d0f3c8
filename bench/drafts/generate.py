"""Speculative decoding with the draft service vs plain greedy ``generate``: tokens/s, MAT, per-step costs.

    python -m bench.drafts.generate                 # two random-weight Llama models, CPU (~5 min on 2 cores)
    python -m bench.drafts.generate --quick         # tiny model only, 4 prompts
    python -m bench.drafts.generate --device cuda   # default: cuda when available, else cpu

No weights can be downloaded here, so the models are Llama architectures with random weights from a
fixed seed, float32: ``tiny`` (hidden 64, 2 layers, vocabulary 256, the tests' model) and ``small``
(hidden 512, 8 layers, vocabulary 32000, 57M parameters, so the LM head and forward pass cost what a
small real model's do). Half the prompts repeat a segment; random models also fall into loops, which
is what prompt lookup catches. Each speculative configuration is checked token for token against
``model.generate(do_sample=False)`` in the same run ("identical").

Configurations (each starts from fresh draft state: its own tokenizer name, hence its own server-side
manager): chain of 8 and tree of 32 nodes (depth 8) over the gRPC session stream with the KV cache
re-gathered along the accepted path (``kv=gather``); the tree with ``kv=rerun`` (crop + re-feed the
accepted nodes); the tree with the in-process engine (no gRPC, same code path otherwise) to isolate the
round trip; and, labelled as an upper bound, the tree with a corpus datastore holding the model's own
greedy outputs for these prompts (drafts are then mostly right).

Reported per configuration: new tokens / s over all prompts (wall time of the calls), the ratio to
``generate``, MAT (tokens per verification step, bonus included), mean draft nodes, per step the
verification (forward + acceptance) ms and the draft round trip ms (the ``append`` that returns the
next draft: accepted ids in, draft out). With a random model acceptance is low, so the number that
transfers to a real model is the round trip: per step it adds ``draft ms`` to ``t_tok (1 + c n)``, so
the speed-up of a real model is at most ``MAT / (1 + c n + draft_ms / t_tok)`` (cost model of
``bench/drafts/mat.py``). Writes ``bench/results/drafts/generate.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.drafts.common import RESULTS
from retrieval.drafting import Draft, DraftBudget

logger = logging.getLogger("bench.drafts.generate")

MODELS = {
    "tiny": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8},
}
CHAIN, TREE = DraftBudget.chain(8), DraftBudget(32, 8)
C_NODE, T_TOK_MS = (2.73 / 2.22 - 1) / 80, 25.0  # bench/drafts/mat.py's cost model (Vicuna-7B, A100)


def build_model(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(device)


def make_prompts(n: int, vocab: int, seed: int = 7) -> list[list[int]]:
    """``n`` prompts of ids in ``[2, vocab)`` (tests/drafting/test_hf.py uses them too); every other one
    repeats a short segment 3-4 times."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            seg = rng.integers(2, vocab, size=int(rng.integers(3, 7))).tolist()
            p = seg * int(rng.integers(3, 5)) + rng.integers(2, vocab, size=int(rng.integers(0, 4))).tolist()
        else:
            p = rng.integers(2, vocab, size=int(rng.integers(6, 30))).tolist()
        out.append(p)
    return out


def ms(a, q=None):
    a = np.asarray(a, dtype=float) * 1e3
    if not len(a):
        return None
    return round(float(a.mean() if q is None else np.percentile(a, q)), 4)


class NullDrafts:
    """A client whose drafts are always empty: ``speculative_generate`` then decodes one token per forward
    pass, the same loop without speculation (separates the drafts' effect from ``generate``'s overheads)."""

    class _S:
        session_id = "null"

        def __init__(self) -> None:
            self.draft = Draft.empty()

        def append(self, accepted_ids, topk=None):
            return self.draft

        def close(self, discard=False):
            pass

        def abort(self):
            pass

    def draft_session(self, prompt_ids, vocab_size, **kw):
        return self._S()


def run_generate(model, prompts, n_new, device, repeats):
    walls = []
    for _ in range(repeats):
        outs, t = [], 0.0
        for p in prompts:
            ids = torch.tensor([p], device=device)
            t0 = time.perf_counter()
            g = model.generate(ids, do_sample=False, max_new_tokens=n_new)
            outs.append(g[0].tolist())
            t += time.perf_counter() - t0
        walls.append(t)
    t = min(walls)
    toks = sum(len(o) - len(p) for o, p in zip(outs, prompts))
    return outs, {"label": "greedy generate (HF)", "tokens": toks, "wall_s": round(t, 4),
                  "wall_s_passes": [round(w, 4) for w in walls], "tokens_per_s": round(toks / t, 2),
                  "ms_per_token": round(t / toks * 1e3, 4)}


def run_spec(model, prompts, n_new, make_client, ref, label, repeats, **kw):
    """``make_client(rep) -> (client, tokenizer name)``: fresh draft state for every pass."""
    from retrieval.drafting.hf import speculative_generate

    rs, walls = [], []
    for rep in range(repeats):
        client, tok = make_client(rep)
        t = 0.0
        for p in prompts:
            t0 = time.perf_counter()
            rs.append(speculative_generate(model, p, client, max_new_tokens=n_new, tokenizer=tok, **kw))
            t += time.perf_counter() - t0
        walls.append(t)
    t = min(walls)
    last = rs[-len(prompts):]
    toks = sum(sum(r.emitted) for r in last)
    steps = sum(r.steps for r in last)
    draft = [x for r in rs for x in r.draft_s[1:]]  # append round trips (the open is once per generation)
    verify = [x for r in rs for x in r.verify_s]
    nodes = [x for r in rs for x in r.draft_nodes]
    row = {"label": label, "tokens": toks, "steps": steps, "wall_s": round(t, 4),
           "wall_s_passes": [round(w, 4) for w in walls], "tokens_per_s": round(toks / t, 2),
           "mat": round(toks / steps, 4), "accepted_per_step": round(sum(sum(r.accepted) for r in last) / steps, 4),
           "mean_nodes": round(float(np.mean(nodes)), 2), "mean_forward_tokens":
               round(float(np.mean([x for r in rs for x in r.forward_tokens])), 2),
           "verify_ms_p50": ms(verify, 50), "verify_ms_mean": ms(verify),
           "draft_ms_p50": ms(draft, 50), "draft_ms_p99": ms(draft, 99), "draft_ms_mean": ms(draft),
           "open_ms_mean": ms([r.draft_s[0] for r in rs]), "close_ms_mean": ms([r.close_s for r in rs]),
           "identical": all(r.sequences[0].tolist() == ref[i % len(prompts)] for i, r in enumerate(rs))}
    row["step_ms_mean"] = round(t / steps * 1e3, 4)
    row["draft_share_of_step"] = round(row["draft_ms_mean"] / row["step_ms_mean"], 4) if row["draft_ms_mean"] else 0.0
    return row


def bench_model(name, args, client, srv_dir: Path, results: list) -> dict:
    from retrieval.drafting.engine import DraftsEngine
    from retrieval.drafting.hf import InProcessDrafts

    model = build_model(name, args.device)
    V = model.config.vocab_size
    prompts = make_prompts(args.prompts, V)
    n_new, reps = args.new_tokens, args.repeats
    # warm-up (allocator, lazy imports, the server's first session of this vocabulary)
    model.generate(torch.tensor([prompts[0]], device=args.device), do_sample=False, max_new_tokens=8)
    run_spec(model, prompts[:1], 8, lambda rep: (client, f"bench/{name}/warmup"), [[]], "warm-up", 1, budget=TREE,
             discard=True)
    ref, g = run_generate(model, prompts, n_new, args.device, reps)
    g.update(model=name)
    results.append(g)
    print(f"{name:6s} {g['label']:58s} {g['tokens_per_s']:9.1f} tok/s  ({g['ms_per_token']:.2f} ms/token)", flush=True)
    f = srv_dir / f"self-{name}.ids"
    f.write_text("\n".join(" ".join(map(str, o)) for o in ref) + "\n")
    job = client.build_datastore(f"self_{name}", [str(f)], vocab_size=V, overwrite=True)
    assert job["state"] == "succeeded", job
    confs = [("own loop, no drafts (1 token / forward pass)", {"null": True}),
             ("chain 8, gRPC, kv=gather", {"budget": CHAIN}),
             ("tree 32, gRPC, kv=gather", {"budget": TREE}),
             ("tree 32, gRPC, kv=rerun", {"budget": TREE, "kv": "rerun"}),
             ("tree 32, in-process (no gRPC), kv=gather", {"budget": TREE, "local": True}),
             ("tree 32, gRPC, + datastore of the model's own outputs (upper bound)",
              {"budget": TREE, "datastore": f"self_{name}"})]
    for ci, (label, kw) in enumerate(confs):
        if kw.pop("null", False):
            def make(rep):
                return NullDrafts(), None
        elif kw.pop("local", False):
            def make(rep):
                return InProcessDrafts(DraftsEngine(tempfile.mkdtemp(dir=srv_dir))), None
        else:
            def make(rep, ci=ci):
                return client, f"bench/{name}/config{ci}/pass{rep}"
        r = run_spec(model, prompts, n_new, make, ref, label, reps, **kw)
        r.update(model=name, speedup_vs_generate=round(r["tokens_per_s"] / g["tokens_per_s"], 4),
                 bound_real_model=round(r["mat"] / (1 + C_NODE * r["mean_nodes"]
                                                    + (r["draft_ms_mean"] or 0.0) / T_TOK_MS), 3))
        results.append(r)
        print(f"{name:6s} {label[:58]:58s} {r['tokens_per_s']:9.1f} tok/s  x{r['speedup_vs_generate']:.2f}  "
              f"MAT {r['mat']:.2f}  nodes {r['mean_nodes']:5.1f}  verify {r['verify_ms_mean']:7.2f} ms  "
              f"draft {r['draft_ms_p50']:.2f}/{r['draft_ms_mean']:.2f} ms  identical={r['identical']}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": name, "config": MODELS[name], "params": n_params, "prompts": len(prompts), "new_tokens": n_new}


def write_markdown(res, path: Path) -> None:
    L = ["# Speculative decoding with the draft service vs greedy `generate`", "",
         f"`{res['command']}` on {res['machine']}, {res['date']}, device `{res['device']}`, torch "
         f"{res['torch']}, transformers {res['transformers']}, {res['threads']} intra-op thread(s); the machine's "
         f"2 cores are shared by the model, the server and other jobs (load average {res['loadavg_at_start'][0]} at the "
         "start). Random-weight Llama models (fixed seed, float32): "
         + "; ".join(f"`{m['model']}` {m['params'] / 1e6:.2f}M parameters" for m in res["models"])
         + f"; {res['models'][0]['prompts']} prompts, {res['models'][0]['new_tokens']} new tokens each, batch size 1.", "",
         ("| model | configuration | tokens/s | vs generate | MAT | nodes | fed / step | verify ms | draft round trip "
          "p50 / mean ms | draft share of step | identical | real-model bound |"),
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "mat" not in r:
            L.append(f"| {r['model']} | {r['label']} | {r['tokens_per_s']:.1f} | 1.00 | 1.00 | | 1 | "
                     f"{r['ms_per_token']:.2f} / token | | | | |")
            continue
        L.append(f"| {r['model']} | {r['label']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_generate']:.2f} | "
                 f"{r['mat']:.2f} | {r['mean_nodes']:.1f} | {r['mean_forward_tokens']:.1f} | {r['verify_ms_mean']:.2f} | "
                 f"{r['draft_ms_p50']:.2f} / {r['draft_ms_mean']:.2f} | {100 * r['draft_share_of_step']:.0f}% | "
                 f"{'yes' if r['identical'] else '**no**'} | {r['bound_real_model']:.2f}x |")
    notes = [
        "**identical**: every output equals `model.generate(do_sample=False)` token for token.",
        "**fed / step**: tokens in the verification forward pass (pending + draft nodes).",
        ("**draft round trip**: one `append` on the session stream (accepted ids in, the next draft out), as seen by "
        "the decoding client between two forward passes; the in-process row runs the same engine without gRPC."),
        ("**real-model bound**: `MAT / (1 + c n + draft_ms / t_tok)` with `c = 0.0029` per node and `t_tok = 25 ms` "
        "(Vicuna-7B fp16 on an A100, bench/drafts/mat.py's cost model), at this run's MAT and round trip: what the same "
        "drafts would give a model that costs 25 ms a token. With random weights the MAT is low (the acceptance comes "
        "from loops); the upper-bound row shows the drafts of a datastore holding the outputs."),
        ("On a CPU the verification pass costs about linearly in the tokens fed, so trees cost far more than on a GPU "
        "(where 33 tokens cost about one); the ratio to `generate` here is not what a GPU gives. HF `generate` also "
        "has a per-token overhead of its own (logits processors, stopping criteria, cache bookkeeping) that this "
        "loop does not, which dominates for the tiny model."),
        ("KV cache: `gather` re-gathers the cache along the accepted path; `rerun` crops to the contiguous accepted "
        "prefix and re-feeds the rest (more tokens per pass, same output)."),
        ("Load caveat: with 8 runnable jobs on 2 cores, a loop that never waits (no drafts, or the in-process "
         "engine) is descheduled more than one that sleeps on the gRPC reply, so its per-pass ms is inflated ("
         "tiny: 9.6 ms for 1 token vs 4.5 ms for 12); compare rows within a run, and treat the ratios as indicative."),
        (f"Timing: best of {res['repeats']} passes over the prompts (each with fresh draft state) for tokens/s; "
        "per-step latencies pooled over all passes."),
    ]
    L += [""] + [f"* {x}" for x in notes]
    path.write_text("\n".join(L) + "\n")


def plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m["model"] for m in res["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    labels = list(dict.fromkeys(r["label"] for r in res["runs"]))
    w = 0.8 / len(models)
    for mi, m in enumerate(models):
        vals = [next((r["tokens_per_s"] for r in res["runs"] if r["model"] == m and r["label"] == lab), 0)
                for lab in labels]
        ax.barh(np.arange(len(labels)) + mi * w, vals, height=w, label=m)
    ax.set_yticks(np.arange(len(labels)) + w * (len(models) - 1) / 2)
    ax.set_yticklabels([lab[:48] for lab in labels], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("new tokens / s (log)")
    ax.set_title(f"tokens/s, batch 1, {res['device']}")
    ax.legend()
    ax = axes[1]
    spec = [r for r in res["runs"] if "mat" in r]
    x = np.arange(len(spec))
    ax.bar(x, [r["verify_ms_mean"] for r in spec], label="verification forward pass")
    ax.bar(x, [r["draft_ms_mean"] for r in spec], bottom=[r["verify_ms_mean"] for r in spec],
           label="draft round trip")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['model']}: {r['label'][:30]}" for r in spec], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per verification step (mean)")
    ax.set_yscale("log")
    ax.set_title("per-step cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 prompts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server needs a core too)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="passes per configuration; tokens/s of the best")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.prompts = "tiny", 4
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    import transformers

    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"command": "python -m bench.drafts.generate" + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()} ({platform.node()})", "date": time.strftime("%Y-%m-%d"),
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "device": args.device,
           "torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads, "repeats": args.repeats,
           "cost_model": {"c_node": C_NODE, "t_tok_ms": T_TOK_MS}, "models": [], "runs": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        srv = ServerProcess(d / "data", env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(d)])})
        srv.start()
        try:
            with Client(srv.address, timeout=120) as c:
                for name in args.models.split(","):
                    res["models"].append(bench_model(name, args, c, d, res["runs"]))
        finally:
            srv.stop()
    name = "generate_quick" if args.quick else "generate"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out_dir / f"{name}.md")
    plot(res, out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json/.md/.png")
    return res


if __name__ == "__main__":
    main()
