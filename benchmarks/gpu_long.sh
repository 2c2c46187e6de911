#!/usr/bin/env bash
# Device call (one H100): the compiled step's kernel profile (bf16, fp8), then longer closed-loop runs (80
# requests) of bf16 + compile and fp8 + compile at 1024^2 beside plain diffusers, so the ramp-up and drain of a
# closed loop weigh less.
source benchmarks/common.sh
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
timeout 140 python3 benchmarks/profile_step.py "$O/profile_step.json" 2>&1 | "${F[@]}" | tail -4
bench 230 4 $C --label bf16-compile-1024-long --baseline --baseline-requests 5 "${CC[@]}" --concurrency 8 --requests 80 \
    --warmup 8 --out "$O/bf16-long"
bench 195 4 $C --label fp8-compile-1024-long --baseline --baseline-requests 5 "${CC[@]}" --set model.quantization=fp8 \
    --concurrency 8 --requests 80 --warmup 8 --out "$O/fp8-long"
summary
