#!/usr/bin/env bash
# Device call (two H100s, each capped at 23.5 GiB): 1024^2 throughput of the shipped dual-24GB configs side by
# side: shared-encoder (component replication), split, replicate. Eager bf16, full-size random weights.
source benchmarks/common.sh
CAP=(--set cluster.address=null --set model.source=random-full --set deployment.gpu_memory_limit_gib=23.5
     --set cluster.num_cpus=8 --concurrency 4 --requests 8 --warmup 2)
for m in shared-encoder split replicate; do
  timeout 100 python3 -m orchestrator.cli bench clusters/dual-4090d-$m.yaml "${CAP[@]}" --label "capped-$m" \
    --out "$O/$m" 2>&1 | grep -E "INFO orchestrator.bench: c4|Error" | tail -3
done
