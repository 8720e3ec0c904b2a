#!/usr/bin/env bash
# Build the request-codec fuzz target (libFuzzer + ASan + UBSan, clang) into
# build-fuzz/ and run it for FUZZ_SECONDS (default 30) on tests/fuzz/corpus.
# Fails on any crash, leak, sanitizer report or broken codec promise.
#   scripts/fuzz.sh                 build, then fuzz
#   scripts/fuzz.sh FILE...         build, then run only these inputs (reproduce)
# Environment: FUZZ_SECONDS, FUZZ_JOBS (parallel fuzzing processes, default 1),
# FUZZ_BUILD_DIR (default build-fuzz), CC (default clang).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${FUZZ_BUILD_DIR:-build-fuzz}
seconds=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-1}
cc=${CC:-clang}
case "$cc" in *clang*) ;; *) cc=clang ;; esac # libFuzzer needs clang

mkdir -p "$out/gen" "$out/obj" "$out/corpus"
protoc-c -Iproto --c_out="$out/gen" grpc_service.proto model_config.proto

# shellcheck disable=SC2054 # commas belong to -fsanitize=
san=(-g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined)
base=(-std=c11 -D_GNU_SOURCE "${san[@]}")
warn=(-Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter -Werror)
inc=(-Iengine -Iserver -I"$out/gen")

# Generated code: sanitized, without the project's warning flags.
for f in grpc_service model_config; do
  "$cc" "${base[@]}" -I"$out/gen" -c "$out/gen/$f.pb-c.c" -o "$out/obj/$f.o"
done
# Project code: instrumented for coverage too.
for f in server/codec.c engine/common.c engine/tensor.c tests/fuzz/fuzz_codec.c; do
  "$cc" "${base[@]}" -fsanitize=fuzzer-no-link "${warn[@]}" "${inc[@]}" -c "$f" \
    -o "$out/obj/$(basename "$f" .c).o"
done
"$cc" "${san[@]}" -fsanitize=fuzzer "$out"/obj/*.o -lprotobuf-c -lm -o "$out/fuzz_codec"
echo "built $out/fuzz_codec"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ "$#" -gt 0 ]; then
  exec "$out/fuzz_codec" "$@"
fi
par=()
if [ "$jobs" -gt 1 ]; then
  par=(-jobs="$jobs" -workers="$jobs") # logs go to fuzz-<n>.log
fi
# New inputs go to $out/corpus; the checked-in seeds are only read. A crash
# leaves $out/crash-<sha1>: reproduce it with scripts/fuzz.sh $out/crash-<sha1>.
"$out/fuzz_codec" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
  -print_final_stats=1 -artifact_prefix="$out/" "${par[@]}" "$out/corpus" tests/fuzz/corpus
