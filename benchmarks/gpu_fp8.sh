#!/usr/bin/env bash
# Device call (one H100): stage profile; bf16 compile with stage pipelining; fp8 + compile. Each bench beside
# plain diffusers in the same run.
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING)
run() { timeout 300 python3 -m orchestrator.cli bench $C "$@" 2>&1 | "${F[@]}" | tail -12; }
timeout 150 python3 benchmarks/profile_stages.py "$O/profile_stages.json" 2>&1 | "${F[@]}" | tail -14
run --label bf16-compile-pipelined --baseline --baseline-requests 3 --set model.compile=true \
    --set deployment.pipeline_stages=true --set deployment.max_inflight_batches=3 \
    --concurrency 8,12 --requests 24 --warmup 12 --out "$O/compile-pipelined"
run --label fp8-compile --baseline --baseline-requests 3 --set model.compile=true --set model.quantization=fp8 \
    --concurrency 1,8 --requests 24 --warmup 12 --out "$O/fp8-compile"
