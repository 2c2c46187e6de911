#!/usr/bin/env bash
# Device call (one H100): fp8 + regional compile at 1024^2, beside plain diffusers; warm-up at batch 4.
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e upsampling -e 'call originates' -e 'dtype ==')
timeout 540 python3 -m orchestrator.cli bench benchmarks/configs/gpu-random.yaml --label fp8-compile --baseline \
  --baseline-requests 3 --set model.compile=true --set model.quantization=fp8 --set 'deployment.warmup_batch_sizes=[4]' \
  --concurrency 8 --requests 24 --warmup 8 --out "$O/fp8-compile" 2>&1 | "${F[@]}" | tail -12
python3 -c "import json; r=json.load(open('$O/fp8-compile/bench.json')); print(r['replicas'], r['runs'][0]['stage_p50_s'])"
