#!/usr/bin/env bash
# Device call (one H100): the compiled step's kernel profile (bf16, fp8), then longer closed-loop runs (80
# requests) of bf16 + compile and fp8 + compile at 1024^2 beside plain diffusers, so the ramp-up and drain of a
# closed loop weigh less.
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e 'experimental feature')
run() { local t=$1; shift; timeout "$t" python3 -m orchestrator.cli bench $C "$@" 2>&1 | "${F[@]}" | tail -4; }
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
timeout 140 python3 benchmarks/profile_step.py "$O/profile_step.json" 2>&1 | "${F[@]}" | tail -4
run 230 --label bf16-compile-1024-long --baseline --baseline-requests 5 "${CC[@]}" --concurrency 8 --requests 80 \
    --warmup 8 --out "$O/bf16-long"
run 195 --label fp8-compile-1024-long --baseline --baseline-requests 5 "${CC[@]}" --set model.quantization=fp8 \
    --concurrency 8 --requests 80 --warmup 8 --out "$O/fp8-long"
for f in "$O"/*/bench.json; do python3 -c "import json,sys; r=json.load(open(sys.argv[1])); x=r['runs'][0]; print(r['label'], x['throughput_img_s'], x['throughput_vs_baseline'], x['elapsed_s'], x['stage_p50_s'], r['baseline']['sizes'])" "$f"; done
