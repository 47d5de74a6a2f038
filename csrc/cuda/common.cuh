// Helpers shared by the CUDA kernels of modsplit (device checks, launch sizes, warp utilities).
#pragma once
// ATen/cuda/CUDAContext.h is avoided on purpose: it includes cusparse.h/cublas headers, which a
// bare CUDA toolkit (nvcc + cudart only) lacks. The c10 stream/guard headers need cudart only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"

namespace modsplit {
namespace cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "modsplit: ", name, " must be a CUDA tensor, got device ", t.device());
}

// Blocks for `n` work items at `per_block` items each, capped at `cap` (kernels grid-stride).
inline unsigned int blocks_for(int64_t n, int64_t per_block, int64_t cap = 1 << 20) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, cap)));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessors of the current device.
inline int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_sum_float(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// VEC elements of T in one aligned vector load / store (16 bytes for the kernels' widths).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Bits of the lanes below this one: 0b0..01..1 with `lane` ones.
__device__ __forceinline__ unsigned int lanes_below(int lane) { return (1u << lane) - 1u; }

}  // namespace cuda
}  // namespace modsplit
