"""Shipped sets load with the BASELINES.md splits; HDF5 files; synthetic sets and their cached ground truth."""

from __future__ import annotations

import gzip

import h5py
import numpy as np
import pytest

from bench.ann import datasets
from bench.ann.metrics import distances
from retrieval.errors import InvalidArgument, NotFound
from tests.reference import exact_knn


def brute_ids(xq, xb, k, metric):
    return exact_knn(xq, xb, k, metric)[1]


def test_bigann():
    ds = datasets.load("bigann-10k")
    assert (ds.n, ds.d, ds.nq, ds.metric) == (10000, 128, 100, "l2")
    assert ds.gt_ids.shape == (100, 100)
    # shipped ground truth distances are ascending
    assert (np.diff(ds.gt_dist, axis=1) >= 0).all()
    assert datasets.load("bigann-128-euclidean-10k").n == 10000  # folder name alias


def test_glove_split_and_normalisation():
    ds = datasets.load("glove-50-10k")
    raw = np.load(datasets.DATA_DIR / "glove-50-angular-10k" / "vectors.f32.npy")
    perm = np.random.default_rng(0).permutation(10000)
    assert (ds.n, ds.nq, ds.metric) == (9000, 1000, "cosine")
    np.testing.assert_allclose(ds.xq[7], raw[perm[7]] / np.linalg.norm(raw[perm[7]]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ds.xb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(ds.gt_ids[:50, :10], brute_ids(ds.xq[:50], ds.xb, 10, "ip"))


def test_mnist_split():
    ds = datasets.load("mnist-10k")
    with gzip.open(datasets.DATA_DIR / "mnist-784-euclidean-test10k" / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(10000, 784)
    assert (ds.n, ds.d, ds.nq, ds.metric) == (9000, 784, 1000, "l2")
    np.testing.assert_array_equal(ds.xq[0], raw[9000].astype(np.float32))
    np.testing.assert_array_equal(ds.gt_ids[:20, :10], brute_ids(ds.xq[:20], ds.xb, 10, "l2"))


def test_subset_recomputes_ground_truth():
    ds = datasets.load("bigann-10k").subset(max_n=1000, max_queries=30)
    assert (ds.n, ds.nq, ds.name) == (1000, 30, "bigann-10k-q30-n1000")
    assert ds.gt_ids.max() < 1000
    np.testing.assert_array_equal(ds.gt_ids[:, :10], brute_ids(ds.xq, ds.xb, 10, "l2"))
    np.testing.assert_allclose(ds.gt_dist, distances(ds.xq, ds.xb, ds.gt_ids, "l2"))


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(NotFound, match="unknown dataset 'sift-1b'; valid datasets: bigann-10k, glove-50-10k, mnist-10k"):
        datasets.load("sift-1b")


def test_hdf5(tmp_path):
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((400, 12)).astype(np.float32)
    xq = rng.standard_normal((15, 12)).astype(np.float32)
    nb = brute_ids(xq, xb, 20, "l2")
    p = tmp_path / "tiny-12-euclidean.hdf5"
    with h5py.File(p, "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("train", data=xb)
        f.create_dataset("test", data=xq)
        f.create_dataset("neighbors", data=nb.astype(np.int32))
    ds = datasets.load_hdf5(p)
    assert (ds.name, ds.metric, ds.n, ds.nq) == ("tiny-12-euclidean", "l2", 400, 15)
    np.testing.assert_array_equal(ds.gt_ids, nb)
    assert (np.diff(ds.gt_dist, axis=1) >= 0).all()
    with h5py.File(p, "a") as f:
        del f.attrs["distance"]
    with pytest.raises(InvalidArgument, match="no 'distance' attribute"):
        datasets.load_hdf5(p)
    assert datasets.load_hdf5(p, metric="ip").metric == "ip"


def test_synthetic_is_seeded_and_ground_truth_is_cached(tmp_path, monkeypatch):
    a = datasets.load("gmm-3k-16", queries=40, seed=1, cache_dir=tmp_path)
    assert (a.n, a.d, a.nq, a.name) == (3000, 16, 40, "gmm-3k-16")
    np.testing.assert_array_equal(a.gt_ids[:, :10], brute_ids(a.xq, a.xb, 10, "l2"))
    assert len(list(tmp_path.glob("gmm-n3000-d16-q40-s1-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("ground truth should have come from the cache")

    monkeypatch.setattr(datasets, "exact_ground_truth", fail)
    b = datasets.load("gmm-3k-16", queries=40, seed=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.xb, b.xb)
    np.testing.assert_array_equal(a.gt_ids, b.gt_ids)
    with pytest.raises(AssertionError):  # another seed is other data: no cache hit
        datasets.load("gmm-3k-16", queries=40, seed=2, cache_dir=tmp_path)


def test_synthetic_has_near_neighbours():
    # the low-rank clusters give a real nearest-neighbour structure (isotropic noise would not)
    xb, xq = datasets.gaussian_mixture(5000, 64, 50, seed=0)
    ids = brute_ids(xq, xb, 10, "l2")
    d = distances(xq, xb, ids, "l2")
    far = distances(xq, xb, np.tile(np.arange(0, 5000, 500), (50, 1)), "l2")
    assert np.median(d[:, 0]) < 0.5 * np.median(far)
