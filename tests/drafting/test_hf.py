"""``retrieval.drafting.hf``: speculative decoding of a Hugging Face model with drafts from a real server.

The models are tiny (2 layers, hidden 64) with random weights from a fixed seed, built from a config
(nothing is downloaded), float32. Acceptance is made non-trivial two ways: half the prompts repeat a
segment, and small random models fall into loops that prompt lookup catches; and the corpus datastore
holds the model's own greedy outputs for the first prompts, so the corpus source drafts what it says.
Exactness is checked token for token against ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.drafts.generate import make_prompts
from retrieval.drafting import DraftBudget
from retrieval.drafting.hf import InProcessDrafts, greedy_walk, speculative_generate, verify_inputs
from retrieval.errors import InvalidArgument

V = 256  # the main model's vocabulary
V_MAT = 320  # the MAT test's model: its own (fresh) manager on the server
N_NEW = 32
EOS = 1
CHAIN, TREE = DraftBudget.chain(8), DraftBudget(32, 8)


def llama(vocab: int, seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=EOS, attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def greedy(model, prompt, max_new_tokens=N_NEW, **kw) -> torch.Tensor:
    return model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, two spinning threads make a tiny forward pass 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return llama(V)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(24, V, seed=7)


@pytest.fixture(scope="module")
def reference(model, prompts):
    """``model.generate`` greedy outputs ``(1, P + G)`` per prompt."""
    return [greedy(model, p) for p in prompts]


@pytest.fixture(scope="module")
def self_store(client, reference, tmp_path_factory):
    """A datastore of the model's own greedy texts for the first 8 prompts (the corpus then drafts them)."""
    f = tmp_path_factory.mktemp("hf") / "self.ids"
    f.write_text("\n".join(" ".join(map(str, r[0].tolist())) for r in reference[:8]) + "\n")
    job = client.build_datastore("hf_self", [str(f)], vocab_size=V, overwrite=True)
    assert job["state"] == "succeeded", job
    return "hf_self"


def test_worked_example_inputs():
    """docs/drafting.md's example: the pass feeds [The] + the 6 nodes at positions 6, 7, 8, 9, 7, 8, 8; the
    greedy tokens 'cat is nice' accept nodes 0 -> 5 and emit [cat, is, nice]."""
    cat, sat, on, dog, ran, is_, nice = range(11, 18)  # "The" (10) is the root, already in the context
    tokens, parents = [cat, sat, on, dog, ran, is_], np.array([-1, 0, 1, -1, 3, 0])
    mask, pos = verify_inputs(6, 1, parents, torch.float32, "cpu")  # 6 cached + the root "The"
    assert pos.tolist() == [[6, 7, 8, 9, 7, 8, 8]]
    allow = (mask[0, 0] == 0).int()
    assert allow.shape == (7, 13) and allow[:, :7].all()  # every row sees the context and the root
    assert allow[1:, 7:].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                      [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]]
    assert allow[0, 7:].sum() == 0
    pred = [cat, is_, 0, 0, 0, 0, nice]  # argmax after the root and after each node (after "is": "nice")
    path, bonus = greedy_walk(tokens, parents.tolist(), pred)
    assert path == [0, 5] and [tokens[i] for i in path] + [bonus] == [cat, is_, nice]


@pytest.mark.parametrize("budget", [CHAIN, TREE], ids=["chain8", "tree32"])
def test_identical_to_greedy_generate(model, prompts, reference, client, self_store, budget):
    accepted, steps, deep, branched = 0, 0, 0, 0
    for p, ref in zip(prompts, reference):
        r = speculative_generate(model, torch.tensor([p]), client, datastore=self_store, max_new_tokens=N_NEW,
                                 budget=budget)
        assert r.sequences.tolist() == ref.tolist(), f"prompt {p}"
        assert sum(r.emitted) == ref.shape[1] - len(p) and r.mat == pytest.approx(sum(r.emitted) / r.steps)
        assert all(n <= budget.max_nodes for n in r.draft_nodes)
        accepted += sum(r.accepted)
        steps += r.steps
        deep += sum(a >= 3 for a in r.accepted)
        branched += sum(path != list(range(len(path))) for path in r.paths)  # a path off the first branch
    # the verification path is really exercised: many accepted tokens, long paths, (trees) side branches
    assert accepted > steps and deep > 10, (accepted, steps, deep)
    assert steps < len(prompts) * N_NEW / 2
    if budget.tree:
        assert branched > 0


