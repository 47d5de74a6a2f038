// Which path a masked product takes on CUDA, and the bound of its scratch buffer: the C++ twin of
// modsplit/routing.py (tests/test_routing.py checks that the constants and variable names agree).
//   fused     rows per module <= fused_max_rows(dtype): the small-batch kernel reads W and the
//             packed bits once for all modules and never writes W*M (small_batch_linear_cuda.cu).
//   expanded  otherwise (and for every convolution, grad_x and float64): expand_mask_cuda.cu
//             writes W*M_k for a chunk of modules into a scratch buffer of at most
//             scratch_bytes(), then cuBLAS (at::mm / at::bmm / at::addmm) or one cuDNN grouped
//             convolution does the arithmetic on tensor cores.
// Design crossover (to be measured by benchmarks/gpu_check.py on the first GPU run): a SIMT kernel
// doing 2*M*K flops per bf16 weight stays bandwidth-bound up to M*K ~ 16 on an H100/H200
// (~67 TFLOP/s fp32 FMA against ~4.3 TB/s of copy bandwidth); above it cuBLAS wins.
// Environment, read at every call: MODSPLIT_FUSED_MAX_ROWS (one threshold for every dtype, at
// most kSmallBatchMaxRows on CUDA), MODSPLIT_SCRATCH_BYTES.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>

#include "small_batch_linear.cuh"

namespace modsplit {
namespace cuda {

constexpr int64_t kFusedMaxRowsHalf = 16;
constexpr int64_t kFusedMaxRowsBFloat16 = 16;
constexpr int64_t kFusedMaxRowsFloat = 16;
constexpr int64_t kFusedMaxRowsDouble = 0;  // no fused float64 kernel: always expanded
constexpr int64_t kScratchBytes = int64_t{256} << 20;
constexpr const char* kEnvFusedMaxRows = "MODSPLIT_FUSED_MAX_ROWS";
constexpr const char* kEnvScratchBytes = "MODSPLIT_SCRATCH_BYTES";

// The non-negative integer in environment variable `name`, or `fallback` when unset or empty.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(raw, &end, 10);
  TORCH_CHECK(end != raw && *end == '\0' && value >= 0, "modsplit: $", name,
              " must be an integer >= 0, got '", raw, "'");
  return value;
}

inline int64_t fused_max_rows(at::ScalarType dtype) {
  int64_t rows = 0;
  switch (dtype) {
    case at::kHalf: rows = kFusedMaxRowsHalf; break;
    case at::kBFloat16: rows = kFusedMaxRowsBFloat16; break;
    case at::kFloat: rows = kFusedMaxRowsFloat; break;
    default: return 0;  // float64: no fused kernel
  }
  return std::min(env_int(kEnvFusedMaxRows, rows), kSmallBatchMaxRows);
}

// True when `rows` rows per module take the fused small-batch kernel.
inline bool use_fused(int64_t rows, at::ScalarType dtype) {
  return rows >= 1 && rows <= fused_max_rows(dtype);
}

// Modules per chunk of the expanded path: as many as fit in the scratch bound, at least 1.
inline int64_t module_chunk(int64_t K, int64_t bytes_per_module) {
  const int64_t fit = env_int(kEnvScratchBytes, kScratchBytes) / std::max<int64_t>(1, bytes_per_module);
  return std::max<int64_t>(1, std::min(K, fit));
}

}  // namespace cuda
}  // namespace modsplit
