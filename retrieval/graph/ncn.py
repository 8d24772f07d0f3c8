r"""NCN and NCNC link predictors in plain torch (no torch_sparse / torch_scatter / PyG).

Paper: X. Wang, H. Yang, M. Zhang, "Neural Common Neighbor with Completion for Link Prediction",
ICLR 2024 (code: github.com/GraphPKU/NeuralCommonNeighbor; hyper-parameters in :data:`PRESETS` are
the README's commands for each dataset).

Equations (paper notation; h = MPNN(A, X) the node representations, N(i) the neighbours of i in A)::

    MPNN ("puregcn", 1 layer):  h = jk * drop_t( D~^{-1/2} (A + I) D~^{-1/2} drop_g(W drop_x(X)) ),  D~ = D + I
    NCN(i, j)  = MLP( xij(h_i * h_j) + beta * xcn( sum_{k in N(i) & N(j)} h'_k ) ),   h' = h + xlin(h)
    NCNC(i, j) = MLP( xij(h_i * h_j) + beta * xcn( sum_{k in N(i) & N(j)} h'_k
                                         + sum_{k in N(i) \ N(j)} p_jk h'_k
                                         + sum_{k in N(j) \ N(i)} p_ik h'_k ) )
    p_jk       = alpha * pt * q / (pt * q + 1 - q),   q = sigmoid(scale * (NCN(j, k) - offset))
                 (the completion probability of the missing edge (j, k), calibrated; no gradient)

Training (see :mod:`retrieval.graph.linkpred`): target-link removal -- the edges of the current batch
are taken out of A before the MPNN and the common-neighbour sets are computed -- and one uniformly
sampled non-edge per positive; loss ``-log s(pos) - log(1 - s(neg))``.

Common neighbours are computed with sorted 64-bit keys ``b * n + k`` (b = target index in the batch,
k = neighbour) of the gathered CSR rows and a ``searchsorted`` intersection; the aggregation is a sparse
``(B x n) @ (n x h)`` product (``torch.sparse.mm``), so no ``B x n`` dense matrix is formed. Inference
(the same numbers up to float rounding) scores both sides of NCNC's completion in one batch, each
distinct missing edge ``{j, k}`` once, finds their common neighbours grouped by a shared endpoint
(:func:`pair_common_neighbors`: the completion pairs of a batch are few nodes against many; on CPU in
numpy) and sums them with ``embedding_bag`` (:func:`bag_rows`). A frozen predictor (serving,
:meth:`NCNPredictor.freeze`) runs its pair MLPs as compiled steps over chunks of :data:`SERVE_CHUNK`
pairs, the fp32 linear layers through oneDNN where available; ``quantize="int8"`` is an opt-in,
approximate variant with int8 weights.

Departures from the reference code, and why:
- ``completion="paper"`` scores the missing edges with the depth-0 predictor on the *same* node
  representations ``h`` (the paper's equation). The reference code passes the already transformed
  ``h + xlin(h)`` into its recursive call, which transforms it a second time and drops the predictor's
  edges a second time in training; ``completion="reference"`` (the default) reproduces that, because it
  is what produced the published numbers and it scored higher here: on Cora, seeds 0-4, 87.98 vs 86.94
  Hits@100, better on every seed (bench/results/graph/ncnc_reference_cora.md vs ncn_planetoid.md).
- ``jk`` with one layer is a learnable scalar (as in the reference); ``gcn_lin`` (a GCN layer with
  weights) exists for the plain-GCN baseline.

Thread-safety: modules are not thread-safe while training; for serving, call them under
``torch.no_grad()`` from one thread at a time or give each thread its own copy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# adjacency in CSR form on a torch device
# --------------------------------------------------------------------------------------------------
class Adj:
    """A square 0/1 adjacency in CSR form (``rowptr`` int64 ``[n+1]``, ``col`` int64 ``[nnz]``, columns
    sorted within each row). Built from edge lists; immutable."""

    __slots__ = ("rowptr", "col", "n", "_deg", "_coo", "_np")

    def __init__(self, rowptr: torch.Tensor, col: torch.Tensor, n: int) -> None:
        self.rowptr, self.col, self.n = rowptr, col, int(n)
        self._deg = None
        self._coo = None
        self._np = None

    @staticmethod
    def from_edges(src: torch.Tensor, dst: torch.Tensor, n: int, symmetric: bool = True) -> "Adj":
        """From an edge list (``symmetric``: add both directions). Duplicates and self-loops are dropped."""
        if symmetric:
            src, dst = torch.cat([src, dst]), torch.cat([dst, src])
        keep = src != dst
        key = torch.unique(src[keep] * n + dst[keep])  # sorted
        row, col = key // n, key % n
        counts = torch.bincount(row, minlength=n)
        rowptr = torch.zeros(n + 1, dtype=torch.long, device=src.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        return Adj(rowptr, col, n)

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def deg(self) -> torch.Tensor:
        if self._deg is None:
            self._deg = (self.rowptr[1:] - self.rowptr[:-1])
        return self._deg

    def numpy_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rowptr, col, deg)`` as numpy arrays (CPU only), int32 when the entries fit; cached."""
        if self._np is None:
            it = np.int32 if max(self.n, self.nnz) < 2 ** 31 else np.int64
            self._np = (self.rowptr.numpy().astype(it), self.col.numpy().astype(it), self.deg().numpy())
        return self._np

    def rows(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.n, device=self.device), self.deg())

    def sparse(self) -> torch.Tensor:
        """The adjacency as a coalesced torch sparse COO tensor (values 1.0)."""
        if self._coo is None:
            idx = torch.stack([self.rows(), self.col])
            self._coo = torch.sparse_coo_tensor(idx, torch.ones(self.nnz, device=self.device), (self.n, self.n),
                                                is_coalesced=True, check_invariants=False)
        return self._coo

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.sparse(), x)

    def drop_entries(self, p: float, generator: torch.Generator | None = None) -> "Adj":
        """Drop each stored entry with probability ``p`` (independently per direction, as the reference)."""
        if p <= 0:
            return self
        keep = torch.rand(self.nnz, device=self.device, generator=generator) >= p
        counts = torch.zeros(self.n, dtype=torch.long, device=self.device)
        counts.index_add_(0, self.rows()[keep], torch.ones_like(self.col[keep]))
        rowptr = torch.zeros(self.n + 1, dtype=torch.long, device=self.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        return Adj(rowptr, self.col[keep], self.n)

    def remove_edges(self, src: torch.Tensor, dst: torch.Tensor) -> "Adj":
        """A copy without the undirected edges ``{src_t, dst_t}`` (target-link removal)."""
        if src.numel() == 0:
            return self
        n = self.n
        gone = torch.cat([src * n + dst, dst * n + src])
        gone = torch.unique(gone)
        key = self.rows() * n + self.col
        pos = torch.searchsorted(gone, key).clamp_(max=gone.numel() - 1)
        keep = gone[pos] != key
        counts = torch.zeros(n, dtype=torch.long, device=self.device)
        counts.index_add_(0, (key[keep] // n), torch.ones(int(keep.sum()), dtype=torch.long, device=self.device))
        rowptr = torch.zeros(n + 1, dtype=torch.long, device=self.device)
        rowptr[1:] = torch.cumsum(counts, 0)
        return Adj(rowptr, self.col[keep], n)


def gather_rows(adj: Adj, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour lists of nodes ``idx`` ``[B]``: ``(b, k)`` with ``k in N(idx[b])``, sorted by (b, k)."""
    start = adj.rowptr[idx]
    cnt = adj.rowptr[idx + 1] - start
    total = int(cnt.sum())
    b = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), cnt, output_size=total)
    first = torch.cumsum(cnt, 0) - cnt  # where row b starts in the output
    pos = torch.arange(total, device=idx.device) + torch.repeat_interleave(start - first, cnt, output_size=total)
    return b, adj.col[pos]


def common_neighbors(adj: Adj, src: torch.Tensor, dst: torch.Tensor, residual: bool = False):
    """Common neighbours of the pairs ``(src[b], dst[b])``.

    Returns ``(b, k)`` for ``k in N(src[b]) & N(dst[b])``; with ``residual=True`` also the pairs of
    ``N(src) \\ N(dst)`` and ``N(dst) \\ N(src)``: ``(cn, only_src, only_dst)``, each a ``(b, k)`` tuple.
    """
    n = adj.n
    b1, k1 = gather_rows(adj, src)
    b2, k2 = gather_rows(adj, dst)
    e1, e2 = b1 * n + k1, b2 * n + k2
    if e1.numel() == 0 or e2.numel() == 0:
        m2 = torch.zeros(e2.numel(), dtype=torch.bool, device=e2.device)
        pos = torch.zeros(e2.numel(), dtype=torch.long, device=e2.device)
    else:
        pos = torch.searchsorted(e1, e2).clamp_(max=e1.numel() - 1)
        m2 = e1[pos] == e2
    cn = (b2[m2], k2[m2])
    if not residual:
        return cn
    m1 = torch.zeros(e1.numel(), dtype=torch.bool, device=e1.device)
    m1[pos[m2]] = True
    return cn, (b1[~m1], k1[~m1]), (b2[~m2], k2[~m2])


def pair_common_neighbors(adj: Adj, x: torch.Tensor, y: torch.Tensor, max_table: int = 1 << 22,
                          max_work: int = 1 << 23, small: int = 1 << 16,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Common neighbours of the pairs ``(x[b], y[b])`` as ``(b, k)``, sorted by (b, k): the answer of
    ``common_neighbors(adj, x, y)``, found faster when endpoints repeat across pairs (NCNC's completion
    step: one node against thousands, the candidates of a PredictLinks against the node's neighbours).

    Each distinct pair gets an *anchor* (the endpoint found in more pairs; ties: the higher degree) and a
    *partner*. Each anchor ``a`` takes the cheapest of three ways, counted in entries read:

    - mask: mark ``N(a)`` in a table row, test every partner's neighbours against it
      (``deg(a) + sum_p deg(p)``);
    - walk: write the pair ids into the row at the partners, walk ``a -> c -> k`` for ``c in N(a)``,
      ``k in N(c)``; ``c`` is a common neighbour of the pair the row holds at ``k``
      (``sum_{c in N(a)} deg(c)``);
    - walk into ``P``: the same walk whose second hop only reaches ``P``, the partners of the anchors left
      with a mask (the rows of ``A[:, P]`` are built once, when that costs less than the masks).

    When hardly any endpoint is shared (more anchors than half the pairs), or the pairs' rows hold fewer
    than ``small`` entries in all (the fixed cost of the grouping would dominate), the sorted-key
    intersection of :func:`common_neighbors` is used. ``adj`` must be symmetric (:meth:`Adj.from_edges` with its default
    ``symmetric=True``). Memory: a table of ``max(max_table, n)`` int32 entries (``max_table // n``
    anchors at a time) and about ``max_work`` entries gathered at a time, plus the answer. ``backend``:
    ``"auto"`` runs the same plan in numpy for CPU tensors (its gathers, masks and compactions cost less
    per entry than torch's: about 2x faster on BlogCatalog's completion pairs) and in torch on other
    devices; ``"torch"`` forces torch. A pure function (thread-safe)."""
    n, dev = adj.n, x.device
    deg = adj.deg()
    if x.numel() == 0 or int(deg[x].sum() + deg[y].sum()) < small:
        return common_neighbors(adj, x, y)
    if dev.type == "cpu" and backend != "torch":
        got = _pair_cn_numpy(*adj.numpy_csr(), x.numpy(), y.numpy(), max_table, max_work)
        if got is None:
            return common_neighbors(adj, x, y)
        return torch.from_numpy(got[0]), torch.from_numpy(got[1])
    a, p = _anchor_partner(deg, x, y)
    key, inv = torch.unique(a * n + p, return_inverse=True)  # distinct pairs, grouped by anchor
    a, p = key // n, key % n
    anchors, r_of, per = torch.unique_consecutive(a, return_inverse=True, return_counts=True)
    if 2 * anchors.numel() > x.numel():
        return common_neighbors(adj, x, y)
    ga, gc = gather_rows(adj, anchors)  # (r, c): c in N(anchors[r])
    mode, cost, hops = _cn_plan(adj, deg, anchors, r_of, per, p, ga, gc)
    R, M = anchors.numel(), key.numel()
    rows = max(1, min(R, max_table // max(n, 1)))
    table = torch.full((rows * n,), -1, dtype=torch.int32 if M < 2 ** 31 else torch.long, device=dev)
    pstart, gstart = torch.cumsum(per, 0) - per, torch.cumsum(deg[anchors], 0) - deg[anchors]
    js, cs = [], []
    for s, e in _chunks(cost, rows, max_work):
        j0, j1 = int(pstart[s]), int(pstart[e - 1] + per[e - 1])
        g0, g1 = int(gstart[s]), int(gstart[e - 1] + deg[anchors[e - 1]])
        jj, rj, mj = torch.arange(j0, j1, device=dev), r_of[j0:j1] - s, mode[r_of[j0:j1]]
        gr, gn, mg = ga[g0:g1] - s, gc[g0:g1], mode[ga[g0:g1]]
        masked, walked = mj == 0, mj > 0
        set_mask = gr[mg == 0] * n + gn[mg == 0]
        set_walk = rj[walked] * n + p[j0:j1][walked]
        table[set_mask] = 0
        table[set_walk] = jj[walked].to(table.dtype)
        try:
            if bool(masked.any()):
                jm = jj[masked]
                b, c = gather_rows(adj, p[jm])
                hit = table[rj[masked][b] * n + c] >= 0
                js.append(jm[b[hit]])
                cs.append(c[hit])
            for m in (1, 2):
                sel = mg == m
                if bool(sel.any()):
                    rb, cb = gr[sel], gn[sel]
                    t, k = gather_rows(hops[m], cb)
                    j = table[rb[t] * n + k]
                    hit = j >= 0
                    js.append(j[hit].long())
                    cs.append(cb[t[hit]])
        finally:
            table[set_mask] = -1
            table[set_walk] = -1
    found = _sorted(torch.cat(js) * n + torch.cat(cs)) if js else key[:0]
    # back to the caller's pairs (repeats included): row j of a CSR over the distinct pairs
    rowptr = torch.zeros(M + 1, dtype=torch.long, device=dev)
    rowptr[1:] = torch.cumsum(torch.bincount(found // n, minlength=M), 0)
    return gather_rows(Adj(rowptr, found % n, M), inv)


def _gather_rows_np(rowptr: np.ndarray, col: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gather_rows` in numpy: ``(b, k)`` with ``k in N(idx[b])``, sorted by (b, k)."""
    cnt, k = _segments_np(rowptr, col, idx)
    return np.repeat(np.arange(idx.size, dtype=k.dtype), cnt), k


def _segments_np(rowptr: np.ndarray, col: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``idx`` of a CSR, concatenated: ``(cnt, k)``, ``cnt[i]`` entries of row ``idx[i]`` in turn."""
    start = rowptr[idx]
    cnt = rowptr[idx + 1] - start
    pos = np.repeat(start - (np.cumsum(cnt) - cnt), cnt)
    pos += np.arange(pos.size, dtype=pos.dtype)
    return cnt, col[pos]


def _hits_np(table: np.ndarray, base: np.ndarray, cnt: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Look up ``table[base[i] + k]`` for the entries ``k`` of segment ``i`` (``cnt[i]`` of them): the
    positions (into ``k``) where the table holds a value >= 0, their segments, and those values."""
    v = table[np.repeat(base, cnt) + k]
    hit = np.flatnonzero(v >= 0)
    seg = np.searchsorted(np.cumsum(cnt), hit, side="right")
    return hit, seg, v[hit]


def _pair_cn_numpy(rowptr: np.ndarray, col: np.ndarray, deg: np.ndarray, x: np.ndarray, y: np.ndarray,
                   max_table: int, max_work: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The plan of :func:`pair_common_neighbors` (anchors, the three ways, the chunks) in numpy for CPU
    arrays; the same answer ``(b, k)`` (int64, sorted by (b, k)), or None when hardly any endpoint is
    shared (the caller then intersects sorted keys). Node ids and table positions are int32 when they fit
    (half the memory traffic of the gathers)."""
    n, B = deg.size, x.size
    it = np.int32 if max(n, rowptr[-1], max(max_table, n) + n) < 2 ** 31 else np.int64
    rowptr, col = rowptr.astype(it, copy=False), col.astype(it, copy=False)
    cnt = np.bincount(x, minlength=n) + np.bincount(y, minlength=n)  # pairs per node (repeats included)
    cx, cy = cnt[x], cnt[y]
    swap = (cy > cx) | ((cy == cx) & (deg[y] > deg[x]))
    key, inv = np.unique(np.where(swap, y, x) * n + np.where(swap, x, y), return_inverse=True)
    a, p = (key // n).astype(it), (key % n).astype(it)
    M = key.size
    first = np.flatnonzero(np.concatenate([[True], a[1:] != a[:-1]]))
    if 2 * first.size > B:
        return None
    anchors = a[first]
    R = anchors.size
    per = np.diff(np.append(first, M))
    r_of = np.repeat(np.arange(R, dtype=it), per)
    ga, gc = _gather_rows_np(rowptr, col, anchors)  # (r, c): c in N(anchors[r])
    # the plan: per anchor, the cheapest way in entries read (see pair_common_neighbors)
    da = deg[anchors]
    cost_mask = np.bincount(r_of, weights=deg[p], minlength=R).astype(np.int64) + da
    cost_walk = np.bincount(ga, weights=deg[gc], minlength=R).astype(np.int64) + per
    mode = (cost_walk < cost_mask).astype(np.int8)
    cost = np.minimum(cost_mask, cost_walk)
    hops: list = [None, (rowptr, col), None]
    rest = mode == 0
    if rest.any():
        part = np.unique(p[rest[r_of]])
        if 2 * int(deg[part].sum()) < int(cost_mask[rest].sum()):
            # the rows of A[:, part] (row c: the nodes of part adjacent to c), from the rows of part (A symmetric)
            b, c = _gather_rows_np(rowptr, col, part)
            ck = np.sort(c.astype(np.int64) * n + part[b])  # (c, node) pairs are distinct: sort = stable sort
            cc = np.bincount(c, minlength=n)
            hp = np.zeros(n + 1, dtype=it)
            np.cumsum(cc, out=hp[1:])
            hops[2] = (hp, (ck % n).astype(it))
            cost_into = np.bincount(ga, weights=cc[gc], minlength=R).astype(np.int64) + per
            use = rest & (cost_into < cost_mask)
            mode[use] = 2
            cost = np.where(use, cost_into, cost)
    rows = max(1, min(R, max_table // max(n, 1)))
    table = np.full(rows * n, -1, dtype=np.int32 if M < 2 ** 31 else np.int64)
    pstart, gstart = np.cumsum(per) - per, np.cumsum(da) - da
    js, cs = [], []
    for s, e in _chunks(torch.from_numpy(cost), rows, max_work):
        j0, j1 = int(pstart[s]), int(pstart[e - 1] + per[e - 1])
        g0, g1 = int(gstart[s]), int(gstart[e - 1] + da[e - 1])
        jj, rj, mj = np.arange(j0, j1, dtype=np.int64), r_of[j0:j1] - it(s), mode[r_of[j0:j1]]
        gr, gn, mg = ga[g0:g1] - it(s), gc[g0:g1], mode[ga[g0:g1]]
        masked, walked = mj == 0, mj > 0
        set_mask = gr[mg == 0] * it(n) + gn[mg == 0]
        set_walk = rj[walked] * it(n) + p[j0:j1][walked]
        table[set_mask] = 0
        table[set_walk] = jj[walked]
        try:
            if masked.any():  # each partner's neighbours against the anchor's row of marks
                jm = jj[masked]
                cnt_m, c = _segments_np(rowptr, col, p[jm])
                hit, seg, _ = _hits_np(table, rj[masked] * it(n), cnt_m, c)
                js.append(jm[seg])
                cs.append(c[hit].astype(np.int64))
            for m in (1, 2):  # anchor -> c -> k: the row holds the pair id at each partner k
                sel = mg == m
                if sel.any():
                    rb, cb = gr[sel], gn[sel]
                    cnt_w, k = _segments_np(*hops[m], cb)
                    _, seg, j = _hits_np(table, rb * it(n), cnt_w, k)
                    js.append(j.astype(np.int64))
                    cs.append(cb[seg].astype(np.int64))
        finally:
            table[set_mask] = -1
            table[set_walk] = -1
    found = np.sort(np.concatenate(js) * n + np.concatenate(cs)) if js else key[:0]
    fj = found // n
    fk = found - fj * n
    if B == M and bool((inv == np.arange(M)).all()):  # distinct pairs already in key order
        return fj, fk
    # back to the caller's pairs (repeats included): row j of a CSR over the distinct pairs
    rp = np.zeros(M + 1, dtype=np.int64)
    np.cumsum(np.bincount(fj, minlength=M), out=rp[1:])
    b, k = _gather_rows_np(rp, fk, inv)
    return b.astype(np.int64, copy=False), k


def _anchor_partner(deg: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair as (anchor, partner): the anchor is the endpoint in more pairs (ties: higher degree)."""
    M = x.numel()
    _, inv, cnt = torch.unique(torch.cat([x, y]), return_inverse=True, return_counts=True)
    cx, cy = cnt[inv[:M]], cnt[inv[M:]]
    swap = (cy > cx) | ((cy == cx) & (deg[y] > deg[x]))
    return torch.where(swap, y, x), torch.where(swap, x, y)


def _cn_plan(adj: Adj, deg, anchors, r_of, per, p, ga, gc):
    """Per anchor of :func:`pair_common_neighbors`: its way (0 mask, 1 walk, 2 walk into the partners),
    its cost (entries read) and the second-hop adjacency of each walk (``[None, adj, A[:, P] or None]``)."""
    R = anchors.numel()

    def per_anchor(r, v):
        return torch.zeros(R, dtype=torch.long, device=deg.device).index_add_(0, r, v)

    cost_mask = per_anchor(r_of, deg[p]) + deg[anchors]
    cost_walk = per_anchor(ga, deg[gc]) + per
    mode = (cost_walk < cost_mask).long()
    cost = torch.minimum(cost_mask, cost_walk)
    hops = [None, adj, None]
    rest = mode == 0
    if bool(rest.any()):
        part = torch.unique(p[rest[r_of]])
        if 2 * int(deg[part].sum()) < int(cost_mask[rest].sum()):
            b, c = gather_rows(adj, part)  # row c of A[:, part]: the nodes of part adjacent to c
            c, o = torch.sort(c, stable=True)
            cnt = torch.bincount(c, minlength=adj.n)
            rowptr = torch.zeros(adj.n + 1, dtype=torch.long, device=deg.device)
            rowptr[1:] = torch.cumsum(cnt, 0)
            hops[2] = Adj(rowptr, part[b[o]], adj.n)
            cost_into = per_anchor(ga, cnt[gc]) + per
            use = rest & (cost_into < cost_mask)
            mode[use] = 2
            cost = torch.where(use, cost_into, cost)
    return mode, cost, hops


def _sorted(t: torch.Tensor) -> torch.Tensor:
    """``t`` sorted ascending (numpy's vectorised sort on CPU, about 3x faster than torch's on int64)."""
    if t.device.type == "cpu" and not t.requires_grad:
        return torch.from_numpy(np.sort(t.numpy()))
    return torch.sort(t).values


def _chunks(cost: torch.Tensor, rows: int, work: int) -> list[tuple[int, int]]:
    """Consecutive groups ``[s, e)`` of at most ``rows`` anchors and about ``work`` cost (one at least)."""
    cum = np.cumsum(cost.cpu().numpy())
    out, s = [], 0
    while s < len(cum):
        e = int(np.searchsorted(cum, (cum[s - 1] if s else 0) + work, side="right"))
        e = min(len(cum), s + rows, max(e, s + 1))
        out.append((s, e))
        s = e
    return out


def sample_per_row(b: torch.Tensor, k: torch.Tensor, nrows: int, deg: int, generator=None):
    """Keep at most ``deg`` entries per row (uniform, with replacement), reweighted by ``count / deg``
    so sums stay unbiased. Returns ``(b, k, w)``. ``deg <= 0`` keeps everything with weight 1."""
    w = torch.ones(b.numel(), device=b.device)
    if deg <= 0 or b.numel() == 0:
        return b, k, w
    cnt = torch.bincount(b, minlength=nrows)
    big = cnt > deg
    if not bool(big.any()):
        return b, k, w
    keep_small = ~big[b]
    rows_big = torch.nonzero(big).flatten()
    start = torch.cumsum(cnt, 0) - cnt
    r = torch.rand((rows_big.numel(), deg), device=b.device, generator=generator)
    pick = (r * cnt[rows_big, None]).long() + start[rows_big, None]
    pick = pick.flatten()
    bb = torch.cat([b[keep_small], b[pick]])
    kk = torch.cat([k[keep_small], k[pick]])
    ww = torch.cat([w[keep_small], (cnt[rows_big].float() / deg).repeat_interleave(deg)])
    return bb, kk, ww  # unsorted, may repeat (b, k): spmm_rows sums duplicates


def spmm_rows(b: torch.Tensor, k: torch.Tensor, w: torch.Tensor | None, nrows: int, x: torch.Tensor,
              sorted_unique: bool = False) -> torch.Tensor:
    """``out[b] += w * x[k]`` as a sparse ``(nrows x n) @ (n x h)`` product; ``w=None`` means 1.
    ``sorted_unique``: the pairs are sorted by (b, k) without repeats (skips coalescing)."""
    if w is None:
        w = torch.ones(b.numel(), device=x.device, dtype=x.dtype)
    S = torch.sparse_coo_tensor(torch.stack([b, k]), w.to(x.dtype), (nrows, x.shape[0]),
                                is_coalesced=sorted_unique or None, check_invariants=False)
    return torch.sparse.mm(S, x)


def bag_rows(b: torch.Tensor, k: torch.Tensor, w: torch.Tensor | None, nrows: int,
             x: torch.Tensor) -> torch.Tensor:
    """:func:`spmm_rows` for pairs sorted by ``b`` (``out[b] += w * x[k]``) as one ``embedding_bag`` sum per
    row: equal up to float rounding, and 2-4x faster on CPU than the sparse product."""
    offsets = torch.cumsum(torch.bincount(b, minlength=nrows), 0)
    offsets = torch.cat([offsets.new_zeros(1), offsets[:-1]]) if nrows else offsets
    return F.embedding_bag(k, x, offsets, mode="sum", per_sample_weights=None if w is None else w.to(x.dtype))


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class NCNConfig:
    """Hyper-parameters (build-time) of a link predictor and its training. Names of the reference's
    flags in brackets.

    predictor: "ncn" | "ncnc" | "gae" (Hadamard MLP, no CN term: the GCN baseline's decoder).
    encoder: "gcn" (parameter-free GCN propagation, [puregcn]) | "sum" ([puresum]) | "gcn_lin" (GCN layers
    with weights, the plain-GCN baseline) | "none". input: "features" | "learnable" (an n x hidden
    embedding table, for featureless graphs) | "fastrp" (FastRP of the training graph as features).
    """

    predictor: str = "ncn"
    encoder: str = "gcn"
    input: str = "features"
    hidden: int = 256  # [hiddim]
    mp_layers: int = 1  # [mplayers]
    mlp_layers: int = 3  # [nnlayers], gae decoder only
    x_dropout: float = 0.7  # [xdp]
    gnn_dropout: float = 0.05  # [gnndp]
    tail_dropout: float = 0.3  # [tdp]
    gnn_edge_dropout: float = 0.0  # [gnnedp]
    pred_dropout: float = 0.05  # [predp]
    pred_edge_dropout: float = 0.4  # [preedp]
    gnn_lr: float = 0.0043  # [gnnlr]
    pred_lr: float = 0.0024  # [prelr]
    batch_size: int = 1152
    test_batch_size: int = 8192  # [testbs]
    epochs: int = 100
    max_batches: int | None = None  # cap on batches per epoch (a CPU budget knob; None = the whole epoch)
    ln: bool = True  # layer norm in the MPNN (non-pure encoders)
    ln_pred: bool = True  # [lnnn]
    res: bool = False
    jk: bool = True
    use_xlin: bool = True
    tailact: bool = True
    twolayerlin: bool = False
    beta: float = 1.0
    mask_target: bool = True  # [maskinput] target-link removal
    # NCNC completion
    depth: int = 1
    prob_scale: float = 4.3  # [probscale]
    prob_offset: float = 2.8  # [proboffset]
    pt: float = 0.75
    alpha: float = 1.0
    train_res_deg: int = -1  # [trndeg] sample at most this many residual neighbours per target
    test_res_deg: int = -1  # [tstdeg]
    splitsize: int = 262144  # pairs scored at once in the completion step
    completion: str = "reference"  # "reference": as the authors' code; "paper": NCN on the same h (the equation)
    # evaluation / stopping
    hits_k: int = 100
    patience: int | None = None  # stop after this many evaluations without a better validation score
    eval_every: int = 1
    fastrp_dim: int = 128
    extra: dict = field(default_factory=dict)

    def validate(self) -> "NCNConfig":
        if self.predictor not in ("ncn", "ncnc", "gae"):
            raise InvalidArgument(f"predictor must be one of ['ncn', 'ncnc', 'gae'], got {self.predictor!r}")
        if self.encoder not in ("gcn", "sum", "gcn_lin", "none"):
            raise InvalidArgument(f"encoder must be one of ['gcn', 'sum', 'gcn_lin', 'none'], got {self.encoder!r}")
        if self.input not in ("features", "learnable", "fastrp"):
            raise InvalidArgument(f"input must be one of ['features', 'learnable', 'fastrp'], got {self.input!r}")
        for name in ("hidden", "batch_size", "test_batch_size", "epochs", "hits_k", "eval_every", "fastrp_dim",
                     "mlp_layers", "splitsize"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {v!r}")
        for name, hi in (("hidden", 4096), ("batch_size", 1 << 22), ("test_batch_size", 1 << 22), ("epochs", 100_000),
                         ("fastrp_dim", 4096), ("mlp_layers", 16), ("splitsize", 1 << 24), ("hits_k", 1_000_000)):
            if getattr(self, name) > hi:
                raise InvalidArgument(f"{name} = {getattr(self, name)} is above the limit of {hi}")
        if not isinstance(self.mp_layers, int) or not 0 <= self.mp_layers <= 16:
            raise InvalidArgument(f"mp_layers must be an integer in [0, 16], got {self.mp_layers!r}")
        if self.completion not in ("paper", "reference"):
            raise InvalidArgument(f"completion must be 'paper' or 'reference', got {self.completion!r}")
        if self.depth not in (0, 1, 2):
            raise InvalidArgument(f"depth must be 0, 1 or 2, got {self.depth!r}")
        for name in ("x_dropout", "gnn_dropout", "tail_dropout", "gnn_edge_dropout", "pred_dropout",
                     "pred_edge_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise InvalidArgument(f"{name} must be in [0, 1), got {v!r}")
        for name in ("gnn_lr", "pred_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidArgument(f"{name} must be a finite learning rate >= 0, got {v!r}")
        for name in ("beta", "prob_scale", "prob_offset", "alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise InvalidArgument(f"{name} must be a finite number, got {v!r}")
        for name in ("train_res_deg", "test_res_deg"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise InvalidArgument(f"{name} must be an integer (-1 = no sampling), got {v!r}")
        if not isinstance(self.pt, (int, float)) or not 0 < self.pt <= 1:
            raise InvalidArgument(f"pt must be in (0, 1], got {self.pt!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches <= 0):
            raise InvalidArgument(f"max_batches must be a positive integer or None, got {self.max_batches!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience <= 0):
            raise InvalidArgument(f"patience must be a positive integer or None, got {self.patience!r}")
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @staticmethod
    def from_dict(d: dict) -> "NCNConfig":
        names = {f.name for f in fields(NCNConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgument(f"unknown NCN hyper-parameters {unknown}; valid: {sorted(names - {'extra'})}")
        return NCNConfig(**d).validate()


#: the reference README's commands (Cora, CiteSeer: NCN = cn1 and NCNC = incn1cn1; ddi: NCN cn1)
PRESETS: dict[str, dict] = {
    "cora": dict(x_dropout=0.7, tail_dropout=0.3, pt=0.75, gnn_edge_dropout=0.0, pred_edge_dropout=0.4,
                 pred_dropout=0.05, gnn_dropout=0.05, prob_scale=4.3, prob_offset=2.8, alpha=1.0, gnn_lr=0.0043,
                 pred_lr=0.0024, batch_size=1152, ln=True, ln_pred=True, hidden=256, mp_layers=1,
                 test_batch_size=8192, mask_target=True, jk=True, use_xlin=True, tailact=True, encoder="gcn",
                 epochs=100, hits_k=100),
    "citeseer": dict(x_dropout=0.4, tail_dropout=0.0, pt=0.75, gnn_edge_dropout=0.0, pred_edge_dropout=0.0,
                     pred_dropout=0.55, gnn_dropout=0.75, prob_scale=6.5, prob_offset=4.4, alpha=0.4, gnn_lr=0.0085,
                     pred_lr=0.0078, batch_size=384, ln=True, ln_pred=True, hidden=256, mp_layers=1,
                     test_batch_size=4096, mask_target=True, jk=True, use_xlin=True, tailact=True, twolayerlin=True,
                     encoder="gcn", epochs=100, hits_k=100),
    "pubmed": dict(x_dropout=0.3, tail_dropout=0.0, pt=0.5, gnn_edge_dropout=0.0, pred_edge_dropout=0.0,
                   pred_dropout=0.05, gnn_dropout=0.1, prob_scale=5.3, prob_offset=0.5, alpha=0.3, gnn_lr=0.0097,
                   pred_lr=0.002, batch_size=2048, ln=True, ln_pred=True, hidden=256, mp_layers=1,
                   test_batch_size=8192, mask_target=True, jk=True, use_xlin=True, tailact=True, encoder="gcn",
                   epochs=100, hits_k=100),
    "ddi": dict(x_dropout=0.05, tail_dropout=0.0, gnn_edge_dropout=0.0, pred_edge_dropout=0.0, pred_dropout=0.6,
                gnn_dropout=0.4, gnn_lr=0.0021, pred_lr=0.0018, batch_size=24576, ln=True, ln_pred=True,
                encoder="sum", hidden=224, mp_layers=1, test_batch_size=131072, use_xlin=True, twolayerlin=True,
                res=True, mask_target=True, jk=False, tailact=False, input="learnable", epochs=100, hits_k=20,
                prob_offset=3.0, prob_scale=10.0, pt=0.1, alpha=0.5),
    # the plain-GCN baseline: 2 GCN layers with weights + Hadamard MLP decoder, no target-link removal
    "gcn": dict(predictor="gae", encoder="gcn_lin", mp_layers=2, hidden=256, x_dropout=0.0, gnn_dropout=0.5,
                tail_dropout=0.0, pred_dropout=0.5, pred_edge_dropout=0.0, gnn_lr=0.01, pred_lr=0.01, batch_size=1152,
                mask_target=False, jk=False, use_xlin=False, ln=False, ln_pred=False, epochs=100, hits_k=100),
}


#: the name that picks a preset from the graph (:func:`auto_preset`); the service's default
AUTO = "auto"
#: an ``auto`` run stops after this fraction of its epochs without a better validation score (the named
#: presets keep the reference's fixed epoch count, so their benchmarks reproduce the paper's protocol).
#: Half, not a few epochs: NCN's validation Hits@100 often dips after epoch 2-4 and climbs past it only
#: 40+ epochs later (USAir and C. elegans over a learned table, seeds 0-2: best epochs 74-99; USAir seed 0
#: had 46 evaluations without a better score between its epoch-3 and epoch-49 values); a patience of 10
#: stopped USAir at epoch 12 with test Hits@100 0.901 against 0.925 for the full run.
AUTO_PATIENCE_FRACTION = 0.5
#: mean degree from which a featureless graph is treated like ogbl-ddi (dense: 4,267 nodes, mean degree 500)
DENSE_DEGREE = 100.0
#: node count from which a graph with features takes the PubMed settings (19,717 nodes) instead of Cora's
LARGE_NODES = 10_000


def auto_preset(n: int, num_edges: int, has_features: bool) -> tuple[str, dict, str]:
    """The preset for a graph of ``n`` nodes and ``num_edges`` undirected edges: (name, overrides, why).

    The reference tunes one preset per dataset; this maps a new graph to the closest of those by what
    decides them: node features (the Planetoid presets read them; featureless graphs learn an embedding
    table), size (PubMed's larger batches and lower dropout past ~10k nodes) and density (ogbl-ddi's
    sum encoder and residual for very dense featureless graphs). Every choice adds early stopping
    (:data:`AUTO_PATIENCE_FRACTION`): an ``auto`` run stops once validation has not improved for half its
    epochs instead of running all of them on a graph whose validation peaked at epoch 2.
    The overrides carry no ``patience``: :func:`config_for_graph` sets it from the epoch count.
    """
    degree = 2.0 * num_edges / max(n, 1)
    stop: dict = {}
    if has_features:
        if n >= LARGE_NODES:
            return "pubmed", stop, f"node features, {n:,} nodes >= {LARGE_NODES:,}: the PubMed settings"
        return "cora", stop, f"node features, {n:,} nodes < {LARGE_NODES:,}: the Cora settings"
    if degree >= DENSE_DEGREE:
        return "ddi", stop, f"no node features, mean degree {degree:.0f} >= {DENSE_DEGREE:.0f}: the ogbl-ddi settings"
    return "cora", {"input": "learnable", **stop}, (
        f"no node features, mean degree {degree:.1f} < {DENSE_DEGREE:.0f}: the Cora settings over a learned "
        "embedding table")


def config_for_graph(preset: str | None, n: int, num_edges: int, has_features: bool,
                     overrides: dict | None = None) -> tuple[NCNConfig, dict]:
    """The validated config a training job on this graph runs, and what was chosen (for the job result).

    ``preset`` ``None`` / ``""`` / ``"auto"``: :func:`auto_preset`; a named preset as :func:`make_config`.
    ``overrides`` (the user's config) always win over what the preset sets.
    """
    overrides = dict(overrides or {})
    if preset in (None, "", AUTO):
        name, extra, why = auto_preset(n, num_edges, has_features)
        cfg = make_config(name, **{**extra, **overrides})  # validated: epochs and eval_every are positive ints
        if "patience" not in overrides:
            cfg.patience = max(1, int(AUTO_PATIENCE_FRACTION * cfg.epochs / cfg.eval_every))
        return cfg, {"preset": AUTO, "chosen": name, "why": why}
    return make_config(preset, **overrides), {"preset": preset}


def make_config(preset: str | None = None, **overrides) -> NCNConfig:
    """A validated config: :data:`PRESETS` ``[preset]`` (None: the class defaults = Cora) + ``overrides``."""
    base: dict = {}
    if preset is not None:
        if preset == AUTO:
            raise InvalidArgument("preset 'auto' is chosen from the graph: call config_for_graph(...)")
        if preset not in PRESETS:
            raise InvalidArgument(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS) + [AUTO]}")
        base = dict(PRESETS[preset])
    base.update(overrides)
    return NCNConfig.from_dict(base)


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------
def _ln(dim: int, on: bool) -> nn.Module:
    return nn.LayerNorm(dim) if on else nn.Identity()


class SparseDropout(nn.Module):
    """Dropout on the stored values of a sparse COO tensor (equal to dense dropout: zeros stay zero)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p <= 0:
            return x
        if x.is_sparse:
            x = x.coalesce()
            vals = F.dropout(x.values(), self.p, True)
            return torch.sparse_coo_tensor(x.indices(), vals, x.shape, is_coalesced=True, check_invariants=False)
        return F.dropout(x, self.p, True)


class SparseLinear(nn.Linear):
    """``nn.Linear`` that also accepts a sparse COO input ``[n, f]``."""

    def forward(self, x):
        if x.is_sparse:
            return torch.sparse.mm(x, self.weight.t()) + self.bias
        return super().forward(x)


class MPNN(nn.Module):
    """The message-passing encoder. Input ``x`` ``[n, f]`` (dense or sparse COO) or None with
    ``num_nodes`` (learnable embeddings); output ``[n, hidden]``."""

    def __init__(self, in_dim: int, cfg: NCNConfig, num_nodes: int | None = None) -> None:
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.encoder = cfg.encoder
        if cfg.input == "learnable":
            if not num_nodes:
                raise InvalidArgument("input='learnable' needs num_nodes")
            self.emb = nn.Embedding(num_nodes, h)
            nn.init.orthogonal_(self.emb.weight)
            self.xemb = nn.Dropout(cfg.gnn_dropout)
            in_dim = h
        else:
            self.emb = None
            pure = cfg.encoder in ("gcn", "sum", "none") or cfg.mp_layers == 0
            mods: list[nn.Module] = [SparseDropout(cfg.x_dropout)]
            if pure:
                mods += [SparseLinear(in_dim, h), nn.Dropout(cfg.gnn_dropout)]
                in_dim = h
            self.xemb = nn.Sequential(*mods)
        self.convs = nn.ModuleList()
        self.post = nn.ModuleList()
        layers = 0 if cfg.encoder == "none" else cfg.mp_layers
        if cfg.encoder == "gcn_lin":
            dims = [in_dim] + [h] * layers
            for i in range(layers):
                self.convs.append(SparseLinear(dims[i], dims[i + 1]) if i == 0 else nn.Linear(dims[i], dims[i + 1]))
                last = i == layers - 1
                self.post.append(nn.Identity() if last else nn.Sequential(_ln(h, cfg.ln), nn.ReLU(), nn.Dropout(cfg.gnn_dropout)))
        else:
            for i in range(layers):
                self.convs.append(nn.Identity())
                self.post.append(nn.Dropout(cfg.tail_dropout) if i == layers - 1 else nn.Identity())
        self.jk = bool(cfg.jk and layers > 0)
        if self.jk:
            self.jkparams = nn.Parameter(torch.randn(layers))

    def _propagate(self, x: torch.Tensor, adj: Adj) -> torch.Tensor:
        if self.encoder == "sum":
            return adj.matmul(x)
        norm = torch.rsqrt(1.0 + adj.deg().to(x.dtype)).unsqueeze(1)  # D~^-1/2, D~ = D + I
        y = norm * x
        return norm * (adj.matmul(y) + y)

    def forward(self, x, adj: Adj) -> torch.Tensor:
        if self.emb is not None:
            x = self.xemb(self.emb.weight)
        else:
            x = self.xemb(x)
        if self.cfg.gnn_edge_dropout > 0 and self.training:
            adj = adj.drop_entries(self.cfg.gnn_edge_dropout)
        outs = []
        for conv, post in zip(self.convs, self.post):
            z = conv(x)
            if z.is_sparse:
                z = z.to_dense()
            x1 = post(self._propagate(z, adj))
            x = x1 + x if (self.cfg.res and x1.shape == x.shape and not x.is_sparse) else x1
            outs.append(x)
        if self.jk:
            x = sum(w * o for w, o in zip(self.jkparams, outs))
        if x.is_sparse:
            x = x.to_dense()
        return x


#: pairs per chunk of a frozen predictor's MLPs (the ``chunk x hidden`` intermediates stay in cache)
SERVE_CHUNK = 1024
#: the serving options of :meth:`NCNPredictor.freeze` (``quantize``): exact fp32, or int8 weights (opt-in)
QUANTIZE_MODES = (None, "int8")
_ONEDNN_LINEAR: bool | None = None


def serving_linear() -> bool:
    """Whether oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler
    emits for CPU linear layers) is usable here: present, and equal to ``F.linear`` on a probe up to float
    rounding. Checked once per process; False means frozen predictors use ``F.linear``."""
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is None:
        try:
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((33, 64), (48, 64), (48,)))
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")
            _ONEDNN_LINEAR = bool(torch.backends.mkldnn.is_available()) and \
                torch.allclose(got, torch.relu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)
        except (AttributeError, RuntimeError, TypeError):
            _ONEDNN_LINEAR = False
    return _ONEDNN_LINEAR


def _compile_steps(seq: nn.Module, onednn: bool, int8: bool) -> list:
    """An eval-mode ``nn.Sequential`` as a list of functions ``x -> x`` (which may work in place):
    ``Dropout`` / ``Identity`` dropped, ``Linear`` (+ a ``ReLU`` right after it) as one oneDNN call when
    ``onednn``, ``hidden x hidden`` linears as dynamically quantised int8 modules when ``int8``. The
    weights are the module's own tensors (no copy) except the quantised ones."""
    mods = [m for m in seq if not isinstance(m, (nn.Dropout, nn.Identity))]
    steps, i = [], 0
    while i < len(mods):
        m = mods[i]
        relu_next = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
        if type(m) is nn.Linear and int8 and m.out_features > 1:
            steps.append(_quantized(m))
        elif type(m) is nn.Linear and onednn:
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            attr = "relu" if relu_next else "none"
            steps.append(lambda x, w=w, b=b, attr=attr: torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], ""))
            i += 1 + relu_next
            continue
        elif type(m) is nn.Linear:
            w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            steps.append(lambda x, w=w, b=b: F.linear(x, w, b))
        elif type(m) is nn.ReLU:
            steps.append(torch.relu_)
        elif type(m) is nn.LayerNorm:
            shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
            steps.append(lambda x, shape=shape, w=w, b=b, eps=eps: F.layer_norm(x, shape, w, b, eps))
        else:
            steps.append(m)
        i += 1
    return steps


def _quantized(lin: nn.Linear) -> nn.Module:
    """``lin`` with int8 weights (per tensor) and activations quantised per call (dynamic quantisation)."""
    import copy
    import warnings

    with warnings.catch_warnings():  # torch marks the eager quantisation API deprecated (torchao replaces it)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(lin).float()), {nn.Linear},
                                                      dtype=torch.qint8)[0]


def _run_steps(steps: list, x: torch.Tensor) -> torch.Tensor:
    for f in steps:
        x = f(x)
    return x


class _MLPs(nn.Module):
    def __init__(self, cfg: NCNConfig, cn_in: int) -> None:
        super().__init__()
        h, p, ln = cfg.hidden, cfg.pred_dropout, cfg.ln_pred
        self.xlin = nn.Sequential(nn.Linear(h, h), nn.Dropout(p), nn.ReLU(), nn.Linear(h, h), _ln(h, ln),
                                  nn.Dropout(p), nn.ReLU()) if cfg.use_xlin else None
        self.xcnlin = nn.Sequential(nn.Linear(cn_in, h), nn.Dropout(p), nn.ReLU(), nn.Linear(h, h), _ln(h, ln),
                                    nn.Dropout(p), nn.ReLU(), nn.Identity() if cfg.tailact else nn.Linear(h, h))
        self.xijlin = nn.Sequential(nn.Linear(h, h), _ln(h, ln), nn.Dropout(p), nn.ReLU(),
                                    nn.Identity() if cfg.tailact else nn.Linear(h, h))
        two = [nn.Linear(h, h), _ln(h, ln), nn.Dropout(p), nn.ReLU()] if cfg.twolayerlin else []
        self.lin = nn.Sequential(nn.Linear(h, h), _ln(h, ln), nn.Dropout(p), nn.ReLU(), *two, nn.Linear(h, 1))
        self.beta = nn.Parameter(torch.full((1,), float(cfg.beta)))


class NCNPredictor(nn.Module):
    """NCN (``depth=0``) and NCNC (``depth>=1``) scorers. ``forward(h, adj, src, dst)`` -> logits ``[B]``."""

    def __init__(self, cfg: NCNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.m = _MLPs(cfg, cfg.hidden)
        self.depth = cfg.depth if cfg.predictor == "ncnc" else 0
        # inference cache (see freeze): id(h) -> (h, h + xlin(h), first xcnlin layer of it or None)
        self._frozen: dict[int, tuple] = {}
        self._serve: dict | None = None  # the compiled pair MLPs of a frozen predictor

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """``h' = h + xlin(h)``: the representations summed over common neighbours."""
        hit = self._frozen.get(id(h))
        if hit is not None and hit[0] is h and not self.training:
            return hit[1]
        return h + self.m.xlin(h) if self.m.xlin is not None else h

    @torch.no_grad()
    def freeze(self, h: torch.Tensor, fold_linear: bool = True, quantize: str | None = None) -> None:
        """Cache, for inference with the fixed representations ``h``, what every call would recompute
        for all ``n`` nodes: ``h' = h + xlin(h)`` (and, for NCNC with ``completion="reference"``, the
        inner call's ``h' + xlin(h')``). ``fold_linear``: also cache ``W1 h'`` (``W1`` the first linear
        layer of ``xcnlin``), so the common-neighbour sum is taken after that layer (it is linear:
        ``W1 sum_k h'_k + b1 = sum_k W1 h'_k + b1``), one ``B x h x h`` product less per batch of pairs
        (equal up to float rounding).

        Frozen, the pair MLPs (``xijlin``, ``xcnlin``, ``lin``) run as a compiled list of steps over
        chunks of :data:`SERVE_CHUNK` pairs (their intermediates stay in cache), the fp32 linear layers
        through oneDNN where this torch build has it (:func:`serving_linear`; the same numbers up to float
        rounding, about 1.5-2x MKL's speed at these shapes on AMD CPUs), ``Dropout`` / ``Identity``
        skipped. ``quantize="int8"`` (opt-in, approximate): the ``hidden x hidden`` linear layers of those
        MLPs are dynamically quantised to int8 weights (``torch.ao.quantization.quantize_dynamic``); the
        cached products above stay fp32. Training mode ignores the cache; :meth:`unfreeze` drops it."""
        if quantize not in QUANTIZE_MODES:
            raise InvalidArgument(f"quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
        if quantize is not None and h.device.type != "cpu":
            raise InvalidArgument(f"quantize={quantize!r} serves on CPU only (torch's dynamic quantisation), "
                                  f"not on {h.device.type}")
        self._frozen = {}
        self._serve = None
        hx = self.transform(h)
        chain = [(h, hx)]
        if self.depth >= 1 and self.cfg.completion == "reference":
            chain.append((hx, self.transform(hx)))
        lin = self.m.xcnlin[0]
        for a, ax in chain:
            self._frozen[id(a)] = (a, ax, ax @ lin.weight.t() if fold_linear else None)
        onednn = h.device.type == "cpu" and serving_linear()
        q = quantize == "int8"
        self._serve = {"xij": _compile_steps(self.m.xijlin, onednn, q),
                       "xcn": _compile_steps(self.m.xcnlin, onednn, q),
                       "xcn_tail": _compile_steps(self.m.xcnlin[1:], onednn, q),
                       "lin": _compile_steps(self.m.lin, onednn, q), "quantize": quantize}

    def unfreeze(self) -> None:
        self._frozen = {}
        self._serve = None

    def _xcn_sum(self, h: torch.Tensor, hx: torch.Tensor, parts, B: int) -> tuple[torch.Tensor, bool]:
        """The sum over parts, each ``(b, k, w, sorted_unique)``, of rows of ``hx`` or of the cached ``W1 hx``;
        and whether it was the cached ``W1 hx`` (then ``xcnlin`` continues after its first layer)."""
        hit = self._frozen.get(id(h))
        folded = None if self.training or hit is None or hit[0] is not h or hit[1] is not hx else hit[2]
        src = hx if folded is None else folded
        acc = None
        for b, k, w, su in parts:  # (training keeps the sparse product it was measured with)
            y = bag_rows(b, k, w, B, src) if su and not self.training else \
                spmm_rows(b, k, w, B, src, sorted_unique=su)
            acc = y if acc is None else acc + y
        return acc, folded is not None

    def _xcn(self, h: torch.Tensor, hx: torch.Tensor, parts, B: int) -> torch.Tensor:
        """``xcnlin(sum over parts)`` (see :meth:`_xcn_sum`)."""
        acc, folded = self._xcn_sum(h, hx, parts, B)
        if not folded:
            return self.m.xcnlin(acc)
        return self.m.xcnlin[1:](acc + self.m.xcnlin[0].bias)

    def _head(self, h: torch.Tensor, hx: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, parts,
              B: int) -> torch.Tensor:
        """``lin(xcnlin(cn sum) * beta + xijlin(h_src * h_dst))``: the logits ``[B]``."""
        kit = None if self.training else self._serve
        if kit is None:
            xij = self.m.xijlin(h[src] * h[dst])
            return self.m.lin(self._xcn(h, hx, parts, B) * self.m.beta + xij).squeeze(-1)
        acc, folded = self._xcn_sum(h, hx, parts, B)
        if folded:
            acc += self.m.xcnlin[0].bias
        xcn_steps = kit["xcn_tail"] if folded else kit["xcn"]
        beta = self.m.beta
        out = torch.empty(B, device=h.device, dtype=h.dtype)
        for s in range(0, B, SERVE_CHUNK):  # the steps may work in place: every input is made here
            e = min(B, s + SERVE_CHUNK)
            xij = _run_steps(kit["xij"], h.index_select(0, src[s:e]) * h.index_select(0, dst[s:e]))
            z = _run_steps(xcn_steps, acc[s:e]).mul_(beta).add_(xij)
            out[s:e] = _run_steps(kit["lin"], z).squeeze(-1)
        return out

    def forward(self, h: torch.Tensor, adj: Adj, src: torch.Tensor, dst: torch.Tensor,
                depth: int | None = None, hx: torch.Tensor | None = None, _dropped: bool = False) -> torch.Tensor:
        cfg = self.cfg
        depth = self.depth if depth is None else depth
        if self.training and not _dropped and cfg.pred_edge_dropout > 0:
            adj = adj.drop_entries(cfg.pred_edge_dropout)
        if hx is None:
            hx = self.transform(h)
        B = src.numel()
        if depth <= 0:
            # inference groups the pairs by a shared endpoint (the completion step: one node, many others)
            b, k = (common_neighbors if self.training else pair_common_neighbors)(adj, src, dst)
            parts = [(b, k, None, True)]
        else:
            (bc, kc), (b1, k1), (b2, k2) = common_neighbors(adj, src, dst, residual=True)
            rdeg = cfg.train_res_deg if self.training else cfg.test_res_deg
            b1, k1, w1 = sample_per_row(b1, k1, B, rdeg)
            b2, k2, w2 = sample_per_row(b2, k2, B, rdeg)
            with torch.no_grad():
                # k in N(src) \ N(dst): how likely is the missing edge (dst, k)? and symmetrically.
                if self.training:
                    p1 = self._completion_prob(h, hx, adj, dst[b1], k1, depth - 1)
                    p2 = self._completion_prob(h, hx, adj, src[b2], k2, depth - 1)
                else:  # both sides in one batch: an edge missing for several targets is scored once
                    p = self._completion_prob(h, hx, adj, torch.cat([dst[b1], src[b2]]), torch.cat([k1, k2]),
                                              depth - 1)
                    p1, p2 = p[:b1.numel()], p[b1.numel():]
            sampled = rdeg > 0
            parts = [(bc, kc, None, True), (b1, k1, p1 * w1, not sampled), (b2, k2, p2 * w2, not sampled)]
        return self._head(h, hx, src, dst, parts, B)

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """Completion probability from an NCN logit: ``alpha * pt q / (pt q + 1 - q)``, q = s(scale (l - offset))."""
        cfg = self.cfg
        q = torch.sigmoid(cfg.prob_scale * (logits - cfg.prob_offset))
        return cfg.alpha * cfg.pt * q / (cfg.pt * q + 1 - q)

    def _completion_prob(self, h, hx, adj, a, k, depth) -> torch.Tensor:
        if not self.training and a.numel() > 1:
            # inference: a pair (a, k) often comes back for many targets (PredictLinks: (u, k) for every
            # candidate sharing the neighbour k); score each distinct pair once, (a, k) and (k, a) alike
            # (the score is symmetric); training keeps its random stream unchanged and scores them all
            key, inv = torch.unique(torch.minimum(a, k) * adj.n + torch.maximum(a, k), return_inverse=True)
            if key.numel() < a.numel():
                return self._completion_prob_all(h, hx, adj, key // adj.n, key % adj.n, depth)[inv]
        return self._completion_prob_all(h, hx, adj, a, k, depth)

    def _completion_prob_all(self, h, hx, adj, a, k, depth) -> torch.Tensor:
        out = torch.empty(a.numel(), device=h.device, dtype=h.dtype)
        step = self.cfg.splitsize
        ref = self.cfg.completion == "reference"
        for s in range(0, a.numel(), step):
            if ref:  # the authors' code: the inner call gets h' as its h (transformed again), edges dropped again
                logits = self.forward(hx, adj, a[s:s + step], k[s:s + step], depth=depth)
            else:
                logits = self.forward(h, adj, a[s:s + step], k[s:s + step], depth=depth, hx=hx, _dropped=True)
            out[s:s + step] = self.calibrate(logits)
        return out


class HadamardPredictor(nn.Module):
    """GAE decoder: ``MLP(h_i * h_j)`` (the plain-GCN baseline); ignores the adjacency."""

    def __init__(self, cfg: NCNConfig) -> None:
        super().__init__()
        h, p = cfg.hidden, cfg.pred_dropout
        layers: list[nn.Module] = []
        for _ in range(cfg.mlp_layers - 1):
            layers += [nn.Linear(h, h), _ln(h, cfg.ln_pred), nn.ReLU(), nn.Dropout(p)]
        layers.append(nn.Linear(h, 1))
        self.lins = nn.Sequential(*layers)

    def forward(self, h, adj, src, dst, **_):
        return self.lins(h[src] * h[dst]).squeeze(-1)


class LinkModel(nn.Module):
    """Encoder + predictor. ``encode(x, adj)`` -> h; ``score(h, adj, src, dst)`` -> logits."""

    def __init__(self, in_dim: int, cfg: NCNConfig, num_nodes: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = MPNN(in_dim, cfg, num_nodes)
        self.predictor = HadamardPredictor(cfg) if cfg.predictor == "gae" else NCNPredictor(cfg)

    def encode(self, x, adj: Adj) -> torch.Tensor:
        return self.encoder(x, adj)

    def score(self, h, adj: Adj, src, dst) -> torch.Tensor:
        return self.predictor(h, adj, src, dst)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.encoder.parameters()), "lr": self.cfg.gnn_lr},
                {"params": list(self.predictor.parameters()), "lr": self.cfg.pred_lr}]


__all__ = ["Adj", "gather_rows", "common_neighbors", "pair_common_neighbors", "sample_per_row", "spmm_rows",
           "bag_rows", "NCNConfig", "PRESETS", "SERVE_CHUNK", "QUANTIZE_MODES", "serving_linear",
           "AUTO", "AUTO_PATIENCE_FRACTION", "auto_preset", "config_for_graph", "make_config", "MPNN", "NCNPredictor", "HadamardPredictor", "LinkModel"]
