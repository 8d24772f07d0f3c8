"""Index specs are validated before they are stored (issue 11, item 1): a spec that would abort the
process (faiss assertions, segfaults) or break every search is refused with INVALID_ARGUMENT and the
library's message, at every door (Create, RunFastRP, Jobs.Start, index_builder), and the server keeps
serving. Unit tests of :mod:`retrieval.indexes.validate`, then the same over a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from retrieval.errors import InvalidArgument
from retrieval.indexes import registry, validate
from retrieval.indexes.base import ExactSpec, FaissSpec, HnswSpec

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Static checks: refused before any child process
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, d, match", [
    ("HNSW0", 16, r"HNSW0: M \(links per node\) must be in \[2, 256\]"),
    ("HNSW0,Flat", 16, r"HNSW0: M"),
    ("HNSW1", 16, r"HNSW1: M"),
    ("HNSW100000", 16, r"HNSW100000: M"),
    ("IVF0,Flat", 16, "IVF needs at least 1 list, got 0"),
    ("PCA0,Flat", 16, "PCA0: a transform to 0 dimensions"),
    ("OPQ4_0,IVF4,PQ4", 16, "OPQ4_0: a transform to 0 dimensions"),
    ("IVF1000000000,Flat", 16, "the number 1000000000 is too large"),
    ("IVF1048576,Flat", 1024, r"1048576 IVF centroids of dimension 1024 need 4.0 GiB"),
    ("IVF100000,Flat", 256, r"training would collect 3900000 points of dimension 256"),
    ("IVF16,PQ4x0", 16, "0 bits per code"),
    ("IVF16,PQ4x30", 16, "30 bits per code"),
    ("PQ0", 16, "the number of sub-quantizers must be >= 1"),
    ("PQ32", 16, "32 sub-quantizers for dimension 16"),
    ("IMI2x14,Flat", 16, r"IMI2x14: bits must be in \[1, 10\]"),
    ("NSG0,Flat", 16, r"NSG0: R"),
])
def test_static_refusals_name_the_problem(factory, d, match):
    validate.clear_cache()
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument, match=match) as e:
        validate.check_spec(FaissSpec(factory), d, "l2")
    assert repr(factory) in str(e.value)
    assert time.perf_counter() - t0 < 1.0 and not validate._cache  # no trial process was needed


def test_train_size_below_what_faiss_needs_is_refused_and_never_used():
    from retrieval.indexes.faiss_index import FaissIndex

    with pytest.raises(InvalidArgument, match="train_size 10 is below the 64 points faiss needs"):
        validate.check_spec(FaissSpec("IVF64,Flat", train_size=10), 8)
    with pytest.raises(InvalidArgument, match="train_size 100 is below the 256 points"):
        validate.check_spec(FaissSpec("IVF16,PQ4", train_size=100), 8)
    # a spec stored before this check: the backend waits for enough points rather than failing to train
    assert FaissIndex(8, "l2", FaissSpec("IVF64,Flat", train_size=10)).train_size() == 64
    with pytest.raises(InvalidArgument, match="train_size 1000000000 is above the limit"):
        validate.check_spec(FaissSpec("IVF64,Flat", train_size=10**9), 8)


def test_hnsw_and_exact_ranges_and_types():
    for bad, match in [({"m": 0}, r"hnsw m must be in \[2, 256\], got 0"), ({"m": -3}, "got -3"),
                       ({"m": 10**9}, "got 1000000000"), ({"ef_construction": 0}, "ef_construction must be in"),
                       ({"ef_construction": 10**7}, "ef_construction must be in"),
                       ({"m": 16.5}, "hnsw m must be an integer, got 16.5"), ({"m": True}, "must be an integer"),
                       ({"m": "16"}, "must be an integer")]:
        with pytest.raises(InvalidArgument, match=match):
            registry.spec_from_dict({"type": "hnsw", **bad})
    for bad, match in [({"factory": 5}, "factory must be a string"), ({"train_size": 1.5}, "must be an integer"),
                       ({"ef_construction": -1}, ">= 0")]:
        with pytest.raises(InvalidArgument, match=match):
            registry.spec_from_dict({"type": "faiss", **bad})
    registry.validate(HnswSpec(m=np.int64(8), ef_construction=40), 8)  # numpy integers are integers
    registry.validate(ExactSpec(), 8, "cosine")
    with pytest.raises(InvalidArgument, match="unknown metric"):
        registry.validate(ExactSpec(), 8, "hamming")
    with pytest.raises(InvalidArgument, match="dimension must be in"):
        registry.validate(HnswSpec(), 0)
    with pytest.raises(InvalidArgument, match="ef_construction 20000 is above the limit"):
        registry.validate(FaissSpec("HNSW32", ef_construction=20000), 8)


def test_min_train_points_and_probe_scaling():
    assert validate.min_train_points("Flat") == 0 and validate.min_train_points("HNSW32") == 0
    assert validate.min_train_points("IVF1024,Flat") == 1024
    assert validate.min_train_points("IVF16,PQ8") == 256 and validate.min_train_points("IVF16,PQ8x10") == 1024
    assert validate.min_train_points("OPQ4_16,IVF16,PQ4x4") == 256  # OPQ trains 8-bit codes
    assert validate.min_train_points("IMI2x6,Flat") == 64
    assert validate.probe_factory("IVF65536_HNSW32,PQ8x12") == "IVF256_HNSW32,PQ8x10"
    assert validate.probe_factory("OPQ16_64,IVF4096,PQ16") == "OPQ16_64,IVF256,PQ16"
    assert validate.probe_factory("IVF0,Flat") == "IVF0,Flat" and validate.probe_factory("HNSW0") == "HNSW0"


# ------------------------------------------------------------------------------------------------
# The trial child: crashes and errors become messages
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, match", [
    ("HNSW0", r"fails when adding: the faiss library crashed the process \(SIGABRT\): "
              r"faiss assertion 'i < end' failed at HNSW.cpp"),
    ("HNSW1", r"fails when adding: the faiss library crashed the process \(SIGSEGV\)"),
    ("IVF16,PQ4x0", r"the faiss library crashed the process \(SIG"),
    ("IVF0,Flat", r"fails when searching: Error: 'cur_nprobe > 0' failed"),
])
def test_trial_reports_the_crash_of_specs_the_static_check_also_refuses(factory, match):
    """The child is the safety net for what no rule foresees: these crash faiss in the child, and the
    parent stays alive and reports it."""
    err, cache = validate._trial(factory, 0, 16, "l2")
    assert cache and err is not None
    assert err.startswith(f"faiss factory string {factory!r}")
    assert re.search(match, err), err


@pytest.mark.parametrize("factory, match", [
    ("Foo12", "faiss cannot build factory string 'Foo12': could not parse index string Foo12"),
    ("IVF16,PQ3", "faiss cannot build factory string 'IVF16,PQ3': .*multiple of the number of subquantizers"),
    ("IDMap,Flat", "fails when adding: add does not make sense with IndexIDMap"),
    ("LSH", "fails when searching with a filter: .*search params not supported"),
    ("PCA200,Flat", "fails when training: .*PCA matrix cannot output 200 dimensions from 16"),
])
def test_library_errors_become_invalid_argument(factory, match):
    with pytest.raises(InvalidArgument, match=match):
        validate.check_spec(FaissSpec(factory), 16, "l2")


@pytest.mark.slow
def test_valid_specs_pass_and_answers_are_cached():
    validate.clear_cache()
    for factory, metric in [("HNSW32", "l2"), ("IVF16,Flat", "ip"), ("IVF16,PQ4", "cosine"), ("IVF16,PQ4x4fs", "l2"),
                            ("OPQ4,IVF16,PQ4", "l2"), ("IVF65536_HNSW32,Flat", "l2"), ("IMI2x8,Flat", "l2"),
                            ("HNSW16,SQ8", "l2"), ("Flat", "l2"), ("HNSW2", "l2")]:
        t0 = time.perf_counter()
        validate.check_spec(FaissSpec(factory), 16, metric)
        assert time.perf_counter() - t0 < 30, factory  # the trial is scaled: seconds at most, whatever the spec
        assert (factory, 0, 16, "l2" if metric == "l2" else "ip") in validate._cache
    t0 = time.perf_counter()
    for _ in range(50):
        validate.check_spec(FaissSpec("IVF16,PQ4"), 16, "ip")
        with pytest.raises(InvalidArgument, match="search params not supported"):
            validate.check_spec(FaissSpec("LSH"), 16, "l2")  # a failure is cached too
    assert time.perf_counter() - t0 < 1.0


def test_opq_ivfpq_trains_without_polysemous_training():
    """OPQ in front of an IVFPQ hid the IVFPQ from the switch that turns polysemous training off
    (a 256-point training took 15 s; the service's full-size one, minutes)."""
    from retrieval.indexes.faiss_index import FaissIndex

    idx = FaissIndex(16, "l2", FaissSpec("OPQ4,IVF16,PQ4"), threads=1)
    x = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    t0 = time.perf_counter()
    idx.train(x)
    assert idx.is_trained() and time.perf_counter() - t0 < 5.0


# ------------------------------------------------------------------------------------------------
# Over a real server
# ------------------------------------------------------------------------------------------------
BAD_CREATES = [
    ({"type": "faiss", "factory": "HNSW0"}, "HNSW0: M"),
    ({"type": "faiss", "factory": "HNSW0,Flat"}, "HNSW0: M"),
    ({"type": "faiss", "factory": "IVF0,Flat"}, "IVF needs at least 1 list"),
    ({"type": "faiss", "factory": "IVF1000000000,Flat"}, "too large"),
    ({"type": "faiss", "factory": "IVF1048576,Flat"}, "training would collect 40894464 points"),
    ({"type": "faiss", "factory": "Foo12"}, "could not parse index string Foo12"),
    ({"type": "faiss", "factory": "IVF16,PQ4x40"}, "40 bits per code"),
    ({"type": "faiss", "factory": "LSH"}, "search params not supported"),
]


def _alive(server, client):
    assert server.proc.poll() is None, server.log_tail()
    name = f"ok-{time.monotonic_ns()}"
    client.create_collection(name, dimension=16, metric="l2", index={"type": "faiss", "factory": "IVF4,Flat"})
    x = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    client.upsert(name, np.arange(300), x)
    deadline = time.monotonic() + 60
    while client.describe_collection(name)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    for i in range(3):
        assert client.search(name, x[i], k=1).ids.tolist() == [i]
    client.drop_collection(name)


@pytest.mark.parametrize("index, match", BAD_CREATES)
def test_create_refuses_a_spec_that_would_break_the_server(server, client, index, match):
    name = "bad-" + index["factory"].lower().replace(",", "-")
    with pytest.raises(InvalidArgument, match=match):
        client.create_collection(name, dimension=16, metric="l2", index=index)
    assert name not in [c["name"] for c in client.list_collections()]
    assert not (server.data_dir / "collections" / name).exists()
    _alive(server, client)


def test_create_with_hnsw_m_out_of_range_over_raw_grpc(server, client):
    from retrieval.v1 import collections_pb2, collections_pb2_grpc, common_pb2

    with grpc.insecure_channel(server.address) as ch:
        stub = collections_pb2_grpc.CollectionsStub(ch)
        for m in (1, 100000):
            req = collections_pb2.CreateCollectionRequest(
                name="bad-hnsw", dimension=8, metric="l2", index=common_pb2.IndexSpec(hnsw=common_pb2.HnswSpec(m=m)))
            with pytest.raises(grpc.RpcError) as e:
                stub.Create(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"hnsw m must be in [2, 256], got {m}" in e.value.details()
    # m=0 is proto3's "unset" (the default, 16) on the wire; the client refuses an explicit 0 itself
    with pytest.raises(InvalidArgument, match=r"hnsw m must be in \[2, 256\], got 0"):
        client.create_collection("bad-hnsw", dimension=8, index={"type": "hnsw", "m": 0})
    _alive(server, client)


@pytest.fixture(scope="module")
def graph(client):
    client.create_graph("vg", 40)
    rng = np.random.default_rng(0)
    client.append_edges("vg", rng.integers(0, 40, 120), rng.integers(0, 40, 120))
    return "vg"


def test_run_fastrp_refuses_a_bad_index_before_any_job(server, client, graph):
    before = {j["id"] for j in client.list_jobs(kind="fastrp")}
    for index, match in [({"type": "faiss", "factory": "HNSW0"}, "HNSW0: M"),
                         ({"type": "faiss", "factory": "IVF0,Flat"}, "IVF needs at least 1 list"),
                         ({"type": "faiss", "factory": "Foo12"}, "could not parse index string Foo12")]:
        with pytest.raises(InvalidArgument, match=match):
            client.run_fastrp(graph, dim=16, index=index)
        # the generic Jobs.Start door checks the same
        with pytest.raises(InvalidArgument, match=match):
            client.start_job("fastrp", graph=graph, params={"dim": 16}, index=index)
    assert {j["id"] for j in client.list_jobs(kind="fastrp")} == before
    job = client.run_fastrp(graph, dim=16, index={"type": "faiss", "factory": "HNSW16"})
    assert job["state"] == "succeeded", job
    _alive(server, client)


def test_build_index_job_refuses_a_bad_index(server, client, tmp_path):
    np.save(tmp_path / "b.npy", np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32))
    before = {j["id"] for j in client.list_jobs(kind="build_index")}
    with pytest.raises(InvalidArgument, match="HNSW0: M"):
        client.start_job("build_index", input=str(tmp_path / "b.npy"), collection="bad-build",
                         index={"type": "faiss", "factory": "HNSW0"})
    assert {j["id"] for j in client.list_jobs(kind="build_index")} == before


# ------------------------------------------------------------------------------------------------
# index_builder: refused before building; no folder left in the system temp folder
# ------------------------------------------------------------------------------------------------
def _builder(tmp_path, index, name):
    tmpdir = tmp_path / "systmp"
    tmpdir.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "index_builder", "build", "-i", str(tmp_path / "b.npy"), "-c", name,
                        "--index", json.dumps(index), "--data-dir", str(tmp_path / "data"), "--threads", "1", "-q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)})
    return r, sorted(p.name for p in tmpdir.iterdir())


@pytest.mark.slow
def test_index_builder_refuses_a_crashing_spec_and_leaves_no_temp_folder(tmp_path):
    np.save(tmp_path / "b.npy", np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    r, left = _builder(tmp_path, {"type": "faiss", "factory": "HNSW0"}, "crashy")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # it used to die of SIGABRT (-6)
    assert "HNSW0: M (links per node) must be in [2, 256]" in " ".join((r.stdout + r.stderr).split())
    assert not [n for n in left if n.startswith("index_builder-")], left
    r, left = _builder(tmp_path, {"type": "faiss", "factory": "IVF4,Flat"}, "fine")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["points"] == 300
    assert not [n for n in left if n.startswith("index_builder-")], left
    assert not (tmp_path / "data" / "builds").exists()  # the work folder (and its context folder) are gone


def test_scratch_dir_lives_in_the_work_folder(tmp_path):
    from index_builder.build import default_work_dir, remove_scratch, scratch_dir

    s = scratch_dir("col", tmp_path / "data")
    assert s.parent == default_work_dir("col", tmp_path / "data") == tmp_path / "data" / "builds" / "col"
    s2 = scratch_dir("col", None, tmp_path / "w")
    assert s2.parent == tmp_path / "w"
    remove_scratch(s)
    assert list((tmp_path / "data").iterdir()) == []  # the empty work folder and builds/ went with it
    (s2.parent / "keep").write_text("x")
    remove_scratch(s2)
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["keep"]
    with pytest.raises(InvalidArgument):
        scratch_dir("../escape", tmp_path / "data")
