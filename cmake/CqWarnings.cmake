# Compile settings for cq's own executables (tests, benchmarks, examples, tools). Consumers of the
# header-only cq::cq target get none of these.

# cq_target_defaults(<target> [NO_NATIVE]): warnings as the project requires them, and
# -march=native unless the target pins its own instruction set.
function(cq_target_defaults target)
  cmake_parse_arguments(ARG "NO_NATIVE" "" "" ${ARGN})
  target_link_libraries(${target} PRIVATE cq::cq)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wno-psabi)
    if(CQ_NATIVE_ARCH AND NOT ARG_NO_NATIVE)
      target_compile_options(${target} PRIVATE -march=native)
    endif()
  endif()
endfunction()

# Tests keep their assertions in every build type ("Release with asserts on").
function(cq_keep_asserts target)
  target_compile_options(${target} PRIVATE -UNDEBUG)
endfunction()
