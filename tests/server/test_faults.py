"""Crash and corruption: SIGKILL during bulk streams, updates, deletes by id and by filter, snapshot
writes, faiss IVF training, HNSW and 2-shard collections, a FastRP job and a datastore build, 26
times in a row on one data folder; corrupt or truncated snapshots and write-ahead-log tails.

Promises checked after every restart: the server starts; every acknowledged write is there (exact
vector bytes and payload), nothing deleted comes back (not in get, count, scroll, nor any search,
exact or not); every point found by a search exists. A write in flight at the kill may land or not,
but wholly. A job cut by the kill ends (resumed or failed), never hangs; a datastore that was built
once is never lost by a replacing build. Corruption is detected (checksums), reported in the log, and
the data is served from the system of record.

(tests/vectors/test_crash.py has the basic crash test; this one is heavier and broader.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval import errors
from retrieval.client import Client
from retrieval.server.process import ServerProcess
from retrieval.storage import snapshots, wal

pytestmark = pytest.mark.slow

D = 16
ENV = {"RETRIEVAL_INDEXING__SNAPSHOT_EVERY": "300", "RETRIEVAL_INDEXING__SNAPSHOT_INTERVAL_S": "0.5",
       "RETRIEVAL_INDEXING__THREADS": "1", "OMP_NUM_THREADS": "1"}
COLLECTIONS = {"h": dict(index={"type": "hnsw", "m": 8, "ef_construction": 64}, shards=2),
               "f": dict(index={"type": "faiss", "factory": "IVF8,Flat", "train_size": 400}, shards=1),
               "e": dict(index="exact", shards=1)}


def _vec(i: int, version: int) -> np.ndarray:
    """A deterministic vector per (id, version), so a stored vector tells which write it came from."""
    return np.random.default_rng(i * 1000 + version).standard_normal(D).astype(np.float32)


class Model:
    """What the server must hold: live points (id -> version) per collection; ids whose last write was
    in flight at the kill are `uncertain` (old or new state both valid) until checked."""

    def __init__(self) -> None:
        self.live: dict[str, dict[int, int]] = {c: {} for c in COLLECTIONS}
        self.dead: dict[str, set[int]] = {c: set() for c in COLLECTIONS}
        self.uncertain: dict[str, dict[int, tuple]] = {c: {} for c in COLLECTIONS}
        self.next_id = 0
        self.lock = threading.Lock()

    def upserted(self, col, ids, versions):
        for i, v in zip(ids, versions):
            self.live[col][i] = v
            self.dead[col].discard(i)

    def deleted(self, col, ids):
        for i in ids:
            self.live[col].pop(i, None)
            self.dead[col].add(i)

    def in_flight(self, col, ids, new_state):
        """``new_state(i)``: the version the write would leave (None: deleted)."""
        for i in ids:
            self.uncertain[col][i] = (self.live[col].get(i), new_state(i))


def _workload(c: Client, model: Model, rng: random.Random, stop: threading.Event, events: dict) -> None:
    """Acknowledged writes until the server dies (or ``stop``); each acknowledged write enters the model."""
    while not stop.is_set():
        col = rng.choice(list(COLLECTIONS))
        live = model.live[col]
        r = rng.random()
        try:
            if r < 0.45 or len(live) < 500:  # upsert: new points and updates
                with model.lock:
                    n_new = rng.randint(50, 200)
                    new = list(range(model.next_id, model.next_id + n_new))
                    model.next_id += n_new
                old = rng.sample(sorted(live), min(len(live), rng.randint(0, 100)))
                ids = new + old
                vers = [live.get(i, 0) + 1 for i in ids]
                model.in_flight(col, ids, dict(zip(ids, vers)).get)
                c.upsert(col, ids, np.stack([_vec(i, v) for i, v in zip(ids, vers)]),
                         [{"g": i % 7, "v": v} for i, v in zip(ids, vers)])
                model.upserted(col, ids, vers)
            elif r < 0.6:  # bulk load over a stream
                with model.lock:
                    ids = list(range(model.next_id, model.next_id + 1000))
                    model.next_id += 1000
                model.in_flight(col, ids, lambda i: 1)
                events["stream"].set()
                try:
                    c.upsert_stream(col, ((np.arange(ids[j], ids[j] + 200),
                                           np.stack([_vec(i, 1) for i in range(ids[j], ids[j] + 200)]),
                                           [{"g": i % 7, "v": 1} for i in range(ids[j], ids[j] + 200)])
                                          for j in range(0, 1000, 200)))
                finally:
                    events["stream"].clear()
                model.upserted(col, ids, [1] * len(ids))
            elif r < 0.93:  # delete by ids
                ids = rng.sample(sorted(live), min(len(live), rng.randint(20, 300)))
                model.in_flight(col, ids, lambda i: None)
                c.delete(col, ids=ids)
                model.deleted(col, ids)
            else:  # delete by filter
                g = rng.randrange(7)
                ids = [i for i in live if i % 7 == g]
                model.in_flight(col, ids, lambda i: None)
                c.delete(col, filter={"must": [{"key": "g", "equals": g}]})
                model.deleted(col, ids)
            for u in model.uncertain.values():
                u.clear()
        except errors.RetrievalError:
            return  # the server was killed: the last write is uncertain


def _verify(c: Client, model: Model, rng: random.Random) -> dict:
    """Check the server against the model; resolve uncertain ids from the server's state."""
    stats = {}
    for col in COLLECTIONS:
        live, dead, unc = model.live[col], model.dead[col], model.uncertain[col]
        if unc:
            ids = sorted(unc)
            got = c.get(col, ids, with_vectors=True, with_payloads=False)
            have = dict(zip(got.ids.tolist(), got.vectors))
            for i in ids:
                before, after = unc[i]
                ok_states = {before, after}
                if i in have:
                    v = next((s for s in ok_states if s is not None and np.array_equal(have[i], _vec(i, s))), "bad")
                    assert v != "bad", f"{col}/{i}: stored vector is neither the old nor the new write"
                    live[i] = v
                    dead.discard(i)
                else:
                    assert None in ok_states, f"{col}/{i}: acknowledged point missing after the crash"
                    live.pop(i, None)
                    dead.add(i)
            unc.clear()
        want = sorted(live)
        assert c.count(col) == len(want), f"{col}: count {c.count(col)} != {len(want)} acknowledged"
        probe = want + sorted(dead)
        for j in range(0, len(probe), 5000):
            got = c.get(col, probe[j:j + 5000], with_vectors=True, with_payloads=True)
            for i, v, pl in zip(got.ids.tolist(), got.vectors, got.payloads):
                assert i in live, f"{col}/{i}: deleted point came back"
                assert v.tobytes() == _vec(i, live[i]).tobytes(), f"{col}/{i}: wrong vector bytes stored"
                assert pl == {"g": i % 7, "v": live[i]}, f"{col}/{i}: payload {pl} is not the acknowledged one"
            assert len(got.ids) == sum(1 for i in probe[j:j + 5000] if i in live), f"{col}: acknowledged points missing"
        scrolled, start = [], None
        while True:  # scroll sees exactly the live ids, in order
            page = c.scroll(col, start_id=start, limit=2000, with_vectors=False, with_payloads=False)
            scrolled += page.ids.tolist()
            if page.next_id is None:
                break
            start = page.next_id
        assert scrolled == want, f"{col}: scroll returned {len(scrolled)} ids, {len(want)} acknowledged " \
                                 f"(extra {sorted(set(scrolled) - set(want))[:5]}, missing {sorted(set(want) - set(scrolled))[:5]})"
        g = rng.randrange(7)
        assert c.count(col, filter={"must": [{"key": "g", "equals": g}]}) == sum(1 for i in want if i % 7 == g)
        # searches: every hit exists, deleted points never come back, points find themselves
        sample = rng.sample(want, min(40, len(want)))
        if sample:
            xq = np.stack([_vec(i, live[i]) for i in sample])
            _, I = c.search_batch(col, xq, k=10, ef=200, nprobe=8)
            hits = set(I[I >= 0].tolist())
            assert hits <= set(live), f"{col}: search returned points that do not exist: {sorted(hits - set(live))[:5]}"
            self_found = np.mean([s in row for s, row in zip(sample, I.tolist())])
            assert self_found >= 0.9, f"{col}: only {self_found:.2f} of stored points find themselves"
        gone = rng.sample(sorted(dead), min(40, len(dead)))
        if gone:
            xg = np.stack([_vec(i, 1) for i in gone])
            for kw in (dict(exact=True), dict(ef=200, nprobe=8)):  # neither exact nor index search finds them
                _, I = c.search_batch(col, xg, k=5, **kw)
                assert not set(I[I >= 0].tolist()) & set(gone), f"{col}: a deleted point was found by a search {kw}"
        stats[col] = (len(want), len(dead))
    return stats


