# Every source list of the build, written once: the CMakeLists.txt files take
# their sources from here (bs_sources below), and so does scripts/fuzz.sh,
# which reads the lists by name. Keep one file per line, paths relative to
# the repository root, each list closed by a ")" line of its own.
#
# Layers (root CMakeLists.txt):
#   bs_core    errors, tensors, JSON, safetensors: no -march, no OpenBLAS
#   bs_cpu     the CPU backend (OpenBLAS; -march on the kernel objects only)
#   bs_engine  backend selection, model, modules, config, arena, built-ins
#   bs_server  the gRPC server
#   bs_client  the client library and blockserve-cli (client/), on bs_core
#   bs_cuda    the CUDA backend module (kernels/cuda/), on bs_core

# Errors, tensors and the file formats: what the engine, the client and the
# CUDA module share.
set(BS_CORE_SOURCES
  engine/common.c
  engine/tensor.c
  engine/json.c
  engine/safetensors.c
  common/opts.c
)

# Compiled into every backend (bs_cpu and the CUDA module each have a copy):
# the op argument checks, so that both reject bad calls with one message.
set(BS_BACKEND_SOURCES
  engine/opcheck.c
)

# The CPU backend's kernel objects: these, and only these, get -march.
set(BS_CPU_SOURCES
  kernels/cpu/threadpool.c
  kernels/cpu/backend_cpu.c
  kernels/cpu/gemm_bf16.c
  kernels/cpu/ops_cpu.c
  kernels/cpu/attn_cpu.c
)

# The CUDA backend module, libbs_cuda.so.
set(BS_CUDA_SOURCES
  kernels/cuda/backend_cuda.cu
  kernels/cuda/ops_cuda.cu
  kernels/cuda/norm_cuda.cu
  kernels/cuda/attn_cuda.cu
  kernels/cuda/linear_cuda.cu
)

# The engine on top of the backends.
set(BS_ENGINE_SOURCES
  engine/backend.c
  engine/arena.c
  engine/builtin.c
  engine/config.c
  engine/model.c
  engine/modules.c
  engine/graph.c
  engine/class.c
  engine/classes/btb.c
  engine/classes/attention_block.c
  engine/classes/feed_forward.c
  engine/classes/activations.c
  engine/classes/ada_layer_norm.c
  engine/classes/ada_group_norm.c
)

# The server library: the gRPC transport and the services that register on it
# (inference, health, reflection; bearer-token authentication), the codec,
# the inference core, batcher, repository, metrics, TLS.
set(BS_SERVER_SOURCES
  server/codec.c
  server/shm.c
  server/pbcheck.c
  server/rpc.c
  server/auth.c
  server/health.c
  server/health_service.c
  server/reflection.c
  server/reflection_service.c
  server/log.c
  server/batcher.c
  server/sequences.c
  server/repository.c
  server/serving.c
  server/core.c
  server/control.c
  server/service.c
  server/serve.c
  server/metrics.c
  server/metrics_http.c
  server/http.c
  server/http_codec.c
  server/pbjson.c
  server/secure.c
)

# The blockserve executable.
set(BS_SERVER_MAIN_SOURCES
  server/main.c
  server/tools.c
)

# The C client library.
set(BS_CLIENT_SOURCES
  client/blockserve_client.c
  client/http_client.c
  client/ctensor.c
  client/npy.c
  client/latency.c
  client/bench.c
)

# blockserve-cli.
set(BS_CLI_SOURCES
  client/cli_main.c
  client/cli_args.c
  client/cli_inputs.c
  client/cli_shm.c
)

# bs_sources(<out> <list>...): the named lists as absolute paths in <out>, for
# any CMakeLists.txt, whatever its directory.
function(bs_sources out)
  set(files)
  foreach(name ${ARGN})
    if(NOT DEFINED ${name})
      message(FATAL_ERROR "bs_sources: no source list ${name} in cmake/sources.cmake")
    endif()
    foreach(f ${${name}})
      list(APPEND files ${PROJECT_SOURCE_DIR}/${f})
    endforeach()
  endforeach()
  set(${out} ${files} PARENT_SCOPE)
endfunction()
