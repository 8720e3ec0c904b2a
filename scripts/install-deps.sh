#!/usr/bin/env bash
# Install everything blockserve needs to build, test and serve on Debian 12.
# Run as root (or with sudo). Idempotent.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libopenblas-dev
  openssl
  libcmocka-dev
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler grpc-proto libuv1-dev
  libmicrohttpd-dev libssl-dev openssl
  clang libclang-rt-14-dev
  python3 python3-numpy python3-torch python3-grpcio python3-grpc-tools python3-protobuf
)

if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all packages present"
fi
