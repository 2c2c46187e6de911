#!/usr/bin/env bash
# Device calls (one H100), session 2: bf16 + compile with unmasked caption groups, and fp8 (native Fp8Linear) +
# compile, each beside plain diffusers in the same run. `bash benchmarks/gpu_speed.sh 1024` then `... 512`
# (the second also runs the GPU tests).
source benchmarks/common.sh
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
if [ "${1:-1024}" = 1024 ]; then
  bench 270 8 $C --label bf16-compile-1024 --baseline --baseline-requests 3 "${CC[@]}" --concurrency 8 --requests 24 \
      --warmup 8 --out "$O/bf16-1024"
  bench 270 8 $C --label fp8-compile-1024 --baseline --baseline-requests 3 "${CC[@]}" --set model.quantization=fp8 \
      --concurrency 8 --requests 32 --warmup 8 --out "$O/fp8-1024"
else
  S512=(--sizes 512x512 --set defaults.width=512 --set defaults.height=512 --set router.max_batch_size=8)
  bench 200 8 $C --label bf16-compile-512 --baseline --baseline-requests 6 "${CC[@]}" "${S512[@]}" --concurrency 16 \
      --requests 48 --warmup 16 --out "$O/bf16-512"
  bench 200 8 $C --label fp8-compile-512 --baseline --baseline-requests 6 "${CC[@]}" "${S512[@]}" \
      --set model.quantization=fp8 --concurrency 16 --requests 64 --warmup 16 --out "$O/fp8-512"
  timeout 160 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
fi
summary
