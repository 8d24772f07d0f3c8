"""The draft format: a chain or a tree of draft tokens, and the helpers a verifier needs.

A draft has ``n`` nodes. Node ``i`` proposes token ``tokens[i]`` right after the path from the root to its
parent ``parents[i]``; ``-1`` means "child of the root", the root being the last token of the context
(already known, never part of the draft). Parents are **topologically ordered**: ``parents[i] < i``.
A chain is the special case ``parents = [-1, 0, 1, ..., n-2]``.

Per node we also carry ``probs[i]``: the estimated probability that the verifier accepts the whole path
root -> i (so ``probs`` never increases from a parent to a child, and ``sum(probs)`` is the expected number
of accepted draft tokens, see :mod:`retrieval.drafting.merge`), and the name of the source that proposed
it (``source_names[source_index[i]]``).

Verification with tree attention (SpecInfer / Medusa style): the ``n`` draft tokens are fed in one
forward pass after the context; token ``i`` attends to the whole context plus its own ancestors and
itself (:func:`tree_attention_mask`), at position ``context_len - 1 + depth(i)`` (:func:`position_ids`).
``docs/drafting.md`` has a worked example.

Thread-safety: :class:`Draft` is immutable (its arrays are read-only); the functions are pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import InvalidArgument

#: Hard ceilings on budgets; anything larger is refused as absurd (a verifier cannot use it).
MAX_DRAFT_NODES = 1024
MAX_DRAFT_DEPTH = 256


@dataclass(frozen=True)
class DraftBudget:
    """How big a draft may be.

    ``max_nodes``: at most this many draft tokens (the verification batch minus the bonus token),
    default 64, in ``[1, 1024]``. ``max_depth``: at most this many tokens on any root-to-leaf path,
    default 10, in ``[1, 256]``. ``tree``: ``False`` asks for a chain (then at most
    ``min(max_nodes, max_depth)`` tokens).
    """

    max_nodes: int = 64
    max_depth: int = 10
    tree: bool = True

    def __post_init__(self) -> None:
        for name, value, hi in (("max_nodes", self.max_nodes, MAX_DRAFT_NODES),
                                ("max_depth", self.max_depth, MAX_DRAFT_DEPTH)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidArgument(f"budget {name} must be an integer, got {value!r}")
            if not 1 <= int(value) <= hi:
                raise InvalidArgument(f"budget {name}={value} is out of range; expected 1 <= {name} <= {hi}")
        object.__setattr__(self, "max_nodes", int(self.max_nodes))
        object.__setattr__(self, "max_depth", int(self.max_depth))
        object.__setattr__(self, "tree", bool(self.tree))

    @classmethod
    def chain(cls, length: int = 10) -> "DraftBudget":
        return cls(max_nodes=length, max_depth=length, tree=False)


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Draft:
    """A draft chain or tree. Arrays are 1-D of length ``n`` (``n`` may be 0: nothing to propose).

    ``tokens`` int32 token ids; ``parents`` int32, ``-1`` or an earlier index; ``probs`` float32 in [0, 1],
    estimated probability that the path to the node is accepted; ``source_index`` uint8 into
    ``source_names``.
    """

    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray
    source_index: np.ndarray
    source_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _ro(np.asarray(self.tokens, dtype=np.int32).copy()))
        object.__setattr__(self, "parents", _ro(np.asarray(self.parents, dtype=np.int32).copy()))
        object.__setattr__(self, "probs", _ro(np.asarray(self.probs, dtype=np.float32).copy()))
        object.__setattr__(self, "source_index", _ro(np.asarray(self.source_index, dtype=np.uint8).copy()))
        object.__setattr__(self, "source_names", tuple(self.source_names))
        n = len(self.tokens)
        for name in ("parents", "probs", "source_index"):
            if len(getattr(self, name)) != n:
                raise InvalidArgument(f"draft {name} has length {len(getattr(self, name))}, expected {n} "
                                      "(one per token)")
        check_parents(self.parents)
        if n and int(self.source_index.max()) >= len(self.source_names):
            raise InvalidArgument(f"draft source_index refers to source {int(self.source_index.max())} but only "
                                  f"{len(self.source_names)} source names were given")

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def _checked_by_caller(cls, tokens: np.ndarray, parents: np.ndarray, probs: np.ndarray,
                           source_index: np.ndarray, source_names: tuple[str, ...]) -> "Draft":
        """A draft from fresh arrays that already satisfy the invariants (the merger's output: parents
        topologically ordered, one entry per token, source indices in range): no copy, no check."""
        d = object.__new__(cls)
        object.__setattr__(d, "tokens", _ro(tokens.astype(np.int32, copy=False)))
        object.__setattr__(d, "parents", _ro(parents.astype(np.int32, copy=False)))
        object.__setattr__(d, "probs", _ro(probs.astype(np.float32, copy=False)))
        object.__setattr__(d, "source_index", _ro(source_index.astype(np.uint8, copy=False)))
        object.__setattr__(d, "source_names", tuple(source_names))
        return d

    @classmethod
    def empty(cls) -> "Draft":
        z = np.zeros(0)
        return cls(z, z, z, z, ())

    @classmethod
    def from_chain(cls, tokens, source: str = "", probs=None) -> "Draft":
        tokens = np.asarray(tokens, dtype=np.int32)
        n = len(tokens)
        probs = np.ones(n, np.float32) if probs is None else probs
        return cls(tokens, np.arange(n, dtype=np.int32) - 1, probs, np.zeros(n, np.uint8), (source,))

    # --- views -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def sources(self) -> list[str]:
        """Per-node source name."""
        return [self.source_names[i] for i in self.source_index]

    @property
    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(len(self.parents)) - 1))

    def depths(self) -> np.ndarray:
        """``(n,)`` int32, 1 for children of the root."""
        return tree_depths(self.parents)

    def attention_mask(self) -> np.ndarray:
        return tree_attention_mask(self.parents)

    def position_ids(self, context_len: int) -> np.ndarray:
        return position_ids(self.parents, context_len)

    def accepted_length(self, true_next) -> int:
        return accepted_length(self.tokens, self.parents, true_next)

    def expected_accepted(self) -> float:
        """``sum(probs)``: the draft's own estimate of the accepted tokens (bonus token excluded)."""
        return float(self.probs.sum())

    def to_dict(self) -> dict:
        return {"tokens": self.tokens.tolist(), "parents": self.parents.tolist(),
                "probs": [round(float(p), 6) for p in self.probs], "sources": self.sources}