def _snapshot_tmp_exists(data: Path) -> bool:
    for col in COLLECTIONS:
        root = data / "collections" / col
        if not root.exists():
            continue
        for shard in root.glob("shard-*"):
            snap = shard / "snapshots"
            try:
                if any(p.name.startswith(".tmp-") for p in snap.iterdir()):
                    return True
            except OSError:
                pass
    return False


GRAPH_N, CORPUS_TOKENS, VOCAB = 3000, 400_000, 500


def _setup_jobs(c: Client, tmp: Path) -> Path:
    """A graph for FastRP and a token corpus for datastore builds (both fixed-seed)."""
    rng = np.random.default_rng(5)
    c.create_graph("g", num_nodes=GRAPH_N)
    src = rng.integers(0, GRAPH_N, 30_000)
    dst = (src + rng.integers(1, 50, 30_000)) % GRAPH_N
    c.append_edges("g", src, dst)
    corpus = tmp / "corpus.ids"
    toks = rng.integers(0, VOCAB, CORPUS_TOKENS)
    corpus.write_text("\n".join(" ".join(map(str, toks[j:j + 500])) for j in range(0, CORPUS_TOKENS, 500)) + "\n")
    return corpus


def _start_jobs(c: Client, corpus: Path, cycle: int) -> None:
    """A FastRP run and a replacing datastore build, cut by the kill while queued or running."""
    with contextlib.suppress(errors.RetrievalError):
        c.run_fastrp("g", dim=32, wait=False, seed=cycle)
        c.build_datastore("ds", [str(corpus)], vocab_size=VOCAB, overwrite=True, wait=False)


