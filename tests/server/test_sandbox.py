"""Files outside the allowed folders are never read (issue 11, item 2).

The open helper (:mod:`retrieval.server.sandbox`) on real files: symlinks at the end of a path, in a
folder listing and in the folders above a file (swapped in after the check), hard links, ``..``, pipes,
an allowed folder that is itself a symlink; the vector readers in confined mode; and, over a real
loopback server, ``build_index`` and ``build_datastore`` jobs whose input holds a link or is swapped for
one after ``Jobs.Start`` (made deterministic by queueing the job behind a running one), and
cross-encoder builds whose items file or model folder is swapped the same way (the model is loaded from
a :func:`~retrieval.server.sandbox.folder_view` of the checked files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from index_builder.readers import open_reader
from retrieval import errors
from retrieval.config import Settings
from retrieval.server import auth, sandbox

DIM = 8


def _arr(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, DIM), dtype=np.float32)


@pytest.fixture()
def tree(tmp_path):
    """``imports/`` (allowed) with a file and a folder input; ``outside/`` with a secret array."""
    imports, outside = tmp_path / "imports", tmp_path / "outside"
    (imports / "fold").mkdir(parents=True)
    outside.mkdir()
    np.save(imports / "x.npy", _arr(10, 1))
    np.save(imports / "fold" / "a.npy", _arr(10, 2))
    np.save(outside / "secret.npy", _arr(50, 3))
    (outside / "secret.txt").write_text("the secret")
    return {"imports": imports, "outside": outside, "allowed": [imports]}


# ------------------------------------------------------------------------------------------------
# the open helper
# ------------------------------------------------------------------------------------------------
def test_open_file_reads_an_allowed_file_and_refuses_outside(tree):
    with sandbox.open_file(tree["imports"] / "x.npy", tree["allowed"]) as f:
        assert np.array_equal(np.load(f), _arr(10, 1))
    with pytest.raises(errors.PermissionDenied, match=r"outside the folders clients may read from.*imports"):
        sandbox.open_file(tree["outside"] / "secret.npy", tree["allowed"])
    with pytest.raises(errors.NotFound, match="does not exist"):
        sandbox.open_file(tree["imports"] / "none.npy", tree["allowed"])
    with pytest.raises(errors.InvalidArgument, match="is a folder"):
        sandbox.open_file(tree["imports"] / "fold", tree["allowed"])
    with pytest.raises(errors.InvalidArgument, match="not a valid path"):
        sandbox.open_file("a\x00b", tree["allowed"])


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_symlink_at_the_end_is_refused(tree, target):
    link = tree["imports"] / "link.npy"
    link.symlink_to(tree["outside"] / "secret.npy" if target == "outside" else tree["imports"] / "x.npy")
    with pytest.raises(errors.PermissionDenied, match="link.npy' is a symbolic link"):
        sandbox.open_file(link, tree["allowed"])


def test_dotdot_components_are_refused(tree):
    for bad in (tree["imports"] / ".." / "outside" / "secret.npy", tree["imports"] / "fold" / ".." / "x.npy"):
        with pytest.raises(errors.InvalidArgument, match=r"contains '\.\.'"):
            sandbox.open_file(str(bad), tree["allowed"])
        with pytest.raises(errors.InvalidArgument, match=r"contains '\.\.'"):
            sandbox.open_dir(str(bad.parent), tree["allowed"])
    # the request-time gate resolves '..' and refuses what lands outside
    s = Settings(security={"client_file_dirs": [str(tree["imports"])]})
    with pytest.raises(errors.PermissionDenied, match="outside the folders"):
        auth.resolve_client_file(str(tree["imports"] / "fold" / ".." / ".." / "outside" / "secret.npy"), s, Path("/"))


def test_checked_then_swapped_for_a_symlink_then_opened_is_refused(tree):
    s = Settings(security={"client_file_dirs": [str(tree["imports"])]})
    path = auth.resolve_client_file(str(tree["imports"] / "x.npy"), s, Path("/"))  # the check passes
    os.replace(path, tree["imports"] / "x.old")
    path.symlink_to(tree["outside"] / "secret.npy")  # ... then the file is swapped
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        sandbox.open_file(path, auth.allowed_client_dirs(s, Path("/")))


def test_a_folder_above_the_file_swapped_for_a_symlink_is_refused(tree):
    sub = tree["imports"] / "sub"
    sub.mkdir()
    np.save(sub / "secret.npy", _arr(10, 4))
    path = sub / "secret.npy"
    with sandbox.open_file(path, tree["allowed"]):
        pass  # fine before the swap
    shutil.rmtree(sub)
    sub.symlink_to(tree["outside"])  # imports/sub/secret.npy is now outside/secret.npy
    with pytest.raises(errors.PermissionDenied, match=r"outside the folders.*really '.*outside/secret.npy'"):
        sandbox.open_file(path, tree["allowed"])


def test_hard_links_are_refused(tree):
    hard = tree["imports"] / "hard.npy"
    os.link(tree["outside"] / "secret.npy", hard)
    with pytest.raises(errors.PermissionDenied, match="2 hard links"):
        sandbox.open_file(hard, tree["allowed"])
    s = Settings(security={"client_file_dirs": [str(tree["imports"])]})
    with pytest.raises(errors.PermissionDenied, match="hard links"):
        auth.resolve_client_file(str(hard), s, Path("/"))
    os.link(tree["outside"] / "secret.npy", tree["imports"] / "fold" / "b.npy")
    with pytest.raises(errors.PermissionDenied, match="hard links"):
        open_reader(tree["imports"] / "fold", allowed_dirs=tree["allowed"])


def test_pipes_do_not_hang_and_are_refused(tree):
    os.mkfifo(tree["imports"] / "pipe.npy")
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        sandbox.open_file(tree["imports"] / "pipe.npy", tree["allowed"])


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_symlinks_in_a_folder_listing_are_refused(tree, target):
    fold = tree["imports"] / "fold"
    (fold / "b.npy").symlink_to(tree["outside"] / "secret.npy" if target == "outside" else tree["imports"] / "x.npy")
    with sandbox.open_dir(fold, tree["allowed"]) as d:
        with pytest.raises(errors.PermissionDenied, match=r"b.npy' in input folder .* is a symbolic link"):
            d.files([".npy"])
        assert d.files([".txt"]) == []  # links of other extensions are not selected, so not read
        with pytest.raises(errors.PermissionDenied, match="symbolic link"):
            d.open("b.npy")
        for bad in ("..", ".", "../x.npy", ""):
            with pytest.raises(errors.InvalidArgument, match="plain file name"):
                d.open(bad)
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        open_reader(fold, allowed_dirs=tree["allowed"])
    # the folder input itself as a link is refused too
    (tree["imports"] / "lfold").symlink_to(fold)
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        sandbox.open_dir(tree["imports"] / "lfold", tree["allowed"])


def test_a_folder_swapped_after_it_was_opened_is_still_read_from_the_opened_one(tree):
    fold = tree["imports"] / "fold"
    with sandbox.open_dir(fold, tree["allowed"]) as d:
        assert d.files([".npy"]) == ["a.npy"]
        os.replace(fold, tree["imports"] / "fold.old")
        o2 = tree["outside"].parent / "o2"
        shutil.copytree(tree["outside"], o2)
        os.replace(o2 / "secret.npy", o2 / "a.npy")
        fold.symlink_to(o2)
        with d.open("a.npy") as f:  # relative to the opened folder: the original file, not the outside one
            assert np.array_equal(np.load(f), _arr(10, 2))


def test_a_symlinked_allowed_folder_is_followed(tmp_path, tree):
    """The allowed folders are the operator's: one configured as a symlink is resolved, and files under
    its target are allowed (named through the link or not). Links below it are not followed."""
    alias = tmp_path / "alias"
    alias.symlink_to(tree["imports"])
    s = Settings(security={"client_file_dirs": [str(alias)]})
    dirs = auth.allowed_client_dirs(s, Path("/"))
    assert dirs == [tree["imports"].resolve()]
    for p in (alias / "x.npy", tree["imports"] / "x.npy"):
        with sandbox.open_file(p, [alias]) as f:
            assert np.array_equal(np.load(f), _arr(10, 1))
    assert auth.resolve_client_file("x.npy", s, Path("/")) == (tree["imports"] / "x.npy").resolve()
    (tree["imports"] / "link.npy").symlink_to(tree["outside"] / "secret.npy")
    with pytest.raises(errors.PermissionDenied):
        sandbox.open_file(alias / "link.npy", [alias])
    with pytest.raises(errors.PermissionDenied):
        auth.resolve_client_file("link.npy", s, Path("/"))


def test_folder_view_reads_the_checked_files_whatever_is_swapped_in_later(tree, tmp_path):
    """A model folder for a library that opens names: the view's entries lead to the opened files."""
    model = tree["imports"] / "model"
    model.mkdir()
    (model / "config.json").write_text('{"checked": true}')
    (model / "weights.bin").write_bytes(b"W" * 1000)
    (model / "sub").mkdir()  # subfolders are left out
    (tree["outside"] / "config.json").write_text('{"checked": false}')
    scratch = tmp_path / "scratch"
    with sandbox.folder_view(model, tree["allowed"], scratch, "model folder") as view:
        assert sorted(p.name for p in view.iterdir()) == ["config.json", "weights.bin"]
        os.replace(model / "config.json", model / "config.old")  # swapped after the check ...
        (model / "config.json").symlink_to(tree["outside"] / "config.json")
        os.replace(model, tree["imports"] / "model.old")  # ... and the folder too
        (tree["imports"] / "model").symlink_to(tree["outside"])
        assert (view / "config.json").read_text() == '{"checked": true}'  # what was checked is read
        assert (view / "weights.bin").read_bytes() == b"W" * 1000
    assert list(scratch.iterdir()) == []  # the view is removed on exit
    # the swapped folder is refused (a link), and so is one holding a link or a hard link
    with pytest.raises(errors.PermissionDenied, match="model folder .*model' is a symbolic link"), \
            sandbox.folder_view(tree["imports"] / "model", tree["allowed"], scratch, "model folder"):
        pass
    bad = tree["imports"] / "model.old"
    with pytest.raises(errors.PermissionDenied, match="config.json' in model folder .* is a symbolic link"):
        sandbox.check_dir(bad, tree["allowed"], "model folder")
    (bad / "config.json").unlink()
    os.link(tree["outside"] / "secret.txt", bad / "config.json")
    with pytest.raises(errors.PermissionDenied, match="2 hard links"), \
            sandbox.folder_view(bad, tree["allowed"], scratch, "model folder"):
        pass
    assert list(scratch.iterdir()) == []


