"""Shared fixtures: a real server on a loopback port, and the shipped datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT / "bench" / "datasets"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server process with a fresh data folder, shared by the tests of one module."""
    from retrieval.server.process import ServerProcess

    # clients may name files under the tests' temporary folders and bench/ (shipped datasets)
    allowed = json.dumps([str(tmp_path_factory.getbasetemp()), str(ROOT / "bench")])
    srv = ServerProcess(tmp_path_factory.mktemp("server") / "data",
                        env={"RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": allowed})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from retrieval.client import Client

    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def bigann():
    """BIGANN-10k: (base float32 (10000, 128), queries float32 (100, 128), ground truth int64 (100, 100))."""
    d = DATASETS / "vectors" / "bigann-128-euclidean-10k"
    return (np.load(d / "base.u8.npy").astype(np.float32), np.load(d / "queries.u8.npy").astype(np.float32),
            np.load(d / "groundtruth.i64.npy"))


@pytest.fixture(scope="session")
def glove():
    """GloVe-50 10k, L2-normalised, the BASELINES.md split: (base (9000, 50), queries (1000, 50))."""
    x = np.load(DATASETS / "vectors" / "glove-50-angular-10k" / "vectors.f32.npy").astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:9000]], x[perm[9000:]]
