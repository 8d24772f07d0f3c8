"""Hardware detection: CPU by default, CUDA when present. Detected, never assumed."""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def torch_device() -> str:
    """``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # torch missing or broken CUDA install: fall back to CPU
        return "cpu"


@functools.lru_cache(maxsize=1)
def faiss_num_gpus() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu)."""
    try:
        import faiss

        get = getattr(faiss, "get_num_gpus", None)
        return int(get()) if get is not None else 0
    except Exception:
        return 0
