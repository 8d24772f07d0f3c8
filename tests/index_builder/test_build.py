"""Offline builds: every input format, served by a real server on the data folder, against exact search;
sharding, faiss training, resuming, and bad input that must leave an existing collection untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from index_builder.build import BuildSpec, build, build_folder
from retrieval.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from retrieval.jobs import LocalJobContext
from retrieval.storage.points import PointStore
from retrieval.vectors.collection import shard_of
from retrieval.vectors.importing import validate_folder
from tests.index_builder.helpers import (SMALL_HNSW, bigann, exact, glove, id_recall, recall, write_hdf5,
                                         write_parquet, write_vecs)


def ctx(tmp: Path) -> LocalJobContext:
    return LocalJobContext(tmp / "ctx", show_progress=False)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Every format, built offline into one data folder, then served
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs of every format, each built into one data folder (no server running)."""
    tmp = tmp_path_factory.mktemp("formats")
    xb8, xq8 = bigann(3000)
    xb, xq = xb8.astype(np.float32), xq8.astype(np.float32)
    gb, gq = glove(2000, 50)
    ids = (10_000 + 3 * np.arange(len(xb))).astype(np.uint64)
    inputs = {
        "npy": (np.save(tmp / "base.npy", xb) or tmp / "base.npy", {}),
        "fvecs": (write_vecs(tmp / "base.fvecs", xb, "<f4"), {"shards": 2}),
        "bvecs": (write_vecs(tmp / "base.bvecs", xb8, "u1"), {}),
        "ivecs": (write_vecs(tmp / "base.ivecs", xb8.astype(np.int32), "<i4"), {}),
        "hdf5": (write_hdf5(tmp / "sift.hdf5", xb, xq), {}),
        "parquet": (write_parquet(tmp / "base.parquet", ids, xb), {"shards": 2}),
        "glove": (np.save(tmp / "glove.npy", gb) or tmp / "glove.npy", {"metric": "cosine", "shards": 3}),
    }
    data_dir = tmp / "data"
    stats = {}
    for name, (path, kw) in inputs.items():
        spec = BuildSpec(input=str(path), collection=name, index=SMALL_HNSW, block_size=700, **kw)
        stats[name] = build(ctx(tmp), spec, data_dir=data_dir, threads=1)
    return {"dir": data_dir, "xb": xb, "xq": xq, "gb": gb, "gq": gq, "ids": ids, "stats": stats, "tmp": tmp}


@pytest.fixture(scope="module")
def served(data):
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    srv = ServerProcess(data["dir"])
    srv.start()
    try:
        with Client(srv.address, timeout=60) as c:
            yield c
    finally:
        srv.stop()


def test_builder_output_is_the_server_format(data):
    for name, st in data["stats"].items():
        folder = Path(st["installed"])
        config = validate_folder(folder)
        assert config.name == name and config.dimension == (50 if name == "glove" else 128)
        for i in range(config.shards):
            sd = folder / f"shard-{i}"
            store = PointStore(sd / "points.sqlite", config.dimension)
            try:
                manifest = json.loads(next((sd / "snapshots").iterdir()).joinpath("manifest.json").read_text())
                assert manifest["seq"] == store.last_seq > 0  # the server replays nothing
                ids, _ = next(store.iter_points(block=10**6))
                assert (shard_of(ids, config.shards) == i).all()  # routed as the server routes
            finally:
                store.close()
        assert sorted(p.name for p in folder.iterdir()) == ["collection.json", *[f"shard-{i}" for i in range(config.shards)]]
    assert not (data["dir"] / "builds").exists()


