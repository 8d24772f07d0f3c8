#!/usr/bin/env bash
# The graph link-prediction benchmarks on one CUDA GPU, run side by side (they are launch-bound and
# leave the GPU mostly idle), each bounded by a wall-clock limit; every benchmark saves after each
# finished run, so a run cut short keeps what it finished.
#
#   bash bench/graph/gpu_suite.sh OUT_DIR [SECONDS]       (default: bench/results/graph, 3000 s)
#
# Per-epoch GPU timings from this script are measured with the other benchmarks running at the same time.
set -u
OUT_DIR=${1:-bench/results/graph}
SECS=${2:-3000}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/graph/test_ncn.py -m gpu 2>&1 | tail -3
DDI_BUDGET=$(( SECS * 6 / 10 ))
timeout "$SECS" $PY -m bench.graph.ncn_ddi --device cuda --epochs 100 --time-budget "$DDI_BUDGET" --out "$OUT_DIR" > "$OUT_DIR/ddi.log" 2>&1 &
timeout "$SECS" $PY -m bench.graph.ncn_planetoid --device cuda --datasets cora --models ncn ncnc --seeds 0 1 2 3 4 5 6 7 8 9 --name ncn_planetoid_cuda_cora --out "$OUT_DIR" > "$OUT_DIR/cora.log" 2>&1 &
timeout "$SECS" $PY -m bench.graph.ncn_planetoid --device cuda --datasets citeseer --models ncn ncnc --seeds 0 1 2 3 4 5 6 7 8 9 --name ncn_planetoid_cuda_citeseer --out "$OUT_DIR" > "$OUT_DIR/citeseer.log" 2>&1 &
timeout "$SECS" $PY -m bench.graph.ncn_lp_graphs --device cuda --seeds 0 1 2 --out "$OUT_DIR" > "$OUT_DIR/lp_graphs.log" 2>&1 &
wait
tail -n 4 "$OUT_DIR"/*.log
