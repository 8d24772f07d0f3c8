"""Exact k-nearest-neighbour ground truth for benchmark queries, with the base streamed in blocks.

For queries ``xq (nq, d)`` and a base ``xb (n, d)`` read block by block (an array, or any
:class:`index_builder.readers.VectorReader`, so bases larger than memory work), returns for every query
the ``k`` base rows with the smallest distance

    l2:      dist(q, x) = ||q - x||^2                       (squared Euclidean)
    ip:      dist(q, x) = -<q, x>                           (negated inner product)
    cosine:  dist(q, x) = 1 - <q, x> / (||q|| ||x||)        (zero vectors count as cos = 0)

so that "smaller is closer" for every metric, with ties broken by the smaller row id (deterministic,
the same order as a stable float64 ``numpy.argsort``).

How, per base block (torch, on the GPU when present):

1. float32 scores by matrix product (``||x||^2 - 2<q, x>`` for l2, ``-<q, x>`` for ip / cosine with
   normalised rows) and ``topk`` of ``k + slack`` candidates per query;
2. the candidates' distances recomputed in float64 from the vectors (``||x||^2 - 2<q, x> + ||q||^2``,
   exact for integer data such as SIFT), so float32 rounding cannot reorder the result; a true
   neighbour is lost only
   if float32 rounding moves it behind ``slack`` other rows of the same block, which needs errors larger
   than the gap between the k-th and the (k+slack)-th neighbour;
3. merged with the running top-k by ``(distance, id)``.

Outputs (:func:`write_ground_truth`): ``.npy`` (ids int64 ``(nq, k)``, and the distances beside it as
``<stem>.distances.npy``) or an ann-benchmarks-style HDF5 (``test``, ``neighbors``, ``distances``,
optionally ``train``; attribute ``distance`` = ``euclidean`` / ``angular`` / ``ip``, with the
ann-benchmarks distance values: Euclidean = sqrt of ours, angular = ours, ip = ours).

:func:`ground_truth_job` is the same computation as a resumable job body (``index_builder
ground-truth``): it checkpoints the running top-k under ``ctx.work_dir`` after every block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.readers import DEFAULT_BLOCK_SIZE, VectorReader, open_reader
from retrieval.core.extras import need
from retrieval.errors import InvalidArgument
from retrieval.jobs import JobContext
from retrieval.storage import atomic

logger = logging.getLogger(__name__)

METRICS = ("l2", "ip", "cosine")
"""Metric names understood here (the collection metrics of the service)."""

_ANN_DISTANCE = {"l2": "euclidean", "cosine": "angular", "ip": "ip"}

DEFAULT_SLACK = 32
"""Extra float32 candidates per query and block that are re-ranked in float64."""


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def _check_queries(xq: Any) -> np.ndarray:
    xq = np.asarray(xq)
    if xq.ndim != 2 or xq.shape[0] < 1 or xq.shape[1] < 1:
        raise InvalidArgument(f"queries must be a non-empty 2-D array (nq, d), got shape {xq.shape}")
    if xq.dtype.kind not in "iuf":
        raise InvalidArgument(f"queries must be numeric, got dtype {xq.dtype}")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(xq).all(axis=1))
    if len(bad):
        raise InvalidArgument(f"query row {int(bad[0])} holds NaN or infinity; queries must be finite")
    return xq


def _base_blocks(base: Any, block_size: int, start: int) -> tuple[int, int, Iterator[tuple[int, np.ndarray]]]:
    """(count, dim, iterator of (first_row, float32 block)) for an array, a reader or an iterable."""
    if isinstance(base, VectorReader):
        reader = base

        def it() -> Iterator[tuple[int, np.ndarray]]:
            row = start
            for blk in reader.blocks(block_size=block_size, start=start, check_duplicates=False):
                yield row, blk.vectors
                row += len(blk.vectors)

        return reader.count, reader.dim, it()
    if isinstance(base, np.ndarray) or hasattr(base, "__array__"):
        xb = np.asarray(base)
        if xb.ndim != 2 or xb.shape[1] < 1:
            raise InvalidArgument(f"base must be a 2-D array (n, d), got shape {xb.shape}")
        if xb.dtype.kind not in "iuf":
            raise InvalidArgument(f"base must be numeric, got dtype {xb.dtype}")

        def it_arr() -> Iterator[tuple[int, np.ndarray]]:
            for a in range(start, xb.shape[0], block_size):
                blk = np.ascontiguousarray(xb[a : a + block_size], dtype=np.float32)
                bad = np.flatnonzero(~np.isfinite(blk).all(axis=1))
                if len(bad):
                    raise InvalidArgument(f"base row {a + int(bad[0])} holds NaN or infinity")
                yield a, blk

        return int(xb.shape[0]), int(xb.shape[1]), it_arr()
    raise InvalidArgument(
        f"base must be a numpy array or an index_builder.readers.VectorReader, got {type(base).__name__}"
    )


def _torch_device(device: str | None) -> Any:
    import torch

    if device is None:
        from retrieval.device import torch_device

        device = torch_device()
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(f"device {device!r} was asked for but torch sees no CUDA GPU")
    except RuntimeError as e:
        raise InvalidArgument(f"unknown torch device {device!r}: {e}") from e
    return dev


def _merge(d_run: Any, i_run: Any, d_new: Any, i_new: Any, k: int) -> tuple[Any, Any]:
    """Top-k of the union of two candidate lists, ordered by (distance, id). Torch tensors (nq, *)."""
    import torch

    d = torch.cat([d_run, d_new], dim=1)
    i = torch.cat([i_run, i_new], dim=1)
    # padding (-1) must sort after every real id at equal (inf) distance
    key_i = torch.where(i < 0, torch.iinfo(torch.int64).max, i)
    o1 = torch.argsort(key_i, dim=1, stable=True)
    d, i = torch.gather(d, 1, o1), torch.gather(i, 1, o1)
    o2 = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, o2), torch.gather(i, 1, o2)


def exact_knn(
    xq: np.ndarray,
    base: np.ndarray | VectorReader,
    k: int,
    metric: str = "l2",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | None = None,
    slack: int = DEFAULT_SLACK,
    max_scores: int = 1 << 25,
    start_row: int = 0,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    on_block: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``xq`` in ``base``.

    xq: ``(nq, d)`` numeric, finite. base: ``(n, d)`` array (any numeric dtype, sliced block by block,
    so a ``numpy.memmap`` streams) or an open reader. k: neighbours per query (>= 1; when ``n < k`` the
    rows are padded with distance ``inf`` and id ``-1``). metric: ``"l2"`` / ``"ip"`` / ``"cosine"``
    (distances as in the module docstring). block_size: base rows per block (default 65,536).
    device: torch device (default: CUDA when present, else CPU). slack: extra float32 candidates per
    block re-ranked in float64 (default 32). max_scores: cap on the float32 score matrix per step and
    on the gathered float64 candidates (queries are processed in chunks; default 2^25: 128 MiB of
    scores, 128 MiB of candidates).
    start_row / init: resume after ``start_row`` base rows with the running result ``init = (D, I)``.
    on_block(rows_done, D, I): called after each block with the running result (for progress,
    cancellation and checkpoints; raising from it stops the computation).

    Returns ``D`` float64 ``(nq, k)`` ascending and ``I`` int64 ``(nq, k)`` (row numbers in the base).
    Thread-safety: pure function; safe to call from several threads (torch shares the device).
    """
    import torch

    metric = _check_metric(metric)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InvalidArgument(f"k must be a positive integer, got {k!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
    k, block_size = int(k), int(block_size)
    xq = _check_queries(xq)
    n, d, blocks = _base_blocks(base, block_size, start_row)
    if d != xq.shape[1]:
        raise InvalidArgument(f"queries have dimension {xq.shape[1]} but the base has dimension {d}")
    dev = _torch_device(device)
    nq = xq.shape[0]

    q32 = torch.from_numpy(xq).to(dev)
    q64 = q32.double()
    if metric == "cosine":
        q32 = torch.nn.functional.normalize(q32, dim=1)
        q64 = torch.nn.functional.normalize(q64, dim=1)
    if init is not None:
        d_run = torch.from_numpy(np.asarray(init[0], dtype=np.float64)).to(dev)
        i_run = torch.from_numpy(np.asarray(init[1], dtype=np.int64)).to(dev)
        if tuple(d_run.shape) != (nq, k) or tuple(i_run.shape) != (nq, k):
            raise InvalidArgument(f"init must be two ({nq}, {k}) arrays, got {tuple(d_run.shape)}")
    else:
        d_run = torch.full((nq, k), float("inf"), dtype=torch.float64, device=dev)
        i_run = torch.full((nq, k), -1, dtype=torch.int64, device=dev)

    with torch.no_grad():
        for first, blk in blocks:
            if blk.shape[1] != d:
                raise InvalidArgument(f"base rows {first}.. have dimension {blk.shape[1]}, expected {d}")
            x32 = torch.from_numpy(blk).to(dev)
            x64 = x32.double()
            if metric == "cosine":
                x32 = torch.nn.functional.normalize(x32, dim=1)
                x64 = torch.nn.functional.normalize(x64, dim=1)
            nb = x32.shape[0]
            kk = min(k + max(0, int(slack)), nb)
            xx = (x32 * x32).sum(dim=1) if metric == "l2" else None
            xx64 = (x64 * x64).sum(dim=1) if metric == "l2" else None
            # queries per step: bounded by the score matrix and by the gathered candidates
            q_chunk = max(1, min(nq, max_scores // nb, (max_scores // 2) // (kk * d)))
            for a in range(0, nq, q_chunk):
                qa32, qa64 = q32[a : a + q_chunk], q64[a : a + q_chunk]
                s = qa32 @ x32.T  # (c, nb)
                s = xx[None, :] - 2.0 * s if metric == "l2" else -s
                cand = torch.topk(s, kk, dim=1, largest=False, sorted=False).indices  # (c, kk)
                dot = torch.bmm(x64[cand], qa64[:, :, None])[:, :, 0]  # (c, kk) float64
                if metric == "l2":
                    dist = (xx64[cand] - 2.0 * dot + (qa64 * qa64).sum(dim=1, keepdim=True)).clamp_min_(0.0)
                elif metric == "ip":
                    dist = -dot
                else:
                    dist = 1.0 - dot
                d_run[a : a + q_chunk], i_run[a : a + q_chunk] = _merge(
                    d_run[a : a + q_chunk], i_run[a : a + q_chunk], dist, cand + first, k
                )
            if on_block is not None:
                on_block(first + nb, d_run.cpu().numpy(), i_run.cpu().numpy())
    return d_run.cpu().numpy(), i_run.cpu().numpy()


def ann_distances(D: np.ndarray, metric: str) -> np.ndarray:
    """Our distances -> the values ann-benchmarks stores (Euclidean: sqrt of squared L2), float32."""
    metric = _check_metric(metric)
    D = np.asarray(D, dtype=np.float64)
    out = np.sqrt(np.maximum(D, 0.0)) if metric == "l2" else D
    return out.astype(np.float32)


def write_ground_truth(
    path: str | os.PathLike[str],
    D: np.ndarray,
    I: np.ndarray,
    metric: str,
    xq: np.ndarray | None = None,
    base: np.ndarray | VectorReader | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[Path]:
    """Write ``(D, I)`` to ``path`` and return the files written.

    ``.npy``: ``I`` (int64) to ``path`` and ``D`` (float64, our distances) to ``<stem>.distances.npy``.
    ``.hdf5`` / ``.h5``: ann-benchmarks layout: ``neighbors`` (int64), ``distances`` (float32,
    ann-benchmarks values, see :func:`ann_distances`), ``test`` (= ``xq``, required) and, when ``base`` is
    given, ``train`` copied block by block; attributes ``distance``, ``point_type="float"``,
    ``dimension``. Files are written to a temporary name and renamed, so a crash leaves no half file.
    """
    metric = _check_metric(metric)
    path = Path(path)
    ext = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    I = np.asarray(I, dtype=np.int64)
    if ext == ".npy":
        dpath = path.with_name(path.stem + ".distances.npy")
        for p, arr in ((path, I), (dpath, np.asarray(D, dtype=np.float64))):
            atomic.save_npy(p, arr)
        return [path, dpath]
    if ext in (".hdf5", ".h5"):
        h5py = need("h5py", "build", "writing ground truth as HDF5")

        if xq is None:
            raise InvalidArgument("writing ground truth as HDF5 needs the queries (xq) for the 'test' dataset")
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["distance"] = _ANN_DISTANCE[metric]
            f.attrs["point_type"] = "float"
            f.attrs["dimension"] = int(np.asarray(xq).shape[1])
            f.create_dataset("test", data=np.asarray(xq, dtype=np.float32))
            f.create_dataset("neighbors", data=I)
            f.create_dataset("distances", data=ann_distances(D, metric))
            if base is not None:
                n, d, blocks = _base_blocks(base, block_size, 0)
                ds = f.create_dataset("train", shape=(n, d), dtype=np.float32)
                for first, blk in blocks:
                    ds[first : first + len(blk)] = blk
        atomic.install_file(tmp, path)
        return [path]
    raise InvalidArgument(f"ground-truth output {str(path)!r} must end in .npy, .hdf5 or .h5")


def _open_input(path: str, fmt: str | None, dataset: str) -> VectorReader:
    from index_builder.readers import format_for_path

    fmt = fmt or (format_for_path(path) if not Path(path).is_dir() else None)
    if fmt == "hdf5":
        return open_reader(path, fmt, dataset=dataset, require=(dataset,))
    return open_reader(path, fmt)


def ground_truth_job(
    ctx: JobContext,
    *,
    base: str,
    queries: str,
    out: str,
    k: int = 100,
    metric: str = "l2",
    base_format: str | None = None,
    queries_format: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | None = None,
    include_train: bool = False,
) -> dict[str, Any]:
    """Job body: exact k-NN of the ``queries`` file against the ``base`` file, written to ``out``.

    base / queries: paths in any reader format (for HDF5 the base is ``train`` and the queries ``test``;
    both may be the same file). out: ``.npy`` or ``.hdf5`` (see :func:`write_ground_truth`;
    ``include_train`` copies the base into the HDF5 so it is a complete ann-benchmarks file).
    Progress is reported in base rows. After every block the running top-k is saved under
    ``ctx.work_dir``; a restarted job with the same parameters resumes after the last saved block.

    Returns ``{"out": [files], "nq", "n", "d", "k", "metric", "seconds", "resumed_from_row"}``.
    """
    metric = _check_metric(metric)
    t0 = time.perf_counter()
    with _open_input(queries, queries_format, "test") as qr:
        xq = qr.read_all().vectors
    reader = _open_input(base, base_format, "train")
    try:
        if reader.dim != xq.shape[1]:
            raise InvalidArgument(
                f"queries {queries!r} have dimension {xq.shape[1]} but base {base!r} has {reader.dim}"
            )
        key = json.dumps(
            {
                "base": str(Path(base).resolve()),
                "n": reader.count,
                "d": reader.dim,
                "k": int(k),
                "metric": metric,
                "q": hashlib.sha256(xq.tobytes()).hexdigest(),
                "block": int(block_size),
            },
            sort_keys=True,
        )
        state = Path(ctx.work_dir) / "ground_truth_state.npz"
        start, init = 0, None
        if state.exists():
            try:
                with np.load(state, allow_pickle=False) as z:
                    if str(z["key"]) == key:
                        start, init = int(z["next_row"]), (z["D"], z["I"])
            except Exception as e:  # a damaged checkpoint: start over
                logger.warning("ignoring unreadable checkpoint %s: %s", state, e)
        if start:
            logger.info("ground truth resumes at base row %d of %d", start, reader.count)
        ctx.progress(start, reader.count, "exact k-NN")

        def on_block(done: int, D: np.ndarray, I: np.ndarray) -> None:
            atomic.save_npz(state, key=np.array(key), next_row=np.array(done), D=D, I=I)
            ctx.progress(done, reader.count, "exact k-NN")
            ctx.check_cancelled()

        ctx.check_cancelled()
        D, I = exact_knn(
            xq, reader, k, metric, block_size=block_size, device=device, start_row=start, init=init,
            on_block=on_block,
        )
        files = write_ground_truth(out, D, I, metric, xq=xq, base=reader if include_train else None,
                                   block_size=block_size)
    finally:
        reader.close()
    return {
        "out": [str(p) for p in files],
        "nq": int(xq.shape[0]),
        "n": int(reader.count),
        "d": int(reader.dim),
        "k": int(k),
        "metric": metric,
        "seconds": time.perf_counter() - t0,
        "resumed_from_row": start,
    }

