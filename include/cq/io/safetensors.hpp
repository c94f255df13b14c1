#pragma once
/// safetensors files: an 8-byte little-endian header length N, N bytes of JSON
///   {"__metadata__": {"key": "value", ...}, "name": {"dtype": "F32", "shape": [..],
///    "data_offsets": [begin, end]}, ...}
/// then the raw little-endian tensor bytes (offsets relative to the data section). Readable by the
/// Python `safetensors` package and written the way it writes (header padded to 8 bytes).
///
/// The reader trusts nothing: every length, offset, dtype and shape is checked before use, and any
/// inconsistency throws cq::Error naming the file and tensor. It knows every dtype the format
/// defines, so a file holding, say, F8_E4M3 scales opens; only reading such a tensor as floats
/// fails. Lookups are hashed and the header's parse is linear, so a load costs time proportional to
/// the file. Files are written through a temporary file (POSIX: open, fsync, rename).

#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/io/json.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
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
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace cq::io {

static_assert(std::endian::native == std::endian::little, "cq: safetensors I/O assumes a little-endian host");

/// Largest header the reader accepts (the Python package uses 100 MB too); the writer refuses to
/// write a larger one.
inline constexpr std::uint64_t max_safetensors_header = 100'000'000;

inline std::optional<DType> parse_dtype(std::string_view s) {
  for (DType d : all_dtypes)
    if (dtype_name(d) == s) return d;
  return std::nullopt;
}

namespace detail {

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Bytes a tensor of `dtype` and `shape` occupies. Throws, starting the message with `what()`,
/// when the element count or the bit count overflows 64 bits (checked as the format's reference
/// reader checks: element count first) or a sub-byte dtype's bits do not fill whole bytes.
template <class What>
std::uint64_t tensor_bytes(DType dtype, const std::vector<std::uint64_t>& shape, What&& what) {
  auto overflow = [&] { cq::detail::fail(what(), ": shape product overflows (shape ", shape_string(shape), ")"); };
  std::uint64_t n = 1;
  for (auto d : shape) {
    if (d != 0 && n > UINT64_MAX / d) overflow();
    n *= d;
  }
  const std::uint64_t bits = dtype_bits(dtype);
  if (n > UINT64_MAX / bits) overflow();
  if (n * bits % 8 != 0)
    cq::detail::fail(what(), ": ", n, " elements of ", dtype_name(dtype), " are ", n * bits, " bits, not whole bytes");
  return n * bits / 8;
}

inline bool is_float_dtype(DType d) {
  return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64;
}

/// Converts `n` little-endian elements of a floating-point dtype (is_float_dtype) to float.
inline void floats_from_bytes(DType dtype, const std::uint8_t* src, std::size_t n, float* out) {
  auto each = [&](std::size_t size, auto convert) {
    for (std::size_t i = 0; i < n; ++i) out[i] = convert(src + size * i);
  };
  auto bits16 = [](const std::uint8_t* p) {
    std::uint16_t b;
    std::memcpy(&b, p, 2);
    return b;
  };
  switch (dtype) {
    case DType::f32:
      if (n) std::memcpy(out, src, n * 4);  // (both pointers may be null when empty)
      return;
    case DType::f64:
      return each(8, [](const std::uint8_t* p) {
        double d;
        std::memcpy(&d, p, 8);
        return static_cast<float>(d);
      });
    case DType::f16:
      return each(2, [&](const std::uint8_t* p) { return static_cast<float>(Eigen::numext::bit_cast<half>(bits16(p))); });
    case DType::bf16:
      return each(2, [&](const std::uint8_t* p) { return std::bit_cast<float>(std::uint32_t{bits16(p)} << 16); });
    default: cq::detail::fail("floats_from_bytes: ", dtype_name(dtype), " is not a float type");
  }
}

/// fp16 bit patterns of `n` floats. Throws, naming `what()`, the index and the value, for a finite
/// value that fp16 cannot hold (it would become infinite); NaN and infinities are kept as they are.
template <class What>
std::vector<std::uint16_t> to_f16(const float* data, std::size_t n, What&& what) {
  std::vector<std::uint16_t> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    const half h(data[i]);
    if (std::isfinite(data[i]) && !Eigen::numext::isfinite(h))
      cq::detail::fail(what(), ": value ", i, " = ", data[i], " is beyond the F16 range (largest finite: 65504)");
    out[i] = Eigen::numext::bit_cast<std::uint16_t>(h);
  }
  return out;
}

/// A short random-looking suffix for temporary file names (O_EXCL decides uniqueness).
inline std::string temp_suffix() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t x = static_cast<std::uint64_t>(::getpid()) * 0x9E3779B97F4A7C15ull ^
                    static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                    (counter.fetch_add(1, std::memory_order_relaxed) << 48);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64 finaliser
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

}  // namespace detail

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
    const auto it = index_.find(tensor);
    return it == index_.end() ? nullptr : &tensors_[it->second];
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

  /// A floating-point tensor (F32, F16, BF16 or F64) converted to float; a tensor of any other
  /// dtype throws naming it. Non-finite values are returned as they are; callers that need finite
  /// data check it (and name the tensor).
  std::vector<float> read_floats(const TensorInfo& t) {
    CQ_CHECK(detail::is_float_dtype(t.dtype), name_, ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype),
             ", expected a float type (F32, F16, BF16 or F64)");
    const std::vector<std::uint8_t> raw = read_bytes(t);
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    detail::floats_from_bytes(t.dtype, raw.data(), out.size(), out.data());
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
      cq::detail::fail(name_, ": malformed header (", json::bare_message(e), ")");
    }
    CQ_CHECK(root.kind == json::Value::Kind::object, name_, ": header is not a JSON object");
    tensors_.reserve(root.size());
    for (std::size_t e = 0; e < root.size(); ++e) {
      std::string& key = root.keys[e];
      const json::Value& v = root.items[e];
      if (key == "__metadata__") {
        CQ_CHECK(v.kind == json::Value::Kind::object, name_, ": __metadata__ is not an object");
        for (std::size_t m = 0; m < v.size(); ++m) {
          CQ_CHECK(v.items[m].kind == json::Value::Kind::string, name_, ": metadata value of '", v.keys[m],
                   "' is not a string");
          metadata_.emplace(v.keys[m], v.items[m].string);
        }
        continue;
      }
      CQ_CHECK(v.kind == json::Value::Kind::object, name_, ": tensor '", key, "' entry is not an object");
      TensorInfo t;
      const json::Value* dt = v.find("dtype");
      CQ_CHECK(dt && dt->kind == json::Value::Kind::string, name_, ": tensor '", key, "' has no dtype string");
      const auto parsed = parse_dtype(dt->string);
      CQ_CHECK(parsed.has_value(), name_, ": tensor '", key, "' has unknown dtype '", dt->string, "'");
      t.dtype = *parsed;
      const json::Value* shape = v.find("shape");
      CQ_CHECK(shape && shape->kind == json::Value::Kind::array, name_, ": tensor '", key, "' has no shape array");
      t.shape.reserve(shape->size());
      for (const auto& d : shape->items) {
        CQ_CHECK(d.kind == json::Value::Kind::number && d.is_uint, name_, ": tensor '", key,
                 "' has a shape entry that is not a non-negative integer");
        t.shape.push_back(d.uint);
      }
      const std::uint64_t bytes =
          detail::tensor_bytes(t.dtype, t.shape, [&] { return cq::detail::concat(name_, ": tensor '", key, "'"); });
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
      t.name = std::move(key);
      tensors_.push_back(std::move(t));
    }
    // The index's keys view the names inside tensors_, which no longer grows (and whose heap
    // buffer, names included, moves with the reader).
    index_.reserve(tensors_.size());
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
    // Tensors may not overlap (the format also forbids holes; we tolerate them, as readers do).
    std::vector<const TensorInfo*> order;
    order.reserve(tensors_.size());
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
  std::unordered_map<std::string_view, std::size_t> index_;  // name -> position in tensors_
};

