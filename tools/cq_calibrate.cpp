// cq-calibrate: from a model's K/V activation dumps (and optionally squared gradients) to one
// codebook file for a whole KV cache. `cq-calibrate --help` lists the options.
//
// Inputs: .npy (float32, float16, bfloat16, float64) or safetensors (FILE or FILE:TENSOR), layout
// [layer][kv_head][token][head_dim], every dimension at least 1; a comma-separated list of files
// is concatenated along the layer axis (dumps sharded by layer). Gradient tensors must have the
// activations' shape.
// CONFIG.json: {"default": {"channels": 8, "bits": 8, ...}, "layers": {"3": {"k": {"bits": 10}}}}
// (command-line options override the file's default; per-layer entries override both).
// Output: a cq KV codebook file (codebooks layer.L.k|v.head.H), written atomically, so a failed
// run leaves nothing behind; a per-layer report on stdout whose relative MSE is that of the
// codebooks as stored (after rounding to fp16 with --storage f16).
// Exit status: 0 on success, 1 when the inputs or the configuration are unusable, 2 when the
// command line cannot be parsed.
//
// Instruction set: the tool is compiled for one ISA (CMake's CQ_TOOLS_ARCH, default x86-64-v3),
// not -march=native, so an installed binary runs on other machines. cq's kernels are header-only
// inline functions: several ISA-specific copies in one binary would violate the ODR, so there is
// no runtime dispatch; instead the tool checks at startup that the CPU has what it was built for.

#include <cq/cq.hpp>

#include <CLI/CLI.hpp>

#include <unistd.h>

#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#ifndef CQ_TOOLS_ARCH
#define CQ_TOOLS_ARCH "this machine (-march=native)"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Runs before anything else in the program (priority 101 precedes the static initialisers) and is
// compiled for baseline x86-64, so the check cannot itself use an instruction the CPU lacks.
__attribute__((constructor(101), target("arch=x86-64"))) static void require_compiled_isa() {
  __builtin_cpu_init();
  char missing[160] = "";
#define CQ_REQUIRE_CPU(feature) \
  if (!__builtin_cpu_supports(feature)) __builtin_strcat(missing, " " feature)
#ifdef __AVX__
  CQ_REQUIRE_CPU("avx");
#endif
#ifdef __AVX2__
  CQ_REQUIRE_CPU("avx2");
#endif
#ifdef __FMA__
  CQ_REQUIRE_CPU("fma");
#endif
#ifdef __BMI__
  CQ_REQUIRE_CPU("bmi");
#endif
#ifdef __BMI2__
  CQ_REQUIRE_CPU("bmi2");
#endif
#ifdef __AVX512F__
  CQ_REQUIRE_CPU("avx512f");
#endif
#ifdef __AVX512BW__
  CQ_REQUIRE_CPU("avx512bw");
#endif
#ifdef __AVX512VL__
  CQ_REQUIRE_CPU("avx512vl");
#endif
#ifdef __AVX512DQ__
  CQ_REQUIRE_CPU("avx512dq");
#endif
#ifdef __AVX512CD__
  CQ_REQUIRE_CPU("avx512cd");
#endif
#undef CQ_REQUIRE_CPU
  if (missing[0] != '\0') {
    std::fprintf(stderr,
                 "cq-calibrate: error: this binary was built for %s, but the CPU lacks:%s\n"
                 "(rebuild cq with -DCQ_TOOLS_ARCH=x86-64-v2, or =native, for this machine)\n",
                 CQ_TOOLS_ARCH, missing);
    _exit(1);
  }
}
#endif

namespace {

using Clock = std::chrono::steady_clock;
using cq::io::json::bare_message;
using cq::io::detail::shape_string;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Dump {
  std::string name;                   // for messages
  std::vector<std::uint64_t> shape;   // [L, H, N, D]
  std::vector<float> data;
  const float* slice(std::size_t l, std::size_t h) const { return data.data() + (l * shape[1] + h) * shape[2] * shape[3]; }
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) return out;
    start = p + 1;
  }
}

