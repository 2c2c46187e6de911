#!/usr/bin/env bash
# Device call (one H100): bf16 + regional compile at 1024^2 and 512^2, each beside plain diffusers in the same
# run, then a restart on the warm compile cache (time to ready).
source benchmarks/common.sh
bench 280 14 $C --label bf16-compile-1024 --baseline --baseline-requests 4 --set model.compile=true \
    --set model.compile_cache_dir=/tmp/zc --concurrency 1,4,8 --requests 16 --warmup 8 --out "$O/compile-1024"
bench 280 14 $C --label bf16-compile-512 --baseline --baseline-requests 6 --set model.compile=true --sizes 512x512 \
    --set defaults.width=512 --set defaults.height=512 --set router.max_batch_size=8 \
    --set model.compile_cache_dir=/tmp/zc512 --concurrency 1,8,16 --requests 32 --warmup 16 --out "$O/compile-512"
bench 280 14 $C --label warm-cache-restart --set model.compile=true --set model.compile_cache_dir=/tmp/zc \
    --concurrency 1 --requests 4 --warmup 0 --out "$O/warm-restart"
