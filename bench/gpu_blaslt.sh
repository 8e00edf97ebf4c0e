#!/usr/bin/env bash
# Issue 14: does cuBLASLt (torch.backends.cuda.preferred_blas_library) read the question step's weights faster than
# cuBLAS's default heuristics in the engine? Two bench_gpu processes at 20,480 skill tokens, one after the other.
# Usage: bash bench/gpu_blaslt.sh WHEELS_DIR OUT   (bench_gpu's default batch: a smaller one shrinks the pool
# below the 20k prefix, which is then evicted before it is timed)
set -uo pipefail
whl=$1; out=$2; site=${TMPDIR:-/tmp}/skillkv-site
PYTHONPATH=$site python3 -c "import flash_attn_interface" 2>/dev/null || python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl
export PYTHONPATH=.:$site PYTHONUNBUFFERED=1
for lib in default cublaslt; do
  mkdir -p "$out/$lib"
  timeout 140 python3 -c "
import sys, runpy, torch
torch.backends.cuda.preferred_blas_library('$lib')
sys.argv = ['bench_gpu', '--out', '$out/$lib', '--sizes', '20480', '--reps', '7']
runpy.run_module('skillkv.measure.bench_gpu', run_name='__main__')" 2>&1 | grep -E "^ +[0-9]|L1 profile|by GEMM|batch|Error" \
    | sed "s/^/$lib: /"
done
