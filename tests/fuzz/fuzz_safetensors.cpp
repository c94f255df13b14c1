// libFuzzer target: the safetensors reader and the codebook-file loader on arbitrary bytes. Any
// input must either load or throw cq::Error; a crash, leak, overflow or other exception is a bug.
#include <cq/cq.hpp>

#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> bytes(data, data + size);
  try {
    auto r = cq::io::SafetensorsReader::from_memory(bytes, "fuzz");
    for (const auto& t : r.tensors()) {
      const auto raw = r.read_bytes(t);
      if (t.dtype == cq::DType::f32 || t.dtype == cq::DType::f16 || t.dtype == cq::DType::bf16 ||
          t.dtype == cq::DType::f64)
        (void)r.read_floats(t);
      (void)raw;
    }
    const cq::io::CodebookSet set = cq::io::load_codebooks(r);
    for (const auto& [name, cb] : set.entries()) (void)cb.view();
    try {
      (void)cq::io::kv_cache_config(set);
    } catch (const cq::Error&) {
    }
  } catch (const cq::Error&) {
  }
  return 0;
}
