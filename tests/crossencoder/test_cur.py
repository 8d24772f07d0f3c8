"""CUR kernels: regularised pseudo-inverses against numpy's least squares, exact recovery of
low-rank matrices, the query least squares, anchor-item selection and k-means."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.crossencoder.cur import (
    kmeans,
    pinv_ridge,
    pinv_truncated,
    query_embedding,
    regularized_pinv,
    ridge_with_intercept,
    select_anchor_items,
    solve_cur,
    top_eigenvalue,
)
from retrieval.errors import InvalidArgument


def _low_rank(m, n, r, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((m, r)) @ g.standard_normal((r, n))


@pytest.mark.parametrize("shape,rank", [((30, 12), 12), ((12, 30), 12), ((40, 25), 7)])
def test_pinv_matches_lstsq_min_norm(shape, rank):
    A = _low_rank(*shape, rank, seed=1)
    b = np.random.default_rng(2).standard_normal((shape[0], 3))
    ref = np.linalg.lstsq(A, b, rcond=1e-10)[0]
    np.testing.assert_allclose(pinv_ridge(A, 0.0) @ b, ref, atol=1e-8)
    np.testing.assert_allclose(pinv_truncated(A, None, rcond=1e-10) @ b, ref, atol=1e-8)
    np.testing.assert_allclose(regularized_pinv(A, "pinv") @ b, ref, atol=1e-8)
    np.testing.assert_allclose(pinv_ridge(A, 0.0), np.linalg.pinv(A, rcond=1e-10), atol=1e-8)


@pytest.mark.parametrize("ridge", [1e-4, 1e-2, 0.5])
def test_ridge_pinv_matches_augmented_lstsq(ridge):
    g = np.random.default_rng(3)
    A = g.standard_normal((25, 15))
    b = g.standard_normal(25)
    s1 = np.linalg.svd(A, compute_uv=False)[0]
    lam = ridge * s1**2
    aug = np.vstack([A, np.sqrt(lam) * np.eye(15)])
    ref = np.linalg.lstsq(aug, np.concatenate([b, np.zeros(15)]), rcond=None)[0]
    np.testing.assert_allclose(pinv_ridge(A, ridge) @ b, ref, atol=1e-10)


def test_truncated_pinv_is_pinv_of_best_rank_r_approximation():
    g = np.random.default_rng(4)
    A = g.standard_normal((20, 14))
    b = g.standard_normal(20)
    P, s, Qt = np.linalg.svd(A, full_matrices=False)
    A5 = (P[:, :5] * s[:5]) @ Qt[:5]
    ref = np.linalg.lstsq(A5, b, rcond=1e-8)[0]
    np.testing.assert_allclose(pinv_truncated(A, rank=5) @ b, ref, atol=1e-10)


def test_pinv_bad_arguments():
    with pytest.raises(InvalidArgument, match="ridge"):
        pinv_ridge(np.eye(3), -1.0)
    with pytest.raises(InvalidArgument, match="rank"):
        pinv_truncated(np.eye(3), rank=0)
    with pytest.raises(InvalidArgument, match="unknown solver"):
        regularized_pinv(np.eye(3), "svd")
    assert np.all(pinv_ridge(np.zeros((3, 2)), 0.1) == 0)


@pytest.mark.parametrize("m,d", [(8, 20), (40, 10)])
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.1])
def test_ridge_with_intercept_matches_lstsq(m, d, ridge):
    g = np.random.default_rng(5)
    X = g.standard_normal((m, d)) + 3.0  # offset: the intercept must absorb it
    y = g.standard_normal(m) + 0.6
    w, b = ridge_with_intercept(X, y, ridge)
    Xc = X - X.mean(0)
    lam = ridge * np.linalg.svd(Xc, compute_uv=False)[0] ** 2
    # Reference: lstsq over [X 1] with the ridge rows on w only (min-norm when ridge = 0).
    Z = np.hstack([X, np.ones((m, 1))])
    if ridge == 0:
        ref_w = np.linalg.lstsq(Xc, y - y.mean(), rcond=None)[0]
        np.testing.assert_allclose(w, ref_w, atol=1e-8)
        np.testing.assert_allclose(X @ w + b, Z @ np.linalg.lstsq(Z, y, rcond=None)[0], atol=1e-8)
    else:
        aug = np.vstack([Z, np.hstack([np.sqrt(lam) * np.eye(d), np.zeros((d, 1))])])
        ref = np.linalg.lstsq(aug, np.concatenate([y, np.zeros(d)]), rcond=None)[0]
        np.testing.assert_allclose(w, ref[:d], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b, ref[d], rtol=1e-5, atol=1e-7)


def test_top_eigenvalue():
    g = np.random.default_rng(6)
    B = g.standard_normal((30, 30))
    G = B @ B.T
    assert top_eigenvalue(G) == pytest.approx(np.linalg.eigvalsh(G)[-1], rel=1e-5)
    assert top_eigenvalue(np.zeros((4, 4))) == 0.0


@pytest.mark.parametrize("solver", ["pinv", "ridge", "truncated"])
def test_cur_recovers_low_rank_matrix(solver):
    """M = offsets + rank-5: with k_q = 20 anchor queries and k_i = 12 anchor items, CUR recovers
    every query's row up to its own constant offset (which ranking ignores)."""
    g = np.random.default_rng(8)
    M = _low_rank(60, 200, 5, seed=9) + 0.6 + g.standard_normal((60, 1))
    RT = M[:20].T.astype(np.float32)  # anchor queries = first 20 rows
    anchors = g.choice(200, 12, replace=False)
    f = solve_cur(RT, anchors, solver=solver, ridge=1e-9, rank=5)
    test = M[20:]
    approx = query_embedding(test[:, anchors]) @ f.E.T
    centred = test - test.mean(1, keepdims=True)
    approx_c = approx - approx.mean(1, keepdims=True)
    assert np.abs(approx_c - centred).max() < 1e-3


