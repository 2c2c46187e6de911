#!/usr/bin/env bash
# Device call 1 (one H100): plain diffusers vs the orchestrator at 1024^2, bf16 eager and regionally compiled.
# Run from the repo root on the GPU machine, after installing .whl (see ../shared/device/README.md).
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
B="python3 -m orchestrator.cli bench benchmarks/configs/gpu-random.yaml"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$B --label bf16-eager --baseline --baseline-requests 5 --concurrency 1,4,8 --requests 16 --warmup 4 \
   --out "$O/bf16-eager" 2>&1 | grep -v -e '%|' -e Warning -e warn | tail -25
$B --label bf16-compile --set model.compile=true --concurrency 1,4,8 --requests 16 --warmup 8 \
   --out "$O/bf16-compile" 2>&1 | grep -v -e '%|' -e Warning -e warn | tail -25
