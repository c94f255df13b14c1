#pragma once
/// The one dispatch over C (channels per group) of cq's CUDA code: kernels are instantiated per C,
/// and every launcher and kernel that picks an instantiation at run time goes through here.

#include "cq/config.hpp"

#include <cstddef>

namespace cq::cuda::detail {

/// Whether `channels` is one of Cs...
template <int... Cs, class Int>
CQ_HOST_DEVICE constexpr bool is_one_of_channels(Int channels) {
  return ((channels == Int(Cs)) || ...);
}

/// Calls f.template operator()<C>() for C = `channels` if it is one of Cs... (a subset of 1, 2, 4,
/// 8, 16, 32); returns whether it was (the caller throws, or falls back, when not). A switch, so a
/// kernel dispatching on C compiles to a jump on the value.
template <int... Cs, class Int, class F>
CQ_HOST_DEVICE constexpr bool with_channels(Int channels, F&& f) {
  static_assert(((Cs == 1 || Cs == 2 || Cs == 4 || Cs == 8 || Cs == 16 || Cs == 32) && ...),
                "cq: channels per group are instantiated for 1, 2, 4, 8, 16 and 32");
  auto call = [&]<int C>() {
    if constexpr (is_one_of_channels<Cs...>(C)) {
      f.template operator()<C>();
      return true;
    } else {
      return false;
    }
  };
  switch (channels) {
    case 1: return call.template operator()<1>();
    case 2: return call.template operator()<2>();
    case 4: return call.template operator()<4>();
    case 8: return call.template operator()<8>();
    case 16: return call.template operator()<16>();
    case 32: return call.template operator()<32>();
    default: return false;
  }
}

}  // namespace cq::cuda::detail