def _verify_jobs(c: Client, built: dict, corpus: Path) -> dict:
    """Every job ends (resumed to an end, or failed as interrupted); a datastore built once is never lost;
    a finished FastRP embedding serves."""
    t_end = time.monotonic() + 300
    while True:
        jobs = c.list_jobs()
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
            break
        assert time.monotonic() < t_end, f"jobs never ended after a restart: {[(j['kind'], j['state']) for j in jobs]}"
        time.sleep(0.2)
    states = {}
    for j in jobs:
        states[(j["kind"], j["state"])] = states.get((j["kind"], j["state"]), 0) + 1
        if j["state"] == "failed":
            assert j["error"], j
    if any(j["kind"] == "build_datastore" and j["state"] == "succeeded" for j in jobs):
        built["ds"] = True
    if built.get("ds"):
        info = c.describe_datastore("ds")  # NotFound here: a replacing build lost the datastore
        assert info["n_tokens"] >= CORPUS_TOKENS, info
        head = [int(t) for t in corpus.read_text().split("\n", 1)[0].split()[:20]]
        d = c.draft(head, vocab_size=VOCAB, datastore="ds", sources=["corpus"])
        assert len(d.tokens) > 0  # the corpus continues this context: the datastore serves it
    if any(j["kind"] == "fastrp" and j["state"] == "succeeded" for j in jobs):
        built["fastrp"] = True
    if built.get("fastrp"):
        (ids, dist), = c.similar_nodes("g", [0], k=5, exact=True)
        assert len(ids) == 5 and np.all(np.isfinite(dist))
    return states


