// Proves an engine can use cq through cq::cq alone: fit, encode, decode, and check the error.
#include <cq/cq.hpp>

#include <cstdio>

int main() {
  const auto x = cq::synthetic_kv(1024, 64);
  cq::CoupledQuantizer<4, 6> q(64);
  q.fit(cq::ConstMatrixView<float>(x.data(), 1024, 64));
  const auto back = q.decode(q.encode(cq::ConstMatrixView<float>(x.data(), 1024, 64)));
  const double err = cq::mse(cq::ConstMatrixView<float>(x.data(), 1024, 64), cq::ConstMatrixView<float>(back.data(), 1024, 64));
  std::printf("consumer: cq %s, %s backend, mse %.4f\n", cq::version_string, cq::simd_isa_name(), err);
  return err > 0.0 && err < 1.0 ? 0 : 1;
}
