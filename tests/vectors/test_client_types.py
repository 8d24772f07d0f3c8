"""The client's typed results against a real server: attributes and the read-only dict view agree, and
the client is grouped by engine over the same methods."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import numpy as np
import pytest

from retrieval.client import Client, CollectionInfo, JobInfo, PayloadIndexInfo, types


@pytest.fixture(scope="module")
def info(client):
    client.create_collection("typed", dimension=4, metric="l2", index={"type": "hnsw", "m": 8})
    client.upsert("typed", ids=np.arange(10), vectors=np.eye(10, 4, dtype=np.float32),
                  payloads=[{"lang": "en"}] * 10)
    client.create_payload_index("typed", "lang", "keyword")
    return client.describe_collection("typed")


def test_collection_info_is_typed_and_a_dict(info):
    assert isinstance(info, CollectionInfo) and dataclasses.is_dataclass(info)
    assert info.name == info["name"] == "typed"
    assert info.dimension == info["dimension"] == 4
    assert info.points == 10 and info.metric == "l2"
    assert "dimension" in info and info.get("nope", 7) == 7
    assert all(isinstance(p, PayloadIndexInfo) for p in info.payload_indexes)
    assert [(p.key, p.type) for p in info.payload_indexes] == [("lang", "keyword")]
    d = json.loads(json.dumps(info.to_dict()))  # the CLI's --json
    assert d["dimension"] == 4 and d["payload_indexes"][0]["key"] == "lang"
    assert d["index"]["type"] == "hnsw" and d["index"]["m"] == 8
    plain = info.to_dict()
    assert dict(info) == info and set(plain) == set(info)
    assert {k: v for k, v in plain.items() if k not in ("index", "payload_indexes")} == {
        k: v for k, v in info.items() if k not in ("index", "payload_indexes")}


def test_records_are_read_only_and_copy_safely(info):
    for mutate in (lambda: info.__setitem__("points", 0), lambda: info.pop("points"), lambda: info.update(a=1),
                   lambda: setattr(info, "points", 0)):
        with pytest.raises((TypeError, dataclasses.FrozenInstanceError)):
            mutate()
    assert info.points == 10
    plain = info.to_dict()
    plain["points"] = 0  # a mutable deep copy, detached from the record
    assert info["points"] == 10
    assert pickle.loads(pickle.dumps(info)) == info and copy.deepcopy(info) == info
    changed = dataclasses.replace(info, points=3)
    assert changed.points == changed["points"] == 3 and info.points == 10


def test_list_and_jobs_return_records(client, info):
    cols = client.list_collections()
    assert all(isinstance(c, CollectionInfo) for c in cols) and "typed" in [c.name for c in cols]
    kinds = client.job_kinds()
    assert kinds and all(isinstance(k, types.JobKind) and k.name == k["name"] for k in kinds)
    assert all(isinstance(j, JobInfo) for j in client.list_jobs())


def test_engine_views_hold_the_flat_methods(client: Client, info):
    grouped, flat = client.vectors.describe_collection("typed"), client.describe_collection("typed")
    # the same call (the index may still be catching up between the two: compare what cannot change)
    assert type(grouped) is type(flat) and (grouped.name, grouped.points) == (flat.name, flat.points) == ("typed", 10)
    assert "search" in dir(client.vectors) and "create_graph" in dir(client.graphs)
    with pytest.raises(AttributeError):
        client.vectors.create_graph  # noqa: B018 - a graph method is not a vector method


def test_async_client_has_the_same_engines_and_records(server, info):
    import asyncio

    from retrieval.aio import AsyncClient

    async def main():
        async with AsyncClient(server.address) as ac:
            return await ac.vectors.describe_collection("typed"), await ac.describe_collection("typed"), ac

    grouped, flat, ac = asyncio.run(main())
    assert isinstance(grouped, CollectionInfo) and type(flat) is type(grouped)
    assert (grouped.name, grouped.points, grouped.dimension) == (flat.name, flat.points, flat.dimension) == ("typed", 10, 4)
    assert "search" in dir(ac.vectors) and "create_graph" in dir(ac.graphs) and "create_graph" not in dir(ac.vectors)
