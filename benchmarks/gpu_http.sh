#!/usr/bin/env bash
# Device call (one GPU): the same uniform 1024^2 traffic (closed loop, concurrency 8) through the HTTP service and
# through the Python API, bf16 + compile, one deployment each, one after the other on the same GPU.
source benchmarks/common.sh
CC=(--set model.compile=true --set model.compile_cache_dir=/tmp/zc)
N=${N:-48}
python3 -m orchestrator.cli serve $C "${CC[@]}" --port 8011 > "$O/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 240); do curl -sf localhost:8011/readyz > /dev/null && break; sleep 1; done
bench 200 6 --http http://127.0.0.1:8011 --label http-uniform --concurrency 8 --requests "$N" --warmup 8 \
    --out "$O/http"
kill -TERM $SERVER; wait $SERVER
bench 250 6 $C --label api-uniform "${CC[@]}" --concurrency 8 --requests "$N" --warmup 8 --out "$O/api"