@pytest.mark.parametrize("name", ["npy", "fvecs", "bvecs", "ivecs", "hdf5", "parquet"])
def test_each_format_serves_like_exact_search(served, data, name):
    info = served.describe_collection(name)
    assert info["points"] == 3000 and info["pending"] == 0 and info["state"] == "ready"
    for s in info["shard_info"]:
        assert s["snapshot_seq"] == s["last_seq"] > 0 and s["pending"] == 0
    D, I = served.search_batch(name, data["xq"], k=10, ef=64)
    Dt, It = exact(data["xq"], data["xb"], 10)
    if name == "parquet":  # ids come from the file
        It = data["ids"][It].astype(np.int64)
    assert recall(I, Dt, D) >= 0.97
    assert id_recall(I, It) >= 0.97


def test_parquet_payloads_and_filters_are_served(served, data):
    hits = served.search("parquet", data["xb"][5], k=3, with_payloads=True)
    assert int(hits.ids[0]) == 10_000 + 3 * 5
    assert hits.payloads[0] == {"tag": "odd", "n": 5}
    D, I = served.search_batch("parquet", data["xq"][:20], k=5, filter={"must": [{"key": "tag", "equals": "even"}]})
    even = data["xb"][::2]
    Dt, It = exact(data["xq"][:20], even, 5)
    assert id_recall(I, data["ids"][::2][It].astype(np.int64), 5) >= 0.95


def test_cosine_with_three_shards(served, data):
    info = served.describe_collection("glove")
    assert info["metric"] == "cosine" and info["shards"] == 3 and info["points"] == 2000
    D, I = served.search_batch("glove", data["gq"], k=10, ef=64)
    Dt, It = exact(data["gq"], data["gb"], 10, "cosine")
    assert id_recall(I, It) >= 0.95
    np.testing.assert_allclose(D[:, 0], Dt[:, 0], atol=1e-4)


def test_stats_show_phases(data):
    st = data["stats"]["fvecs"]
    assert st["points"] == st["rows"] == 3000 and st["shards"] == 2
    assert sum(s["points"] for s in st["shard_stats"]) == 3000
    for key in ("read_s", "store_s", "add_s", "snapshot_s"):
        assert st["phases_s"][key] > 0


# ------------------------------------------------------------------------------------------------
# faiss: trained on a sample, then added block by block
# ------------------------------------------------------------------------------------------------
def test_faiss_ivf_trains_on_a_sample_and_matches_exact(tmp_path):
    import asyncio

    from retrieval.indexes.base import QueryParams
    from retrieval.vectors.collection import CollectionManager, Limits
    from retrieval.vectors.shard import ShardSettings

    xb8, xq8 = bigann(3000)
    xb, xq = xb8.astype(np.float32), xq8.astype(np.float32)
    np.save(tmp_path / "b.npy", xb)
    spec = BuildSpec(input=str(tmp_path / "b.npy"), collection="ivf", index={"type": "faiss", "factory": "IVF16,Flat"},
                     shards=2, block_size=500, train_sample=800)
    out = build(ctx(tmp_path), spec, data_dir=tmp_path / "data", threads=1)
    assert out["phases_s"]["train_s"] > 0 and out["phases_s"]["sample_s"] > 0

    async def search():
        m = CollectionManager(tmp_path / "data", ShardSettings(index_threads=1), Limits())
        await m.open()
        try:
            col = m.get("ivf")
            info = await col.describe()
            assert info["pending"] == 0 and all(s["snapshot_seq"] == s["last_seq"] for s in info["shard_info"])
            full = await col.search(xq, 10, QueryParams(nprobe=16))
            part = await col.search(xq, 10, QueryParams(nprobe=2))
            return full, part
        finally:
            await m.close()

    full, part = asyncio.run(search())
    Dt, It = exact(xq, xb, 10)
    assert recall(full.ids.astype(np.int64), Dt, full.distances) >= 0.999  # every list visited: exact
    assert recall(part.ids.astype(np.int64), Dt, part.distances) >= 0.5


# ------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------
class Interrupted(LocalJobContext):
    """Stops the build (as a kill would) after ``n`` blocks."""

    def __init__(self, work: Path, n: int) -> None:
        super().__init__(work, show_progress=False)
        self.n = n

    def check_cancelled(self) -> None:
        self.n -= 1
        if self.n < 0:
            raise Cancelled("interrupted by the test")


