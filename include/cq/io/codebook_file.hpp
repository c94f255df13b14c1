#pragma once
/// Codebook files: one or more named codebooks in a safetensors file.
///
/// For each codebook named `name` the file holds the tensor `name.centroids`, shape
/// (groups, num_centroids, channels), F32 (or F16 when saved compact), and string metadata
/// `name.channels`, `name.bits`, `name.dim`, `name.method`, `name.init`, `name.dtype`,
/// `name.iterations`, `name.calibration_rows`, `name.objective`, `name.seed`. File-wide metadata:
/// `format` = "cq-codebooks", `cq_version`, `names` (comma-separated, in order), plus whatever the
/// writer adds (a KV cache records its layer and head layout there).

#include "cq/codebook.hpp"
#include "cq/error.hpp"
#include "cq/io/safetensors.hpp"
#include "cq/version.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace cq::io {

inline constexpr const char* codebook_format = "cq-codebooks";

/// Named codebooks plus file-wide metadata.
struct CodebookSet {
  std::vector<std::pair<std::string, Codebook>> entries;
  std::map<std::string, std::string> metadata;

  const Codebook* find(std::string_view name) const {
    for (const auto& [n, cb] : entries)
      if (n == name) return &cb;
    return nullptr;
  }
};

namespace detail {

inline std::string format_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
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

enum class CodebookStorage { f32, f16 };

/// Serialises a set of codebooks (see the layout at the top of this file).
inline std::vector<std::uint8_t> codebook_file_bytes(const CodebookSet& set, CodebookStorage storage = CodebookStorage::f32) {
  SafetensorsWriter w;
  for (const auto& [k, v] : set.metadata) w.set_metadata(k, v);
  w.set_metadata("format", codebook_format);
  w.set_metadata("cq_version", version_string);
  std::string names;
  for (const auto& [name, cb] : set.entries) {
    CQ_CHECK(!name.empty() && name.find(',') == std::string::npos, "save_codebooks: codebook name '", name,
             "' must be non-empty and contain no comma");
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
    if (storage == CodebookStorage::f16) w.add_f16(name + ".centroids", shape, cb.data());
    else w.add_f32(name + ".centroids", shape, cb.data());
  }
  w.set_metadata("names", names);
  return w.bytes();
}

/// Writes a codebook file atomically (temporary file, then rename).
inline void save_codebooks(const std::filesystem::path& path, const CodebookSet& set,
                           CodebookStorage storage = CodebookStorage::f32) {
  SafetensorsWriter::write_file_atomically(path, codebook_file_bytes(set, storage));
}

/// Reads every codebook of an opened file, checking each shape, dtype and value.
inline CodebookSet load_codebooks(SafetensorsReader& r) {
  CQ_CHECK(detail::meta_or(r, "format", "") == codebook_format, r.name(), ": not a cq codebook file (format = '",
           detail::meta_or(r, "format", "<missing>"), "', expected '", codebook_format, "')");
  CodebookSet set;
  set.metadata = r.metadata();
  const std::vector<std::string> names = detail::split_names(r.meta("names"));
  CQ_CHECK(!names.empty(), r.name(), ": the file lists no codebooks");
  for (const std::string& name : names) {
    const auto channels = detail::parse_meta_uint<std::size_t>(r, name + ".channels", std::size_t{1} << 20);
    const auto bits = detail::parse_meta_uint<int>(r, name + ".bits", 16);
    const auto dim = detail::parse_meta_uint<std::size_t>(r, name + ".dim", std::size_t{1} << 24);
    CQ_CHECK(bits >= 1 && channels >= 1 && dim >= 1 && dim % channels == 0, r.name(), ": codebook '", name,
             "' has an invalid shape (dim ", dim, ", channels ", channels, ", bits ", bits, ")");
    const std::string tname = name + ".centroids";
    const TensorInfo& t = r.get(tname);
    CQ_CHECK(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16, r.name(), ": tensor '", tname,
             "' has dtype ", dtype_name(t.dtype), ", expected F32, F16 or BF16");
    const std::vector<std::uint64_t> want{dim / channels, std::uint64_t{1} << bits, channels};
    CQ_CHECK(t.shape == want, r.name(), ": tensor '", tname, "' has shape of rank ", t.shape.size(),
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
    set.entries.emplace_back(name, std::move(cb));
  }
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
  set.entries.emplace_back("codebook", cb);
  save_codebooks(path, set, storage);
}

/// Loads a file written by save_codebook (or the only codebook of any codebook file).
inline Codebook load_codebook(const std::filesystem::path& path) {
  CodebookSet set = load_codebooks(path);
  CQ_CHECK(set.entries.size() == 1, path.string(), ": holds ", set.entries.size(),
           " codebooks; use load_codebooks to read them all");
  return std::move(set.entries.front().second);
}

}  // namespace cq::io