# --- kernels ----------------------------------------------------------------------------------------

def check_parents(parents: np.ndarray) -> None:
    """Raise :class:`InvalidArgument` unless ``-1 <= parents[i] < i`` for every ``i``."""
    parents = np.asarray(parents)
    if parents.ndim != 1:
        raise InvalidArgument(f"parents must be 1-D, got shape {parents.shape}")
    bad = np.flatnonzero((parents < -1) | (parents >= np.arange(len(parents))))
    if len(bad):
        i = int(bad[0])
        raise InvalidArgument(f"parents[{i}]={int(parents[i])} breaks topological order; expected -1 <= parents[i] < {i}")


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of each node, 1 for children of the root. ``parents`` topologically ordered, ``(n,)``."""
    parents = np.asarray(parents)
    d = np.zeros(len(parents), dtype=np.int32)
    for i, p in enumerate(parents.tolist()):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


def tree_attention_mask(parents: np.ndarray) -> np.ndarray:
    """``(n, n)`` bool; ``mask[i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors.

    The verifier lets draft token ``i`` attend to the whole context and to the draft tokens ``j`` with
    ``mask[i, j]``. Lower-triangular because parents are topologically ordered.
    """
    parents = np.asarray(parents)
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def position_ids(parents: np.ndarray, context_len: int) -> np.ndarray:
    """``(n,)`` int64 position of each draft token: ``context_len - 1 + depth``.

    The last context token (the root) sits at ``context_len - 1``; siblings share a position.
    """
    if context_len < 1:
        raise InvalidArgument(f"context_len must be >= 1 (the root is the last context token), got {context_len}")
    return (context_len - 1 + tree_depths(parents)).astype(np.int64)


def accepted_length(tokens: np.ndarray, parents: np.ndarray, true_next) -> int:
    """Length of the longest root path whose tokens equal ``true_next[0], true_next[1], ...``.

    Greedy verification of a tree: at depth ``d`` the accepted token is ``true_next[d]``; the walk
    continues into the child carrying that token. The step then emits this many tokens plus one bonus.
    """
    true_next = list(true_next)
    cur = -1
    depth = 0
    toks = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
    pars = parents.tolist() if isinstance(parents, np.ndarray) else list(parents)
    # children lists, built once (n is small)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(pars):
        children.setdefault(p, []).append(i)
    while depth < len(true_next):
        want = true_next[depth]
        nxt = next((c for c in children.get(cur, ()) if toks[c] == want), None)
        if nxt is None:
            break
        cur = nxt
        depth += 1
    return depth