def _points(folder: Path, d: int) -> tuple[np.ndarray, np.ndarray, list]:
    st = PointStore(folder / "points.sqlite", d)
    try:
        ids, vecs = zip(*st.iter_points(block=10**6))
        ids, vecs = np.concatenate(ids), np.vstack(vecs)
        return ids, vecs, [p for p in st.get(ids, False, True)[2]]
    finally:
        st.close()


@pytest.mark.parametrize("index", ["exact", {"type": "faiss", "factory": "IVF8,Flat"}, SMALL_HNSW])
def test_resumed_build_equals_uninterrupted(tmp_path, index):
    faiss = isinstance(index, dict) and index["type"] == "faiss"
    xb8, xq8 = bigann(2400)
    xb, xq = xb8.astype(np.float32), xq8.astype(np.float32)
    ids = (np.arange(len(xb)) * 7 + 1).astype(np.uint64)
    path = write_parquet(tmp_path / "b.parquet", ids, xb, row_group_size=250)
    spec = BuildSpec(input=str(path), collection="r", index=index, shards=2, block_size=300)
    whole = build_folder(ctx(tmp_path), spec, tmp_path / "whole", threads=1)
    # 8 blocks per pass over the input (faiss: a sampling pass, then the adding pass, per shard): stop in
    # the middle of shard 1's adding pass (shard 0 finished), with a checkpoint after every block
    per_shard = 16 if faiss else 8
    with pytest.raises(Cancelled):
        build_folder(Interrupted(tmp_path / "c1", per_shard + per_shard - 8 + 5), spec, tmp_path / "part",
                     threads=1, checkpoint_s=0)
    done0 = json.loads((tmp_path / "part" / "state" / "shard-0" / "done.json").read_text())
    assert not (tmp_path / "part" / "state" / "shard-1" / "done.json").exists()
    resumed = build_folder(ctx(tmp_path), spec, tmp_path / "part", threads=1, checkpoint_s=0)
    s0, s1 = resumed["shard_stats"]
    assert s0 == done0                          # the finished shard was not rebuilt
    assert s1["resumed_from_row"] > 0           # shard 1 went on from its checkpoint
    assert resumed["points"] == whole["points"] == 2400
    a, b = tmp_path / "whole" / "collection", tmp_path / "part" / "collection"
    validate_folder(b)
    for i in range(2):
        ia, va, pa_ = _points(a / f"shard-{i}", 128)
        ib, vb, pb = _points(b / f"shard-{i}", 128)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(va, vb)
        assert pa_ == pb
        la = np.load(next((a / f"shard-{i}" / "snapshots").iterdir()) / "labels.npy")
        lb = np.load(next((b / f"shard-{i}" / "snapshots").iterdir()) / "labels.npy")
        np.testing.assert_array_equal(la, lb)   # same points, added in the same order
        if index == "exact" or faiss:  # deterministic backends: the same bytes
            fa = {p.name: p.read_bytes() for p in next((a / f"shard-{i}" / "snapshots").iterdir()).iterdir()
                  if p.name != "manifest.json"}
            fb = {p.name: p.read_bytes() for p in next((b / f"shard-{i}" / "snapshots").iterdir()).iterdir()
                  if p.name != "manifest.json"}
            assert fa == fb
    if isinstance(index, dict) and index["type"] == "hnsw":  # a graph continued from a checkpoint: same quality
        import asyncio

        from retrieval.indexes.base import QueryParams
        from retrieval.vectors.collection import CollectionManager, Limits
        from retrieval.vectors.shard import ShardSettings

        async def search(folder):
            dd = tmp_path / f"dd-{folder.parent.name}"
            m = CollectionManager(dd, ShardSettings(index_threads=1), Limits())
            await m.open()
            col = await m.import_folder(folder, "r")
            r = await col.search(xq, 10, QueryParams(ef=32))
            await m.close()
            return r

        Dt, It = exact(xq, xb, 10)
        ra, rb = asyncio.run(search(a)), asyncio.run(search(b))
        assert abs(recall(ra.ids.astype(np.int64), Dt, ra.distances) - recall(rb.ids.astype(np.int64), Dt, rb.distances)) <= 0.02


def test_changed_input_starts_over(tmp_path):
    xb = bigann(1000)[0].astype(np.float32)
    np.save(tmp_path / "b.npy", xb)
    spec = BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index="exact", block_size=200)
    with pytest.raises(Cancelled):
        build_folder(Interrupted(tmp_path / "c1", 2), spec, tmp_path / "w", threads=1, checkpoint_s=0)
    np.save(tmp_path / "b.npy", xb[:900])  # another input in the same work folder: not a resume
    out = build_folder(ctx(tmp_path), spec, tmp_path / "w", threads=1, checkpoint_s=0)
    assert out["points"] == 900 and out["shard_stats"][0]["resumed_from_row"] == 0


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming file / row / address, and the existing collection untouched
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def existing(tmp_path):
    """A data folder holding a good collection 'c'; yields (data_dir, digest of its files)."""
    xb = bigann(600)[0].astype(np.float32)
    np.save(tmp_path / "good.npy", xb)
    build(ctx(tmp_path), BuildSpec(input=str(tmp_path / "good.npy"), collection="c", index=SMALL_HNSW),
          data_dir=tmp_path / "data", threads=1)
    folder = tmp_path / "data" / "collections" / "c"
    before = tree_digest(folder)
    yield tmp_path / "data"
    assert sorted(p.name for p in (tmp_path / "data" / "collections").iterdir()) == ["c"]  # no leftovers
    assert tree_digest(folder) == before


def _write_bad(tmp_path: Path, case: str) -> tuple[Path, dict, str]:
    """(input path, extra spec fields, expected error pattern) for one kind of bad input."""
    xb = bigann(400)[0].astype(np.float32)
    if case == "missing":
        return tmp_path / "nope.fvecs", {}, r"nope\.fvecs' does not exist"
    if case == "wrong_dim_mid_file":
        p = write_vecs(tmp_path / "b.fvecs", xb, "<f4")
        raw = bytearray(p.read_bytes())
        rec = 4 + 128 * 4
        raw[137 * rec : 137 * rec + 4] = np.int32(127).tobytes()  # record 137 claims dimension 127
        p.write_bytes(bytes(raw))
        return p, {}, r"b\.fvecs' row 137: the record header says dimension 127"
    if case == "truncated":
        p = write_vecs(tmp_path / "b.fvecs", xb, "<f4")
        p.write_bytes(p.read_bytes()[:-100])
        return p, {}, r"b\.fvecs' is truncated.*row 399 is incomplete"
    if case == "nan_row":
        xb[321, 5] = np.nan
        np.save(tmp_path / "b.npy", xb)
        return tmp_path / "b.npy", {}, r"b\.npy' row 321: the vector holds NaN"
    if case == "duplicate_ids":
        ids = np.arange(400, dtype=np.uint64)
        ids[350] = 12
        return write_parquet(tmp_path / "b.parquet", ids, xb), {"shards": 2}, \
            r"b\.parquet' row 350: duplicate id 12 \(already used by row 12\)"
    if case == "hdf5_without_datasets":
        with h5py.File(tmp_path / "b.hdf5", "w") as f:
            f.create_dataset("vectors", data=xb)
        return tmp_path / "b.hdf5", {}, r"b\.hdf5' has no dataset 'train'.*found: \['vectors'\]"
    if case == "wrong_dimension_asked":
        np.save(tmp_path / "b.npy", xb)
        return tmp_path / "b.npy", {"dimension": 96}, r"b\.npy' has dimension 128, but --dimension 96"
    if case == "zero_vector_cosine":
        xb[77] = 0
        np.save(tmp_path / "b.npy", xb)
        return tmp_path / "b.npy", {"metric": "cosine"}, r"b\.npy' row 77: the vector is all zeros"
    if case == "bad_index_spec":
        np.save(tmp_path / "b.npy", xb)
        return tmp_path / "b.npy", {"index": {"type": "faiss", "factory": "IVFxx,Nope"}}, "faiss cannot build factory"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "wrong_dim_mid_file", "truncated", "nan_row", "duplicate_ids",
                                  "hdf5_without_datasets", "wrong_dimension_asked", "zero_vector_cosine",
                                  "bad_index_spec"])
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path, existing, case):
    data_dir = existing
    path, kw, pattern = _write_bad(tmp_path, case)
    spec = BuildSpec(input=str(path), collection="c", index=kw.pop("index", SMALL_HNSW), block_size=100, **kw)
    with pytest.raises((InvalidArgument, NotFound), match=pattern):
        build(ctx(tmp_path), spec, data_dir=data_dir, replace=True, threads=1)


