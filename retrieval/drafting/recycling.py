"""Token recycling: an adjacency matrix of the latest candidate tokens seen after each token.

Reference: X. Luo, Y. Wang, Q. Zhu, Z. Zhang, X. Zhang, Q. Yang, D. Xu, W. Che, "Turning Trash into
Treasure: Accelerating Inference of Large Language Models with Token Recycling", ACL 2025
(arXiv:2408.08696). The model's top-k candidates at each decoding position are "recycled": the matrix
``M`` (``V x k``) stores, for a token ``x``, the top-k tokens the model proposed right after ``x`` the last
time it was seen (``M[x] <- topk(p(. | ..., x))``). A draft tree of a fixed shape (the paper's 80-node
tree, depth 6) is expanded breadth-first: the children of a node carrying token ``x`` at ranks
``0..c-1`` carry ``M[x, 0..c-1]``.

Without model logits (the case of this project's benchmark) the matrix can still be fed: from the
tokens a client accepts (:meth:`RecyclingMatrix.observe_sequence`: the successor ``y`` seen after ``x``
moves to the front of ``M[x]``, a most-recent-successor list), and warm-started from a corpus
(:meth:`RecyclingMatrix.warm_start`: the ``k`` most frequent successors of each token). Both are weaker
than the model's own candidates; when a client sends top-k ids (``uses_model_topk``), rows are replaced
exactly as in the paper.

Thread-safety: updates hold a lock; ``propose`` reads rows without it (a row being rewritten may give
one stale draft, never an invalid one: every entry is a valid id or ``-1``).
"""

from __future__ import annotations

import threading

import numpy as np

from retrieval.drafting.base import Candidates, SourceCaps, register_source
from retrieval.errors import InvalidArgument

#: The paper's static 80-node tree (depth 6), as the number of children of each node in BFS order,
#: root first; a node's children take ranks 0, 1, ... of its token's matrix row.
TOKEN_RECYCLING_TREE_80 = (
    8, 8, 4, 3, 2, 1, 1, 1, 1, 8, 3, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 5, 2, 1, 1, 1,
    0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 3, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0,
    2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
)

#: Prior P(accepted | parent accepted) by rank in the row (calibration then learns the real rates).
RANK_PRIOR = (0.30, 0.10, 0.06, 0.04, 0.03, 0.025, 0.02, 0.015)


def tree_shape(child_counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(parents, ranks, depths)`` of a static tree given child counts in BFS order (root first)."""
    child_counts = list(child_counts)
    parents, ranks, depths = [], [], []
    queue = [(-1, 0)]  # (node index, depth); the root is -1
    qi = 0
    ci = 0
    while qi < len(queue):
        node, d = queue[qi]
        qi += 1
        c = child_counts[ci] if ci < len(child_counts) else 0
        ci += 1
        for r in range(c):
            parents.append(node)
            ranks.append(r)
            depths.append(d + 1)
            queue.append((len(parents) - 1, d + 1))
    if ci < len(child_counts) and any(child_counts[ci:]):
        raise InvalidArgument("tree shape: child counts given for nodes that do not exist")
    return np.array(parents, np.int32), np.array(ranks, np.int32), np.array(depths, np.int32)


class RecyclingMatrix:
    """``V x k`` int32 matrix of candidate successors, ``-1`` where unknown. ``k`` default 8.

    Memory: ``4 V k`` bytes (32000 x 8: 1.0 MB).
    """

    def __init__(self, vocab_size: int, k: int = 8) -> None:
        if not 1 <= vocab_size < 2**31 or not 1 <= k <= 64:
            raise InvalidArgument(f"recycling matrix needs vocab_size >= 1 and 1 <= k <= 64, got {vocab_size}, {k}")
        self.vocab_size, self.k = int(vocab_size), int(k)
        self.M = np.full((vocab_size, k), -1, dtype=np.int32)
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        return int(self.M.nbytes)

    def observe_sequence(self, tokens) -> None:
        """Move-to-front update for each consecutive pair ``(x, y)`` of ``tokens``."""
        toks = [int(t) for t in tokens]
        with self._lock:
            M = self.M
            for x, y in zip(toks[:-1], toks[1:]):
                row = M[x]
                hit = np.flatnonzero(row == y)
                j = int(hit[0]) if len(hit) else self.k - 1
                if j:
                    row[1: j + 1] = row[:j].copy()
                row[0] = y

    def set_rows(self, tokens, topk) -> None:
        """The paper's update: ``M[tokens[i]] <- topk[i]`` (``topk`` ``(n, k')`` ids, best first)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        topk = np.asarray(topk, dtype=np.int32)
        if topk.ndim != 2 or len(topk) != len(tokens):
            raise InvalidArgument(f"topk must be (n, k') with n = {len(tokens)} positions, got shape {topk.shape}")
        kk = min(self.k, topk.shape[1])
        with self._lock:
            self.M[tokens, :kk] = topk[:, :kk]
            if kk < self.k:
                self.M[tokens, kk:] = -1

    def warm_start(self, tokens: np.ndarray, sep: int | None = None) -> None:
        """Fill rows with the ``k`` most frequent successors in ``tokens`` (pairs across ``sep`` skipped)."""
        t = np.asarray(tokens).astype(np.int64)
        x, y = t[:-1], t[1:]
        ok = (x < self.vocab_size) & (y < self.vocab_size)
        if sep is not None:
            ok &= (x != sep) & (y != sep)
        key = x[ok] * self.vocab_size + y[ok]
        uk, cnt = np.unique(key, return_counts=True)
        xs, ys = uk // self.vocab_size, uk % self.vocab_size
        order = np.lexsort((ys, -cnt, xs))  # by x, then by count descending
        xs, ys = xs[order], ys[order]
        start = np.searchsorted(xs, xs, side="left")
        rank = np.arange(len(xs)) - start
        keep = rank < self.k
        with self._lock:
            self.M[xs[keep], rank[keep]] = ys[keep].astype(np.int32)


