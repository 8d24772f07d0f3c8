"""The drafting state one server holds: a datastore catalog and one session manager per vocabulary.

Sessions state the vocabulary size of their model; each vocabulary gets its own
:class:`SessionManager` (its own recycling matrix, history and calibration), created on first use, at
most ``max_vocabularies`` of them. Datastores live under ``<root>/datastores`` and survive restarts;
sessions, history, recycling matrices and calibration are in memory (lost on restart, rebuilt by use).

Thread-safety: all methods may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from retrieval.drafting.datastore import DatastoreCatalog, build_datastore_job, check_name
from retrieval.drafting.session import ManagerConfig, SessionManager
from retrieval.errors import InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

JOB_KIND = "build_datastore"


MAX_VOCAB = 1 << 20


class DraftsEngine:
    """``template``: the :class:`ManagerConfig` every vocabulary's manager copies (its vocab_size ignored)."""

    def __init__(self, root: str | Path, template: ManagerConfig | None = None, max_vocabularies: int = 8) -> None:
        self.root = Path(root)
        self.catalog = DatastoreCatalog(self.root / "datastores")
        self.template = template or ManagerConfig(vocab_size=1, history_rebuild_fraction=0.05)
        self.max_vocabularies = int(max_vocabularies)
        self._managers: dict[int, SessionManager] = {}
        self._lock = threading.Lock()

    def manager(self, vocab_size: int) -> SessionManager:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= MAX_VOCAB:
            # bounded: the recycling matrix is vocab_size x k int32 (2**20 x 8 = 32 MiB at most)
            raise InvalidArgument(f"vocab_size={vocab_size!r} must be the model's vocabulary size, an integer in "
                                  f"[1, {MAX_VOCAB}]")
        with self._lock:
            m = self._managers.get(vocab_size)
            if m is None:
                if len(self._managers) >= self.max_vocabularies:
                    raise ResourceExhausted(f"this server already serves {len(self._managers)} vocabularies, the "
                                            f"maximum is {self.max_vocabularies}")
                m = SessionManager(replace(self.template, vocab_size=vocab_size), self.catalog)
                self._managers[vocab_size] = m
            return m

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
        allowed = {"name", "inputs", "input_format", "tokenizer", "vocab_size", "text_fields", "overwrite", "chunk_docs"}
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
