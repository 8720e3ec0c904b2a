#!/usr/bin/env bash
# Build the libFuzzer targets (clang, ASan + UBSan) into build-fuzz/ and fuzz
# each for FUZZ_SECONDS (default 30) on its checked-in seeds:
#   codec    tests/fuzz/fuzz_codec.c: the request decoder (server/codec.c);
#            seeds tests/fuzz/corpus
#   http     tests/fuzz/fuzz_http_codec.c: the HTTP/REST request decoder, answer
#            and inflater (server/http_codec.c) with the codec behind it; seeds
#            tests/fuzz/corpus_http
#   service  tests/fuzz/fuzz_service.c: the inference service (server/service.c,
#            batchers, repository, engine, CPU backend, a libuv loop) behind the
#            fake transport tests/fuzz/fake_rpc.c; seeds tests/fuzz/corpus_service
# Fails on any crash, leak, sanitizer report or broken promise.
#   scripts/fuzz.sh                 build, then fuzz every target in turn
#   scripts/fuzz.sh FILE...         build, then run only these inputs (reproduce)
#   FUZZ_TARGET=service scripts/fuzz.sh build-fuzz/service-crash-<sha1>
# Environment: FUZZ_TARGET (codec, http, service or all; default all, and codec when
# reproducing), FUZZ_SECONDS (per target), FUZZ_JOBS (parallel fuzzing
# processes, default 1), FUZZ_BUILD_DIR (default build-fuzz), CC (default clang).
# Objects are rebuilt only when a source, a header it includes or the flags
# change.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${FUZZ_BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-1}
cc=${CC:-clang}
case "$cc" in *clang*) ;; *) cc=clang ;; esac # libFuzzer needs clang
if [ "$#" -gt 0 ]; then target=${FUZZ_TARGET:-codec}; else target=${FUZZ_TARGET:-all}; fi
case "$target" in
  codec | http | service) targets=("$target") ;;
  all) targets=(codec http service) ;;
  *) echo "fuzz.sh: FUZZ_TARGET must be codec, http, service or all (got \"$target\")" >&2; exit 2 ;;
esac
if [ "$#" -gt 0 ] && [ "${#targets[@]}" -ne 1 ]; then
  echo "fuzz.sh: reproducing needs one target (FUZZ_TARGET=codec, http or service)" >&2
  exit 2
fi

mkdir -p "$out/gen" "$out/obj"
gen_protos=(grpc_service model_config)
for p in "${gen_protos[@]}"; do
  if [ ! -e "$out/gen/$p.pb-c.c" ] || [ "proto/$p.proto" -nt "$out/gen/$p.pb-c.c" ]; then
    protoc-c -Iproto --c_out="$out/gen" "${gen_protos[@]/%/.proto}"
    break
  fi
done

# Flags: the CMake build's (CMakeLists.txt: BS_WARN, -march for the CPU
# kernels, _GNU_SOURCE) plus the sanitizers.
# shellcheck disable=SC2054 # commas belong to -fsanitize=
san=(-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined)
arch=()
case "$(uname -m)" in x86_64 | amd64) arch=(-march=x86-64-v3) ;; esac
base=(-std=c11 -D_GNU_SOURCE "${arch[@]}" "${san[@]}")
warn=(-Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter -Werror)
inc=(-Icommon -Iengine -Ikernels/cpu -Iserver -Itests/fuzz -I"$out/gen")
cov=(-fsanitize=fuzzer-no-link)
# clang 14 rejects target_clones together with noinline (kernels/cpu/attn_cpu.c,
# written for gcc); a fuzz build gains nothing from multiversioned kernels.
noclones=("-Dtarget_clones(...)=")

# Sources. The engine is what bs_engine links (core, the CPU backend and its
# op checks, the engine itself), from the lists of cmake/sources.cmake, which
# the CMake build uses too; libFuzzer coverage goes to the code that handles
# requests, not to the compute kernels.
source_list() { # NAME: the .c files of set(NAME ...) in cmake/sources.cmake
  local files
  files=$(sed -n "/^set($1\$/,/^)/p" cmake/sources.cmake |
    sed -n 's/^[[:space:]]*\([A-Za-z0-9_/.-]*\.c\)[[:space:]]*$/\1/p')
  [ -n "$files" ] || { echo "fuzz.sh: no list $1 in cmake/sources.cmake" >&2; return 1; }
  printf '%s\n' "$files"
}
engine=()
for list in BS_CORE_SOURCES BS_BACKEND_SOURCES BS_CPU_SOURCES BS_ENGINE_SOURCES; do
  files=$(source_list "$list") || exit 1
  mapfile -t -O "${#engine[@]}" engine <<<"$files"
done
codec_cov=(server/codec.c server/pbcheck.c engine/common.c engine/tensor.c)
service_cov=("${codec_cov[@]}" server/core.c server/service.c server/control.c server/shm.c
  server/batcher.c server/repository.c
  server/serving.c server/sequences.c server/log.c
  server/metrics.c engine/model.c engine/class.c engine/opcheck.c)
http_cov=(server/http_codec.c server/pbjson.c engine/json.c)
cov_srcs=("${service_cov[@]}" "${http_cov[@]}" tests/fuzz/fuzz_codec.c tests/fuzz/fuzz_http_codec.c
  tests/fuzz/fuzz_service.c tests/fuzz/fake_rpc.c)
