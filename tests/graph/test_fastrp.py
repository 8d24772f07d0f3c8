import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.errors import InvalidArgument
from retrieval.graph.fastrp import (GDS_DEFAULTS, PAPER_BLOGCATALOG, FastRPParams, fastrp, fastrp_dense_reference,
                                    fastrp_job, very_sparse_random_matrix)
from retrieval.graph.readers import read_graph


@pytest.fixture(scope="module")
def celegans(data_dir):
    return read_graph(data_dir / "celegans" / "Celegans.txt").graph


@pytest.fixture(scope="module")
def cora(data_dir):
    return read_graph(data_dir / "cora").graph


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("s", ["achlioptas", "li"])
def test_matches_dense_reference(celegans, propagate, s):
    p = FastRPParams(dim=48, iteration_weights=(0.5, 1.0, 2.0, 4.0), beta=-0.6, s=s, self_influence=0.7,
                     propagate_normalized=propagate, seed=11)
    E = fastrp(celegans.adjacency(), p)
    R = fastrp_dense_reference(celegans.adjacency().toarray(), p)
    assert E.dtype == np.float32 and E.shape == (celegans.n, 48)
    assert np.abs(E - R).max() < 1e-4 * max(1.0, np.abs(R).max())


def test_matches_dense_reference_with_features_weights_and_standardize():
    rng = np.random.default_rng(0)
    n = 60
    A = sp.random(n, n, density=0.1, random_state=1, data_rvs=lambda k: rng.uniform(0.1, 3.0, k))
    A = sp.csr_matrix(A + A.T)
    X = rng.normal(size=(n, 9)).astype(np.float32)
    p = FastRPParams(dim=32, iteration_weights=(1.0, 0.0, 2.0), beta=0.3, s=3, property_ratio=0.25,
                     standardize=True, normalize=True, propagate_normalized=False, seed=5)
    E = fastrp(A, p, features=X)
    R = fastrp_dense_reference(A.toarray(), p, features=X)
    assert np.abs(E - R).max() < 1e-4 * max(1.0, np.abs(R).max())
    assert np.allclose(E.mean(0), 0, atol=1e-4) and np.allclose(E.std(0), 1, atol=1e-3)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_whitening_matches_dense_reference(celegans, standardize, gamma):
    p = FastRPParams(dim=32, iteration_weights=(0.0, 1.0, 2.0), beta=-0.5, standardize=standardize, whiten=gamma,
                     seed=2)
    E = fastrp(celegans.adjacency(), p)
    R = fastrp_dense_reference(celegans.adjacency().toarray(), p)
    assert E.dtype == np.float32 and E.shape == (celegans.n, 32)
    assert np.abs(E - R).max() < 1e-3 * max(1.0, np.abs(R).max())
    C = np.cov(E.astype(np.float64), rowvar=False, bias=True)
    C0 = np.cov(fastrp(celegans.adjacency(), replace(p, whiten=0.0)).astype(np.float64), rowvar=False, bias=True)
    off = lambda M: np.abs(M / np.sqrt(np.outer(np.diag(M), np.diag(M))) - np.eye(len(M))).max()
    assert off(C) < off(C0)  # decorrelated columns: less correlation than without whitening ...
    if gamma == 1.0:         # ... and none at gamma = 1 (ZCA whitening: identity covariance)
        assert np.abs(C - np.eye(32)).max() < 1e-3
    assert np.allclose(E.mean(0), 0, atol=1e-4)


def test_whiten_zero_is_the_unwhitened_embedding(cora):
    p = FastRPParams(dim=32, iteration_weights=(0.0, 1.0, 1.0), standardize=True, seed=1)
    assert fastrp(cora.adjacency(), p).tobytes() == fastrp(cora.adjacency(), replace(p, whiten=0.0)).tobytes()
    assert p.as_dict()["whiten"] == 0.0


def test_unnormalized_matches_plain_powers(celegans):
    p = FastRPParams(dim=16, iteration_weights=(1.0, 1.0), normalize=False, seed=3)
    E = fastrp(celegans.adjacency(), p)
    R = fastrp_dense_reference(celegans.adjacency().toarray(), p)
    assert np.allclose(E, R, atol=1e-5)


def test_deterministic_per_seed(cora):
    A = cora.adjacency()
    a = fastrp(A, dim=64, seed=123)
    b = fastrp(A, dim=64, seed=123)
    c = fastrp(A, dim=64, seed=124)
    assert a.tobytes() == b.tobytes()
    assert not np.allclose(a, c)


def test_sparse_projection_distribution():
    s, d = 3.0, 64
    R = very_sparse_random_matrix(5000, d, s, np.random.SeedSequence(0)).tocsr()
    density = R.nnz / (5000 * d)
    assert abs(density - 1 / s) < 0.01
    vals = np.unique(R.data)
    assert np.allclose(np.abs(vals), math.sqrt(s / d))
    assert abs((R.data > 0).mean() - 0.5) < 0.02
    assert very_sparse_random_matrix(10, 8, 3.0, 1).tocsr().nnz == very_sparse_random_matrix(10, 8, 3.0, 1).nnz


