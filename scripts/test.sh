#!/usr/bin/env bash
# Install, build and run every test: the Release build runs the whole suite
# (unit, golden, CLI, reference reproducibility, the server end to end, the
# stress tests, the CUDA kernels under emulation on the CPU (gpu_emu), their
# static gates (gpu_static: ptxas's registers, spills and shared memory for
# sm_80 and sm_90, the bank-conflict model), and the GPU tests, which CTest
# lists as skipped on a machine without a GPU), then an ASan+UBSan build runs
# the unit, golden, CLI, gpu_emu and end-to-end tests again (not the stress
# tests: too slow under the sanitizers; not gpu_static: compiler output, the
# same in both builds), and the request decoder is fuzzed briefly (libFuzzer).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== Release build =="
# BS_CUDA=ON: the CUDA backend module must build (sm_80, sm_90) even without a
# GPU here, so that it never rots; its GPU tests skip without a GPU.
BUILD_DIR=build bash scripts/build.sh -DBS_CUDA="${BS_CUDA:-ON}"
(cd build && ctest --output-on-failure -j "$(nproc)")

echo "== ASan + UBSan build =="
BUILD_DIR=build-asan BUILD_TYPE=Debug bash scripts/build.sh -DBS_SANITIZE=ON
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --output-on-failure -j "$(nproc)" -LE 'reference|stress|gpu_static')

echo "== fuzz: the request decoder and the inference service =="
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh
