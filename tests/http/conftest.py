"""Fixtures of the HTTP API tests: a real server process serving gRPC and HTTP on loopback ports."""

from __future__ import annotations

import json
import secrets

import numpy as np
import pytest

MAX_BODY = 4 << 20  # limits.max_message_bytes of the test server: the largest HTTP body too


def start_server(folder, env=None, args=None, host="127.0.0.1"):
    from retrieval.server.process import ServerProcess

    srv = ServerProcess(folder / "data", host=host, args=args,
                        env={"RETRIEVAL_HTTP_PORT": "0", "RETRIEVAL_LIMITS__MAX_MESSAGE_BYTES": str(MAX_BODY),
                             "RETRIEVAL_SECURITY__CLIENT_FILE_DIRS": json.dumps([str(folder)]), **(env or {})})
    srv.start()
    assert srv.http_url, f"the server printed no HTTP address; log:\n{srv.log_tail()}"
    return srv


@pytest.fixture(scope="package")
def hserver(tmp_path_factory):
    """A server with the HTTP API on (no keys), shared by the tests of tests/http."""
    srv = start_server(tmp_path_factory.mktemp("http"))
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="package")
def http(hserver):
    import httpx

    with httpx.Client(base_url=hserver.http_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def grpc_client(hserver):
    from retrieval.client import Client

    with Client(hserver.address, timeout=60) as c:
        yield c


def slow_build_input(folder, n=20_000, d=32):
    """An .npy of vectors that a build_index job with a small block size takes seconds to index, with
    progress after each block."""
    path = folder / "slow.npy"
    np.save(path, np.random.default_rng(7).random((n, d), dtype=np.float32))
    return path


def slow_job_params(path, collection):
    return {"input": str(path), "collection": collection, "format": "npy", "block_size": 200, "threads": 1,
            "index": {"type": "hnsw", "m": 48, "ef_construction": 500}}


@pytest.fixture(scope="package")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hkeys")
    rw, ro = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    (folder / "rw").write_text(rw + "\n")
    (folder / "ro").write_text(ro + "\n")
    for f in ("rw", "ro"):
        (folder / f).chmod(0o600)
    return {"rw": rw, "ro": ro, "rw_file": folder / "rw", "ro_file": folder / "ro"}


@pytest.fixture(scope="package")
def pki(tmp_path_factory):
    from tests.server.rpc import make_pki

    return make_pki(tmp_path_factory.mktemp("hpki"))


@pytest.fixture(scope="package")
def secure(tmp_path_factory, keys, pki):
    """Keys, TLS, and at most one stream open (for the backpressure test)."""
    folder = tmp_path_factory.mktemp("hsecure")
    srv = start_server(folder, env={"RETRIEVAL_LIMITS__MAX_STREAMS": "1"},
                       args=["--api-keys-file", str(keys["rw_file"]), "--read-only-keys-file", str(keys["ro_file"]),
                             "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])])
    srv.folder = folder
    yield srv
    assert srv.stop() == 0


CE_ITEMS = [{"id": i, "text": f"answer {i} of the question", "payload": {"n": i}} for i in range(10)]


def ensure_engines(c, folder, crossencoder: bool = True):
    """A cross-encoder index ``webce`` (a tiny local Hugging Face model; None without transformers) and a
    draft datastore ``webds`` on the server of ``c``, built once; ``folder`` is one clients may name."""
    if "webds" not in [d["name"] for d in c.list_datastores()]:
        f = folder / "docs.ids"
        f.write_text("1 2 3 4 5\n1 2 3 6\n2 3 4 5 6\n")
        assert c.build_datastore("webds", [str(f)], vocab_size=7)["state"] == "succeeded"
    if not crossencoder:
        return None
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    if "webce" not in [i["name"] for i in c.list_ce_indexes()]:
        from tests.crossencoder.conftest import make_tiny_hf_model

        model = make_tiny_hf_model(folder / "model", seed=0)
        job = c.build_ce_index("webce", {"name": "hf", "model_dir": str(model), "device": "cpu"}, items=CE_ITEMS,
                               anchor_queries=["what is a", "how to", "the good"], params={"k_i": 2}, progress=False)
        assert job["state"] == "succeeded", job
    return "webce"
