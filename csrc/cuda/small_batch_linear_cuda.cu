// The small-batch masked linear of small_batch_linear.cuh (SIMT, fp32 accumulation).
//
// Block: 32 output rows o0..o0+31 (lane j owns row o0 + j) and up to 8 modules (warp w owns
// module k = k0 + w). The I dimension is walked in chunks of 32 = one mask word per row:
//   Ws[32 rows][32 cols]   the W chunk, loaded from global memory ONCE per block and shared by
//                          all the block's modules (blocks of the same rows run back to back,
//                          blockIdx.x being the module group, so W is read from DRAM once);
//   Xs[w][32 cols][MT]     the x chunk of each module, m innermost for float4 broadcast reads.
// Each lane reads its row's mask word of its warp's module straight from global memory and
// expands it bit by bit in registers: acc[m] += W[o, i] * bit_i * x_k[m, i].
// At M = 16, K = 10 this SIMT kernel is bound by FMA issue, not bandwidth (about 160 FMAs per
// weight); a tensor-core (mma.sync) variant is the next step. Not yet run on a GPU.
#include <ATen/OpMathType.h>

#include "common.cuh"
#include "small_batch_linear.cuh"

namespace modsplit {
namespace cuda {

constexpr int kRowsPerBlock = 32;
constexpr int kMaxModsPerBlock = 8;

// grid (module groups, ceil(O/32)); block 32 * mods_per_block threads. MT: rows of x held
// (M <= MT, a multiple of 4); rows m >= M are zero in Xs and never written.
template <typename scalar_t, int MT>
__global__ void __launch_bounds__(32 * kMaxModsPerBlock)
small_batch_linear_kernel(const scalar_t* __restrict__ x, int64_t x_stride,
                          const scalar_t* __restrict__ w, const int32_t* __restrict__ packed,
                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int64_t K,
                          int64_t M, int64_t O, int64_t I, int mods_per_block) {
  __shared__ float Ws[kRowsPerBlock][33];
  __shared__ __align__(16) float Xs[kMaxModsPerBlock][32][MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * mods_per_block;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int64_t k = k0 + warp, o = o0 + lane;
  const int64_t words = (I + 31) / 32;
  const bool owner = k < K && o < O;  // this lane owns output row o of module k
  const int32_t* mask_row = owner ? packed + (k * O + o) * words : packed;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  for (int64_t c = 0; c < words; ++c) {
    const int64_t i0 = c * 32;
    for (int e = threadIdx.x; e < kRowsPerBlock * 32; e += blockDim.x) {
      const int rr = e / 32, ii = e % 32;
      const bool ok = o0 + rr < O && i0 + ii < I;
      Ws[rr][ii] = ok ? static_cast<float>(w[(o0 + rr) * I + i0 + ii]) : 0.f;
    }
    for (int e = threadIdx.x; e < mods_per_block * MT * 32; e += blockDim.x) {
      const int mw = e / (MT * 32), m = (e / 32) % MT, ii = e % 32;
      const int64_t km = k0 + mw;
      const bool ok = km < K && m < M && i0 + ii < I;
      Xs[mw][ii][m] = ok ? static_cast<float>(x[km * x_stride + m * I + i0 + ii]) : 0.f;
    }
    __syncthreads();
    if (owner) {
      const uint32_t word = static_cast<uint32_t>(mask_row[c]);
#pragma unroll 4
      for (int ii = 0; ii < 32; ++ii) {
        const float wm = Ws[lane][ii] * static_cast<float>((word >> ii) & 1u);
        const float4* xv = reinterpret_cast<const float4*>(&Xs[warp][ii][0]);
#pragma unroll
        for (int q = 0; q < MT / 4; ++q) {
          const float4 v = xv[q];
          acc[4 * q + 0] += wm * v.x;
          acc[4 * q + 1] += wm * v.y;
          acc[4 * q + 2] += wm * v.z;
          acc[4 * q + 3] += wm * v.w;
        }
      }
    }
    __syncthreads();
  }

  if (owner) {
    const float b = bias ? static_cast<float>(bias[o]) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) y[(k * M + m) * O + o] = static_cast<scalar_t>(acc[m] + b);
    }
  }
}

template <typename scalar_t, int MT>
static void launch_typed(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                         const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                         at::Tensor& y) {
  const int64_t O = w.size(0), I = w.size(1);
  // Balanced module groups of at most 8: K = 10 runs as 2 groups of 5.
  const int64_t groups = (K + kMaxModsPerBlock - 1) / kMaxModsPerBlock;
  const int mods = static_cast<int>((K + groups - 1) / groups);
  const int64_t row_tiles = (O + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(row_tiles <= 65535, "modsplit: too many output features (", O, ")");
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(row_tiles));
  small_batch_linear_kernel<scalar_t, MT><<<grid, 32 * mods, 0, current_stream()>>>(
      x.data_ptr<scalar_t>(), x_stride, w.data_ptr<scalar_t>(), packed.data_ptr<int32_t>(),
      static_cast<const scalar_t*>(bias), y.data_ptr<scalar_t>(), K, M, O, I, mods);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_small_batch_linear(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                               const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                               at::Tensor& y) {
  TORCH_CHECK(M >= 1 && M <= kSmallBatchMaxRows && w.scalar_type() != at::kDouble,
              "modsplit: small-batch linear needs 1 <= M <= 16 rows and a float/half/bf16 dtype");
  if (K == 0 || w.size(0) == 0) return;
  const bool few = M <= 4;
  switch (w.scalar_type()) {
    case at::kFloat:
      (few ? launch_typed<float, 4> : launch_typed<float, 16>)(x, x_stride, w, packed, bias, K, M, y);
      break;
    case at::kHalf:
      (few ? launch_typed<at::Half, 4> : launch_typed<at::Half, 16>)(x, x_stride, w, packed, bias,
                                                                       K, M, y);
      break;
    case at::kBFloat16:
      (few ? launch_typed<at::BFloat16, 4> : launch_typed<at::BFloat16, 16>)(x, x_stride, w, packed,
                                                                               bias, K, M, y);
      break;
    default:
      TORCH_CHECK(false, "modsplit: small-batch linear got dtype ", w.scalar_type());
  }
}

}  // namespace cuda
}  // namespace modsplit
