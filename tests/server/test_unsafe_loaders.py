"""No pickle or other code-executing format is read from a client or a client-named file.

An audit of the source (``retrieval/`` and ``index_builder/``, whose jobs run inside the server on
files clients name): the AST of every module is searched for loaders that can run code while reading
data. Allowed: ``numpy.load`` without ``allow_pickle=True``, ``torch.load(..., weights_only=True)``,
``yaml.safe_load`` / ``yaml.load(Loader=SafeLoader)``, and ``pickle.Unpickler`` subclasses that override
``find_class`` (an allow-list of globals, e.g. the Planetoid reader's). Anything else fails the test
with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AUDITED = [ROOT / "retrieval", ROOT / "index_builder"]

FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "jsonpickle.decode", "pandas.read_pickle",
    "torch.jit.load", "torch.package.PackageImporter", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
    "yaml.full_load_all", "eval", "exec", "compile", "numpy.lib.format.read_array_header_1_0",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader"}
MODULE_ALIASES = {"np": "numpy", "pd": "pandas"}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _aliases(tree) -> dict[str, str]:
    """local name -> dotted origin, from the module's imports (`import pickle as p`, `from yaml import load`)."""
    out = dict(MODULE_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _resolve(name: str | None, aliases: dict[str, str]) -> str | None:
    if name is None:
        return None
    head, _, rest = name.partition(".")
    base = aliases.get(head, head)
    return f"{base}.{rest}" if rest else base


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit_source(src: str, filename: str = "<src>") -> list[str]:
    """Problems found in one module's source, as 'file:line: what'."""
    tree = ast.parse(src, filename)
    aliases = _aliases(tree)
    problems = []

    def bad(node, what):
        problems.append(f"{filename}:{node.lineno}: {what}")

    restricted: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_resolve(_dotted(b), aliases) for b in node.bases}
            if bases & {"pickle.Unpickler", "_pickle.Unpickler"}:
                if any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                    restricted.add(node.name)
                else:
                    bad(node, f"pickle.Unpickler subclass {node.name} without a restricting find_class")
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not _const(node.value, False):
            bad(node.value, "trust_remote_code is not False (a model folder could run code)")
        if not isinstance(node, ast.Call):
            continue
        name = _resolve(_dotted(node.func), aliases)
        if name is None:
            continue
        if name in FORBIDDEN_CALLS:
            bad(node, f"{name}() can execute code from the data it reads")
        elif name == "numpy.load":
            ap = _kw(node, "allow_pickle")
            if ap is not None and not _const(ap, False):
                bad(node, "numpy.load with allow_pickle other than False")
        elif name == "torch.load":
            if not _const(_kw(node, "weights_only"), True):
                bad(node, "torch.load without weights_only=True unpickles arbitrary objects")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if _resolve(_dotted(loader), aliases) not in {_resolve(x, aliases) for x in SAFE_YAML_LOADERS} | \
                    SAFE_YAML_LOADERS:
                bad(node, f"{name} without a safe Loader")
    return problems


def test_the_code_base_has_no_unsafe_loader():
    problems = []
    files = [p for root in AUDITED if root.exists() for p in root.rglob("*.py") if "/v1/" not in str(p)]
    assert len(files) > 20
    for p in files:
        problems += audit_source(p.read_text(), str(p.relative_to(ROOT)))
    assert not problems, "unsafe loaders:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(f)",
    "import pickle as p\np.loads(b)",
    "from pickle import loads\nloads(b)",
    "import pickle\nclass U(pickle.Unpickler):\n    pass",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import numpy\nnumpy.load(p, allow_pickle=flag)",
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(s)",
    "eval(expr)",
    "exec(code)",
    "import joblib\njoblib.load(p)",
    "import marshal\nmarshal.loads(b)",
    "import pandas as pd\npd.read_pickle(p)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
    "import torch\ntorch.jit.load(p)",
])
def test_the_audit_catches_unsafe_loaders(snippet):
    assert audit_source(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False, mmap_mode='r')",
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import pickle\nclass R(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise ValueError\nR(f).load()",
    "model.eval()",
    "import re\nre.compile('x')",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, local_files_only=True)",
])
def test_the_audit_allows_safe_loaders(snippet):
    assert audit_source(snippet) == []
