"""Pushing builds into a running server: the Collections.Import RPC (atomic replace, validation of the
folder and its path), the build_index job (progress, cancellation), and the command lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from index_builder.build import BuildSpec, build, build_folder
from retrieval.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from retrieval.jobs import LocalJobContext
from tests.index_builder.helpers import SMALL_HNSW, bigann, exact, id_recall, write_vecs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A server whose clients may name files under ``imports/``; the data; a client."""
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    tmp = tmp_path_factory.mktemp("import")
    imports = tmp / "imports"
    imports.mkdir()
    xb8, xq8 = bigann(4000)
    xb, xq = xb8.astype(np.float32), xq8.astype(np.float32)
    np.save(imports / "a.npy", xb[:2000])
    np.save(imports / "b.npy", xb)
    write_vecs(imports / "b.fvecs", xb, "<f4")
    srv = ServerProcess(tmp / "data", env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(imports)])})
    srv.start()
    try:
        with Client(srv.address, timeout=60) as c:
            yield {"client": c, "server": srv, "imports": imports, "tmp": tmp, "xb": xb, "xq": xq}
    finally:
        srv.stop()


def _ctx(tmp: Path) -> LocalJobContext:
    return LocalJobContext(tmp / "ctx", show_progress=False)


def _built(env, name: str, src: str, shards: int = 1, index=SMALL_HNSW) -> Path:
    """A collection folder built under imports/ (where the server may read it)."""
    work = env["imports"] / f"w-{name}"
    build_folder(_ctx(env["tmp"]), BuildSpec(input=str(env["imports"] / src), collection=name, index=index,
                                             shards=shards, block_size=500), work, threads=1)
    return work / "collection"


def _check(env, name: str, n: int) -> None:
    c = env["client"]
    info = c.describe_collection(name)
    assert info["points"] == n and info["pending"] == 0
    D, I = c.search_batch(name, env["xq"], k=10, ef=64)
    assert id_recall(I, exact(env["xq"], env["xb"][:n], 10)[1]) >= 0.95


def test_push_outside_the_allowed_folders_fails_before_the_build(env):
    """--push asks the server first (Import with check_only): a work folder it may not read is refused
    with the setting to change, before the build starts (it would create the work folder); nothing is
    created on either side."""
    c = env["client"]
    outside = env["tmp"] / "elsewhere"
    with pytest.raises(PermissionDenied, match="client_file_dirs"):
        build(_ctx(env["tmp"]), BuildSpec(input=str(env["imports"] / "a.npy"), collection="never", index=SMALL_HNSW),
              push=c.address, work_dir=outside, threads=1)
    assert not outside.exists()
    assert "never" not in [x.name for x in c.list_collections()]
    # the check itself: allowed and free passes without the folder existing; a taken name does not
    assert c.import_collection("fresh", str(env["imports"] / "not-yet"), check_only=True).name == "fresh"
    assert not (env["imports"] / "not-yet").exists() and "fresh" not in [x.name for x in c.list_collections()]


def test_push_then_replace_while_searching(env):
    c = env["client"]
    out = build(_ctx(env["tmp"]), BuildSpec(input=str(env["imports"] / "a.npy"), collection="pushed",
                                            index=SMALL_HNSW, shards=2, block_size=500),
                push=c.address, work_dir=env["imports"] / "w-pushed", threads=1)
    assert out["server"]["points"] == 2000 and out["server"]["shards"] == 2
    assert not (env["imports"] / "w-pushed").exists()  # the work folder is removed once imported
    _check(env, "pushed", 2000)
    with pytest.raises(AlreadyExists):
        c.import_collection("pushed", str(_built(env, "other", "b.npy")))
    # the old version answers every search until the new one takes over
    errors: list[Exception] = []
    sizes: list[int] = []
    stop = threading.Event()

    def searcher():
        from retrieval.client import Client

        with Client(c.address, timeout=30) as c2:
            while not stop.is_set():
                try:
                    sizes.append(c2.count("pushed"))
                    c2.search_batch("pushed", env["xq"][:5], k=5)
                except Exception as e:  # noqa: BLE001 - collected and asserted empty
                    errors.append(e)

    t = threading.Thread(target=searcher)
    t.start()
    try:
        info = c.import_collection("pushed", str(env["imports"] / "w-other" / "collection"), replace=True)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert info["points"] == 4000 and sizes[0] == 2000 and set(sizes) <= {2000, 4000}
    _check(env, "pushed", 4000)
    # the import copied the folder: the source is left as it was
    assert (env["imports"] / "w-other" / "collection" / "collection.json").exists()


