"""Offline (batch) builds of vector collections: files in, a collection folder the server serves out.

    python -m index_builder build --input base.fvecs --collection sift --index hnsw --shards 2 --data-dir ./data

Output: a collection folder in exactly the server's format (see :mod:`retrieval.vectors.importing`):
``collection.json``; per shard ``shard-<i>/points.sqlite`` (the points, written with the server's
:class:`retrieval.storage.points.PointStore`) and ``shard-<i>/snapshots/<seq>/`` (the index saved by the
server's backend, ``labels.npy`` and ``manifest.json``, written by
:func:`retrieval.vectors.shard_indexer.write_snapshot`), with ``seq`` = the point store's ``meta.last_seq``,
so a server opening the folder loads the snapshot and replays nothing. Ids are routed to shards with
:func:`retrieval.vectors.collection.shard_of`, as the server routes them.

How a shard is built (:func:`build_shard`, the same code in process and as a Ray task):

1. indexes that need training (faiss IVF / PQ) are trained on a uniform sample of the shard's rows,
   drawn in one streaming pass (random keys, keep the smallest: a seeded reservoir), size
   ``train_sample`` (default 4 x the backend's ``train_size``), as faiss recommends;
2. the input is streamed block by block (``block_size`` rows; ``.npy`` / ``*vecs`` are memory-mapped,
   HDF5 and Parquet read slice by slice); each block's rows of this shard are checked (NaN rows,
   dimension, duplicate ids, reserved id, zero vectors for cosine, payload JSON and size), written to
   the point store in one transaction (one write sequence number per block) and added to the index;
3. the index is saved as the snapshot of the last write sequence.

Memory: one block of input, the index being built (e.g. HNSW: ~(4 d + 8 M) bytes per point), the
training sample, and 16 bytes per point for duplicate detection and labels. Data larger than RAM
builds as long as the index fits (use a compressed faiss index, e.g. ``IVF4096,PQ32``, or more shards).

Resuming (documented choice): the build keeps its state in a work folder (``<work>/state``) and the
collection being written in ``<work>/collection``. A finished shard is never rebuilt. Within a shard,
a checkpoint (the index saved by its backend, the labels and the next input row) is written every
``checkpoint_s`` seconds (default 300) after the point store is flushed; a restarted build reloads it
and continues from that row, re-writing into the point store the few blocks after the checkpoint
(upserts are idempotent). This works for every backend (hnsw, faiss, exact), since each can save and
load a partly built index; a trained-but-empty faiss index is checkpointed right after training, so
training is not redone. A work folder whose parameters or input file differ is started over. Nothing
is installed until every shard is finished, so a failed or interrupted build never replaces a good
collection.

``--ray [ADDRESS]`` runs each shard's :func:`build_shard` as a Ray task (``threads`` CPUs each); the
work folder must be on storage the Ray workers can reach (one machine, or a shared file system). The
result is the same as in process: same routing, same sampling seeds, same insertion order.

Thread-safety: a build owns its work folder; do not run two builds on one work folder at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.readers import DEFAULT_BLOCK_SIZE, DuplicateIdChecker, VectorReader, open_reader
from retrieval.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from retrieval.indexes import registry
from retrieval.indexes.base import IndexSpec
from retrieval.jobs import JobContext
from retrieval.storage import atomic
from retrieval.storage.names import validate_name
from retrieval.vectors.collection import Limits, shard_of
from retrieval.vectors.config import METRICS, CollectionConfig
from retrieval.vectors.delta import NO_ID
from retrieval.vectors.results import prepare_vectors
from retrieval.vectors.shard_indexer import write_snapshot

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def parse_index_spec(text: str | dict | None) -> IndexSpec:
    """The CLI's index syntax: ``hnsw`` / ``exact`` / ``faiss`` or a JSON object such as
    ``{"type": "faiss", "factory": "IVF256,PQ16"}`` (as in ``retrieval collections create``)."""
    if isinstance(text, str) and text.strip().startswith("{"):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"--index is not valid JSON: {e}") from None
    return registry.spec_from_dict(text)


# ------------------------------------------------------------------------------------------------
# What to build
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines a build's output.

    input: a file or a folder of files of one format. format: reader name or ``"auto"`` (from the
    extension). dimension: expected dimension (None: the file's). metric: ``l2`` / ``ip`` / ``cosine``
    (None: the HDF5 file's ``distance`` attribute, else ``l2``). index: spec dict or name. shards: >= 1.
    block_size: rows read per block. id_start: first generated id, for files without ids (row r gets
    ``id_start + r``). train_sample: training sample per shard (0: 4 x the backend's train size).
    seed: sampling seed. reader_options: passed to the reader (``dataset`` for HDF5; ``vector_column``,
    ``id_column``, ``payload_columns`` for Parquet). max_payload_bytes: per point, as the server's limit.
    """

    input: str
    collection: str
    format: str = "auto"
    dimension: int | None = None
    metric: str | None = None
    index: Any = "hnsw"
    shards: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    id_start: int = 0
    train_sample: int = 0
    seed: int = 0
    reader_options: dict = field(default_factory=dict)
    max_payload_bytes: int = Limits.max_payload_bytes

    def open_reader(self) -> VectorReader:
        fmt = None if self.format in ("auto", "", None) else self.format
        opts = dict(self.reader_options)
        path = Path(self.input)
        if (fmt == "hdf5" or (fmt is None and path.suffix.lower() in (".hdf5", ".h5"))) and "require" not in opts:
            opts["require"] = (opts.get("dataset", "train"),)  # a file with the base alone is fine
        return open_reader(path, fmt, **opts)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["index"] = registry.spec_to_dict(parse_index_spec(self.index))
        return out

    @classmethod
    def from_json(cls, d: dict) -> "BuildSpec":
        return cls(**d)


