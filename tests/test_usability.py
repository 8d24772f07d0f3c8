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