def test_folder_view_without_proc_copies_from_the_descriptors(tree, tmp_path, monkeypatch):
    model = tree["imports"] / "model"
    model.mkdir()
    (model / "config.json").write_text("checked")
    monkeypatch.setattr(sandbox, "fd_path", lambda f: "/nonexistent/proc/fd")
    with sandbox.folder_view(model, tree["allowed"], tmp_path / "scratch") as view:
        os.replace(model / "config.json", model / "config.old")
        (model / "config.json").symlink_to(tree["outside"] / "secret.txt")
        assert not (view / "config.json").is_symlink() and (view / "config.json").read_text() == "checked"


def test_a_model_loads_through_its_view_not_a_folder_swapped_in_later(tree, tmp_path):
    """transformers opens files by name inside the folder it is given: the engine gives it the view, so
    a model folder replaced after the check is not what gets loaded."""
    pytest.importorskip("transformers")
    from retrieval.crossencoder.engine import CrossEncoderEngine
    from tests.crossencoder.conftest import make_tiny_hf_model

    model = make_tiny_hf_model(tree["imports"] / "tiny", seed=0)
    other = make_tiny_hf_model(tree["outside"] / "tiny", seed=1)
    engine = CrossEncoderEngine(tmp_path / "ce", allowed_dirs=lambda: tree["allowed"])
    spec = {"name": "hf", "model_dir": str(model), "device": "cpu"}
    sc = engine.scorer(spec)
    ref = sc.score(["what is a"], ["the answer"])
    assert sc.fingerprint().path == str(model) and not list((tmp_path / "ce" / "tmp").iterdir())
    # a view made, then the files swapped for links to another model's: the view still reads the first
    from retrieval.crossencoder.scorers import make_scorer

    with sandbox.folder_view(model, tree["allowed"], tmp_path / "scratch") as view:
        for f in list(model.iterdir()):
            os.replace(f, tmp_path / f"{f.name}.old")
            f.symlink_to(other / f.name)
        sc2 = make_scorer("hf", model_dir=str(view), device="cpu")
    assert np.array_equal(sc2.score(["what is a"], ["the answer"]), ref)
    assert sc2.fingerprint().key == sc.fingerprint().key
    # and a model folder whose files are links is refused by the engine, not loaded
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        CrossEncoderEngine(tmp_path / "ce2", allowed_dirs=lambda: tree["allowed"]).scorer(spec)