// One file (or FILE:TENSOR of a safetensors file) as a float tensor of rank 4 with no empty axis.
Dump load_one(const std::string& spec) {
  Dump d;
  d.name = spec;
  std::string path = spec, tensor;
  const auto colon = spec.rfind(':');
  if (colon != std::string::npos && colon > 0 && spec.find(".safetensors") != std::string::npos &&
      colon > spec.find(".safetensors")) {
    path = spec.substr(0, colon);
    tensor = spec.substr(colon + 1);
  }
  if (path.size() >= 4 && path.compare(path.size() - 4, 4, ".npy") == 0) {
    const cq::io::NpyArray a = cq::io::load_npy(path);
    d.shape = a.shape;
    CQ_CHECK(d.shape.size() == 4, spec, ": expected a rank-4 array [layer][kv_head][token][head_dim], got shape ",
             shape_string(d.shape));
    d.data = cq::io::npy_floats(a, spec);
  } else {
    auto r = cq::io::SafetensorsReader::open(path);
    if (tensor.empty()) {
      CQ_CHECK(r.tensors().size() == 1, spec, ": holds ", r.tensors().size(), " tensors; name one as FILE:TENSOR");
      tensor = r.tensors().front().name;
    }
    const cq::io::TensorInfo& t = r.get(tensor);
    d.shape = t.shape;
    CQ_CHECK(d.shape.size() == 4, spec, ": tensor '", tensor, "' has shape ", shape_string(d.shape),
             ", expected [layer][kv_head][token][head_dim]");
    d.data = r.read_floats(t);
  }
  static constexpr const char* axes[] = {"layers", "KV heads", "tokens", "channels (head_dim)"};
  for (std::size_t i = 0; i < 4; ++i)
    CQ_CHECK(d.shape[i] >= 1, spec, ": shape ", shape_string(d.shape), " has 0 ", axes[i],
             "; every dimension of [layer][kv_head][token][head_dim] must be at least 1");
  return d;
}

// A comma-separated list of shards, concatenated along the layer axis.
Dump load(const std::string& list) {
  Dump all;
  all.name = list;
  for (const std::string& spec : split(list, ',')) {
    Dump d = load_one(spec);
    if (all.shape.empty()) {
      all.shape = d.shape;
      all.data = std::move(d.data);
      continue;
    }
    CQ_CHECK(d.shape[1] == all.shape[1] && d.shape[2] == all.shape[2] && d.shape[3] == all.shape[3], spec, ": shape ",
             shape_string(d.shape), " does not continue the previous shards' [*, ", all.shape[1], ", ", all.shape[2],
             ", ", all.shape[3], "]");
    all.shape[0] += d.shape[0];
    all.data.insert(all.data.end(), d.data.begin(), d.data.end());
  }
  return all;
}

struct Spec {
  std::size_t channels = 8;
  int bits = 8;
  unsigned iterations = 25;
  std::uint64_t seed = 1234;
  bool fisher = false;
  cq::KMeansInit init = cq::KMeansInit::plus_plus;
  std::size_t max_points_per_centroid = 256;
};

// The checks a spec passes before any data is seen (channels >= 1, bits in 1..16: the library's).
void check_spec(const Spec& s, const std::string& where) {
  cq::check_cq_shape(s.channels, s.channels, s.bits, where.c_str());
}

std::string describe(const cq::io::json::Value& v) {
  using K = cq::io::json::Value::Kind;
  switch (v.kind) {
    case K::number: return v.is_uint ? std::to_string(v.uint) : cq::io::detail::format_double(v.number);
    case K::string: {
      std::string s;
      cq::io::json::write_string(s, v.string);
      return s;
    }
    case K::boolean: return v.boolean ? "true" : "false";
    case K::null: return "null";
    case K::array: return "an array";
    case K::object: return "an object";
  }
  return "?";
}

