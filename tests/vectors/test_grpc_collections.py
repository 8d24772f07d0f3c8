"""Collections over gRPC on a real server: create, list, describe (with counts), drop."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import AlreadyExists, NotFound
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec
from tests.vectors.helpers import wait_indexed


def test_create_describe_list_drop(client):
    info = client.create_collection("col-a", dimension=8, metric="cosine", index={"type": "hnsw", "m": 8,
                                                                                  "ef_construction": 64})
    assert info["name"] == "col-a" and info["dimension"] == 8 and info["metric"] == "cosine"
    assert info["index"] == HnswSpec(m=8, ef_construction=64) and info["shards"] == 1
    assert info["points"] == 0 and info["pending"] == 0 and info["device"] == "cpu"
    assert info["created_at"] > 1.6e9 and len(info["shard_info"]) == 1
    client.create_collection("col-b", dimension=4, metric="l2", index="exact", shards=3)
    client.create_collection("col-c", dimension=4, metric="ip", index={"type": "faiss", "factory": "IVF8,Flat"})
    names = [c["name"] for c in client.list_collections()]
    assert names == sorted(names) and {"col-a", "col-b", "col-c"} <= set(names)
    b = client.describe_collection("col-b")
    assert b["index"] == ExactSpec() and b["shards"] == 3 and [s["shard"] for s in b["shard_info"]] == [0, 1, 2]
    c = client.describe_collection("col-c")
    assert c["index"] == FaissSpec("IVF8,Flat") and c["metric"] == "ip"

    client.drop_collection("col-b")
    assert "col-b" not in [c["name"] for c in client.list_collections()]
    with pytest.raises(NotFound, match="collection 'col-b' does not exist"):
        client.describe_collection("col-b")
    with pytest.raises(NotFound, match="collection 'col-b' does not exist"):
        client.drop_collection("col-b")
    # the name is free again, and the new collection starts empty
    client.create_collection("col-b", dimension=4, metric="l2", index="exact")
    assert client.describe_collection("col-b")["points"] == 0 and client.count("col-b") == 0
    client.drop_collection("col-b")


def test_default_index_is_hnsw_16_200(client):
    info = client.create_collection("col-default", dimension=3)
    assert info["index"] == HnswSpec(m=16, ef_construction=200) and info["metric"] == "l2"


def test_duplicate_create_keeps_the_first(client):
    client.create_collection("col-dup", dimension=4, metric="l2", index="exact")
    client.upsert("col-dup", [1, 2], np.ones((2, 4), np.float32))
    with pytest.raises(AlreadyExists, match="collection 'col-dup' already exists"):
        client.create_collection("col-dup", dimension=16, metric="ip", index="hnsw")
    info = client.describe_collection("col-dup")
    assert info["dimension"] == 4 and info["metric"] == "l2" and info["points"] == 2


def test_describe_reports_counts(client):
    name = "col-counts"
    client.create_collection(name, dimension=8, metric="l2", index={"type": "hnsw", "m": 8, "ef_construction": 40},
                             shards=2)
    rng = np.random.default_rng(0)
    client.upsert(name, np.arange(500), rng.standard_normal((500, 8)).astype(np.float32))
    info = client.describe_collection(name)
    assert info["points"] == 500
    assert info["indexed"] + info["pending"] == 500  # every acknowledged point is indexed or pending
    assert sum(s["points"] for s in info["shard_info"]) == 500 and all(s["points"] > 100 for s in info["shard_info"])
    info = wait_indexed(client, name)
    assert (info["points"], info["indexed"], info["pending"]) == (500, 500, 0)
    assert info["memory_bytes"] > 500 * 8 * 4
    client.delete(name, ids=np.arange(100))
    info = client.describe_collection(name)
    assert info["points"] == 400 and info["indexed"] == 400
    assert sum(s["deleted_in_index"] for s in info["shard_info"]) == 100
    assert all(s["last_seq"] >= 2 for s in info["shard_info"])  # one upsert and one delete per shard
    info = wait_indexed(client, name)
    assert info["state"] == "ready" and all(s["location"] == "local" for s in info["shard_info"])


def test_faiss_untrained_state(client):
    name = "col-untrained"
    client.create_collection(name, dimension=4, index={"type": "faiss", "factory": "IVF16,Flat"})
    client.upsert(name, np.arange(100), np.random.default_rng(1).standard_normal((100, 4)).astype(np.float32))
    info = wait_indexed(client, name, untrained_ok=True)
    assert info["state"] == "untrained" and info["pending"] == 100 and info["indexed"] == 0
