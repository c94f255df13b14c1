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
  # sm_90a machine code for the H200 plus compute_90 PTX as a fallback for later GPUs.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "52")
    set(CQ_CUDA_GENCODE "-gencode=arch=compute_90a,code=sm_90a" "-gencode=arch=compute_90,code=compute_90")
  endif()
  message(STATUS "cq: CUDA found (${CMAKE_CUDA_COMPILER}); building CUDA tests and benchmarks")
else()
  set(CQ_HAVE_CUDA OFF)
  message(STATUS "cq: nvcc not found; CUDA tests and benchmarks are skipped")
endif()