def resolve(spec: BuildSpec) -> tuple[BuildSpec, CollectionConfig, dict]:
    """Check ``spec`` against its input file: returns the spec with dimension and metric filled in, the
    collection config, and facts about the input (rows, dim, dtype, ids, payloads, file stamp)."""
    validate_name(spec.collection, "collection name")
    if not isinstance(spec.shards, int) or spec.shards < 1:
        raise InvalidArgument(f"shards must be a positive integer, got {spec.shards!r}")
    if not isinstance(spec.block_size, int) or spec.block_size < 1:
        raise InvalidArgument(f"block_size must be a positive integer, got {spec.block_size!r}")
    if spec.metric is not None and spec.metric not in METRICS:
        raise InvalidArgument(f"unknown metric {spec.metric!r}; valid: {', '.join(METRICS)}")
    if not isinstance(spec.id_start, int) or spec.id_start < 0:
        raise InvalidArgument(f"id_start must be a non-negative integer, got {spec.id_start!r}")
    index = parse_index_spec(spec.index)
    with spec.open_reader() as r:
        if spec.dimension is not None and spec.dimension != r.dim:
            raise InvalidArgument(f"input {str(r.path)!r} has dimension {r.dim}, but --dimension {spec.dimension} "
                                  "was asked for")
        metric = spec.metric or getattr(r, "metric", None) or "l2"
        if not r.has_ids and spec.id_start + r.count > int(NO_ID):
            raise InvalidArgument(f"id_start {spec.id_start} + {r.count} rows passes the largest id 2**64 - 2")
        facts = {"rows": r.count, "dim": r.dim, "dtype": str(r.dtype), "has_ids": r.has_ids,
                 "has_payloads": r.has_payloads, "format": r.format, "stamp": _stamp(Path(spec.input))}
    config = CollectionConfig(name=spec.collection, dimension=facts["dim"], metric=metric, index=index,
                              shards=spec.shards).validate()
    registry.validate(index, facts["dim"], metric)  # a spec that would crash the build (or a server): refused now
    spec = dataclasses.replace(spec, dimension=facts["dim"], metric=metric, index=registry.spec_to_dict(index))
    return spec, config, facts


