"""API keys (read-write and read-only), TLS and mutual TLS, against real server processes."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval import errors
from retrieval.client import Client
from retrieval.server import auth
from retrieval.server.process import ServerProcess
from tests.server.rpc import all_rpcs, hosted_rpcs, raw_call

RPCS = all_rpcs()


# ------------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------------
def test_keystore_roles_and_constant_time_comparison(monkeypatch):
    ks = auth.KeyStore(["a" * 20, "b" * 20], ["c" * 20])
    assert ks.check("a" * 20) == "rw" and ks.check("b" * 20) == "rw"
    assert ks.check("c" * 20) == "ro"
    assert ks.check("a" * 19) is None and ks.check("") is None and ks.check(None) is None
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    for presented in ("a" * 20, "c" * 20, "wrong-key-wrong-key"):
        calls.clear()
        ks.check(presented)
        assert len(calls) == 3, "every configured key is compared, no early exit"


def test_key_parsing_rejects_weak_keys_and_reads_comments():
    assert auth.parse_keys("# c\nk" * 1 + "x" * 20 + "  # trailing\n\n", "f") == ["k" + "x" * 20]
    assert auth.parse_keys("a" * 16 + ", " + "b" * 16, "$ENV") == ["a" * 16, "b" * 16]
    with pytest.raises(errors.InvalidArgument, match="16"):
        auth.parse_keys("short", "f")
    with pytest.raises(errors.InvalidArgument, match="ASCII"):
        auth.parse_keys("é" * 20, "f")


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
                                       ("10.0.0.7", False), ("example.com", False)])
def test_loopback_detection(host, loop):
    assert auth.is_loopback(host) is loop


def test_startup_check_requires_a_key_off_loopback():
    from retrieval.config import Settings

    with pytest.raises(errors.FailedPrecondition, match="refusing to start.*0.0.0.0.*no API key"):
        auth.check_startup(Settings(host="0.0.0.0"), auth.KeyStore())
    auth.check_startup(Settings(host="0.0.0.0"), auth.KeyStore(["k" * 20]))
    auth.check_startup(Settings(host="127.0.0.1"), auth.KeyStore())
    with pytest.raises(errors.FailedPrecondition, match="cannot be turned off"):
        auth.check_startup(Settings(host="0.0.0.0", security={"require_api_key": False}), auth.KeyStore(["k" * 20]))
    with pytest.raises(errors.FailedPrecondition, match="require_api_key"):
        auth.check_startup(Settings(security={"require_api_key": True}), auth.KeyStore())


def test_read_write_classification_covers_every_rpc():
    reads = {str(r) for r in RPCS if auth.is_read_method(r.path)}
    assert "retrieval.v1.Search/SearchStream" in reads and "retrieval.v1.Points/Get" in reads
    assert "retrieval.v1.Points/Upsert" not in reads and "retrieval.v1.Collections/Drop" not in reads
    assert not auth.is_read_method("/retrieval.v1.Unknown/Anything")  # fail closed


def test_client_files_must_stay_in_allowed_folders(tmp_path):
    from retrieval.config import Settings

    data = tmp_path / "data"
    (data / "imports").mkdir(parents=True)
    (data / "imports" / "corpus.txt").write_text("x")
    (tmp_path / "secret").write_text("s")
    (data / "imports" / "link").symlink_to(tmp_path / "secret")
    s = Settings(data_dir=data)
    assert auth.resolve_client_file("corpus.txt", s, data) == (data / "imports" / "corpus.txt").resolve()
    for bad in ("../../secret", str(tmp_path / "secret"), "link", "/etc/passwd"):
        with pytest.raises(errors.PermissionDenied, match="outside the folders"):
            auth.resolve_client_file(bad, s, data)
    for bad in ("", "a\x00b", "x" * 5000):
        with pytest.raises(errors.InvalidArgument):
            auth.resolve_client_file(bad, s, data)


# ------------------------------------------------------------------------------------------------
# A server with keys (plaintext, loopback)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory, api_keys):
    srv = ServerProcess(tmp_path_factory.mktemp("keyed") / "data",
                        args=["--api-keys-file", str(api_keys["file"]),
                              "--read-only-keys-file", str(api_keys["ro_file"])],
                        env={"RETRIEVAL_API_KEYS": api_keys["rw_env"]})
    srv.start()
    yield srv
    srv.stop()


def _bearer(key):
    return (("authorization", f"Bearer {key}"),)


def test_every_rpc_needs_a_key_health_stays_open(keyed, api_keys):
    hosted = hosted_rpcs(keyed.address, _bearer(api_keys["rw"]))
    assert {"retrieval.v1.Points", "retrieval.v1.Search", "retrieval.v1.Jobs"} <= {r.service for r in hosted}
    with grpc.insecure_channel(keyed.address) as ch:
        for rpc in hosted:
            for md in ((), _bearer("not-a-valid-key-at-all"), (("x-api-key", api_keys["rw"][:-1] + "?"),),
                       (("authorization", api_keys["rw"]),)):  # no "Bearer": not a key
                out = raw_call(ch, rpc, [b""], md)
                assert out.code == grpc.StatusCode.UNAUTHENTICATED, (rpc, md, out)
            assert "API key" in out.details
        reflection = raw_call(ch, type(RPCS[0])("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo",
                                                RPCS[0].input, True, True), [b""])
        assert reflection.code == grpc.StatusCode.UNAUTHENTICATED
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_read_only_key_reads_but_cannot_write(keyed, api_keys):
    with grpc.insecure_channel(keyed.address) as ch:
        for rpc in hosted_rpcs(keyed.address, _bearer(api_keys["ro"])):
            out = raw_call(ch, rpc, [b""], _bearer(api_keys["ro"]))
            if auth.is_read_method(rpc.path):
                assert out.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (rpc, out)
            else:
                assert out.code == grpc.StatusCode.PERMISSION_DENIED, (rpc, out)
                assert "read-only" in out.details
            # a read-write key gets past authentication everywhere (empty requests are invalid, not denied)
            for key in (api_keys["rw"], api_keys["rw_env"]):
                out = raw_call(ch, rpc, [b""], (("x-api-key", key),))
                assert out.code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (rpc, out)


def test_python_client_with_keys(keyed, api_keys, monkeypatch):
    x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    with Client(keyed.address, api_key=api_keys["rw"]) as c:
        c.create_collection("k", 4)
        c.upsert("k", np.arange(20), x)
        c.delete("k", ids=[3])
    with Client(keyed.address, api_key=api_keys["ro"]) as ro:
        assert ro.count("k") == 19
        assert ro.list_payload_indexes("k") == []  # a read (it was refused to read-only keys)
        assert ro.search("k", x[5], k=1).ids.tolist() == [5]          # the search stream
        assert ro.search_batch("k", x[:2], k=1)[1].ravel().tolist() == [0, 1]
        with pytest.raises(errors.PermissionDenied):
            ro.upsert("k", [100], x[:1])
        with pytest.raises(errors.PermissionDenied):
            ro.upsert_stream("k", [(np.arange(100, 102), x[:2])])
        with pytest.raises(errors.PermissionDenied):
            ro.drop_collection("k")
    with Client(keyed.address) as anon:
        with pytest.raises(errors.Unauthenticated):
            anon.count("k")
        with pytest.raises(errors.Unauthenticated):
            anon.search("k", x[0], k=1)
    monkeypatch.setenv("RETRIEVAL_API_KEY", api_keys["rw_env"])
    with Client(keyed.address) as env_client:
        assert env_client.count("k") == 19
    monkeypatch.delenv("RETRIEVAL_API_KEY")
    with Client(keyed.address, api_key_file=api_keys["client_file"]) as file_client:
        assert file_client.count("k") == 19


def test_cli_takes_keys_from_a_file_or_the_environment_only(keyed, api_keys):
    env = {**os.environ, "RETRIEVAL_API_KEY": ""}
    cmd = [sys.executable, "-m", "retrieval"]
    ok = subprocess.run(cmd + ["--api-key-file", str(api_keys["client_file"]), "collections", "list",
                               "--address", keyed.address], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "k\t" in ok.stdout, ok.stderr
    denied = subprocess.run(cmd + ["collections", "list", "--address", keyed.address], capture_output=True,
                            text=True, env=env, timeout=120)
    assert denied.returncode == 1 and "API key" in denied.stderr
    for flag in ("--api-key", "--api-keys"):  # no flag takes a key itself
        bad = subprocess.run(cmd + ["serve", flag, "x" * 20], capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode != 0 and "No such option" in bad.stderr


def test_server_refuses_to_listen_off_loopback_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    r = subprocess.run([sys.executable, "-m", "retrieval", "serve", "--host", "0.0.0.0", "--port", "0",
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "refusing to start" in r.stderr and "API key" in r.stderr and "0.0.0.0" in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was opened


# ------------------------------------------------------------------------------------------------
# TLS and mutual TLS
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki, api_keys):
    """TLS on 0.0.0.0 (so API keys are required)."""
    srv = ServerProcess(tmp_path_factory.mktemp("tls") / "data", host="0.0.0.0",
                        args=["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
                              "--api-keys-file", str(api_keys["file"])])
    srv.start()
    yield f"127.0.0.1:{srv.port}"
    srv.stop()


def test_tls_with_key(tls_server, pki, api_keys):
    with Client(tls_server, api_key=api_keys["rw"], root_certificates=pki["ca"]) as c:
        c.create_collection("t", 2)
        c.upsert("t", [1], np.ones((1, 2), np.float32))
        assert c.search("t", np.ones(2, np.float32), k=1).ids.tolist() == [1]
    with Client(tls_server, api_key=api_keys["rw"], root_certificates=pki["ca"].read_bytes(),
                server_name="localhost") as c:
        assert c.count("t") == 1
    with Client(tls_server, root_certificates=pki["ca"]) as c:  # TLS is not a key
        with pytest.raises(errors.Unauthenticated):
            c.count("t")
    for kw in ({}, {"root_certificates": pki["rogue_ca"]}):  # plaintext; a CA that did not sign the server
        with Client(tls_server, api_key=api_keys["rw"], timeout=5, **kw) as c:
            with pytest.raises(errors.Unavailable):
                c.count("t")


def test_plaintext_client_against_tls_server_is_told_about_tls(tls_server, api_keys):
    with Client(tls_server, api_key=api_keys["rw"], timeout=5) as c:
        with pytest.raises(errors.Unavailable) as e:
            c.count("t")
    assert "tls=True" in str(e.value) and "--ca-file" in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki):
    srv = ServerProcess(tmp_path_factory.mktemp("mtls") / "data",
                        args=["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
                              "--tls-client-ca", str(pki["ca"])])
    srv.start()
    yield srv.address
    srv.stop()


def test_mutual_tls(mtls_server, pki):
    good = dict(root_certificates=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"])
    with Client(mtls_server, **good) as c:
        assert c.list_collections() == []
    bad = [dict(root_certificates=pki["ca"]),
           dict(root_certificates=pki["ca"], client_cert=pki["rogue_client_cert"], client_key=pki["rogue_client_key"])]
    for kw in bad:
        with Client(mtls_server, timeout=5, **kw) as c:
            with pytest.raises(errors.Unavailable):
                c.list_collections()
    with pytest.raises(errors.InvalidArgument, match="both"):
        Client(mtls_server, root_certificates=pki["ca"], client_cert=pki["client_cert"])
    r = subprocess.run([sys.executable, "-m", "retrieval", "--ca-file", str(pki["ca"]), "--client-cert",
                        str(pki["client_cert"]), "--client-key", str(pki["client_key"]), "status",
                        "--address", mtls_server], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SERVING" in r.stdout and "retrieval.v1.Points" in r.stdout