// Applies the JSON object `o` ({"channels": 8, ...}) to `s`, then checks it; unknown keys are errors.
void apply_json(Spec& s, const cq::io::json::Value& o, const std::string& where) {
  using K = cq::io::json::Value::Kind;
  CQ_CHECK(o.kind == K::object, where, ": expected an object, got ", describe(o));
  for (std::size_t i = 0; i < o.size(); ++i) {
    const std::string& k = o.keys[i];
    const auto& v = o.items[i];
    auto uint = [&](std::uint64_t max) {
      CQ_CHECK(v.kind == K::number && v.is_uint && v.uint <= max, where, ".", k, ": expected an integer in [0, ", max,
               "], got ", describe(v));
      return v.uint;
    };
    if (k == "channels") s.channels = static_cast<std::size_t>(uint(SIZE_MAX));
    else if (k == "bits") s.bits = static_cast<int>(uint(std::numeric_limits<int>::max()));
    else if (k == "iterations") s.iterations = static_cast<unsigned>(uint(100000));
    else if (k == "seed") s.seed = uint(UINT64_MAX);
    else if (k == "max_points_per_centroid") s.max_points_per_centroid = uint(1u << 30);
    else if (k == "method") {
      CQ_CHECK(v.kind == K::string && (v.string == "uniform" || v.string == "fisher"), where,
               ".method: expected \"uniform\" or \"fisher\", got ", describe(v));
      s.fisher = v.string == "fisher";
    } else if (k == "init") {
      CQ_CHECK(v.kind == K::string && (v.string == "kmeans++" || v.string == "random"), where,
               ".init: expected \"kmeans++\" or \"random\", got ", describe(v));
      s.init = v.string == "random" ? cq::KMeansInit::random : cq::KMeansInit::plus_plus;
    } else {
      cq::detail::fail(where, ": unknown key '", k, "'");
    }
  }
  check_spec(s, where);
}

// Progress on a terminal: a bar redrawn in place with an ETA. Elsewhere (a log file, a pipe): one
// line per finished layer, since carriage returns make a mess of logs. Nothing with --quiet.
class Progress {
 public:
  Progress(std::size_t layers, std::size_t per_layer, bool quiet)
      : tty_(!quiet && ::isatty(STDERR_FILENO) == 1), quiet_(quiet), per_layer_(per_layer), left_(layers, per_layer),
        total_(layers * per_layer) {
    if (tty_) bar(0.0);
  }
  // Called under the caller's lock.
  void job_done(std::size_t layer, double elapsed) {
    ++done_;
    if (tty_) bar(elapsed);
    else if (!quiet_ && --left_[layer] == 0)
      std::fprintf(stderr, "cq-calibrate: layer %zu done (%zu codebooks), %zu/%zu in %.1f s\n", layer, per_layer_,
                   done_, total_, elapsed);
  }

 private:
  void bar(double elapsed) const {
    const int width = 30;
    const int filled = static_cast<int>(width * done_ / std::max<std::size_t>(total_, 1));
    const double eta = done_ ? elapsed / double(done_) * double(total_ - done_) : 0.0;
    std::fprintf(stderr, "\r[%.*s%s%.*s] %zu/%zu codebooks  %.1f s elapsed  ETA %.1f s ", filled,
                 "==============================", filled < width ? ">" : "",
                 width - filled - (filled < width ? 1 : 0), "                              ", done_, total_, elapsed, eta);
    if (done_ == total_) std::fprintf(stderr, "\n");
  }
  bool tty_, quiet_;
  std::size_t per_layer_;
  std::vector<std::size_t> left_;  // jobs not yet done, per layer
  std::size_t total_, done_ = 0;
};

