#!/usr/bin/env bash
# Install the CUDA 13.0 toolkit pieces blockserve uses from NVIDIA's apt
# repository for Debian 12 (the distribution of everything else here):
#   install-cuda.sh build     nvcc, the CUDA runtime headers and cuBLAS (to build libbs_cuda.so)
#   install-cuda.sh runtime   cuBLAS and the CUDA runtime libraries (to run it)
# The GPU driver (libcuda.so.1) is not installed: on a host it comes with the
# driver, in a container the NVIDIA Container Toolkit mounts it (--gpus).
# Run as root. Needs network access to developer.download.nvidia.com.
# Environment: CUDA_VERSION (default 13.0; the packages are pinned to that
# major.minor, so only its patch updates arrive).
set -euo pipefail
mode=${1:-build}
cuda=${CUDA_VERSION:-13.0}
suffix=${cuda/./-} # 13.0 -> 13-0

case "$mode" in
  build) packages=("cuda-nvcc-$suffix" "cuda-cudart-dev-$suffix" "libcublas-dev-$suffix") ;;
  runtime) packages=("cuda-cudart-$suffix" "libcublas-$suffix") ;;
  *)
    echo "install-cuda: unknown mode \"$mode\" (build, runtime)" >&2
    exit 2
    ;;
esac

# shellcheck source=/dev/null
. /etc/os-release
distro="${ID}${VERSION_ID//./}" # debian12
case "$(dpkg --print-architecture)" in
  amd64) arch=x86_64 ;;
  arm64) arch=sbsa ;;
  *)
    echo "install-cuda: no CUDA repository for $(dpkg --print-architecture)" >&2
    exit 1
    ;;
esac

export DEBIAN_FRONTEND=noninteractive
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
fetched_curl=
if ! installed cuda-keyring; then
  apt-get update -q
  if ! installed curl; then
    fetched_curl=1
  fi
  apt-get install -y -q --no-install-recommends ca-certificates curl
  url="https://developer.download.nvidia.com/compute/cuda/repos/$distro/$arch/cuda-keyring_1.1-1_all.deb"
  echo "install-cuda: adding NVIDIA's repository ($url)"
  curl -fsSL -o /tmp/cuda-keyring.deb "$url"
  dpkg -i /tmp/cuda-keyring.deb
  rm -f /tmp/cuda-keyring.deb
fi
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
if [ -n "$fetched_curl" ]; then # only needed for the keyring: keep images lean
  apt-get purge -y -q --auto-remove curl
fi
if [ -n "${BS_APT_CLEAN:-}" ]; then
  rm -rf /var/lib/apt/lists/*
fi
# The loader must find cuBLAS when the server dlopen()s libbs_cuda.so.
echo "/usr/local/cuda-$cuda/targets/$arch-linux/lib" >/etc/ld.so.conf.d/zz-blockserve-cuda.conf
ldconfig
echo "install-cuda: CUDA $cuda ($mode) installed under /usr/local/cuda-$cuda"
