# Sourced by the GPU scripts (run from the repository root): output folder, quiet logs, the NCCL settings these
# machines need (no NVLink multicast), the log filter, and two helpers.
set -uo pipefail
O=${OUT:-/tmp/out}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
C=benchmarks/configs/gpu-random.yaml
F=(grep -v -e '%|' -e Warning -e warn -e torchao -e Configuration -e WARNING -e 'experimental feature'
   -e upsampling -e 'call originates' -e 'dtype ==')

# bench TIMEOUT_S TAIL_LINES CONFIG ARGS...: one `zimage-orch bench`, its log filtered, its last lines.
bench() { local t=$1 n=$2; shift 2; timeout "$t" python3 -m orchestrator.cli bench "$@" 2>&1 | "${F[@]}" | tail -"$n"; }

# summary: one line per bench.json under $O (throughput, ratio, batches, busy, stage times, baseline).
summary() {
  for f in "$O"/*/bench.json; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); x=r['runs'][0]; print(r['label'], r['gpus'], \
x['throughput_img_s'], x.get('throughput_vs_baseline'), x['batch_sizes'], x['replica_busy_fraction'], \
x['stage_p50_s'], r['replicas'], (r.get('baseline') or {}).get('sizes'))" "$f"
  done
}
