"""Draft-lookup benchmarks: teacher-forced acceptance (MAT) on Spec-Bench, latency, memory, build speed.

Run ``python -m bench.drafts.mat`` (acceptance) and ``python -m bench.drafts.speed`` (latency, memory,
datastore build throughput). Results go to ``bench/results/drafts/``.
"""
