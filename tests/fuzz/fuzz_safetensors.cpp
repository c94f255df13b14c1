// libFuzzer target: the safetensors reader and the codebook-file loader on arbitrary bytes. Any
// input must either load or throw cq::Error; a crash, leak, overflow or other exception is a bug.
// Whatever loads and the writers accept must read back unchanged (writers never write what their
// readers refuse).
#include <cq/cq.hpp>

#include <cstdint>
#include <vector>

namespace {

// The reader's tensors and metadata, written again and read back: the same.
void check_rewrite(cq::io::SafetensorsReader& r) {
  cq::io::SafetensorsWriter w;
  try {
    for (const auto& [k, v] : r.metadata()) w.set_metadata(k, v);
    for (const auto& t : r.tensors()) {
      const auto raw = r.read_bytes(t);
      w.add(t.name, t.dtype, t.shape, raw.data(), raw.size());
    }
  } catch (const cq::Error&) {
    return;  // refused (e.g. a name that is not UTF-8): fine, nothing was written
  }
  auto back = cq::io::SafetensorsReader::from_memory(w.bytes(), "rewritten");
  if (back.metadata() != r.metadata() || back.tensors().size() != r.tensors().size()) __builtin_trap();
  for (const auto& t : r.tensors()) {
    const cq::io::TensorInfo* u = back.find(t.name);
    if (!u || u->dtype != t.dtype || u->shape != t.shape || back.read_bytes(*u) != r.read_bytes(t)) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> bytes(data, data + size);
  try {
    auto r = cq::io::SafetensorsReader::from_memory(bytes, "fuzz");
    for (const auto& t : r.tensors()) {
      (void)r.read_bytes(t);
      try {
        (void)r.read_floats(t);
      } catch (const cq::Error&) {  // not a float dtype
      }
    }
    check_rewrite(r);
    const cq::io::CodebookSet set = cq::io::load_codebooks(r);
    for (const auto& [name, cb] : set.entries()) (void)cb.view();
    try {
      (void)cq::io::kv_cache_config(set);
    } catch (const cq::Error&) {
    }
    std::vector<std::uint8_t> again;
    try {
      again = cq::io::codebook_file_bytes(set);
    } catch (const cq::Error&) {
      return 0;  // metadata the writer refuses (not UTF-8)
    }
    const cq::io::CodebookSet back = cq::io::load_codebooks(cq::io::SafetensorsReader::from_memory(again, "again"));
    if (back.size() != set.size() || back.metadata != set.metadata) __builtin_trap();
    for (const auto& [name, cb] : set.entries())
      if (!back.find(name) || !(*back.find(name) == cb)) __builtin_trap();
  } catch (const cq::Error&) {
  }
  return 0;
}
