#!/usr/bin/env bash
# Print, one per line, the Debian packages that provide the shared libraries
# an installed blockserve needs: for each executable in PREFIX/bin and each
# module in PREFIX/lib/blockserve, the owners of its direct dependencies
# (DT_NEEDED, resolved as the dynamic loader resolves them); their own
# dependencies follow through the packages' dependencies.
#   scripts/runtime-deps.sh PREFIX
# A library that resolves nowhere, or that no package owns, is an error --
# except CUDA libraries under /usr/local/cuda*, which are named on stderr and
# left to scripts/install-cuda.sh runtime (here they may come from a tarball).
set -euo pipefail
prefix=${1:?usage: runtime-deps.sh PREFIX}

files=()
for f in "$prefix"/bin/* "$prefix"/lib/blockserve/*.so; do
  [ -f "$f" ] && files+=("$f")
done
[ ${#files[@]} -gt 0 ] || { echo "runtime-deps: nothing installed under $prefix" >&2; exit 1; }

status=0
declare -A pkgs=()
for f in "${files[@]}"; do
  # Skip scripts and other non-ELF files.
  [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = "177ELF" ] || continue
  needed=$(objdump -p "$f" | awk '$1 == "NEEDED" { print $2 }')
  resolved=$(ldd "$f")
  for lib in $needed; do
    path=$(awk -v l="$lib" '$1 == l && $2 == "=>" { print $3 }' <<<"$resolved")
    if [ -z "$path" ] || [ "$path" = "not" ]; then
      case "$lib" in ld-linux*) continue ;; esac
      echo "runtime-deps: $f needs $lib, which does not resolve" >&2
      status=1
      continue
    fi
    real=$(readlink -f "$path")
    owner=""
    # dpkg records the path it installed, which may differ from the loader's
    # by /usr merging or a symlink: try each spelling.
    for p in "$path" "$real" "/usr$path" "/usr$real" "${path#/usr}" "${real#/usr}"; do
      owner=$(dpkg -S "$p" 2>/dev/null | head -n 1 | cut -d: -f1) && [ -n "$owner" ] && break
    done
    if [ -n "$owner" ]; then
      pkgs[$owner]=1
    elif [[ "$real" == /usr/local/cuda* ]]; then
      echo "runtime-deps: $lib ($real) is CUDA's: scripts/install-cuda.sh runtime provides it" >&2
    elif [[ "$real" == "$(readlink -f "$prefix")"/* ]]; then
      : # ours
    else
      echo "runtime-deps: $f needs $lib ($real), which no package owns" >&2
      status=1
    fi
  done
done
[ "$status" -eq 0 ] || exit "$status"
printf '%s\n' "${!pkgs[@]}" | sort
