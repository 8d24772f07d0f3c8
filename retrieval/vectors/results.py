"""Result arrays of a shard search: index-ready vectors, empty results and the top-k merge."""

from __future__ import annotations

import numpy as np

from retrieval.vectors.delta import NO_ID


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """Stored vectors (n, d) float32 -> index-ready vectors: L2-normalised rows for ``"cosine"``, else ``x``."""
    if metric != "cosine":
        return x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def empty_results(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I)`` of ``nq`` queries that found nothing: inf distances, NO_ID ids."""
    return np.full((nq, k), np.inf, np.float32), np.full((nq, k), NO_ID, np.uint64)


def merge_topk(D1: np.ndarray, I1: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int):
    """Merge two (nq, *) result sets into the k nearest per row (ties keep the first set first)."""
    D = np.hstack([D1, D2])
    I = np.hstack([I1, I2])
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
