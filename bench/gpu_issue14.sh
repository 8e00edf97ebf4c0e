#!/usr/bin/env bash
# Issue 14's GPU run, from a copy of the tree on the GPU machine (see docs/BENCHMARKS.md): GPU tests, the kernel
# measurements (skillkv/measure/bench_kernels.py) and the engine benchmark (skillkv/measure/bench_gpu.py), each under
# its own time limit so a slow part leaves the others' results. Usage: bash bench/gpu_issue14.sh WHEELS_DIR OUT [PARTS]
#   PARTS: any of tests,kernels,bench (default all); EXTRA_BENCH: more bench_gpu arguments
set -uo pipefail
whl=$1; out=$2; parts=${3:-tests,kernels,bench}
site=${TMPDIR:-/tmp}/skillkv-site
python3 -c "import flash_attn_interface" 2>/dev/null || PYTHONPATH=$site python3 -c "import flash_attn_interface" \
  2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "$whl"/*.whl
export PYTHONPATH=.:$site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$out/env.txt"
if [[ $parts == *tests* ]]; then
  # the FA3 wheel set has no zstandard: its tier policy (tiers/policy.py) cannot run, so skip what needs it
  skip=""; python3 -c "import zstandard" 2>/dev/null || skip="not zstd and not test_exact_equals_full_on_the_gpu_paged"
  timeout ${TESTS_S:-220} python3 -m pytest -q -ra -p no:cacheprovider tests -m "gpu or triton" \
    -k "${skip:-gpu or not gpu}" > "$out/tests.log" 2>&1; tail -60 "$out/tests.log"
fi
if [[ $parts == *kernels* ]]; then
  timeout 170 python3 -m skillkv.measure.bench_kernels --out "$out" --parts "${KPARTS:-ceilings,gemm,attention,ops}" \
    2>&1 | tail -40 | tee "$out/kernels.log"
fi
if [[ $parts == *bench* ]]; then
  timeout ${BENCH_S:-330} python3 -m skillkv.measure.bench_gpu --out "$out" --reps 5 ${EXTRA_BENCH:-} 2>&1 | tail -30 \
    | tee "$out/bench.log"
fi
