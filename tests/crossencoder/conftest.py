"""Shared fixtures: the shipped score fixture, a fixture index, and a tiny random HF cross-encoder."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest

from bench.crossencoder.fixture import load_fixture
from retrieval.crossencoder import build_and_load


@pytest.fixture(scope="session")
def fx():
    return load_fixture()


@pytest.fixture(scope="session")
def fixture_index(fx, tmp_path_factory):
    """Index over the 1,000 fixture items, k_q = 300 anchor queries, k_i = 100 (qr), dual encoder."""
    d = tmp_path_factory.mktemp("ce-index")
    index, stats = build_and_load(d / "idx", scorer=fx.scorer(), dual_encoder=fx.dual_encoder(),
                                  items=fx.item_records(), anchor_queries=fx.anchor_pool,
                                  params={"k_i": 100, "anchor_method": "qr", "chunk_size": 100})
    return index, stats


def make_tiny_hf_model(path: Path, seed: int = 0, num_labels: int = 1, max_positions: int = 64) -> Path:
    """A 2-layer BERT cross-encoder with random weights and a small word-piece vocabulary."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["the", "a", "is", "what", "how", "of", "and", "to", "in", "answer", "question", "good"]
    vocab_list = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
                  + list(string.punctuation) + ["##" + c for c in string.ascii_lowercase + string.digits] + words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max_positions, num_labels=num_labels)
    model = BertForSequenceClassification(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_other(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf-2") / "model", seed=1)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
