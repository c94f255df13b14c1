// libFuzzer target: the JSON parser behind safetensors headers and cq-calibrate configurations.
#include <cq/cq.hpp>

#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto v = cq::io::json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
    std::string out;
    if (v.kind == cq::io::json::Value::Kind::string) {
      cq::io::json::write_string(out, v.string);
      if (cq::io::json::parse(out).string != v.string) __builtin_trap();  // write/parse must round-trip
    }
  } catch (const cq::Error&) {
  }
  return 0;
}
