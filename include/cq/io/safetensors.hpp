#pragma once
/// safetensors files: an 8-byte little-endian header length N, N bytes of JSON
///   {"__metadata__": {"key": "value", ...}, "name": {"dtype": "F32", "shape": [..],
///    "data_offsets": [begin, end]}, ...}
/// then the raw little-endian tensor bytes (offsets relative to the data section). Readable by the
/// Python `safetensors` package and written the way it writes (header padded to 8 bytes).
///
/// The reader trusts nothing: every length, offset, dtype and shape is checked before use, and any
/// inconsistency throws cq::Error naming the file and tensor.

#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/io/json.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cq::io {

static_assert(std::endian::native == std::endian::little, "cq: safetensors I/O assumes a little-endian host");

/// Largest header the reader accepts (the Python package uses 100 MB too).
inline constexpr std::uint64_t max_safetensors_header = 100'000'000;

inline std::optional<DType> parse_dtype(std::string_view s) {
  for (DType d : {DType::f32, DType::f16, DType::bf16, DType::f64, DType::i32, DType::u8, DType::u16, DType::i64})
    if (dtype_name(d) == s) return d;
  return std::nullopt;
}

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range within the data section
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;  // overflow excluded by the reader's checks
    return n;
  }
};

class SafetensorsReader {
 public:
  /// Opens and validates a file's header; tensor bytes are read on demand.
  static SafetensorsReader open(const std::filesystem::path& path) {
    SafetensorsReader r;
    r.name_ = path.string();
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    CQ_CHECK(!ec, r.name_, ": cannot read file (", ec.message(), ")");
    r.file_.open(path, std::ios::binary);
    CQ_CHECK(r.file_.good(), r.name_, ": cannot open file");
    r.file_size_ = size;
    CQ_CHECK(size >= 8, r.name_, ": file is ", size, " bytes, too short for a safetensors header");
    unsigned char len_bytes[8];
    r.file_.read(reinterpret_cast<char*>(len_bytes), 8);
    CQ_CHECK(r.file_.good(), r.name_, ": cannot read the header length");
    const std::uint64_t n = load_u64(len_bytes);
    r.check_header_length(n);
    std::string header(static_cast<std::size_t>(n), '\0');
    r.file_.read(header.data(), static_cast<std::streamsize>(n));
    CQ_CHECK(r.file_.good(), r.name_, ": cannot read the ", n, "-byte header");
    r.parse_header(header, n);
    return r;
  }
  /// Validates a whole file held in memory (the fuzzers' entry point).
  static SafetensorsReader from_memory(std::vector<std::uint8_t> bytes, std::string name = "<memory>") {
    SafetensorsReader r;
    r.name_ = std::move(name);
    r.memory_ = std::move(bytes);
    r.in_memory_ = true;
    r.file_size_ = r.memory_.size();
    CQ_CHECK(r.file_size_ >= 8, r.name_, ": file is ", r.file_size_, " bytes, too short for a safetensors header");
    const std::uint64_t n = load_u64(r.memory_.data());
    r.check_header_length(n);
    r.parse_header(std::string_view(reinterpret_cast<const char*>(r.memory_.data() + 8), static_cast<std::size_t>(n)), n);
    return r;
  }

  const std::string& name() const { return name_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view tensor) const {
    for (const auto& t : tensors_)
      if (t.name == tensor) return &t;
    return nullptr;
  }
  const TensorInfo& get(std::string_view tensor) const {
    const TensorInfo* t = find(tensor);
    CQ_CHECK(t != nullptr, name_, ": no tensor named '", tensor, "'");
    return *t;
  }
  /// A metadata value, or throws naming the key.
  const std::string& meta(const std::string& key) const {
    auto it = metadata_.find(key);
    CQ_CHECK(it != metadata_.end(), name_, ": metadata key '", key, "' is missing");
    return it->second;
  }

  /// Raw bytes of a tensor.
  std::vector<std::uint8_t> read_bytes(const TensorInfo& t) {
    std::vector<std::uint8_t> out(static_cast<std::size_t>(t.end - t.begin));
    if (in_memory_) {
      if (!out.empty()) std::memcpy(out.data(), memory_.data() + data_offset_ + t.begin, out.size());
    } else {
      file_.clear();
      file_.seekg(static_cast<std::streamoff>(data_offset_ + t.begin));
      file_.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
      CQ_CHECK(file_.good(), name_, ": cannot read tensor '", t.name, "'");
    }
    return out;
  }

