#pragma once
/// NumPy .npy files (format versions 1.0, 2.0 and 3.0): a magic string, a header length, a Python
/// dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } and the raw data.
///
/// The reader takes the headers numpy.load takes, for every element type cq names (DType): descr
/// codes b1 u1 i1 u2 i2 u4 i4 u8 i8 f2 f4 f8 c8, and V2 read as bfloat16 (what NumPy writes for
/// ml_dtypes.bfloat16), in any byte order ('<', '>', '=', '|' or none); keys in any order, either
/// quote, any spacing, trailing commas, Python 2 `L` integer suffixes; C or Fortran order. Arrays
/// come back little-endian in C order (big-endian data is byte-swapped, Fortran order transposed).
/// Like the safetensors reader, every length and shape is checked before use; problems throw
/// cq::Error naming the file.

#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/io/safetensors.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace cq::io {

struct NpyArray {
  DType dtype = DType::f32;
  std::vector<std::uint64_t> shape;
  std::vector<std::uint8_t> bytes;  // raw little-endian data, C order
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

namespace detail {

struct NpyHeader {
  DType dtype = DType::f32;
  bool big_endian = false;
  bool fortran_order = false;
  std::vector<std::uint64_t> shape;
};

/// The DType of a descr's type code (the part after the byte-order character), if cq names one.
inline std::optional<DType> npy_dtype(std::string_view code) {
  static constexpr struct {
    std::string_view code;
    DType dtype;
  } table[] = {{"b1", DType::boolean}, {"u1", DType::u8},  {"i1", DType::i8},  {"u2", DType::u16}, {"i2", DType::i16},
               {"u4", DType::u32},     {"i4", DType::i32}, {"u8", DType::u64}, {"i8", DType::i64}, {"f2", DType::f16},
               {"f4", DType::f32},     {"f8", DType::f64}, {"c8", DType::c64}, {"V2", DType::bf16}};
  for (const auto& e : table)
    if (e.code == code) return e.dtype;
  return std::nullopt;
}

inline bool is_python_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/// Parses the header dict the way Python's literal parser reads it, for the three keys numpy
/// writes (and requires); a repeated key counts once, its last value winning, as in Python.
inline NpyHeader parse_npy_header(std::string_view h, const std::string& name) {
  auto fail = [&](const char* what) { cq::detail::fail(name, ": bad .npy header (", what, ")"); };
  std::size_t i = 0;
  auto skip_space = [&] {
    while (i < h.size() && is_python_space(h[i])) ++i;
  };
  auto at = [&](char c) { return i < h.size() && h[i] == c; };
  auto quoted = [&](const char* what) {  // a '...' or "..." string
    if (!at('\'') && !at('"')) fail(what);
    const std::size_t end = h.find(h[i], i + 1);
    if (end == std::string_view::npos) fail("unterminated string");
    const std::string_view s = h.substr(i + 1, end - i - 1);
    i = end + 1;
    return s;
  };
  NpyHeader out;
  bool have_descr = false, have_order = false, have_shape = false;
  skip_space();
  if (!at('{')) fail("no dict");
  ++i;
  for (;;) {
    skip_space();
    if (at('}')) break;
    const std::string_view key = quoted("expected a quoted key");
    skip_space();
    if (!at(':')) fail("expected ':'");
    ++i;
    skip_space();
    if (key == "descr") {
      if (at('[')) cq::detail::fail(name, ": structured .npy dtypes are not supported");
      const std::string_view descr = quoted("descr is not a string");
      std::string_view code = descr;
      const char order = code.empty() ? '\0' : code.front();
      if (order == '<' || order == '>' || order == '=' || order == '|') code.remove_prefix(1);
      const auto dtype = npy_dtype(code);
      if (!dtype)
        cq::detail::fail(name, ": unsupported .npy dtype '", descr,
                         "' (cq reads b1, u1, i1, u2, i2, u4, i4, u8, i8, f2, f4, f8, c8 and bfloat16 as V2)");
      out.dtype = *dtype;
      out.big_endian = order == '>';
      have_descr = true;
    } else if (key == "fortran_order") {
      if (h.substr(i, 5) == "False") i += 5, out.fortran_order = false;
      else if (h.substr(i, 4) == "True") i += 4, out.fortran_order = true;
      else fail("fortran_order is not a bool");
      have_order = true;
    } else if (key == "shape") {
      if (!at('(')) fail("shape is not a tuple");
      ++i;
      out.shape.clear();
      for (;;) {
        skip_space();
        if (at(')')) {
          ++i;
          break;
        }
        std::uint64_t v = 0;
        const std::size_t start = i;
        while (i < h.size() && h[i] >= '0' && h[i] <= '9') {
          if (v > (UINT64_MAX - 9) / 10) fail("dimension overflows");
          v = v * 10 + static_cast<std::uint64_t>(h[i] - '0');
          ++i;
        }
        if (i == start) fail("dimension is not a non-negative integer");
        if (at('L')) ++i;  // Python 2's long integers
        out.shape.push_back(v);
        skip_space();
        if (at(',')) ++i;
        else if (!at(')')) fail("expected ',' or ')' in shape");
      }
      have_shape = true;
    } else {
      fail("unknown key");
    }
    skip_space();
    if (at(',')) ++i;
    else if (!at('}')) fail("expected ',' or '}'");
  }
  if (!have_descr || !have_order || !have_shape) fail("descr, fortran_order or shape missing");
  return out;
}

/// Reverses the byte order of each `unit`-byte component.
inline void swap_bytes(std::vector<std::uint8_t>& bytes, std::size_t unit) {
  for (auto p = bytes.begin(); bytes.end() - p >= static_cast<std::ptrdiff_t>(unit); p += static_cast<std::ptrdiff_t>(unit))
    std::reverse(p, p + static_cast<std::ptrdiff_t>(unit));
}

/// A Fortran-order array (first index fastest) reordered into C order (last index fastest).
inline std::vector<std::uint8_t> fortran_to_c(const std::vector<std::uint8_t>& src,
                                              const std::vector<std::uint64_t>& shape, std::size_t elem) {
  std::vector<std::uint8_t> out(src.size());
  const std::size_t n = elem ? src.size() / elem : 0;
  if (n == 0) return out;
  std::vector<std::size_t> fstride(shape.size()), idx(shape.size(), 0);
  std::size_t s = 1;
  for (std::size_t k = 0; k < shape.size(); ++k) fstride[k] = s, s *= static_cast<std::size_t>(shape[k]);
  std::size_t f = 0;  // Fortran position of idx
  for (std::size_t c = 0; c < n; ++c) {
    std::memcpy(out.data() + c * elem, src.data() + f * elem, elem);
    for (std::size_t k = shape.size(); k-- > 0;) {  // next idx in C order, f in step
      if (++idx[k] < shape[k]) {
        f += fstride[k];
        break;
      }
      f -= fstride[k] * (shape[k] - 1);
      idx[k] = 0;
    }
  }
  return out;
}

}  // namespace detail

/// Parses a whole .npy file held in memory.
inline NpyArray parse_npy(const std::vector<std::uint8_t>& file, const std::string& name = "<memory>") {
  static constexpr unsigned char magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  CQ_CHECK(file.size() >= 10 && std::memcmp(file.data(), magic, 6) == 0, name, ": not a .npy file (bad magic)");
  const unsigned major = file[6];
  CQ_CHECK(major >= 1 && major <= 3, name, ": unsupported .npy format version ", major);
  std::uint64_t hlen = 0, hstart = 0;
  if (major == 1) {
    hlen = file[8] | (std::uint64_t{file[9]} << 8);
    hstart = 10;
  } else {
    CQ_CHECK(file.size() >= 12, name, ": truncated .npy header");
    hlen = file[8] | (std::uint64_t{file[9]} << 8) | (std::uint64_t{file[10]} << 16) | (std::uint64_t{file[11]} << 24);
    hstart = 12;
  }
  CQ_CHECK(hlen <= file.size() - hstart, name, ": .npy header length ", hlen, " runs past the end of the ",
           file.size(), "-byte file");
  detail::NpyHeader h = detail::parse_npy_header(
      std::string_view(reinterpret_cast<const char*>(file.data() + hstart), static_cast<std::size_t>(hlen)), name);
  const std::uint64_t bytes = detail::tensor_bytes(h.dtype, h.shape, [&] { return name + ": .npy array"; });
  const std::uint64_t data_start = hstart + hlen;
  CQ_CHECK(file.size() - data_start == bytes, name, ": .npy data is ", file.size() - data_start,
           " bytes but its dtype and shape need ", bytes);
  NpyArray out;
  out.dtype = h.dtype;
  out.shape = std::move(h.shape);
  out.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(data_start), file.end());
  if (h.big_endian) detail::swap_bytes(out.bytes, out.dtype == DType::c64 ? 4 : dtype_size(out.dtype));
  if (h.fortran_order) out.bytes = detail::fortran_to_c(out.bytes, out.shape, dtype_size(out.dtype));
  return out;
}

