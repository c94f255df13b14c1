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
  // Every dtype the format defines, in one file (8 elements: whole bytes for F4 and F6 too).
  {
    cq::io::SafetensorsWriter w;
    const std::vector<std::uint8_t> zeros(64, 0);
    for (cq::DType d : cq::all_dtypes) w.add(std::string(cq::dtype_name(d)), d, {8}, zeros.data(), cq::dtype_bits(d));
    put(root / "safetensors" / "every_dtype.safetensors", w.bytes());
  }
  put(root / "safetensors" / "f4_odd.safetensors", st(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2));
  put(root / "safetensors" / "f8_scale.safetensors",
      st(R"({"k":{"dtype":"F32","shape":[1,1,1,2],"data_offsets":[0,8]},"k_scale":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[8,9]}})", 9));
  // Headers with many keys: tensors, and metadata.
  {
    cq::io::SafetensorsWriter w;
    for (int i = 0; i < 300; ++i) w.add("t" + std::to_string(i), cq::DType::u8, {1}, "x", 1);
    for (int i = 0; i < 300; ++i) w.set_metadata("m" + std::to_string(i), std::to_string(i));
    put(root / "safetensors" / "many_keys.safetensors", w.bytes());
  }
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
  // Headers numpy reads: other dtypes and byte orders, Fortran order, double quotes, Python 2
  // longs, version 3, a repeated key; and a structured dtype cq refuses.
  auto npy1 = [](const std::string& dict, const std::string& data) {
    std::string hd = dict;
    while ((10 + hd.size() + 1) % 64) hd += ' ';
    hd += '\n';
    return std::string("\x93NUMPY\x01\x00", 8) + char(hd.size()) + '\0' + hd + data;
  };
  put(root / "npy" / "big_endian_f4.npy", npy1("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", std::string("\x3f\x80\0\0\x40\0\0\0", 8)));
  put(root / "npy" / "u1.npy", npy1("{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", "abc"));
  put(root / "npy" / "b1.npy", npy1("{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }", std::string("\1\0", 2)));
  put(root / "npy" / "c8.npy", npy1("{'descr': '>c8', 'fortran_order': False, 'shape': (1,), }", std::string(8, '\x3f')));
  put(root / "npy" / "fortran_2x3.npy", npy1("{'descr': '<i2', 'fortran_order': True, 'shape': (2, 3), }", "aabbccddeeff"));
  put(root / "npy" / "double_quotes_long.npy", npy1("{\"shape\": (2L, 1L), \"descr\": \"<f4\", \"fortran_order\": False}", std::string(8, '\x3f')));
  put(root / "npy" / "repeated_key.npy", npy1("{'descr': '<f4', 'shape': (9,), 'fortran_order': False, 'shape': (1,)}", "abcd"));
  put(root / "npy" / "structured.npy", npy1("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", "abcd"));
  {
    std::string hd = "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }";
    while ((12 + hd.size() + 1) % 64) hd += ' ';
    hd += '\n';
    put(root / "npy" / "v3_f8.npy", std::string("\x93NUMPY\x03\x00", 8) + char(hd.size()) + std::string(3, '\0') + hd + std::string(8, '\x3f'));
  }
  put(root / "npy" / "bad_magic.npy", "NUMPY not really");
  put(root / "npy" / "overflow.npy", std::string("\x93NUMPY\x01\x00", 8) + "\x46\x00" + "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }");
  put(root / "json" / "header.json", R"({"__metadata__":{"k":"v\u00e9"},"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})");
  put(root / "json" / "config.json", R"({"default":{"channels":8,"bits":8},"layers":{"3":{"k":{"bits":10}}}})");
  put(root / "json" / "deep.json", std::string(40, '[') + std::string(40, ']'));
  put(root / "json" / "escapes.json", R"("\ud83d\ude00\n\t\"\\")");
  {
    std::string many = "{";
    for (int i = 0; i < 500; ++i) many += (i ? ",\"k" : "\"k") + std::to_string(i) + "\":" + std::to_string(i);
    put(root / "json" / "many_keys.json", many + "}");
    put(root / "json" / "many_keys_duplicate.json", many + ",\"k7\":0}");
  }
  std::printf("wrote seed corpora under %s\n", root.string().c_str());
  return 0;
}