def test_kv_modes_and_eager_attention_agree(prompts, client, self_store):
    """``kv="rerun"`` (crop + re-feed) and ``"gather"`` give the same tokens, with eager attention too. Gather
    feeds only the root each step; rerun also re-feeds the accepted nodes after the first one off the
    contiguous run ``0, 1, 2, ...`` of the previous step."""
    def contiguous(path):
        j = 0
        while j < len(path) and path[j] == j:
            j += 1
        return j

    m = llama(V, attn="eager")
    refed = 0
    for p in prompts[:6]:
        ref = greedy(m, p).tolist()
        g = speculative_generate(m, p, client, datastore=self_store, max_new_tokens=N_NEW, budget=TREE, kv="gather")
        r = speculative_generate(m, p, client, datastore=self_store, max_new_tokens=N_NEW, budget=TREE, kv="rerun")
        assert g.sequences.tolist() == ref == r.sequences.tolist()
        assert all(f - n == 1 for f, n in zip(g.forward_tokens, g.draft_nodes))
        pend = [1] + [1 + len(path) - contiguous(path) for path in r.paths[:-1]]
        assert [f - n for f, n in zip(r.forward_tokens, r.draft_nodes)] == pend
        refed += sum(pend) - len(pend)
    assert refed > 0  # some tree paths left the first branch, so rerun had work to do