inline std::vector<std::uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  CQ_CHECK(!ec, path.string(), ": cannot read file (", ec.message(), ")");
  std::ifstream in(path, std::ios::binary);
  CQ_CHECK(in.good(), path.string(), ": cannot open file");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  CQ_CHECK(in.good() || size == 0, path.string(), ": read failed");
  return bytes;
}

inline NpyArray load_npy(const std::filesystem::path& path) { return parse_npy(read_file_bytes(path), path.string()); }

/// The elements of a floating-point array (F32, F16, BF16 or F64) as floats; an array of any other
/// dtype throws naming `name` and the dtype.
inline std::vector<float> npy_floats(const NpyArray& a, std::string_view name) {
  CQ_CHECK(detail::is_float_dtype(a.dtype), name, ": .npy array has dtype ", dtype_name(a.dtype),
           ", expected a float type (float32, float16, bfloat16 or float64)");
  std::vector<float> out(static_cast<std::size_t>(a.numel()));
  detail::floats_from_bytes(a.dtype, a.bytes.data(), out.size(), out.data());
  return out;
}

/// A C-order float32 array as the bytes of a .npy file: version 1.0, or 2.0 when the header needs
/// more than 64 KiB (as NumPy does), the header padded so the data starts 64-byte aligned.
inline std::vector<std::uint8_t> npy_bytes_f32(const std::vector<std::uint64_t>& shape, const float* data) {
  const std::uint64_t bytes = detail::tensor_bytes(DType::f32, shape, [] { return std::string("save_npy_f32"); });
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    header += std::to_string(shape[i]);
    header += shape.size() == 1 || i + 1 < shape.size() ? "," : "";
    if (i + 1 < shape.size()) header += ' ';
  }
  header += "), }";
  const bool v1 = header.size() + 64 <= 65535;  // the padded header's length fits 16 bits
  const std::size_t prefix = v1 ? 10 : 12;
  while ((prefix + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::vector<std::uint8_t> out(prefix + header.size() + static_cast<std::size_t>(bytes));
  const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(v1 ? 1 : 2), 0};
  std::memcpy(out.data(), magic, 8);
  for (std::size_t b = 0; b < prefix - 8; ++b) out[8 + b] = static_cast<std::uint8_t>(header.size() >> (8 * b));
  std::memcpy(out.data() + prefix, header.data(), header.size());
  if (bytes) std::memcpy(out.data() + prefix + header.size(), data, static_cast<std::size_t>(bytes));
  return out;
}

/// Writes a C-order float32 array as .npy, atomically.
inline void save_npy_f32(const std::filesystem::path& path, const std::vector<std::uint64_t>& shape, const float* data) {
  SafetensorsWriter::write_file_atomically(path, npy_bytes_f32(shape, data));
}

}  // namespace cq::io
