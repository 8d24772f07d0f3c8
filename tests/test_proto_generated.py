"""The committed generated code in retrieval/v1 is exactly what scripts/gen_proto.py produces now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_up_to_date(tmp_path):
    gen = _gen_module()
    files = gen.generate(tmp_path)
    fresh = {f.name: f.read_text() for f in files}
    committed = {p.name: p.read_text() for p in (ROOT / "retrieval" / "v1").glob("*_pb2*")}
    protos = sorted(p.stem for p in (ROOT / "proto" / "retrieval" / "v1").glob("*.proto"))
    # every proto yields _pb2.py, _pb2.pyi and _pb2_grpc.py
    assert sorted(fresh) == sorted(f"{s}{suf}" for s in protos for suf in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    assert sorted(committed) == sorted(fresh), "retrieval/v1 has missing or extra files: run scripts/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run python scripts/gen_proto.py"


def test_generated_imports_are_relative():
    for p in (ROOT / "retrieval" / "v1").glob("*_pb2*.py"):
        text = p.read_text()
        assert "from retrieval.v1 import" not in text, p.name
