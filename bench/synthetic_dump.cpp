// Writes a synthetic KV activation dump for cq-calibrate benchmarks: K and V .npy files of shape
// [layers][kv_heads][tokens][head_dim] in float16, each (layer, head) slice KV-like
// (cq::synthetic_kv with its own seed).
//
//   cq_synthetic_dump OUT_DIR [layers=32] [kv_heads=32] [tokens=4096] [head_dim=128]
//   (the defaults are LLaMA-7B-sized: 2 x 1 GiB)

#include <cq/cq.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR [layers kv_heads tokens head_dim]\n", argv[0]);
    return 2;
  }
  const std::filesystem::path out = argv[1];
  auto arg = [&](int i, std::size_t d) { return argc > i ? std::strtoul(argv[i], nullptr, 10) : d; };
  const std::size_t L = arg(2, 32), H = arg(3, 32), N = arg(4, 4096), D = arg(5, 128);
  std::filesystem::create_directories(out);
  for (const char* name : {"k", "v"}) {
    const auto path = out / (std::string(name) + ".npy");
    std::ofstream f(path, std::ios::binary);
    std::string header = "{'descr': '<f2', 'fortran_order': False, 'shape': (" + std::to_string(L) + ", " +
                         std::to_string(H) + ", " + std::to_string(N) + ", " + std::to_string(D) + "), }";
    while ((10 + header.size() + 1) % 64 != 0) header += ' ';
    header += '\n';
    const unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(header.size()),
                                   static_cast<unsigned char>(header.size() >> 8)};
    f.write(reinterpret_cast<const char*>(pre), 10);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t h = 0; h < H; ++h) {
        const auto x = cq::synthetic_kv(N, D, {.seed = (name[0] == 'v' ? 1000000u : 0u) + l * H + h});
        std::vector<cq::half> hx(x.begin(), x.end());
        f.write(reinterpret_cast<const char*>(hx.data()), static_cast<std::streamsize>(hx.size() * 2));
      }
    std::printf("wrote %s\n", path.string().c_str());
  }
  return 0;
}
