"""Exact k-NN ground truth: against float64 numpy, the shipped BIGANN ground truth, outputs, the job."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from index_builder.ground_truth import exact_knn, ground_truth_job, write_ground_truth
from index_builder.readers import open_ann_hdf5, open_reader
from retrieval.errors import Cancelled, InvalidArgument
from retrieval.jobs import JobContext, LocalJobContext

BIGANN = Path(__file__).resolve().parents[2] / "bench" / "datasets" / "vectors" / "bigann-128-euclidean-10k"


def brute(xq, xb, k, metric):
    q, x = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if metric == "l2":
        d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    elif metric == "ip":
        d = -(q @ x.T)
    else:
        d = 1.0 - q @ x.T
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_matches_float64_brute_force(metric):
    rng = np.random.default_rng(11)
    xb = (rng.standard_normal((700, 24)) * 3 + 5).astype(np.float32)
    xq = rng.standard_normal((37, 24)).astype(np.float32) + 5
    D, I = exact_knn(xq, xb, 15, metric, block_size=128, device="cpu")
    D0, I0 = brute(xq, xb, 15, metric)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-9, atol=1e-9)
    assert D.dtype == np.float64 and I.dtype == np.int64


def test_ties_are_broken_by_smaller_id_and_short_bases_are_padded():
    xb = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0, -1]], np.float32)
    xq = np.zeros((1, 2), np.float32)
    D, I = exact_knn(xq, xb, 7, "l2", block_size=2, device="cpu")
    assert I.tolist() == [[0, 1, 2, 3, 4, -1, -1]]
    assert D[0, :5].tolist() == [1.0] * 5 and np.isinf(D[0, 5:]).all()


def test_bigann_equals_shipped_ground_truth():
    xb = np.load(BIGANN / "base.u8.npy")
    xq = np.load(BIGANN / "queries.u8.npy")
    gt = np.load(BIGANN / "groundtruth.i64.npy")
    D, I = exact_knn(xq, xb, 100, "l2", block_size=3000, device="cpu")
    np.testing.assert_array_equal(I[:, :10], gt[:, :10])
    # deeper down, positions may differ only between rows at exactly the same distance
    d_gt = ((xb[gt].astype(np.float64) - xq[:, None, :].astype(np.float64)) ** 2).sum(axis=2)
    np.testing.assert_array_equal(D, d_gt)


def test_streams_from_a_reader(tmp_path):
    rng = np.random.default_rng(5)
    xb = rng.standard_normal((500, 8)).astype(np.float32)
    np.save(tmp_path / "b.npy", xb)
    xq = xb[:20] + 0.01
    with open_reader(tmp_path / "b.npy") as r:
        D, I = exact_knn(xq, r, 5, "l2", block_size=64, device="cpu")
    np.testing.assert_array_equal(I, brute(xq, xb, 5, "l2")[1])


def test_bad_arguments():
    xb = np.ones((10, 4), np.float32)
    with pytest.raises(InvalidArgument, match="metric must be one of l2, ip, cosine"):
        exact_knn(xb[:2], xb, 3, "hamming")
    with pytest.raises(InvalidArgument, match="dimension 3 but the base has dimension 4"):
        exact_knn(xb[:2, :3], xb, 3)
    with pytest.raises(InvalidArgument, match="k must be a positive integer"):
        exact_knn(xb[:2], xb, 0)
    q = xb[:2].copy()
    q[1, 1] = np.nan
    with pytest.raises(InvalidArgument, match="query row 1 holds NaN"):
        exact_knn(q, xb, 3)


def test_write_npy_and_hdf5(tmp_path):
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((300, 10)).astype(np.float32)
    xq = rng.standard_normal((12, 10)).astype(np.float32)
    D, I = exact_knn(xq, xb, 10, "l2", device="cpu")
    files = write_ground_truth(tmp_path / "gt.npy", D, I, "l2")
    assert [f.name for f in files] == ["gt.npy", "gt.distances.npy"]
    np.testing.assert_array_equal(np.load(files[0]), I)
    np.testing.assert_array_equal(np.load(files[1]), D)
    write_ground_truth(tmp_path / "gt.hdf5", D, I, "l2", xq=xq, base=xb, block_size=64)
    with h5py.File(tmp_path / "gt.hdf5") as f:
        assert f.attrs["distance"] == "euclidean"
        np.testing.assert_allclose(f["distances"][:], np.sqrt(D), rtol=1e-6)
    a = open_ann_hdf5(tmp_path / "gt.hdf5")  # a complete ann-benchmarks file
    np.testing.assert_array_equal(a.neighbors, I)
    np.testing.assert_array_equal(a.train.read_all().vectors, xb)
    a.train.close()
    with pytest.raises(InvalidArgument, match="must end in .npy, .hdf5 or .h5"):
        write_ground_truth(tmp_path / "gt.csv", D, I, "l2")


class CancelAfter(JobContext):
    """Cancels itself once ``n`` progress reports have come in (a user pressing cancel mid-job)."""

    def __init__(self, work_dir, n):
        super().__init__("gt-test", work_dir)
        self.n, self.reports = n, 0

    def _on_progress(self):
        self.reports += 1
        if self.reports > self.n:
            self.cancel()


def test_job_resumes_after_cancel(tmp_path):
    rng = np.random.default_rng(9)
    xb = rng.standard_normal((1000, 16)).astype(np.float32)
    xq = rng.standard_normal((25, 16)).astype(np.float32)
    np.save(tmp_path / "base.npy", xb)
    np.save(tmp_path / "q.npy", xq)
    params = dict(base=str(tmp_path / "base.npy"), queries=str(tmp_path / "q.npy"), k=7, metric="ip",
                  block_size=100, device="cpu")
    ctx = CancelAfter(tmp_path / "work", 3)
    with pytest.raises(Cancelled):
        ground_truth_job(ctx, out=str(tmp_path / "gt.npy"), **params)
    assert not (tmp_path / "gt.npy").exists()
    ctx2 = LocalJobContext(tmp_path / "work", show_progress=False)
    res = ground_truth_job(ctx2, out=str(tmp_path / "gt.npy"), **params)
    assert res["resumed_from_row"] == 300 and res["n"] == 1000
    assert ctx2.done == 1000 and ctx2.total == 1000
    np.testing.assert_array_equal(np.load(tmp_path / "gt.npy"), brute(xq, xb, 7, "ip")[1])


def test_job_on_an_hdf5_without_neighbors(tmp_path):
    rng = np.random.default_rng(4)
    xb = rng.standard_normal((200, 6)).astype(np.float32)
    xq = rng.standard_normal((9, 6)).astype(np.float32)
    with h5py.File(tmp_path / "in.hdf5", "w") as f:
        f.create_dataset("train", data=xb)
        f.create_dataset("test", data=xq)
    res = ground_truth_job(LocalJobContext(tmp_path / "w", show_progress=False), base=str(tmp_path / "in.hdf5"),
                           queries=str(tmp_path / "in.hdf5"), out=str(tmp_path / "out.h5"), k=5, metric="cosine",
                           include_train=True, device="cpu")
    assert res["nq"] == 9
    a = open_ann_hdf5(tmp_path / "out.h5")
    assert a.metric == "cosine"
    np.testing.assert_array_equal(a.neighbors, brute(xq, xb, 5, "cosine")[1])
    np.testing.assert_allclose(a.distances, brute(xq, xb, 5, "cosine")[0], atol=1e-6)
    a.train.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_gpu_equals_cpu(metric):
    rng = np.random.default_rng(8)
    xb = rng.standard_normal((20000, 64)).astype(np.float32)
    xq = rng.standard_normal((300, 64)).astype(np.float32)
    Dc, Ic = exact_knn(xq, xb, 50, metric, block_size=4096, device="cpu")
    Dg, Ig = exact_knn(xq, xb, 50, metric, block_size=4096, device="cuda")
    np.testing.assert_array_equal(Ig, Ic)
    np.testing.assert_allclose(Dg, Dc, rtol=1e-9, atol=1e-9)
    xb8 = np.load(BIGANN / "base.u8.npy")
    xq8 = np.load(BIGANN / "queries.u8.npy")
    _, I = exact_knn(xq8, xb8, 10, "l2", device="cuda")
    np.testing.assert_array_equal(I, np.load(BIGANN / "groundtruth.i64.npy")[:, :10])
