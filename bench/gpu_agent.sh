#!/usr/bin/env bash
# Issue 22's GPU run, from a copy of the tree on the GPU machine: the GPU tests, then the agent-trace benchmark
# (skillkv bench --agent) on the 8B dummy shape: concurrent conversations, histories growing to 20k+ tokens, skillkv
# (auto: the prefix cache) against `mode: full` on the same server. No llama.cpp there (no GGUF of the dummy model).
# Usage: bash bench/gpu_agent.sh OUT [PARTS] with the wheel sets .whl (FlashInfer) and .whl-serve (FastAPI, uvicorn,
# pydantic) carried; PARTS: any of tests,smoke,agent (default all). AGENT_ARGS: more `bench --agent` arguments.
set -uo pipefail
out=$1; parts=${2:-tests,smoke,agent}
site=${TMPDIR:-/tmp}/skillkv-site
python3 -c "import fastapi, flashinfer" 2>/dev/null || PYTHONPATH=$site python3 -c "import fastapi, flashinfer" \
  2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .whl/*.whl .whl-serve/*.whl
export PYTHONPATH=.:$site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.txt"
python3 -c "import torch, flashinfer; print('torch', torch.__version__, 'flashinfer', flashinfer.__version__)" \
  | tee -a "$out/env.txt"
if [[ $parts == *tests* ]]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -ra -p no:cacheprovider tests/engine tests/sched tests/serve \
    -m "gpu or not slow" -x > "$out/tests.log" 2>&1; tail -25 "$out/tests.log"
fi
bench() {  # NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 -m skillkv bench --agent --model dummy:llama-3.1-8b --device cuda --no-llamacpp \
    --store "$out/store" --out "$out/$name" --concurrent "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $?"; tail -12 "$out/$name.log"
}
[[ $parts == *smoke* ]] && bench smoke 240 --conversations 4 --turns 4 --scale 0.5 --timeout 90
# 32 conversations growing to ~20k tokens each hold more KV than an H100's pool: evicted pages spill to host memory
[[ $parts == *agent* ]] && bench agent ${AGENT_S:-540} --conversations 32 --turns 8 --scale 3 --timeout 230 \
  --host-budget 48GiB --gpu-kv-budget ${KV:-26GiB} ${AGENT_ARGS:-}
exit 0