def test_eos_and_max_new_tokens(model, prompts, reference, client):
    """Stops after EOS (kept) exactly as generate does, from the generation config or an explicit id."""
    for p, ref in list(zip(prompts, reference))[:4]:
        out = ref[0, len(p):].tolist()
        eos = out[len(out) // 2]  # a token the model emits mid-way: generation ends at its first occurrence
        want = ref[:, :len(p) + out.index(eos) + 1].tolist()
        assert greedy(model, p, eos_token_id=eos).tolist() == want
        r = speculative_generate(model, p, client, max_new_tokens=N_NEW, budget=TREE, eos_token_id=eos)
        assert r.sequences.tolist() == want
    p, out = prompts[1], reference[1][0, len(prompts[1]):].tolist()
    gc = model.generation_config
    old = gc.eos_token_id
    try:
        gc.eos_token_id = out[5]
        want = greedy(model, p).tolist()
        assert len(want[0]) <= len(p) + 6
        assert speculative_generate(model, p, client, max_new_tokens=N_NEW).sequences.tolist() == want
    finally:
        gc.eos_token_id = old
    for n in (1, 2, 7):
        assert speculative_generate(model, prompts[3], client, max_new_tokens=n).sequences.tolist() == \
            reference[3][:, :len(prompts[3]) + n].tolist()


def test_topk_feeds_token_recycling(model, prompts, reference):
    """``topk=k`` sends the model's top-k at every accepted position; the recycling rows then hold them
    (row of token x = the model's top-k after the latest position whose input was x)."""
    from retrieval.drafting import ManagerConfig, SessionManager

    mgr = SessionManager(ManagerConfig(vocab_size=V))
    p, ref = prompts[0], reference[0]
    r = speculative_generate(model, p, InProcessDrafts(mgr), max_new_tokens=N_NEW, budget=TREE, topk=4,
                             sources=["recycling", "context"])
    assert r.sequences.tolist() == ref.tolist()
    seq = ref[0]
    with torch.inference_mode():
        logits = model(seq[None]).logits[0]
    want = {}
    for j in range(len(p) - 1, len(seq) - 1):  # the input token of each generated position
        want[int(seq[j])] = logits[j].topk(4).indices.tolist()
    rows = mgr.recycling.matrix.M
    same = np.mean([rows[x, :4].tolist() == w for x, w in want.items()])
    assert same >= 0.9, same  # float ties in the top-4 of a random model may reorder a row


def test_mat_equals_teacher_forced_mat(client):
    """The client's MAT over 4 generations equals the teacher-forced MAT (bench.drafts.mat's measurement:
    ``teacher_forcing.replay`` on the generated text) of a fresh twin of the server's manager."""
    import tempfile

    from bench.drafts.data import Turn
    from bench.drafts.mat import summarize
    from retrieval.drafting.engine import DraftsEngine
    from retrieval.drafting.teacher_forcing import replay

    m = llama(V_MAT, seed=1)
    ps = make_prompts(4, V_MAT, seed=11)
    runs = [speculative_generate(m, p, client, max_new_tokens=40, budget=TREE) for p in ps]
    client_mat = sum(sum(r.emitted) for r in runs) / sum(r.steps for r in runs)
    assert sum(sum(r.accepted) for r in runs) > 0

    class ServerOrder:  # the server's order: the calibration update runs after the next draft is made
        def __init__(self, s):
            self.s = s

        def draft(self):
            d = self.s.draft()
            self.s.flush_feedback()
            return d

        def append(self, ids):
            self.s.append(ids, defer_feedback=True)

    mgr = DraftsEngine(tempfile.mkdtemp()).manager(V_MAT)  # the server's template, fresh state
    turns = [Turn(i, 1, "hf", "hf", np.asarray(p, np.int32), np.asarray(r.new_tokens, np.int32),
                  len(r.new_tokens))
             for i, (p, r) in enumerate(zip(ps, runs))]
    st = replay(turns, open_session=lambda p: ServerOrder(mgr.open(p, budget=TREE)),
                close_session=lambda w: mgr.close(w.s.session_id))
    assert st.steps == sum(r.steps for r in runs) and st.tokens == sum(sum(r.emitted) for r in runs)
    assert st.mat == pytest.approx(client_mat, abs=1e-12)
    assert summarize("hf", st, {})["mat"] == round(client_mat, 4)


def test_gpt2_and_in_process_client(prompts):
    """Another architecture (learned positions, its own attention) and the in-process client."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from retrieval.drafting.engine import DraftsEngine

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                   bos_token_id=0, eos_token_id=EOS)).eval()
    import tempfile

    cl = InProcessDrafts(DraftsEngine(tempfile.mkdtemp()))
    acc = 0
    for p in prompts[:6]:
        ref = greedy(m, p).tolist()
        for b in (CHAIN, TREE):
            r = speculative_generate(m, p, cl, max_new_tokens=N_NEW, budget=b)
            assert r.sequences.tolist() == ref
            acc += sum(r.accepted)
    assert acc > 0


def test_bad_arguments(model, client):
    with pytest.raises(InvalidArgument, match="batch size 2"):
        speculative_generate(model, torch.zeros((2, 3), dtype=torch.long), client)
    with pytest.raises(InvalidArgument, match="kv="):
        speculative_generate(model, [3, 4], client, kv="copy")
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        speculative_generate(model, [3, 4], client, max_new_tokens=0)
    with pytest.raises(InvalidArgument, match="empty"):
        speculative_generate(model, [], client)
    from transformers import MistralConfig, MistralForCausalLM

    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=8)).eval()
    with pytest.raises(InvalidArgument, match="DynamicSlidingWindowLayer"):
        speculative_generate(sliding, [3, 4], client)


def test_tokenizer_names_its_own_state(model, prompts, reference, client):
    """``tokenizer=`` reaches ``draft_session``: the server keeps this tokenizer's state apart."""
    r = speculative_generate(model, prompts[2], client, max_new_tokens=N_NEW, tokenizer="tests/hf-llama-256")
    assert r.sequences.tolist() == reference[2].tolist()
