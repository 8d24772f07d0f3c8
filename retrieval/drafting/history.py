"""History: the outputs of earlier generations, in a bounded suffix structure.

Reference: G. Oliaro, Z. Jia, D. Campos, A. Qiao, "SuffixDecoding: Extreme Speculative Decoding for
Emerging AI Applications", NeurIPS 2025 (arXiv:2411.04975). SuffixDecoding keeps a suffix tree over the
outputs of previous requests; for the current context it finds the longest matching suffix ``p`` and
grows a draft tree from that node's subtree, scoring a child ``c`` of ``u`` by the empirical frequency
``C(c) / C(u)`` (the fraction of occurrences continuing with ``c``), the draft size adapting to the
match length.

Here the suffix tree is represented by its suffix array (the leaves of a suffix tree in order; a
subtree is a contiguous SA range): the same longest-match and continuation counts, 8 bytes per token
instead of tens of bytes per node of a pointer tree, built by the same vectorized kernel as the corpus
datastore. Sequences are kept in arrival order; when the total exceeds ``capacity_tokens`` the oldest
are evicted, so memory is bounded by ``~ 8 * capacity_tokens`` bytes (tokens + SA) plus a
``(vocab + 2)`` offset table. The structure is rebuilt when the new tokens reach
``max(rebuild_tokens, rebuild_fraction * indexed tokens)`` (defaults 1 and 0: after every finished
generation; a server uses a fraction such as 0.05 so the amortized cost per token stays
``O(log N / fraction)``); a rebuild over ``N`` tokens takes ``O(N log N)`` numpy work and happens in the
thread that ends a session, never in a draft call.

Thread-safety: ``propose`` reads an immutable snapshot (swapped atomically by a rebuild); ``add`` holds a
lock. One instance is shared by every session of a vocabulary.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np

from retrieval.drafting.base import Candidates, SourceCaps, TRIE_N_FEAT, register_source
from retrieval.drafting.datastore import suffix_candidates, token_dtype
from retrieval.drafting.kernels import bucket_offsets, build_suffix_array
from retrieval.errors import InvalidArgument

logger = logging.getLogger(__name__)


class HistoryStore:
    """Bounded store of finished generations. ``capacity_tokens`` default 1,000,000."""

    def __init__(self, vocab_size: int, capacity_tokens: int = 1_000_000, rebuild_tokens: int = 1,
                 max_sequence_tokens: int = 65536, rebuild_fraction: float = 0.0) -> None:
        if vocab_size < 1 or capacity_tokens < 1 or rebuild_tokens < 1 or max_sequence_tokens < 1:
            raise InvalidArgument(f"history store needs positive sizes, got vocab_size={vocab_size}, "
                                  f"capacity_tokens={capacity_tokens}, rebuild_tokens={rebuild_tokens}")
        self.vocab_size = int(vocab_size)
        self.sep = self.vocab_size
        self.capacity_tokens = int(capacity_tokens)
        self.rebuild_tokens = int(rebuild_tokens)
        if not 0.0 <= rebuild_fraction <= 1.0:
            raise InvalidArgument(f"rebuild_fraction={rebuild_fraction} must be in [0, 1]")
        self.rebuild_fraction = float(rebuild_fraction)
        self._indexed = 0
        self.max_sequence_tokens = int(max_sequence_tokens)
        self._dtype = token_dtype(vocab_size)
        self._seqs: deque[np.ndarray] = deque()
        self._total = 0
        self._pending = 0
        self._lock = threading.Lock()
        self.snapshot: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.rebuilds = 0

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def n_tokens(self) -> int:
        return self._total

    def add(self, seq) -> None:
        """Add one finished output (ids in the vocabulary); evicts the oldest beyond capacity."""
        a = np.asarray(seq, dtype=np.int64)
        if a.ndim != 1:
            raise InvalidArgument(f"history sequence must be 1-D, got shape {a.shape}")
        if len(a) == 0:
            return
        if a.min() < 0 or a.max() >= self.vocab_size:
            raise InvalidArgument(f"history sequence has ids outside [0, {self.vocab_size})")
        a = a[-min(self.max_sequence_tokens, self.capacity_tokens):].astype(self._dtype)
        with self._lock:
            self._seqs.append(a)
            self._total += len(a)
            self._pending += len(a)
            while self._total > self.capacity_tokens:
                old = self._seqs.popleft()
                self._total -= len(old)
            if self._pending >= max(self.rebuild_tokens, self.rebuild_fraction * self._indexed):
                self._rebuild()

    def _rebuild(self) -> None:
        parts = []
        for s in self._seqs:
            parts.append(s)
            parts.append(np.array([self.sep], dtype=self._dtype))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=self._dtype)
        sa = build_suffix_array(tokens)
        off = bucket_offsets(tokens, sa, self.vocab_size + 1)
        self.snapshot = (tokens, sa, off)
        self._indexed = self._total
        self._pending = 0
        self.rebuilds += 1

    def flush(self) -> None:
        """Index whatever is pending now."""
        with self._lock:
            if self._pending:
                self._rebuild()

    def nbytes(self) -> int:
        snap = self.snapshot
        held = sum(s.nbytes for s in self._seqs)
        return int(held + (sum(a.nbytes for a in snap) if snap is not None else 0))


@register_source("history")
class HistorySource:
    """SuffixDecoding-style source over a shared :class:`HistoryStore`.

    Params: ``store`` (or ``vocab_size`` / ``capacity_tokens`` to make one), ``max_match_len`` (32),
    ``min_match_len`` (1), ``max_matches`` (256), ``levels`` (1), ``record`` (add each finished output, True).
    """

    name = "history"
    n_feat = TRIE_N_FEAT

    def __init__(self, store: HistoryStore | None = None, vocab_size: int | None = None,
                 capacity_tokens: int = 1_000_000, max_match_len: int = 32, min_match_len: int = 1,
                 max_matches: int = 256, levels: int = 1, alpha: float = 1.0, record: bool = True) -> None:
        if store is None:
            if vocab_size is None:
                raise InvalidArgument("history source needs a store or a vocab_size")
            store = HistoryStore(vocab_size, capacity_tokens)
        if not 1 <= min_match_len <= max_match_len <= 256 or max_matches < 1 or levels < 1:
            raise InvalidArgument(f"history source: bad match parameters min_match_len={min_match_len}, "
                                  f"max_match_len={max_match_len}, max_matches={max_matches}, levels={levels}")
        self.store = store
        self.max_match_len, self.min_match_len = int(max_match_len), int(min_match_len)
        self.max_matches, self.levels, self.alpha, self.record = int(max_matches), int(levels), float(alpha), record
        self.caps = SourceCaps(shared=True, learns_online=True, uses_model_topk=False, vocab_size=store.vocab_size)

    def propose(self, ctx: np.ndarray, max_depth: int, max_nodes: int) -> list[Candidates]:
        snap = self.store.snapshot
        if snap is None or len(snap[0]) == 0:
            return []
        tokens, sa, off = snap
        return suffix_candidates(self.name, tokens, sa, off, self.store.sep, ctx, max_depth, self.max_match_len,
                                 self.min_match_len, self.max_matches, self.levels, self.alpha)

    def observe(self, ctx, accepted, topk) -> None:
        return None

    def end_session(self, prompt_len: int, ctx: np.ndarray) -> None:
        if self.record and len(ctx) > prompt_len:
            self.store.add(ctx[prompt_len:])

    def nbytes(self) -> int:
        return self.store.nbytes()