def test_sigkill_cycles(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, env={**ENV, "RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(tmp_path)])})
    model = Model()
    rng = random.Random(8)
    srv.start()
    with Client(srv.address, timeout=60) as c:
        for name, kw in COLLECTIONS.items():
            c.create_collection(name, D, **kw)
        corpus = _setup_jobs(c, tmp_path)
    cycles, how, built, job_states, checked = 26, {}, {}, {}, 0
    for cycle in range(cycles):
        mode = ("random", "snapshot", "stream", "index", "job")[cycle % 5]
        stop, events = threading.Event(), {"stream": threading.Event()}
        client = Client(srv.address, timeout=10, max_busy_retries=5)
        if cycle % 3 == 1:  # a collection created or dropped while the kill may land
            def create_or_drop(c=client):
                with contextlib.suppress(errors.RetrievalError):  # the kill may cut the call: intended
                    if "tmpcol" in [x["name"] for x in c.list_collections()]:
                        c.drop_collection("tmpcol")
                    else:
                        c.create_collection("tmpcol", 4)

            threading.Thread(target=create_or_drop, daemon=True).start()
        if mode == "job":
            _start_jobs(client, corpus, cycle)
        t = threading.Thread(target=_workload, args=(client, model, random.Random(cycle), stop, events), daemon=True)
        t.start()
        t0 = time.monotonic()
        hit = "timer"
        deadline = t0 + rng.uniform(0.4, 2.0)
        while time.monotonic() < t0 + 4.0:
            if mode in ("random", "job") and time.monotonic() >= deadline:
                if mode == "job":
                    with contextlib.suppress(errors.RetrievalError):
                        running = [j["kind"] for j in client.list_jobs(state="running")]
                        hit = "job-running:" + ",".join(sorted(running)) if running else "job-queued"
                break
            if mode == "snapshot" and _snapshot_tmp_exists(data):
                hit = "snapshot-in-progress"
                break
            if mode == "stream" and events["stream"].is_set() and time.monotonic() > t0 + 0.3:
                time.sleep(rng.uniform(0, 0.05))
                hit = "stream-in-progress"
                break
            if mode == "index" and time.monotonic() > t0 + 0.5:
                try:
                    states = {s["state"] for name in COLLECTIONS
                              for s in client.describe_collection(name)["shard_info"]}
                except errors.RetrievalError:
                    states = set()
                if states & {"indexing", "training", "rebuilding"}:
                    hit = "index-build-in-progress:" + ",".join(sorted(states - {"ready"}))
                    break
            time.sleep(0.002 if mode == "snapshot" else 0.01)
        srv.kill()
        stop.set()
        t.join(30)
        client.close()
        how[hit] = how.get(hit, 0) + 1
        srv.start(timeout=180)  # the server always starts
        with Client(srv.address, timeout=60) as c:
            stats = _verify(c, model, random.Random(cycle))
            checked += sum(live + dead for live, dead in stats.values())
            job_states = _verify_jobs(c, built, corpus)  # every job of the run so far, by kind and end state
            names = {x["name"] for x in c.list_collections()}
            assert set(COLLECTIONS) <= names and names <= set(COLLECTIONS) | {"tmpcol"} | _internal(names)
            if "tmpcol" in names:
                assert c.count("tmpcol") == 0 and c.describe_collection("tmpcol")["dimension"] == 4
    srv.stop()
    # every check above asserts: a lost acknowledged write or a resurrected deleted one fails the test
    print(f"\nSIGKILL cycles: {cycles}; kills landed: {how}; acknowledged points and deletions checked "
          f"(summed over restarts): {checked}; lost: 0; resurrected: 0; jobs at the end: {job_states}; "
          f"points now: { {c: len(v) for c, v in model.live.items()} }")
    assert sum(how.values()) == cycles >= 25
    assert how.get("snapshot-in-progress", 0) >= 1, f"no kill landed during a snapshot write: {how}"
    assert how.get("stream-in-progress", 0) >= 1, how
    assert any(k.startswith("index-build") for k in how), how
    assert any(k.startswith("job-running") for k in how), f"no kill landed while a job ran: {how}"
    assert built.get("ds") and built.get("fastrp"), f"the jobs never finished once: {job_states}"
    log = srv.log_path.read_text()
    assert log.count("snapshot at seq") >= 5  # snapshots were being written throughout


def _internal(names: set[str]) -> set[str]:
    """The collections FastRP writes its embeddings to (``g-<graph>-...``)."""
    return {n for n in names if n.startswith("g-")}


# ------------------------------------------------------------------------------------------------
# Corruption
# ------------------------------------------------------------------------------------------------
def _fill(srv: ServerProcess, name: str, n: int, index="exact") -> dict[int, np.ndarray]:
    with Client(srv.address, timeout=60) as c:
        if name not in [x["name"] for x in c.list_collections()]:
            c.create_collection(name, D, index=index)
        ids = np.arange(n)
        c.upsert(name, ids, np.stack([_vec(i, 1) for i in ids]))
    return {i: _vec(i, 1) for i in range(n)}


def _served(c: Client, name: str, truth: dict[int, np.ndarray]):
    """The served data equals ``truth`` (ids and vectors), and searches agree with brute force over it."""
    ids = np.array(sorted(truth))
    assert c.count(name) == len(ids)
    got = c.get(name, np.arange(max(ids) + 50), with_vectors=True, with_payloads=False)
    assert got.ids.tolist() == ids.tolist()
    assert np.array_equal(got.vectors, np.stack([truth[i] for i in ids]))
    xb = np.stack([truth[i] for i in ids])
    xq = xb[:: max(1, len(xb) // 50)] + 0.01
    D_, I = c.search_batch(name, xq, k=5, ef=400)
    ref = ids[np.argsort(((xq[:, None, :] - xb[None]) ** 2).sum(-1), axis=1)[:, :5]]
    assert set(I[I >= 0].tolist()) <= set(ids.tolist())
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(I.tolist(), ref.tolist())]) >= 0.95


def _snapshot_dir(data: Path, name: str) -> Path:
    snaps = snapshots.candidates(data / "collections" / name / "shard-0" / "snapshots")
    assert snaps, "no snapshot was written"
    return snaps[0]


DAMAGES = ["flip-index", "truncate-labels", "drop-manifest", "bad-manifest"]


def test_corrupt_snapshots_are_detected_and_rebuilt(tmp_path):
    """Four collections, each snapshot damaged a different way; one restart serves them all correctly."""
    data = tmp_path / "data"
    srv = ServerProcess(data, env=ENV)
    srv.start()
    truth = {d: _fill(srv, d, 2000 + 100 * k, index={"type": "hnsw", "m": 8, "ef_construction": 64})
             for k, d in enumerate(DAMAGES)}
    with Client(srv.address, timeout=60) as c:  # a snapshot holds only writes the index has taken in
        t_end = time.monotonic() + 300
        while any(c.describe_collection(d)["pending"] for d in DAMAGES) and time.monotonic() < t_end:
            time.sleep(0.05)
    srv.stop()  # graceful: the final snapshots include every write
    damaged = {}
    for damage in DAMAGES:
        snap = damaged[damage] = _snapshot_dir(data, damage)
        snapshots.verify(snap)
        if damage == "flip-index":
            f = snap / "hnsw.bin"
            b = bytearray(f.read_bytes())
            for pos in range(100, len(b), len(b) // 7):
                b[pos] ^= 0xFF
            f.write_bytes(bytes(b))
        elif damage == "truncate-labels":
            f = snap / "labels.npy"
            f.write_bytes(f.read_bytes()[:-40])
        elif damage == "drop-manifest":
            (snap / "manifest.json").unlink()
        else:
            (snap / "manifest.json").write_text('{"format": 1, "seq": ')
    srv.start()
    with Client(srv.address, timeout=60) as c:
        for damage in DAMAGES:
            _served(c, damage, truth[damage])
    srv.stop()
    log = srv.log_path.read_text()
    for damage, snap in damaged.items():
        assert f"skipping snapshot {snap}" in log, (damage, log[-2000:])
        snapshots.verify(_snapshot_dir(data, damage))  # a fresh, intact snapshot replaced it
    assert "does not match its checksum" in log and "truncated" in log and "has no manifest" in log


def test_torn_wal_tail_is_reported_and_acknowledged_writes_survive(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, env=ENV)
    srv.start()
    truth = _fill(srv, "w", 2000)
    srv.kill()
    walf = data / "collections" / "w" / "shard-0" / "points.sqlite-wal"
    before = wal.scan(walf)
    assert before is not None and before.frames > 0
    with open(walf, "ab") as f:  # a frame header of the current generation and half a page: a torn write
        import struct

        hdr = walf.read_bytes()[:32]
        salt1, salt2 = struct.unpack(">II", hdr[16:24])
        f.write(struct.pack(">6I", 2, 0, salt1, salt2, 1, 2) + os.urandom(before.page_size // 2))
    srv.start()
    with Client(srv.address, timeout=60) as c:
        _served(c, "w", truth)
    srv.stop()
    log = srv.log_path.read_text()
    assert "ended in an unfinished transaction" in log and "torn byte" in log


def test_corrupt_wal_commit_is_reported_and_served_from_the_store(tmp_path):
    """A committed log frame that fails its checksum: SQLite keeps the transactions before it; the index
    snapshot, which includes the lost writes, is refused and the index rebuilt from the store, so
    searches never return points the store does not have."""
    data = tmp_path / "data"
    srv = ServerProcess(data, env=ENV)
    srv.start()
    truth = _fill(srv, "x", 1500, index={"type": "hnsw", "m": 8, "ef_construction": 64})
    with Client(srv.address, timeout=60) as c:
        c.upsert("x", np.arange(5000, 5100), np.stack([_vec(i, 1) for i in range(5000, 5100)]))
        t_end = time.monotonic() + 60
        while True:  # wait for a snapshot that includes the last write
            sh = c.describe_collection("x")["shard_info"][0]
            if sh["snapshot_seq"] == sh["last_seq"]:
                break
            assert time.monotonic() < t_end
            time.sleep(0.1)
    srv.kill()
    walf = data / "collections" / "x" / "shard-0" / "points.sqlite-wal"
    sc = wal.scan(walf)
    assert sc is not None and sc.last_commit > 0
    pos = sc.frame_offset(sc.last_commit) + wal.FRAME_HEADER + 100  # inside the last commit frame's page
    with open(walf, "r+b") as f:
        f.seek(pos)
        b = f.read(8)
        f.seek(pos)
        f.write(bytes(x ^ 0x5A for x in b))
    srv.start()
    with Client(srv.address, timeout=60) as c:
        n = c.count("x")
        got = c.get("x", np.arange(6000), with_vectors=True, with_payloads=False)
        stored = {int(i): v for i, v in zip(got.ids, got.vectors)}
        assert len(stored) == n and set(stored) <= set(truth) | set(range(5000, 5100))
        for i, v in stored.items():
            assert np.array_equal(v, _vec(i, 1))
        _served(c, "x", stored)  # searches agree with what the store holds: nothing phantom
    srv.stop()
    log = srv.log_path.read_text()
    assert "is corrupt" in log and "failed their checksums" in log, log[-3000:]
    assert n == 1500  # the damaged transaction (the last upsert) is gone, everything before it is there
    assert "beyond the store" in log  # so the snapshot that included it was refused and the index rebuilt
