// The masked batched GEMM of masked_gemm.cuh: SIMT tiles of 64x64 outputs, 16-deep reduction
// steps, 256 threads with 4x4 outputs each. B tiles are masked while loaded into shared memory
// (the mask word of each element is read beside it), so W*M never exists in global memory.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <ATen/OpMathType.h>

#include "common.cuh"
#include "masked_gemm.cuh"

namespace modsplit {
namespace cuda {

constexpr int kTileM = 64, kTileN = 64, kTileR = 16, kGemmThreads = 256;

__device__ __forceinline__ int64_t batch_offset(const Strides& s, int64_t z0, int64_t z1,
                                                int64_t z2) {
  return z0 * s.b0 + z1 * s.b1 + z2 * s.b2;
}

// grid (M tiles, N tiles, min(batches, 65535)); blocks stride over the batches.
template <typename scalar_t, int MODE, bool HAS_BIAS, bool HAS_E>
__global__ void __launch_bounds__(kGemmThreads) masked_gemm_kernel(const GemmProblem p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t As[kTileR][kTileM + 1];  // As[r][m]
  __shared__ acc_t Bs[kTileR][kTileN + 1];  // Bs[r][n]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t batches = p.n0 * p.n1 * p.n2;
  const bool a_r_fast = p.sa.col == 1;  // load A along r when r is the contiguous index
  const bool b_n_fast = p.sb.col == 1;  // load B along n when n is the contiguous index
  for (int64_t z = blockIdx.z; z < batches; z += gridDim.z) {
    const int64_t z2 = z % p.n2, z1 = (z / p.n2) % p.n1, z0 = z / (p.n1 * p.n2);
    const scalar_t* a = static_cast<const scalar_t*>(p.a) + batch_offset(p.sa, z0, z1, z2);
    const scalar_t* b = static_cast<const scalar_t*>(p.b) + batch_offset(p.sb, z0, z1, z2);
    const int32_t* mask = MODE == kMaskNone ? nullptr : p.mask + batch_offset(p.sp, z0, z1, z2);
    acc_t acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);

    for (int64_t r0 = 0; r0 < p.R; r0 += kTileR) {
      for (int e = tid; e < kTileM * kTileR; e += kGemmThreads) {
        const int mm = a_r_fast ? e / kTileR : e % kTileM;
        const int rr = a_r_fast ? e % kTileR : e / kTileM;
        const int64_t m = m0 + mm, r = r0 + rr;
        As[rr][mm] = (m < p.M && r < p.R) ? static_cast<acc_t>(a[m * p.sa.row + r * p.sa.col])
                                          : acc_t(0);
      }
      for (int e = tid; e < kTileN * kTileR; e += kGemmThreads) {
        const int nn = b_n_fast ? e % kTileN : e / kTileR;
        const int rr = b_n_fast ? e / kTileN : e % kTileR;
        const int64_t n = n0 + nn, r = r0 + rr;
        acc_t v(0);
        if (n < p.N && r < p.R) {
          v = static_cast<acc_t>(b[r * p.sb.row + n * p.sb.col]);
          if (MODE != kMaskNone) {
            const int64_t row = MODE == kMaskRowN ? n : r;
            const int64_t col = MODE == kMaskRowN ? r : n;
            const uint32_t word = static_cast<uint32_t>(mask[row * p.sp.row + col / 32]);
            v *= static_cast<acc_t>((word >> (col % 32)) & 1u);  // W*M as the reference computes it
          }
        }
        Bs[rr][nn] = v;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kTileR; ++rr) {
        acc_t av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[rr][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[rr][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
      __syncthreads();
    }

    scalar_t* c = static_cast<scalar_t*>(p.c) + batch_offset(p.sc, z0, z1, z2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (m >= p.M || n >= p.N) continue;
        acc_t v = acc[i][j];
        if (HAS_BIAS) v += static_cast<acc_t>(static_cast<const scalar_t*>(p.bias)[n + z1 * p.bias_b1]);
        if (HAS_E) {
          const scalar_t* e = static_cast<const scalar_t*>(p.e) + batch_offset(p.se, z0, z1, z2);
          v *= static_cast<acc_t>(e[m * p.se.row + n * p.se.col]);
        }
        c[m * p.sc.row + n * p.sc.col] = static_cast<scalar_t>(v);
      }
    }
  }
}

template <typename scalar_t, int MODE, bool HAS_BIAS, bool HAS_E>
static void launch_typed(const GemmProblem& p) {
  const int64_t batches = p.n0 * p.n1 * p.n2;
  const int64_t m_tiles = (p.M + kTileM - 1) / kTileM, n_tiles = (p.N + kTileN - 1) / kTileN;
  TORCH_CHECK(n_tiles <= 65535, "modsplit: GEMM output has too many columns (", p.N, ")");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles),
                  static_cast<unsigned>(std::min<int64_t>(batches, 65535)));
  masked_gemm_kernel<scalar_t, MODE, HAS_BIAS, HAS_E>
      <<<grid, kGemmThreads, 0, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_masked_gemm(const GemmProblem& p, at::ScalarType dtype) {
  if (p.M == 0 || p.N == 0 || p.n0 * p.n1 * p.n2 == 0) return;
  const bool has_bias = p.bias != nullptr, has_e = p.e != nullptr;
  // The op families use: RowN (+ bias) forward, RowR backward to x, None with E for scores.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "masked_gemm_cuda", [&] {
    if (p.mode == kMaskRowN && !has_e) {
      if (has_bias) launch_typed<scalar_t, kMaskRowN, true, false>(p);
      else launch_typed<scalar_t, kMaskRowN, false, false>(p);
    } else if (p.mode == kMaskRowR && !has_bias && !has_e) {
      launch_typed<scalar_t, kMaskRowR, false, false>(p);
    } else if (p.mode == kMaskNone && !has_bias && has_e) {
      launch_typed<scalar_t, kMaskNone, false, true>(p);
    } else {
      TORCH_CHECK(false, "modsplit: unsupported masked GEMM variant (mode ", int(p.mode),
                  ", bias ", has_bias, ", epilogue ", has_e, ")");
    }
  });
}

}  // namespace cuda
}  // namespace modsplit
