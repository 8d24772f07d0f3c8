"""Sharded collections: in process and as Ray actors, against the unsharded collection and exact search.

The Ray tests start a local Ray instance (``num_cpus=2``, as CI has) once for the module; they are
marked slow but run in CI."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import NotFound
from retrieval.indexes.base import ExactSpec, HnswSpec, QueryParams
from retrieval.vectors import filters as flt
from retrieval.vectors.collection import CollectionConfig, CollectionManager, Limits, shard_of
from retrieval.vectors.delta import NO_ID
from retrieval.vectors.shard import Shard, ShardSettings
from tests.reference import exact_knn, recall_by_distance

HNSW = HnswSpec(m=16, ef_construction=100)
N = 5000


def payloads(n):
    return [f'{{"parity": "{"even" if i % 2 == 0 else "odd"}", "i": {i}}}' for i in range(n)]


async def fill(m: CollectionManager, name: str, spec, shards: int, xb: np.ndarray):
    col = await m.create(CollectionConfig(name, xb.shape[1], "l2", spec, shards))
    pls = payloads(len(xb))
    for a in range(0, len(xb), 1000):
        await col.upsert(np.arange(a, a + min(1000, len(xb) - a), dtype=np.uint64), xb[a : a + 1000], pls[a : a + 1000])
    assert await col.wait_indexed(300)
    return col


async def answers(col, xq, k=10):
    """Unfiltered, filtered, point reads and counts of one collection."""
    r = await col.search(xq, k, QueryParams(ef=64))
    even = flt.from_dict({"must": [{"key": "parity", "equals": "even"}]})
    rf = await col.search(xq, k, QueryParams(ef=64), even)
    ids, vecs, pls = await col.get(np.array([0, 1, 2, 3, 4999, 123456], np.uint64), True, True)
    return {"search": r, "filtered": rf, "get": (ids, vecs, pls), "count": await col.count(),
            "count_even": await col.count(even), "info": await col.describe()}


def check(ans, xb, xq, shards, exact_index: bool):
    Dt, It = exact_knn(xq, xb, 10, "l2")
    r = ans["search"]
    assert recall_by_distance(r.ids, r.distances, Dt) >= (0.999 if exact_index else 0.95)
    Dte, Ite = exact_knn(xq, xb[::2], 10, "l2")
    rf = ans["filtered"]
    assert (rf.ids.astype(np.int64) % 2 == 0).all()
    assert recall_by_distance(rf.ids, rf.distances, Dte) >= (0.999 if exact_index else 0.95)
    ids, vecs, pls = ans["get"]
    assert ids.tolist() == [0, 1, 2, 3, 4999]
    np.testing.assert_array_equal(vecs, xb[[0, 1, 2, 3, 4999]])
    assert ans["count"] == len(xb) and ans["count_even"] == (len(xb) + 1) // 2
    info = ans["info"]
    assert info["shards"] == shards and info["points"] == len(xb) and info["pending"] == 0
    per_shard = np.bincount(shard_of(np.arange(len(xb), dtype=np.uint64), shards), minlength=shards)
    assert [s["points"] for s in info["shard_info"]] == per_shard.tolist()


@pytest.fixture(scope="module")
def sift(bigann):
    xb, xq, _ = bigann
    return xb[:N], xq


# ------------------------------------------------------------------------------------------------
# In process
# ------------------------------------------------------------------------------------------------
def test_two_shards_in_process_answer_like_one(tmp_path, sift):
    xb, xq = sift

    async def run():
        m = CollectionManager(tmp_path / "data", ShardSettings(index_threads=1), Limits())
        await m.open()
        try:
            out = {}
            for name, spec, shards in [("e1", ExactSpec(), 1), ("e2", ExactSpec(), 2), ("h1", HNSW, 1), ("h2", HNSW, 2)]:
                out[name] = await answers(await fill(m, name, spec, shards, xb), xq)
            return out
        finally:
            await m.close()

    out = asyncio.run(run())
    for name, ans in out.items():
        check(ans, xb, xq, int(name[1]), name[0] == "e")
    # exact: the sharded collection returns what the unsharded one does
    np.testing.assert_allclose(out["e2"]["search"].distances, out["e1"]["search"].distances, rtol=1e-5)
    Dt, _ = exact_knn(xq, xb, 10, "l2")
    r1, r2 = out["h1"]["search"], out["h2"]["search"]
    assert recall_by_distance(r2.ids, r2.distances, Dt) >= recall_by_distance(r1.ids, r1.distances, Dt) - 0.01
    assert all(s["location"] == "local" for s in out["h2"]["info"]["shard_info"])


def test_in_process_search_is_a_plain_call_on_the_loop_thread(tmp_path, sift, monkeypatch):
    """Unfiltered search of in-process shards: no await on the shards and no thread hop."""
    xb, xq = sift

    async def never(*a, **k):
        raise AssertionError("asearch must not be used for in-process shards")

    monkeypatch.setattr(Shard, "asearch", never)
    threads = []
    orig = Shard.search

    def search(self, *a, **k):
        threads.append(threading.get_ident())
        return orig(self, *a, **k)

    monkeypatch.setattr(Shard, "search", search)

    async def run():
        m = CollectionManager(tmp_path / "data", ShardSettings(index_threads=1), Limits())
        await m.open()
        try:
            for shards in (1, 2):
                col = await fill(m, f"c{shards}", ExactSpec(), shards, xb[:500])
                assert col._local
                await col.search(xq[:1], 5, QueryParams())
            return threading.get_ident()
        finally:
            await m.close()

    loop_thread = asyncio.run(run())
    assert threads and set(threads) == {loop_thread}


def test_calls_in_flight_finish_when_the_collection_is_dropped(tmp_path, sift):
    """Drop (and a replacing import, and shutdown) close a collection while calls on it may still be
    running on the reader threads: they finish against the version they started on, with right answers,
    and a call that looks the name up afterwards gets NOT_FOUND."""
    xb, xq = sift
    even = flt.from_dict({"must": [{"key": "parity", "equals": "even"}]})

    async def run():
        m = CollectionManager(tmp_path / "data", ShardSettings(index_threads=1), Limits())
        await m.open()
        try:
            col = await fill(m, "c", ExactSpec(), 2, xb)
            calls = []
            for i in range(40):
                calls.append(asyncio.ensure_future(col.count(even)))
                calls.append(asyncio.ensure_future(col.search(xq[i : i + 1], 5, QueryParams(), even)))
                calls.append(asyncio.ensure_future(col.scroll(None, 0, 50, True, True)))
            await asyncio.sleep(0)  # every call has started and is waiting on a reader thread
            await m.drop("c")
            results = await asyncio.gather(*calls, return_exceptions=True)
            with pytest.raises(NotFound):
                m.get("c")
            return results
        finally:
            await m.close()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    counts, searches, scrolls = results[0::3], results[1::3], results[2::3]
    assert set(counts) == {(len(xb) + 1) // 2}
    assert all((r.ids.astype(np.int64) % 2 == 0).all() and (r.ids != NO_ID).all() for r in searches)
    assert all(s[0].tolist() == list(range(50)) for s in scrolls)
    assert not (tmp_path / "data" / "collections" / "c").exists()


def test_unreachable_ray_address_stops_the_server_with_a_clear_error(tmp_path):
    from retrieval.server.process import ServerProcess

    srv = ServerProcess(tmp_path / "data", args=["--ray", "127.0.0.1:1"])
    with pytest.raises(RuntimeError) as e:
        srv.start(timeout=60)
    assert "no Ray cluster answers at '127.0.0.1:1'" in str(e.value)
    assert not (tmp_path / "data" / "collections").exists()  # nothing was opened


# ------------------------------------------------------------------------------------------------
# On a local Ray instance
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is a test dependency (pip install 'ray>=2.9')")
    from retrieval.vectors.ray_shards import connect

    was = ray.is_initialized()
    address = connect(None, num_cpus=2)
    yield address
    if not was:
        ray.shutdown()


@pytest.mark.slow
def test_two_shards_on_ray_answer_like_in_process(tmp_path, sift, ray_cluster):
    from retrieval.vectors.ray_shards import RayOptions, RayShard, ray_shard_factory

    xb, xq = sift

    async def run(factory, data):
        m = CollectionManager(data, ShardSettings(index_threads=1), Limits(), factory)
        await m.open()
        try:
            out = {}
            for name, spec in [("e2", ExactSpec()), ("h2", HNSW)]:
                col = await fill(m, name, spec, 2, xb)
                if factory is not None:
                    assert not col._local and all(isinstance(s, RayShard) for s in col.shards)
                out[name] = await answers(col, xq)
            return out
        finally:
            await m.close()

    local = asyncio.run(run(None, tmp_path / "local"))
    remote = asyncio.run(run(ray_shard_factory(RayOptions()), tmp_path / "ray"))
    for name in ("e2", "h2"):
        check(remote[name], xb, xq, 2, name == "e2")
        assert all(s["location"].startswith("ray:actor") for s in remote[name]["info"]["shard_info"])
    np.testing.assert_array_equal(remote["e2"]["search"].ids, local["e2"]["search"].ids)
    np.testing.assert_allclose(remote["e2"]["search"].distances, local["e2"]["search"].distances, rtol=1e-6)
    Dt, _ = exact_knn(xq, xb, 10, "l2")
    rl, rr = local["h2"]["search"], remote["h2"]["search"]
    assert abs(recall_by_distance(rr.ids, rr.distances, Dt) - recall_by_distance(rl.ids, rl.distances, Dt)) <= 0.01


@pytest.mark.slow
def test_ray_actor_restarts_and_reloads_its_shard(tmp_path, sift, ray_cluster):
    from retrieval.vectors.ray_shards import RayOptions, ray_shard_factory

    xb, xq = sift

    async def run():
        m = CollectionManager(tmp_path / "data", ShardSettings(index_threads=1, snapshot_interval_s=0.5), Limits(),
                              ray_shard_factory(RayOptions()))
        await m.open()
        try:
            col = await fill(m, "c", HNSW, 2, xb[:3000])
            await asyncio.gather(*(s.snapshot() for s in col.shards))
            await col.upsert(np.arange(3000, 3500, dtype=np.uint64), xb[3000:3500], None)  # after the snapshot
            before = await col.search(xq, 10, QueryParams(ef=64))
            pid = await col.shards[0].pid()
            os.kill(pid, signal.SIGKILL)
            # the next calls wait for Ray to restart the actor, which reloads snapshot + point store
            after = await col.search(xq, 10, QueryParams(ef=64))
            assert await col.shards[0].pid() != pid
            assert await col.count() == 3500
            await col.upsert(np.arange(3500, 4000, dtype=np.uint64), xb[3500:4000], None)
            assert await col.count() == 4000
            return before, after
        finally:
            await m.close()

    before, after = asyncio.run(run())
    Dt, _ = exact_knn(xq, xb[:3500], 10, "l2")
    assert recall_by_distance(after.ids, after.distances, Dt) >= 0.95
    assert (after.ids == before.ids).mean() >= 0.97


@pytest.mark.slow
def test_server_with_ray_serves_created_and_imported_collections(tmp_path, sift, ray_cluster):
    """`retrieval serve --ray ADDRESS`: the client does not change."""
    from index_builder.build import BuildSpec, build_folder
    from retrieval.client import Client
    from retrieval.jobs import LocalJobContext
    from retrieval.server.process import ServerProcess

    xb, xq = sift
    imports = tmp_path / "imports"
    imports.mkdir()
    np.save(imports / "b.npy", xb)
    build_folder(LocalJobContext(tmp_path / "ctx", show_progress=False),
                 BuildSpec(input=str(imports / "b.npy"), collection="built", index={"type": "hnsw", "m": 16,
                           "ef_construction": 100}, shards=2, block_size=1000), imports / "w", threads=1)
    import json

    srv = ServerProcess(tmp_path / "data", args=["--ray", ray_cluster],
                        env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(imports)])})
    srv.start(timeout=180)
    try:
        with Client(srv.address, timeout=120) as c:
            c.create_collection("made", 128, "l2", "exact", shards=2)
            for a in range(0, len(xb), 1000):
                c.upsert("made", np.arange(a, a + 1000), xb[a : a + 1000])
            c.import_collection("built", str(imports / "w" / "collection"))
            Dt, _ = exact_knn(xq, xb, 10, "l2")
            for name, floor in (("made", 0.999), ("built", 0.95)):
                info = c.describe_collection(name)
                assert info["points"] == len(xb) and info["shards"] == 2
                assert all(s["location"].startswith("ray:actor") for s in info["shard_info"])
                D, I = c.search_batch(name, xq, k=10, ef=64)
                assert recall_by_distance(I.view(np.uint64), D, Dt) >= floor
            hits = c.search("made", xq[0], k=3)
            assert len(hits.ids) == 3
    finally:
        assert srv.stop() == 0
