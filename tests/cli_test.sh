#!/usr/bin/env bash
# End-to-end tests of the command line: forward and bench on golden cases,
# and the error paths (each must exit non-zero with a clear message).
set -uo pipefail
bin=$1
golden=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; }

# expect_fail NAME PATTERN CMD...: CMD must exit non-zero and print PATTERN on stderr.
expect_fail() {
  local name=$1 pattern=$2
  shift 2
  if "$@" >"$tmp/out" 2>"$tmp/err"; then
    bad "$name (exit 0)"
  elif ! grep -q -- "$pattern" "$tmp/err"; then
    bad "$name (stderr lacks '$pattern': $(head -c 300 "$tmp/err"))"
  else
    ok "$name"
  fi
}

# compare OUT EXPECTED: max abs difference of tensor "output" <= 1e-4.
compare() {
  /usr/bin/python3 - "$1" "$2" <<'PY'
import json, struct, sys
import numpy as np
def load(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    hdr = json.loads(data[8:8 + n])
    meta = hdr["output"]
    assert meta["dtype"] == "F32", meta
    b, e = meta["data_offsets"]
    return np.frombuffer(data[8 + n + b:8 + n + e], dtype="<f4").reshape(meta["shape"])
got, want = load(sys.argv[1]), load(sys.argv[2])
assert got.shape == want.shape, (got.shape, want.shape)
err = float(np.max(np.abs(got - want)))
print("max abs err", err)
sys.exit(0 if err <= 1e-4 else 1)
PY
}

for case in btb_geglu_cross attnblock_4heads ff_geglu; do
  dir=$golden/$case
  [ -d "$dir" ] || dir=$(ls -d "$golden"/*/ | head -n 1)
  if "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/out.safetensors" \
      --threads 2 && compare "$tmp/out.safetensors" "$dir/expected.safetensors"; then
    ok "forward $(basename "$dir")"
  else
    bad "forward $(basename "$dir")"
  fi
  if "$bin" bench "$dir" --inputs "$dir/inputs.safetensors" --reps 3 >"$tmp/bench" &&
      tail -n 1 "$tmp/bench" | grep -Eq '^median_ms=[0-9.]+ gflops=[0-9.]+$'; then
    ok "bench $(basename "$dir"): $(tail -n 1 "$tmp/bench")"
  else
    bad "bench $(basename "$dir"): $(cat "$tmp/bench")"
  fi
done

dir=$(ls -d "$golden"/btb_*/ | head -n 1)
expect_fail "missing model dir" "config.json" \
  "$bin" forward "$tmp/nope" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors"
expect_fail "missing --output" "missing --output" "$bin" forward "$dir" --inputs "$dir/inputs.safetensors"
expect_fail "unknown option" "unknown option" "$bin" bench "$dir" --inputs x --frobnicate 1
expect_fail "bad --reps" "expected an integer" "$bin" bench "$dir" --inputs x --reps 0
expect_fail "unknown command" "unknown command" "$bin" serve-all
expect_fail "cuda without a CUDA build" "CUDA" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" --device cuda
expect_fail "fp16 on the cpu" "fp16 is for cuda" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" --device cpu --dtype fp16
expect_fail "unknown dtype" "unknown dtype" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" --dtype int8
# auto says which device it took (on the stderr note); fp32 and --tf32 are valid on the CPU
if "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" \
    --dtype fp32 --tf32 2>"$tmp/err" && grep -Eq "compute: (cpu|cuda) backend" "$tmp/err"; then
  ok "auto device note: $(head -n 1 "$tmp/err")"
else
  bad "auto device note: $(head -c 300 "$tmp/err")"
fi
# the module next to the binary is found without BS_CUDA_MODULE: --device cuda
# then works (a GPU) or says there is no usable GPU, never that it is missing
if [ -f "$(dirname "$bin")/libbs_cuda.so" ]; then
  if env -u BS_CUDA_MODULE "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" \
      --output "$tmp/o.safetensors" --device cuda 2>"$tmp/err" ||
      grep -q "no usable CUDA GPU" "$tmp/err"; then
    ok "module next to the binary: $(tail -n 1 "$tmp/err")"
  else
    bad "module next to the binary: $(head -c 300 "$tmp/err")"
  fi
fi
expect_fail "unknown device" "unknown device" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" --device tpu
expect_fail "unknown activation dtype" "unknown activation dtype" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" \
  --activations bf8
# narrow activations on the CPU: the same output as FP32 activations within BF16's reach
if "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/a32.safetensors" \
    --device cpu --dtype bf16 --activations fp32 2>/dev/null &&
    "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/a16.safetensors" \
      --device cpu --dtype bf16 --activations compute 2>/dev/null &&
    [ -s "$tmp/a16.safetensors" ] && ! cmp -s "$tmp/a32.safetensors" "$tmp/a16.safetensors"; then
  ok "--activations compute runs (and rounds differently from fp32)"
else
  bad "--activations compute"
fi
# launch graphs: emulated on the CPU, the same bytes as without; "on" needs a
# backend that has them; an unknown mode names the choices
if "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/g0.safetensors" \
    --device cpu --graphs off 2>/dev/null &&
    "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/g1.safetensors" \
      --device cpu --graphs emulate 2>/dev/null &&
    [ -s "$tmp/g1.safetensors" ] && cmp -s "$tmp/g0.safetensors" "$tmp/g1.safetensors"; then
  ok "--graphs emulate: the output of --graphs off"
else
  bad "--graphs emulate"
fi
expect_fail "--graphs on on the cpu" "has no launch graphs" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" \
  --device cpu --graphs on
expect_fail "unknown graphs mode" "unknown graphs mode \"x\"" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors" \
  --graphs x
head -c 20 "$dir/inputs.safetensors" >"$tmp/trunc.safetensors"
expect_fail "truncated inputs" "inputs" \
  "$bin" forward "$dir" --inputs "$tmp/trunc.safetensors" --output "$tmp/o.safetensors"
# inputs of another model: wrong names or shapes must be named in the message
other=$(ls -d "$golden"/ada_group_norm_*/ 2>/dev/null | head -n 1)
if [ -n "$other" ]; then
  expect_fail "inputs of another model" "input \"x\"" \
    "$bin" forward "$dir" --inputs "$other/inputs.safetensors" --output "$tmp/o.safetensors"
fi
expect_fail "unwritable output" "o.safetensors" \
  "$bin" forward "$dir" --inputs "$dir/inputs.safetensors" --output "$tmp/no/such/dir/o.safetensors"
mkdir -p "$tmp/badmodel"
echo '{"_class_name": "BasicTransformerBlock", "dim": 32}' >"$tmp/badmodel/config.json"
expect_fail "config missing a key" "missing required key" \
  "$bin" forward "$tmp/badmodel" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors"
cp "$dir/config.json" "$tmp/badmodel/config.json"
expect_fail "missing weights file" "diffusion_pytorch_model.safetensors" \
  "$bin" forward "$tmp/badmodel" --inputs "$dir/inputs.safetensors" --output "$tmp/o.safetensors"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
