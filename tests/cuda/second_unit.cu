// A second translation unit that includes cq's CUDA headers, linked into cq_cuda_tests beside
// gpu_glue.cu: the build fails to link if a header defines a kernel (or any function) that is not
// a template or inline, since each unit would then define it (cuda.cuh says why kernels are
// templates). Nothing here runs.
#include <cq/cuda/cuda.cuh>
