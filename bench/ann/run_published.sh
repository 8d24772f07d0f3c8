#!/usr/bin/env bash
# Reproduces bench/results/ann/: the three shipped sets with every algorithm (in-process libraries and our
# service over gRPC, same run), then the 1M synthetic set. Single-threaded, as BASELINES.md.
# Takes hours on a 2-core machine; run it in the background:
#   nohup bash bench/ann/run_published.sh > /tmp/bench_ann.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for ds in bigann-10k glove-50-10k mnist-10k; do
  python -m bench.ann --dataset "$ds" -v
done
python -m bench.ann --config bench/ann/configs/gmm-1m.yaml -v