# ------------------------------------------------------------------------------------------------
# the vector readers, confined
# ------------------------------------------------------------------------------------------------
def test_confined_readers_read_the_opened_files(tree):
    from index_builder.readers import read_vectors
    from tests.index_builder.helpers import write_vecs

    write_vecs(tree["imports"] / "v.fvecs", _arr(7, 5), "<f4")
    with open_reader(tree["imports"] / "fold", allowed_dirs=tree["allowed"]) as r:
        assert r.count == 10 and np.array_equal(r.read_all().vectors, _arr(10, 2))
    assert np.array_equal(read_vectors(tree["imports"] / "v.fvecs", allowed_dirs=tree["allowed"]), _arr(7, 5))
    with open_reader(tree["imports"] / "x.npy", allowed_dirs=tree["allowed"]) as r:
        os.replace(tree["imports"] / "x.npy", tree["imports"] / "x.old")  # swapped after the open: no effect
        (tree["imports"] / "x.npy").symlink_to(tree["outside"] / "secret.npy")
        assert np.array_equal(r.read_all().vectors, _arr(10, 1))
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        open_reader(tree["imports"] / "x.npy", allowed_dirs=tree["allowed"])
    with pytest.raises(errors.PermissionDenied, match="outside"):
        open_reader(tree["outside"] / "secret.npy", allowed_dirs=tree["allowed"])


