"""Small things a new user trips over: names of metrics and durability levels in any case."""

from __future__ import annotations

import numpy as np

from retrieval.config import Settings


def test_durability_in_any_case():
    assert Settings(durability="full").durability == "FULL"
    assert Settings(durability="Normal").durability == "NORMAL"


def test_metric_in_any_case(client):
    info = client.create_collection("metric-case", 3, metric="COSINE")
    assert info["metric"] == "cosine"
    client.upsert("metric-case", [1, 2], np.array([[1, 0, 0], [0, 1, 0]], np.float32))
    assert client.search("metric-case", np.array([1, 0.1, 0], np.float32), k=1).ids.tolist() == [1]
    assert client.describe_collection("metric-case")["metric"] == "cosine"
    client.drop_collection("metric-case")


def test_index_parameters_in_any_case_and_unknown_ones_named():
    import pytest

    from retrieval.errors import InvalidArgument
    from retrieval.indexes import registry

    assert registry.spec_from_dict({"type": "hnsw", "M": 32, "EF_construction": 100}) == \
        registry.spec_from_dict({"type": "hnsw", "m": 32, "ef_construction": 100})
    with pytest.raises(InvalidArgument, match=r"unknown parameter 'efc' for index type 'hnsw'; valid: ef_construction, m"):
        registry.spec_from_dict({"type": "hnsw", "efc": 100})


def test_hnsw_spec_takes_hnswlibs_M_keyword(client):
    import pytest

    from retrieval.errors import InvalidArgument
    from retrieval.indexes import registry
    from retrieval.indexes.base import HnswSpec

    assert HnswSpec(M=32) == HnswSpec(m=32) == registry.spec_from_dict(HnswSpec(M=32))
    assert registry.spec_to_dict(HnswSpec(M=32)) == {"type": "hnsw", "m": 32, "ef_construction": 200}
    with pytest.raises(InvalidArgument, match="disagree"):
        HnswSpec(m=8, M=32)
    info = client.create_collection("hnsw-M", dimension=4, index=HnswSpec(M=12, ef_construction=50))
    assert (info.index.m, info.index.ef_construction) == (12, 50)
    client.drop_collection("hnsw-M")


def test_search_with_two_queries_points_to_search_batch(client):
    import pytest

    from retrieval.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"got shape \(2, 4\); for several queries use search_batch"):
        client.search("anything", np.zeros((2, 4), np.float32))
