"""Cross-encoder k-NN search: scorers, CUR-factorised index (ANNCUR) and adaptive retrieval.

Quick start (the out-of-the-box scorer, offline)::

    from retrieval.crossencoder import build_and_load, SearchParams

    index, stats = build_and_load(
        "my-index", scorer={"name": "minilm-joint"}, dual_encoder={"name": "minilm"},
        items=[{"id": 1, "text": "..."}, ...], anchor_queries=[...],   # or query_log=[...], k_q=100
        params={"k_i": 100, "anchor_method": "qr"})
    res = index.search("a query", k=10, params=SearchParams(mode="adaptive", budget=100))
    res.ids, res.scores, res.calls, res.scorer_seconds, res.other_seconds

See ``docs/crossencoder.md`` for the method, the measured recall and what the bundled scorer is.
"""

from retrieval.crossencoder.build import build_and_load, build_index, load_items, pick_anchor_queries
from retrieval.crossencoder.cur import (
    ANCHOR_METHODS,
    SOLVERS,
    CurFactors,
    pinv_ridge,
    pinv_truncated,
    regularized_pinv,
    ridge_with_intercept,
    select_anchor_items,
    solve_cur,
)
from retrieval.crossencoder.dual import (
    DUAL_ENCODERS,
    DualEncoder,
    make_dual_encoder,
    register_dual_encoder,
)
from retrieval.crossencoder.index import (
    MODES,
    AddResult,
    BuildParams,
    CrossEncoderIndex,
    SearchParams,
    SearchResult,
    read_meta,
)
from retrieval.crossencoder.scorers import (
    SCORERS,
    CallStats,
    Scorer,
    ScorerFingerprint,
    check_fingerprint,
    make_scorer,
    register_scorer,
)

__all__ = [
    "ANCHOR_METHODS",
    "DUAL_ENCODERS",
    "MODES",
    "SCORERS",
    "SOLVERS",
    "AddResult",
    "BuildParams",
    "CallStats",
    "CrossEncoderIndex",
    "CurFactors",
    "DualEncoder",
    "Scorer",
    "ScorerFingerprint",
    "SearchParams",
    "SearchResult",
    "build_and_load",
    "build_index",
    "check_fingerprint",
    "load_items",
    "make_dual_encoder",
    "make_scorer",
    "pick_anchor_queries",
    "pinv_ridge",
    "pinv_truncated",
    "read_meta",
    "regularized_pinv",
    "register_dual_encoder",
    "register_scorer",
    "ridge_with_intercept",
    "select_anchor_items",
    "solve_cur",
]
