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

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Run {
  int status;
  std::string err, out;
};
// Runs the tool with stdout and stderr redirected to files (so stderr is not a terminal).
Run run(const std::string& args) {
  const fs::path out = scratch() / "stdout.txt", err = scratch() / "stderr.txt";
  // Every fit records how its keys were taken; tests that are not about that take post-RoPE keys.
  const bool about_rope = args.find("--key-rope") != std::string::npos || args.find("--help") != std::string::npos ||
                          args.find("--version") != std::string::npos;
  const std::string cmd = std::string(CQ_CALIBRATE_PATH) + " " + args + (about_rope ? "" : " --key-rope post") + " > " +
                          out.string() + " 2> " + err.string();
  const int rc = std::system(cmd.c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(err), slurp(out)};
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
      {"--keys " + nan_k.string() + " --values " + f.v.string(), "nan_k.npy: layer 1 head 0 keys: fit: x(5, 3) = nan is not finite"},
      {kv + " --key-grads " + short_v.string(), "short_v.npy: gradient shape differs"},
      {kv + " --method fisher --value-grads " + f.gv.string(), "layer 0 keys use the fisher method but no --key-grads were given"},
      {kv + " --config " + bad_cfg.string(), "configures layer 5 but the dumps hold 2 layers"},
      {kv + " --config " + json_err.string(), "syntax.json"},
      {kv + " --channels 5", "dim 16 is not a multiple of channels per group 5"},
      {kv + " --bits 12", "300 calibration tokens are fewer than the 4096 centroids"},
      {kv + " --bits 20", "command line: bits must be in 1..16, got 20"},
      {kv + " --bits 0", "command line: bits must be in 1..16, got 0"},
      {kv + " --channels 0", "command line: channels per group must be >= 1, got 0"},
      {kv + " --meta format=mine", "metadata key 'format' is one the codebook file records itself"},
      {kv + " --meta kv.layers=9", "--meta: key 'kv.layers' is one cq-calibrate records itself"},
      {kv + " --meta a=1 --meta a=2", "--meta: key 'a' is given twice"},
      {kv + " --meta \"$(printf 'bad\\377=1')\"", "metadata key 'bad\xff' is not valid UTF-8"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = run(c.args + " --quiet --out " + out.string());
    CHECK(r.status == 1);
    CHECK_MESSAGE(r.err.find(c.message) != std::string::npos, r.err);
    CHECK(r.err.find("cq-calibrate: error: ") == 0);
    CHECK(r.err.find("cq: ") == std::string::npos);  // cq::Error's prefix, once wrapped, not repeated
    CHECK(!fs::exists(out));
    CHECK(!fs::exists(out.string() + ".tmp"));
  }
  CHECK(run("--keys " + f.k.string()).status == 2);  // usage
  CHECK(!fs::exists(out));
}

namespace {

// Relative MSE of a codebook file's codebooks on a dump, per (layer, K|V), as the report defines it:
// sum over heads of the MSE over the sum over heads of the mean square.
double stored_relative_mse(const cq::io::CodebookSet& set, const std::vector<float>& x, std::size_t l, bool value) {
  double mse = 0, power = 0;
  for (std::size_t h = 0; h < H; ++h) {
    const cq::Codebook& cb = *set.find(cq::io::kv_codebook_name(l, value, h));
    const cq::ConstMatrixView<float> rows(x.data() + (l * H + h) * N * D, N, D);
    cq::PackedCodes codes(cb.groups(), cb.bits(), N);
    cq::encode_rows(cb.view(), rows, codes.view(), 0);
    std::vector<float> back(N * D);
    cq::decode_rows(cb.view(), codes.view(), 0, cq::MatrixView<float>(back.data(), N, D));
    mse += cq::mse(rows, cq::ConstMatrixView<float>(back.data(), N, D));
    double p = 0;
    for (std::size_t i = 0; i < N * D; ++i) p += double(rows.data[i]) * rows.data[i];
    power += p / double(N * D);
  }
  return mse / power;
}

// The relative MSE column of the report's row for (layer, K|V).
double reported_mse(const std::string& out, std::size_t l, bool value) {
  const std::string row = "| " + std::to_string(l) + (value ? " | V |" : " | K |");
  const auto at = out.find(row);
  REQUIRE(at != std::string::npos);
  std::istringstream cells(out.substr(at, out.find('\n', at) - at));
  std::string cell;
  for (int i = 0; i < 7; ++i) std::getline(cells, cell, '|');  // "", layer, K/V, config, method, bits/ch, MSE
  return std::stod(cell);
}

}  // namespace

