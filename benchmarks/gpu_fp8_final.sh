#!/usr/bin/env bash
# Device call (one H100): fp8 + regional compile at 1024^2, beside plain diffusers; warm-up at batch 4.
source benchmarks/common.sh
bench 540 12 $C --label fp8-compile --baseline --baseline-requests 3 --set model.compile=true \
    --set model.quantization=fp8 --set 'deployment.warmup_batch_sizes=[4]' \
    --concurrency 8 --requests 24 --warmup 8 --out "$O/fp8-compile"
summary
