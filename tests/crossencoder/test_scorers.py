"""Scorers: the MiniLM joint scorer reproduces the shipped matrix; HF, callable and table backends;
call counting, truncation reports, fingerprints and typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.crossencoder import CallStats, check_fingerprint, make_scorer
from retrieval.crossencoder.dual import make_dual_encoder
from retrieval.crossencoder.scorers import CallableScorer, TableScorer, minilm_model_dir
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture(scope="module")
def minilm():
    import torch

    torch.set_num_threads(1)
    return make_scorer("minilm-joint", batch_size=16)


def test_minilm_joint_reproduces_fixture_sample(fx, minilm):
    """A seeded sample of 24 (query, item) pairs of the 400 x 1000 matrix, bf16 as shipped."""
    r = np.random.default_rng(7)
    qi, ii = r.integers(0, 400, 24), r.integers(0, 1000, 24)
    stats = CallStats()
    s = minilm.score([fx.queries[a] for a in qi], [fx.items[b] for b in ii], stats)
    err = np.abs(s - fx.S[qi, ii])
    assert s.dtype == np.float32 and s.shape == (24,)
    assert err.max() < 2e-3, err.max()
    assert stats.calls == 24 and stats.seconds > 0
    # Almost every fixture answer is longer than the 96 word-pieces left for it: reported.
    assert stats.truncated_items > 12


def test_minilm_joint_truncation_flags(minilm):
    long_q = "how " * 40 + "?"
    s, tq, ti = minilm.score_detailed([long_q, "short question"], ["short answer", "word " * 300])
    assert tq.tolist() == [True, False]
    assert ti.tolist() == [False, True]
    assert np.all(np.isfinite(s))


def test_minilm_dual_encoder_reproduces_fixture(fx):
    de = make_dual_encoder("minilm", batch_size=8)
    v = de.encode(fx.items[:4] + fx.queries[:2])
    ref = np.concatenate([fx.i_de[:4], fx.q_de[:2]])
    cos = np.sum(v * ref, axis=1)
    assert cos.min() > 0.999, cos


def test_hf_scorer_matches_direct_forward(tiny_hf_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sc = make_scorer("hf", model_dir=str(tiny_hf_dir), batch_size=3, device="cpu")
    qs = ["what is the answer", "how good", "a question of the thing", "what"]
    its = ["the answer is good", "and to the question " * 5, "in", "good answer " * 40]
    s, tq, ti = sc.score_detailed(qs, its)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir).eval()
    ref = []
    for q, it in zip(qs, its, strict=True):
        enc = tok(q, it, truncation="longest_first", max_length=sc.max_length, return_tensors="pt")
        with torch.inference_mode():
            ref.append(float(model(**enc).logits[0, 0]))
    np.testing.assert_allclose(s, ref, atol=1e-5)
    assert sc.max_length == 64
    assert ti.tolist() == [False, False, False, True] and not tq.any()
    # Batch size does not change the numbers; every pair is counted.
    sc1 = make_scorer("hf", model_dir=str(tiny_hf_dir), batch_size=1, device="cpu")
    np.testing.assert_allclose(sc1.score(qs, its), s, atol=1e-5)
    assert sc.totals.calls == 4 and sc1.totals.calls == 4


def test_hf_two_label_head_uses_positive_class(tmp_path):
    from tests.crossencoder.conftest import make_tiny_hf_model

    d = make_tiny_hf_model(tmp_path / "two", seed=3, num_labels=2)
    sc = make_scorer("hf", model_dir=str(d), device="cpu")
    assert sc.label_index == 1
    with pytest.raises(InvalidArgument, match="label_index"):
        make_scorer("hf", model_dir=str(d), device="cpu", label_index=2)


def test_fingerprints_identify_weights_and_settings(tiny_hf_dir, tiny_hf_dir_other, tmp_path):
    import shutil

    a = make_scorer("hf", model_dir=str(tiny_hf_dir), device="cpu")
    b = make_scorer("hf", model_dir=str(tiny_hf_dir_other), device="cpu")
    c = make_scorer("hf", model_dir=str(tiny_hf_dir), device="cpu", max_length=32)
    copy = shutil.copytree(tiny_hf_dir, tmp_path / "copy")
    d = make_scorer("hf", model_dir=str(copy), device="cpu")
    assert a.fingerprint().key != b.fingerprint().key  # other weights
    assert a.fingerprint().key != c.fingerprint().key  # other settings
    assert a.fingerprint().key == d.fingerprint().key  # same weights elsewhere
    assert a.fingerprint().path != d.fingerprint().path
    check_fingerprint(a.fingerprint().to_dict(), d.fingerprint())
    with pytest.raises(FailedPrecondition, match="built with scorer"):
        check_fingerprint(a.fingerprint().to_dict(), b.fingerprint())


def test_missing_or_bad_model_dir(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        make_scorer("hf", model_dir=str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="config.json"):
        make_scorer("hf", model_dir=str(tmp_path))
    with pytest.raises(NotFound, match="does not exist"):
        make_scorer("joint-encoder", model_dir=str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="model_dir"):
        make_scorer("hf")


def test_registry_lists_valid_names():
    with pytest.raises(InvalidArgument, match="unknown scorer backend .bm25.; valid: callable, hf, joint-encoder, minilm-joint, table"):
        make_scorer("bm25")
    with pytest.raises(InvalidArgument, match="bad parameters"):
        make_scorer("callable", fn=lambda q, i: [0.0] * len(q), nonsense=1)
    with pytest.raises(InvalidArgument, match="unknown dual encoder backend .nope.; valid: callable, minilm, sentence-encoder, table"):
        make_dual_encoder("nope")


def test_bad_texts_raise_typed_errors():
    sc = CallableScorer(lambda q, i: [1.0] * len(q), fingerprint="ones/v1")
    with pytest.raises(InvalidArgument, match=r"items\[1\] is empty"):
        sc.score(["a", "b"], ["x", "  "])
    with pytest.raises(InvalidArgument, match=r"queries\[0\] must be a string"):
        sc.score([None], ["x"])
    with pytest.raises(InvalidArgument, match="pair up"):
        sc.score(["a"], ["x", "y"])
    assert sc.totals.calls == 0
    assert sc.score([], []).shape == (0,)


def test_callable_scorer_counts_and_checks_output():
    sc = CallableScorer(lambda q, i: [len(a) - len(b) for a, b in zip(q, i, strict=True)], batch_size=2,
                        fingerprint="lendiff/v1")
    st = CallStats()
    s = sc.score(["aaa", "b", "cc"], ["a", "bb", "c"], st)
    np.testing.assert_array_equal(s, [2, -1, 1])
    assert st.calls == 3 and sc.totals.calls == 3
    bad = CallableScorer(lambda q, i: [float("nan")] * len(q), fingerprint="nan/v1")
    with pytest.raises(FailedPrecondition, match="non-finite"):
        bad.score(["a"], ["b"])
    short = CallableScorer(lambda q, i: [0.0], fingerprint="short/v1")
    with pytest.raises(FailedPrecondition, match="returned 1 scores for a batch of 2"):
        short.score(["a", "b"], ["c", "d"])


def test_table_scorer_lookups(fx):
    sc = fx.scorer()
    s = sc.score([fx.queries[3], fx.queries[250]], [fx.items[10], fx.items[999]])
    np.testing.assert_array_equal(s, [fx.S[3, 10], fx.S[250, 999]])
    with pytest.raises(NotFound, match="not a row"):
        sc.score(["no such query"], [fx.items[0]])
    other = TableScorer(fx.queries, fx.items, fx.S + 1.0)
    assert other.fingerprint().key != sc.fingerprint().key


def test_minilm_model_dir_is_packaged():
    d = minilm_model_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()


@pytest.mark.gpu
def test_joint_scorer_on_cuda_matches_cpu_and_fixture(fx):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = make_scorer("minilm-joint", batch_size=64, device="cuda")
    assert gpu.device == "cuda"
    r = np.random.default_rng(11)
    qi, ii = r.integers(0, 400, 256), r.integers(0, 1000, 256)
    s = gpu.score([fx.queries[a] for a in qi], [fx.items[b] for b in ii])
    assert np.abs(s - fx.S[qi, ii]).max() < 4e-3


def _hard_texts(fx) -> list[str]:
    """Texts where a prefix cut could go wrong: whitespace runs of every kind at any offset, accents,
    punctuation glued to words, CJK without spaces, a long word, a text with no whitespace at all."""
    r = np.random.default_rng(3)
    words = ["what", "is", "the", "Answer", "naïve", "café", "don't", "e-mail", "x" * 150, "3.14", "[SEP]",
             "日本語のテキスト", "über", "?!", "(a)"]
    seps = [" ", "  ", "\t", "\n", " \n\t ", "\u00a0", "\u3000", " " * 40]
    out = list(fx.items[:20]) + list(fx.queries[:10])
    for n in (30, 200, 2000, 20000):
        out.append("".join(str(r.choice(words)) + str(r.choice(seps)) for _ in range(n)))
    out += ["word" * 5000, "a" + " " * 50000 + "b c d", "字" * 3000, "x, " * 3000]
    return out


@pytest.mark.parametrize("keep", [1, 7, 31, 125])
def test_token_cache_prefix_tokenisation_equals_whole_text(fx, minilm, tiny_hf_dir, keep):
    """The cache tokenises only a prefix of a long text; its pieces (and the hf cut) must be exactly
    those of the whole text, for the tokenizers of both model backends."""
    from transformers import AutoTokenizer

    from retrieval.crossencoder.scorers import _TokenCache

    texts = _hard_texts(fx)
    for tok, split in ((minilm._tok, True), (AutoTokenizer.from_pretrained(tiny_hf_dir), False)):
        cache = _TokenCache(tok, split_special_tokens=split, keep=keep)
        full = tok(texts, add_special_tokens=False, truncation=False, verbose=False, split_special_tokens=split,
                   return_offsets_mapping=True)
        got = cache.ids(texts)
        lens, cuts = cache.lengths_and_prefixes(texts)
        for j, t in enumerate(texts):
            ids, offs = full["input_ids"][j], full["offset_mapping"][j]
            assert list(got[j]) == ids[: keep + 1], (keep, j)
            assert lens[j] == min(len(ids), keep + 1)
            assert cuts[j] == (t if len(ids) <= keep else t[: offs[keep - 1][1]])
        assert cache.misses == len(dict.fromkeys(texts)) and cache.hits > 0  # second lookup hit


def test_token_cache_is_bounded(minilm):
    from retrieval.crossencoder.scorers import _TokenCache

    cache = _TokenCache(minilm._tok, split_special_tokens=True, keep=4, max_entries=3, max_chars=400)
    cache.ids(["what is the answer to it", "bb", "cc", "dd"])
    assert list(cache._lru) == ["bb", "cc", "dd"]  # the oldest entry went first
    cache.ids(["word " * 30])  # over a quarter of max_chars: not kept
    assert "word " * 30 not in cache._lru and cache._chars == sum(len(t) for t in cache._lru)
    assert cache.ids(["what is the answer to it"]) == [tuple(minilm._tok("what is the answer to it",
                                                                         add_special_tokens=False)["input_ids"][:5])]