def test_confined_hdf5_and_parquet(tree):
    h5py = pytest.importorskip("h5py")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with h5py.File(tree["imports"] / "d.hdf5", "w") as f:
        f["train"] = _arr(12, 6)
    with open_reader(tree["imports"] / "d.hdf5", allowed_dirs=tree["allowed"], require=("train",)) as r:
        assert np.array_equal(r.read_all().vectors, _arr(12, 6))
    x = _arr(9, 7)
    pq.write_table(pa.table({"id": np.arange(9, dtype=np.uint64) + 5,
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM),
                             "tag": [f"t{i}" for i in range(9)]}), tree["imports"] / "p.parquet")
    with open_reader(tree["imports"] / "p.parquet", allowed_dirs=tree["allowed"]) as r:
        b = r.read_all()
        assert np.array_equal(b.vectors, x) and b.ids.tolist() == list(range(5, 14)) and b.payloads[3] == {"tag": "t3"}


def test_confined_datastore_inputs(tree, tmp_path):
    from retrieval.drafting.datastore import iter_documents

    (tree["imports"] / "t.ids").write_text("1 2 3\n4 5\n")
    (tree["outside"] / "s.ids").write_text("6 6 6\n")
    docs = list(iter_documents([str(tree["imports"] / "t.ids")], allowed_dirs=[str(tree["imports"])]))
    assert [d.tolist() for d in docs] == [[1, 2, 3], [4, 5]]
    os.replace(tree["imports"] / "t.ids", tree["imports"] / "t.old")
    (tree["imports"] / "t.ids").symlink_to(tree["outside"] / "s.ids")
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        list(iter_documents([str(tree["imports"] / "t.ids")], allowed_dirs=[str(tree["imports"])]))
    # without allowed_dirs (a local build) paths are read as given, links included
    assert [d.tolist() for d in iter_documents([str(tree["imports"] / "t.ids")])] == [[6, 6, 6]]


