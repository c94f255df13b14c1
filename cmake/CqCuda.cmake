# Optional CUDA: on when nvcc is found. CUDA code lives only in include/cq/cuda/*.cuh and in cq's
# own CUDA tests and benchmarks; the library stays complete without it.
include(CheckLanguage)
if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
endif()
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  enable_language(CUDA)
  set(CQ_HAVE_CUDA ON)
  # What nvcc generates for cq's own CUDA targets: by default sm_90a machine code for the H100/H200
  # plus compute_90 PTX as a fallback for later GPUs.
  set(CQ_CUDA_GENCODE "-gencode=arch=compute_90a,code=sm_90a;-gencode=arch=compute_90,code=compute_90"
      CACHE STRING "nvcc -gencode options (a list) for cq's CUDA tests and benchmarks")
  # A build that only checks that the CUDA code compiles, where no GPU will run it (tests/run.sh
  # without one): PTX alone, generated without optimisation (cicc -O0), so nvcc spends its time in
  # the C++ front end and the host compiler, a sixth of a full build's; the targets' C++ sources at
  # -O0; and each binary stops as it loads (compile_check_guard.cpp), so none is timed by mistake.
  # What it does not check is ptxas's part -- inline PTX, registers, spills: the GPU machine's
  # build does.
  option(CQ_CUDA_COMPILE_CHECK "Compile cq's CUDA targets for a check only (PTX without optimisation)" OFF)
  if(CQ_CUDA_COMPILE_CHECK)
    set(CQ_CUDA_GENCODE "-gencode=arch=compute_90a,code=compute_90a;-Xcicc=-O0")
  endif()
  message(STATUS "cq: CUDA found (${CMAKE_CUDA_COMPILER}); building CUDA tests and benchmarks")
else()
  set(CQ_HAVE_CUDA OFF)
  message(STATUS "cq: nvcc not found; CUDA tests and benchmarks are skipped")
endif()

# cq_cuda_target(<target>): CUDA compile settings for one of cq's own targets with .cu sources.
function(cq_cuda_target target)
  # CMake 3.25 does not know nvcc 13's C++20 flag, so it is passed by hand.
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 ${CQ_CUDA_GENCODE} --expt-relaxed-constexpr -Xcompiler=-Wall,-Wextra -lineinfo>)
  # -march=native and the host warning flags are for the host compiler only.
  get_target_property(opts ${target} COMPILE_OPTIONS)
  set(host_opts)
  foreach(o IN LISTS opts)
    if(o MATCHES "^-(march|W)")
      list(APPEND host_opts "$<$<COMPILE_LANGUAGE:CXX>:${o}>")
    else()
      list(APPEND host_opts "${o}")
    endif()
  endforeach()
  set_target_properties(${target} PROPERTIES COMPILE_OPTIONS "${host_opts}")
  if(CQ_CUDA_COMPILE_CHECK)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O0>)
    target_sources(${target} PRIVATE "${PROJECT_SOURCE_DIR}/cmake/compile_check_guard.cpp")
  endif()
endfunction()
