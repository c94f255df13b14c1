// Tests of the cq-calibrate tool, run as a subprocess: its output reproduces the library's own fit
// bit-exactly, .npy and safetensors inputs agree, and every error exits non-zero with a message
// and leaves no output file behind.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <cq/cq.hpp>

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;

namespace {

constexpr std::size_t L = 2, H = 2, N = 300, D = 16;

fs::path scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("cq_calibrate_test_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

std::vector<float> dump(std::uint64_t seed) {
  std::vector<float> x;
  for (std::size_t i = 0; i < L * H; ++i) {
    const auto part = cq::synthetic_kv(N, D, {.rank = 4, .seed = seed + i});
    x.insert(x.end(), part.begin(), part.end());
  }
  return x;
}

struct Run {
  int status;
  std::string err;
};
Run run(const std::string& args) {
  const fs::path err = scratch() / "stderr.txt";
  const std::string cmd = std::string(CQ_CALIBRATE_PATH) + " " + args + " > " + (scratch() / "stdout.txt").string() +
                          " 2> " + err.string();
  const int rc = std::system(cmd.c_str());
  std::ifstream in(err);
  std::stringstream ss;
  ss << in.rdbuf();
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str()};
}

struct Files {
  fs::path k, v, gk, gv;
  std::vector<float> kd, vd, gkd, gvd;
};
const Files& files() {
  static const Files made = [] {
    Files f;
    f.kd = dump(1);
    f.vd = dump(100);
    f.gkd = dump(200);
    f.gvd = dump(300);
    for (auto* g : {&f.gkd, &f.gvd})
      for (auto& x : *g) x = x * x;  // squared gradients are non-negative
    const std::vector<std::uint64_t> shape{L, H, N, D};
    f.k = scratch() / "k.npy";
    f.v = scratch() / "v.npy";
    f.gk = scratch() / "gk.npy";
    f.gv = scratch() / "gv.npy";
    cq::io::save_npy_f32(f.k, shape, f.kd.data());
    cq::io::save_npy_f32(f.v, shape, f.vd.data());
    cq::io::save_npy_f32(f.gk, shape, f.gkd.data());
    cq::io::save_npy_f32(f.gv, shape, f.gvd.data());
    return f;
  }();
  return made;
}

const std::string common = " --channels 4 --bits 5 --iterations 7 --seed 99 --quiet ";

}  // namespace

TEST_CASE("cq-calibrate reproduces the library's fit bit-exactly, uniform and Fisher") {
  const Files& f = files();
  for (bool fisher : {false, true}) {
    const fs::path out = scratch() / (fisher ? "fisher.safetensors" : "uniform.safetensors");
    std::string args = "--keys " + f.k.string() + " --values " + f.v.string() + common + "--out " + out.string();
    if (fisher) args += " --method fisher --key-grads " + f.gk.string() + " --value-grads " + f.gv.string();
    const Run r = run(args);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const cq::io::CodebookSet set = cq::io::load_codebooks(out);
    CHECK(set.size() == L * 2 * H);
    CHECK(set.metadata.at("kv.layers") == "2");
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t h = 0; h < H; ++h)
        for (bool value : {false, true}) {
          const std::vector<float>& x = value ? f.vd : f.kd;
          const std::vector<float>& g = value ? f.gvd : f.gkd;
          const float* slice = x.data() + (l * H + h) * N * D;
          cq::Codebook cb(D, 4, 5);
          cq::FitOptions o;
          o.iterations = 7;
          o.seed = 99;
          if (fisher) {
            const auto w = cq::fisher_weights(cq::ConstMatrixView<float>(g.data() + (l * H + h) * N * D, N, D), 4);
            cq::fit_codebook(cb, cq::ConstMatrixView<float>(slice, N, D), cq::ConstMatrixView<float>(w.data(), N, D / 4), o);
          } else {
            cq::fit_codebook(cb, cq::ConstMatrixView<float>(slice, N, D), {}, o);
          }
          const cq::Codebook* got = set.find(cq::io::kv_codebook_name(l, value, h));
          REQUIRE(got != nullptr);
          CHECK(*got == cb);
          CHECK(got->info().method == (fisher ? "fisher-kmeans" : "kmeans"));
        }
  }
}