# ------------------------------------------------------------------------------------------------
# over a real server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from retrieval.client import Client
    from retrieval.server.process import ServerProcess

    tmp = tmp_path_factory.mktemp("sandbox")
    imports, outside = tmp / "imports", tmp / "outside"
    imports.mkdir()
    outside.mkdir()
    np.save(outside / "secret.npy", _arr(50, 3))
    (outside / "secret.ids").write_text("6 6 6 6 6 6\n")
    np.save(imports / "big.npy", np.random.default_rng(9).random((20000, 32), dtype=np.float32))
    srv = ServerProcess(tmp / "data", env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(imports)])})
    srv.start()
    try:
        with Client(srv.address, timeout=60) as c:
            yield {"client": c, "imports": imports, "outside": outside, "tmp": tmp}
    finally:
        srv.stop()


def _names(c) -> set[str]:
    return {x["name"] for x in c.list_collections()}


def test_job_with_a_symlink_in_its_folder_input_is_refused_and_imports_nothing(env):
    c = env["client"]
    fold = env["imports"] / "fold1"
    fold.mkdir()
    np.save(fold / "a.npy", _arr(10, 2))
    (fold / "b.npy").symlink_to(env["outside"] / "secret.npy")
    with pytest.raises(errors.PermissionDenied, match=r"b.npy' in input folder .* is a symbolic link"):
        c.start_job("build_index", input=str(fold), collection="fold1", format="npy", index="exact")
    # a client's own allowed_dirs in reader_options is overwritten by the server's folders
    with pytest.raises(errors.PermissionDenied, match="symbolic link"):
        c.start_job("build_index", input=str(fold), collection="fold1", format="npy", index="exact",
                    reader_options={"allowed_dirs": ["/"]})
    with pytest.raises(errors.InvalidArgument, match="unknown reader_options"):
        c.start_job("build_index", input=str(fold), collection="fold1", index="exact", reader_options={"format": 1})
    os.link(env["outside"] / "secret.npy", fold / "c.npy")
    (fold / "b.npy").unlink()
    with pytest.raises(errors.PermissionDenied, match="hard links"):
        c.start_job("build_index", input=str(fold), collection="fold1", format="npy", index="exact")
    with pytest.raises(errors.PermissionDenied, match="outside the folders"):
        c.start_job("build_index", input=str(env["imports"] / ".." / "outside" / "secret.npy"), collection="dd",
                    index="exact")
    assert "fold1" not in _names(c) and "dd" not in _names(c)
    (fold / "c.npy").unlink()
    job = c.start_job("build_index", input=str(fold), collection="fold1", format="npy", index="exact")
    final = c.wait_job(job["id"], timeout=120)
    assert final["state"] == "succeeded", final["error"]
    assert final["result"]["points"] == 10


def _behind_a_running_job(c, imports, start, swap):
    """Start a long job, queue ``start()`` behind it (one job runs at a time), ``swap()`` the files, then
    cancel the long one: the queued job opens its input only after the swap."""
    blocker = c.start_job("build_index", input=str(imports / "big.npy"), collection="blocker",
                          index={"type": "hnsw", "m": 32, "ef_construction": 400}, block_size=50, threads=1)
    for rec in c.watch_job(blocker["id"], timeout=120):
        if rec["state"] == "running":
            break
    job = start()
    assert job["state"] == "queued"
    swap()
    c.cancel_job(blocker["id"])
    assert c.wait_job(blocker["id"], timeout=120)["state"] == "cancelled"  # it ran until after the swap
    return c.wait_job(job["id"], timeout=120)


def test_build_index_input_swapped_for_a_symlink_after_start_is_not_read(env):
    c, imports = env["client"], env["imports"]
    np.save(imports / "swap.npy", _arr(10, 1))

    def swap():
        os.replace(imports / "swap.npy", imports / "swap.old")
        (imports / "swap.npy").symlink_to(env["outside"] / "secret.npy")

    final = _behind_a_running_job(
        c, imports, lambda: c.start_job("build_index", input=str(imports / "swap.npy"), collection="swapped",
                                        index="exact"), swap)
    assert final["state"] == "failed" and "swap.npy' is a symbolic link" in final["error"]
    assert "swapped" not in _names(c)