// The command line. Integers are plain decimal (CLI11 alone would also take -1 for an unsigned
// option, and 010 as octal).
struct Args {
  std::string keys, values, key_grads, value_grads, config, out, storage = "f32", method, init;
  std::string key_rope, stamp;  // how the keys were taken; a file to stamp with it instead of fitting
  cq::RopeConfig rope;
  std::string rope_style = "rotate_half", rope_scaling = "none";
  std::size_t threads = 0;
  bool quiet = false;
  std::vector<std::string> meta;
  Spec spec;                          // values of the spec options...
  std::vector<CLI::Option*> spec_options;  // ...and whether each was given (in the order applied)
};

const CLI::Validator decimal_uint(
    [](std::string& s) -> std::string {
      std::uint64_t v = 0;
      const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      if (ec == std::errc::result_out_of_range) return "value " + s + " is out of range";
      if (s.empty() || ec != std::errc{} || p != s.data() + s.size())
        return "expects a non-negative integer, got '" + s + "'";
      s = std::to_string(v);  // CLI11 would read a leading zero as octal
      return {};
    },
    "", "decimal_uint");

void define_options(CLI::App& app, Args& a) {
  app.add_option("--keys", a.keys, "key dump: FILE.npy, FILE.safetensors[:TENSOR], or shards joined by commas");
  app.add_option("--values", a.values, "value dump, laid out like the keys");
  app.add_option("--out", a.out, "the KV codebook file to write (safetensors)")->required();
  app.add_option("--key-rope", a.key_rope,
                 "whether the key dump holds keys before RoPE (pre: the cache rotates them in attention) or after "
                 "(post); recorded in the file, with the --rope-* settings for pre")
      ->required()
      ->check(CLI::IsMember({"pre", "post"}));
  app.add_option("--rope-theta", a.rope.theta, "RoPE base (default 10000)");
  app.add_option("--rope-style", a.rope_style, "rotate_half (LLaMA, NeoX) or interleaved (GPT-J)")
      ->check(CLI::IsMember({"rotate_half", "interleaved"}));
  app.add_option("--rope-rotary-dim", a.rope.rotary_dim, "channels that rotate (default 0: all)")->check(decimal_uint);
  app.add_option("--rope-scaling", a.rope_scaling, "none, linear, llama3 or yarn")
      ->check(CLI::IsMember({"none", "linear", "llama3", "yarn"}));
  app.add_option("--rope-factor", a.rope.factor, "scaling factor");
  app.add_option("--rope-low-freq-factor", a.rope.low_freq_factor, "llama3");
  app.add_option("--rope-high-freq-factor", a.rope.high_freq_factor, "llama3");
  app.add_option("--rope-original-max-position", a.rope.original_max_position, "llama3, yarn");
  app.add_option("--rope-beta-fast", a.rope.beta_fast, "yarn");
  app.add_option("--rope-beta-slow", a.rope.beta_slow, "yarn");
  app.add_option("--rope-attention-factor", a.rope.attention_factor, "yarn (0: 0.1 ln(factor) + 1)");
  app.add_option("--stamp", a.stamp,
                 "instead of fitting: copy this KV codebook file to --out with the --key-rope record (for files "
                 "written before cq recorded it)");
  app.add_option("--key-grads", a.key_grads, "squared key gradients, for --method fisher");
  app.add_option("--value-grads", a.value_grads, "squared value gradients, for --method fisher");
  app.add_option("--config", a.config, "per-layer configuration (JSON); see the README");
  a.spec_options = {
      app.add_option("--channels", a.spec.channels, "channels per group (default 8)")->check(decimal_uint),
      app.add_option("--bits", a.spec.bits, "bits per code, 1..16 (default 8)")->check(decimal_uint),
      app.add_option("--iterations", a.spec.iterations, "Lloyd iterations (default 25)")->check(decimal_uint),
      app.add_option("--seed", a.spec.seed, "random seed (default 1234)")->check(decimal_uint),
      app.add_option("--method", a.method, "uniform or fisher (default uniform)")
          ->check(CLI::IsMember({"uniform", "fisher"})),
      app.add_option("--init", a.init, "kmeans++ or random (default kmeans++)")
          ->check(CLI::IsMember({"kmeans++", "random"})),
      app.add_option("--max-points-per-centroid", a.spec.max_points_per_centroid,
                     "subsampling cap (default 256)")
          ->check(decimal_uint),
  };
  app.add_option("--threads", a.threads, "threads, 0 = every core (default 0)")
      ->check(decimal_uint)
      ->check(CLI::Range(std::size_t{0}, std::size_t{4096}));
  app.add_option("--storage", a.storage, "centroid storage: f32 or f16 (default f32)")
      ->check(CLI::IsMember({"f32", "f16"}));
  app.add_option("--meta", a.meta, "KEY=VALUE metadata recorded in the file (repeatable)")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            return s.find('=') == std::string::npos ? "expected KEY=VALUE, got '" + s + "'" : std::string();
          },
          "KEY=VALUE", "key_value"));
  app.add_flag("--quiet", a.quiet, "no progress on stderr");
  app.footer(std::string("Built for ") + CQ_TOOLS_ARCH +
             ". Exit status: 0 done, 1 unusable input, 2 bad command line.");
}

