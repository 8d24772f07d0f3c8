"""A start that fails part-way (port in use, metrics port in use) says why and releases what it took:
the data folder's lock, the collections, the jobs (``serve``'s exit stack)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.client import Client
from retrieval.server.process import ServerProcess


@pytest.mark.parametrize("what", ["grpc", "metrics"])
def test_failed_start_releases_the_data_folder(tmp_path, what):
    with ServerProcess(tmp_path / "a") as first:
        taken = first.port
        with Client(first.address) as c:
            c.create_collection("kept", 4)
        args = ["--metrics-port", str(taken)] if what == "metrics" else []
        second = ServerProcess(tmp_path / "b", args=args)
        with pytest.raises(Exception):
            second.start(timeout=60, port=taken if what == "grpc" else 0)
        second.stop()
        assert ("cannot listen on" if what == "grpc" else "cannot serve metrics on") in second.log_tail(40)
    # the failed server let go of its folder: a new one opens it at once, and the first one's data is intact
    with ServerProcess(tmp_path / "b") as again, Client(again.address) as c:
        c.create_collection("fresh", 4)
        c.upsert("fresh", [1], np.ones((1, 4), np.float32))
        assert c.count("fresh") == 1
    with ServerProcess(tmp_path / "a") as back, Client(back.address) as c:
        assert "kept" in [x["name"] for x in c.list_collections()]