def _assert_unchanged(env, before):
    c = env["client"]
    D, I = c.search_batch("pushed", env["xq"], k=10, ef=64)
    np.testing.assert_array_equal(I, before)
    names = sorted(p.name for p in (env["tmp"] / "data" / "collections").iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no staging leftovers


def _copy(env, src: Path, name: str) -> Path:
    dst = env["imports"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_bad_folders_are_refused_and_change_nothing(env):
    c = env["client"]
    good = env["imports"] / "w-other" / "collection"
    if not good.exists():
        good = _built(env, "other", "b.npy")
    if "pushed" not in [x["name"] for x in c.list_collections()]:
        c.import_collection("pushed", str(good))
    before = c.search_batch("pushed", env["xq"], k=10, ef=64)[1]

    # a symbolic link inside the folder
    bad = _copy(env, good, "bad-link")
    os.symlink("/etc/passwd", bad / "shard-0" / "snapshots" / "evil")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        c.import_collection("pushed", str(bad), replace=True)
    # a snapshot file that does not match its checksum
    bad = _copy(env, good, "bad-sum")
    f = next((bad / "shard-0" / "snapshots").iterdir()) / "hnsw.bin"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(InvalidArgument, match="does not match its checksum"):
        c.import_collection("pushed", str(bad), replace=True)
    # a config whose dimension disagrees with the snapshot and the point store
    bad = _copy(env, good, "bad-dim")
    cfg = json.loads((bad / "collection.json").read_text())
    cfg["dimension"] = 64
    (bad / "collection.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument, match="dimension"):
        c.import_collection("pushed", str(bad), replace=True)
    # a folder that is not a collection
    with pytest.raises(InvalidArgument, match="has no collection.json"):
        c.import_collection("pushed", str(env["imports"]), replace=True)
    # paths: '..', outside the allowed folders, missing, a link out of them
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'"):
        c.import_collection("pushed", str(env["imports"] / ".." / "imports" / "w-other" / "collection"), replace=True)
    with pytest.raises(PermissionDenied, match="outside the folders"):
        c.import_collection("pushed", str(env["tmp"] / "data" / "collections"), replace=True)
    with pytest.raises(NotFound):
        c.import_collection("pushed", str(env["imports"] / "nothing-here"), replace=True)
    os.symlink(env["tmp"] / "data", env["imports"] / "escape")
    with pytest.raises(PermissionDenied):
        c.import_collection("pushed", str(env["imports"] / "escape" / "collections"), replace=True)
    with pytest.raises(InvalidArgument, match="not valid"):
        c.import_collection("bad/name", str(good))
    _assert_unchanged(env, before)


def test_hard_linked_files_in_an_imported_folder_are_refused(env):
    """A hard link is another name of a file that may lie outside the allowed folders (here: a point
    store kept outside): the import refuses it, copied or moved, and changes nothing."""
    c = env["client"]
    good = env["imports"] / "w-other" / "collection"
    if not good.exists():
        good = _built(env, "other", "b.npy")
    if "pushed" not in [x["name"] for x in c.list_collections()]:
        c.import_collection("pushed", str(good))
    before = c.search_batch("pushed", env["xq"], k=10, ef=64)[1]
    bad = _copy(env, good, "bad-hardlink")
    outside = env["tmp"] / "outside-points.sqlite"
    shutil.copyfile(bad / "shard-0" / "points.sqlite", outside)
    (bad / "shard-0" / "points.sqlite").unlink()
    os.link(outside, bad / "shard-0" / "points.sqlite")
    with pytest.raises(InvalidArgument, match=r"points.sqlite' has 2 hard links"):
        c.import_collection("pushed", str(bad), replace=True)
    with pytest.raises(InvalidArgument, match="hard links"):
        c.import_collection("hardlinked", str(bad))
    assert "hardlinked" not in [x["name"] for x in c.list_collections()]
    _assert_unchanged(env, before)


def test_the_copy_checks_each_file_as_it_reads_it(tmp_path):
    """Entries swapped for a link or a hard link after the tree was checked are refused by the copy."""
    from retrieval.vectors import importing

    src = tmp_path / "src"
    (src / "shard-0").mkdir(parents=True)
    (src / "collection.json").write_text("{}")
    (src / "shard-0" / "points.sqlite").write_bytes(b"p" * 100)
    importing._check_tree(src)
    importing._copy_tree(src, tmp_path / "ok")
    assert (tmp_path / "ok" / "shard-0" / "points.sqlite").read_bytes() == b"p" * 100
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 100)
    for i, swap in enumerate((lambda p: os.link(secret, p), lambda p: p.symlink_to(secret))):
        (src / "shard-0" / "points.sqlite").unlink()
        swap(src / "shard-0" / "points.sqlite")
        with pytest.raises(InvalidArgument, match="hard links|symbolic link"):
            importing._check_tree(src)
        with pytest.raises(InvalidArgument, match="hard links|symbolic link"):
            importing._copy_tree(src, tmp_path / f"copy-{i}")
    (src / "shard-0" / "points.sqlite").unlink()
    shutil.move(src / "shard-0", tmp_path / "shard-real")
    (src / "shard-0").symlink_to(tmp_path / "shard-real")  # a folder swapped for a link
    with pytest.raises(InvalidArgument, match="symbolic link"):
        importing._copy_tree(src, tmp_path / "copy-dir")


def test_build_index_job(env):
    c = env["client"]
    kinds = {k["name"]: k for k in c.job_kinds()}
    assert kinds["build_index"]["resumable"]
    job = c.start_job("build_index", input=str(env["imports"] / "b.fvecs"), collection="from_job",
                      index=SMALL_HNSW, shards=2, block_size=400, threads=1)
    assert job["state"] in ("queued", "running")
    seen = [j for j in c.watch_job(job["id"], timeout=300)]
    final = seen[-1]
    assert final["state"] == "succeeded", final["error"]
    assert final["result"]["points"] == 4000 and final["result"]["collection"]["points"] == 4000
    assert any(0 < j["done"] < 4000 for j in seen if j["message"] == "indexing")  # progress in points
    _check(env, "from_job", 4000)
    # refused at start: unknown parameters, a file outside the allowed folders, an existing collection
    with pytest.raises(InvalidArgument, match="unknown build_index parameters"):
        c.start_job("build_index", input=str(env["imports"] / "b.fvecs"), collection="x", colour="red")
    with pytest.raises(PermissionDenied):
        c.start_job("build_index", input="/etc/hostname", collection="x")
    with pytest.raises(AlreadyExists):
        c.start_job("build_index", input=str(env["imports"] / "b.fvecs"), collection="from_job")
    with pytest.raises(NotFound):
        c.start_job("build_index", input=str(env["imports"] / "none.fvecs"), collection="x")


def test_build_index_job_cancel(env):
    c = env["client"]
    job = c.start_job("build_index", input=str(env["imports"] / "b.npy"), collection="cancelled",
                      index={"type": "hnsw", "m": 32, "ef_construction": 400}, block_size=50, threads=1)
    for rec in c.watch_job(job["id"], timeout=120):
        if rec["state"] == "running" and rec["done"] > 0:
            c.cancel_job(job["id"])
            break
    final = c.wait_job(job["id"], timeout=120)
    assert final["state"] == "cancelled"
    assert "cancelled" not in [x["name"] for x in c.list_collections()]


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_command_lines(env, tmp_path):
    from typer.testing import CliRunner

    from index_builder.cli import app as builder_app
    from retrieval.cli import app as retrieval_app

    xb, xq = env["xb"][:1500], env["xq"][:20]
    write_vecs(tmp_path / "b.fvecs", xb, "<f4")
    write_vecs(tmp_path / "q.fvecs", xq, "<f4")
    r = _run("-m", "index_builder", "build", "-i", str(tmp_path / "b.fvecs"), "-c", "cli", "--shards", "2",
             "--index", json.dumps(SMALL_HNSW), "--data-dir", str(tmp_path / "data"), "--threads", "1", "-q")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["points"] == 1500 and Path(out["installed"]).parent == tmp_path / "data" / "collections"
    runner = CliRunner()
    r = runner.invoke(builder_app, ["ground-truth", "--base", str(tmp_path / "b.fvecs"), "--queries",
                                    str(tmp_path / "q.fvecs"), "--out", str(tmp_path / "gt.npy"), "--k", "10", "-q"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "gt.npy"), exact(xq, xb, 10)[1])
    # `retrieval build` is the same command; bad input exits 1 naming the file and the row
    bad = xb.copy()
    bad[42, 0] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    r = runner.invoke(retrieval_app, ["build", "-i", str(tmp_path / "bad.npy"), "-c", "cli", "--data-dir",
                                      str(tmp_path / "data"), "--replace", "-q"])
    assert r.exit_code == 1
    assert f"'{tmp_path / 'bad.npy'}' row 42: the vector holds infinity" in " ".join(r.output.split())
    r = runner.invoke(builder_app, ["build", "-i", str(tmp_path / "b.fvecs"), "-c", "cli", "-q"])
    assert r.exit_code == 1 and "exactly one of --data-dir" in r.output