  /// A floating-point tensor (F32, F16, BF16 or F64) converted to float. Non-finite values are
  /// returned as they are; callers that need finite data check it (and name the tensor).
  std::vector<float> read_floats(const TensorInfo& t) {
    const std::vector<std::uint8_t> raw = read_bytes(t);
    const std::size_t n = static_cast<std::size_t>(t.numel());
    std::vector<float> out(n);
    switch (t.dtype) {
      case DType::f32:
        if (n) std::memcpy(out.data(), raw.data(), n * 4);  // (both pointers may be null when empty)
        break;
      case DType::f64:
        for (std::size_t i = 0; i < n; ++i) {
          double d;
          std::memcpy(&d, raw.data() + 8 * i, 8);
          out[i] = static_cast<float>(d);
        }
        break;
      case DType::f16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t b;
          std::memcpy(&b, raw.data() + 2 * i, 2);
          out[i] = static_cast<float>(Eigen::numext::bit_cast<half>(b));
        }
        break;
      case DType::bf16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t b;
          std::memcpy(&b, raw.data() + 2 * i, 2);
          out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
        }
        break;
      default: cq::detail::fail(name_, ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype), ", expected a float type");
    }
    return out;
  }
  std::vector<float> read_floats(std::string_view tensor) { return read_floats(get(tensor)); }

 private:
  static std::uint64_t load_u64(const unsigned char* p) {
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }
  void check_header_length(std::uint64_t n) const {
    CQ_CHECK(n <= max_safetensors_header, name_, ": header length ", n, " exceeds the ", max_safetensors_header,
             "-byte limit");
    CQ_CHECK(n <= file_size_ - 8, name_, ": header length ", n, " runs past the end of the ", file_size_,
             "-byte file");
    CQ_CHECK(n >= 2, name_, ": header length ", n, " is too short for a JSON object");
  }

  void parse_header(std::string_view header, std::uint64_t n) {
    data_offset_ = 8 + n;
    const std::uint64_t data_size = file_size_ - data_offset_;
    json::Value root;
    try {
      root = json::parse(header);
    } catch (const Error& e) {
      cq::detail::fail(name_, ": malformed header (", e.what(), ")");
    }
    CQ_CHECK(root.kind == json::Value::Kind::object, name_, ": header is not a JSON object");
    for (std::size_t e = 0; e < root.size(); ++e) {
      const std::string& key = root.keys[e];
      const json::Value& v = root.items[e];
      if (key == "__metadata__") {
        CQ_CHECK(v.kind == json::Value::Kind::object, name_, ": __metadata__ is not an object");
        for (std::size_t m = 0; m < v.size(); ++m) {
          CQ_CHECK(v.items[m].kind == json::Value::Kind::string, name_, ": metadata value of '", v.keys[m],
                   "' is not a string");
          metadata_[v.keys[m]] = v.items[m].string;
        }
        continue;
      }
      CQ_CHECK(v.kind == json::Value::Kind::object, name_, ": tensor '", key, "' entry is not an object");
      TensorInfo t;
      t.name = key;
      const json::Value* dt = v.find("dtype");
      CQ_CHECK(dt && dt->kind == json::Value::Kind::string, name_, ": tensor '", key, "' has no dtype string");
      const auto parsed = parse_dtype(dt->string);
      CQ_CHECK(parsed.has_value(), name_, ": tensor '", key, "' has unsupported dtype '", dt->string, "'");
      t.dtype = *parsed;
      const json::Value* shape = v.find("shape");
      CQ_CHECK(shape && shape->kind == json::Value::Kind::array, name_, ": tensor '", key, "' has no shape array");
      CQ_CHECK(shape->size() <= 8, name_, ": tensor '", key, "' has rank ", shape->size(), " (at most 8)");
      std::uint64_t bytes = dtype_size(t.dtype);
      for (const auto& d : shape->items) {
        CQ_CHECK(d.kind == json::Value::Kind::number && d.is_uint, name_, ": tensor '", key,
                 "' has a shape entry that is not a non-negative integer");
        CQ_CHECK(d.uint == 0 || bytes <= UINT64_MAX / d.uint, name_, ": tensor '", key,
                 "' shape product overflows");
        bytes *= d.uint;
        t.shape.push_back(d.uint);
      }
      const json::Value* off = v.find("data_offsets");
      CQ_CHECK(off && off->kind == json::Value::Kind::array && off->size() == 2 &&
                   off->items[0].kind == json::Value::Kind::number && off->items[0].is_uint &&
                   off->items[1].kind == json::Value::Kind::number && off->items[1].is_uint,
               name_, ": tensor '", key, "' needs data_offsets [begin, end] of non-negative integers");
      t.begin = off->items[0].uint;
      t.end = off->items[1].uint;
      CQ_CHECK(t.begin <= t.end, name_, ": tensor '", key, "' data_offsets [", t.begin, ", ", t.end, "] are reversed");
      CQ_CHECK(t.end <= data_size, name_, ": tensor '", key, "' data_offsets end ", t.end,
               " is past the end of the ", data_size, "-byte data section");
      CQ_CHECK(t.end - t.begin == bytes, name_, ": tensor '", key, "' holds ", t.end - t.begin, " bytes but dtype ",
               dtype_name(t.dtype), " and its shape need ", bytes);
      tensors_.push_back(std::move(t));
    }
    // Tensors may not overlap (the format also forbids holes; we tolerate them, as readers do).
    std::vector<const TensorInfo*> order;
    for (const auto& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    const TensorInfo* reach = nullptr;  // the non-empty tensor ending furthest so far
    for (const TensorInfo* t : order) {
      if (t->begin == t->end) continue;
      CQ_CHECK(reach == nullptr || t->begin >= reach->end, name_, ": tensors '", reach ? reach->name : "", "' and '",
               t->name, "' overlap");
      if (reach == nullptr || t->end > reach->end) reach = t;
    }
  }

  std::string name_;
  bool in_memory_ = false;
  std::vector<std::uint8_t> memory_;
  std::ifstream file_;
  std::uint64_t file_size_ = 0;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<TensorInfo> tensors_;
};

