// cq-calibrate: from a model's K/V activation dumps (and optionally squared gradients) to one
// codebook file for a whole KV cache.
//
//   cq-calibrate --keys K.npy --values V.npy [--key-grads GK.npy --value-grads GV.npy]
//                [--config CONFIG.json] [--channels 8 --bits 8 --iterations 25 --seed 1234
//                 --method uniform|fisher --init kmeans++|random --max-points-per-centroid 256]
//                [--threads N] [--storage f32|f16] [--meta KEY=VALUE]... [--quiet] --out CODEBOOKS.safetensors
//
// Inputs: .npy (float32, float16, bfloat16) or safetensors (FILE or FILE:TENSOR), layout
// [layer][kv_head][token][head_dim]; a comma-separated list of files is concatenated along the
// layer axis (dumps sharded by layer). Gradient tensors must have the activations' shape.
// CONFIG.json: {"default": {"channels": 8, "bits": 8, ...}, "layers": {"3": {"k": {"bits": 10}}}}
// (command-line options override the file's default; per-layer entries override both).
// Output: a cq KV codebook file (codebooks layer.L.k|v.head.H), written through a temporary file
// and renamed, so a failed run leaves nothing behind; a per-layer report on stdout.

#include <cq/cq.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

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

// One file (or FILE:TENSOR of a safetensors file) as a float tensor of rank 4.
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
    CQ_CHECK(d.shape.size() == 4, spec, ": expected a rank-4 array [layer][kv_head][token][head_dim], got rank ",
             d.shape.size());
    d.data = cq::io::npy_floats(a, spec);
    return d;
  }
  auto r = cq::io::SafetensorsReader::open(path);
  if (tensor.empty()) {
    CQ_CHECK(r.tensors().size() == 1, spec, ": holds ", r.tensors().size(), " tensors; name one as FILE:TENSOR");
    tensor = r.tensors().front().name;
  }
  const cq::io::TensorInfo& t = r.get(tensor);
  d.shape = t.shape;
  CQ_CHECK(d.shape.size() == 4, spec, ": tensor '", tensor, "' has rank ", d.shape.size(),
           ", expected [layer][kv_head][token][head_dim]");
  d.data = r.read_floats(t);
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
    CQ_CHECK(d.shape[1] == all.shape[1] && d.shape[2] == all.shape[2] && d.shape[3] == all.shape[3], spec, ": shape [",
             d.shape[0], ", ", d.shape[1], ", ", d.shape[2], ", ", d.shape[3], "] does not continue the previous shards' [*, ",
             all.shape[1], ", ", all.shape[2], ", ", all.shape[3], "]");
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

// Applies the JSON object `o` ({"channels": 8, ...}) to `s`; unknown keys are errors.
void apply_json(Spec& s, const cq::io::json::Value& o, const std::string& where) {
  using K = cq::io::json::Value::Kind;
  CQ_CHECK(o.kind == K::object, where, ": expected an object");
  for (std::size_t i = 0; i < o.size(); ++i) {
    const std::string& k = o.keys[i];
    const auto& v = o.items[i];
    auto uint = [&](std::uint64_t max) {
      CQ_CHECK(v.kind == K::number && v.is_uint && v.uint <= max, where, ".", k, ": expected an integer in [0, ", max, "]");
      return v.uint;
    };
    if (k == "channels") s.channels = uint(4096);
    else if (k == "bits") s.bits = static_cast<int>(uint(16));
    else if (k == "iterations") s.iterations = static_cast<unsigned>(uint(100000));
    else if (k == "seed") s.seed = uint(UINT64_MAX);
    else if (k == "max_points_per_centroid") s.max_points_per_centroid = uint(1u << 30);
    else if (k == "method") {
      CQ_CHECK(v.kind == K::string && (v.string == "uniform" || v.string == "fisher"), where,
               ".method: expected \"uniform\" or \"fisher\"");
      s.fisher = v.string == "fisher";
    } else if (k == "init") {
      CQ_CHECK(v.kind == K::string && (v.string == "kmeans++" || v.string == "random"), where,
               ".init: expected \"kmeans++\" or \"random\"");
      s.init = v.string == "random" ? cq::KMeansInit::random : cq::KMeansInit::plus_plus;
    } else {
      cq::detail::fail(where, ": unknown key '", k, "'");
    }
  }
}

