"""Benchmark datasets: the shipped real sets, any ann-benchmarks HDF5, seeded synthetic sets.

Every dataset comes as a :class:`Dataset`: float32 base ``xb (n, d)`` and queries ``xq (nq, d)``,
the metric, and the exact ground truth (ids and float64 distances in :mod:`bench.ann.metrics` units,
top-``K`` with ``K`` >= the benchmark's k).

Registry (``--dataset NAME``; an unknown name lists the valid ones):

=================  ===============================================================================
``bigann-10k``     BIGANN/SIFT 10k base x 128 (uint8 -> float32), the 100 shipped queries, the shipped
                   top-100 ground truth; L2
``glove-50-10k``   GloVe 6B 50-d, 10k words, rows L2-normalised; queries = the first 1,000 rows of
                   ``default_rng(0).permutation(10000)``, base = the other 9,000; cosine
``mnist-10k``      MNIST t10k images as float32 0..255; base = rows 0-8999, queries = rows 9000-9999; L2
``gmm-<n>-<d>``    seeded Gaussian mixture, e.g. ``gmm-1m-128``, ``gmm-200k-96`` (see
                   :func:`gaussian_mixture`); exact ground truth computed once and cached in ``bench/cache``
=================  ===============================================================================

The folder names of the shipped sets (``bigann-128-euclidean-10k`` ...) are accepted as aliases.
``--hdf5 PATH`` loads an ann-benchmarks file (``train`` / ``test`` / ``neighbors``, attribute ``distance``).

Splits are those of ``bench/datasets/vectors/BASELINES.md``; the ground truth of GloVe and MNIST is
brute-forced at load time (under a second), not stored.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.ann.metrics import distances
from retrieval.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "datasets" / "vectors"
CACHE_DIR = Path(os.environ.get("BENCH_CACHE", Path(__file__).resolve().parents[1] / "cache"))
GT_K = 100
"""Neighbours kept in computed ground truth (k of a run may be at most this)."""


@dataclasses.dataclass
class Dataset:
    """A benchmark dataset held in memory.

    name: registry name. metric: ``"l2"`` / ``"ip"`` / ``"cosine"`` (cosine rows are normalised).
    xb: float32 ``(n, d)``. xq: float32 ``(nq, d)``. gt_ids: int64 ``(nq, K)``. gt_dist: float64
    ``(nq, K)`` ascending (metrics units). source: where it came from (file, generator and seed).
    """

    name: str
    metric: str
    xb: np.ndarray
    xq: np.ndarray
    gt_ids: np.ndarray
    gt_dist: np.ndarray
    source: str

    @property
    def n(self) -> int:
        return int(self.xb.shape[0])

    @property
    def d(self) -> int:
        return int(self.xb.shape[1])

    @property
    def nq(self) -> int:
        return int(self.xq.shape[0])

    def info(self) -> dict[str, object]:
        return {"name": self.name, "metric": self.metric, "n": self.n, "d": self.d, "nq": self.nq,
                "gt_k": int(self.gt_ids.shape[1]), "source": self.source}

    def subset(self, max_n: int | None = None, max_queries: int | None = None) -> Dataset:
        """The first ``max_n`` base rows and ``max_queries`` queries; ground truth recomputed exactly
        when the base is cut."""
        xb, xq, ids, dist = self.xb, self.xq, self.gt_ids, self.gt_dist
        name = self.name
        if max_queries is not None and max_queries < len(xq):
            if max_queries < 1:
                raise InvalidArgument(f"max_queries must be >= 1, got {max_queries}")
            xq, ids, dist = xq[:max_queries], ids[:max_queries], dist[:max_queries]
            name += f"-q{max_queries}"
        if max_n is not None and max_n < len(xb):
            if max_n < 1:
                raise InvalidArgument(f"max_n must be >= 1, got {max_n}")
            xb = xb[:max_n]
            ids, dist = exact_ground_truth(xq, xb, self.metric, min(GT_K, max_n))
            name += f"-n{max_n}"
        if name == self.name:
            return self
        return Dataset(name, self.metric, xb, xq, ids, dist, self.source + f" (subset n={len(xb)}, nq={len(xq)})")


def exact_ground_truth(
    xq: np.ndarray, xb: np.ndarray, metric: str, k: int = GT_K
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (ids int64, distances float64 in metrics units) by
    :func:`index_builder.ground_truth.exact_knn` (blocked torch, CUDA when present)."""
    from index_builder.ground_truth import exact_knn

    k = min(k, len(xb))
    D, ids = exact_knn(xq, xb, k, metric)
    if metric == "l2":
        D = np.sqrt(np.maximum(D, 0.0))
    return ids, D


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def load_bigann() -> Dataset:
    p = DATA_DIR / "bigann-128-euclidean-10k"
    xb = np.load(p / "base.u8.npy").astype(np.float32)
    xq = np.load(p / "queries.u8.npy").astype(np.float32)
    ids = np.load(p / "groundtruth.i64.npy")
    return Dataset("bigann-10k", "l2", xb, xq, ids, distances(xq, xb, ids, "l2"), str(p.relative_to(DATA_DIR.parents[1])))


