"""Sweep configuration: which algorithms, which build settings, which query settings.

YAML layout (every key optional; command-line flags override the top-level keys)::

    dataset: bigann-10k
    k: 10
    runs: 3              # best of N timed passes, as ann-benchmarks' run_count
    batch_size: 0        # queries per batch call; 0 = all queries in one call
    threads: 1
    algorithms:
      hnswlib:
        build: {M: [8, 16, 32], ef_construction: 200}     # a grid: the product of the lists
        query: {ef: [10, 20, 40, 80, 160]}
      faiss-ivf-flat:
        build: [{nlist: 64}, {nlist: 256}]                # or an explicit list of settings
        query: {nprobe: [1, 2, 4, 8, 16, 32]}

An algorithm without ``build`` / ``query`` uses its adapter's defaults.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import InvalidArgument, NotFound

TOP_LEVEL = ("dataset", "hdf5", "metric", "k", "runs", "batch_size", "threads", "queries", "seed",
             "max_n", "max_queries", "epsilon", "out", "algorithms")


def expand(spec: Any, where: str) -> list[dict[str, Any]]:
    """A grid (mapping of name -> value or list of values) or a list of grids -> list of settings."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        keys = list(spec)
        values = [v if isinstance(v, (list, tuple)) else [v] for v in spec.values()]
        for k, v in zip(keys, values):
            if len(v) == 0:
                raise InvalidArgument(f"{where}: parameter {k!r} has an empty list of values")
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        out: list[dict[str, Any]] = []
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping):
                raise InvalidArgument(f"{where}[{i}] must be a mapping of parameters, got {item!r}")
            out.extend(expand(item, f"{where}[{i}]"))
        return out
    raise InvalidArgument(f"{where} must be a mapping or a list of mappings, got {spec!r}")


@dataclasses.dataclass
class AlgorithmSweep:
    """One algorithm's build settings and query settings (each a list of dicts)."""

    name: str
    build: list[dict[str, Any]]
    query: list[dict[str, Any]]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep YAML file (unknown top-level keys are an error naming the valid ones)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise NotFound(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InvalidArgument(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"config file {str(p)!r} must hold a mapping at the top level")
    extra = sorted(set(data) - set(TOP_LEVEL))
    if extra:
        raise InvalidArgument(f"config file {str(p)!r} has unknown keys {extra}; valid keys: {list(TOP_LEVEL)}")
    algs = data.get("algorithms")
    if algs is not None and not isinstance(algs, Mapping):
        raise InvalidArgument(f"config file {str(p)!r}: 'algorithms' must map algorithm names to settings")
    return dict(data)


def sweeps(names: Sequence[str], config_algorithms: Mapping[str, Any] | None) -> list[AlgorithmSweep]:
    """The sweep of each named algorithm: its config section, else its adapter's defaults."""
    from bench.ann import adapters

    out = []
    for name in names:
        cls = adapters.get(name)
        sec = (config_algorithms or {}).get(name) or {}
        if not isinstance(sec, Mapping) or set(sec) - {"build", "query"}:
            raise InvalidArgument(
                f"config for algorithm {name!r} must be a mapping with keys 'build' and/or 'query', got {sec!r}"
            )
        build = expand(sec.get("build"), f"algorithms.{name}.build") or [dict(b) for b in cls.default_build]
        query = expand(sec.get("query"), f"algorithms.{name}.query") or [dict(q) for q in cls.default_query]
        out.append(AlgorithmSweep(name, build, query))
    return out
