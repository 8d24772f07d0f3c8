"""A disk that fills up: writes fail with RESOURCE_EXHAUSTED and store nothing, reads keep working,
and the server recovers once space is freed.

The data folder lives on a size-limited tmpfs: mounted directly when the test runs as root, otherwise
inside a user + mount namespace (``unshare -Urm``) that only the server process sees (the test then
reaches its files through ``/proc/<pid>/root``). Without either, the test fails with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval import errors
from retrieval.cli import server_status
from retrieval.client import Client
from retrieval.server.process import ServerProcess

pytestmark = pytest.mark.slow

SIZE_MB = 40
D = 64


def _can(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def small_disk(tmp_path):
    """(server prefix, mount point, callable giving the mount as this process sees it; None: through the
    server's /proc/<pid>/root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if _can(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mnt)]):
        yield [], mnt, lambda: mnt
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        return
    if shutil.which("unshare") and _can(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"]):
        prefix = ["unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o size={SIZE_MB}m tmpfs {mnt} && exec "$@"', "-"]
        yield prefix, mnt, None
        return
    pytest.fail("cannot mount a size-limited tmpfs here (needs root, or unprivileged user namespaces for "
                "`unshare -Urm`); the disk-full behaviour is untested")


def test_full_disk_refuses_writes_keeps_reads_and_recovers(small_disk, tmp_path):
    prefix, mnt, seen = small_disk
    srv = ServerProcess(mnt / "data", prefix=prefix, log_path=tmp_path / "server.log",
                        env={"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "2000"})
    srv.start()
    root = seen() if not prefix else Path(f"/proc/{srv.proc.pid}/root") / str(mnt).lstrip("/")
    rng = np.random.default_rng(0)
    acked: dict[int, np.ndarray] = {}
    with Client(srv.address, timeout=60, max_busy_retries=0) as c:
        c.create_collection("full", D, index="exact")
        st = os.statvfs(root)
        ballast = root / "ballast"
        with open(ballast, "wb") as f:  # leave ~6 MB free
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 6 * 2**20))
        err = None
        next_id = 0
        for _ in range(400):
            ids = np.arange(next_id, next_id + 500)
            x = rng.random((500, D), dtype=np.float32)
            try:
                c.upsert("full", ids, x, [{"i": int(i)} for i in ids])
            except errors.ResourceExhausted as e:
                err = e
                break
            acked.update(zip(ids.tolist(), x))
            next_id += 500
        assert err is not None, "the disk never filled up"
        assert "disk" in str(err) and "full" in str(err), str(err)
        assert len(acked) > 0
        # nothing of the refused write was stored; reads of every kind keep working
        assert c.count("full") == len(acked)
        ids = np.array(sorted(acked))
        xb = np.stack([acked[i] for i in ids])
        for j in range(0, next_id + 500, 5000):
            got = c.get("full", np.arange(j, j + 5000), with_vectors=True, with_payloads=True)
            sel = (ids >= j) & (ids < j + 5000)
            assert got.ids.tolist() == ids[sel].tolist() and np.array_equal(got.vectors, xb[sel])
        for q in (5, len(ids) // 2, len(ids) - 1):
            assert c.search("full", xb[q], k=1).ids.tolist() == [ids[q]]
        _, I = c.search_batch("full", xb[:20], k=1)
        assert I[:, 0].tolist() == ids[:20].tolist()
        assert c.count("full", filter={"must": [{"key": "i", "range": {"lt": 100}}]}) == min(100, len(ids))
        with pytest.raises(errors.ResourceExhausted, match="disk"):  # still full: still refused, cleanly
            c.upsert("full", np.arange(10**6, 10**6 + 2000), rng.random((2000, D), dtype=np.float32))
        with pytest.raises(errors.ResourceExhausted, match="disk"):
            c.upsert_stream("full", [(np.arange(2 * 10**6, 2 * 10**6 + 2000), rng.random((2000, D), dtype=np.float32))])
        assert c.count("full") == len(acked)
        try:  # a new collection needs a little space: it is created whole or refused cleanly
            c.create_collection("another", 4)
        except errors.ResourceExhausted:
            pass
        assert srv.proc.poll() is None

        # free the space: writes work again, nothing was lost
        ballast.unlink()
        more = np.arange(10**7, 10**7 + 500)
        xm = rng.random((500, D), dtype=np.float32)
        c.upsert("full", more, xm)
        acked.update(zip(more.tolist(), xm))
        c.delete("full", ids=ids[:10])
        for i in ids[:10].tolist():
            acked.pop(i)
        assert c.count("full") == len(acked)
    assert srv.stop() == 0  # graceful stop (with a final snapshot) works again
    srv.start()
    with Client(srv.address, timeout=60) as c:
        assert c.count("full") == len(acked)
        sample = sorted(acked)[::97]
        got = c.get("full", sample, with_vectors=True, with_payloads=False)
        assert np.array_equal(got.vectors, np.stack([acked[i] for i in sample]))
    srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert "RESOURCE_EXHAUSTED: the disk holding the data folder is full" in log
    assert " -> INTERNAL" not in log, "a full disk must never be an internal error"


def _fill(c: Client, name: str, root: Path, rng, acked: dict, leave_mb: int = 6) -> Path:
    """Fill the disk with ballast and then with acknowledged upserts into ``name`` until refused."""
    st = os.statvfs(root)
    ballast = root / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_mb * 2**20))
    next_id = max(acked, default=-1) + 1
    for _ in range(400):
        ids = np.arange(next_id, next_id + 500)
        x = rng.random((500, D), dtype=np.float32)
        try:
            c.upsert(name, ids, x, [{"i": int(i)} for i in ids])
        except errors.ResourceExhausted:
            return ballast
        acked.update(zip(ids.tolist(), x))
        next_id += 500
    raise AssertionError("the disk never filled up")


def test_restart_on_a_full_disk_reports_unavailable_then_reopens_by_itself(small_disk, tmp_path):
    """Disk full, kill -9, restart while still full: the collection that cannot be opened is listed
    and described as unavailable with the reason (calls get UNAVAILABLE, not NOT_FOUND); once space
    is freed it is opened again by itself, with nothing lost."""
    prefix, mnt, seen = small_disk
    if prefix:
        pytest.skip("a restart on the same size-limited disk needs a tmpfs mounted by root (the namespace of "
                    "`unshare` goes with the process)")
    log = tmp_path / "server.log"
    srv = ServerProcess(mnt / "data", log_path=log, env={"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "2000"})
    srv.start()
    rng = np.random.default_rng(1)
    acked: dict[int, np.ndarray] = {}
    with Client(srv.address, timeout=60, max_busy_retries=0) as c:
        c.create_collection("full", D, index="exact")
        ballast = _fill(c, "full", mnt, rng, acked)
    srv.kill()  # with the disk full: no final snapshot, the WAL is left as it was

    srv.start()  # still full
    with Client(srv.address, timeout=60, max_busy_retries=0) as c:
        info = c.describe_collection("full")
        assert info["state"] == "unavailable", info
        assert "disk holding the data folder is full" in info["reason"] and "opened again by itself" in info["reason"]
        assert info["dimension"] == D and info["index"].kind == "exact"
        assert [(col["name"], col["state"]) for col in c.list_collections()] == [("full", "unavailable")]
        for call in (lambda: c.count("full"), lambda: c.search("full", np.zeros(D, np.float32), k=1),
                     lambda: c.get("full", [0]), lambda: c.upsert("full", [1], np.zeros((1, D), np.float32))):
            with pytest.raises(errors.Unavailable, match="'full' is unavailable: .*disk .* full"):
                call()
        with pytest.raises(errors.AlreadyExists, match="unavailable"):
            c.create_collection("full", D)
        st = server_status(c)
        assert [(col["name"], col["state"]) for col in st["collections"]] == [("full", "unavailable")]
        assert "full" in st["collections"][0]["reason"]

        ballast.unlink()  # space is back: the collection comes back by itself, nothing lost
        t_end = time.monotonic() + 120
        while c.describe_collection("full")["state"] == "unavailable":
            assert time.monotonic() < t_end, c.describe_collection("full")
            time.sleep(0.2)
        assert c.describe_collection("full")["reason"] == ""
        assert c.count("full") == len(acked)
        ids = np.array(sorted(acked))
        xb = np.stack([acked[i] for i in ids])
        for j in range(0, len(ids), 5000):
            got = c.get("full", ids[j:j + 5000], with_vectors=True, with_payloads=True)
            assert got.ids.tolist() == ids[j:j + 5000].tolist() and np.array_equal(got.vectors, xb[j:j + 5000])
            assert [p["i"] for p in got.payloads] == ids[j:j + 5000].tolist()
        assert c.search("full", xb[len(ids) // 2], k=1).ids.tolist() == [ids[len(ids) // 2]]
        c.upsert("full", [10**7], rng.random((1, D), dtype=np.float32))  # and it takes writes again
        assert c.count("full") == len(acked) + 1
    assert srv.stop() == 0
    text = log.read_text()
    assert "collection full: opened after" in text
    assert " -> INTERNAL" not in text, "a full disk must never be an internal error"
