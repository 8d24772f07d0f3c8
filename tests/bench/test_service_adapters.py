"""The service adapters end to end: a real server subprocess, the Python client, recall vs the library."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ann import adapters
from bench.ann.datasets import load
from bench.ann.metrics import distances, recall_per_query


@pytest.fixture(scope="module")
def ds():
    return load("bigann-10k").subset(max_n=1500, max_queries=40)


def recall(ds, ids):
    return recall_per_query(ds.gt_dist, ids, distances(ds.xq, ds.xb, ids, ds.metric), 10).mean()


@pytest.mark.slow
@pytest.mark.parametrize(
    "service, library, build, query",
    [
        ("service-hnsw", "hnswlib", {"M": 12, "ef_construction": 64}, {"ef": 48}),
        ("service-exact", "exact-numpy", {}, {}),
    ],
)
def test_service_matches_the_library(ds, service, library, build, query):
    svc = adapters.get(service)(ds.metric, ds.d, build, threads=1)
    try:
        assert svc.in_process is False
        svc.fit(ds.xb)
        svc.set_query_params(query)
        single = np.stack([np.pad(svc.query(q, 10), (0, 10), constant_values=-1)[:10] for q in ds.xq])
        batch = svc.batch_query(ds.xq, 10)
        assert batch.shape == (ds.nq, 10)
        assert svc.index_bytes() > 0 and svc.rss_delta_bytes() is not None
        server = svc._server
    finally:
        svc.close()
    assert server.proc.poll() is not None  # close() stopped the server
    lib = adapters.get(library)(ds.metric, ds.d, build, threads=1)
    lib.fit(ds.xb)
    lib.set_query_params(query)
    r_lib = recall(ds, lib.batch_query(ds.xq, 10))
    assert recall(ds, single) >= r_lib - 0.02 and recall(ds, batch) >= r_lib - 0.02
    if service == "service-exact":
        assert recall(ds, single) == recall(ds, batch) == 1.0