@register_source("recycling")
class RecyclingSource:
    """Token-recycling source over a shared :class:`RecyclingMatrix`.

    Params: ``matrix`` (shared, or ``vocab_size`` and ``k`` to make one), ``tree`` (child counts, default the
    paper's 80-node tree), ``learn_from_accepted`` (update from accepted tokens when no top-k is sent).
    """

    name = "recycling"

    def __init__(self, matrix: RecyclingMatrix | None = None, vocab_size: int | None = None, k: int = 8,
                 tree=TOKEN_RECYCLING_TREE_80, learn_from_accepted: bool = True) -> None:
        if matrix is None:
            if vocab_size is None:
                raise InvalidArgument("recycling source needs a matrix or a vocab_size")
            matrix = RecyclingMatrix(vocab_size, k)
        self.matrix = matrix
        self.parents, self.ranks, self.depths = tree_shape(tree)
        if len(self.ranks) and int(self.ranks.max()) >= matrix.k:
            raise InvalidArgument(f"tree uses rank {int(self.ranks.max())} but the matrix keeps k={matrix.k}")
        self.learn_from_accepted = bool(learn_from_accepted)
        self.caps = SourceCaps(shared=True, learns_online=True, uses_model_topk=True, vocab_size=matrix.vocab_size)
        self.n_feat = 8 * matrix.k
        k = matrix.k
        self._prior_by_rank = np.array([RANK_PRIOR[min(r, len(RANK_PRIOR) - 1)] for r in range(k)])
        self._feat = ((np.minimum(self.depths, 8) - 1) * k + self.ranks).astype(np.int64)
        self._prior_of_node = self._prior_by_rank[self.ranks]
        # (parent, rank, depth) of each node of the static tree, BFS order (for propose)
        self._nodes = list(zip(self.parents.tolist(), self.ranks.tolist(), self.depths.tolist()))

    def propose(self, ctx: np.ndarray, max_depth: int, max_nodes: int) -> list[Candidates]:
        # the static tree expanded breadth-first (the children of token x at ranks r read M[x, r]), keeping the nodes of depth
        # <= max_depth whose token is known; the kept set is ancestor-closed (an unknown parent makes its
        # children unknown), so the kept nodes, renumbered in order, are again a BFS trie
        M = self.matrix.M
        nodes = self._nodes
        out = [-1] * len(nodes)
        new = [-1] * len(nodes)  # kept index of each node (-1: dropped)
        idx: list[int] = []
        toks: list[int] = []
        pars: list[int] = []
        rows: dict[int, list[int]] = {}  # one row read per distinct token
        levels: list[tuple[int, int, int]] = []  # (depth, lo, hi) of the kept nodes
        root = int(ctx[-1])
        cur_d, lo = 0, 0
        for i, (p, rk, d) in enumerate(nodes):
            if d > max_depth:
                break  # depths are non-decreasing (BFS)
            x = root if p < 0 else out[p]
            if x < 0:
                continue
            row = rows.get(x)
            if row is None:
                row = rows[x] = M[x].tolist()
            y = row[rk]
            if y < 0:
                continue
            out[i] = y
            j = len(idx)
            new[i] = j
            if d != cur_d:
                if j:
                    levels.append((cur_d, lo, j))
                cur_d, lo = d, j
            idx.append(i)
            toks.append(y)
            pars.append(new[p] if p >= 0 else -1)
        if not idx:
            return []
        levels.append((cur_d, lo, len(idx)))
        ix = np.array(idx, dtype=np.int64)
        c = Candidates(self.name, np.array(toks, dtype=np.int32), np.array(pars, dtype=np.int32),
                       np.ones(len(idx)), self._prior_of_node[ix], self._feat[ix], self.depths[ix], 0)
        c.__dict__["levels"] = levels  # the cached property, known already
        return [c]

    def observe(self, ctx: np.ndarray, accepted: np.ndarray, topk: np.ndarray | None) -> None:
        if topk is not None and len(topk):
            # position i's candidates follow the token before it: ctx[-1] for i = 0, accepted[i-1] after
            inputs = np.concatenate([ctx[-1:], accepted[:-1]])[: len(topk)]
            self.matrix.set_rows(inputs, topk)
        elif self.learn_from_accepted and len(accepted):
            self.matrix.observe_sequence(np.concatenate([ctx[-1:], accepted]))

    def end_session(self, prompt_len, ctx) -> None:
        return None

    def nbytes(self) -> int:
        return self.matrix.nbytes()
