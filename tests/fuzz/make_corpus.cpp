// Writes the fuzzers' seed corpora: valid files and hand-made broken ones (truncated, lying
// header lengths, offsets past the end, wrong dtypes, shapes whose product overflows, ...).
//   cq_fuzz_corpus OUT_DIR      -> OUT_DIR/{safetensors,npy,json}/
#include <cq/cq.hpp>

#include <cstdio>
#include <fstream>
#include <string>

namespace {

void put(const std::filesystem::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}
void put(const std::filesystem::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

std::vector<std::uint8_t> st(const std::string& header, std::size_t data_bytes, std::uint64_t claimed = 0) {
  std::vector<std::uint8_t> out(8 + header.size() + data_bytes, 0x3f);
  const std::uint64_t n = claimed ? claimed : header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::filesystem::path root = argv[1];
  for (const char* d : {"safetensors", "npy", "json"}) std::filesystem::create_directories(root / d);
  // Valid codebook files: one codebook, and a KV set.
  const auto x = cq::synthetic_kv(300, 16);
  cq::Codebook cb(16, 4, 4);
  cq::FitOptions o;
  o.iterations = 3;
  cq::fit_codebook(cb, cq::ConstMatrixView<float>(x.data(), 300, 16), {}, o);
  cq::io::CodebookSet one;
  one.add("codebook", cb);
  const auto good = cq::io::codebook_file_bytes(one);
  put(root / "safetensors" / "codebook.safetensors", good);
  put(root / "safetensors" / "codebook_f16.safetensors", cq::io::codebook_file_bytes(one, cq::io::CodebookStorage::f16));
  cq::io::CodebookSet kv;
  kv.add("layer.0.k.head.0", cb);
  kv.add("layer.0.v.head.0", cb);
  cq::io::set_kv_layout(kv, 1, 1, 16);
  put(root / "safetensors" / "kv.safetensors", cq::io::codebook_file_bytes(kv));
  // Broken ones.
  put(root / "safetensors" / "truncated_header.safetensors", std::vector<std::uint8_t>(good.begin(), good.begin() + 40));
  put(root / "safetensors" / "truncated_data.safetensors", std::vector<std::uint8_t>(good.begin(), good.end() - 7));
  put(root / "safetensors" / "lying_length.safetensors", st("{}", 0, 1u << 20));
  put(root / "safetensors" / "huge_length.safetensors", st("{}", 0, ~0ull));
  put(root / "safetensors" / "offsets_past_end.safetensors", st(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
  put(root / "safetensors" / "wrong_dtype.safetensors", st(R"({"t":{"dtype":"Q8","shape":[4],"data_offsets":[0,4]}})", 4));
  put(root / "safetensors" / "overflow_shape.safetensors",
      st(R"({"t":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}})", 8));
  put(root / "safetensors" / "overlap.safetensors",
      st(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
  put(root / "safetensors" / "bad_meta.safetensors",
      st(R"({"__metadata__":{"format":"cq-codebooks","names":"a","a.bits":"99","a.channels":"4","a.dim":"16"},"a.centroids":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4));
  // .npy: valid v1 and v2, then broken.
  const std::vector<float> v{1, 2, 3, 4, 5, 6};
  const auto tmp = root / "npy" / "valid.npy";
  cq::io::save_npy_f32(tmp, {2, 3}, v.data());
  std::string h = "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }";
  while ((12 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::string v2 = std::string("\x93NUMPY\x02\x00", 8) + char(h.size()) + '\0' + '\0' + '\0' + h + std::string(8, '\x3c');
  put(root / "npy" / "valid_v2_f16.npy", v2);
  put(root / "npy" / "fortran.npy", std::string("\x93NUMPY\x01\x00", 8) + "\x40\x00" + "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }" + std::string(8, ' ') + "\nabcd");
  put(root / "npy" / "bad_magic.npy", "NUMPY not really");
  put(root / "npy" / "overflow.npy", std::string("\x93NUMPY\x01\x00", 8) + "\x46\x00" + "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }");
  put(root / "json" / "header.json", R"({"__metadata__":{"k":"v\u00e9"},"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})");
  put(root / "json" / "config.json", R"({"default":{"channels":8,"bits":8},"layers":{"3":{"k":{"bits":10}}}})");
  put(root / "json" / "deep.json", std::string(40, '[') + std::string(40, ']'));
  put(root / "json" / "escapes.json", R"("\ud83d\ude00\n\t\"\\")");
  std::printf("wrote seed corpora under %s\n", root.string().c_str());
  return 0;
}
