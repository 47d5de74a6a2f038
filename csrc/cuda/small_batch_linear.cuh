// Small-batch (M <= 16 rows) masked linear for a bank of K modules over one weight: a GEMV-like
// kernel meant to be bound by reading W once plus the K packed masks.
#pragma once
#include <ATen/ATen.h>

namespace modsplit {
namespace cuda {

constexpr int64_t kSmallBatchMaxRows = 16;

// y [K, M, O] = x_k [M, I] (W * M_k)^T (+ b), M <= kSmallBatchMaxRows, dtype float/half/bf16.
// x [Kx, M, I] contiguous with x_stride = M*I (or 0 when all modules share x), w [O, I],
// packed [K, O, ceil(I/32)], bias [O] or nullptr, y [K, M, O]; all contiguous.
void launch_small_batch_linear(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                               const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                               at::Tensor& y);

}  // namespace cuda
}  // namespace modsplit