def test_build_datastore_input_swapped_for_a_symlink_after_start_is_not_read(env):
    c, imports = env["client"], env["imports"]
    (imports / "t.ids").write_text("1 2 3\n4 5\n")

    def swap():
        os.replace(imports / "t.ids", imports / "t.old")
        (imports / "t.ids").symlink_to(env["outside"] / "secret.ids")

    final = _behind_a_running_job(
        c, imports, lambda: c.build_datastore("ds", [str(imports / "t.ids")], vocab_size=7, wait=False), swap)
    assert final["state"] == "failed" and "t.ids' is a symbolic link" in final["error"]
    assert "ds" not in {d["name"] for d in c.list_datastores()}
    # the same build from a real file works
    os.replace(imports / "t.old", imports / "t2.ids")
    ok = c.build_datastore("ds", [str(imports / "t2.ids")], vocab_size=7)
    assert ok["state"] == "succeeded", ok["error"]
    assert ok["result"]["n_tokens"] == 5


@pytest.fixture(scope="module")
def ce_files(env):
    """A tiny HF cross-encoder and a JSONL items file under imports/ (the server may read them); the
    same names with other content (another model, other texts) under outside/."""
    pytest.importorskip("transformers")
    from tests.crossencoder.conftest import make_tiny_hf_model

    imports, outside = env["imports"], env["outside"]
    make_tiny_hf_model(outside / "model", seed=1)
    for folder, word in ((imports, "answer"), (outside, "secret")):
        (folder / "items.jsonl").write_text("".join(json.dumps({"id": i, "text": f"{word} {i}"}) + "\n"
                                                    for i in range(12)))
    return make_tiny_hf_model(imports / "model", seed=0), imports / "items.jsonl"


def _ce_start(c, name, model, items, wait=False):
    return lambda: c.build_ce_index(name, {"name": "hf", "model_dir": str(model), "device": "cpu"},
                                    items_path=str(items), anchor_queries=["what is a", "how to", "the good"],
                                    params={"k_i": 2, "chunk_size": 8}, wait=wait)


def test_crossencoder_items_file_swapped_for_a_symlink_after_start_is_not_read(env, ce_files):
    c, imports, outside = env["client"], env["imports"], env["outside"]
    model, items = ce_files

    def swap():
        os.replace(items, imports / "items.old")
        items.symlink_to(outside / "items.jsonl")

    final = _behind_a_running_job(c, imports, _ce_start(c, "ce-items", model, items), swap)
    assert final["state"] == "failed" and "items.jsonl' is a symbolic link" in final["error"], final
    assert "ce-items" not in {i["name"] for i in c.list_ce_indexes()}
    items.unlink()
    os.replace(imports / "items.old", items)


def test_crossencoder_model_folder_swapped_for_a_symlink_after_start_is_not_loaded(env, ce_files):
    c, imports, outside = env["client"], env["imports"], env["outside"]
    model, items = ce_files
    # links inside the model folder are refused at the start already
    (model / "tokenizer.json").rename(imports / "tokenizer.json")
    (model / "tokenizer.json").symlink_to(imports / "tokenizer.json")
    with pytest.raises(errors.PermissionDenied, match="tokenizer.json' in scorer model directory .* is a symbolic link"):
        _ce_start(c, "ce-model", model, items)()
    (model / "tokenizer.json").unlink()
    (imports / "tokenizer.json").rename(model / "tokenizer.json")

    def swap():
        os.replace(model, imports / "model.old")
        model.symlink_to(outside / "model")

    final = _behind_a_running_job(c, imports, _ce_start(c, "ce-model", model, items), swap)
    assert final["state"] == "failed" and "model' is a symbolic link" in final["error"], final
    assert "ce-model" not in {i["name"] for i in c.list_ce_indexes()}
    # the same build from the real folder works: the job loads the model from its checked view
    model.unlink()
    os.replace(imports / "model.old", model)
    ok = _ce_start(c, "ce-model", model, items, wait=True)()
    assert ok["state"] == "succeeded", ok["error"]
    d = c.describe_ce_index("ce-model")
    assert d["n_items"] == 12 and d["scorer"]["fingerprint"]["path"] == str(model.resolve())
