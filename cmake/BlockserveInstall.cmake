# `cmake --install BUILD [--prefix P]` lays blockserve out as
#   P/bin/blockserve                 the server and engine command line
#   P/bin/blockserve-cli             the client CLI (when the client is built)
#   P/lib/blockserve/libbs_cuda.so   the dlopen'ed CUDA backend (when CUDA is built)
# The Dockerfile installs this tree into /usr/local; tests/deploy checks it.
#
# The rules run deferred, at the end of the top-level CMakeLists.txt, so that
# targets added anywhere (client/, kernels/cuda/) are known by then; a target
# that this build does not have is simply not installed.
set(BS_INSTALL_BINDIR bin CACHE STRING "Install directory of the executables, under the prefix")
set(BS_INSTALL_MODULEDIR lib/blockserve CACHE STRING
    "Install directory of the loadable backends (libbs_cuda.so), under the prefix")

function(bs_install_rules)
  foreach(exe blockserve blockserve-cli)
    if(TARGET ${exe})
      install(TARGETS ${exe} RUNTIME DESTINATION ${BS_INSTALL_BINDIR})
    endif()
  endforeach()
  if(TARGET bs_cuda)
    install(TARGETS bs_cuda LIBRARY DESTINATION ${BS_INSTALL_MODULEDIR})
  endif()
endfunction()

cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL bs_install_rules)
