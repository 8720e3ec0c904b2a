#!/usr/bin/env bash
# Install, build, and start the gRPC server (port 8001 unless given) on its
# built-in models, whose weights are generated deterministically (not
# trained). Extra arguments go to blockserve serve, e.g.
#   bash scripts/serve.sh --model-repository /models --grpc-port 9001
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
BUILD_DIR=build bash scripts/build.sh
exec ./build/blockserve serve "$@"
