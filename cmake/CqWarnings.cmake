# Compile settings for cq's own executables (tests, benchmarks, examples, tools). Consumers of the
# header-only cq::cq target get none of these.

set(CQ_SANITIZE "" CACHE STRING "Sanitizers for cq's own targets, e.g. address,undefined or thread (clang or gcc)")

# cq_target_defaults(<target> [NO_NATIVE]): warnings as the project requires them, -march=native
# unless the target pins its own instruction set, and the sanitizers of CQ_SANITIZE.
function(cq_target_defaults target)
  cmake_parse_arguments(ARG "NO_NATIVE" "" "" ${ARGN})
  target_link_libraries(${target} PRIVATE cq::cq)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wno-psabi)
    if(CQ_NATIVE_ARCH AND NOT ARG_NO_NATIVE)
      target_compile_options(${target} PRIVATE -march=native)
    endif()
    if(CQ_SANITIZE)
      target_compile_options(${target} PRIVATE -fsanitize=${CQ_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
      target_link_options(${target} PRIVATE -fsanitize=${CQ_SANITIZE})
    endif()
  endif()
endfunction()

# Tests keep their assertions in every build type ("Release with asserts on").
function(cq_keep_asserts target)
  target_compile_options(${target} PRIVATE -UNDEBUG)
endfunction()
