import numpy as np
import pytest

from retrieval.drafting import DatastoreCatalog


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def small_catalog(tmp_path):
    """A catalog with one datastore built from fixed id documents (vocab 7)."""
    docs = [[1, 2, 3, 1, 2, 4, 5], [2, 3, 1, 2, 3, 6], [0, 1, 2, 3, 1, 2, 4], [5, 5, 5, 1, 2]]
    f = tmp_path / "docs.ids"
    f.write_text("\n".join(" ".join(map(str, d)) for d in docs) + "\n")
    cat = DatastoreCatalog(tmp_path / "stores")
    cat.build("tiny", [str(f)], vocab_size=7)
    return cat, docs
