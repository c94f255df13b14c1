// The attention conformance suite: every CPU backend of this build, every attention method, over
// the shared cases (attention_cases.hpp), against the double-precision oracle. Compiled for
// AVX-512, AVX2 and baseline x86-64 builds (tests/CMakeLists.txt); CUDA runs the same cases in
// tests/cuda.

#include "attention_cases.hpp"
#include "backends.hpp"

using namespace cq;

namespace {

template <class Backend, element_type T>
void run_case(const test::AttentionCase& c) {
  CAPTURE(c.name());
  CAPTURE(Backend::name);
  const test::CaseCache<T, Backend> cc = test::build_case<T, Backend>(c);
  const std::size_t qw = cc.q_heads * c.D, rows = cc.indptr.back();
  std::vector<float> out(rows * qw);
  for (AttentionMethod m : {AttentionMethod::fused, AttentionMethod::fused_histogram, AttentionMethod::fused_centroids,
                            AttentionMethod::dequantize}) {
    CAPTURE(static_cast<int>(m));
    std::fill(out.begin(), out.end(), -1.0f);
    cc.cache->attend(0, cc.seqs, cc.indptr, ConstMatrixView<float>(cc.q.data(), rows, qw), MatrixView<float>(out.data(), rows, qw),
                     {.logits_soft_cap = c.soft_cap, .method = m});
    test::check_against_oracle(c, cc, out, 1e-5);
  }
}

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("attention conformance: every method matches the oracle over the shared cases", Backend, attn_conf) {
  INFO("instruction set of this build: ", simd_isa_name());
  // The scalar reference is slow on the large shapes; it runs every third grid shape.
  for (const test::AttentionCase& c : test::attention_cases(std::is_same_v<Backend, backend::Scalar> ? 3 : 1))
    run_case<Backend, float>(c);
}
TEST_CASE_TEMPLATE_APPLY(attn_conf, test::conformance_backends);

TEST_CASE_TEMPLATE_DEFINE("attention conformance: fp16 and bf16 caches", Backend, attn_conf_16) {
  using test::AttentionCase;
  run_case<Backend, half>(AttentionCase::of(128, 8, 8, 32, 4, 4, {1700, 33}).with_seed(5));
  run_case<Backend, bfloat16>(AttentionCase::of(64, 4, 4, 0, 0, 1, {300}).with_seed(6));
  run_case<Backend, half>(AttentionCase::of(64, 2, 10, 32, 0, 8, {1100}).with_queries(3).with_rope(RopeConfig{}).with_seed(7));
}
TEST_CASE_TEMPLATE_APPLY(attn_conf_16, test::conformance_backends);