/// Collects tensors and metadata, then writes them as one safetensors file. write() goes through
/// a temporary file and a rename, so a failed write never leaves a half-written file behind.
class SafetensorsWriter {
 public:
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

  void add(std::string name, DType dtype, std::vector<std::uint64_t> shape, const void* data, std::size_t bytes) {
    std::uint64_t need = dtype_size(dtype);
    for (auto d : shape) need *= d;
    CQ_CHECK(need == bytes, "safetensors: tensor '", name, "' has ", bytes, " bytes, its shape needs ", need);
    for (const auto& t : tensors_)
      CQ_CHECK(t.name != name, "safetensors: tensor '", name, "' added twice");
    Entry e{std::move(name), dtype, std::move(shape), {}};
    e.bytes.assign(static_cast<const std::uint8_t*>(data), static_cast<const std::uint8_t*>(data) + bytes);
    tensors_.push_back(std::move(e));
  }
  void add_f32(std::string name, std::vector<std::uint64_t> shape, const float* data) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    add(std::move(name), DType::f32, std::move(shape), data, static_cast<std::size_t>(n) * 4);
  }
  /// Stores float data as F16 (halves the file; values are rounded to fp16).
  void add_f16(std::string name, std::vector<std::uint64_t> shape, const float* data) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<std::uint16_t> h(static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = Eigen::numext::bit_cast<std::uint16_t>(half(data[i]));
    add(std::move(name), DType::f16, std::move(shape), h.data(), h.size() * 2);
  }

  /// The complete file contents.
  std::vector<std::uint8_t> bytes() const {
    std::string header = "{";
    bool first = true;
    if (!metadata_.empty()) {
      header += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata_) {
        if (!first) header += ',';
        first = false;
        json::write_string(header, k);
        header += ':';
        json::write_string(header, v);
      }
      header += '}';
      first = false;
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      if (!first) header += ',';
      first = false;
      json::write_string(header, t.name);
      header += ":{\"dtype\":";
      json::write_string(header, dtype_name(t.dtype));
      header += ",\"shape\":[";
      for (std::size_t i = 0; i < t.shape.size(); ++i) {
        if (i) header += ',';
        header += std::to_string(t.shape[i]);
      }
      header += "],\"data_offsets\":[";
      header += std::to_string(offset);
      header += ',';
      header += std::to_string(offset + t.bytes.size());
      header += "]}";
      offset += t.bytes.size();
    }
    header += '}';
    while ((8 + header.size()) % 8 != 0) header += ' ';
    std::vector<std::uint8_t> out(8 + header.size() + offset);
    std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
    std::memcpy(out.data() + 8, header.data(), header.size());
    std::size_t pos = 8 + header.size();
    for (const auto& t : tensors_) {
      if (!t.bytes.empty()) std::memcpy(out.data() + pos, t.bytes.data(), t.bytes.size());
      pos += t.bytes.size();
    }
    return out;
  }

  void write(const std::filesystem::path& path) const { write_file_atomically(path, bytes()); }

  /// Writes `data` to `path` via a temporary file in the same directory and a rename.
  static void write_file_atomically(const std::filesystem::path& path, const std::vector<std::uint8_t>& data) {
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      CQ_CHECK(out.good(), path.string(), ": cannot open '", tmp.string(), "' for writing");
      out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
      out.flush();
      if (!out.good()) {
        out.close();
        std::error_code ec;
        std::filesystem::remove(tmp, ec);
        cq::detail::fail(path.string(), ": write failed");
      }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) {
      std::filesystem::remove(tmp, ec);
      cq::detail::fail(path.string(), ": cannot rename the temporary file into place");
    }
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::uint64_t> shape;
    std::vector<std::uint8_t> bytes;
  };
  std::map<std::string, std::string> metadata_;
  std::vector<Entry> tensors_;
};

}  // namespace cq::io
