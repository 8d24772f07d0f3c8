"""The shipped MiniLM as LangChain and LlamaIndex embeddings (loads the real model: ~10 s on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from retrieval.errors import InvalidArgument
from retrieval.integrations.embeddings import DIM, MiniLMEmbeddings, encode
from retrieval.integrations.llamaindex import MiniLMEmbedding

pytestmark = pytest.mark.slow


def test_minilm_embeddings_agree_and_rank_paraphrases_first():
    texts = ["A cat sits on the mat.", "The stock market fell sharply today.", "A kitten is lying on a rug."]
    lc = np.asarray(MiniLMEmbeddings(device="cpu").embed_documents(texts))
    assert lc.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(lc, axis=1), 1.0, atol=1e-5)
    q = np.asarray(MiniLMEmbeddings(device="cpu").embed_query("A cat sits on the mat."))
    np.testing.assert_allclose(q, lc[0], atol=1e-5)
    sims = lc @ lc[0]
    assert sims[2] > sims[1] + 0.2                 # the paraphrase is much nearer than the unrelated text
    li = MiniLMEmbedding(device="cpu", embed_batch_size=2)
    np.testing.assert_allclose(np.asarray(li.get_text_embedding_batch(texts)), lc, atol=1e-4)
    np.testing.assert_allclose(np.asarray(li.get_query_embedding(texts[2])), lc[2], atol=1e-4)
    assert encode([], device="cpu").shape == (0, DIM)
    with pytest.raises(InvalidArgument, match="empty"):
        MiniLMEmbeddings(device="cpu").embed_documents([""])
