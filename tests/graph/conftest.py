import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "bench" / "datasets" / "graphs"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
