"""Names that reach the file system never escape the data folder: every RPC of every service that
takes a name (fields discovered from the generated descriptors) refuses `..`, absolute paths, NUL
bytes, unicode look-alikes and long names, and nothing appears outside the data folder."""

from __future__ import annotations

import os
import re
import secrets

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from retrieval.server.process import ServerProcess
from tests.server.rpc import all_rpcs, hosted_services, raw_call

#: string fields that name stored objects (collections, datastores, graphs, indexes, snapshots)
NAME_FIELDS = {"name", "collection", "datastore", "graph", "index", "index_name", "snapshot", "collection_name",
               "graph_name", "datastore_name"}
TAG = secrets.token_hex(4)
EVIL = [
    "..", ".", "../x", f"../../escape-{TAG}", f"/tmp/escape-{TAG}", f"a/../../escape-{TAG}", f"a\\..\\escape-{TAG}",
    "x\x00y", f"escape-{TAG}\x00.json", "\u2024\u2024/escape",           # one-dot leaders look like ".."
    f"\uff45scape-{TAG}", "caf\u00e9", "\u202eevil", "name\n", " lead", "-rf", ".hidden", "%2e%2e%2fescape",
    "a" * 129, "b" * 10_000, "",
]
SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: method-name prefixes of RPCs that create a named object on disk
CREATORS = ("Create", "Build", "Import", "Ingest", "Put", "Load")


def _name_paths(desc, prefix=(), depth=0):
    """Paths (tuples of field descriptors) to name-like string fields in a message type."""
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_STRING and f.name in NAME_FIELDS:
            yield (*prefix, f)
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            yield from _name_paths(f.message_type, (*prefix, f), depth + 1)


def _with_name(cls, path, value: str) -> bytes:
    msg = cls()
    m = msg
    for f in path[:-1]:
        if f.is_repeated:
            m = getattr(m, f.name).add()
        else:
            m = getattr(m, f.name)
            m.SetInParent()
    last = path[-1]
    if last.is_repeated:
        getattr(m, last.name).append(value)
    else:
        setattr(m, last.name, value)
    return msg.SerializeToString()


def _targets():
    out = []
    for rpc in all_rpcs():
        for path in _name_paths(rpc.input.DESCRIPTOR):
            out.append((rpc, path))
    return out


TARGETS = _targets()


def test_name_fields_are_found():
    found = {(str(r), ".".join(f.name for f in p)) for r, p in TARGETS}
    for expect in [("retrieval.v1.Collections/Create", "name"), ("retrieval.v1.Points/Upsert", "collection"),
                   ("retrieval.v1.Search/SearchStream", "collection"), ("retrieval.v1.Drafts/DropDatastore", "name")]:
        if expect[0].rsplit("/", 1)[0] in {str(r).rsplit("/", 1)[0] for r, _ in TARGETS}:
            assert expect in found


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    s = ServerProcess(root / "data")
    s.start()
    with grpc.insecure_channel(s.address) as ch:
        s.hosted = hosted_services(ch)  # services with generated code but not hosted: see test_fuzz
    yield s, root
    s.stop()


def _tree(root):
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


@pytest.mark.parametrize("target", TARGETS, ids=[f"{r}:{'.'.join(f.name for f in p)}" for r, p in TARGETS])
def test_bad_names_are_refused_everywhere(srv, target):
    s, root = srv
    rpc, path = target
    if rpc.service not in s.hosted:
        return
    with grpc.insecure_channel(s.address) as ch:
        for name in EVIL:
            out = raw_call(ch, rpc, [_with_name(rpc.input, path, name)] * (2 if rpc.client_streaming else 1),
                           timeout=30)
            # RPCs that create an object must refuse the name; lookups may also answer NOT_FOUND (nothing
            # by that name exists; the file-system checks below show nothing was touched outside)
            allowed = {grpc.StatusCode.INVALID_ARGUMENT}
            if not rpc.name.startswith(CREATORS) or name == "":
                allowed.add(grpc.StatusCode.NOT_FOUND)
            if name == "":  # "no name" is a valid choice for optional references (e.g. a draft's datastore)
                allowed |= {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}
            if out.code == grpc.StatusCode.OK and name and not rpc.name.startswith(CREATORS):
                # a request with nothing to do (e.g. no pairs to score) may succeed without using the
                # name, but must not return anything found under it
                assert out.response_bytes == 0, (str(rpc), name[:40], out)
                continue
            assert out.code in allowed, (str(rpc), name[:40], out)
    assert not os.path.exists(f"/tmp/escape-{TAG}")
    for rel in _tree(root):
        assert TAG not in rel and "escape" not in rel, rel
    for rel in _tree(root / "data"):
        for part in rel.split(os.sep):
            assert SAFE.match(part), f"odd name in the data folder: {rel!r}"
