// libFuzzer target: the .npy parser on arbitrary bytes (load or cq::Error, nothing else). A float
// array it accepts must survive the writer: written as float32, read back, the same values.
#include <cq/cq.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const cq::io::NpyArray a = cq::io::parse_npy(std::vector<std::uint8_t>(data, data + size), "fuzz");
    const std::vector<float> f = cq::io::npy_floats(a, "fuzz");  // throws for non-float dtypes
    const cq::io::NpyArray back = cq::io::parse_npy(cq::io::npy_bytes_f32(a.shape, f.data()), "rewritten");
    if (back.shape != a.shape || back.dtype != cq::DType::f32 ||
        (!f.empty() && std::memcmp(back.bytes.data(), f.data(), f.size() * 4) != 0))
      __builtin_trap();
  } catch (const cq::Error&) {
  }
  return 0;
}