TEST_CASE("cq-calibrate --storage f16: values beyond fp16 are refused; the MSE reported is the stored codebooks'") {
  const Files& f = files();
  const fs::path dir = scratch() / "f16";
  fs::create_directories(dir);
  auto huge = f.kd;
  for (std::size_t r = 0; r < L * H * N; ++r) huge[r * D + 3] = -99999.0f + float(r % 5);
  const fs::path k = dir / "huge_k.npy", out = dir / "out.safetensors";
  cq::io::save_npy_f32(k, {L, H, N, D}, huge.data());
  const std::string args = "--keys " + k.string() + " --values " + f.v.string() + common + "--out " + out.string();
  Run r = run(args + " --storage f16 --threads 1");  // one thread: the first job is the first to fail
  CHECK(r.status == 1);
  CHECK_MESSAGE(r.err.find("huge_k.npy: layer 0 head 0 keys: codebook 'layer.0.k.head.0': value 3 = -999") !=
                    std::string::npos, r.err);
  CHECK(r.err.find("beyond the F16 range") != std::string::npos);
  CHECK(!fs::exists(out));
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);  // only the input
  REQUIRE(run(args).status == 0);  // F32 holds it
  CHECK(cq::io::load_codebooks(out).size() == L * 2 * H);

  // Tiny activations: fp16 rounding (subnormal there) changes the error, which the report shows.
  auto tiny = f.kd;
  for (auto& v : tiny) v *= 1e-8f;
  const fs::path t = dir / "tiny.npy", o16 = dir / "o16.safetensors", o32 = dir / "o32.safetensors";
  cq::io::save_npy_f32(t, {L, H, N, D}, tiny.data());
  const Run r16 = run("--keys " + t.string() + " --values " + t.string() + common + "--storage f16 --out " + o16.string());
  REQUIRE_MESSAGE(r16.status == 0, r16.err);
  const Run r32 = run("--keys " + t.string() + " --values " + t.string() + common + "--out " + o32.string());
  REQUIRE(r32.status == 0);
  const auto s16 = cq::io::load_codebooks(o16), s32 = cq::io::load_codebooks(o32);
  for (std::size_t l = 0; l < L; ++l) {
    CAPTURE(l);
    const double stored = stored_relative_mse(s16, tiny, l, false);
    CHECK(std::abs(reported_mse(r16.out, l, false) - stored) <= 0.5e-5 + 1e-9);
    CHECK(std::abs(reported_mse(r32.out, l, false) - stored_relative_mse(s32, tiny, l, false)) <= 0.5e-5 + 1e-9);
    CHECK(reported_mse(r16.out, l, false) > reported_mse(r32.out, l, false) + 0.05);  // the rounding shows
  }
}

TEST_CASE("cq-calibrate: a safetensors dump beside tensors of other dtypes (an F8_E4M3 scale) is read") {
  const Files& f = files();
  const fs::path st = scratch() / "fp8_scale.safetensors", a = scratch() / "fp8_a.safetensors",
                 b = scratch() / "fp8_b.safetensors";
  {
    cq::io::SafetensorsWriter w;
    w.add_f32("k", {L, H, N, D}, f.kd.data());
    w.add_f32("v", {L, H, N, D}, f.vd.data());
    const std::uint8_t scale = 0x38;  // 1.0 in E4M3
    w.add("k_scale", cq::DType::f8_e4m3, {1}, &scale, 1);
    w.add("k8", cq::DType::f8_e4m3, {1, 1, 1, 1}, &scale, 1);
    w.write(st);
  }
  const Run r = run("--keys " + st.string() + ":k --values " + st.string() + ":v" + common + "--out " + a.string());
  REQUIRE_MESSAGE(r.status == 0, r.err);
  REQUIRE(run("--keys " + f.k.string() + " --values " + f.v.string() + common + "--out " + b.string()).status == 0);
  const auto sa = cq::io::load_codebooks(a), sb = cq::io::load_codebooks(b);
  for (std::size_t i = 0; i < sa.size(); ++i) CHECK(sa.entries()[i].second == sb.entries()[i].second);
  const Run bad = run("--keys " + st.string() + ":k8 --values " + st.string() + ":v" + common + "--out " + a.string());
  CHECK(bad.status == 1);
  CHECK_MESSAGE(bad.err.find("tensor 'k8' has dtype F8_E4M3, expected a float type") != std::string::npos, bad.err);
}

