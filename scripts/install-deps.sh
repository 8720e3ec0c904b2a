#!/usr/bin/env bash
# Install everything blockserve needs to build, test and serve on Debian 12.
# Run as root (or with sudo). Idempotent.
#   install-deps.sh [all]          everything: build, test and serve (the default)
#   install-deps.sh test           the same as all (scripts/test.sh)
#   install-deps.sh build          what building needs (the Dockerfile's build stage)
#   install-deps.sh serve          what building and serving from the build tree need
#                                  (scripts/serve.sh): the build packages, whose
#                                  -dev packages bring the run-time libraries
#   install-deps.sh runtime PKG..  only the named run-time packages, as listed by
#                                  scripts/runtime-deps.sh (the Dockerfile's runtime stage)
set -euo pipefail
mode=${1:-all}
[ "$#" -gt 0 ] && shift

packages=(
  build-essential cmake pkg-config git
  libopenblas-dev
  openssl
  libcmocka-dev
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler grpc-proto libuv1-dev
  libmicrohttpd-dev libssl-dev openssl zlib1g-dev libgnutls28-dev
  libcurl4-openssl-dev
  clang libclang-rt-14-dev
  python3 python3-numpy python3-torch python3-grpcio python3-grpc-tools python3-protobuf
  python3-yaml python3-h2 curl
)

# Packages only the tests use; "build" and "serve" leave them out.
test_only=(
  libcmocka-dev clang libclang-rt-14-dev
  python3 python3-numpy python3-torch python3-grpcio python3-grpc-tools python3-protobuf
  python3-yaml python3-h2 curl
)

case "$mode" in
  all | test) ;;
  build | serve)
    build=()
    for p in "${packages[@]}"; do
      [[ " ${test_only[*]} " == *" $p "* ]] || build+=("$p")
    done
    packages=("${build[@]}")
    ;;
  runtime)
    [ "$#" -gt 0 ] || { echo "install-deps: runtime needs package names (scripts/runtime-deps.sh)" >&2; exit 2; }
    packages=("$@")
    ;;
  *)
    echo "install-deps: unknown mode \"$mode\" (all, test, build, serve, runtime)" >&2
    exit 2
    ;;
esac

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
  if [ -n "${BS_APT_CLEAN:-}" ]; then # container images: drop the package lists
    $SUDO rm -rf /var/lib/apt/lists/*
  fi
else
  echo "install-deps: all packages present"
fi
