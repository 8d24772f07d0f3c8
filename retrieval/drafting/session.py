"""Generation sessions, the stateless draft call, and the session manager a server holds.

A :class:`Session` is the state of one generation: the context (prompt ids, then every accepted id
appended), the candidates of its last draft (to calibrate acceptance estimates when the next accepted
ids arrive) and its sources. The client loop is::

    s = manager.open(prompt_ids, budget=DraftBudget(64, 10))
    d = s.draft()                      # tokens + parents (+ probs, sources)
    ... verify d with the model, get the accepted ids (accepted draft tokens + the bonus token) ...
    s.append(accepted_ids, topk=None)  # optional topk: (len(accepted), k) model candidates
    d = s.draft()  ...
    manager.close(s.session_id)        # the output goes into the shared history

Limits: ids must lie in ``[0, vocab_size)``; the prompt must be non-empty; the context may not exceed
``max_context_tokens`` (:class:`ResourceExhausted`); one append carries at most ``max_append_tokens``.
Memory of a session is its context buffer (4 bytes a token, grown by doubling) plus its last candidates
(:meth:`Session.nbytes`, reported per session by :meth:`SessionManager.stats`). A session's contribution
to the shared history is bounded: only the last ``history_max_session_tokens`` ids of its output are
recorded. The corpus datastore a session names is the catalog's one memory-mapped, read-only object,
shared by every session and every manager.

Thread-safety: a :class:`Session` serializes its own calls with a lock (a stream is sequential anyway);
different sessions run in parallel, sharing the corpus/recycling/history sources and the calibrator,
which are thread-safe. :class:`SessionManager` guards its table with a lock; a bad request to one session
raises for that session only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from retrieval.drafting.base import SOURCES, Candidates, DraftSource, available_sources, make_source
from retrieval.drafting.datastore import CorpusSource, DatastoreCatalog
from retrieval.drafting.draft import Draft, DraftBudget
from retrieval.drafting.history import HistorySource, HistoryStore
from retrieval.drafting.merge import Calibrator, SessionCorrection, merge
from retrieval.drafting.recycling import RecyclingMatrix, RecyclingSource
from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("context", "corpus", "recycling", "history")


@dataclass(frozen=True)
class SessionLimits:
    """Per-session bounds. ``max_context_tokens`` (prompt + output, default 32768), ``max_append_tokens``
    (ids per append, 1024), ``max_topk`` (candidates per position, 64)."""

    max_context_tokens: int = 32768
    max_append_tokens: int = 1024
    max_topk: int = 64


def check_ids(ids, vocab_size: int | None, what: str, allow_empty: bool = False) -> np.ndarray:
    """``ids`` as a 1-D int32 array, or :class:`InvalidArgument` naming ``what``."""
    try:
        a = np.asarray(ids)
    except Exception as e:  # ragged lists and the like
        raise InvalidArgument(f"{what} must be a 1-D sequence of token ids: {e}") from e
    if a.ndim != 1:
        raise InvalidArgument(f"{what} must be 1-D token ids, got shape {a.shape}")
    if len(a) == 0:
        if allow_empty:
            return np.zeros(0, dtype=np.int32)
        raise InvalidArgument(f"{what} is empty; at least one token id is needed")
    if not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integer token ids, got dtype {a.dtype}")
    hi = vocab_size if vocab_size is not None else 2**31 - 1
    bad = (a < 0) | (a >= hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"{what}[{i}] = {int(a[i])} is outside the vocabulary [0, {hi})")
    return a.astype(np.int32)


def draft(context_ids, budget: DraftBudget, sources: list[DraftSource], calibrator: Calibrator | None = None,
          vocab_size: int | None = None, max_context_tokens: int = 32768, combine: str = "noisy_or") -> Draft:
    """Stateless draft: the context in, one draft out (no session, nothing learned).

    ``vocab_size`` defaults to the smallest vocabulary declared by the sources (``None``: unchecked).
    """
    if not isinstance(budget, DraftBudget):
        raise InvalidArgument(f"budget must be a DraftBudget, got {type(budget).__name__}")
    if vocab_size is None:
        sizes = [s.caps.vocab_size for s in sources if s.caps.vocab_size is not None]
        vocab_size = min(sizes) if sizes else None
    ctx = check_ids(context_ids, vocab_size, "context_ids")
    if len(ctx) > max_context_tokens:
        raise ResourceExhausted(f"context has {len(ctx)} tokens, more than the maximum {max_context_tokens}")
    cands: list[Candidates] = []
    for s in sources:
        cands.extend(s.propose(ctx, budget.max_depth, budget.max_nodes))
    return merge(cands, budget, calibrator, combine)


class Session:
    """One generation (see module doc). ``session_id`` is a string; ``vocab_size`` bounds every id."""

    def __init__(self, prompt_ids, sources: list[DraftSource], vocab_size: int, budget: DraftBudget | None = None,
                 limits: SessionLimits | None = None, calibrator: Calibrator | None = None,
                 combine: str = "noisy_or", session_id: str | None = None,
                 correction: SessionCorrection | None = None) -> None:
        self.limits = limits or SessionLimits()
        self.vocab_size = int(vocab_size)
        prompt = check_ids(prompt_ids, self.vocab_size, "prompt_ids")
        if len(prompt) > self.limits.max_context_tokens:
            raise ResourceExhausted(f"prompt has {len(prompt)} tokens, more than max_context_tokens="
                                    f"{self.limits.max_context_tokens}")
        for s in sources:
            if s.caps.vocab_size is not None and s.caps.vocab_size != self.vocab_size:
                raise FailedPrecondition(f"source {s.name!r} was built for a vocabulary of {s.caps.vocab_size} "
                                         f"tokens, the session uses {self.vocab_size}")
        self.session_id = session_id or uuid.uuid4().hex
        self.sources = list(sources)
        self.budget = budget or DraftBudget()
        self.calibrator = calibrator
        self.combine = combine
        #: per-session online recalibration of the shared estimates (``None``: off)
        self.correction = correction
        self.prompt_len = len(prompt)
        self._buf = np.empty(max(64, 2 * len(prompt)), dtype=np.int32)
        self._buf[: len(prompt)] = prompt
        self._len = len(prompt)
        self._last: list[Candidates] | None = None
        self._last_bytes = 0  # of _last, counted when it is set (nbytes is summed over every session)
        self._feedback: list[tuple[list[Candidates], np.ndarray]] = []
        self._lock = threading.Lock()
        self.closed = False
        self.steps = 0
        self.last_used = time.monotonic()
        #: called (from the evicting thread) after the manager evicted this session for idleness; a
        #: server uses it to end the session's stream. Must be thread-safe and not raise.
        self.on_evict = None

    # --- state ---------------------------------------------------------------------------------
    @property
    def context(self) -> np.ndarray:
        """Read-only view of the context (prompt + accepted output)."""
        v = self._buf[: self._len]
        v.setflags(write=False)
        return v

    @property
    def output(self) -> np.ndarray:
        return self.context[self.prompt_len:]

    def nbytes(self) -> int:
        last = self._last_bytes if self._last is not None else 0
        corr = self.correction.nbytes() if self.correction is not None else 0
        return int(self._buf.nbytes + last + corr + 1024)

    def _check_open(self) -> None:
        if self.closed:
            raise FailedPrecondition(f"session {self.session_id} is closed")

    # --- the loop ------------------------------------------------------------------------------
    def draft(self, budget: DraftBudget | None = None) -> Draft:
        """A draft continuing the current context (``budget`` overrides the session's for this call)."""
        with self._lock:
            self._check_open()
            b = budget or self.budget
            ctx = self._buf[: self._len]
            cands: list[Candidates] = []
            for s in self.sources:
                cands.extend(s.propose(ctx, b.max_depth, b.max_nodes))
            self._last = cands
            self._last_bytes = sum(c.tokens.nbytes + c.parents.nbytes + c.counts.nbytes + c.prior.nbytes
                                   + c.feat.nbytes for c in cands)
            self.last_used = time.monotonic()
            if self.correction is not None:
                self.correction.discard_pending()  # only the last draft is scored
            return merge(cands, b, self.calibrator, self.combine, self.correction)

    def append(self, accepted_ids, topk=None, defer_feedback: bool = False) -> None:
        """Append the ids accepted by the last verification (accepted draft tokens + the bonus token).

        ``topk``: optional ``(len(accepted_ids), k)`` model candidate ids per verified position, best first
        (``-1`` pads), fed to sources that use them (token recycling). ``defer_feedback``: keep the
        calibration update of the last draft for :meth:`flush_feedback` (a server runs it after sending the
        next draft, off the latency path; the next draft then uses calibration one step older).
        """
        with self._lock:
            self._check_open()
            acc = check_ids(accepted_ids, self.vocab_size, "accepted_ids")
            if len(acc) > self.limits.max_append_tokens:
                raise InvalidArgument(f"accepted_ids has {len(acc)} ids, more than max_append_tokens="
                                      f"{self.limits.max_append_tokens}")
            tk = None
            if topk is not None:
                tk = np.asarray(topk)
                if tk.ndim != 2 or tk.shape[0] != len(acc) or not 1 <= tk.shape[1] <= self.limits.max_topk:
                    raise InvalidArgument(f"topk must have shape ({len(acc)}, k) with 1 <= k <= "
                                          f"{self.limits.max_topk}, got {tk.shape}")
                if not np.issubdtype(tk.dtype, np.integer) or ((tk < -1) | (tk >= self.vocab_size)).any():
                    raise InvalidArgument(f"topk ids must be integers in [0, {self.vocab_size}) or -1 padding")
                tk = tk.astype(np.int32)
            new_len = self._len + len(acc)
            if new_len > self.limits.max_context_tokens:
                raise ResourceExhausted(f"session {self.session_id}: context would reach {new_len} tokens, "
                                        f"more than max_context_tokens={self.limits.max_context_tokens}")
            ctx = self._buf[: self._len]
            if self._last is not None and self.correction is not None:
                # before the next draft: it must use this step's outcome (a few small numpy calls)
                self.correction.update(acc)
            if self._last is not None and self.calibrator is not None:
                if defer_feedback:
                    self._feedback.append((self._last, acc))
                else:
                    self.calibrator.update(self._last, acc)
            self._last = None
            for s in self.sources:
                if s.caps.learns_online:
                    s.observe(ctx, acc, tk)
            if new_len > len(self._buf):
                cap = min(max(new_len, 2 * len(self._buf)), self.limits.max_context_tokens)
                nb = np.empty(cap, dtype=np.int32)
                nb[: self._len] = self._buf[: self._len]
                self._buf = nb
            self._buf[self._len: new_len] = acc
            self._len = new_len
            self.steps += 1
            self.last_used = time.monotonic()

    def flush_feedback(self) -> None:
        """Run the calibration updates deferred by ``append(..., defer_feedback=True)``."""
        with self._lock:
            pending, self._feedback = self._feedback, []
        for cands, acc in pending:
            self.calibrator.update(cands, acc)

    def close(self, record: bool = True) -> None:
        """End the generation; with ``record`` its output goes to learning sources (history)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._last = None
            self._feedback = []
            if record:
                ctx = self._buf[: self._len]
                for s in self.sources:
                    if s.caps.learns_online:
                        try:
                            s.end_session(self.prompt_len, ctx)
                        except Exception:  # a learning failure must not fail the client's close
                            logger.exception("source %s failed to record session %s", s.name, self.session_id)


@dataclass
class ManagerConfig:
    """Server-wide drafting settings.

    ``vocab_size`` of the model's tokenizer; ``tokenizer_fingerprint`` (its vocabulary fingerprint,
    :func:`retrieval.drafting.tokenizer.tokenizer_fingerprint`) to refuse datastores built with another one
    (``None``: check vocabulary size only). ``idle_timeout_s`` (300),
    ``max_sessions`` (4096), ``max_total_bytes`` (session memory, 1 GiB), ``history_capacity_tokens``
    (1,000,000), ``history_rebuild_tokens`` / ``history_rebuild_fraction`` (re-index the history once
    ``max(tokens, fraction * indexed)`` new output tokens arrived; 1 / 0 = after every session), ``history_max_session_tokens`` (the last 8192 output ids of a session
    at most enter the history), ``recycling_k`` (8), ``warm_start_recycling`` (fill the recycling matrix
    with the corpus's most frequent successors when the manager first uses a datastore; the server's
    default, and the configuration the README reports), ``source_params``: per-source keyword overrides,
    ``session_correction``: keyword arguments of each session's
    :class:`~retrieval.drafting.merge.SessionCorrection` (online per-session recalibration of the shared
    estimates; default ``{}`` = its defaults, ``None`` = off).
    """

    vocab_size: int
    tokenizer_fingerprint: str | None = None
    limits: SessionLimits = field(default_factory=SessionLimits)
    default_budget: DraftBudget = field(default_factory=DraftBudget)
    idle_timeout_s: float = 300.0
    max_sessions: int = 4096
    max_total_bytes: int = 1 << 30
    history_capacity_tokens: int = 1_000_000
    history_rebuild_tokens: int = 1
    history_rebuild_fraction: float = 0.0
    history_max_session_tokens: int = 8192
    recycling_k: int = 8
    warm_start_recycling: bool = False
    session_correction: dict | None = field(default_factory=dict)
    combine: str = "noisy_or"
    source_params: dict = field(default_factory=dict)


class SessionManager:
    """All open sessions of a server, with the shared sources (recycling matrix, history, datastores).

    Idle sessions (no call for ``idle_timeout_s``) are evicted by :meth:`evict_idle` (the server calls it
    periodically; :meth:`open` calls it when a bound is hit); total session memory and the number of
    sessions are bounded (:class:`ResourceExhausted` past them).
    """

    def __init__(self, config: ManagerConfig, catalog: DatastoreCatalog | None = None) -> None:
        if config.vocab_size < 1:
            raise InvalidArgument(f"vocab_size must be >= 1, got {config.vocab_size}")
        self.config = config
        self.catalog = catalog
        self.calibrator = Calibrator()
        sp = config.source_params
        self.recycling = RecyclingSource(RecyclingMatrix(config.vocab_size, config.recycling_k),
                                         **sp.get("recycling", {}))
        self.history = HistorySource(HistoryStore(config.vocab_size, config.history_capacity_tokens,
                                                  config.history_rebuild_tokens,
                                                  max_sequence_tokens=config.history_max_session_tokens,
                                                  rebuild_fraction=config.history_rebuild_fraction),
                                     **sp.get("history", {}))
        self.context_source = make_source("context", **sp.get("context", {}))
        self._corpus: dict[str, CorpusSource] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.evicted = 0
        self.warm_started_from: str | None = None  # the datastore the recycling matrix was warm-started from
        self.last_used = time.monotonic()  # of the manager (the engine frees the least recently used)

    # --- sources -------------------------------------------------------------------------------
    def _corpus_source(self, name: str) -> CorpusSource:
        if self.catalog is None:
            raise FailedPrecondition("this server has no datastore catalog; open the session without 'corpus'")
        ds = self.catalog.open(name)  # cached; a rebuilt datastore comes back as a new object
        src = self._corpus.get(name)
        if src is None or src.ds is not ds:
            if ds.vocab_size != self.config.vocab_size:
                raise FailedPrecondition(f"datastore {name!r} has a vocabulary of {ds.vocab_size} tokens, the session "
                                         f"uses {self.config.vocab_size}")
            fp = self.config.tokenizer_fingerprint
            if fp is not None and ds.fingerprint is not None and ds.fingerprint != fp:
                raise FailedPrecondition(f"datastore {name!r} was built with the tokenizer of fingerprint "
                                         f"{ds.fingerprint}, but the session names tokenizer {fp}; build the "
                                         f"datastore with the model's tokenizer or name the right one")
            if fp is not None and ds.fingerprint is None:
                logger.warning("datastore %r records no tokenizer fingerprint: it cannot be checked against the "
                               "session's tokenizer %s (rebuild it with a tokenizer or tokenizer_fingerprint)", name, fp)
            src = CorpusSource(ds, **self.config.source_params.get("corpus", {}))
            with self._lock:
                self._corpus[name] = src
                warm = self.config.warm_start_recycling and self.warm_started_from is None
                if warm:
                    self.warm_started_from = name
            if warm:
                # once per manager: the most frequent successors of each corpus token (~0.1 s per 1M tokens)
                self.recycling.matrix.warm_start(ds.tokens, ds.sep)
        return src

    def needs_prepare(self, datastore: str | None) -> bool:
        """True when naming ``datastore`` would do slow work first (map it, check it, warm-start the
        recycling matrix): a server then calls :meth:`prepare_datastore` off the event loop."""
        if datastore is None:
            return False
        src = self._corpus.get(datastore)
        return src is None or (self.config.warm_start_recycling and self.warm_started_from is None)

    def prepare_datastore(self, datastore: str) -> None:
        """Attach ``datastore`` now (the checks of :meth:`open`, and the recycling warm start)."""
        self._corpus_source(datastore)

    def resolve_sources(self, names, datastore: str | None) -> list[DraftSource]:
        """Source objects for a session. ``names=None``: all four, the corpus only when ``datastore`` is given."""
        explicit = names is not None
        names = list(names) if explicit else list(DEFAULT_SOURCES)
        out: list[DraftSource] = []
        for n in names:
            SOURCES.get(n)  # an unknown name: InvalidArgument listing the valid ones
            if n in [s.name for s in out]:
                raise InvalidArgument(f"draft source {n!r} is listed twice")
            if n == "context":
                out.append(self.context_source)
            elif n == "recycling":
                out.append(self.recycling)
            elif n == "history":
                out.append(self.history)
            elif n == "corpus":
                if datastore is None:
                    if explicit:
                        raise InvalidArgument("source 'corpus' needs a datastore name")
                    continue
                out.append(self._corpus_source(datastore))
        if not out:
            raise InvalidArgument("no draft source selected; valid names: " + ", ".join(available_sources()))
        return out

    def forget_datastore(self, name: str) -> None:
        """Drop the cached source of a datastore (call after dropping it)."""
        with self._lock:
            self._corpus.pop(name, None)

    # --- sessions ------------------------------------------------------------------------------
    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes() for s in self._sessions.values())

    def open(self, prompt_ids, sources=None, datastore: str | None = None,
             budget: DraftBudget | None = None) -> Session:
        self.last_used = time.monotonic()
        if datastore is not None:
            self._corpus_source(datastore)  # checked (and warm-started from) even when 'corpus' is not a source
        srcs = self.resolve_sources(sources, datastore)
        sess = Session(prompt_ids, srcs, self.config.vocab_size, budget or self.config.default_budget,
                       self.config.limits, self.calibrator, self.config.combine,
                       session_id=f"s{next(self._ids)}-{uuid.uuid4().hex[:8]}",
                       correction=(SessionCorrection(**self.config.session_correction)
                                   if self.config.session_correction is not None else None))
        gone: list[Session] = []
        try:
            with self._lock:
                if (len(self._sessions) >= self.config.max_sessions
                        or self._total_locked() + sess.nbytes() > self.config.max_total_bytes):
                    gone = self._evict_idle_locked(time.monotonic())
                if len(self._sessions) >= self.config.max_sessions:
                    raise ResourceExhausted(f"{len(self._sessions)} sessions are open, the maximum is "
                                            f"{self.config.max_sessions}; close some or retry later")
                if self._total_locked() + sess.nbytes() > self.config.max_total_bytes:
                    raise ResourceExhausted(f"session memory would exceed max_total_bytes={self.config.max_total_bytes}")
                self._sessions[sess.session_id] = sess
        finally:
            self._notify_evicted(gone)
        return sess

    def _total_locked(self) -> int:
        return sum(s.nbytes() for s in self._sessions.values())

    def get(self, session_id: str) -> Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} does not exist (closed, or evicted after "
                           f"{self.config.idle_timeout_s:g}s idle)")
        return s

    def append(self, session_id: str, accepted_ids, topk=None, defer_feedback: bool = False) -> Session:
        s = self.get(session_id)
        n = len(accepted_ids) if hasattr(accepted_ids, "__len__") else 0
        if s._len + n > len(s._buf):  # the context buffer will grow: check the total bound first
            cap = min(max(s._len + n, 2 * len(s._buf)), self.config.limits.max_context_tokens)
            grow = 4 * max(cap - len(s._buf), 0)
            if self.total_bytes() + grow > self.config.max_total_bytes:
                raise ResourceExhausted(f"session {session_id}: growing its context would exceed max_total_bytes="
                                        f"{self.config.max_total_bytes}")
        s.append(accepted_ids, topk, defer_feedback)
        return s

    def close(self, session_id: str, record: bool = True) -> None:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            raise NotFound(f"session {session_id!r} does not exist (closed, or evicted)")
        s.close(record=record)

    def _evict_idle_locked(self, now: float) -> list[Session]:
        gone = [s for s in self._sessions.values() if now - s.last_used > self.config.idle_timeout_s]
        for s in gone:
            del self._sessions[s.session_id]
            s.close(record=False)  # an abandoned generation may be partial: do not learn from it
        self.evicted += len(gone)
        if gone:
            logger.info("evicted %d idle draft sessions", len(gone))
        return gone

    @staticmethod
    def _notify_evicted(gone: list[Session]) -> None:
        for s in gone:
            cb = s.on_evict
            if cb is not None:
                try:
                    cb()
                except Exception:  # a callback must not stop the others
                    logger.exception("eviction callback of session %s failed", s.session_id)

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle for more than ``idle_timeout_s`` (calling their ``on_evict``); returns their ids."""
        with self._lock:
            gone = self._evict_idle_locked(time.monotonic() if now is None else now)
        self._notify_evicted(gone)
        return [s.session_id for s in gone]

    def __len__(self) -> int:
        return len(self._sessions)

    def session_bytes(self) -> dict[str, int]:
        """Bytes of each open session (:meth:`Session.nbytes`), by session id."""
        with self._lock:
            return {sid: s.nbytes() for sid, s in self._sessions.items()}

    def stats(self) -> dict:
        """Counts and bytes: ``sessions``, ``session_bytes`` (total), ``max_session_bytes`` (the largest
        session), ``evicted``, and the shared state's bytes (recycling, history, calibration)."""
        with self._lock:
            n = len(self._sessions)
            sizes = [s.nbytes() for s in self._sessions.values()]
        total = sum(sizes)
        return {"sessions": n, "session_bytes": total, "max_session_bytes": max(sizes, default=0),
                "evicted": self.evicted, "tokenizer_fingerprint": self.config.tokenizer_fingerprint,
                "vocab_size": self.config.vocab_size, "warm_started_from": self.warm_started_from,
                "history_max_session_tokens": self.config.history_max_session_tokens,
                "recycling_bytes": self.recycling.nbytes(), "history_bytes": self.history.nbytes(),
                "history_tokens": self.history.store.n_tokens, "calibrator_bytes": self.calibrator.nbytes()}
