import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.drafting import CorpusDatastore, DatastoreCatalog, Tokenizer, build_datastore_job
from retrieval.drafting.kernels import build_suffix_array
from retrieval.errors import AlreadyExists, Cancelled, InvalidArgument, NotFound
from retrieval.jobs import JobContext, LocalJobContext

DATA = Path(__file__).resolve().parents[2] / "bench" / "datasets" / "drafting"
SP_MODEL = DATA / "tokenizer" / "tokenizer.model"
TK_JSON = DATA / "tokenizer" / "tokenizer.json"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Speculative decoding drafts tokens; the model verifies them.",
         "The quick brown fox is quick."]


def _write_texts(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "other": 1}) for t in TEXTS) + "\n")
    return f


def _expected_tokens(ids_per_doc, sep):
    out = []
    for ids in ids_per_doc:
        out += list(ids) + [sep]
    return out


@pytest.mark.parametrize("tok_path", [SP_MODEL, TK_JSON], ids=["sentencepiece", "tokenizers-json"])
def test_build_from_text_with_tokenizer(tmp_path, tok_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    cat = DatastoreCatalog(tmp_path / "stores")
    res = cat.build("chat", [str(_write_texts(tmp_path))], tokenizer=str(tok_path))
    ds = cat.open("chat")
    want = _expected_tokens([sp.encode(t) for t in TEXTS], 32000)
    assert ds.tokens.tolist() == want
    assert ds.tokens.dtype == np.uint16 and ds.sep == 32000
    assert ds.sa.tolist() == build_suffix_array(np.array(want)).tolist()
    m = cat.describe("chat")
    assert m["vocab_size"] == 32000 and m["n_tokens"] == len(want) - 3 and m["n_docs"] == 3
    assert m["tokenizer"]["fingerprint"] == Tokenizer(tok_path).fingerprint
    assert res["tokens_per_s"] > 0
    # a pattern from the texts is found as often as it occurs
    quick = sp.encode("quick")
    assert ds.count(quick) == sum(1 for d in [sp.encode(t) for t in TEXTS]
                                  for i in range(len(d)) if d[i:i + len(quick)] == quick)


def test_build_from_id_files_and_mmap_reload(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 70000, size=int(rng.integers(1, 50))) for _ in range(20)]
    (tmp_path / "a.ids").write_text("\n".join(" ".join(map(str, d)) for d in docs[:10]) + "\n")
    for i, d in enumerate(docs[10:]):
        np.save(tmp_path / f"b{i:02d}.npy", d)
    inputs = [str(tmp_path / "a.ids")] + sorted(str(p) for p in tmp_path.glob("b*.npy"))
    cat = DatastoreCatalog(tmp_path / "stores")
    cat.build("ids", inputs, vocab_size=70000, chunk_docs=3)
    mm = cat.open("ids")
    assert mm.tokens.dtype == np.int32  # 70000 does not fit uint16
    assert mm.tokens.tolist() == _expected_tokens(docs, 70000)
    full = CorpusDatastore(tmp_path / "stores" / "ids", mmap=False)
    for name in ("tokens", "sa", "offsets"):
        assert np.array_equal(getattr(mm, name), getattr(full, name))
    assert isinstance(np.load(tmp_path / "stores" / "ids" / "sa.npy", mmap_mode="r"), np.memmap)
    ctx = np.concatenate([docs[4][:5]])
    assert mm.longest_match(ctx, 8) == full.longest_match(ctx, 8)


def test_catalog_list_describe_drop_and_errors(small_catalog, tmp_path):
    cat, _ = small_catalog
    assert cat.names() == ["tiny"]
    assert cat.describe("tiny")["n_docs"] == 4
    with pytest.raises(AlreadyExists):
        cat.build("tiny", [str(tmp_path / "docs.ids")], vocab_size=7)
    with pytest.raises(InvalidArgument, match="name"):
        cat.build("../evil", [str(tmp_path / "docs.ids")], vocab_size=7)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        cat.build("small", [str(tmp_path / "docs.ids")], vocab_size=6)
    with pytest.raises(InvalidArgument, match="tokenizer"):
        (tmp_path / "t.txt").write_text("hello")
        cat.build("text", [str(tmp_path / "t.txt")], vocab_size=100)
    with pytest.raises(NotFound):
        cat.build("nofile", [str(tmp_path / "missing.txt")], vocab_size=100)
    with pytest.raises(InvalidArgument):
        cat.build("novocab", [str(tmp_path / "docs.ids")])
    with pytest.raises(InvalidArgument):
        cat.build("fmt", [str(tmp_path / "docs.ids")], vocab_size=7, input_format="xml")
    cat.drop("tiny")
    assert cat.names() == []
    with pytest.raises(NotFound, match="does not exist"):
        cat.describe("tiny")
    with pytest.raises(NotFound):
        cat.open("tiny")


class _CancelAfter(JobContext):
    def __init__(self, work_dir, n):
        super().__init__("j1", work_dir)
        self.n = n

    def _on_progress(self):
        if self.message == "tokenize" and self.done >= self.n:
            self.cancel()


def test_build_job_is_cancellable_and_resumes(tmp_path):
    docs = [[i % 7, (i + 1) % 7, (i * 3) % 7] for i in range(40)]
    f = tmp_path / "d.ids"
    f.write_text("\n".join(" ".join(map(str, d)) for d in docs))
    work = tmp_path / "work"
    ctx = _CancelAfter(work, 10)
    with pytest.raises(Cancelled):
        build_datastore_job(ctx, root=tmp_path / "stores", name="r", inputs=[str(f)], vocab_size=7, chunk_docs=5)
    done_chunks = sorted(p.name for p in (work / "chunks").glob("chunk_*.npy"))
    assert 2 <= len(done_chunks) < 8
    assert not (tmp_path / "stores" / "r").exists()
    stamp = {p: (work / "chunks" / p).stat().st_mtime_ns for p in done_chunks}
    res = build_datastore_job(LocalJobContext(work, show_progress=False), root=tmp_path / "stores", name="r",
                              inputs=[str(f)], vocab_size=7, chunk_docs=5)
    assert all((work / "chunks" / p).stat().st_mtime_ns == t for p, t in stamp.items())  # reused, not redone
    assert res["n_docs"] == 40
    assert CorpusDatastore(tmp_path / "stores" / "r").tokens.tolist() == _expected_tokens(docs, 7)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(NotFound):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "x.vocab").write_text("a")
    with pytest.raises(InvalidArgument):
        Tokenizer(tmp_path / "x.vocab")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidArgument):
        Tokenizer(tmp_path / "bad.json")