/// Collects tensors and metadata, then writes them as one safetensors file. Refuses (throws, the
/// writer unchanged) anything its reader or the format's other readers would refuse: a name or
/// metadata that is not UTF-8, a tensor named `__metadata__` or added twice, a size that does not
/// match the shape, a header past max_safetensors_header. write() is atomic (write_file_atomically).
class SafetensorsWriter {
 public:
  void set_metadata(std::string key, std::string value) {
    CQ_CHECK(json::valid_utf8(key), "safetensors: metadata key '", key, "' is not valid UTF-8");
    CQ_CHECK(json::valid_utf8(value), "safetensors: metadata value of '", key, "' is not valid UTF-8");
    metadata_[std::move(key)] = std::move(value);
  }

  void add(std::string name, DType dtype, std::vector<std::uint64_t> shape, const void* data, std::size_t bytes) {
    CQ_CHECK(name != "__metadata__",
             "safetensors: a tensor cannot be named '__metadata__' (the header's metadata key)");
    CQ_CHECK(json::valid_utf8(name), "safetensors: tensor name '", name, "' is not valid UTF-8");
    CQ_CHECK(!names_.contains(name), "safetensors: tensor '", name, "' added twice");
    const std::uint64_t need =
        detail::tensor_bytes(dtype, shape, [&] { return cq::detail::concat("safetensors: tensor '", name, "'"); });
    CQ_CHECK(need == bytes, "safetensors: tensor '", name, "' has ", bytes, " bytes, its shape needs ", need);
    Entry e{std::move(name), dtype, std::move(shape), {}};
    e.bytes.assign(static_cast<const std::uint8_t*>(data), static_cast<const std::uint8_t*>(data) + bytes);
    names_.insert(e.name);
    tensors_.push_back(std::move(e));
  }
  void add_f32(std::string name, std::vector<std::uint64_t> shape, const float* data) {
    const std::uint64_t bytes =
        detail::tensor_bytes(DType::f32, shape, [&] { return cq::detail::concat("safetensors: tensor '", name, "'"); });
    add(std::move(name), DType::f32, std::move(shape), data, static_cast<std::size_t>(bytes));
  }
  /// Stores float data as F16 (halves the file; values are rounded to fp16). Refuses a finite
  /// value beyond fp16's range, which would become infinite.
  void add_f16(std::string name, std::vector<std::uint64_t> shape, const float* data) {
    auto what = [&] { return cq::detail::concat("safetensors: tensor '", name, "'"); };
    const std::uint64_t bytes = detail::tensor_bytes(DType::f16, shape, what);
    const std::vector<std::uint16_t> h = detail::to_f16(data, static_cast<std::size_t>(bytes / 2), what);
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
    CQ_CHECK(header.size() <= max_safetensors_header, "safetensors: the header would be ", header.size(),
             " bytes, past the ", max_safetensors_header, "-byte limit readers accept");
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

  /// Writes `data` to `path` atomically: into a temporary file created exclusively next to it
  /// (O_CREAT|O_EXCL|O_NOFOLLOW under a fresh random name, so no existing file or link is ever
  /// followed or overwritten), flushed to disk, then renamed over `path` (a link at `path` itself
  /// is replaced, not followed). On failure the temporary file is removed and `path` is untouched.
  static void write_file_atomically(const std::filesystem::path& path, const std::vector<std::uint8_t>& data) {
    const std::string target = path.string();
    std::string tmp;
    int fd = -1;
    for (int attempt = 0; fd < 0; ++attempt) {
      tmp = target + "." + detail::temp_suffix() + ".tmp";
      fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
      const int err = errno;
      CQ_CHECK(fd >= 0 || (err == EEXIST && attempt < 100), target, ": cannot create a temporary file next to it (",
               detail::errno_text(err), ")");
    }
    auto give_up = [&](const char* what, int err) {
      if (fd >= 0) ::close(fd);
      ::unlink(tmp.c_str());
      cq::detail::fail(target, ": ", what, " (", detail::errno_text(err), ")");
    };
    for (std::size_t done = 0; done < data.size();) {
      const ::ssize_t w = ::write(fd, data.data() + done, data.size() - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) give_up("write failed", w < 0 ? errno : EIO);
      done += static_cast<std::size_t>(w);
    }
    if (::fsync(fd) != 0) give_up("cannot flush the temporary file to disk", errno);
    const int closed = ::close(fd);
    fd = -1;
    if (closed != 0) give_up("cannot close the temporary file", errno);
    if (::rename(tmp.c_str(), target.c_str()) != 0) give_up("cannot rename the temporary file into place", errno);
    // Make the rename itself durable (best effort: some file systems refuse to sync a directory).
    const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
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
  std::unordered_set<std::string> names_;
};

}  // namespace cq::io
