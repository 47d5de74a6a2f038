// masked_conv2d / multi_masked_conv2d forward and backward on CUDA: the input is unfolded with
// at::im2col (cols [B, C*kh*kw, L], L = Ho*Wo, rows ordered c*kh*kw + ky*kw + kx like the
// weight's flat columns) and the masked GEMM of masked_gemm.cuh runs per (module, group, image)
// on the batch grid dimension, so W*M never exists in global memory.
//   forward:     y[k, b, g*Og + o, l] = sum_r W[g*Og + o, r] M_k[g*Og + o, r] cols[b, g*Rg + r, l]
//   grad_x:      dcols[k, b, g*Rg + r, l] = sum_o W M_k [g*Og + o, r] g[k, b, g*Og + o, l]; col2im
//   grad_scores: gs[k, g*Og + o, r] = (sum_{b, l} g[k, b, g*Og + o, l] cols[b, g*Rg + r, l]) * W
//   grad_bias:   ATen reduction of g over all dims but the channel.
// Og = O / groups output channels and Rg = C/groups*kh*kw weight columns per group.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include "../conv_geometry.h"
#include "common.cuh"
#include "masked_gemm.cuh"

namespace modsplit {
namespace cuda {



// cols [Kx*B, C*kh*kw, L] of x [.., B, C, H, W] (Kx = 1 when shared).
static at::Tensor unfold_input(const at::Tensor& x, const ConvGeom& s, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto x4 = x.reshape({-1, s.C, s.H, s.W}).contiguous();
  return at::im2col(x4, {s.kh, s.kw}, dilation, padding, stride).contiguous();
}

// y [K, B, O, L] from cols [Kx*B, C*kh*kw, L].
static void forward_gemm(const at::Tensor& cols, const at::Tensor& w, const at::Tensor& packed,
                         const void* bias, const ConvGeom& s, at::Tensor& y) {
  const int64_t Ctot = s.G * s.R;
  GemmProblem g;
  g.M = s.L;
  g.N = s.Og;
  g.R = s.R;
  g.n0 = s.K;
  g.n1 = s.G;
  g.n2 = s.B;
  g.a = cols.data_ptr();  // A[m=l, r] = cols[b, g*Rg + r, l]
  g.sa = {s.shared() ? 0 : s.B * Ctot * s.L, s.R * s.L, Ctot * s.L, 1, s.L};
  g.b = w.data_ptr();  // B[r, n=o] = W[g*Og + o, r]
  g.sb = {0, s.Og * s.R, 0, 1, s.R};
  g.mask = packed.data_ptr<int32_t>();
  g.mode = kMaskRowN;
  g.sp = {s.O * s.words, s.Og * s.words, 0, s.words, 0};
  g.c = y.data_ptr();  // C[m=l, n=o] = y[k, b, g*Og + o, l]
  g.sc = {s.B * s.O * s.L, s.Og * s.L, s.O * s.L, 1, s.L};
  g.bias = bias;
  g.bias_b1 = s.Og;
  launch_masked_gemm(g, w.scalar_type());
}

// dcols [K, B, C*kh*kw, L] from grad [K, B, O, L].
static void grad_cols_gemm(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& packed,
                           const ConvGeom& s, at::Tensor& dcols) {
  const int64_t Ctot = s.G * s.R;
  GemmProblem g;
  g.M = s.L;
  g.N = s.R;
  g.R = s.Og;
  g.n0 = s.K;
  g.n1 = s.G;
  g.n2 = s.B;
  g.a = grad.data_ptr();  // A[m=l, r=o] = grad[k, b, g*Og + o, l]
  g.sa = {s.B * s.O * s.L, s.Og * s.L, s.O * s.L, 1, s.L};
  g.b = w.data_ptr();  // B[r=o, n] = W[g*Og + o, n]
  g.sb = {0, s.Og * s.R, 0, s.R, 1};
  g.mask = packed.data_ptr<int32_t>();
  g.mode = kMaskRowR;
  g.sp = {s.O * s.words, s.Og * s.words, 0, s.words, 0};
  g.c = dcols.data_ptr();  // C[m=l, n] = dcols[k, b, g*Rg + n, l]
  g.sc = {s.B * Ctot * s.L, s.R * s.L, Ctot * s.L, 1, s.L};
  launch_masked_gemm(g, w.scalar_type());
}

// gs [K, O, Rg] from gp [K, O, B*L] (grad, channel-major) and colsp [Kx, C*kh*kw, B*L].
static void grad_scores_gemm(const at::Tensor& gp, const at::Tensor& colsp, const at::Tensor& w,
                             const ConvGeom& s, at::Tensor& gs) {
  const int64_t Ctot = s.G * s.R, BL = s.B * s.L;
  GemmProblem g;
  g.M = s.Og;
  g.N = s.R;
  g.R = BL;
  g.n0 = s.K;
  g.n1 = s.G;
  g.a = gp.data_ptr();  // A[m=o, r=(b, l)] = gp[k, g*Og + o, r]
  g.sa = {s.O * BL, s.Og * BL, 0, BL, 1};
  g.b = colsp.data_ptr();  // B[r=(b, l), n] = colsp[k, g*Rg + n, r]
  g.sb = {s.shared() ? 0 : Ctot * BL, s.R * BL, 0, 1, BL};
  g.e = w.data_ptr();  // E[m=o, n] = W[g*Og + o, n]
  g.se = {0, s.Og * s.R, 0, s.R, 1};
  g.c = gs.data_ptr();  // C[m=o, n] = gs[k, g*Og + o, n]
  g.sc = {s.O * s.R, s.Og * s.R, 0, s.R, 1};
  launch_masked_gemm(g, w.scalar_type());
}

static at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool multi) {
  check_cuda(weight, "weight");
  const ConvGeom s = conv_geometry(x, weight, packed, stride, padding, dilation, groups, multi);
  check_bias(bias, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto y = at::empty({s.K, s.B, s.O, s.Ho, s.Wo}, x.options());
  if (y.numel() == 0) return multi ? y : y[0];
  auto w = weight.contiguous();
  auto p = packed.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto cols = unfold_input(x, s, stride, padding, dilation);
  forward_gemm(cols, w, p, b.defined() ? b.data_ptr() : nullptr, s, y);
  return multi ? y : y[0];
}

static std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask, bool multi) {
  check_cuda(weight, "weight");
  const ConvGeom s = conv_geometry(x, weight, packed, stride, padding, dilation, groups, multi);
  check_conv_grad_out(grad_out, weight, s, multi);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t Ctot = s.G * s.R;
  std::vector<int64_t> gs_shape = weight.sizes().vec();  // [K?, O, C/groups, kh, kw]
  if (multi) gs_shape.insert(gs_shape.begin(), s.K);
  if (s.B == 0) {  // empty batch: all gradients are zero
    return {output_mask[0] ? at::zeros_like(x) : at::Tensor(),
            output_mask[1] ? at::zeros(gs_shape, weight.options()) : at::Tensor(),
            output_mask[2] ? at::zeros({s.O}, weight.options()) : at::Tensor()};
  }
  auto grad = grad_out.reshape({s.K, s.B, s.O, s.L}).contiguous();
  auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    auto dcols = at::empty({s.K, s.B, Ctot, s.L}, x.options());
    grad_cols_gemm(grad, w, packed.contiguous(), s, dcols);
    auto d = !s.shared() ? dcols.view({s.K * s.B, Ctot, s.L}) : s.K == 1 ? dcols[0] : dcols.sum(0);
    gx = at::col2im(d, {s.H, s.W}, {s.kh, s.kw}, dilation, padding, stride).view(x.sizes());
  }
  if (output_mask[1]) {
    gs = at::empty({s.K, s.O, s.R}, weight.options());
    auto cols = unfold_input(x, s, stride, padding, dilation);
    const int64_t Kx = s.shared() ? 1 : s.K;
    auto colsp = cols.view({Kx, s.B, Ctot, s.L}).permute({0, 2, 1, 3}).contiguous();
    auto gp = grad.permute({0, 2, 1, 3}).contiguous();  // [K, O, B, L]
    grad_scores_gemm(gp, colsp, w, s, gs);
    gs = gs.view(gs_shape);
  }
  if (output_mask[2]) gb = grad.sum({0, 1, 3});
  return {gx, gs, gb};
}

at::Tensor masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  return conv_forward(x, weight, packed, bias, stride, padding, dilation, groups, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  return conv_backward(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask,
                       false);
}

at::Tensor multi_masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed,
                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  return conv_forward(x, weight, packed, bias, stride, padding, dilation, groups, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  return conv_backward(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask,
                       true);
}

}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("masked_conv2d", &modsplit::cuda::masked_conv2d_cuda);
  m.impl("masked_conv2d_backward", &modsplit::cuda::masked_conv2d_backward_cuda);
  m.impl("multi_masked_conv2d", &modsplit::cuda::multi_masked_conv2d_cuda);
  m.impl("multi_masked_conv2d_backward", &modsplit::cuda::multi_masked_conv2d_backward_cuda);
}
