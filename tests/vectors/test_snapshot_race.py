"""Concurrent snapshots of one shard: explicit ones (several at once) racing the indexer's periodic
ones must neither fail nor delete each other's temporary folders, and the newest snapshot must load.

Regression test for issue 11 item 4: ``Shard.snapshot()`` was not serialised, so two writes ran at once
and one's cleanup deleted the other's temporary folder (FileNotFoundError on rename)."""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np

from retrieval.indexes.base import HnswSpec, QueryParams
from retrieval.storage import snapshots
from retrieval.vectors.shard import Shard, ShardSettings

D = 8
SPEC = HnswSpec(m=8, ef_construction=40)
# every write makes the periodic snapshot due at once, so it keeps running alongside the explicit ones
SETTINGS = ShardSettings(index_threads=1, snapshot_every=1, snapshot_interval_s=0.0)


def test_concurrent_explicit_and_periodic_snapshots(tmp_path, caplog):
    rng = np.random.default_rng(11)
    xb = rng.standard_normal((1500, D)).astype(np.float32)
    folder = tmp_path / "shard-0"
    caplog.set_level(logging.INFO, logger="retrieval")

    async def write_and_snapshot():
        shard = Shard(folder, D, "l2", SPEC, SETTINGS, name="race")
        await shard.open()
        seqs = []
        try:
            for r in range(30):
                ids = np.arange(r * 50, (r + 1) * 50, dtype=np.uint64)
                await shard.upsert(ids, xb[r * 50 : (r + 1) * 50], None)
                if r % 3 == 0:  # let the indexer catch up now and then, so its periodic snapshot is due
                    await shard.wait_indexed(30)
                got = await asyncio.gather(*(shard.snapshot() for _ in range(4)))
                seqs.append(got)
                await asyncio.sleep(0.002 * (r % 4))
            assert await shard.wait_indexed(60)
            final = await shard.snapshot()
        finally:
            await shard.close()
        return seqs, final

    seqs, final = asyncio.run(write_and_snapshot())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    for got in seqs:  # callers that waited for the write in flight got a snapshot covering their writes
        assert all(g > 0 for g in got)
    root = folder / "snapshots"
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 1 and names[0].isdigit(), names  # one snapshot, no temp or aside folder left
    manifest = snapshots.verify(root / names[0])
    assert manifest["seq"] >= final and manifest["seq"] == 30  # 30 upserts, all in the newest snapshot

    async def reopen():
        shard = Shard(folder, D, "l2", SPEC, SETTINGS, name="race")
        await shard.open()
        try:
            assert shard.snapshot_seq == 30 and len(shard.delta) == 0  # loaded, nothing to replay
            D_, I = shard.search(xb[:200], 1, QueryParams(ef=64))
            return I[:, 0]
        finally:
            await shard.close(snapshot=False)

    top = asyncio.run(reopen())
    assert (top == np.arange(200, dtype=np.uint64)).mean() >= 0.99
    assert any("loaded snapshot seq 30" in r.getMessage() for r in caplog.records)


def test_cleanup_spares_a_live_writers_temp_and_removes_stale_ones(tmp_path):
    """The unit behind the fix: a commit's cleanup deletes temps of writers that are gone only."""
    root = tmp_path / "snapshots"
    a = snapshots.begin(root)  # another writer of this process, still filling its folder
    (a / "f").write_bytes(b"1")
    stale_token = root / f"{snapshots.TMP_PREFIX}{os.getpid()}-000000000000-{'0' * 32}"
    stale_token.mkdir()  # our pid, another process token: an earlier process that had our pid
    stale_old = root / f"{snapshots.TMP_PREFIX}{'ab' * 16}"
    stale_old.mkdir()  # the format of older versions: no owner
    b = snapshots.begin(root)
    (b / "f").write_bytes(b"2")
    final = snapshots.commit(root, b, 5, {"kind": "hnsw", "d": 4, "metric": "l2"}, ["f"])
    snapshots.cleanup(root, final)
    assert a.exists() and (a / "f").read_bytes() == b"1"
    assert not stale_token.exists() and not stale_old.exists()
    final2 = snapshots.commit(root, a, 6, {"kind": "hnsw", "d": 4, "metric": "l2"}, ["f"])  # still works
    snapshots.cleanup(root, final2)
    assert [p.name for p in root.iterdir()] == [final2.name]
