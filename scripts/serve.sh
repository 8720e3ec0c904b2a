#!/usr/bin/env bash
# Install, build, and run the engine on a built-in example: an SD-1.5-shaped
# BasicTransformerBlock with deterministically generated (not trained) weights.
# MODEL=<name> picks another built-in (blockserve example lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
BUILD_DIR=build bash scripts/build.sh

model=${MODEL:-sd15_down0_block}
dir=${EXAMPLE_DIR:-build/examples/$model}
./build/blockserve example "$model" --out "$dir"
./build/blockserve forward "$dir" --inputs "$dir/inputs.safetensors" --output "$dir/output.safetensors"
echo "forward: wrote $dir/output.safetensors"
./build/blockserve bench "$dir" --inputs "$dir/inputs.safetensors" --reps "${REPS:-5}"
