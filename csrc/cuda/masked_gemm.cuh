// A batched GEMM whose B operand is masked by packed bits, shared by the linear and conv ops.
//
// For every batch index z = (z0 * n1 + z1) * n2 + z2 (z0 < n0, z1 < n1, z2 < n2):
//   C[m, n] = (sum_{r < R} A[m, r] * B[r, n] * bit[r, n] + bias[n]) * E[m, n]
// where bit[r, n] is bit `col % 32` of mask word [row, col / 32] with (row, col) = (n, r) for
// kMaskRowN (B is a weight W[o=n, i=r]), (r, n) for kMaskRowR (B is W[o=r, i=n]); 1 for kMaskNone.
// bias and E are optional. Accumulation in fp32 (fp64 for double); C is written in the input dtype.
#pragma once
#include <ATen/ATen.h>

namespace modsplit {
namespace cuda {

enum MaskMode : int { kMaskNone = 0, kMaskRowN = 1, kMaskRowR = 2 };

// Element offsets of one operand: b0/b1/b2 per batch coordinate, row/col per matrix index
// (A: row = m, col = r; B: row = r, col = n; C and E: row = m, col = n; mask: row = words).
struct Strides {
  int64_t b0 = 0, b1 = 0, b2 = 0, row = 0, col = 0;
};

struct GemmProblem {
  int64_t M = 0, N = 0, R = 0;
  int64_t n0 = 1, n1 = 1, n2 = 1;
  const void* a = nullptr;
  Strides sa;
  const void* b = nullptr;
  Strides sb;
  const int32_t* mask = nullptr;  // int32 words; sp.row = words per mask row
  Strides sp;
  MaskMode mode = kMaskNone;
  void* c = nullptr;
  Strides sc;
  const void* bias = nullptr;  // bias[n + z1 * bias_b1], or nullptr
  int64_t bias_b1 = 0;
  const void* e = nullptr;  // epilogue multiplier E, or nullptr
  Strides se;
};

// Launches on the current stream; a, b, c, bias, e all have dtype `dtype` (float types only).
void launch_masked_gemm(const GemmProblem& p, at::ScalarType dtype);

}  // namespace cuda
}  // namespace modsplit
