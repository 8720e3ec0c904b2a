#!/usr/bin/env bash
# blockserve-cli bench on the same load as bench/grpc_load.py (golden
# btb_geglu_cross, one sample per request, 2000 calls at concurrency 1 and
# 16), so that the C load generator and the Python one can be compared.
#   bash bench/client_load.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
mkdir "$tmp/repo"
cp -r tests/golden/btb_geglu_cross "$tmp/repo/"
/usr/bin/python3 - "$tmp" <<'PY'
import sys
sys.path.insert(0, "tests/e2e")
import harness, numpy as np
for n, (dt, a) in harness.st_load("tests/golden/btb_geglu_cross/inputs.safetensors").items():
    np.save(sys.argv[1] + "/" + n + ".npy", np.ascontiguousarray(a[:1]))
PY
"$build/blockserve" serve --grpc-port 0 --grpc-address 127.0.0.1 --model-repository "$tmp/repo" \
  >"$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 200); do
  port=$(sed -n 's/.*serving [0-9]* models on [0-9.]*:\([0-9]*\).*/\1/p' "$tmp/log")
  [ -n "$port" ] && break
  sleep 0.05
done
for c in 1 16; do
  "$build/client/blockserve-cli" bench btb_geglu_cross -u "127.0.0.1:$port" -c "$c" -n 2000 \
    --input "hidden_states=$tmp/hidden_states.npy" \
    --input "encoder_hidden_states=$tmp/encoder_hidden_states.npy" --json |
    /usr/bin/python3 -c 'import json, sys; j = json.load(sys.stdin); l = j["latency_ms"]
print("concurrency %d: %.0f req/s, p50 %.2f ms, p99 %.2f ms, %s" % (j["concurrency"], j["rps"], l["p50"], l["p99"], j["status_codes"]))'
done
