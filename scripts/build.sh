#!/usr/bin/env bash
# Configure and build blockserve into BUILD_DIR (default: build).
# Extra arguments go to cmake, e.g. scripts/build.sh -DBS_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" "$@"
cmake --build "$build_dir" -j "$(nproc)"
