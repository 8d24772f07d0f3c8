"""Shard builds as Ray tasks on a local Ray instance (num_cpus=2): the same output as in process, and
errors inside a task come back as the same clear errors. Slow (starting Ray), but run in CI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from index_builder.build import BuildSpec, build, build_folder
from retrieval.errors import InvalidArgument
from retrieval.jobs import LocalJobContext
from tests.index_builder.helpers import SMALL_HNSW, bigann, write_parquet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is a test dependency (pip install 'ray>=2.9')")
    from retrieval.vectors.ray_shards import connect

    was = ray.is_initialized()
    yield connect(None, num_cpus=2)
    if not was:
        ray.shutdown()


def snapshot_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "snapshots" in p.parts and p.name != "manifest.json"}


@pytest.mark.parametrize("index", [SMALL_HNSW, {"type": "faiss", "factory": "IVF16,Flat"}])
def test_ray_build_equals_the_in_process_build(tmp_path, ray_local, index):
    xb = bigann(3000)[0]
    ids = (np.arange(len(xb)) * 5 + 3).astype(np.uint64)
    path = write_parquet(tmp_path / "b.parquet", ids, xb.astype(np.float32))
    spec = BuildSpec(input=str(path), collection="c", index=index, shards=2, block_size=600, train_sample=1000)
    ctx = LocalJobContext(tmp_path / "ctx", show_progress=False)
    local = build_folder(ctx, spec, tmp_path / "local", threads=1)
    remote = build_folder(ctx, spec, tmp_path / "ray", threads=1, use_ray=True)
    assert remote["ray"] and not local["ray"] and remote["points"] == local["points"] == 3000
    a, b = snapshot_files(tmp_path / "local" / "collection"), snapshot_files(tmp_path / "ray" / "collection")
    assert a and a == b  # same routing, same sample, same insertion order: the same index bytes


def test_errors_inside_ray_tasks_are_the_builders_errors(tmp_path, ray_local):
    xb = bigann(1200)[0].astype(np.float32)
    xb[1100, 3] = np.nan
    np.save(tmp_path / "b.npy", xb)
    spec = BuildSpec(input=str(tmp_path / "b.npy"), collection="c", index=SMALL_HNSW, shards=2, block_size=200)
    with pytest.raises(InvalidArgument, match=r"b\.npy' row 1100: the vector holds NaN"):
        build(LocalJobContext(tmp_path / "ctx", show_progress=False), spec, data_dir=tmp_path / "data",
              use_ray=True, threads=1)
    installed = tmp_path / "data" / "collections"
    assert not installed.exists() or not any(installed.iterdir())  # nothing installed
