// The drivers of the masked linear products on the CPU (masked_linear_cpu.cpp), shared by the
// multi-module ops and the ragged one (ragged_masked_linear_cpu.cpp). Every product is brought
// to K modules (masks p3 int32 [K, O, words]) over one weight [O, I] and sources x3 [S, N, I],
// S = 1 (one input shared by the modules) or K.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace modsplit {
namespace linear_impl {

// x3 [S, N, I], p3 [K, O, words], bias [O] or none -> [K, N, O] = x3[k] (W*M_k)^T + b.
at::Tensor forward_impl(const at::Tensor& x3, const at::Tensor& weight, const at::Tensor& p3,
                        const c10::optional<at::Tensor>& bias);

// gs [K, O, I] (contiguous; every element written) = (g3[k]^T x3[k or 0]) * W; g3 [K, N, O].
void grad_scores_into(const at::Tensor& g3, const at::Tensor& x3, const at::Tensor& w,
                      const at::Tensor& p3, at::Tensor& gs);

// gs (contiguous, gt.size(0) * I elements) = (gt [M, N] x [N, I]) * W with M = K*O (row r
// times W's row r % O): one GEMM, on x's nonzero columns only where it has enough zero ones.
void grad_scores_gemm(const at::Tensor& gt, const at::Tensor& x, const at::Tensor& w,
                      at::Tensor& gs);

// g3 [K, N, O], x3 [S, N, I] -> (grad_x [S, N, I] (summed over the modules when S = 1),
// grad_scores [K, O, I], grad_bias [O]); undefined where output_mask is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& g3,
                                                             const at::Tensor& x3,
                                                             const at::Tensor& weight,
                                                             const at::Tensor& p3,
                                                             std::array<bool, 3> output_mask);

// Whether the float32 bit walk beats tiles + BLAS for `rows` rows of module `module` of weight
// w [O, I] under masks p3 [K, O, words] (the rule of use_bit_walk; false for other dtypes).
bool walk_wins(const at::Tensor& w, const at::Tensor& p3, int64_t module, int64_t rows);

}  // namespace linear_impl
}  // namespace modsplit
