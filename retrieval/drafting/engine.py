"""The drafting state one server holds: a datastore catalog and one session manager per tokenizer.

Sessions state the vocabulary size of their model and (optionally) its tokenizer's vocabulary
fingerprint; each ``(vocab_size, fingerprint)`` gets its own :class:`SessionManager` (its own recycling
matrix, history and calibration), created on first use. A session naming no fingerprint uses the
manager keyed ``(vocab_size, None)``, shared by every such tokenizer of that size (the behaviour before
fingerprints; a warning is logged when it is created). At most ``max_vocabularies`` managers are held:
when a new key needs a slot and all are taken, the least recently used manager with no open session is
freed (its learned state is lost), preferring one that no datastore matches; only when every manager has
open sessions is the new key refused (RESOURCE_EXHAUSTED). Datastores live under ``<root>/datastores``
and survive restarts; sessions, history, recycling matrices and calibration are in memory (lost on
restart, rebuilt by use).

Thread-safety: all methods may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from retrieval.drafting.datastore import DatastoreCatalog, build_datastore_job, check_name
from retrieval.drafting.session import ManagerConfig, SessionManager
from retrieval.drafting.tokenizer import check_fingerprint
from retrieval.errors import InvalidArgument, ResourceExhausted, RetrievalError

logger = logging.getLogger(__name__)

JOB_KIND = "build_datastore"


MAX_VOCAB = 1 << 20


class DraftsEngine:
    """``template``: the :class:`ManagerConfig` every manager copies (its vocab_size and tokenizer_fingerprint
    replaced by the key's). The default warm-starts recycling from the first datastore a manager uses."""

    def __init__(self, root: str | Path, template: ManagerConfig | None = None, max_vocabularies: int = 8) -> None:
        self.root = Path(root)
        self.catalog = DatastoreCatalog(self.root / "datastores")
        # the server's configuration, the one docs/drafting.md reports: recycling warm-started from the corpus
        self.template = template or ManagerConfig(vocab_size=1, history_rebuild_fraction=0.05, warm_start_recycling=True)
        self.max_vocabularies = int(max_vocabularies)
        self._managers: dict[tuple[int, str | None], SessionManager] = {}
        self._lock = threading.Lock()
        self.freed = 0  # managers freed to make room

    def manager(self, vocab_size: int, tokenizer_fingerprint: str | None = None) -> SessionManager:
        """The manager of ``(vocab_size, tokenizer_fingerprint)``, created on first use (see module doc)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= MAX_VOCAB:
            # bounded: the recycling matrix is vocab_size x k int32 (2**20 x 8 = 32 MiB at most)
            raise InvalidArgument(f"vocab_size={vocab_size!r} must be the model's vocabulary size, an integer in "
                                  f"[1, {MAX_VOCAB}]")
        fp = check_fingerprint(tokenizer_fingerprint) if tokenizer_fingerprint else None
        key = (vocab_size, fp)
        with self._lock:
            m = self._managers.get(key)
            if m is None:
                if len(self._managers) >= self.max_vocabularies:
                    self._free_one_locked()
                m = SessionManager(replace(self.template, vocab_size=vocab_size, tokenizer_fingerprint=fp),
                                   self.catalog)
                self._managers[key] = m
                if fp is None:
                    logger.warning("draft sessions of vocabulary %d name no tokenizer fingerprint: they share learned "
                                   "state with every other tokenizer of that size that names none, and datastores "
                                   "are checked by vocabulary size only", vocab_size)
            m.last_used = time.monotonic()
            return m

    def _datastore_keys(self) -> set[tuple[int, str | None]]:
        keys = set()
        for n in self.catalog.names():
            try:
                ds = self.catalog.open(n)
            except RetrievalError as e:  # a broken datastore matches nothing
                logger.debug("datastore %s cannot be opened: %s", n, e)
                continue
            keys.add((ds.vocab_size, ds.fingerprint))
            keys.add((ds.vocab_size, None))
        return keys

    def _free_one_locked(self) -> None:
        idle = [(k, m) for k, m in self._managers.items() if len(m) == 0]
        if not idle:
            raise ResourceExhausted(f"this server already serves {len(self._managers)} tokenizers / vocabularies "
                                    f"with open draft sessions, the maximum is {self.max_vocabularies}; retry when "
                                    "sessions end")
        used = self._datastore_keys()
        idle.sort(key=lambda km: (km[0] in used, km[1].last_used))  # no datastore first, then least recently used
        k, _m = idle[0]
        del self._managers[k]
        self.freed += 1
        logger.info("freed the draft state of vocabulary %d, tokenizer %s (unused) to make room", k[0], k[1] or "(unnamed)")

    def open_sessions(self) -> int:
        """Draft sessions open now, over all managers."""
        return sum(len(m) for m in self.managers())

    def stats(self) -> dict:
        """``sessions``, ``session_bytes``, ``managers`` (state slots held), ``max_managers``, ``freed``."""
        ms = self.managers()
        st = [m.stats() for m in ms]
        return {"sessions": sum(x["sessions"] for x in st), "session_bytes": sum(x["session_bytes"] for x in st),
                "managers": len(ms), "max_managers": self.max_vocabularies, "freed": self.freed, "per_manager": st}

    def managers(self) -> list[SessionManager]:
        with self._lock:
            return list(self._managers.values())

    def evict_idle(self) -> int:
        return sum(len(m.evict_idle()) for m in self.managers())

    def drop_datastore(self, name: str) -> None:
        self.catalog.drop(name)
        for m in self.managers():
            m.forget_datastore(name)

    # --- the build job -------------------------------------------------------------------------
    def validate_build(self, params: dict) -> dict:
        """Check a ``build_datastore`` job's parameters before it is queued."""
        allowed = {"name", "inputs", "input_format", "tokenizer", "vocab_size", "text_fields", "overwrite", "chunk_docs",
                   "tokenizer_fingerprint"}
        extra = set(params) - allowed
        if extra:
            raise InvalidArgument(f"unknown build_datastore parameters {sorted(extra)}; valid: {sorted(allowed)}")
        check_name(params.get("name", ""))
        inputs = params.get("inputs")
        if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) for p in inputs):
            raise InvalidArgument("inputs must be a non-empty list of file paths")
        if not params.get("tokenizer") and not params.get("vocab_size"):
            raise InvalidArgument("give a tokenizer (text inputs) or a vocab_size (id inputs)")
        if params.get("name") in self.catalog.names() and not params.get("overwrite"):
            from retrieval.errors import AlreadyExists

            raise AlreadyExists(f"datastore {params['name']!r} already exists; drop it first or pass overwrite")
        return params

    def build_body(self, ctx, **params) -> dict:
        """Job body of kind ``build_datastore`` (see :func:`build_datastore_job`)."""
        res = build_datastore_job(ctx, root=self.catalog.root, **params)
        for m in self.managers():
            m.forget_datastore(params["name"])
        return res
