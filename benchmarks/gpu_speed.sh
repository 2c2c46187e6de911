#!/usr/bin/env bash
# Device calls (one H100), session 2: bf16 + compile with unmasked caption groups, and fp8 (native Fp8Linear) +
# compile, each beside plain diffusers in the same run. `bash benchmarks/gpu_speed.sh 1024` then `... 512`
# (the second also runs the GPU tests).
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e 'experimental feature')
run() { local t=$1; shift; timeout "$t" python3 -m orchestrator.cli bench $C "$@" 2>&1 | "${F[@]}" | tail -8; }
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
if [ "${1:-1024}" = 1024 ]; then
  run 270 --label bf16-compile-1024 --baseline --baseline-requests 3 "${CC[@]}" --concurrency 8 --requests 24 \
      --warmup 8 --out "$O/bf16-1024"
  run 270 --label fp8-compile-1024 --baseline --baseline-requests 3 "${CC[@]}" --set model.quantization=fp8 \
      --concurrency 8 --requests 32 --warmup 8 --out "$O/fp8-1024"
else
  S512=(--sizes 512x512 --set defaults.width=512 --set defaults.height=512 --set router.max_batch_size=8)
  run 200 --label bf16-compile-512 --baseline --baseline-requests 6 "${CC[@]}" "${S512[@]}" --concurrency 16 \
      --requests 48 --warmup 16 --out "$O/bf16-512"
  run 200 --label fp8-compile-512 --baseline --baseline-requests 6 "${CC[@]}" "${S512[@]}" \
      --set model.quantization=fp8 --concurrency 16 --requests 64 --warmup 16 --out "$O/fp8-512"
  timeout 160 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
fi
for f in "$O"/*/bench.json; do python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['label'], r['replicas'], [(x['concurrency'], x['throughput_img_s']) for x in r['runs']], r.get('baseline',{}).get('sizes'))" "$f"; done
