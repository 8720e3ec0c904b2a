# The client builds and runs on its own, for the baseline of the CPU (CTest
# client_portable_build, tests/CMakeLists.txt): configure the repository with
# BS_CLIENT_ONLY=ON (bs_core, the protocol, the client; no engine, no OpenBLAS,
# no CUDA) and -march=x86-64 (no AVX) in a fresh build directory, build it
# (which also runs blockserve-cli make-request for the sample requests), run
# blockserve-cli --help, and check the binary: no OpenBLAS, BLAS or CUDA
# library among its DT_NEEDED or in its run path, and no AVX instruction in
# its code. Then the same checks on the main build's blockserve-cli (CLI),
# whose sources are compiled without -march too.
#   cmake -DSRC=<repository> -DBIN=<scratch dir> -DCC=<C compiler>
#         -DGENERATOR=<generator> [-DCLI=<main build's blockserve-cli>]
#         [-DCHECK_CLI_CODE=ON] -P client_portable_build.cmake
foreach(v SRC BIN CC GENERATOR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "client_portable_build: -D${v}=... is required")
  endif()
endforeach()
find_program(READELF readelf REQUIRED)
find_program(OBJDUMP objdump REQUIRED)

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "FAIL: ${what} (exit ${rc}):\n${out}")
  endif()
  set(run_out "${out}" PARENT_SCOPE)
endfunction()

# Checks one blockserve-cli: links nothing of the engine's, and (code ON) has
# no AVX/AVX-512 instruction (no ymm or zmm register) in its own code.
function(check_cli exe code)
  run("readelf -d ${exe}" ${READELF} -d ${exe})
  string(REGEX MATCHALL "\\(NEEDED\\)[^\n]*" needed "${run_out}")
  string(REGEX MATCHALL "\\((RPATH|RUNPATH)\\)[^\n]*" paths "${run_out}")
  foreach(line IN LISTS needed paths)
    string(TOLOWER "${line}" l)
    if(l MATCHES "openblas|blas|lapack|cuda|cublas|gomp")
      message(FATAL_ERROR "FAIL: ${exe} links the engine's libraries: ${line}")
    endif()
  endforeach()
  list(LENGTH needed n)
  message(STATUS "ok: ${exe}: ${n} DT_NEEDED, none of OpenBLAS/BLAS/CUDA; ${paths}")
  if(code)
    run("objdump -d ${exe}" ${OBJDUMP} -d --no-show-raw-insn ${exe})
    string(REGEX MATCHALL "%[yz]mm[0-9]+" wide "${run_out}")
    list(LENGTH wide n)
    if(n GREATER 0)
      message(FATAL_ERROR "FAIL: ${exe} has ${n} AVX register operands: not portable")
    endif()
    message(STATUS "ok: ${exe}: no AVX/AVX-512 instructions")
  endif()
endfunction()

string(TIMESTAMP t0 "%s")
file(REMOVE_RECURSE ${BIN})
run("configure the client alone"
    ${CMAKE_COMMAND} -S ${SRC} -B ${BIN} -G ${GENERATOR} -DCMAKE_C_COMPILER=${CC}
    -DCMAKE_BUILD_TYPE=Release -DBS_CLIENT_ONLY=ON -DCMAKE_C_FLAGS=-march=x86-64)
string(TOLOWER "${run_out}" configure_log)
string(FIND "${configure_log}" "openblas" openblas)
if(NOT openblas EQUAL -1)
  message(FATAL_ERROR "FAIL: the client-only configure looked for OpenBLAS:\n${run_out}")
endif()
run("build the client alone" ${CMAKE_COMMAND} --build ${BIN} -j 2)
# Nothing but the client's own targets and bs_core: no engine, backend or server.
file(GLOB_RECURSE archives RELATIVE ${BIN} ${BIN}/*.a)
foreach(a IN LISTS archives)
  get_filename_component(name ${a} NAME)
  if(NOT name MATCHES "^lib(bs_core|bs_proto|bs_client)\\.a$")
    message(FATAL_ERROR "FAIL: the client-only build made ${a}")
  endif()
endforeach()
# Every compile line: baseline -march only.
file(READ ${BIN}/compile_commands.json commands)
string(REGEX MATCHALL "-march=[^ \"]+" marches "${commands}")
list(REMOVE_DUPLICATES marches)
if(NOT marches STREQUAL "-march=x86-64")
  message(FATAL_ERROR "FAIL: the client-only build compiles with ${marches}")
endif()

set(exe ${BIN}/client/blockserve-cli)
run("blockserve-cli --help" ${exe} --help)
if(NOT run_out MATCHES "usage: blockserve-cli")
  message(FATAL_ERROR "FAIL: blockserve-cli --help printed no usage:\n${run_out}")
endif()
foreach(f sample_request.bin sample_request.json)
  if(NOT EXISTS ${BIN}/client/${f})
    message(FATAL_ERROR "FAIL: blockserve-cli make-request wrote no ${f}")
  endif()
endforeach()
check_cli(${exe} ON)
string(TIMESTAMP t1 "%s")
math(EXPR secs "${t1} - ${t0}")
message(STATUS "ok: client alone, -march=x86-64: configured, built and ran in ${secs} s")

if(DEFINED CLI AND NOT CLI STREQUAL "")
  run("main build: blockserve-cli --help" ${CLI} --help)
  check_cli(${CLI} ${CHECK_CLI_CODE})
endif()
file(REMOVE_RECURSE ${BIN})
