"""The ``retrieval collections`` commands against a real server, run as subprocesses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest


def cli(*args, address=None, timeout=60, input=None):
    cmd = [sys.executable, "-m", "retrieval", *args]
    if address is not None:
        cmd += ["--address", address]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)


def test_create_list_describe_drop(server, client):
    a = server.address
    r = cli("collections", "create", "cli-one", "--dimension", "8", "--metric", "cosine", address=a)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "cli-one" and info["dimension"] == 8 and info["metric"] == "cosine"
    assert info["index"]["type"] == "hnsw" and info["index"]["m"] == 16
    r = cli("collections", "create", "cli-two", "-d", "4", "--index", '{"type": "faiss", "factory": "IVF8,Flat"}',
            "--shards", "2", address=a)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards"] == 2
    # the server really has them
    assert {"cli-one", "cli-two"} <= {c["name"] for c in client.list_collections()}
    assert client.describe_collection("cli-two")["index"].factory == "IVF8,Flat"

    client.upsert("cli-one", [1, 2, 3], [[1, 0, 0, 0, 0, 0, 0, 0]] * 3)
    r = cli("collections", "list", address=a)
    assert r.returncode == 0, r.stderr
    lines = {ln.split("\t")[0]: ln for ln in r.stdout.splitlines()}
    assert "dim=8" in lines["cli-one"] and "metric=cosine" in lines["cli-one"] and "points=3" in lines["cli-one"]
    assert "index=faiss" in lines["cli-two"]

    r = cli("collections", "describe", "cli-one", address=a)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["points"] == 3 and d["dimension"] == 8 and len(d["shard_info"]) == 1

    r = cli("collections", "drop", "cli-one", "--yes", address=a)
    assert r.returncode == 0 and "dropped cli-one" in r.stdout, r.stderr
    r = cli("collections", "drop", "cli-two", address=a, input="n\n")  # asks first; "no" keeps it
    assert r.returncode == 1 and "cli-two" in {c["name"] for c in client.list_collections()}
    r = cli("collections", "drop", "cli-two", address=a, input="y\n")
    assert r.returncode == 0, r.stderr
    assert not {"cli-one", "cli-two"} & {c["name"] for c in client.list_collections()}


@pytest.mark.parametrize("args,words", [
    (("collections", "describe", "missing"), "collection 'missing' does not exist"),
    (("collections", "drop", "missing", "--yes"), "collection 'missing' does not exist"),
    (("collections", "create", "bad/name", "--dimension", "4"), "not valid"),
    (("collections", "create", "x-metric", "--dimension", "4", "--metric", "hamming"), "unknown metric 'hamming'"),
    (("collections", "create", "x-json", "--dimension", "4", "--index", "{bad"), "is not valid JSON"),
    (("collections", "create", "x-type", "--dimension", "4", "--index", "annoy"), "unknown index type 'annoy'"),
])
def test_errors_are_one_line_and_exit_1(server, args, words):
    r = cli(*args, address=server.address)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert words in r.stderr and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [("collections", "list"), ("collections", "create", "x", "--dimension", "4")])
def test_no_server(args):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    r = cli(*args, address=address, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert address in r.stderr and "connect" in r.stderr.lower()  # says where it tried and what failed
