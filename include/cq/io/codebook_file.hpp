#pragma once
/// Codebook files: one or more named codebooks in a safetensors file.
///
/// For each codebook named `name` the file holds the tensor `name.centroids`, shape
/// (groups, num_centroids, channels), F32 (or F16 when saved compact), and string metadata
/// `name.channels`, `name.bits`, `name.dim`, `name.method`, `name.init`, `name.dtype`,
/// `name.iterations`, `name.calibration_rows`, `name.objective`, `name.seed`. File-wide metadata:
/// `format` = "cq-codebooks", `cq_version`, `names` (comma-separated, in order), plus whatever the
/// caller adds (a KV cache records its layer and head layout there). The objective is written as
/// the shortest decimal that reads back exactly, independent of the locale.

#include "cq/codebook.hpp"
#include "cq/error.hpp"
#include "cq/io/safetensors.hpp"
#include "cq/version.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace cq::io {

inline constexpr const char* codebook_format = "cq-codebooks";

/// Named codebooks plus file-wide metadata. Names are unique, non-empty and free of commas (the
/// file lists them comma-separated); lookups by name are hashed.
class CodebookSet {
 public:
  /// File-wide metadata of the caller's (a KV cache's layout, a model name...). The keys a codebook
  /// file records itself (format, cq_version, names, NAME.bits...) are not here, and
  /// save_codebooks refuses them.
  std::map<std::string, std::string> metadata;

  /// Appends a codebook; throws, the set unchanged, for an empty name, a comma or a name already in.
  void add(std::string name, Codebook cb) {
    CQ_CHECK(!name.empty() && name.find(',') == std::string::npos, "CodebookSet: codebook name '", name,
             "' must be non-empty and contain no comma");
    CQ_CHECK(!index_.contains(name), "CodebookSet: codebook '", name, "' added twice");
    entries_.emplace_back(std::move(name), std::move(cb));
    try {
      index_.emplace(entries_.back().first, entries_.size() - 1);
    } catch (...) {
      entries_.pop_back();
      throw;
    }
  }
  /// The codebooks, in the order they were added (a file's order).
  const std::vector<std::pair<std::string, Codebook>>& entries() const { return entries_; }
  std::size_t size() const { return entries_.size(); }
  const Codebook* find(std::string_view name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &entries_[it->second].second;
  }

 private:
  struct Hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::vector<std::pair<std::string, Codebook>> entries_;
  std::unordered_map<std::string, std::size_t, Hash, std::equal_to<>> index_;  // name -> position
};

enum class CodebookStorage { f32, f16 };