def test_embeddings_reflect_structure(cora):
    """Linked nodes are far more similar than random pairs, and labels are predictable."""
    E = fastrp(cora.adjacency(), dim=128, iteration_weights=(0.0, 1.0, 1.0), seed=0)
    En = E / np.linalg.norm(E, axis=1, keepdims=True)
    s, d, _ = cora.edges()
    rng = np.random.default_rng(0)
    r1, r2 = rng.integers(0, cora.n, 5000), rng.integers(0, cora.n, 5000)
    linked = (En[s] * En[d]).sum(1).mean()
    rand = (En[r1] * En[r2]).sum(1).mean()
    assert linked > rand + 0.4
    from sklearn.linear_model import LogisticRegression

    y = cora.labels.y
    idx = rng.permutation(cora.n)
    tr, te = idx[:1500], idx[1500:]
    acc = LogisticRegression(max_iter=500).fit(E[tr], y[tr]).score(E[te], y[te])
    assert acc > 0.6  # chance is 0.30 (the largest class)


def test_presets_are_documented_values():
    assert PAPER_BLOGCATALOG["iteration_weights"] == (0.0, 0.0, 1.0, 6.67) and PAPER_BLOGCATALOG["beta"] == -0.64
    assert GDS_DEFAULTS["iteration_weights"] == (0.0, 1.0, 1.0) and GDS_DEFAULTS["s"] == 3.0
    assert FastRPParams().iteration_weights == GDS_DEFAULTS["iteration_weights"]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(dim=0), "dim must be a positive integer"),
        (dict(dim=-3), "dim must be a positive integer"),
        (dict(dim=2.5), "dim must be a positive integer"),
        (dict(iteration_weights=()), "at least one weight"),
        (dict(iteration_weights=(1.0, -1.0)), r"iteration_weights\[1\]"),
        (dict(iteration_weights=(0.0, 0.0)), "all zeros"),
        (dict(s=0.5), "s must be a number >= 1"),
        (dict(s="gaussian"), "s must be 'achlioptas', 'li'"),
        (dict(property_ratio=0.5), "needs node features"),
        (dict(property_ratio=1.5), r"property_ratio must be in \[0, 1\]"),
        (dict(self_influence=-1.0), "self_influence"),
        (dict(beta=float("nan")), "beta"),
        (dict(whiten=-0.1), r"whiten .* in \[0, 1\]"),
        (dict(whiten=1.5), r"whiten .* in \[0, 1\]"),
        (dict(whiten=float("nan")), "whiten"),
        (dict(whiten=True), "whiten"),
    ],
)
def test_bad_hyper_parameters(celegans, kw, msg):
    with pytest.raises(InvalidArgument, match=msg):
        fastrp(celegans.adjacency(), **kw)


def test_beta_far_outside_warns(celegans):
    with pytest.warns(RuntimeWarning, match="far outside"):
        fastrp(celegans.adjacency(), dim=8, beta=-3.0)


def test_bad_graphs():
    with pytest.raises(InvalidArgument, match="empty"):
        fastrp(sp.csr_matrix((0, 0)), dim=8)
    with pytest.raises(InvalidArgument, match="square"):
        fastrp(sp.csr_matrix((3, 4)), dim=8)
    with pytest.raises(InvalidArgument, match="finite"):
        fastrp(sp.csr_matrix(np.array([[0, -1.0], [-1.0, 0]])), dim=8)
    with pytest.raises(InvalidArgument, match="scipy sparse"):
        fastrp(np.eye(3), dim=8)
    with pytest.raises(InvalidArgument, match=r"features must have shape \(2, f\)"):
        fastrp(sp.csr_matrix(np.eye(2)), dim=8, property_ratio=0.5, features=np.ones((3, 2)))


def test_isolated_nodes_get_finite_vectors():
    A = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32))
    E = fastrp(A, dim=16, beta=-0.5, self_influence=1.0)
    assert np.all(np.isfinite(E))


def test_job_stores_embeddings_with_progress(tmp_path, celegans):
    from retrieval.graph.store import GraphStore
    from retrieval.jobs import LocalJobContext

    st = GraphStore(tmp_path / "g")
    st.put("ce", celegans)
    seen = []

    class Ctx(LocalJobContext):
        def _on_progress(self):
            seen.append((self.done, self.total))

    ctx = Ctx(tmp_path / "work", show_progress=False)
    out = fastrp_job(ctx, store_root=str(st.root), graph="ce", dim=32, iteration_weights=[0.0, 1.0, 1.0], seed=4)
    assert out["n"] == celegans.n and out["dim"] == 32 and out["graph_version"] == 1
    assert seen[-1] == (3.0, 3.0) and len(seen) == 4
    emb, meta = st.load_embeddings("ce", "fastrp")
    assert np.array_equal(emb, fastrp(celegans.adjacency(), dim=32, seed=4))
    assert meta["params"]["seed"] == 4
    st.append_edges("ce", [0], [5])
    out2 = fastrp_job(ctx, store_root=str(st.root), graph="ce", dim=32, seed=4)
    assert out2["graph_version"] == 2 and st.load_embeddings("ce", "fastrp")[1]["graph_version"] == 2
    with pytest.raises(InvalidArgument, match="no node features"):
        fastrp_job(ctx, store_root=str(st.root), graph="ce", dim=8, use_features=True)
