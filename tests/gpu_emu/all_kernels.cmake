# cmake -DKERNELS=<kernels/cuda> -DLOGS=<dir> -P all_kernels.cmake
# Every __global__ kernel declared in KERNELS/*.cu and *.cuh must appear in
# an "emulated <name>: ..." line of the gpu_emu tests' logs (LOGS/*.txt,
# written by this run: the tests are this test's fixture).
file(GLOB sources ${KERNELS}/*.cu ${KERNELS}/*.cuh)
set(kernels)
foreach(f ${sources})
  file(READ ${f} text)
  string(REGEX MATCHALL
         "__global__ void[ \t\n]+(__launch_bounds__\\([^)]*\\)[ \t\n]+)?[A-Za-z_][A-Za-z_0-9]*"
         decls "${text}")
  foreach(d ${decls})
    string(REGEX REPLACE ".*[ \t\n]([A-Za-z_][A-Za-z_0-9]*)$" "\\1" name "${d}")
    list(APPEND kernels ${name})
  endforeach()
endforeach()
list(REMOVE_DUPLICATES kernels)
list(LENGTH kernels n)
if(n EQUAL 0)
  message(FATAL_ERROR "no __global__ kernel found in ${KERNELS}")
endif()

file(GLOB logs ${LOGS}/*.txt)
set(emulated "")
foreach(f ${logs})
  file(READ ${f} text)
  string(APPEND emulated "${text}")
endforeach()

set(missing)
foreach(k ${kernels})
  string(FIND "${emulated}" "emulated ${k}: " at)
  if(at EQUAL -1)
    list(APPEND missing ${k})
  endif()
endforeach()
list(JOIN kernels ", " all)
if(missing)
  list(JOIN missing ", " m)
  message(FATAL_ERROR "kernels/cuda has ${n} __global__ kernels (${all}); not emulated: ${m}")
endif()
message(STATUS "kernels/cuda has ${n} __global__ kernels, every one emulated: ${all}")