def test_cur_with_all_items_as_anchors_is_a_projection(fx):
    """k_i = N: the approximation is the exact row projected on the anchor-query row space."""
    RT = fx.S[100:].T.copy()
    f = solve_cur(RT, np.arange(1000), solver="pinv")
    c = fx.S[:5]
    approx = query_embedding(c) @ f.E.T
    Rc = (RT - RT.mean(0)).T.astype(np.float64)  # k_q x N, rows centred over all items
    cc = c - c.mean(1, keepdims=True)
    proj = cc @ np.linalg.pinv(Rc) @ Rc
    np.testing.assert_allclose(approx, proj, atol=2e-4)


@pytest.mark.parametrize("method", ["random", "qr", "kmeans-r", "kmeans-de"])
def test_select_anchor_items(fx, method):
    RT = fx.S[100:].T.copy()
    eligible = np.arange(0, 1000, 2)  # e.g. after deleting the odd rows
    a = select_anchor_items(method, 40, RT, eligible, de=fx.i_de, seed=3)
    b = select_anchor_items(method, 40, RT, eligible, de=fx.i_de, seed=3)
    assert a.shape == (40,) and len(set(a.tolist())) == 40
    assert np.isin(a, eligible).all()
    np.testing.assert_array_equal(a, b)  # deterministic
    if method == "random":
        np.testing.assert_array_equal(select_anchor_items(method, 10, RT, eligible, seed=3), a[:10])
    if method == "qr":  # pivoted QR picks independent, spread score profiles: larger volume than random
        def logvol(rows):
            A = RT[rows].astype(np.float64)
            s = np.linalg.svd(A - A.mean(0), compute_uv=False)[:39]  # centring removes one dimension
            return np.log(s).sum()

        assert np.linalg.matrix_rank(RT[a].astype(np.float64)) == 40
        rand = [logvol(select_anchor_items("random", 40, RT, eligible, seed=s)) for s in range(5)]
        assert logvol(a) > max(rand)


def test_select_anchor_items_errors(fx):
    RT = fx.S[100:].T.copy()
    with pytest.raises(InvalidArgument, match="unknown anchor_method"):
        select_anchor_items("farthest", 5, RT, np.arange(1000))
    with pytest.raises(InvalidArgument, match="only 10 items"):
        select_anchor_items("qr", 11, RT, np.arange(10))
    with pytest.raises(InvalidArgument, match="dual_encoder"):
        select_anchor_items("kmeans-de", 5, RT, np.arange(1000), de=None)


def test_kmeans_finds_separated_clusters():
    g = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    X = np.concatenate([c + 0.1 * g.standard_normal((50, 2)) for c in centres])
    C = kmeans(X, 4, seed=1)
    d = np.linalg.norm(C[:, None, :] - centres[None], axis=-1).min(axis=0)
    assert d.max() < 0.1