TEST_CASE("cq-calibrate: .npy, safetensors and layer-sharded inputs give identical codebooks") {
  const Files& f = files();
  const fs::path st = scratch() / "kv.safetensors";
  {
    cq::io::SafetensorsWriter w;
    w.add_f32("keys", {L, H, N, D}, f.kd.data());
    w.add_f32("values", {L, H, N, D}, f.vd.data());
    w.write(st);
  }
  // Shards: layer 0 and layer 1 of the keys in separate files.
  const fs::path k0 = scratch() / "k0.npy", k1 = scratch() / "k1.npy";
  cq::io::save_npy_f32(k0, {1, H, N, D}, f.kd.data());
  cq::io::save_npy_f32(k1, {1, H, N, D}, f.kd.data() + H * N * D);
  const fs::path a = scratch() / "a.safetensors", b = scratch() / "b.safetensors", c = scratch() / "c.safetensors";
  REQUIRE(run("--keys " + f.k.string() + " --values " + f.v.string() + common + "--out " + a.string()).status == 0);
  REQUIRE(run("--keys " + st.string() + ":keys --values " + st.string() + ":values" + common + "--out " + b.string()).status == 0);
  REQUIRE(run("--keys " + k0.string() + "," + k1.string() + " --values " + f.v.string() + common + "--out " + c.string()).status == 0);
  const auto sa = cq::io::load_codebooks(a), sb = cq::io::load_codebooks(b), sc = cq::io::load_codebooks(c);
  for (std::size_t i = 0; i < sa.size(); ++i) {
    CHECK(sa.entries()[i].second == sb.entries()[i].second);
    CHECK(sa.entries()[i].second == sc.entries()[i].second);
  }
}

TEST_CASE("cq-calibrate: per-layer configuration from a JSON file") {
  const Files& f = files();
  const fs::path cfg = scratch() / "config.json", out = scratch() / "config.safetensors";
  std::ofstream(cfg) << R"({"default": {"channels": 8, "bits": 4, "iterations": 3},
                           "layers": {"1": {"v": {"channels": 2, "bits": 6}}}})";
  const Run r = run("--keys " + f.k.string() + " --values " + f.v.string() + " --config " + cfg.string() +
                    " --quiet --out " + out.string());
  REQUIRE_MESSAGE(r.status == 0, r.err);
  const auto set = cq::io::load_codebooks(out);
  CHECK(set.find("layer.0.v.head.1")->channels() == 8);
  CHECK(set.find("layer.1.k.head.0")->bits() == 4);
  CHECK(set.find("layer.1.v.head.1")->channels() == 2);
  CHECK(set.find("layer.1.v.head.1")->bits() == 6);
  const cq::KVCacheConfig kc = cq::io::kv_cache_config(set);
  CHECK(kc.layer_spec(1).value.bits == 6);
}

TEST_CASE("cq-calibrate: every error exits non-zero with its message and leaves no output file") {
  const Files& f = files();
  const fs::path out = scratch() / "never.safetensors";
  const fs::path short_v = scratch() / "short_v.npy", nan_k = scratch() / "nan_k.npy", bad_cfg = scratch() / "bad.json",
                 json_err = scratch() / "syntax.json";
  cq::io::save_npy_f32(short_v, {L, H, N - 1, D}, f.vd.data());
  auto nan = f.kd;
  nan[(1 * H + 0) * N * D + 5 * D + 3] = std::numeric_limits<float>::quiet_NaN();
  cq::io::save_npy_f32(nan_k, {L, H, N, D}, nan.data());
  std::ofstream(bad_cfg) << R"({"layers": {"5": {"k": {"bits": 4}}}})";
  std::ofstream(json_err) << R"({"default": {"bits": 4,}})";
  std::ofstream(scratch() / "garbage.npy") << "not numpy";
  const std::string kv = "--keys " + f.k.string() + " --values " + f.v.string();
  const struct {
    std::string args, message;
  } cases[] = {
      {"--keys " + (scratch() / "missing.npy").string() + " --values " + f.v.string(), "missing.npy: cannot read file"},
      {"--keys " + (scratch() / "garbage.npy").string() + " --values " + f.v.string(), "garbage.npy: not a .npy file"},
      {"--keys " + f.k.string() + " --values " + short_v.string(), "short_v.npy: shape [2, 2, 299, 16] differs from the keys' [2, 2, 300, 16]"},
      {"--keys " + nan_k.string() + " --values " + f.v.string(), "nan_k.npy: layer 1 head 0 keys: cq: fit: x(5, 3) = nan is not finite"},
      {kv + " --key-grads " + short_v.string(), "short_v.npy: gradient shape differs"},
      {kv + " --method fisher --value-grads " + f.gv.string(), "layer 0 keys use the fisher method but no --key-grads were given"},
      {kv + " --config " + bad_cfg.string(), "configures layer 5 but the dumps hold 2 layers"},
      {kv + " --config " + json_err.string(), "syntax.json"},
      {kv + " --channels 5", "dim 16 is not a multiple of channels per group 5"},
      {kv + " --bits 12", "300 calibration tokens are fewer than the 4096 centroids"},
      {kv + " --bits x", "--bits expects a non-negative integer, got 'x'"},
      {kv + " --storage f8", "--storage must be f32 or f16"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = run(c.args + " --quiet --out " + out.string());
    CHECK(r.status == 1);
    CHECK_MESSAGE(r.err.find(c.message) != std::string::npos, r.err);
    CHECK(r.err.find("cq-calibrate: error: ") == 0);
    CHECK(!fs::exists(out));
    CHECK(!fs::exists(out.string() + ".tmp"));
  }
  CHECK(run("--keys " + f.k.string()).status == 2);  // usage
  CHECK(!fs::exists(out));
}
