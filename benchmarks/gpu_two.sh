#!/usr/bin/env bash
# Device call (two H100s): router scaling 1 -> 2 replicas (bf16 + compile), then the shipped dual-24GB configs
# with each GPU capped at 23.5 GiB (peaks measured per GPU): the split replica at 1024^2 bs4 at 1536^2 and 2048^2,
# and a functional fp8 check.
source benchmarks/common.sh
CAP=(--set cluster.address=null --set model.source=random-full --set deployment.gpu_memory_limit_gib=23.5
     --set cluster.num_cpus=8)
bench 240 9 $C --label scale-1 --baseline --baseline-requests 3 --set deployment.replicas=1 --set model.compile=true \
    --set model.compile_cache_dir=/tmp/zc --concurrency 8 --requests 16 --warmup 8 --out "$O/scale1"
bench 170 9 $C --label scale-2 --set deployment.replicas=2 --set model.compile=true \
    --set model.compile_cache_dir=/tmp/zc --concurrency 16 --requests 32 --warmup 16 --out "$O/scale2"
bench 120 9 clusters/dual-4090d-split.yaml "${CAP[@]}" --label capped-split-1024 --concurrency 4 --requests 8 \
    --warmup 4 --out "$O/cap-split"
bench 120 9 clusters/dual-4090d-split.yaml "${CAP[@]}" --label capped-split-big --sizes 1536x1536,2048x2048 \
    --set defaults.width=1536 --set defaults.height=1536 --concurrency 1 --requests 4 --warmup 2 --out "$O/cap-split-big"
bench 90 3 $C --label fp8-eager-check --set deployment.replicas=1 --set model.quantization=fp8 --sizes 512x512 \
    --concurrency 1 --requests 2 --warmup 1 --out "$O/fp8-check"
summary
