"""ANN recall / QPS benchmark (``python -m bench.ann``), following the ann-benchmarks protocol.

Modules: :mod:`~bench.ann.adapters` (the algorithm interface and registry), :mod:`~bench.ann.datasets`
(shipped sets, ann-benchmarks HDF5, seeded synthetic sets with cached ground truth),
:mod:`~bench.ann.metrics` (recall with distance ties, latency statistics, Pareto frontier),
:mod:`~bench.ann.runner` (build once per build setting, sweep query settings),
:mod:`~bench.ann.report` (JSON, Markdown, PNG). See ``docs/benchmarks.md``.
"""
