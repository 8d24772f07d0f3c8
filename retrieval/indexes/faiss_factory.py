"""Reading faiss factory strings without faiss: how many training points a factory needs.

Shared by the index (:mod:`retrieval.indexes.faiss_index`) and the spec checks
(:mod:`retrieval.indexes.validate`), which must not import each other both ways.
"""

from __future__ import annotations

import re

_IVF = re.compile(r"IVF(\d+)")
_IMI = re.compile(r"IMI(\d+)x(\d+)")
# PQ16, PQ16x4, PQ16x4fs, OPQ16_64 (the OPQ part), RQ4x8, LSQ4x8, PRQ2x4x8, PLSQ2x4x8
_PQ = re.compile(r"(?<![A-Z])(?:O?PQ|RQ|LSQ)(\d+)(?:x(\d+))?")
_PRQ = re.compile(r"P(?:RQ|LSQ)(\d+)x(\d+)(?:x(\d+))?")


def _code_bits(factory: str) -> list[int]:
    """Bits per sub-code of every PQ-like part (8 when not written)."""
    out = []
    for m in _PQ.finditer(factory):
        if m.group(0).startswith("OPQ"):
            out.append(8)  # OPQ trains a PQ of 8-bit codes
            continue
        out.append(int(m.group(2)) if m.group(2) else 8)
    for m in _PRQ.finditer(factory):
        out.append(int(m.group(3)) if m.group(3) else 8)
    return out


def min_train_points(factory: str) -> int:
    """The fewest training points faiss accepts for ``factory`` (it refuses fewer points than
    centroids): the IVF list count, 2**bits per PQ-like code, 2**N for IMI2xN; 0 when untrained."""
    n = 0
    for m in _IVF.finditer(factory):
        n = max(n, int(m.group(1)))
    for m in _IMI.finditer(factory):
        n = max(n, 1 << min(int(m.group(2)), 62))
    for b in _code_bits(factory):
        n = max(n, 1 << min(b, 62))
    return n


def default_train_size(factory: str) -> int:
    """Points to collect before training: 39 per IVF list (faiss's recommended minimum) and 10 per PQ
    centroid (2,560 for 8-bit codes; faiss warns below 39 but trains well enough from 10)."""
    n = 0
    m = re.search(r"IVF(\d+)", factory)
    if m:
        n = max(n, 39 * int(m.group(1)))
    m = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if m:
        nbits = int(m.group(2)) if m.group(2) else 8
        n = max(n, 10 * (1 << nbits))
    return n
