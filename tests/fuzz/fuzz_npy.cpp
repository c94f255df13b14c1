// libFuzzer target: the .npy parser on arbitrary bytes (load or cq::Error, nothing else).
#include <cq/cq.hpp>

#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const cq::io::NpyArray a = cq::io::parse_npy(std::vector<std::uint8_t>(data, data + size), "fuzz");
    float s = 0.0f;
    for (std::size_t i = 0; i < a.numel(); ++i) s += cq::io::npy_float(a, i);
    (void)s;
  } catch (const cq::Error&) {
  }
  return 0;
}
