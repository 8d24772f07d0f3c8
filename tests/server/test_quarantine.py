"""Start-up survives a collection (or job) whose open killed the server: it is quarantined, reported
with the reason, and can be repaired or dropped; the other collections serve meanwhile.

The server records a fatal error (a native abort) in ``<data>/.fatal-error`` (:mod:`retrieval.crashes`)
and marks a collection folder with ``.opening`` while it is opened and its replayed writes are indexed.
Some tests plant those files (a death simulated exactly as the server leaves it); one makes faiss abort
for real, with an index spec written straight into collection.json.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval import errors
from retrieval.cli import app, server_status
from retrieval.client import Client
from retrieval.server.process import ServerProcess

pytestmark = pytest.mark.slow

D = 8
ENV = {"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "1000000", "RETRIEVAL_INDEXING__SNAPSHOT_INTERVAL_S": "3600"}

# what faulthandler writes when faiss aborts in the indexer (the event-loop thread)
ABORT_IN_INDEXER = """Fatal Python error: Aborted

Current thread 0x00007f0000000001 (most recent call first):
  File "/x/retrieval/indexes/faiss_index.py", line 80 in add
  File "/x/retrieval/vectors/shard.py", line 463 in _index_pending
  File "/x/retrieval/vectors/shard.py", line 423 in _indexer

Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait
"""
ABORT_IN_JOB = """Fatal Python error: Aborted

Thread 0x00007f0000000001 (most recent call first):
  File "/x/retrieval/server/app.py", line 200 in serve

