#pragma once
/// cq — Coupled Quantization of LLM KV caches. The umbrella header: everything but CUDA
/// (include <cq/cuda/cuda.cuh> from nvcc-compiled code for that).

#include "cq/version.hpp"
#include "cq/config.hpp"
#include "cq/error.hpp"
#include "cq/element.hpp"
#include "cq/views.hpp"
#include "cq/executor.hpp"
#include "cq/packed_codes.hpp"
#include "cq/codebook.hpp"
#include "cq/concepts.hpp"
#include "cq/backend/scalar.hpp"
#include "cq/backend/simd.hpp"
#include "cq/backend/native.hpp"
#include "cq/kmeans.hpp"
#include "cq/quantizer.hpp"
#include "cq/coupled_quantizer.hpp"
#include "cq/io/json.hpp"
#include "cq/io/safetensors.hpp"
#include "cq/io/codebook_file.hpp"
#include "cq/baseline/uniform.hpp"
#include "cq/synthetic.hpp"
