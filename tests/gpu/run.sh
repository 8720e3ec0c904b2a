#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (sm_80 or newer): build Release with the
# CUDA backend, run every GPU test (ops against the CPU, golden cases in
# fp32/bf16/fp16) and the GPU benchmark in bf16, then print a summary.
# About 5 minutes on an H200 (the build is most of it on few cores).
#
#   bash tests/gpu/run.sh            # build dir: build-gpu
#   BUILD_DIR=b CUDA_ARCHS=90 JOBS=16 bash tests/gpu/run.sh
#
# Exit status: 0 when the build, every GPU test (none skipped) and the
# benchmark ran; the benchmark's targets are reported, not enforced.
#
# The summary: per workload GPU-only time (CUDA events around each forward,
# less its copies' spans: BS_PROC_GPU_TIMER) against end-to-end wall time,
# each in TFLOP/s and % of the dense BF16 peak (989.4, H200 SXM); the fused
# attention at 4096 tokens, head dim 64 and 128, against the unfused cuBLAS
# baseline and FlashAttention-2's published H100 figure; the copies'
# bandwidth; and the targets (fused attention >= 300 TFLOP/s and >= 3x the
# baseline at head dim 64; sd15_down0_block batch 8 >= 40% of peak GPU-only);
# the launch graphs' cases and their saving (each model with graphs off and
# on: GPU-only and end-to-end time, and graphs launched per forward).
set -uo pipefail
cd "$(dirname "$0")/../.."
build=${BUILD_DIR:-build-gpu}
jobs=${JOBS:-$(nproc)}
status=0
start=$(date +%s)

echo "== GPU =="
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== build (Release, BS_CUDA=ON) =="
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBS_CUDA=ON \
     ${CUDA_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS} >"$build.configure.log" 2>&1; then
  tail -n 30 "$build.configure.log"
  echo "run.sh: configure failed"
  exit 1
fi
if ! cmake --build "$build" -j "$jobs" --target bs_cuda blockserve test_golden test_gpu_ops \
     gpu_bench test_backend_select; then
  echo "run.sh: build failed"
  exit 1
fi

echo "== GPU tests =="
(cd "$build" && ctest -L gpu -R "gpu_" --output-on-failure -j 4 2>&1) | tee "$build/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
(cd "$build" && ctest -R "test_backend_select|cli" --output-on-failure 2>&1) | tail -n 5
skipped=$(grep -c "(Skipped)" "$build/gpu_tests.log" || true)
[ "$tests_rc" -eq 0 ] || status=1
[ "$skipped" -eq 0 ] || { echo "run.sh: $skipped GPU tests skipped: is the GPU usable?"; status=1; }

echo "== per-op results (bf16) =="
BS_CUDA_MODULE="$PWD/$build/libbs_cuda.so" "$build/tests/gpu/test_gpu_ops" bf16 \
  >"$build/gpu_ops_bf16.log" 2>&1
tail -n 60 "$build/gpu_ops_bf16.log"

echo "== benchmark (bf16) =="
BS_CUDA_MODULE="$PWD/$build/libbs_cuda.so" timeout 420 "$build/tests/gpu/gpu_bench" --dtype bf16 \
  --reps 10 | tee "$build/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo
echo "== run.sh summary =="
grep -E "tests passed|tests failed" "$build/gpu_tests.log" | tail -n 1
grep -E "^\s+[0-9]+ - .*\((Failed|Timeout|SEGFAULT|Subprocess aborted)\)" "$build/gpu_tests.log" || true
echo "skipped GPU tests: $skipped (should be 0 on a GPU machine)"
grep -E "^(copy_in [0-9]+ MiB|timer:)" "$build/gpu_ops_bf16.log" || echo "copy bandwidth: not measured"
sed -n '/== summary/,$p' "$build/gpu_bench.log"
# launch graphs (issue 14 item 6): the GPU cases of test_gpu_ops, and the
# launch overhead the graphs save (bench: graphs on against off; "graphs/fwd
# 0" or "n/a" means the engine launched none, so there is no saving to see)
echo "launch graphs: test_gpu_ops bf16 $(grep -E '^graphs: ' "$build/gpu_ops_bf16.log" || echo 'graphs: not run')"
grep -E "^launch graphs " "$build/gpu_bench.log" | sed 's/^/launch-overhead saving: /' ||
  echo "launch-overhead saving: not measured"
echo "wall time: $(( $(date +%s) - start )) s; status $status"
exit $status
