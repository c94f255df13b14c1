// Linked into cq's CUDA targets when they are built for a compile check only
// (CQ_CUDA_COMPILE_CHECK: PTX generated without optimisation, host code at -O0): such a binary
// would run, slowly, and its timings would mislead, so it stops as it loads.
#include <cstdio>
#include <cstdlib>

namespace {
struct CompileCheckGuard {
  CompileCheckGuard() {
    std::fputs("cq: this binary was built with CQ_CUDA_COMPILE_CHECK=ON, for a compile check only (PTX "
               "without optimisation); reconfigure with -DCQ_CUDA_COMPILE_CHECK=OFF to run it\n",
               stderr);
    std::exit(2);
  }
} guard;
}  // namespace
