#!/usr/bin/env bash
# Device call (two H100s): router scaling 1 -> 2 replicas (bf16 + compile), then the shipped dual-24GB configs
# with each GPU capped at 23.5 GiB (peaks measured per GPU): the split replica at 1024^2 bs4 at 1536^2 and 2048^2, and a
# functional fp8 check.
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e upsampling -e 'call originates' -e 'dtype ==')
B="python3 -m orchestrator.cli bench"
G=benchmarks/configs/gpu-random.yaml
CAP=(--set cluster.address=null --set model.source=random-full --set deployment.gpu_memory_limit_gib=23.5 --set cluster.num_cpus=8)
run() { local t=$1; shift; timeout "$t" $B "$@" 2>&1 | "${F[@]}" | tail -9; }
run 240 $G --label scale-1 --baseline --baseline-requests 3 --set deployment.replicas=1 --set model.compile=true \
    --set model.compile_cache_dir=/tmp/zc --concurrency 8 --requests 16 --warmup 8 --out "$O/scale1"
run 170 $G --label scale-2 --set deployment.replicas=2 --set model.compile=true --set model.compile_cache_dir=/tmp/zc \
    --concurrency 16 --requests 32 --warmup 16 --out "$O/scale2"
run 120 clusters/dual-4090d-split.yaml "${CAP[@]}" --label capped-split-1024 --concurrency 4 --requests 8 --warmup 4 --out "$O/cap-split"
run 120 clusters/dual-4090d-split.yaml "${CAP[@]}" --label capped-split-big --sizes 1536x1536,2048x2048 \
    --set defaults.width=1536 --set defaults.height=1536 --concurrency 1 --requests 4 --warmup 2 --out "$O/cap-split-big"
run 90 $G --label fp8-eager-check --set deployment.replicas=1 --set model.quantization=fp8 --sizes 512x512 \
    --concurrency 1 --requests 2 --warmup 1 --out "$O/fp8-check" | tail -3
python3 -c "import json; print(json.load(open('$O/fp8-check/bench.json'))['replicas'])" 2>&1 | tail -2