// The base spec: the config file's default, then the command line.
Spec base_spec(const Args& a, const cq::io::json::Value& cfg) {
  Spec s;
  if (const auto* d = cfg.find("default")) apply_json(s, *d, a.config + ": default");
  const auto given = [&](std::size_t i) { return a.spec_options[i]->count() > 0; };
  if (given(0)) s.channels = a.spec.channels;
  if (given(1)) s.bits = a.spec.bits;
  if (given(2)) s.iterations = a.spec.iterations;
  if (given(3)) s.seed = a.spec.seed;
  if (given(4)) s.fisher = a.method == "fisher";
  if (given(5)) s.init = a.init == "random" ? cq::KMeansInit::random : cq::KMeansInit::plus_plus;
  if (given(6)) s.max_points_per_centroid = a.spec.max_points_per_centroid;
  check_spec(s, "command line");
  return s;
}

struct LayerOverride {
  std::size_t layer;
  int kind;  // 0 keys, 1 values
  Spec spec;
};

// The config file's "layers" section, each entry applied over `base`.
std::vector<LayerOverride> layer_overrides(const Args& a, const cq::io::json::Value& cfg, const Spec& base) {
  std::vector<LayerOverride> out;
  const auto* layers = cfg.find("layers");
  if (!layers) return out;
  CQ_CHECK(layers->kind == cq::io::json::Value::Kind::object, a.config, ": \"layers\" must be an object");
  for (std::size_t i = 0; i < layers->size(); ++i) {
    const std::string& lk = layers->keys[i];
    std::size_t l = 0;
    const auto [p, ec] = std::from_chars(lk.data(), lk.data() + lk.size(), l);
    CQ_CHECK(!lk.empty() && ec == std::errc{} && p == lk.data() + lk.size(), a.config, ": layer key '", lk,
             "' is not a layer number");
    const auto& lv = layers->items[i];
    CQ_CHECK(lv.kind == cq::io::json::Value::Kind::object, a.config, ": layers.", lk, " must be an object");
    for (std::size_t j = 0; j < lv.size(); ++j) {
      CQ_CHECK(lv.keys[j] == "k" || lv.keys[j] == "v", a.config, ": layers.", lk, ": unknown key '", lv.keys[j],
               "' (expected \"k\" or \"v\")");
      LayerOverride o{l, lv.keys[j] == "v" ? 1 : 0, base};
      apply_json(o.spec, lv.items[j], a.config + ": layers." + lk + "." + lv.keys[j]);
      out.push_back(o);
    }
  }
  return out;
}

