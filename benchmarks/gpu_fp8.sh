#!/usr/bin/env bash
# Device call (one H100): stage profile; bf16 compile with stage pipelining; fp8 + compile. Each bench beside
# plain diffusers in the same run.
source benchmarks/common.sh
timeout 150 python3 benchmarks/profile_stages.py "$O/profile_stages.json" 2>&1 | "${F[@]}" | tail -14
bench 300 12 $C --label bf16-compile-pipelined --baseline --baseline-requests 3 --set model.compile=true \
    --set deployment.pipeline_stages=true --set deployment.max_inflight_batches=3 \
    --concurrency 8,12 --requests 24 --warmup 12 --out "$O/compile-pipelined"
bench 300 12 $C --label fp8-compile --baseline --baseline-requests 3 --set model.compile=true \
    --set model.quantization=fp8 --concurrency 1,8 --requests 24 --warmup 12 --out "$O/fp8-compile"
