"""The call helpers every servicer shares: limits from the settings, blocking work off the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from retrieval.config import LimitsSettings
from retrieval.core.calls import check_count, check_k, run_blocking
from retrieval.errors import ResourceExhausted


def test_check_k_and_check_count():
    assert check_k(0, 1024) == 10 and check_k(7, 1024) == 7 and check_k(1024, 1024) == 1024
    with pytest.raises(ResourceExhausted, match="k = 1025 exceeds the limit of 1024"):
        check_k(1025, 1024)
    assert check_count(3, 3, "queries") == 3
    with pytest.raises(ResourceExhausted, match="4 queries in one request; the limit is 3"):
        check_count(4, 3, "queries")


def test_run_blocking_runs_in_a_worker_thread():
    async def main():
        return await run_blocking(lambda a, b=0: (threading.get_ident(), a + b), 1, b=2)

    ident, total = asyncio.run(main())
    assert total == 3 and ident != threading.get_ident()


def test_the_cross_encoder_servicer_takes_its_limits_from_the_settings(tmp_path):
    """k, batch size and budget are checked against ``limits.*`` (they were constants that disagreed
    with the settings: k <= 1000 there, 1024 everywhere else)."""
    from retrieval.crossencoder.engine import CrossEncoderEngine
    from retrieval.server.crossencoder_servicer import CrossEncoderServicer
    from retrieval.v1 import crossencoder_pb2 as pb

    limits = LimitsSettings(max_k=5, max_ce_batch=2, max_ce_budget=50)
    s = CrossEncoderServicer(CrossEncoderEngine(tmp_path), jobs=None, limits=limits)

    async def call(method, req):
        return await getattr(s, method)(req, None)

    with pytest.raises(ResourceExhausted, match="k = 6 exceeds the limit of 5"):
        asyncio.run(call("Search", pb.CrossEncoderSearchRequest(index="x", query="q", k=6)))
    with pytest.raises(ResourceExhausted, match="3 queries in one request; the limit is 2"):
        asyncio.run(call("SearchBatch", pb.CrossEncoderSearchBatchRequest(index="x", queries=["a", "b", "c"])))
    req = pb.CrossEncoderSearchRequest(index="x", query="q", k=5)
    req.params.budget = 51
    with pytest.raises(ResourceExhausted, match="budget = 51 calls exceeds the limit of 50"):
        asyncio.run(call("Search", req))
    assert LimitsSettings().max_k == 1024  # the default every engine now shares
