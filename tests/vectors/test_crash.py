"""Durability: SIGKILL in the middle of a stream of acknowledged writes, graceful restarts from the
index snapshot, and corrupted / truncated snapshots detected and rebuilt from the point store.

The crash loop: a writer thread streams upserts (with payloads) and deletes of random ids; the test
SIGKILLs the server at a random (seeded) moment, restarts it on the same data folder and checks that
every acknowledged write is there (vectors bit-exact, payloads equal), that no deleted point comes
back in get or in any search result, and that the write in flight at the kill is either fully
applied or absent. Five cycles on the same folder, with small snapshot settings so that recovery
goes through "load snapshot + replay the rest" as well as through the delta.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from retrieval.client import Client
from retrieval.errors import RetrievalError
from retrieval.server.process import ServerProcess
from tests.vectors.helpers import assert_same_neighbours, brute_knn, recall, wait_indexed

D = 16
ENV = {"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "2000", "RETRIEVAL_INDEXING__SNAPSHOT_INTERVAL_S": "0.5"}
UNIVERSE = np.concatenate([np.arange(0, 6000, dtype=np.uint64),
                           np.arange(2**63 - 500, 2**63 + 500, dtype=np.uint64),
                           np.arange(2**64 - 501, 2**64 - 1, dtype=np.uint64)])

ABSENT = None


class Writer(threading.Thread):
    """Streams writes until the server goes away. ``acked`` holds the model of acknowledged state;
    ``in_flight`` the last write that got no answer: (kind, ids, vectors, payloads)."""

    def __init__(self, client: Client, name: str, model: dict, seed: int) -> None:
        super().__init__(daemon=True)
        self.client, self.name, self.model = client, name, model
        self.rng = np.random.default_rng(seed)
        self.in_flight = None
        self.acked = 0
        self.version = seed * 1_000_000

    def run(self) -> None:
        rng = self.rng
        while True:
            if rng.random() < 0.7:
                m = int(rng.integers(1, 200))
                ids = rng.choice(UNIVERSE, size=m, replace=False)
                x = rng.standard_normal((m, D)).astype(np.float32)
                self.version += 1
                pls = [{"id": str(i), "v": self.version, "tags": ["t" + str(int(i) % 3)]} if j % 5 else None
                       for j, i in enumerate(ids.tolist())]
                op = ("upsert", ids, x, pls)
            else:
                present = [i for i, s in self.model.items() if s is not ABSENT]
                m = int(rng.integers(1, 100))
                pick = rng.choice(np.array(present, np.uint64), size=min(m, len(present)), replace=False) \
                    if present else np.zeros(0, np.uint64)
                ids = np.unique(np.concatenate([pick, rng.choice(UNIVERSE, size=3)]))  # a few that may be absent
                op = ("delete", ids, None, None)
            self.in_flight = op
            try:
                if op[0] == "upsert":
                    self.client.upsert(self.name, op[1], op[2], op[3])
                else:
                    self.client.delete(self.name, ids=op[1])
            except RetrievalError:
                return  # the server is gone; in_flight stays set
            apply(self.model, op)
            self.in_flight = None
            self.acked += 1


def apply(model: dict, op) -> None:
    kind, ids, x, pls = op
    for j, i in enumerate(ids.tolist()):
        model[i] = (x[j].copy(), pls[j]) if kind == "upsert" else ABSENT


def stored_state(client, name, ids: np.ndarray) -> dict:
    out = {int(i): ABSENT for i in ids.tolist()}
    for s in range(0, len(ids), 5000):
        got = client.get(name, ids[s : s + 5000])
        for i, v, p in zip(got.ids.tolist(), got.vectors, got.payloads):
            out[i] = (v.copy(), p)
    return out


def same(a, b) -> bool:
    if a is ABSENT or b is ABSENT:
        return a is b
    return a[0].tobytes() == b[0].tobytes() and a[1] == b[1]


def verify(client, name, model: dict, in_flight) -> None:
    """Check the restarted server against the model; resolve the in-flight write into the model."""
    state = stored_state(client, name, np.union1d(UNIVERSE, np.array(list(model), np.uint64)))
    flight_ids = set(in_flight[1].tolist()) if in_flight else set()
    bad = [i for i in state if i not in flight_ids and not same(state[i], model.get(i, ABSENT))]
    assert not bad, f"{len(bad)} acknowledged points differ after the crash, e.g. id {bad[0]}: " \
                    f"stored {state[bad[0]]}, acknowledged {model.get(bad[0], ABSENT)}"
    if in_flight:
        after = dict(model)
        apply(after, in_flight)
        ids = in_flight[1].tolist()
        applied = [same(state[i], after[i]) for i in ids]
        kept = [same(state[i], model.get(i, ABSENT)) for i in ids]
        assert all(a or k for a, k in zip(applied, kept)), "a point of the write in flight is half applied"
        # one shard, one transaction: the whole batch is in, or none of it
        assert all(applied) or all(kept), "the write in flight is partly applied"
        if all(applied):
            apply(model, in_flight)
    n_present = sum(s is not ABSENT for s in state.values())
    assert client.count(name) == n_present
    check_search(client, name, model)


def check_search(client, name, model: dict) -> None:
    ids = np.array([i for i, s in model.items() if s is not ABSENT], np.uint64)
    xb = np.stack([model[i][0] for i in ids.tolist()]) if len(ids) else np.zeros((0, D), np.float32)
    gone = np.array([i for i, s in model.items() if s is ABSENT], np.uint64)
    rng = np.random.default_rng(len(ids))
    xq = rng.standard_normal((40, D)).astype(np.float32)
    if len(gone):  # right where deleted points used to be is where a resurrected one would show up
        xq = np.vstack([xq, rng.standard_normal((40, D)).astype(np.float32) * 0.01])
    Dt, It = brute_knn(xq, ids, xb, 10, "l2")
    De, Ie = client.search_batch(name, xq, k=10, exact=True)
    assert_same_neighbours(De, Ie, Dt, It)
    Dg, Ig = client.search_batch(name, xq, k=10, ef=200, nprobe=64)
    assert not np.isin(Ig, gone.view(np.int64)).any(), "a deleted point came back in search results"
    assert recall(Ig, It) >= 0.95
    h = client.search(name, xq[0], k=10, with_payloads=True, with_vectors=True)
    for i, p, v in zip(h.ids.view(np.uint64).tolist(), h.payloads, h.vectors):
        assert model[i] is not ABSENT and model[i][1] == p and model[i][0].tobytes() == v.tobytes()
    if len(ids):  # every live point is findable by its own vector: exactly, and through the index
        sample = rng.choice(len(ids), min(200, len(ids)), replace=False)
        _, Ie1 = client.search_batch(name, xb[sample], k=1, exact=True)
        assert (Ie1[:, 0] == ids[sample].view(np.int64)).all()
        D1, I1 = client.search_batch(name, xb[sample], k=1, ef=200, nprobe=64)
        miss = np.flatnonzero(I1[:, 0] != ids[sample].view(np.int64))
        if len(miss) == 0:
            return
        De1, Ie1 = client.search_batch(name, xb[sample[miss]], k=1, exact=True)
        # hnswlib's replace_deleted reuses the slots of deleted and updated points; under the heavy churn
        # of this test a few reused nodes end up poorly linked (measured: up to 1.5 % not found by their
        # own vector at ef=200 after five crash cycles; a fresh build finds 100 %). Exact search finds all.
        assert len(miss) <= 0.03 * len(sample), (
            f"{len(miss)} of {len(sample)} live points not found by their own vector: ids "
            f"{ids[sample[miss]].tolist()[:5]}, got {I1[miss, 0].view(np.uint64).tolist()[:5]} at {D1[miss, 0][:5]}; "
            f"exact search gives {Ie1[:5, 0].view(np.uint64).tolist()} at {De1[:5, 0]}; "
            f"{client.describe_collection(name)['shard_info']}")


@pytest.mark.slow
def test_sigkill_during_writes(tmp_path):
    srv = ServerProcess(tmp_path / "data", env=ENV)
    srv.start()
    name = "crash"
    model: dict = {}
    loaded_snapshot = 0
    with Client(srv.address, timeout=20) as c:
        c.create_collection(name, dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 64})
    rng = np.random.default_rng(2024)
    try:
        for cycle in range(5):
            client = Client(srv.address, timeout=20)
            w = Writer(client, name, model, seed=cycle + 1)
            w.start()
            time.sleep(float(rng.uniform(1.0, 3.0)))
            assert w.is_alive(), "the writer stopped before the kill"
            srv.kill()
            w.join(30)
            assert not w.is_alive()
            client.close()
            assert w.acked > 3, "too few acknowledged writes before the kill to test anything"
            srv.start()
            with Client(srv.address, timeout=60) as c:
                verify(c, name, model, w.in_flight)  # right after the restart (delta + snapshot)
                wait_indexed(c, name)
                check_search(c, name, model)         # and once the indexer caught up
            loaded_snapshot += len(re.findall(r"loaded snapshot seq", srv.log_tail(60)))
    finally:
        srv.stop()
    assert loaded_snapshot >= 1, "no restart recovered from a snapshot; the test only exercised the replay path"
    assert sum(s is not ABSENT for s in model.values()) > 500


# ------------------------------------------------------------------------------------------------
# Graceful restart and damaged snapshots
# ------------------------------------------------------------------------------------------------
def _fill(c, name, seed=0, n=3000):
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.uint64) * np.uint64(6_148_914_691_236_517)  # spread over all of uint64
    x = rng.standard_normal((n, D)).astype(np.float32)
    pls = [{"i": i} for i in range(n)]
    c.create_collection(name, dimension=D, metric="l2", index={"type": "hnsw", "m": 16, "ef_construction": 64})
    c.upsert(name, ids, x, pls)
    c.delete(name, ids=ids[:300])
    model = {i: (x[j], pls[j]) for j, i in enumerate(ids.tolist())}
    for i in ids[:300].tolist():
        model[i] = ABSENT
    return model


def _snapshot_files(data_dir, name, pattern):
    files = sorted((data_dir / "collections" / name / "shard-0" / "snapshots").glob(f"*/{pattern}"))
    assert files, f"no snapshot file {pattern}"
    return files


@pytest.mark.slow
def test_graceful_restart_and_damaged_snapshots(tmp_path):
    srv = ServerProcess(tmp_path / "data", env=ENV)
    srv.start()
    name = "graceful"
    xq = np.random.default_rng(5).standard_normal((30, D)).astype(np.float32)
    try:
        with Client(srv.address, timeout=60) as c:
            model = _fill(c, name)
            info = wait_indexed(c, name)
            last_seq = info["shard_info"][0]["last_seq"]
            before = c.search_batch(name, xq, k=10, ef=100)
        assert srv.stop() == 0
        # --- SIGTERM wrote a final snapshot; the restart loads it and replays nothing
        srv.start()
        assert f"loaded snapshot seq {last_seq}" in srv.log_tail(30)
        with Client(srv.address, timeout=60) as c:
            info = c.describe_collection(name)
            s = info["shard_info"][0]
            assert s["snapshot_seq"] == last_seq == s["last_seq"] and info["pending"] == 0
            after = c.search_batch(name, xq, k=10, ef=100)
            assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
            check_search(c, name, model)
        assert srv.stop() == 0

        # --- a corrupted snapshot (bytes flipped): detected, reported, rebuilt from the point store
        index_file = _snapshot_files(srv.data_dir, name, "hnsw.bin")[-1]
        data = bytearray(index_file.read_bytes())
        for off in (100, len(data) // 2, len(data) - 10):
            data[off] ^= 0xFF
        index_file.write_bytes(bytes(data))
        srv.start()
        log = srv.log_tail(40)
        assert "skipping snapshot" in log and "does not match its checksum (corrupt)" in log
        with Client(srv.address, timeout=60) as c:
            verify(c, name, model, None)
            wait_indexed(c, name)
            check_search(c, name, model)
            assert c.describe_collection(name)["indexed"] == sum(s is not ABSENT for s in model.values())
        assert srv.stop() == 0

        # --- a truncated snapshot: likewise
        labels = _snapshot_files(srv.data_dir, name, "labels.npy")[-1]
        labels.write_bytes(labels.read_bytes()[:-17])
        srv.start()
        log = srv.log_tail(40)
        assert "skipping snapshot" in log and "(truncated)" in log
        with Client(srv.address, timeout=60) as c:
            verify(c, name, model, None)
            wait_indexed(c, name)
            check_search(c, name, model)
    finally:
        srv.stop()


def test_restart_without_snapshot_replays_everything(tmp_path):
    """Kill before any snapshot exists: the whole collection comes back from the point store."""
    srv = ServerProcess(tmp_path / "data", env={"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "1000000",
                                                "RETRIEVAL_INDEXING__SNAPSHOT_INTERVAL_S": "3600"})
    srv.start()
    try:
        with Client(srv.address, timeout=60) as c:
            model = _fill(c, "nosnap", seed=3, n=1500)
        srv.kill()
        srv.start()
        assert "loaded snapshot" not in srv.log_tail(30)
        with Client(srv.address, timeout=60) as c:
            verify(c, "nosnap", model, None)
            wait_indexed(c, "nosnap")
            check_search(c, "nosnap", model)
    finally:
        srv.stop()


KINDS = {
    "hnsw-2shards": ({"type": "hnsw", "m": 16, "ef_construction": 100}, 2, 1500),
    "faiss-hnsw": ({"type": "faiss", "factory": "HNSW32"}, 1, 1500),
    "faiss-ivf": ({"type": "faiss", "factory": "IVF16,Flat"}, 1, 1500),
    "faiss-ivf-untrained": ({"type": "faiss", "factory": "IVF64,Flat"}, 1, 500),  # needs 2496 points to train
    "exact": ("exact", 1, 1500),
}


@pytest.mark.slow
def test_sigkill_recovery_of_every_index_kind(tmp_path):
    """Snapshot of each backend + writes after it, then SIGKILL: recovery = load the snapshot and
    replay the rest (or, untrained, replay everything)."""
    srv = ServerProcess(tmp_path / "data", env=ENV)
    srv.start()
    models: dict[str, dict] = {}
    rng = np.random.default_rng(99)
    try:
        with Client(srv.address, timeout=60) as c:
            for kind, (index, shards, n) in KINDS.items():
                c.create_collection(kind, dimension=D, metric="l2", index=index, shards=shards)
                ids = rng.choice(UNIVERSE, size=n, replace=False)
                x = rng.standard_normal((n, D)).astype(np.float32)
                pls = [{"k": kind, "j": j} for j in range(n)]
                c.upsert(kind, ids, x, pls)
                models[kind] = {}
                apply(models[kind], ("upsert", ids, x, pls))
                apply(models[kind], ("delete", ids[:200], None, None))
                c.delete(kind, ids=ids[:200])
            for kind in KINDS:
                wait_indexed(c, kind, untrained_ok=True)
            time.sleep(1.5)  # snapshots are due 0.5 s after the indexer caught up
            snapped = srv.log_tail(200).count("snapshot at seq")
            assert snapped >= len(KINDS) - 1 + 1  # every trained shard (hnsw has two)
            for kind in KINDS:  # acknowledged writes after the snapshots
                m = models[kind]
                live = np.array([i for i, v in m.items() if v is not ABSENT], np.uint64)
                upd = live[:100]
                x = rng.standard_normal((100, D)).astype(np.float32)
                c.upsert(kind, upd, x, [{"upd": 1}] * 100)
                apply(m, ("upsert", upd, x, [{"upd": 1}] * 100))
                c.delete(kind, ids=live[100:150])
                apply(m, ("delete", live[100:150], None, None))
        srv.kill()
        srv.start()
        log = srv.log_tail(60)
        assert log.count("loaded snapshot seq") >= len(KINDS)  # 4 trained kinds, hnsw with 2 shards
        with Client(srv.address, timeout=60) as c:
            for kind in KINDS:
                verify(c, kind, models[kind], None)
                wait_indexed(c, kind, untrained_ok=True)
                check_search(c, kind, models[kind])
            info = c.describe_collection("faiss-ivf-untrained")
            assert info["state"] == "untrained" and info["pending"] == 500 - 200 - 50
    finally:
        srv.stop()