plain_srcs=()
for f in "${engine[@]}"; do
  [[ " ${cov_srcs[*]} " == *" $f "* ]] || plain_srcs+=("$f")
done

obj_of() { # source (generated ones under $out) -> object path
  local f=${1#"$out"/}
  f=${f//\//_}
  echo "$out/obj/${f%.c}.o"
}

# Rebuild everything when the flags or the compiler change.
stamp="$out/obj/flags"
flags="$("$cc" --version | head -1) | ${base[*]} | ${warn[*]} | ${inc[*]} | ${cov[*]} | ${noclones[*]}"
if [ ! -e "$stamp" ] || [ "$(cat "$stamp")" != "$flags" ]; then
  rm -f "$out"/obj/*.o "$out"/obj/*.d
  printf '%s\n' "$flags" >"$stamp"
fi

stale() { # object depfile: missing, or older than a file it was built from
  local o=$1 d=$2 dep
  [ -e "$o" ] && [ -e "$d" ] || return 0
  # shellcheck disable=SC2013 # a depfile is words (make syntax), not lines
  for dep in $(sed -e 's/^[^:]*://' -e 's/\\$//' "$d"); do
    [ "$dep" -nt "$o" ] && return 0
  done
  return 1
}

# Compile in parallel, one job per core.
ncpu=$(nproc)
running=0
compile() { # kind source
  local kind=$1 src=$2 o d
  o=$(obj_of "$src")
  d=${o%.o}.d
  stale "$o" "$d" || return 0
  local flags=("${base[@]}" -MMD -MF "$d")
  case "$kind" in
    gen) flags+=(-I"$out/gen") ;; # generated: no project warnings
    cov) flags+=("${cov[@]}" "${warn[@]}" "${inc[@]}") ;;
    plain) flags+=("${noclones[@]}" "${warn[@]}" "${inc[@]}") ;;
  esac
  if [ "$running" -ge "$ncpu" ]; then
    wait -n
    running=$((running - 1))
  fi
  "$cc" "${flags[@]}" -c "$src" -o "$o" &
  running=$((running + 1))
}
t0=$(date +%s)
for p in "${gen_protos[@]}"; do compile gen "$out/gen/$p.pb-c.c"; done
for f in "${cov_srcs[@]}"; do compile cov "$f"; done
for f in "${plain_srcs[@]}"; do compile plain "$f"; done
while [ "$running" -gt 0 ]; do
  wait -n
  running=$((running - 1))
done

objs() { # sources -> objects
  local f
  for f in "$@"; do obj_of "$f"; done
}
gen_srcs=("${gen_protos[@]/#/$out/gen/}")
gen_srcs=("${gen_srcs[@]/%/.pb-c.c}")
for t in "${targets[@]}"; do
  case "$t" in
    codec)
      mapfile -t link < <(objs "${gen_srcs[@]}" "${codec_cov[@]}" tests/fuzz/fuzz_codec.c)
      libs=(-lprotobuf-c -lm)
      ;;
    http)
      mapfile -t link < <(objs "${gen_srcs[@]}" "${codec_cov[@]}" "${http_cov[@]}" \
        tests/fuzz/fuzz_http_codec.c)
      libs=(-lprotobuf-c -lz -lm)
      ;;
    service)
      # engine/json.c is instrumented for the http target, so not among the
      # plain engine sources: the engine (config.c) and the repository need it
      mapfile -t link < <(objs "${gen_srcs[@]}" "${service_cov[@]}" "${plain_srcs[@]}" \
        engine/json.c tests/fuzz/fuzz_service.c tests/fuzz/fake_rpc.c)
      # shellcheck disable=SC2207 # pkg-config prints words
      libs=($(pkg-config --libs openblas) -luv -lprotobuf-c -lpthread -ldl -lm)
      ;;
  esac
  "$cc" "${san[@]}" -fsanitize=fuzzer "${link[@]}" "${libs[@]}" -o "$out/fuzz_$t"
  echo "built $out/fuzz_$t"
done
echo "fuzz build: $(($(date +%s) - t0)) s"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ "$#" -gt 0 ]; then
  exec "$out/fuzz_${targets[0]}" "$@"
fi
par=()
if [ "$jobs" -gt 1 ]; then
  par=(-jobs="$jobs" -workers="$jobs") # logs go to fuzz-<n>.log
fi
for t in "${targets[@]}"; do
  case "$t" in
    codec) seeds=tests/fuzz/corpus new="$out/corpus" max_len=16384 prefix="$out/" ;;
    http) seeds=tests/fuzz/corpus_http new="$out/corpus_http" max_len=16384 prefix="$out/http-" ;;
    service) seeds=tests/fuzz/corpus_service new="$out/corpus_service" max_len=32768 \
      prefix="$out/service-" ;;
  esac
  mkdir -p "$new"
  echo "== fuzz $t: $seconds s"
  # New inputs go to $new; the checked-in seeds are only read. A crash leaves
  # ${prefix}crash-<sha1>: reproduce it with FUZZ_TARGET=$t scripts/fuzz.sh FILE.
  if ! "$out/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len="$max_len" -print_final_stats=1 -artifact_prefix="$prefix" "${par[@]}" \
    "$new" "$seeds"; then
    echo "fuzz.sh: $t failed; reproduce with FUZZ_TARGET=$t scripts/fuzz.sh ${prefix}crash-<sha1>" >&2
    exit 1
  fi
done
