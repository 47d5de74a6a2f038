// The sparse path of multi_masked_conv2d on the CPU: at low density the forward and grad_x touch
// only the kept weights (direct sparse convolution, sparse_conv_kernels.h) instead of
// convolving with the unpacked W*M_k; grad_scores stays a dense oneDNN weight gradient (it is
// dense by construction). Built-in rule: the kept fraction of the bank (popcount / (K*O*R)) is
// at most kSparseConvMaxDensity and the computed planes (the output's for the forward, the
// input's for grad_x) hold at least kSparseConvMinPlane positions.
// $MODSPLIT_SPARSE_CONV_MAX_DENSITY (read at every call) replaces it by "kept fraction at most
// the value" (0 = always dense, 1 = sparse wherever eligible). Eligible: float32 or
// float64 (the backward of float16 / bfloat16 runs in float32, so its grad_x is eligible too),
// one group, dilation 1, a finite input; grad_x also needs stride 1 and padding < kernel size
// (it is the convolution of grad_out with the flipped, transposed kept weights).
#pragma once
#include <ATen/ATen.h>

#include "../conv_geometry.h"

namespace modsplit {

// Measured crossovers (benchmarks/RESULTS.md, co-training "Stop 15": density on the small_vgg
// layers; a 128-channel layer at 2 x 2 positions is faster dense, at 4 x 4 about even).
constexpr double kSparseConvMaxDensity = 0.3;
constexpr int64_t kSparseConvMinPlane = 16;
constexpr const char* kEnvSparseConvMaxDensity = "MODSPLIT_SPARSE_CONV_MAX_DENSITY";

// The density threshold in force; *from_env tells whether the variable set it.
double sparse_conv_max_density(bool* from_env);

// Whether the forward (grad_x = false) or grad_x (grad_x = true) of a bank with packed
// int32 [K, O, words] (contiguous) in dtype takes the sparse path.
bool use_sparse_conv(const at::Tensor& packed3, const ConvGeom& g, at::ScalarType dtype,
                     bool grad_x);

// The two sparse computations return an undefined tensor when their input held a NaN or inf
// (seen while each sample is copied into the kernel's buffer): NaN/inf times a masked-out weight
// must give NaN, as in F.conv2d on W*M, so the caller then runs the dense path.
// out [K, B, O, Ho, Wo] = conv2d of x5 [Kx, B, C, H, W] with W*M_k per module, plus bias [O].
at::Tensor sparse_masked_conv_forward(const at::Tensor& x5, const at::Tensor& weight,
                                      const at::Tensor& packed3,
                                      const c10::optional<at::Tensor>& bias, const ConvGeom& g);

// grad_x [Kx, B, C, H, W] of grad_out5 [K, B, O, Ho, Wo] (summed over the modules when Kx = 1).
at::Tensor sparse_masked_conv_grad_x(const at::Tensor& grad_out5, const at::Tensor& weight,
                                     const at::Tensor& packed3, const ConvGeom& g);

}  // namespace modsplit
