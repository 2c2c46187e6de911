#!/usr/bin/env bash
# Device call (one GPU): realistic traffic. The packed-batch probe (error against diffusers, step times, graphs
# compiled after warm-up), then one warm deployment per precision with three phases each (uniform: short prompts at
# 1024^2; varied: 3-160-word prompts at 1024^2; mixed: 3-160 words and five sizes), closed loop at concurrency 8,
# beside plain diffusers at the same sizes. Usage: bash benchmarks/gpu_traffic.sh [bf16|fp8|eager|probe ...]
source benchmarks/common.sh
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
W=(--workload uniform,varied,mixed --concurrency 8 --requests 32 --warmup 8)
[ $# -eq 0 ] && set -- probe bf16 eager
for what in "$@"; do
  case $what in
    probe) (cd benchmarks && timeout 120 python3 probe_packed.py "$O/probe_packed.json" err,step runs 2>&1 \
             | "${F[@]}" | grep -v Traceback | tail -25) ;;
    bf16) bench 300 14 $C --label bf16-compile-traffic "${CC[@]}" "${W[@]}" --baseline --baseline-requests 3 \
            --out "$O/bf16" ;;
    fp8) bench 300 14 $C --label fp8-compile-traffic "${CC[@]}" --set model.quantization=fp8 "${W[@]}" \
           --out "$O/fp8" ;;
    eager) bench 140 8 $C --label bf16-eager-mixed --workload mixed --concurrency 8 --requests 32 --warmup 4 \
             --out "$O/eager" ;;
  esac
done
summary
