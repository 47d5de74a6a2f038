// The bit-expansion kernel of expand_mask.cuh. Bandwidth-bound: each thread moves 16 bytes of W
// (8 half/bf16, 4 float, 2 double: all inside one mask word, since they divide 32) with one
// vector load and one vector store, and reads the word holding their bits (consecutive threads
// share words, so a warp's mask reads are a few cached transactions). Rows whose length is not a
// multiple of the vector width, or unaligned buffers, take the one-element variant.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <ATen/Dispatch.h>

#include "common.cuh"
#include "expand_mask.cuh"

namespace modsplit {
namespace cuda {

// Slot s covers VEC consecutive columns of one weight row of one module: s = (k * O + o) * R/VEC
// + i/VEC. Grid-strided over c * O * R / VEC slots.
template <typename T, int VEC>
__global__ void expand_kernel(const T* __restrict__ w, const int32_t* __restrict__ packed,
                              T* __restrict__ out, int64_t c, int64_t O, int64_t R, int64_t words,
                              int64_t Og, bool group_major) {
  const int64_t per_row = R / VEC, per_module = O * per_row, total = c * per_module;
  const T zero = static_cast<T>(0.f);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < total;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = s / per_module;
    const int64_t rest = s - k * per_module;
    const int64_t o = rest / per_row;
    const int64_t i = (rest - o * per_row) * VEC;
    const uint32_t bits = static_cast<uint32_t>(__ldg(packed + (k * O + o) * words + i / 32)) >>
                          (i % 32);
    Pack<T, VEC> val = *reinterpret_cast<const Pack<T, VEC>*>(w + o * R + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) val.v[j] = ((bits >> j) & 1u) ? val.v[j] : zero;
    const int64_t row = group_major ? ((o / Og) * c + k) * Og + o % Og : k * O + o;
    *reinterpret_cast<Pack<T, VEC>*>(out + row * R + i) = val;
  }
}

void expand_masked_weight(const at::Tensor& w, const at::Tensor& packed, int64_t k0, int64_t c,
                          int64_t groups, bool group_major, at::Tensor& out) {
  const int64_t O = w.size(0), R = O ? w.numel() / O : 0, words = packed.size(-1);
  TORCH_CHECK(w.is_contiguous() && packed.is_contiguous() && out.is_contiguous() &&
                  out.numel() >= c * O * R && k0 + c <= packed.size(0),
              "modsplit: expand_masked_weight got an inconsistent scratch buffer");
  if (c * O * R == 0) return;
  const int32_t* p = packed.data_ptr<int32_t>() + k0 * O * words;
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "expand_masked_weight",
                                  [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* src = w.data_ptr<scalar_t>();
    auto* dst = out.data_ptr<scalar_t>();
    const bool aligned = R % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(dst) % 16 == 0;
    const int64_t slots = c * O * R / (aligned ? kVec : 1);
    const unsigned blocks = blocks_for(slots, kThreads, int64_t{sm_count()} * 16);
    if (aligned) {
      expand_kernel<scalar_t, kVec><<<blocks, kThreads, 0, current_stream()>>>(
          src, p, dst, c, O, R, words, O / groups, group_major);
    } else {
      expand_kernel<scalar_t, 1><<<blocks, kThreads, 0, current_stream()>>>(
          src, p, dst, c, O, R, words, O / groups, group_major);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace modsplit
