"""N-gram draft lookups for speculative decoding: draft sources, draft trees, sessions.

* :mod:`draft`: the :class:`Draft` format (tokens + parents, probabilities, sources), tree-attention mask
  and position ids; :class:`DraftBudget`.
* Sources (one :class:`DraftSource` Protocol, registry by name): ``context`` (prompt lookup),
  ``corpus`` (REST-style suffix-array datastore, :mod:`datastore`), ``recycling`` (Token Recycling
  adjacency matrix), ``history`` (SuffixDecoding-style store of earlier outputs).
* :mod:`merge`: acceptance-probability scoring, calibration, and the merger into one draft.
* :mod:`session`: :class:`Session`, the stateless :func:`draft`, :class:`SessionManager`.

See ``docs/drafting.md``.
"""

from retrieval.drafting.base import (Candidates, DraftSource, SourceCaps, available_sources, make_source,
                                     register_source, source_factory)
from retrieval.drafting.context import ContextLookup
from retrieval.drafting.datastore import (CorpusDatastore, CorpusSource, DatastoreCatalog, build_datastore_job,
                                          iter_documents)
from retrieval.drafting.draft import (MAX_DRAFT_DEPTH, MAX_DRAFT_NODES, Draft, DraftBudget, accepted_length,
                                      position_ids, tree_attention_mask, tree_depths)
from retrieval.drafting.history import HistorySource, HistoryStore
from retrieval.drafting.merge import Calibrator, merge
from retrieval.drafting.recycling import TOKEN_RECYCLING_TREE_80, RecyclingMatrix, RecyclingSource, tree_shape
from retrieval.drafting.session import (DEFAULT_SOURCES, ManagerConfig, Session, SessionLimits, SessionManager,
                                        draft)
from retrieval.drafting.tokenizer import Tokenizer

__all__ = [
    "Candidates", "DraftSource", "SourceCaps", "available_sources", "make_source", "register_source",
    "source_factory", "ContextLookup", "CorpusDatastore", "CorpusSource", "DatastoreCatalog",
    "build_datastore_job", "iter_documents", "MAX_DRAFT_DEPTH", "MAX_DRAFT_NODES", "Draft", "DraftBudget",
    "accepted_length", "position_ids", "tree_attention_mask", "tree_depths", "HistorySource", "HistoryStore",
    "Calibrator", "merge", "TOKEN_RECYCLING_TREE_80", "RecyclingMatrix", "RecyclingSource", "tree_shape",
    "DEFAULT_SOURCES", "ManagerConfig", "Session", "SessionLimits", "SessionManager", "draft", "Tokenizer",
]