namespace detail {

/// The per-codebook metadata fields: NAME.channels, NAME.bits, ...
inline constexpr std::string_view codebook_fields[] = {
    "channels", "bits", "dim", "method", "init", "dtype", "iterations", "calibration_rows", "objective", "seed"};

/// Whether a codebook file of `set` writes `key` itself (file-wide or per-codebook).
inline bool is_codebook_file_key(std::string_view key, const CodebookSet& set) {
  if (key == "format" || key == "cq_version" || key == "names") return true;
  const std::size_t dot = key.rfind('.');
  return dot != std::string_view::npos && set.find(key.substr(0, dot)) != nullptr &&
         std::find(std::begin(codebook_fields), std::end(codebook_fields), key.substr(dot + 1)) !=
             std::end(codebook_fields);
}

/// Shortest text that reads back as exactly `v` (inf, -inf and nan included), whatever the locale.
inline std::string format_double(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

template <class U>
U parse_meta_uint(const SafetensorsReader& r, const std::string& key, U max_value) {
  const std::string& s = r.meta(key);
  std::uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  CQ_CHECK(ec == std::errc{} && p == s.data() + s.size() && v <= static_cast<std::uint64_t>(max_value), r.name(),
           ": metadata '", key, "' = '", s, "' is not an integer in [0, ", static_cast<std::uint64_t>(max_value), "]");
  return static_cast<U>(v);
}

inline double parse_meta_double(const SafetensorsReader& r, const std::string& key) {
  const std::string& s = r.meta(key);
  double v = 0.0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  CQ_CHECK(ec == std::errc{} && p == s.data() + s.size(), r.name(), ": metadata '", key, "' = '", s,
           "' is not a number");
  return v;
}

inline std::string meta_or(const SafetensorsReader& r, const std::string& key, std::string fallback) {
  auto it = r.metadata().find(key);
  return it == r.metadata().end() ? fallback : it->second;
}

inline std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size()) {
    const std::size_t comma = s.find(',', start);
    const std::size_t end = comma == std::string::npos ? s.size() : comma;
    if (end > start) out.push_back(s.substr(start, end - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace detail

/// `cb` as a file saved with `storage` holds it, and load_codebooks returns it: unchanged for F32,
/// every centroid rounded to fp16 for F16. Throws, naming the codebook, the index and the value,
/// for a centroid beyond fp16's range (save_codebooks refuses it for the same reason).
inline Codebook stored_codebook(const Codebook& cb, CodebookStorage storage, std::string_view name) {
  if (storage == CodebookStorage::f32) return cb;
  const std::vector<std::uint16_t> h =
      detail::to_f16(cb.data(), cb.size(), [&] { return cq::detail::concat("codebook '", name, "'"); });
  std::vector<float> v(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) v[i] = static_cast<float>(Eigen::numext::bit_cast<half>(h[i]));
  Codebook out = cb;
  out.set_all(v.data());
  return out;
}

/// Serialises a set of codebooks (see the layout at the top of this file). Refuses metadata the
/// file records itself (format, cq_version, names, NAME.bits, ...) and, for F16 storage, a
/// centroid beyond fp16's range, so that every file it writes loads back as the set it was given.
inline std::vector<std::uint8_t> codebook_file_bytes(const CodebookSet& set, CodebookStorage storage = CodebookStorage::f32) {
  SafetensorsWriter w;
  for (const auto& [k, v] : set.metadata) {
    CQ_CHECK(!detail::is_codebook_file_key(k, set), "save_codebooks: metadata key '", k,
             "' is one the codebook file records itself");
    w.set_metadata(k, v);
  }
  w.set_metadata("format", codebook_format);
  w.set_metadata("cq_version", version_string);
  std::string names;
  for (const auto& entry : set.entries()) {
    const std::string& name = entry.first;  // (not a structured binding: the lambda below captures it)
    const Codebook& cb = entry.second;
    CQ_CHECK(!cb.empty(), "save_codebooks: codebook '", name, "' has no shape");
    names += (names.empty() ? "" : ",") + name;
    const FitInfo& fi = cb.info();
    w.set_metadata(name + ".channels", std::to_string(cb.channels()));
    w.set_metadata(name + ".bits", std::to_string(cb.bits()));
    w.set_metadata(name + ".dim", std::to_string(cb.dim()));
    w.set_metadata(name + ".method", fi.method);
    w.set_metadata(name + ".init", fi.init);
    w.set_metadata(name + ".dtype", fi.dtype);
    w.set_metadata(name + ".iterations", std::to_string(fi.iterations));
    w.set_metadata(name + ".calibration_rows", std::to_string(fi.calibration_rows));
    w.set_metadata(name + ".objective", detail::format_double(fi.objective));
    w.set_metadata(name + ".seed", std::to_string(fi.seed));
    const std::vector<std::uint64_t> shape{cb.groups(), cb.num_centroids(), cb.channels()};
    if (storage == CodebookStorage::f16) {
      const auto h = detail::to_f16(cb.data(), cb.size(),
                                    [&] { return cq::detail::concat("save_codebooks: codebook '", name, "'"); });
      w.add(name + ".centroids", DType::f16, shape, h.data(), h.size() * 2);
    } else {
      w.add_f32(name + ".centroids", shape, cb.data());
    }
  }
  w.set_metadata("names", names);
  return w.bytes();
}

/// Writes a codebook file atomically (temporary file, then rename).
inline void save_codebooks(const std::filesystem::path& path, const CodebookSet& set,
                           CodebookStorage storage = CodebookStorage::f32) {
  SafetensorsWriter::write_file_atomically(path, codebook_file_bytes(set, storage));
}

/// Reads every codebook of an opened file, checking each shape, dtype and value. The set's
/// metadata is the file's minus the keys the file records for itself.
inline CodebookSet load_codebooks(SafetensorsReader& r) {
  CQ_CHECK(detail::meta_or(r, "format", "") == codebook_format, r.name(), ": not a cq codebook file (format = '",
           detail::meta_or(r, "format", "<missing>"), "', expected '", codebook_format, "')");
  CodebookSet set;
  const std::vector<std::string> names = detail::split_names(r.meta("names"));  // none: an empty set
  for (const std::string& name : names) {
    CQ_CHECK(set.find(name) == nullptr, r.name(), ": the file lists codebook '", name, "' twice");
    const auto channels = detail::parse_meta_uint<std::size_t>(r, name + ".channels", SIZE_MAX);
    const auto bits = detail::parse_meta_uint<int>(r, name + ".bits", std::numeric_limits<int>::max());
    const auto dim = detail::parse_meta_uint<std::size_t>(r, name + ".dim", SIZE_MAX);
    const std::string what = r.name() + ": codebook '" + name + "'";
    check_cq_shape(dim, channels, bits, what.c_str());
    const std::string tname = name + ".centroids";
    const TensorInfo& t = r.get(tname);
    CQ_CHECK(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16, r.name(), ": tensor '", tname,
             "' has dtype ", dtype_name(t.dtype), ", expected F32, F16 or BF16");
    const std::vector<std::uint64_t> want{dim / channels, std::uint64_t{1} << bits, channels};
    CQ_CHECK(t.shape == want, r.name(), ": tensor '", tname, "' has shape ", detail::shape_string(t.shape),
             " that does not match (groups, centroids, channels) = (", want[0], ", ", want[1], ", ", want[2], ")");
    const std::vector<float> values = r.read_floats(t);
    for (std::size_t i = 0; i < values.size(); ++i)
      CQ_CHECK(std::isfinite(values[i]), r.name(), ": tensor '", tname, "' value ", i, " is not finite");
    Codebook cb(dim, channels, bits);
    cb.set_all(values.data());
    FitInfo& fi = cb.info();
    fi.method = detail::meta_or(r, name + ".method", "unknown");
    fi.init = detail::meta_or(r, name + ".init", "");
    fi.dtype = detail::meta_or(r, name + ".dtype", "F32");
    fi.iterations = detail::parse_meta_uint<std::uint32_t>(r, name + ".iterations", UINT32_MAX);
    fi.calibration_rows = detail::parse_meta_uint<std::uint64_t>(r, name + ".calibration_rows", UINT64_MAX);
    fi.seed = detail::parse_meta_uint<std::uint64_t>(r, name + ".seed", UINT64_MAX);
    fi.objective = detail::parse_meta_double(r, name + ".objective");
    if (fi.method == "none") fi.method = "unknown";  // a loaded codebook counts as fitted
    set.add(name, std::move(cb));
  }
  for (const auto& [k, v] : r.metadata())
    if (!detail::is_codebook_file_key(k, set)) set.metadata.emplace(k, v);
  return set;
}

inline CodebookSet load_codebooks(SafetensorsReader&& r) { return load_codebooks(r); }

inline CodebookSet load_codebooks(const std::filesystem::path& path) {
  SafetensorsReader r = SafetensorsReader::open(path);
  return load_codebooks(r);
}

/// One codebook, stored under the name "codebook".
inline void save_codebook(const std::filesystem::path& path, const Codebook& cb,
                          CodebookStorage storage = CodebookStorage::f32) {
  CodebookSet set;
  set.add("codebook", cb);
  save_codebooks(path, set, storage);
}

/// Loads a file written by save_codebook (or the only codebook of any codebook file).
inline Codebook load_codebook(const std::filesystem::path& path) {
  CodebookSet set = load_codebooks(path);
  CQ_CHECK(set.size() == 1, path.string(), ": holds ", set.size(), " codebooks; use load_codebooks to read them all");
  return set.entries().front().second;
}

}  // namespace cq::io
