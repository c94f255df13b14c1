#pragma once
/// cq's host element types (cq/element.hpp: float, cq::half, cq::bfloat16, which are Eigen's) and
/// the device types of the same bytes, for host code that hands a cache's rows to kernels. Apart
/// from elements.cuh so that kernel headers do not pull in Eigen.

#pragma nv_diag_suppress 20012  // Eigen's element types: defaulted __host__ __device__ members
#include "cq/element.hpp"
#pragma nv_diag_default 20012

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cq::cuda {

/// The device element type of a host element type (float, cq::half, cq::bfloat16): the same bytes.
template <element_type T>
struct device_element_of {
  using type = float;
};
template <>
struct device_element_of<half> {
  using type = __half;
};
template <>
struct device_element_of<bfloat16> {
  using type = __nv_bfloat16;
};
template <element_type T>
using device_element_t = typename device_element_of<T>::type;

}  // namespace cq::cuda