void print_progress(std::size_t done, std::size_t total, double elapsed) {
  const int width = 30;
  const int filled = static_cast<int>(width * done / std::max<std::size_t>(total, 1));
  const double eta = done ? elapsed / double(done) * double(total - done) : 0.0;
  std::fprintf(stderr, "\r[%.*s%s%.*s] %zu/%zu codebooks  %.1f s elapsed  ETA %.1f s ", filled,
               "==============================", filled < width ? ">" : "", width - filled - (filled < width ? 1 : 0),
               "                              ", done, total, elapsed, eta);
  if (done == total) std::fprintf(stderr, "\n");
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --keys K.npy --values V.npy [--key-grads GK.npy --value-grads GV.npy]\n"
               "          [--config CONFIG.json] [--channels C] [--bits B] [--iterations N] [--seed S]\n"
               "          [--method uniform|fisher] [--init kmeans++|random] [--max-points-per-centroid N]\n"
               "          [--threads N] [--storage f32|f16] [--meta KEY=VALUE]... [--quiet] --out FILE\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string keys, values, key_grads, value_grads, config, out, storage = "f32";
  std::size_t threads = 0;
  bool quiet = false;
  std::vector<std::pair<std::string, std::string>> meta;
  std::map<std::string, std::string> cli;  // default-spec options given on the command line
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quiet") {
      quiet = true;
      continue;
    }
    if (i + 1 >= argc || a.rfind("--", 0) != 0) return usage(argv[0]);
    const std::string v = argv[++i];
    if (a == "--keys") keys = v;
    else if (a == "--values") values = v;
    else if (a == "--key-grads") key_grads = v;
    else if (a == "--value-grads") value_grads = v;
    else if (a == "--config") config = v;
    else if (a == "--out") out = v;
    else if (a == "--storage") storage = v;
    else if (a == "--threads") threads = std::strtoul(v.c_str(), nullptr, 10);
    else if (a == "--meta") {
      const auto eq = v.find('=');
      if (eq == std::string::npos) return usage(argv[0]);
      meta.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    } else if (a == "--channels" || a == "--bits" || a == "--iterations" || a == "--seed" || a == "--method" ||
               a == "--init" || a == "--max-points-per-centroid")
      cli[a.substr(2)] = v;
    else return usage(argv[0]);
  }
  if (keys.empty() || values.empty() || out.empty()) return usage(argv[0]);

  try {
    const auto t0 = Clock::now();
    if (storage != "f32" && storage != "f16") cq::detail::fail("--storage must be f32 or f16, got '", storage, "'");
    // Configuration: file default, then command line, then per-layer overrides.
    Spec base;
    cq::io::json::Value cfg_json;
    if (!config.empty()) {
      const auto bytes = cq::io::read_file_bytes(config);
      try {
        cfg_json = cq::io::json::parse(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
      } catch (const cq::Error& e) {
        cq::detail::fail(config, ": ", e.what());
      }
      CQ_CHECK(cfg_json.kind == cq::io::json::Value::Kind::object, config, ": expected a JSON object");
      for (const auto& k : cfg_json.keys)
        CQ_CHECK(k == "default" || k == "layers", config, ": unknown key '", k, "' (expected \"default\" and \"layers\")");
      if (const auto* d = cfg_json.find("default")) apply_json(base, *d, config + ": default");
    }
    {
      std::string js = "{";
      for (const auto& [k, v] : cli) {
        const bool is_text = k == "method" || k == "init";
        const std::string key = k == "max-points-per-centroid" ? "max_points_per_centroid" : k;
        if (!is_text && (v.empty() || v.find_first_not_of("0123456789") != std::string::npos))
          cq::detail::fail("--", k, " expects a non-negative integer, got '", v, "'");
        if (js.size() > 1) js += ',';
        js += '"';
        js += key;
        js += "\":";
        if (is_text) js += '"';
        js += v;
        if (is_text) js += '"';
      }
      apply_json(base, cq::io::json::parse(js + "}"), "command line");
    }

    const Dump K = load(keys), V = load(values);
    CQ_CHECK(K.shape == V.shape, values, ": shape [", V.shape[0], ", ", V.shape[1], ", ", V.shape[2], ", ", V.shape[3],
             "] differs from the keys' [", K.shape[0], ", ", K.shape[1], ", ", K.shape[2], ", ", K.shape[3], "]");
    std::optional<Dump> GK, GV;
    if (!key_grads.empty()) GK = load(key_grads);
    if (!value_grads.empty()) GV = load(value_grads);
    for (const auto* g : {GK ? &*GK : nullptr, GV ? &*GV : nullptr})
      if (g) CQ_CHECK(g->shape == K.shape, g->name, ": gradient shape differs from the activations' shape");
    const std::size_t L = K.shape[0], H = K.shape[1], N = K.shape[2], D = K.shape[3];

    // Per (layer, kind) specs.
    std::vector<std::array<Spec, 2>> specs(L, {base, base});
    if (const auto* layers = cfg_json.find("layers")) {
      CQ_CHECK(layers->kind == cq::io::json::Value::Kind::object, config, ": \"layers\" must be an object");
      for (std::size_t i = 0; i < layers->size(); ++i) {
        const std::string& lk = layers->keys[i];
        CQ_CHECK(!lk.empty() && lk.find_first_not_of("0123456789") == std::string::npos && lk.size() < 8, config,
                 ": layer key '", lk, "' is not a layer number");
        const std::size_t l = std::stoul(lk);
        CQ_CHECK(l < L, config, ": configures layer ", l, " but the dumps hold ", L, " layers");
        const auto& lv = layers->items[i];
        CQ_CHECK(lv.kind == cq::io::json::Value::Kind::object, config, ": layers.", lk, " must be an object");
        for (std::size_t j = 0; j < lv.size(); ++j) {
          CQ_CHECK(lv.keys[j] == "k" || lv.keys[j] == "v", config, ": layers.", lk, ": unknown key '", lv.keys[j],
                   "' (expected \"k\" or \"v\")");
          apply_json(specs[l][lv.keys[j] == "v"], lv.items[j], config + ": layers." + lk + "." + lv.keys[j]);
        }
      }
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

    // One job per (layer, K|V, head), fitted in parallel.
    struct Job {
      std::size_t layer, head;
      int kind;
      cq::Codebook cb;
      double mse = 0, power = 0, seconds = 0;
    };
    std::vector<Job> jobs;
    for (std::size_t l = 0; l < L; ++l)
      for (int kind = 0; kind < 2; ++kind)
        for (std::size_t h = 0; h < H; ++h) jobs.push_back({l, h, kind, {}, 0, 0, 0});
    cq::ThreadPool pool(threads);
    std::mutex mu;
    std::size_t finished = 0;
    std::string failure;
    if (!quiet) print_progress(0, jobs.size(), 0.0);
    pool.parallel_for(jobs.size(), [&](std::size_t i) {
      Job& j = jobs[i];
      const Spec& s = specs[j.layer][j.kind];
      const Dump& X = j.kind ? V : K;
      const char* what = j.kind ? "values" : "keys";
      const auto t = Clock::now();
      try {
        const cq::ConstMatrixView<float> x(X.slice(j.layer, j.head), N, D);
        cq::Codebook cb(D, s.channels, s.bits);
        cq::FitOptions o;
        o.iterations = s.iterations;
        o.seed = s.seed;
        o.init = s.init;
        o.max_points_per_centroid = s.max_points_per_centroid;
        std::vector<float> w;
        if (s.fisher) {
          const Dump& G = j.kind ? *GV : *GK;
          w = cq::fisher_weights(cq::ConstMatrixView<float>(G.slice(j.layer, j.head), N, D), s.channels);
          cq::fit_codebook(cb, x, cq::ConstMatrixView<float>(w.data(), N, D / s.channels), o);
        } else {
          cq::fit_codebook(cb, x, {}, o);
        }
        // Reconstruction error over every calibration row (unweighted), relative to the signal.
        cq::PackedCodes codes(cb.groups(), cb.bits(), N);
        cq::encode_rows(cb.view(), x, codes.view(), 0);
        std::vector<float> back(N * D);
        cq::decode_rows(cb.view(), codes.view(), 0, cq::MatrixView<float>(back.data(), N, D));
        j.mse = cq::mse(x, cq::ConstMatrixView<float>(back.data(), N, D));
        double p = 0;
        for (std::size_t r = 0; r < N * D; ++r) p += double(x.data[r]) * x.data[r];
        j.power = p / double(N * D);
        j.cb = std::move(cb);
      } catch (const std::exception& e) {
        std::lock_guard lock(mu);
        if (failure.empty())
          failure = (j.kind ? V.name : K.name) + ": layer " + std::to_string(j.layer) + " head " +
                    std::to_string(j.head) + " " + what + ": " + e.what();
      }
      j.seconds = std::chrono::duration<double>(Clock::now() - t).count();
      std::lock_guard lock(mu);
      ++finished;
      if (!quiet) print_progress(finished, jobs.size(), std::chrono::duration<double>(Clock::now() - t0).count());
    });
    if (!failure.empty()) throw cq::Error(failure);

    cq::io::CodebookSet set;
    for (const auto& [k, v] : meta) set.metadata[k] = v;
    for (Job& j : jobs) set.add(cq::io::kv_codebook_name(j.layer, j.kind == 1, j.head), j.cb);
    cq::io::set_kv_layout(set, L, H, D);
    cq::io::save_codebooks(out, set, storage == "f16" ? cq::io::CodebookStorage::f16 : cq::io::CodebookStorage::f32);

    std::printf("cq-calibrate: %zu layers x %zu KV heads x %zu tokens x head_dim %zu -> %s\n", L, H, N, D, out.c_str());
    std::printf("| layer | K/V | config | method | bits/ch | relative MSE | fit s |\n|---|---|---|---|---|---|---|\n");
    for (std::size_t l = 0; l < L; ++l)
      for (int kind = 0; kind < 2; ++kind) {
        double mse = 0, power = 0, secs = 0;
        for (const Job& j : jobs)
          if (j.layer == l && j.kind == kind) mse += j.mse, power += j.power, secs += j.seconds;
        const Spec& s = specs[l][kind];
        std::printf("| %zu | %s | %zuc%db | %s | %.3f | %.5f | %.2f |\n", l, kind ? "V" : "K", s.channels, s.bits,
                    s.fisher ? "fisher" : "uniform", double(s.bits) / double(s.channels), mse / power, secs);
      }
    std::printf("wall time %.2f s on %zu threads\n", std::chrono::duration<double>(Clock::now() - t0).count(),
                pool.concurrency());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cq-calibrate: error: %s\n", e.what());
    return 1;
  }
}
