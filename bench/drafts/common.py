"""Shared setup of the draft benchmarks: the AlpacaEval datastore and session managers per config."""

from __future__ import annotations

import logging
from pathlib import Path

from bench.drafts.data import CORPUS_DIR, TOKENIZER_MODEL, VOCAB_SIZE
from retrieval.drafting import DatastoreCatalog, DraftBudget, ManagerConfig, SessionManager

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "bench" / "cache" / "drafts"
RESULTS = REPO / "bench" / "results" / "drafts"
DATASTORE = "alpaca_eval"


def corpus_inputs() -> list[str]:
    return sorted(str(p) for p in CORPUS_DIR.glob("*.json"))


def catalog(rebuild: bool = False) -> DatastoreCatalog:
    """The catalog under ``bench/cache/drafts`` holding the AlpacaEval datastore (built once)."""
    cat = DatastoreCatalog(CACHE / "datastores")
    if rebuild and DATASTORE in cat.names():
        cat.drop(DATASTORE)
    if DATASTORE not in cat.names():
        logger.info("building the %s datastore", DATASTORE)
        cat.build(DATASTORE, corpus_inputs(), tokenizer=str(TOKENIZER_MODEL), text_fields=["instruction", "output"])
    return cat


def make_manager(cat: DatastoreCatalog, budget: DraftBudget, warm_recycling: bool = False,
                 calibrate: bool = True, combine: str = "noisy_or", source_params: dict | None = None,
                 **config) -> SessionManager:
    """A fresh manager (empty history, fresh calibration, fresh recycling matrix) for one benchmark run."""
    cfg = ManagerConfig(vocab_size=VOCAB_SIZE, default_budget=budget, combine=combine,
                        source_params=source_params or {}, **config)
    m = SessionManager(cfg, cat)
    if not calibrate:
        m.calibrator = None
    if warm_recycling:
        ds = cat.open(DATASTORE)
        m.recycling.matrix.warm_start(ds.tokens, ds.sep)
    return m
