#!/usr/bin/env bash
# Device call (four H100s): router scaling 1 -> 4 replicas, bf16 + compile, 1024^2, on one machine in one call
# (the 4-replica run starts on the compile cache the 1-replica run wrote).
source benchmarks/common.sh
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc --set cluster.num_cpus=16)
bench 200 7 $C --label scale-1 --baseline --baseline-requests 3 "${CC[@]}" --set deployment.replicas=1 \
    --concurrency 8 --requests 32 --warmup 8 --out "$O/scale1"
bench 220 7 $C --label scale-4 "${CC[@]}" --set deployment.replicas=4 --concurrency 32 --requests 128 --warmup 32 \
    --out "$O/scale4"
summary