def load_glove() -> Dataset:
    p = DATA_DIR / "glove-50-angular-10k"
    x = _normalise(np.load(p / "vectors.f32.npy"))
    perm = np.random.default_rng(0).permutation(len(x))
    xq, xb = x[perm[:1000]], x[perm[1000:]]
    ids, dist = exact_ground_truth(xq, xb, "cosine")
    return Dataset("glove-50-10k", "cosine", xb, xq, ids, dist, str(p.relative_to(DATA_DIR.parents[1])))


def load_mnist() -> Dataset:
    p = DATA_DIR / "mnist-784-euclidean-test10k"
    with gzip.open(p / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 784).astype(np.float32)
    xb, xq = x[:9000], x[9000:]
    ids, dist = exact_ground_truth(xq, xb, "l2")
    return Dataset("mnist-10k", "l2", xb, xq, ids, dist, str(p.relative_to(DATA_DIR.parents[1])))


SHIPPED: dict[str, Callable[[], Dataset]] = {
    "bigann-10k": load_bigann,
    "glove-50-10k": load_glove,
    "mnist-10k": load_mnist,
}
ALIASES = {
    "bigann-128-euclidean-10k": "bigann-10k",
    "sift-10k": "bigann-10k",
    "glove-50-angular-10k": "glove-50-10k",
    "mnist-784-euclidean-test10k": "mnist-10k",
}
_GMM = re.compile(r"^gmm-(\d+)([km]?)-(\d+)$")


def names() -> list[str]:
    """Registered dataset names (plus the synthetic pattern)."""
    return sorted(SHIPPED) + ["gmm-<n>-<d> (e.g. gmm-1m-128, gmm-200k-128)"]


def load(name: str, *, queries: int = 1000, seed: int = 0, cache_dir: Path | None = None) -> Dataset:
    """The dataset registered as ``name`` (``queries`` / ``seed`` apply to synthetic sets)."""
    name = ALIASES.get(name, name)
    if name in SHIPPED:
        return SHIPPED[name]()
    m = _GMM.match(name)
    if m:
        n = int(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2)]
        return synthetic(n, int(m.group(3)), queries=queries, seed=seed, cache_dir=cache_dir)
    raise NotFound(f"unknown dataset {name!r}; valid datasets: {', '.join(names())}, or use --hdf5 PATH")


def load_hdf5(path: str | os.PathLike[str], metric: str | None = None) -> Dataset:
    """An ann-benchmarks HDF5 file. ``metric`` overrides / replaces the file's ``distance`` attribute.

    The base (``train``) is read through :func:`index_builder.readers.open_ann_hdf5` (validated block
    by block); the ground truth is the file's ``neighbors`` with distances recomputed in float64.
    """
    from index_builder.readers import open_ann_hdf5

    f = open_ann_hdf5(path)
    try:
        metric = metric or f.metric
        if metric is None:
            raise InvalidArgument(f"{str(path)!r} has no 'distance' attribute; pass --metric l2, ip or cosine")
        xb = np.concatenate([b.vectors for b in f.train.blocks()]) if f.train.count else np.zeros((0, f.train.dim), np.float32)
    finally:
        f.train.close()
    xq = f.test
    if metric == "cosine":
        xb, xq = _normalise(xb), _normalise(xq)
    ids = f.neighbors
    return Dataset(Path(path).stem, metric, xb, xq, ids, distances(xq, xb, ids, metric), str(path))


# --------------------------------------------------------------------------------------------------
# synthetic sets
# --------------------------------------------------------------------------------------------------

GMM_VERSION = 1
"""Bumped whenever :func:`gaussian_mixture` changes its output, to invalidate cached ground truth."""


