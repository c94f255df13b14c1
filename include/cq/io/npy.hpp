#pragma once
/// NumPy .npy files (format versions 1.0, 2.0 and 3.0): a magic string, a header length, a Python
/// dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } and the raw data.
///
/// Supported element types: '<f4' (F32), '<f2' (F16), '<f8' (F64), and '<V2' read as bfloat16
/// (what NumPy writes for ml_dtypes.bfloat16 arrays). Only C order. Like the safetensors reader,
/// every length and shape is checked before use; problems throw cq::Error naming the file.

#include "cq/element.hpp"
#include "cq/error.hpp"
#include "cq/io/safetensors.hpp"

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
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

inline void skip_space(std::string_view s, std::size_t& i) {
  while (i < s.size() && (s[i] == ' ' || s[i] == '\n')) ++i;
}

/// Parses the header dict; tolerant of key order and spacing, strict about everything else.
inline void parse_npy_header(std::string_view h, const std::string& name, NpyArray& out) {
  auto fail = [&](const char* what) { cq::detail::fail(name, ": bad .npy header (", what, ")"); };
  std::size_t i = 0;
  skip_space(h, i);
  if (i >= h.size() || h[i] != '{') fail("no dict");
  ++i;
  bool have_descr = false, have_order = false, have_shape = false;
  for (;;) {
    skip_space(h, i);
    if (i < h.size() && h[i] == '}') break;
    if (i >= h.size() || h[i] != '\'') fail("expected a quoted key");
    const std::size_t kend = h.find('\'', i + 1);
    if (kend == std::string_view::npos) fail("unterminated key");
    const std::string_view key = h.substr(i + 1, kend - i - 1);
    i = kend + 1;
    skip_space(h, i);
    if (i >= h.size() || h[i] != ':') fail("expected ':'");
    ++i;
    skip_space(h, i);
    if (key == "descr") {
      if (i >= h.size() || h[i] != '\'') fail("descr is not a string");
      const std::size_t e = h.find('\'', i + 1);
      if (e == std::string_view::npos) fail("unterminated descr");
      const std::string_view d = h.substr(i + 1, e - i - 1);
      if (d == "<f4") out.dtype = DType::f32;
      else if (d == "<f2") out.dtype = DType::f16;
      else if (d == "<f8") out.dtype = DType::f64;
      else if (d == "<V2" || d == "|V2") out.dtype = DType::bf16;
      else cq::detail::fail(name, ": unsupported .npy dtype '", d, "' (expected <f4, <f2, <f8 or bfloat16 as <V2)");
      i = e + 1;
      have_descr = true;
    } else if (key == "fortran_order") {
      if (h.substr(i, 5) == "False") i += 5;
      else if (h.substr(i, 4) == "True") cq::detail::fail(name, ": Fortran-ordered .npy arrays are not supported");
      else fail("fortran_order is not a bool");
      have_order = true;
    } else if (key == "shape") {
      if (i >= h.size() || h[i] != '(') fail("shape is not a tuple");
      ++i;
      for (;;) {
        skip_space(h, i);
        if (i < h.size() && h[i] == ')') {
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
        if (out.shape.size() >= 8) fail("rank above 8");
        out.shape.push_back(v);
        skip_space(h, i);
        if (i < h.size() && h[i] == ',') ++i;
        else if (i >= h.size() || h[i] != ')') fail("expected ',' or ')' in shape");
      }
      have_shape = true;
    } else {
      fail("unknown key");
    }
    skip_space(h, i);
    if (i < h.size() && h[i] == ',') ++i;
    else if (i >= h.size() || h[i] != '}') fail("expected ',' or '}'");
  }
  if (!have_descr || !have_order || !have_shape) fail("descr, fortran_order or shape missing");
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
  NpyArray out;
  detail::parse_npy_header(
      std::string_view(reinterpret_cast<const char*>(file.data() + hstart), static_cast<std::size_t>(hlen)), name, out);
  std::uint64_t bytes = dtype_size(out.dtype);
  for (auto d : out.shape) {
    CQ_CHECK(d == 0 || bytes <= UINT64_MAX / d, name, ": .npy shape product overflows");
    bytes *= d;
  }
  const std::uint64_t data_start = hstart + hlen;
  CQ_CHECK(file.size() - data_start == bytes, name, ": .npy data is ", file.size() - data_start,
           " bytes but its dtype and shape need ", bytes);
  out.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(data_start), file.end());
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

/// Element i of a float array of any supported dtype, as float.
inline float npy_float(const NpyArray& a, std::size_t i) {
  const std::uint8_t* p = a.bytes.data();
  switch (a.dtype) {
    case DType::f32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::f64: {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      return static_cast<float>(d);
    }
    case DType::f16: {
      std::uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      return static_cast<float>(Eigen::numext::bit_cast<half>(b));
    }
    case DType::bf16: {
      std::uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
    }
    default: return 0.0f;
  }
}

/// Writes a C-order float32 array as .npy (version 1.0), atomically.
inline void save_npy_f32(const std::filesystem::path& path, const std::vector<std::uint64_t>& shape, const float* data) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  std::uint64_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    header += std::to_string(shape[i]);
    header += shape.size() == 1 || i + 1 < shape.size() ? "," : "";
    if (i + 1 < shape.size()) header += ' ';
    n *= shape[i];
  }
  header += "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::vector<std::uint8_t> out(10 + header.size() + n * 4);
  const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  std::memcpy(out.data(), magic, 8);
  out[8] = static_cast<std::uint8_t>(header.size());
  out[9] = static_cast<std::uint8_t>(header.size() >> 8);
  std::memcpy(out.data() + 10, header.data(), header.size());
  if (n) std::memcpy(out.data() + 10 + header.size(), data, n * 4);
  SafetensorsWriter::write_file_atomically(path, out);
}

}  // namespace cq::io
