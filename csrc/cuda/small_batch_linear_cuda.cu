// The small-batch masked linear of small_batch_linear.cuh: a GEMV-style kernel built to be bound
// by reading W (and the packed bits) once, for every module of the bank.
//
// One warp per (output row o, group of up to KT modules, slice of I). Each lane walks its slice of
// the row with 16-byte vector loads of W (8 half/bf16 or 4 float elements: they share one mask
// word, since the width divides 32), so a warp reads 512 contiguous bytes per step; for each of
// the group's modules it loads the mask word covering its elements (4-8 lanes share a word: one
// coalesced 32-byte read per warp) and expands the bits in registers, then multiplies by the
// matching x elements (16-byte loads; x is small and stays in L1/L2) into fp32 accumulators
// acc[KT][MT]. Each W fragment is loaded once and used by all KT modules and MT rows. A warp
// shuffle reduction ends the row.
// Filling the GPU: warps = O x module groups x splits; when O x groups is below ~8 warps per SM
// the reduction dimension is split (split-K) and the partial sums land in an fp32 workspace that
// an ATen reduction folds (plus the bias) into y.
// Rows not a multiple of the vector width, or unaligned tensors, take the one-element variant
// (lanes on consecutive elements, still coalesced). Not yet run on a GPU.
#include <ATen/OpMathType.h>

#include "common.cuh"
#include "small_batch_linear.cuh"

namespace modsplit {
namespace cuda {

constexpr int kWarpsPerBlock = 8;

// MT: x rows held (M <= MT); KT: modules per warp. y [K, M, O] (splits == 1, with bias) or
// ws fp32 [splits, K, M, O] (partial sums, no bias). x [Kx, M, I], module stride x_stride.
template <typename T, int VEC, int MT, int KT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
small_batch_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
                   const int32_t* __restrict__ packed, const T* __restrict__ bias,
                   T* __restrict__ y, float* __restrict__ ws, int64_t K, int64_t M, int64_t O,
                   int64_t I, int64_t groups, int64_t splits, int64_t slice) {
  const int lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gw >= O * groups * splits) return;  // whole warps exit together
  const int64_t split = gw % splits;
  const int64_t grp = (gw / splits) % groups;
  const int64_t o = gw / (splits * groups);
  const int64_t k0 = grp * KT;
  const int64_t words = (I + 31) / 32;
  const int64_t i_begin = split * slice, i_end = i_begin + slice < I ? i_begin + slice : I;
  float acc[KT][MT];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[kk][m] = 0.f;

  const T* wrow = w + o * I;
  for (int64_t i = i_begin + lane * VEC; i < i_end; i += 32 * VEC) {
    const Pack<T, VEC> wv = *reinterpret_cast<const Pack<T, VEC>*>(wrow + i);
    float wf[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) wf[j] = static_cast<float>(wv.v[j]);
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      const int64_t k = k0 + kk;
      if (k >= K) break;
      const uint32_t bits =
          static_cast<uint32_t>(__ldg(packed + (k * O + o) * words + i / 32)) >> (i % 32);
      float wm[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) wm[j] = ((bits >> j) & 1u) ? wf[j] : 0.f;
      const T* xk = x + k * x_stride + i;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(xk + m * I);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[kk][m] += wm[j] * static_cast<float>(xv.v[j]);
        }
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float total = warp_sum_float(acc[kk][m]);
      const int64_t k = k0 + kk;
      if (lane == (kk * MT + m) % 32 && k < K && m < M) {
        const int64_t at = (k * M + m) * O + o;
        if (splits == 1) {
          y[at] = static_cast<T>(total + (bias ? static_cast<float>(bias[o]) : 0.f));
        } else {
          ws[split * K * M * O + at] = total;
        }
      }
    }
  }
}

template <typename T, int VEC, int MT>
static void launch_mt(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                      const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                      at::Tensor& y) {
  constexpr int KT = MT >= 16 ? 2 : MT >= 8 ? 4 : 8;  // acc[KT][MT]: at most 32 registers
  const int64_t O = w.size(0), I = w.size(1);
  const int64_t groups = (K + KT - 1) / KT;
  // Split the reduction while the grid would hold fewer than ~8 warps per SM, keeping each
  // slice at least 1024 columns (several vector steps per lane), a multiple of 32 * VEC.
  const int64_t target = int64_t{8} * sm_count();
  const int64_t step = 32 * VEC;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(target / std::max<int64_t>(1, O * groups),
                                                          I / 1024));
  const int64_t slice = (I / splits + step - 1) / step * step;
  splits = (I + slice - 1) / slice;
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits, K, M, O}, y.options().dtype(at::kFloat));
  const int64_t warps = O * groups * splits;
  const unsigned blocks = static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
  small_batch_kernel<T, VEC, MT, KT><<<blocks, 32 * kWarpsPerBlock, 0, current_stream()>>>(
      x.data_ptr<T>(), x_stride, w.data_ptr<T>(), packed.data_ptr<int32_t>(),
      static_cast<const T*>(bias), y.data_ptr<T>(), splits > 1 ? ws.data_ptr<float>() : nullptr,
      K, M, O, I, groups, splits, slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    auto total = ws.sum(0);  // [K, M, O] fp32
    if (bias) {
      total.add_(at::from_blob(const_cast<void*>(bias), {O}, y.options()).to(at::kFloat));
    }
    y.copy_(total);
  }
}

template <typename T, int VEC>
static void launch_vec(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                       const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                       at::Tensor& y) {
  if (M <= 1) return launch_mt<T, VEC, 1>(x, x_stride, w, packed, bias, K, M, y);
  if (M <= 2) return launch_mt<T, VEC, 2>(x, x_stride, w, packed, bias, K, M, y);
  if (M <= 4) return launch_mt<T, VEC, 4>(x, x_stride, w, packed, bias, K, M, y);
  if (M <= 8) return launch_mt<T, VEC, 8>(x, x_stride, w, packed, bias, K, M, y);
  return launch_mt<T, VEC, 16>(x, x_stride, w, packed, bias, K, M, y);
}

template <typename T>
static void launch_typed(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                         const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                         at::Tensor& y) {
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (w.size(1) % kVec == 0 && aligned(x.data_ptr()) && aligned(w.data_ptr())) {
    launch_vec<T, kVec>(x, x_stride, w, packed, bias, K, M, y);
  } else {
    launch_vec<T, 1>(x, x_stride, w, packed, bias, K, M, y);
  }
}

void launch_small_batch_linear(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                               const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                               at::Tensor& y) {
  TORCH_CHECK(M >= 1 && M <= kSmallBatchMaxRows && w.scalar_type() != at::kDouble,
              "modsplit: small-batch linear needs 1 <= M <= 16 rows and a float/half/bf16 dtype");
  if (K == 0 || w.size(0) == 0) return;
  if (w.size(1) == 0) {  // empty reduction: y = bias
    y.zero_();
    if (bias) y.add_(at::from_blob(const_cast<void*>(bias), {w.size(0)}, y.options()));
    return;
  }
  switch (w.scalar_type()) {
    case at::kFloat: launch_typed<float>(x, x_stride, w, packed, bias, K, M, y); break;
    case at::kHalf: launch_typed<at::Half>(x, x_stride, w, packed, bias, K, M, y); break;
    case at::kBFloat16: launch_typed<at::BFloat16>(x, x_stride, w, packed, bias, K, M, y); break;
    default: TORCH_CHECK(false, "modsplit: small-batch linear got dtype ", w.scalar_type());
  }
}

}  // namespace cuda
}  // namespace modsplit