cq::io::json::Value read_config(const std::string& path) {
  cq::io::json::Value cfg;
  cfg.kind = cq::io::json::Value::Kind::object;
  if (path.empty()) return cfg;
  const auto bytes = cq::io::read_file_bytes(path);
  try {
    cfg = cq::io::json::parse(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  } catch (const cq::Error& e) {
    cq::detail::fail(path, ": ", bare_message(e));
  }
  CQ_CHECK(cfg.kind == cq::io::json::Value::Kind::object, path, ": expected a JSON object");
  for (const auto& k : cfg.keys)
    CQ_CHECK(k == "default" || k == "layers", path, ": unknown key '", k, "' (expected \"default\" and \"layers\")");
  return cfg;
}

// The RoPE record of the command line (settings only matter for pre-RoPE keys).
std::pair<cq::KeyRope, cq::RopeConfig> key_rope(const Args& a) {
  cq::RopeConfig r = a.rope;
  r.style = a.rope_style == "interleaved" ? cq::RopeStyle::interleaved : cq::RopeStyle::rotate_half;
  for (cq::RopeScaling s : {cq::RopeScaling::none, cq::RopeScaling::linear, cq::RopeScaling::llama3, cq::RopeScaling::yarn})
    if (a.rope_scaling == cq::rope_scaling_name(s)) r.scaling = s;
  return {a.key_rope == "pre" ? cq::KeyRope::pre : cq::KeyRope::post, r};
}

// --stamp: the file's codebooks and metadata, with the key RoPE record set, written to --out in
// the storage the file has (F16 when every centroid tensor is F16).
int stamp(const Args& a, bool storage_given) {
  auto reader = cq::io::SafetensorsReader::open(a.stamp);
  bool f16 = true;
  for (const auto& t : reader.tensors()) f16 = f16 && t.dtype == cq::DType::f16;
  cq::io::CodebookSet set = cq::io::load_codebooks(reader);
  const cq::io::KVLayout layout = cq::io::kv_layout(set);
  const auto [kr, rope] = key_rope(a);
  cq::io::set_kv_key_rope(set, kr, rope, layout.head_dim);
  const bool as_f16 = storage_given ? a.storage == "f16" : f16;
  cq::io::save_codebooks(a.out, set, as_f16 ? cq::io::CodebookStorage::f16 : cq::io::CodebookStorage::f32);
  std::printf("cq-calibrate: %s -> %s: keys recorded as %s%s\n", a.stamp.c_str(), a.out.c_str(),
              cq::key_rope_name(kr), kr == cq::KeyRope::pre ? (" (" + cq::describe(rope) + ")").c_str() : "");
  return 0;
}

int run(const Args& a, bool storage_given) {
  if (!a.stamp.empty()) return stamp(a, storage_given);
  const auto t0 = Clock::now();
  const auto storage = a.storage == "f16" ? cq::io::CodebookStorage::f16 : cq::io::CodebookStorage::f32;
  // Configuration first, so its mistakes show before the dumps are read.
  const cq::io::json::Value cfg = read_config(a.config);
  const Spec base = base_spec(a, cfg);
  const std::vector<LayerOverride> overrides = layer_overrides(a, cfg, base);
  cq::io::CodebookSet set;
  for (const std::string& kv : a.meta) {
    const auto eq = kv.find('=');
    CQ_CHECK(set.metadata.emplace(kv.substr(0, eq), kv.substr(eq + 1)).second, "--meta: key '", kv.substr(0, eq),
             "' is given twice");
  }
  for (const auto& [k, v] : set.metadata)
    CQ_CHECK(k.rfind("kv.", 0) != 0, "--meta: key '", k, "' is one cq-calibrate records itself (kv.*)");
  (void)cq::io::codebook_file_bytes(set, storage);  // the writer's metadata rules, checked before the work

  const Dump K = load(a.keys), V = load(a.values);
  CQ_CHECK(K.shape == V.shape, a.values, ": shape ", shape_string(V.shape), " differs from the keys' ",
           shape_string(K.shape));
  std::optional<Dump> GK, GV;
  if (!a.key_grads.empty()) GK = load(a.key_grads);
  if (!a.value_grads.empty()) GV = load(a.value_grads);
  for (const auto* g : {GK ? &*GK : nullptr, GV ? &*GV : nullptr})
    if (g) CQ_CHECK(g->shape == K.shape, g->name, ": gradient shape differs from the activations' shape (",
                    shape_string(g->shape), " vs ", shape_string(K.shape), ")");
  const std::size_t L = K.shape[0], H = K.shape[1], N = K.shape[2], D = K.shape[3];
  const auto [kr, rope] = key_rope(a);
  if (kr == cq::KeyRope::pre) cq::Rope(rope, D);  // the RoPE settings, checked before the work

  // Per (layer, kind) specs.
  std::vector<std::array<Spec, 2>> specs(L, {base, base});
  for (const LayerOverride& o : overrides) {
    CQ_CHECK(o.layer < L, a.config, ": configures layer ", o.layer, " but the dumps hold ", L, " layers");
    specs[o.layer][o.kind] = o.spec;
  }
  for (std::size_t l = 0; l < L; ++l)
    for (int kind = 0; kind < 2; ++kind) {
      const Spec& s = specs[l][kind];
      cq::check_cq_shape(D, s.channels, s.bits, kind ? "value config" : "key config");
      CQ_CHECK(!s.fisher || (kind ? GV.has_value() : GK.has_value()), "layer ", l, (kind ? " values" : " keys"),
               " use the fisher method but no ", kind ? "--value-grads" : "--key-grads", " were given");
      CQ_CHECK(N >= (std::size_t{1} << s.bits), "layer ", l, (kind ? " values" : " keys"), ": ", N,
               " calibration tokens are fewer than the ", std::size_t{1} << s.bits, " centroids of ", s.bits, " bits");
    }

  // One job per (layer, K|V, head), fitted in parallel; job (l, kind, h) sits at (l * 2 + kind) * H + h.
  struct Job {
    std::size_t layer, head;
    int kind;
    cq::Codebook cb;  // as stored
    double mse = 0, power = 0, seconds = 0;
  };
  std::vector<Job> jobs;
  jobs.reserve(L * 2 * H);
  for (std::size_t l = 0; l < L; ++l)
    for (int kind = 0; kind < 2; ++kind)
      for (std::size_t h = 0; h < H; ++h) jobs.push_back({l, h, kind, {}, 0, 0, 0});
  std::optional<cq::ThreadPool> started;
  try {
    started.emplace(a.threads);
  } catch (const std::system_error& e) {
    cq::detail::fail("--threads ", a.threads, ": cannot start the threads (", e.what(), ")");
  }
  cq::ThreadPool& pool = *started;
  std::mutex mu;
  std::string failure;
  Progress progress(L, 2 * H, a.quiet);
  pool.parallel_for(jobs.size(), [&](std::size_t i) {
    Job& j = jobs[i];
    const Spec& s = specs[j.layer][j.kind];
    const Dump& X = j.kind ? V : K;
    const auto t = Clock::now();
    try {
      const cq::ConstMatrixView<float> x(X.slice(j.layer, j.head), N, D);
      cq::Codebook fitted(D, s.channels, s.bits);
      cq::FitOptions o;
      o.iterations = s.iterations;
      o.seed = s.seed;
      o.init = s.init;
      o.max_points_per_centroid = s.max_points_per_centroid;
      if (s.fisher) {
        const Dump& G = j.kind ? *GV : *GK;
        const auto w = cq::fisher_weights(cq::ConstMatrixView<float>(G.slice(j.layer, j.head), N, D), s.channels);
        cq::fit_codebook(fitted, x, cq::ConstMatrixView<float>(w.data(), N, D / s.channels), o);
      } else {
        cq::fit_codebook(fitted, x, {}, o);
      }
      // Reconstruction error over every calibration row (unweighted), relative to the signal, of
      // the codebook a loader of the file will use.
      j.cb = cq::io::stored_codebook(fitted, storage, cq::io::kv_codebook_name(j.layer, j.kind == 1, j.head));
      cq::PackedCodes codes(j.cb.groups(), j.cb.bits(), N);
      cq::encode_rows(j.cb.view(), x, codes.view(), 0);
      std::vector<float> back(N * D);
      cq::decode_rows(j.cb.view(), codes.view(), 0, cq::MatrixView<float>(back.data(), N, D));
      j.mse = cq::mse(x, cq::ConstMatrixView<float>(back.data(), N, D));
      double p = 0;
      for (std::size_t r = 0; r < N * D; ++r) p += double(x.data[r]) * x.data[r];
      j.power = p / double(N * D);
    } catch (const std::exception& e) {
      std::lock_guard lock(mu);
      if (failure.empty())
        failure = cq::detail::concat(X.name, ": layer ", j.layer, " head ", j.head, j.kind ? " values: " : " keys: ",
                                     bare_message(e));
    }
    j.seconds = seconds_since(t);
    std::lock_guard lock(mu);
    progress.job_done(j.layer, seconds_since(t0));
  });
  if (!failure.empty()) throw cq::Error(failure);

  for (Job& j : jobs) set.add(cq::io::kv_codebook_name(j.layer, j.kind == 1, j.head), std::move(j.cb));
  cq::io::set_kv_layout(set, L, H, D);
  cq::io::set_kv_key_rope(set, kr, rope, D);
  cq::io::save_codebooks(a.out, set, storage);

  std::printf("cq-calibrate: %zu layers x %zu KV heads x %zu tokens x head_dim %zu -> %s\n", L, H, N, D, a.out.c_str());
  std::printf("| layer | K/V | config | method | bits/ch | relative MSE | fit s |\n|---|---|---|---|---|---|---|\n");
  for (std::size_t l = 0; l < L; ++l)
    for (int kind = 0; kind < 2; ++kind) {
      double mse = 0, power = 0, secs = 0;
      for (std::size_t h = 0; h < H; ++h) {
        const Job& j = jobs[(l * 2 + static_cast<std::size_t>(kind)) * H + h];
        mse += j.mse, power += j.power, secs += j.seconds;
      }
      const Spec& s = specs[l][kind];
      std::printf("| %zu | %s | %zuc%db | %s | %.3f | %.5f | %.2f |\n", l, kind ? "V" : "K", s.channels, s.bits,
                  s.fisher ? "fisher" : "uniform", double(s.bits) / double(s.channels), mse / power, secs);
    }
  std::printf("wall time %.2f s on %zu threads\n", seconds_since(t0), pool.concurrency());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("cq-calibrate: fits the Coupled Quantization codebooks of a whole KV cache from activation dumps "
               "[layer][kv_head][token][head_dim] and writes them as one safetensors file.",
               "cq-calibrate");
  Args a;
  define_options(app, a);
  app.set_version_flag("--version", CQ_VERSION_STRING);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "cq-calibrate: error: %s\nRun with --help for more information.\n", e.what());
    return 2;
  }
  for (const auto& [name, value] : {std::pair{"--keys", &a.keys}, {"--values", &a.values}})
    if (a.stamp.empty() && value->empty()) {
      std::fprintf(stderr, "cq-calibrate: error: %s is required (unless --stamp)\nRun with --help for more information.\n",
                   name);
      return 2;
    }
  try {
    return run(a, app.get_option("--storage")->count() > 0);
  } catch (const std::exception& e) {
    const std::string_view m = bare_message(e);
    std::fprintf(stderr, "cq-calibrate: error: %.*s\n", static_cast<int>(m.size()), m.data());
    return 1;
  }
}
