#!/usr/bin/env bash
# Device call (four H100s): router scaling 1 -> 4 replicas, bf16 + compile, 1024^2, on one machine in one call
# (the 4-replica run starts on the compile cache the 1-replica run wrote).
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e 'experimental feature')
run() { local t=$1; shift; timeout "$t" python3 -m orchestrator.cli bench $C "$@" 2>&1 | "${F[@]}" | tail -7; }
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc --set cluster.num_cpus=16)
run 200 --label scale-1 --baseline --baseline-requests 3 "${CC[@]}" --set deployment.replicas=1 \
    --concurrency 8 --requests 32 --warmup 8 --out "$O/scale1"
run 220 --label scale-4 "${CC[@]}" --set deployment.replicas=4 --concurrency 32 --requests 128 --warmup 32 \
    --out "$O/scale4"
for f in "$O"/*/bench.json; do python3 -c "import json,sys; r=json.load(open(sys.argv[1])); x=r['runs'][0]; print(r['label'], r['gpus'], x['throughput_img_s'], x['batch_sizes'], x['replica_busy_fraction'], x['stage_p50_s'])" "$f"; done