def test_unreachable_ray_address_is_a_clear_error(tmp_path, existing):
    data_dir = existing
    np.save(tmp_path / "b.npy", bigann(300)[0])
    spec = BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index=SMALL_HNSW, shards=2)
    with pytest.raises(Unavailable, match=r"no Ray cluster answers at '127\.0\.0\.1:1'"):
        build(ctx(tmp_path), spec, data_dir=data_dir, replace=True, use_ray=True, ray_address="127.0.0.1:1")


def test_existing_collection_needs_replace_and_a_free_data_folder(tmp_path, existing):
    from retrieval.vectors.importing import data_dir_lock

    data_dir = existing
    np.save(tmp_path / "b.npy", bigann(300)[0])
    spec = BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index=SMALL_HNSW)
    with pytest.raises(AlreadyExists, match="pass --replace"):
        build(ctx(tmp_path), spec, data_dir=data_dir)
    with data_dir_lock(data_dir):  # as a running server holds it
        with pytest.raises(FailedPrecondition, match="is in use"):
            build(ctx(tmp_path), spec, data_dir=data_dir, replace=True)


def test_replace_installs_the_new_collection(tmp_path):
    xb = bigann(500)[0]
    np.save(tmp_path / "a.npy", xb[:300])
    np.save(tmp_path / "b.npy", xb)
    build(ctx(tmp_path), BuildSpec(input=str(tmp_path / "a.npy"), collection="c", index="exact"),
          data_dir=tmp_path / "data")
    out = build(ctx(tmp_path), BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index="exact"),
                data_dir=tmp_path / "data", replace=True)
    folders = list((tmp_path / "data" / "collections").iterdir())
    assert len(folders) == 1 and Path(out["installed"]) == folders[0]
    assert validate_folder(folders[0]).name == "c"
    assert json.loads((folders[0] / "collection.json").read_text())["installed_at"] > 0
    shutil.rmtree(tmp_path / "data")


def test_hnsw_build_is_hnswlibs_own_build(tmp_path):
    """Congruence: with one thread the builder's HNSW graph is byte for byte what hnswlib builds alone
    from the same data and parameters (block-wise adds and the resize do not change it)."""
    import hnswlib

    xb = bigann(3000)[0].astype(np.float32)
    np.save(tmp_path / "b.npy", xb)
    ref = hnswlib.Index(space="l2", dim=128)
    ref.init_index(max_elements=len(xb), M=16, ef_construction=100, random_seed=100)
    ref.add_items(xb, np.arange(len(xb)), num_threads=1)
    ref.save_index(str(tmp_path / "ref.bin"))
    build_folder(ctx(tmp_path), BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index=SMALL_HNSW,
                                          block_size=700), tmp_path / "w", threads=1)
    ours = next((tmp_path / "w" / "collection" / "shard-0" / "snapshots").iterdir()) / "hnsw.bin"
    assert ours.read_bytes() == (tmp_path / "ref.bin").read_bytes()
