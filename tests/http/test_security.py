"""The HTTP API's security is gRPC's: API keys on every route (Bearer or api-key header), read-only keys
refused on writes (403), TLS with the server's certificate, backpressure as 429 + Retry-After, and no
listening off loopback without keys."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest

from tests.http.conftest import slow_build_input, slow_job_params, start_server

# Every route under /v1/ with a body that passes validation, and whether it writes. A route added
# without an entry here fails test_every_route_is_classified.
ROUTES = {
    ("GET", "/v1/collections"): (False, None),
    ("POST", "/v1/collections"): (True, {"name": "sec2", "dimension": 3}),
    ("GET", "/v1/collections/{name}"): (False, None),
    ("DELETE", "/v1/collections/{name}"): (True, None),
    ("GET", "/v1/collections/{name}/payload-indexes"): (False, None),
    ("PUT", "/v1/collections/{name}/points"): (True, {"ids": [9], "vectors": [[0, 0, 1]]}),
    ("POST", "/v1/collections/{name}/points/get"): (False, {"ids": [1]}),
    ("POST", "/v1/collections/{name}/points/delete"): (True, {"ids": [9]}),
    ("POST", "/v1/collections/{name}/points/count"): (False, {}),
    ("POST", "/v1/collections/{name}/points/scroll"): (False, {}),
    ("POST", "/v1/collections/{name}/search"): (False, {"vector": [1, 0, 0], "k": 1}),
    ("GET", "/v1/jobs"): (False, None),
    ("POST", "/v1/jobs"): (True, {"kind": "nope"}),
    ("GET", "/v1/jobs/kinds"): (False, None),
    ("GET", "/v1/jobs/{job_id}"): (False, None),
    ("POST", "/v1/jobs/{job_id}/cancel"): (True, None),
    ("GET", "/v1/jobs/{job_id}/events"): (False, None),
    ("GET", "/v1/graphs"): (False, None),
    ("GET", "/v1/graphs/{graph}"): (False, None),
    ("POST", "/v1/graphs/{graph}/similar"): (False, {"nodes": [0]}),
    ("POST", "/v1/graphs/{graph}/score-links"): (False, {"src": [0], "dst": [1]}),
    ("POST", "/v1/graphs/{graph}/predict-links"): (False, {"nodes": [0]}),
    ("GET", "/v1/crossencoder"): (False, None),
    ("GET", "/v1/crossencoder/{index}"): (False, None),
    ("POST", "/v1/crossencoder/{index}/search"): (False, {"query": "x"}),
    ("GET", "/v1/datastores"): (False, None),
    ("GET", "/v1/datastores/{name}"): (False, None),
    ("POST", "/v1/drafts"): (False, {"context_ids": [1, 2, 1], "vocab_size": 10}),
    ("GET", "/v1/status"): (False, None),
    ("GET", "/v1/metrics"): (False, None),
}
FILL = {"name": "sec", "job_id": "nojob", "graph": "nograph", "index": "noindex"}


def _client(srv, pki, key=None, header="authorization"):
    h = {}
    if key is not None:
        h = {"authorization": f"Bearer {key}"} if header == "authorization" else {header: key}
    return httpx.Client(base_url=srv.http_url, verify=ssl.create_default_context(cafile=str(pki["ca"])), headers=h,
                        timeout=60)


@pytest.fixture(scope="module")
def setup(secure, pki, keys):
    with _client(secure, pki, keys["rw"]) as c:
        assert c.post("/v1/collections", json={"name": "sec", "dimension": 3}).status_code == 201
        assert c.put("/v1/collections/sec/points", json={"ids": [1], "vectors": [[1, 0, 0]]}).status_code == 200
    return secure


def test_tls_only(setup, pki):
    assert setup.http_url.startswith("https://")
    with _client(setup, pki) as c:
        assert c.get("/healthz").json()["status"] == "SERVING"  # open, like gRPC health checking
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200  # the page asks for the key
    with pytest.raises(httpx.HTTPError):
        httpx.get(setup.http_url.replace("https://", "http://") + "/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a certificate the client does not trust
        httpx.get(setup.http_url + "/healthz", timeout=10)


def test_every_route_is_classified(setup, pki):
    with _client(setup, pki) as c:
        spec = c.get("/openapi.json").json()
    found = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/v1/")}
    assert found == set(ROUTES)


def _request(c, method, path, body):
    url = path.format(**FILL)
    return c.request(method, url, json=body) if body is not None else c.request(method, url)


@pytest.mark.parametrize("method,path", sorted(ROUTES))
def test_auth_on_every_route(setup, pki, keys, method, path):
    write, body = ROUTES[(method, path)]
    with _client(setup, pki) as c:
        r = _request(c, method, path, body)
        assert r.status_code == 401 and "requires an API key" in r.json()["error"]["message"]
    with _client(setup, pki, "x" * 32) as c:
        r = _request(c, method, path, body)
        assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    with _client(setup, pki, keys["ro"], header="api-key") as c:
        r = _request(c, method, path, body)
        if write:
            assert r.status_code == 403 and "read-only" in r.json()["error"]["message"], r.text
        else:
            assert r.status_code not in (401, 403), r.text
            assert r.status_code < 500, r.text


def test_read_write_key_and_same_sentence_as_grpc(setup, pki, keys):
    from retrieval.client import Client
    from retrieval.errors import PermissionDenied

    with _client(setup, pki, keys["rw"], header="x-api-key") as c:
        assert c.put("/v1/collections/sec/points", json={"ids": [2], "vectors": [[0, 1, 0]]}).status_code == 200
        assert c.post("/v1/collections/sec/points/count").json()["count"] == 2
    with _client(setup, pki, keys["ro"]) as c:
        r = c.put("/v1/collections/sec/points", json={"ids": [3], "vectors": [[0, 1, 0]]})
        assert r.status_code == 403
    with Client(setup.address, api_key=keys["ro"], root_certificates=pki["ca"].read_bytes()) as g, \
            pytest.raises(PermissionDenied) as e:
        g.upsert("sec", ids=[3], vectors=[[0, 1, 0]])
    assert str(e.value) == r.json()["error"]["message"]


def test_backpressure_is_429_with_retry_after(setup, pki, keys):
    path = slow_build_input(setup.folder, n=20_000)
    with _client(setup, pki, keys["rw"]) as c:
        job = c.post("/v1/jobs", json={"kind": "build_index", "params": slow_job_params(path, "slow")}).json()
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as first:  # holds the one stream allowed
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)  # the stream is open and admitted
            r = c.get(f"/v1/jobs/{job['id']}/events")
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
            assert "limits.max_streams" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        c.post(f"/v1/jobs/{job['id']}/cancel")
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end:  # the closed stream gives its slot back
            r = c.get(f"/v1/jobs/{job['id']}/events")
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200
        assert 'retrieval_rejected_total{reason="streams"}' in c.get("/v1/metrics").text


@pytest.mark.slow
def test_refuses_to_listen_off_loopback_without_keys(tmp_path):
    with pytest.raises(RuntimeError, match="no API key is configured"):
        start_server(tmp_path, host="0.0.0.0")


@pytest.mark.slow
def test_mutual_tls_and_port_in_use(tmp_path, pki, keys):
    import socket

    srv = start_server(tmp_path / "mtls", args=["--api-keys-file", str(keys["rw_file"]),
                                                "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
                                                "--tls-client-ca", str(pki["ca"])])
    try:
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        r = httpx.get(srv.http_url + "/v1/collections", verify=ctx, headers={"api-key": keys["rw"]}, timeout=30)
        assert r.status_code == 200 and r.json() == {"collections": []}
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(srv.http_url + "/healthz", verify=ssl.create_default_context(cafile=str(pki["ca"])), timeout=10)
    finally:
        assert srv.stop() == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            start_server(tmp_path / "taken", env={"RETRIEVAL_HTTP_PORT": str(port)})
