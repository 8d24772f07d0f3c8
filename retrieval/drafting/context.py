"""Context lookup: prompt lookup decoding over the generation's own prompt and output.

Reference: A. Saxena, "Prompt Lookup Decoding" (2023), and its use as PLD in Spec-Bench (Xia et al.,
2024). The reference rule (``n = 3..1``, earliest match, 10 tokens) is :func:`kernels.pld_chain`.

What this source does (a tree, not only a chain): for ``n = max_ngram .. min_ngram`` it finds every
earlier end position ``e`` of the context's last ``n``-gram (:func:`kernels.ngram_end_positions`); the
longest ``n`` with a match wins, several match positions branch: the continuations
``ctx[e+1 : e+1+max_depth]`` of up to ``max_matches`` positions (the most recent first by default) are
counted into a trie. When ``levels > 1`` the next shorter ``n`` that adds new positions contributes a
second trie (its own match length, so a lower prior). Departure from PLD: recency instead of earliest
match when several positions match (recent text predicts better in long outputs); the earliest rule is
``prefer="earliest"``.

Thread-safety: stateless (the session owns the context), so one instance can serve every session.
"""

from __future__ import annotations

import numpy as np

from retrieval.drafting.base import Candidates, SourceCaps, TRIE_N_FEAT, continuation_candidates, register_source
from retrieval.drafting.kernels import gather_continuations_t, nested_ngram_ends
from retrieval.errors import InvalidArgument


@register_source("context")
class ContextLookup:
    """Prompt-lookup source. Params: ``max_ngram`` (default 4), ``min_ngram`` (1), ``max_matches``
    (positions per level, 16), ``levels`` (match lengths used, 2), ``prefer`` ("recent" | "earliest")."""

    name = "context"
    caps = SourceCaps(shared=False, learns_online=False, uses_model_topk=False, vocab_size=None)
    n_feat = TRIE_N_FEAT

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_matches: int = 16, levels: int = 2,
                 prefer: str = "recent", alpha: float = 1.0) -> None:
        if not 1 <= min_ngram <= max_ngram <= 64:
            raise InvalidArgument(f"context lookup needs 1 <= min_ngram <= max_ngram <= 64, got "
                                  f"min_ngram={min_ngram}, max_ngram={max_ngram}")
        if max_matches < 1 or levels < 1:
            raise InvalidArgument(f"max_matches={max_matches} and levels={levels} must both be >= 1")
        if prefer not in ("recent", "earliest"):
            raise InvalidArgument(f"prefer={prefer!r}; expected 'recent' or 'earliest'")
        self.max_ngram, self.min_ngram = int(max_ngram), int(min_ngram)
        self.max_matches, self.levels, self.prefer, self.alpha = int(max_matches), int(levels), prefer, alpha

    def propose(self, ctx: np.ndarray, max_depth: int, max_nodes: int) -> list[Candidates]:
        out: list[Candidates] = []
        top = min(self.max_ngram, len(ctx) - 1)
        if top < self.min_ngram:
            return out
        ends_of = nested_ngram_ends(ctx, top)
        seen = None  # the positions already used by a longer n-gram: a subset of every shorter one's ends
        for n in range(top, self.min_ngram - 1, -1):
            ends = ends_of[n]
            if len(ends) == 0:
                continue
            if seen is not None:
                keep = np.ones(len(ends), dtype=bool)
                keep[np.searchsorted(ends, seen)] = False
                ends = ends[keep]
                if len(ends) == 0:
                    continue
            pick = ends[-self.max_matches:] if self.prefer == "recent" else ends[: self.max_matches]
            seen = pick if seen is None else np.concatenate([seen, pick])
            c = continuation_candidates(self.name, gather_continuations_t(ctx, pick + 1, max_depth, sep=None), None,
                                        False, float(len(pick)), n, self.alpha)
            if c is not None:
                out.append(c)
            if len(out) >= self.levels:
                break
        return out

    def observe(self, ctx, accepted, topk) -> None:
        return None

    def end_session(self, prompt_len, ctx) -> None:
        return None

    def nbytes(self) -> int:
        return 0