def _stamp(path: Path) -> list:
    """Size and modification time of the input (every file of a folder), to notice a changed input."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# ------------------------------------------------------------------------------------------------
# Work folder state
# ------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    atomic.write_json(path, obj)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class ShardStats:
    shard: int
    points: int = 0
    rows_scanned: int = 0
    read_s: float = 0.0        # reading and checking input blocks
    sample_s: float = 0.0      # the sampling pass for training
    train_s: float = 0.0
    store_s: float = 0.0       # writing the point store
    add_s: float = 0.0         # adding to the index
    checkpoint_s: float = 0.0
    snapshot_s: float = 0.0    # writing the index snapshot
    total_s: float = 0.0
    resumed_from_row: int = 0
    last_seq: int = 0


class _Reporter:
    """Progress of one shard: to a callback (in process) and to a small file (read by the driver of
    a Ray build), at most every 0.5 s."""

    def __init__(self, path: Path, callback: Callable[[int, int, str], None] | None) -> None:
        self.path = path
        self.callback = callback
        self._last = 0.0

    def __call__(self, points: int, scanned: int, phase: str, force: bool = False) -> None:
        if self.callback is not None:
            self.callback(points, scanned, phase)
        now = time.monotonic()
        if force or now - self._last >= 0.5:
            self._last = now
            _write_json(self.path, {"points": points, "scanned": scanned, "phase": phase})


# ------------------------------------------------------------------------------------------------
# One shard
# ------------------------------------------------------------------------------------------------
def _block_ids(blk, row: int, spec: BuildSpec) -> np.ndarray:
    if blk.ids is not None:
        return blk.ids
    return np.arange(spec.id_start + row, spec.id_start + row + len(blk.vectors), dtype=np.uint64)


def _payload_json(p: dict | None, path: str, row: int, limit: int) -> str | None:
    if p is None:
        return None
    try:
        s = json.dumps(p, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{path!r} row {row}: the payload cannot be written as JSON ({e})") from None
    if len(s) > limit:
        raise InvalidArgument(f"{path!r} row {row}: the payload is {len(s)} characters of JSON; the limit is {limit}")
    return s


def _check_rows(ids: np.ndarray, x: np.ndarray, rows: np.ndarray, metric: str, path: str) -> None:
    bad = np.flatnonzero(ids == NO_ID)
    if len(bad):
        raise InvalidArgument(f"{path!r} row {int(rows[bad[0]])}: id 18446744073709551615 (2**64 - 1) is reserved")
    if metric == "cosine" and len(x):
        zero = np.flatnonzero(~(np.abs(x).max(axis=1) > 0))
        if len(zero):
            raise InvalidArgument(f"{path!r} row {int(rows[zero[0]])}: the vector is all zeros; cosine distance "
                                  "is undefined for it")


def _expected_rows(spec: BuildSpec, facts: dict, shard: int) -> int:
    n, s = facts["rows"], spec.shards
    if s == 1:
        return n
    if not facts["has_ids"]:
        total = 0
        for a in range(0, n, 1 << 20):
            ids = np.arange(spec.id_start + a, spec.id_start + min(a + (1 << 20), n), dtype=np.uint64)
            total += int((shard_of(ids, s) == shard).sum())
        return total
    return int(n / s * 1.05) + 1024


def _save_checkpoint(state: Path, index, ids: list, rows: list, next_row: int, store_seq: int) -> None:
    tmp = state / f"ckpt.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    files = index.save(tmp)
    np.save(tmp / "ids.npy", np.concatenate(ids) if ids else np.zeros(0, np.uint64))
    np.save(tmp / "rows.npy", np.concatenate(rows) if rows else np.zeros(0, np.int64))
    _write_json(tmp / "ckpt.json", {"next_row": next_row, "store_seq": store_seq, "files": files,
                                    "points": int(sum(len(a) for a in ids))})
    atomic.replace_dir(tmp, state / "ckpt")  # the previous one is renamed aside first: a crash keeps one


def _load_checkpoint(state: Path, spec_obj: IndexSpec, d: int, index_metric: str, threads: int):
    atomic.recover_dir(state / "ckpt")
    for name in ("ckpt", "ckpt.old"):  # ckpt.old: written by earlier versions
        c = state / name
        meta = _read_json(c / "ckpt.json")
        if meta is None:
            continue
        try:
            index = registry.load(spec_obj, c, d, index_metric, threads)
            ids = np.load(c / "ids.npy")
            rows = np.load(c / "rows.npy")
        except Exception as e:  # a damaged checkpoint: try the older one, else start the shard over
            logger.warning("ignoring unreadable checkpoint %s: %s", c, e)
            continue
        if len(ids) != meta["points"] or len(rows) != len(ids):
            continue
        return index, ids, rows, meta
    return None


def _rows_of_shard(blk, row: int, spec: BuildSpec, shard: int, nshards: int):
    """``(ids, vectors, input rows, payloads)`` of the rows of block ``blk`` (starting at input row ``row``)
    that belong to ``shard``."""
    ids = _block_ids(blk, row, spec)
    rows = np.arange(row, row + len(blk.vectors), dtype=np.int64)
    if nshards == 1:
        return ids, blk.vectors, rows, blk.payloads
    sel = np.flatnonzero(shard_of(ids, nshards) == shard)
    pls = [blk.payloads[i] for i in sel.tolist()] if blk.payloads is not None else None
    return ids[sel], blk.vectors[sel], rows[sel], pls


def _train_on_sample(index, reader, spec: BuildSpec, config: CollectionConfig, shard: int, st: ShardStats,
                     report, check_cancelled) -> bool:
    """Train ``index`` (faiss IVF / PQ) on a seeded uniform sample of this shard's rows (one pass over the
    input, keeping the rows with the smallest random keys); False when the shard has too few points."""
    d, metric, nshards = config.dimension, config.metric, config.shards
    need = index.train_size()
    target = spec.train_sample or 4 * need
    t0 = time.perf_counter()
    rng = np.random.default_rng([spec.seed, shard])
    keys = np.zeros(0)
    sample = np.zeros((0, d), np.float32)
    row = 0
    for blk in reader.blocks(spec.block_size, check_duplicates=False):
        ids = _block_ids(blk, row, spec)
        x = blk.vectors if nshards == 1 else blk.vectors[shard_of(ids, nshards) == shard]
        kb = rng.random(len(x))
        keys = np.concatenate([keys, kb])
        sample = np.vstack([sample, x])
        if len(keys) > target:
            keep = np.argpartition(keys, target)[:target]
            keys, sample = keys[keep], sample[keep]
        row += len(blk.vectors)
        report(0, row, "sampling for training")
        if check_cancelled is not None:
            check_cancelled()
    st.sample_s = time.perf_counter() - t0
    if len(sample) < max(need, 1):
        logger.warning("shard %d has %d points, fewer than the %d the index needs to train; its points are "
                       "stored and the server indexes them once enough exist", shard, len(sample), need)
        return False
    order = np.argsort(keys, kind="stable")  # a fixed order, independent of block size
    t0 = time.perf_counter()
    index.train(prepare_vectors(sample[order], metric))
    st.train_s = time.perf_counter() - t0
    logger.info("shard %d: trained %s on %d points in %.1f s", shard, config.index.kind, len(sample), st.train_s)
    return True


def build_shard(spec_json: dict, config_json: dict, facts: dict, shard: int, work: str, threads: int = 0,
                checkpoint_s: float = 300.0, progress: Callable[[int, int, str], None] | None = None,
                check_cancelled: Callable[[], None] | None = None) -> dict:
    """Build shard ``shard`` of the collection into ``<work>/collection/shard-<shard>`` (resuming from
    ``<work>/state/shard-<shard>``); returns its :class:`ShardStats` as a dict. A plain function of
    JSON-able arguments, so it runs as a Ray task as it is.

    progress(points, rows_scanned, phase) is called after each block; check_cancelled() between blocks
    (raising stops the build; the checkpoint stays for a resume).
    """
    from retrieval.storage.points import PointStore

    t_start = time.perf_counter()
    spec = BuildSpec.from_json(spec_json)
    config = CollectionConfig.from_json(config_json)
    work_p = Path(work)
    state = work_p / "state" / f"shard-{shard}"
    folder = work_p / "collection" / f"shard-{shard}"
    state.mkdir(parents=True, exist_ok=True)
    done = _read_json(state / "done.json")
    if done is not None and folder.is_dir():
        return done
    index_spec = config.index
    d, metric = config.dimension, config.metric
    index_metric = "l2" if metric == "l2" else "ip"
    nshards = config.shards
    st = ShardStats(shard=shard)
    report = _Reporter(state / "progress.json", progress)

    ck = _load_checkpoint(state, index_spec, d, index_metric, threads) if folder.is_dir() else None
    if ck is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        index = registry.create(index_spec, d, index_metric, threads)
        ids_done: list[np.ndarray] = []
        rows_done: list[np.ndarray] = []
        next_row = 0
    else:
        index, ids0, rows0, meta = ck
        ids_done, rows_done = [ids0], [rows0]
        next_row = st.resumed_from_row = int(meta["next_row"])
        logger.info("shard %d: resuming at input row %d with %d points from the checkpoint", shard, next_row,
                    len(ids0))
    store = PointStore(folder / "points.sqlite", d, "NORMAL")
    try:
        if ck is not None and store.count() < len(ids_done[0]):
            raise FailedPrecondition(f"the point store of shard {shard} holds fewer points than its checkpoint")
        n_points = int(sum(len(a) for a in ids_done))
        dup = DuplicateIdChecker(repr(spec.input)) if facts["has_ids"] else None
        if dup is not None and n_points:
            dup.add(ids_done[0], 0, rows=rows_done[0])
        reader = spec.open_reader()
        try:
            path = str(reader.path)
            # ---- training (faiss IVF / PQ): a seeded uniform sample of this shard's rows
            if not index.is_trained() and _train_on_sample(index, reader, spec, config, shard, st, report,
                                                           check_cancelled):
                _save_checkpoint(state, index, ids_done, rows_done, 0, store.last_seq)
            index.reserve(max(0, _expected_rows(spec, facts, shard) - n_points))
            # ---- the points, block by block
            last_ckpt = time.monotonic()
            row = next_row
            t_read = time.perf_counter()
            for blk in reader.blocks(spec.block_size, start=next_row, check_duplicates=False):
                m = len(blk.vectors)
                ids, x, rows, pls = _rows_of_shard(blk, row, spec, shard, nshards)
                _check_rows(ids, x, rows, metric, path)
                if dup is not None:
                    dup.add(ids, row, rows=rows)
                pj = None
                if pls is not None:
                    pj = [_payload_json(p, path, int(r), spec.max_payload_bytes) for p, r in zip(pls, rows.tolist())]
                st.read_s += time.perf_counter() - t_read
                if len(ids):
                    t0 = time.perf_counter()
                    store.upsert(ids, x, pj)
                    st.store_s += time.perf_counter() - t0
                    if index.is_trained():
                        t0 = time.perf_counter()
                        index.add(prepare_vectors(x, metric), np.arange(n_points, n_points + len(ids), dtype=np.int64))
                        st.add_s += time.perf_counter() - t0
                        ids_done.append(np.asarray(ids, np.uint64))
                        rows_done.append(rows)
                    n_points += len(ids)
                row += m
                st.rows_scanned = row - next_row
                report(n_points, row, "indexing")
                if check_cancelled is not None:
                    check_cancelled()
                if index.is_trained() and time.monotonic() - last_ckpt >= checkpoint_s and row < reader.count:
                    t0 = time.perf_counter()
                    store.checkpoint()  # the points up to here are on disk before the checkpoint says so
                    _save_checkpoint(state, index, ids_done, rows_done, row, store.last_seq)
                    st.checkpoint_s += time.perf_counter() - t0
                    last_ckpt = time.monotonic()
                t_read = time.perf_counter()
        finally:
            reader.close()
        # ---- the snapshot, as of the store's last write
        st.points = n_points
        st.last_seq = store.last_seq
        if index.is_trained() and n_points:
            t0 = time.perf_counter()
            report(n_points, row, "writing snapshot", force=True)
            labels = np.concatenate(ids_done)
            write_snapshot(folder / "snapshots", index, labels, store.last_seq, index_spec, d, index_metric)
            st.snapshot_s = time.perf_counter() - t0
        store.checkpoint()
    finally:
        store.close()
    for leftover in ("points.sqlite-wal", "points.sqlite-shm"):
        p = folder / leftover
        if p.exists() and p.stat().st_size == 0:
            p.unlink()
    st.total_s = time.perf_counter() - t_start
    out = dataclasses.asdict(st)
    _write_json(state / "done.json", out)
    for name in ("ckpt", "ckpt.old"):
        shutil.rmtree(state / name, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# All shards: in process or as Ray tasks
# ------------------------------------------------------------------------------------------------
def _ray_build_shard(*args, **kw):  # module-level, so Ray pickles it by reference
    return build_shard(*args, **kw)


def _run_local(ctx: JobContext, spec: BuildSpec, config: CollectionConfig, facts: dict, work: Path,
               todo: list[int], threads: int, checkpoint_s: float, base: int) -> dict[int, dict]:
    out = {}
    total = facts["rows"]
    for i in todo:
        def progress(points: int, scanned: int, phase: str, _base=base) -> None:
            if phase == "indexing":
                ctx.progress(_base + points, total, "indexing")
            elif phase == "sampling for training":
                ctx.progress(scanned, total, f"shard {i}: sampling for training")

        out[i] = build_shard(spec.to_json(), config.to_json(), facts, i, str(work), threads, checkpoint_s,
                             progress, ctx.check_cancelled)
        base += out[i]["points"]
    return out


def _run_ray(ctx: JobContext, spec: BuildSpec, config: CollectionConfig, facts: dict, work: Path,
             todo: list[int], threads: int, checkpoint_s: float, base: int, ray_address: str | None) -> dict[int, dict]:
    import ray

    from retrieval.vectors.ray_shards import connect, unwrap_error

    started = not ray.is_initialized()
    connect(ray_address)
    try:
        cpus = max(1, threads)
        task = ray.remote(_ray_build_shard).options(num_cpus=cpus, retry_exceptions=False, max_retries=3)
        refs = {task.remote(spec.to_json(), config.to_json(), facts, i, str(work), cpus, checkpoint_s): i
                for i in todo}
        out: dict[int, dict] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                for r in ready:
                    try:
                        out[refs[r]] = ray.get(r)
                    except Exception as e:
                        err = unwrap_error(e)
                        raise (err if err is not e else RuntimeError(f"shard {refs[r]} failed: {e}")) from None
                points = base + sum(v["points"] for v in out.values())
                for i in todo:
                    if i not in out:
                        p = _read_json(work / "state" / f"shard-{i}" / "progress.json") or {}
                        points += int(p.get("points", 0))
                ctx.progress(points, facts["rows"], "indexing")
                ctx.check_cancelled()
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
        return out
    finally:
        if started:
            ray.shutdown()


def build_folder(ctx: JobContext, spec: BuildSpec, work: Path, *, threads: int = 0, checkpoint_s: float = 300.0,
                 use_ray: bool = False, ray_address: str | None = None) -> dict:
    """Build (or resume building) the collection folder ``<work>/collection``; returns the stats.

    ``threads``: index threads per shard (0: all cores in process; 1 per Ray task). ``use_ray``: run
    the shard builds as Ray tasks on ``ray_address`` (None: a local Ray instance, or the cluster this
    process is already connected to).
    """
    t0 = time.perf_counter()
    spec, config, facts = resolve(spec)
    work = Path(work)
    plan = {"version": STATE_VERSION, "spec": spec.to_json(), "config": {**config.to_json(), "created_at": 0},
            "facts": facts}
    key = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    old = _read_json(work / "state" / "plan.json")
    if old is not None and old.get("key") != key:
        logger.warning("work folder %s holds a build with other parameters or another input; starting over", work)
        shutil.rmtree(work / "state", ignore_errors=True)
        shutil.rmtree(work / "collection", ignore_errors=True)
    elif old is not None:
        config = dataclasses.replace(config, created_at=float(old["created_at"]))
    (work / "state").mkdir(parents=True, exist_ok=True)
    (work / "collection").mkdir(parents=True, exist_ok=True)
    _write_json(work / "state" / "plan.json", {"key": key, "created_at": config.created_at, **plan})
    coll = work / "collection"
    if (coll / "collection.json").exists():
        shard_stats = {i: _read_json(work / "state" / f"shard-{i}" / "done.json") for i in range(config.shards)}
        if all(v is not None for v in shard_stats.values()):
            return _summary(spec, config, facts, shard_stats, coll, time.perf_counter() - t0, use_ray)
        (coll / "collection.json").unlink()
    done = {i: _read_json(work / "state" / f"shard-{i}" / "done.json") for i in range(config.shards)}
    done = {i: v for i, v in done.items() if v is not None and (coll / f"shard-{i}").is_dir()}
    todo = [i for i in range(config.shards) if i not in done]
    if done:
        logger.info("resuming: shards %s are finished, building %s", sorted(done), todo)
    base = sum(v["points"] for v in done.values())
    ctx.progress(base, facts["rows"], "indexing")
    if todo:
        run = _run_ray if use_ray else _run_local
        kw = {"ray_address": ray_address} if use_ray else {}
        done.update(run(ctx, spec, config, facts, work, todo, threads, checkpoint_s, base, **kw))
    ctx.check_cancelled()
    from retrieval.vectors.importing import write_config

    write_config(coll, config)
    return _summary(spec, config, facts, done, coll, time.perf_counter() - t0, use_ray)


def _summary(spec, config, facts, shard_stats, folder, seconds, use_ray) -> dict:
    stats = [shard_stats[i] for i in sorted(shard_stats)]
    points = sum(s["points"] for s in stats)
    phases = {k: sum(s[k] for s in stats) for k in ("read_s", "sample_s", "train_s", "store_s", "add_s",
                                                   "checkpoint_s", "snapshot_s")}
    return {"collection": config.name, "folder": str(folder), "points": points, "rows": facts["rows"],
            "dimension": config.dimension, "metric": config.metric, "index": registry.spec_to_dict(config.index),
            "shards": config.shards, "ray": use_ray, "seconds": seconds,
            "points_per_s": points / seconds if seconds > 0 else 0.0, "phases_s": phases, "shard_stats": stats}


# ------------------------------------------------------------------------------------------------
# The CLI's flow: build, then install into a data folder or push to a running server
# ------------------------------------------------------------------------------------------------
def default_work_dir(collection: str, data_dir: str | Path | None) -> Path:
    """``<data_dir>/builds/<collection>``, or ``./builds/<collection>`` without a data folder (--push)."""
    return Path(data_dir) / "builds" / collection if data_dir is not None else Path("builds") / collection


def scratch_dir(collection: str, data_dir: str | Path | None = None, work_dir: str | Path | None = None) -> Path:
    """A new folder for a local job context, inside the build's work folder (never the system temp
    folder: a build that a native library kills leaves nothing outside the data folder, and the next
    finished build of that collection removes it with its work folder)."""
    validate_name(collection, "collection name")
    base = Path(work_dir) if work_dir is not None else default_work_dir(collection, data_dir)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".ctx-", dir=base))


def remove_scratch(path: Path) -> None:
    """Remove a :func:`scratch_dir` folder, and the work folder and ``builds`` above it when empty."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    for parent in (path.parent, path.parent.parent):
        if parent.name != "builds" and parent != path.parent:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def build(ctx: JobContext, spec: BuildSpec, *, data_dir: str | Path | None = None, push: str | None = None,
          work_dir: str | Path | None = None, replace: bool = False, threads: int = 0,
          checkpoint_s: float = 300.0, use_ray: bool = False, ray_address: str | None = None,
          keep_work: bool = False, timeout: float | None = None, client_options: dict | None = None) -> dict:
    """Build ``spec`` and install it: into ``data_dir`` (no server may be running on it) or, with
    ``push`` (``host:port``), into a running server through the Collections.Import RPC, which copies
    the folder (so ``work_dir`` must be inside the server's allowed folders, ``security.client_file_dirs``,
    default ``<server data dir>/imports``). Returns the build stats plus ``installed`` (the folder) or
    ``server`` (the collection as the server describes it)."""
    if (data_dir is None) == (push is None):
        raise InvalidArgument("give exactly one of --data-dir DIR (write into a data folder) and --push HOST:PORT "
                              "(import into a running server)")
    validate_name(spec.collection, "collection name")
    work_dir_default = work_dir is None
    if work_dir is None:
        work_dir = default_work_dir(spec.collection, data_dir)
    work = Path(work_dir).resolve()
    client = None
    if push is not None:
        from retrieval.client import Client

        client = Client(push, timeout=30, **(client_options or {}))
        try:
            client.wait_ready(15)
            if not replace and any(c["name"] == spec.collection for c in client.list_collections()):
                raise AlreadyExists(f"collection {spec.collection!r} already exists on {push}; pass --replace to "
                                    "replace it")
            # before the build, not after it: the server must be allowed to read the folder it will import
            client.import_collection(spec.collection, str(work / "collection"), replace=replace, check_only=True)
        except BaseException:
            client.close()
            raise
    else:
        from retrieval.vectors.importing import data_dir_lock, folders_by_name

        with data_dir_lock(Path(data_dir)):  # fail now, not after the build, when a server holds it
            pass
        if not replace and folders_by_name(Path(data_dir) / "collections").get(spec.collection):
            raise AlreadyExists(f"collection {spec.collection!r} already exists in {data_dir}; pass --replace to "
                                "replace it")
    try:
        out = build_folder(ctx, spec, work, threads=threads, checkpoint_s=checkpoint_s, use_ray=use_ray,
                           ray_address=ray_address)
        t0 = time.perf_counter()
        ctx.progress(0, 1, "installing")
        if client is not None:
            out["server"] = client.import_collection(spec.collection, str(work / "collection"), replace=replace,
                                                     timeout=timeout)
        else:
            from retrieval.vectors.importing import install_offline

            out["installed"] = str(install_offline(Path(data_dir), work / "collection", spec.collection, replace))
        out["install_s"] = time.perf_counter() - t0
        ctx.progress(1, 1, "installing")
    finally:
        if client is not None:
            client.close()
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
        if work_dir_default and work.parent.name == "builds":
            try:
                work.parent.rmdir()  # only when empty
            except OSError:
                pass
    return out


__all__ = ["BuildSpec", "build", "build_folder", "build_shard", "default_work_dir", "parse_index_spec", "remove_scratch",
           "resolve", "scratch_dir"]