TEST_CASE("cq-calibrate: the command line follows CLI conventions") {
  const Files& f = files();
  const fs::path out = scratch() / "cli.safetensors";
  const std::string kv = "--keys " + f.k.string() + " --values " + f.v.string() + " --out " + out.string() + " ";
  const Run help = run("--help");
  CHECK(help.status == 0);
  for (const char* s : {"Usage:", "--keys", "--storage", "--threads", "--meta", "Built for " CQ_TOOLS_ARCH})
    CHECK_MESSAGE(help.out.find(s) != std::string::npos, s);
  const struct {
    std::string args, message;
  } cases[] = {
      {kv + "--frob 1", "--frob"},
      {kv + "--threads abc", "--threads: expects a non-negative integer, got 'abc'"},
      {kv + "--threads -1", "--threads: expects a non-negative integer, got '-1'"},
      {kv + "--threads 5000", "--threads: Value 5000 not in range 0 to 4096"},
      {kv + "--seed 99999999999999999999", "--seed: value 99999999999999999999 is out of range"},
      {kv + "--bits x", "--bits: expects a non-negative integer, got 'x'"},
      {kv + "--bits 99999999999", "--bits"},
      {kv + "--storage f8", "--storage: f8 not in {f32,f16}"},
      {kv + "--method best", "--method: best not in {uniform,fisher}"},
      {kv + "--meta novalue", "--meta: expected KEY=VALUE, got 'novalue'"},
      {"--keys " + f.k.string() + " --out " + out.string(), "--values is required"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = run(c.args);
    CHECK(r.status == 2);
    CHECK(r.err.find("cq-calibrate: error: ") == 0);
    CHECK_MESSAGE(r.err.find(c.message) != std::string::npos, r.err);
    CHECK(r.err.find("--help") != std::string::npos);
    CHECK(!fs::exists(out));
  }
  // Leading zeros are decimal, not octal: --iterations 010 is 10 iterations.
  REQUIRE(run(kv + "--channels 4 --bits 5 --iterations 010 --quiet").status == 0);
  CHECK(cq::io::load_codebooks(out).entries()[0].second.info().iterations <= 10);
  CHECK(cq::io::load_codebooks(out).metadata.size() == 4);  // kv.layers, kv.kv_heads, kv.head_dim, kv.key_rope
  fs::remove(out);
}

TEST_CASE("cq-calibrate: progress in a log is plain per-layer lines, no carriage returns") {
  const Files& f = files();
  const fs::path out = scratch() / "progress.safetensors";
  const Run r = run("--keys " + f.k.string() + " --values " + f.v.string() +
                    " --channels 4 --bits 5 --iterations 2 --out " + out.string());
  REQUIRE_MESSAGE(r.status == 0, r.err);
  CHECK(r.err.find('\r') == std::string::npos);
  CHECK(r.err.find("layer 0 done (4 codebooks)") != std::string::npos);
  CHECK(r.err.find("layer 1 done (4 codebooks)") != std::string::npos);
  CHECK(r.err.find(", 8/8 in ") != std::string::npos);
  const Run quiet = run("--keys " + f.k.string() + " --values " + f.v.string() +
                        " --channels 4 --bits 5 --iterations 2 --quiet --out " + out.string());
  CHECK(quiet.err.empty());
}

TEST_CASE("cq-calibrate: a pre-existing OUT.tmp link is not followed") {
  const Files& f = files();
  const fs::path dir = scratch() / "links";
  fs::create_directories(dir);
  const fs::path out = dir / "out.safetensors", victim = dir / "victim.txt";
  std::ofstream(victim) << "precious";
  fs::create_symlink(victim, out.string() + ".tmp");
  const Run r = run("--keys " + f.k.string() + " --values " + f.v.string() + common + "--out " + out.string());
  REQUIRE_MESSAGE(r.status == 0, r.err);
  CHECK(slurp(victim) == "precious");
  CHECK(fs::is_regular_file(fs::symlink_status(out)));
  CHECK(cq::io::load_codebooks(out).size() == L * 2 * H);
  CHECK(fs::read_symlink(out.string() + ".tmp") == victim);
}

TEST_CASE("cq-calibrate: a dump with an empty axis is refused, naming it") {
  const fs::path out = scratch() / "empty_axis.safetensors";
  const struct {
    std::vector<std::uint64_t> shape;
    const char* axis;
  } cases[] = {{{0, H, N, D}, "has 0 layers"},
               {{L, 0, N, D}, "has 0 KV heads"},
               {{L, H, 0, D}, "has 0 tokens"},
               {{L, H, N, 0}, "has 0 channels (head_dim)"}};
  for (const auto& c : cases) {
    CAPTURE(c.axis);
    const fs::path k = scratch() / "empty_k.npy", st = scratch() / "empty_k.safetensors";
    cq::io::save_npy_f32(k, c.shape, nullptr);
    {
      cq::io::SafetensorsWriter w;
      w.add_f32("k", c.shape, nullptr);
      w.write(st);
    }
    for (const std::string& keys : {k.string(), st.string()}) {
      const Run r = run("--keys " + keys + " --values " + keys + common + "--out " + out.string());
      CHECK(r.status == 1);
      CHECK_MESSAGE(r.err.find(c.axis) != std::string::npos, r.err);
      CHECK(!fs::exists(out));
    }
  }
}

TEST_CASE("cq-calibrate: the file records how the keys were taken; caches configured otherwise refuse it") {
  const Files& f = files();
  const fs::path pre = scratch() / "pre.safetensors", post = scratch() / "post.safetensors";
  const std::string kv = "--keys " + f.k.string() + " --values " + f.v.string() + " --channels 4 --bits 4 --iterations 3 --quiet ";
  // No record given: refused before any work.
  const Run none = run(kv + "--out " + pre.string() + " --key-rope ''");
  CHECK(none.status == 2);
  CHECK(run(kv + "--out " + pre.string() + " --key-rope sideways").status == 2);
  REQUIRE(run(kv + "--out " + pre.string() + " --key-rope pre --rope-theta 500000 --rope-scaling llama3 --rope-factor 8")
              .status == 0);
  REQUIRE(run(kv + "--out " + post.string() + " --key-rope post").status == 0);
  const cq::KVCodebooks books = cq::io::load_kv_codebooks(pre);
  CHECK(books.key_rope() == cq::KeyRope::pre);
  CHECK(books.rope().theta == 500000.0);
  CHECK(books.rope().scaling == cq::RopeScaling::llama3);
  CHECK(books.rope().factor == 8.0);
  CHECK(cq::io::load_kv_codebooks(post).key_rope() == cq::KeyRope::post);
  // A cache configured otherwise refuses each file, naming both sides.
  cq::PagedCacheOptions o;
  o.code_pages = o.full_pages = 4;
  CHECK_THROWS_WITH_AS((cq::PagedKVCache<float>(books, o)),
                       doctest::Contains("the cache takes post-RoPE keys but the key codebooks were fitted on pre-RoPE keys"),
                       cq::Error);
  o.pre_rope_keys = true;  // ... with the default RoPE, not the file's
  CHECK_THROWS_WITH_AS((cq::PagedKVCache<float>(books, o)),
                       doctest::Contains("differs from the one the key codebooks were fitted with (theta 500000, rotate_half, llama3 x8)"),
                       cq::Error);
  o.rope = books.rope();
  cq::PagedKVCache<float> ok(books, o);
  cq::KVCacheConfig cfg = cq::io::kv_cache_config(cq::io::load_codebooks(post));
  cfg.pre_rope_keys = true;
  cq::KVCache<float> wrong(cfg);
  CHECK_THROWS_WITH_AS(cq::io::load_kv_codebooks(wrong, post), doctest::Contains("fitted on post-RoPE keys"), cq::Error);
  // A file without the record is refused; --stamp adds it.
  cq::io::CodebookSet bare = cq::io::load_codebooks(post);
  bare.metadata.erase("kv.key_rope");
  const fs::path old = scratch() / "old.safetensors", stamped = scratch() / "stamped.safetensors";
  cq::io::save_codebooks(old, bare);
  CHECK_THROWS_WITH_AS(cq::PagedKVCache<float>(cq::io::load_kv_codebooks(old), cq::PagedCacheOptions{}),
                       doctest::Contains("do not record whether keys were coded"), cq::Error);
  const Run s = run("--stamp " + old.string() + " --out " + stamped.string() + " --key-rope pre --rope-theta 1000");
  REQUIRE(s.status == 0);
  CHECK(s.out.find("keys recorded as pre-RoPE (theta 1000, rotate_half)") != std::string::npos);
  const cq::KVCodebooks st = cq::io::load_kv_codebooks(stamped);
  CHECK(st.key_rope() == cq::KeyRope::pre);
  CHECK(st.rope().theta == 1000.0);
  CHECK(st.key(1, 1) == cq::io::load_kv_codebooks(post).key(1, 1));  // codebooks unchanged
}
