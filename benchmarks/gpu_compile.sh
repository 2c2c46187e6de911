#!/usr/bin/env bash
# Device call (one H100): bf16 + regional compile at 1024^2 and 512^2, each beside plain diffusers in the same
# run, then a restart on the warm compile cache (time to ready).
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING)
run() { timeout 280 python3 -m orchestrator.cli bench $C "$@" 2>&1 | "${F[@]}" | tail -14; }
run --label bf16-compile-1024 --baseline --baseline-requests 4 --set model.compile=true \
    --set model.compile_cache_dir=/tmp/zc --concurrency 1,4,8 --requests 16 --warmup 8 --out "$O/compile-1024"
run --label bf16-compile-512 --baseline --baseline-requests 6 --set model.compile=true --sizes 512x512 \
    --set defaults.width=512 --set defaults.height=512 --set router.max_batch_size=8 \
    --set model.compile_cache_dir=/tmp/zc512 --concurrency 1,8,16 --requests 32 --warmup 16 --out "$O/compile-512"
run --label warm-cache-restart --set model.compile=true --set model.compile_cache_dir=/tmp/zc \
    --concurrency 1 --requests 4 --warmup 0 --out "$O/warm-restart"
