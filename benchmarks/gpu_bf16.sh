#!/usr/bin/env bash
# Device call 1 (one H100): plain diffusers vs the orchestrator at 1024^2, bf16 eager and regionally compiled.
# Run from the repo root on the GPU machine, after installing .whl (see ../shared/device/README.md).
source benchmarks/common.sh
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench 600 25 $C --label bf16-eager --baseline --baseline-requests 5 --concurrency 1,4,8 --requests 16 --warmup 4 \
    --out "$O/bf16-eager"
bench 600 25 $C --label bf16-compile --set model.compile=true --concurrency 1,4,8 --requests 16 --warmup 8 \
    --out "$O/bf16-compile"