def gaussian_mixture(
    n: int, d: int, nq: int, seed: int = 0, clusters: int = 100, rank: int | None = None, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Gaussian mixture: base ``(n, d)`` and queries ``(nq, d)`` float32, same distribution.

    ``clusters`` centres ``c_j ~ N(0, I_d)``; cluster ``j`` has weight ``w ~ Dirichlet(1)``, a random
    basis ``B_j (r, d)`` with ``N(0, 1/r)`` entries and scale ``s_j ~ U(0.5, 1.5)``; a point of cluster
    ``j`` is ``c_j + s_j z B_j + noise * e`` with ``z ~ N(0, I_r)``, ``e ~ N(0, I_d)``. The low rank
    ``r`` (default ``min(d, 24)``) gives real-data-like intrinsic dimension; pure isotropic noise would
    make every neighbour almost equally far. Generated in chunks of 65,536 rows (deterministic for a
    given seed regardless of memory).
    """
    if n < 1 or d < 1 or nq < 1:
        raise InvalidArgument(f"synthetic sets need n, d, nq >= 1, got n={n}, d={d}, nq={nq}")
    r = min(d, 24) if rank is None else int(rank)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    weights = rng.dirichlet(np.ones(clusters))
    bases = (rng.standard_normal((clusters, r, d), dtype=np.float32) / np.float32(np.sqrt(r)))
    scales = rng.uniform(0.5, 1.5, clusters).astype(np.float32)
    out = np.empty((n + nq, d), dtype=np.float32)
    for a in range(0, n + nq, 65536):
        b = min(a + 65536, n + nq)
        crng = np.random.default_rng([seed, a])
        lab = crng.choice(clusters, size=b - a, p=weights)
        z = crng.standard_normal((b - a, r), dtype=np.float32)
        e = crng.standard_normal((b - a, d), dtype=np.float32)
        x = centres[lab] + noise * e
        for j in np.unique(lab):
            sel = lab == j
            x[sel] += scales[j] * (z[sel] @ bases[j])
        out[a:b] = x
    return out[:n], out[n:]


def synthetic(
    n: int, d: int, queries: int = 1000, seed: int = 0, cache_dir: Path | None = None
) -> Dataset:
    """``gmm-<n>-<d>``: :func:`gaussian_mixture` with exact top-100 ground truth, cached on disk.

    The cache file (``bench/cache/gmm-n{n}-d{d}-q{queries}-s{seed}-v{GMM_VERSION}.npz``, git-ignored)
    holds the ids, distances and a fingerprint of the data; a fingerprint mismatch recomputes it.
    """
    t0 = time.perf_counter()
    xb, xq = gaussian_mixture(n, d, queries, seed)
    logger.info("generated gmm n=%d d=%d nq=%d in %.1f s", n, d, queries, time.perf_counter() - t0)
    fp = hashlib.sha256(xb[:: max(1, n // 4096)].tobytes() + xq.tobytes()).hexdigest()
    cache = Path(cache_dir or CACHE_DIR) / f"gmm-n{n}-d{d}-q{queries}-s{seed}-v{GMM_VERSION}.npz"
    k = min(GT_K, n)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["fingerprint"]) == fp and z["ids"].shape == (queries, k):
                    logger.info("ground truth from cache %s", cache)
                    return Dataset(_gmm_name(n, d), "l2", xb, xq, z["ids"], z["dist"], _gmm_source(n, d, queries, seed))
                logger.warning("cache %s does not match the generated data; recomputing", cache)
        except Exception as e:  # damaged file: recompute
            logger.warning("ignoring unreadable cache %s: %s", cache, e)
    t0 = time.perf_counter()
    ids, dist = exact_ground_truth(xq, xb, "l2", k)
    logger.info("exact ground truth for %s in %.1f s", cache.name, time.perf_counter() - t0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, ids=ids, dist=dist, fingerprint=np.array(fp))
    os.replace(tmp, cache)
    return Dataset(_gmm_name(n, d), "l2", xb, xq, ids, dist, _gmm_source(n, d, queries, seed))


def _gmm_name(n: int, d: int) -> str:
    if n % 1_000_000 == 0:
        return f"gmm-{n // 1_000_000}m-{d}"
    if n % 1000 == 0:
        return f"gmm-{n // 1000}k-{d}"
    return f"gmm-{n}-{d}"


def _gmm_source(n: int, d: int, nq: int, seed: int) -> str:
    return (f"synthetic Gaussian mixture v{GMM_VERSION}: n={n}, d={d}, nq={nq}, seed={seed}, 100 clusters, "
            f"rank {min(d, 24)}, noise 0.1 (bench.ann.datasets.gaussian_mixture)")
