#!/usr/bin/env bash
# Install, build, and start the server (gRPC on 8001, HTTP on 8000 unless given) on its
# built-in models, whose weights are generated deterministically (not
# trained). Extra arguments go to blockserve serve, e.g.
#   bash scripts/serve.sh --model-repository /models --grpc-port 9001
# Installs only what building and serving need (install-deps.sh serve: no
# PyTorch, cmocka or fuzzing tools; scripts/test.sh installs those). The
# tests are built when cmocka is there (BS_BUILD_TESTS=AUTO), so the build
# directory stays the one scripts/test.sh builds and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh serve
BUILD_DIR=build bash scripts/build.sh -DBS_BUILD_TESTS=AUTO
exec ./build/blockserve serve "$@"