Current thread 0x00007f0000000002 (most recent call first):
  File "/x/retrieval/graph/fastrp.py", line 50 in fastrp
  File "/x/retrieval/jobs/manager.py", line 182 in <lambda>
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58 in run
"""


def _points(c: Client, name: str, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, D), dtype=np.float32)
    c.upsert(name, np.arange(n), x, [{"i": i} for i in range(n)])
    return x


def _check_points(c: Client, name: str, x: np.ndarray) -> None:
    assert c.count(name) == len(x)
    got = c.get(name, np.arange(len(x)), with_vectors=True, with_payloads=True)
    assert got.ids.tolist() == list(range(len(x))) and np.array_equal(got.vectors, x)
    assert [p["i"] for p in got.payloads] == list(range(len(x)))
    assert c.search(name, x[7], k=1).ids.tolist() == [7]


def _plant_marker(data: Path, name: str, deaths: int = 0) -> None:
    (data / "collections" / name / ".opening").write_text(json.dumps({"deaths": deaths, "pid": 1, "at": 0}))


def test_collection_whose_open_died_is_quarantined_repaired_and_dropped(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    srv = ServerProcess(data, env=ENV, log_path=log)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        c.create_collection("good", D, index="exact")
        c.create_collection("bad", D, index="hnsw")
        c.create_collection("worse", D, index="hnsw")
        xg, xb = _points(c, "good", 50, 0), _points(c, "bad", 60, 1)
        _points(c, "worse", 10, 2)
    assert srv.stop() == 0
    assert not (data / "collections" / "good" / ".opening").exists(), "a clean stop leaves no marker"

    # the last start died of a native abort while "bad" and "worse" were being opened
    _plant_marker(data, "bad")
    _plant_marker(data, "worse")
    (data / ".fatal-error").write_text(ABORT_IN_INDEXER)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        _check_points(c, "good", xg)  # the others serve
        info = c.describe_collection("bad")
        assert info["state"] == "quarantined"
        assert "died while opening this collection on its last start" in info["reason"]
        assert "Aborted" in info["reason"]
        assert info["dimension"] == D and info["index"].kind == "hnsw"
        listed = {col["name"]: col for col in c.list_collections()}
        assert sorted(listed) == ["bad", "good", "worse"]
        assert listed["bad"]["state"] == "quarantined" and listed["good"]["state"] == "ready"
        assert listed["good"]["reason"] == ""
        for call in (lambda: c.count("bad"), lambda: c.search("bad", xb[0], k=1),
                     lambda: c.get("bad", [1]), lambda: c.upsert("bad", [1], xb[:1])):
            with pytest.raises(errors.FailedPrecondition, match="quarantined.*collections repair bad"):
                call()
        with pytest.raises(errors.AlreadyExists, match="quarantined"):
            c.create_collection("bad", D)
        st = server_status(c)
        assert st["health"] == "SERVING"
        bad = next(col for col in st["collections"] if col["name"] == "bad")
        assert bad["state"] == "quarantined" and "died while opening" in bad["reason"]

        # the CLI shows it and repairs it: opened again, every point there
        runner = CliRunner()
        out = runner.invoke(app, ["collections", "list", "--address", srv.address])
        assert out.exit_code == 0 and "state=quarantined" in out.output and "reason=the server died" in out.output
        out = runner.invoke(app, ["collections", "repair", "bad", "--address", srv.address])
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["state"] in ("ready", "indexing")
        _check_points(c, "bad", xb)
        # repair with a corrected spec: the index is rebuilt from the point store
        info = c.repair_collection("worse", index="exact")
        assert info["index"].kind == "exact" and info["points"] == 10
        assert c.describe_collection("worse")["state"] != "quarantined"
        # a served collection: repair is a no-op; an unknown name is NOT_FOUND
        assert c.repair_collection("good")["name"] == "good"
        with pytest.raises(errors.NotFound):
            c.repair_collection("nope")
    assert srv.stop() == 0
    assert "collection bad: quarantined: the server died while opening" in log.read_text()
    assert "the previous run of this server died of a fatal error (Aborted)" in log.read_text()

    # a marker without a fatal error (kill -9, OOM): opened again once; a second death in a row quarantines
    _plant_marker(data, "good")
    _plant_marker(data, "bad", deaths=1)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        _check_points(c, "good", xg)
        assert c.describe_collection("bad")["state"] == "quarantined"
        assert "2 starts in a row" in c.describe_collection("bad")["reason"]
        assert c.describe_collection("worse")["state"] != "quarantined"  # repaired for good
        # drop works on a quarantined collection; the name is free again
        out = CliRunner().invoke(app, ["collections", "drop", "bad", "--yes", "--address", srv.address])
        assert out.exit_code == 0, out.output
        assert not (data / "collections" / "bad").exists()
        with pytest.raises(errors.NotFound):
            c.describe_collection("bad")
        c.create_collection("bad", D, index="exact")
        assert c.count("bad") == 0
    assert srv.stop() == 0
    srv.start()  # and a clean restart quarantines nothing
    with Client(srv.address, timeout=60) as c:
        assert {col["name"]: col["state"] for col in c.list_collections()} == {
            "bad": "ready", "good": "ready", "worse": "ready"}
    srv.stop()


def test_native_abort_while_replaying_quarantines_only_that_collection(tmp_path):
    """faiss asserts (SIGABRT) on the first add to "HNSW0": written straight into collection.json
    with a pending write, it kills the server at start; the next start quarantines it."""
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    srv = ServerProcess(data, env=ENV, log_path=log)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        c.create_collection("good", D, index="hnsw")
        c.create_collection("bomb", D, index={"type": "faiss", "factory": "HNSW32"})
        xg, xb = _points(c, "good", 100, 3), _points(c, "bomb", 100, 4)
    srv.kill()  # no final snapshot: the writes are replayed at the next start
    cfg_path = data / "collections" / "bomb" / "collection.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["index"]["factory"] = "HNSW0"
    cfg_path.write_text(json.dumps(cfg))

    try:
        srv.start()
    except RuntimeError:
        pass  # it may die before it says "serving"
    assert srv.proc.wait(60) == -6, "the planted index should make faiss abort"
    assert (data / "collections" / "bomb" / ".opening").exists()
    assert "Fatal Python error: Aborted" in (data / ".fatal-error").read_text()

    srv.start()
    with Client(srv.address, timeout=60) as c:
        _check_points(c, "good", xg)
        info = c.describe_collection("bomb")
        assert info["state"] == "quarantined" and "fatal error (Aborted)" in info["reason"], info
        with pytest.raises(errors.FailedPrecondition, match="quarantined"):
            c.search("bomb", xb[0], k=1)
        time.sleep(1.0)
        assert srv.proc.poll() is None
        # repaired with a spec that works: rebuilt from the point store, nothing lost
        c.repair_collection("bomb", index="hnsw")
        _check_points(c, "bomb", xb)
    assert srv.stop() == 0
    srv.start()
    with Client(srv.address, timeout=60) as c:
        _check_points(c, "bomb", xb)
        assert c.describe_collection("bomb")["index"].kind == "hnsw"
    srv.stop()


def _plant_job(data: Path, job_id: str, **fields) -> None:
    rec = {"id": job_id, "kind": "fastrp", "params": {"graph": "no-such-graph", "embedding": "e",
                                                      "params": {"dim": 8}},
           "state": "running", "done": 0.0, "total": 10.0, "message": "", "error": "", "result": {},
           "created_at": time.time(), "started_at": time.time(), "finished_at": 0.0, **fields}
    (data / "jobs").mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data / "jobs" / "jobs.sqlite")
    db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL)")
    db.execute("INSERT OR REPLACE INTO jobs(id, record) VALUES (?, ?)", (job_id, json.dumps(rec)))
    db.commit()
    db.close()


def test_resumed_job_that_killed_the_server_is_failed_not_resumed(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, env=ENV, log_path=tmp_path / "server.log")
    _plant_job(data, "aaa1")                    # running when a native abort hit a job thread
    _plant_job(data, "ccc3", state="queued")    # waiting its turn then: not to blame, resumed
    (data / ".fatal-error").write_text(ABORT_IN_JOB)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        a = c.get_job("aaa1")
        assert a["state"] == "failed" and "fatal error (Aborted) in this job's thread" in a["error"], a
        cc = c.wait_job("ccc3", timeout=60)  # resumed: its body ran (and failed on its own missing graph)
        assert cc["state"] == "failed" and "no-such-graph" in cc["error"] and "resume" not in cc["error"], cc
    assert srv.stop() == 0

    # no fatal error recorded (killed): a job that stalled on two resumes in a row is failed, one that
    # made progress since its last resume is resumed again
    _plant_job(data, "bbb2", resumes=2, resumed_done=3.0, done=3.0, stalled_resumes=1)
    _plant_job(data, "ddd4", resumes=5, resumed_done=3.0, done=5.0, stalled_resumes=1)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        b = c.get_job("bbb2")
        assert b["state"] == "failed" and "2 resumes of this job in a row" in b["error"], b
        d = c.wait_job("ddd4", timeout=60)
        assert d["state"] == "failed" and "no-such-graph" in d["error"] and "resume" not in d["error"], d
    srv.stop()
