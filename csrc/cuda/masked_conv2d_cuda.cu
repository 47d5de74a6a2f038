// masked_conv2d / multi_masked_conv2d / ragged_masked_conv2d forward and backward on CUDA: always
// the expanded path of routing.cuh (rows = batch x output pixels are many). Per chunk of c
// modules (the scratch bound), expand_mask_cuda.cu writes W*M_k into a reused buffer and one
// cuDNN call (at::convolution, at::convolution_backward) does the arithmetic:
//   shared input  [B, C, H, W]: groups = G, the weight's rows ordered (group, module, row), so the
//                 input is read once for the chunk's modules and never repeated;
//   per-module    [K, B, C, H, W]: the chunk's inputs folded into the channels [B, c*C, H, W],
//                 groups = c*G, rows ordered (module, group, row).
// grad_scores = dL/d(W*M_k) * W (cuDNN's grad_weight, then one in-place product); grad_bias: an
// ATen reduction. ragged_masked_conv2d: one host read of offsets (and of rows' range), then each
// module with rows as a one-module shared-input problem of the same two functions (the loops:
// ../ragged_conv.h, shared with the CPU kernel). Same structure as the CPU kernels (oneDNN) in
// csrc/cpu/masked_conv2d_cpu.cpp.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include "../conv_geometry.h"
#include "../ragged_conv.h"
#include "common.cuh"
#include "expand_mask.cuh"
#include "routing.cuh"

namespace modsplit {
namespace cuda {

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;
};

static ConvArgs conv_args(const ConvGeom& s) {
  return {{s.stride[0], s.stride[1]}, {s.padding[0], s.padding[1]}, {s.dilation[0], s.dilation[1]}};
}

static int64_t conv_chunk(const at::Tensor& w, int64_t K) {
  return module_chunk(K, w.numel() * static_cast<int64_t>(w.element_size()));
}

// x5 [K, B, C, H, W] modules k0 .. k0 + c - 1 -> [B, c*C, H, W].
static at::Tensor fold_inputs(const at::Tensor& x5, int64_t k0, int64_t c, const ConvGeom& s) {
  return x5.narrow(0, k0, c).transpose(0, 1).reshape({s.B, c * s.C, s.H, s.W});
}

// y [K, B, O, Ho, Wo] (+ bias); x5 [Kx, B, C, H, W], w [O, Cg, kh, kw] and p [K, O, words]
// contiguous.
static void forward(const at::Tensor& x5, const at::Tensor& w, const at::Tensor& p,
                    const c10::optional<at::Tensor>& bias, const ConvGeom& s, at::Tensor& y) {
  const auto a = conv_args(s);
  const int64_t step = conv_chunk(w, s.K);
  auto buf = at::empty({step * s.O, s.Cg, s.kh, s.kw}, w.options());
  for (int64_t k0 = 0; k0 < s.K; k0 += step) {
    const int64_t c = std::min(step, s.K - k0);
    expand_masked_weight(w, p, k0, c, s.G, s.shared(), buf);
    auto wk = buf.narrow(0, 0, c * s.O);
    auto yk = y.narrow(0, k0, c);
    if (s.shared()) {
      auto out = at::convolution(x5[0], wk, {}, a.stride, a.padding, a.dilation, false, {0, 0}, s.G);
      yk.view({c, s.B, s.G, s.Og, s.L}).copy_(
          out.view({s.B, s.G, c, s.Og, s.L}).permute({2, 0, 1, 3, 4}));
    } else {
      auto out = at::convolution(fold_inputs(x5, k0, c, s), wk, {}, a.stride, a.padding,
                                 a.dilation, false, {0, 0}, c * s.G);
      yk.copy_(out.view({s.B, c, s.O, s.Ho, s.Wo}).transpose(0, 1));
    }
  }
  if (bias.has_value()) y.add_(bias->view({1, 1, s.O, 1, 1}));
}

// (grad_x [Kx, B, C, H, W] summed over modules when shared, grad_scores [K, O, Cg, kh, kw]);
// undefined where not requested. go [K, B, O, Ho, Wo].
static std::pair<at::Tensor, at::Tensor> backward(const at::Tensor& go, const at::Tensor& x5,
                                                  const at::Tensor& w, const at::Tensor& p,
                                                  const ConvGeom& s, bool need_gx, bool need_gs) {
  const auto a = conv_args(s);
  at::Tensor gx = need_gx ? at::zeros({s.Kx, s.B, s.C, s.H, s.W}, x5.options()) : at::Tensor();
  at::Tensor gs = need_gs ? at::empty({s.K, s.O, s.Cg, s.kh, s.kw}, w.options()) : at::Tensor();
  const int64_t step = conv_chunk(w, s.K);
  auto buf = at::empty({step * s.O, s.Cg, s.kh, s.kw}, w.options());
  for (int64_t k0 = 0; k0 < s.K; k0 += step) {
    const int64_t c = std::min(step, s.K - k0);
    if (need_gx) expand_masked_weight(w, p, k0, c, s.G, s.shared(), buf);  // grad_w needs shapes only
    auto wk = buf.narrow(0, 0, c * s.O);
    auto gok = go.narrow(0, k0, c);
    if (s.shared()) {
      auto g = gok.view({c, s.B, s.G, s.Og, s.Ho, s.Wo}).permute({1, 2, 0, 3, 4, 5})
                   .reshape({s.B, s.G * c * s.Og, s.Ho, s.Wo});
      auto [dx, dw, unused] = at::convolution_backward(
          g, x5[0], wk, c10::nullopt, a.stride, a.padding, a.dilation, false, {0, 0}, s.G,
          {need_gx, need_gs, false});
      if (need_gx) gx[0].add_(dx);
      if (need_gs) {
        gs.narrow(0, k0, c).view({c, s.G, s.Og, s.R}).copy_(
            dw.view({s.G, c, s.Og, s.R}).transpose(0, 1));
      }
    } else {
      auto g = gok.transpose(0, 1).reshape({s.B, c * s.O, s.Ho, s.Wo});
      auto [dx, dw, unused] = at::convolution_backward(
          g, fold_inputs(x5, k0, c, s), wk, c10::nullopt, a.stride, a.padding, a.dilation, false,
          {0, 0}, c * s.G, {need_gx, need_gs, false});
      if (need_gx) gx.narrow(0, k0, c).copy_(dx.view({s.B, c, s.C, s.H, s.W}).transpose(0, 1));
      if (need_gs) gs.narrow(0, k0, c).view({c * s.O, s.Cg, s.kh, s.kw}).copy_(dw);
    }
  }
  if (need_gs) gs.mul_(w);
  return {gx, gs};
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
  if (y.numel() > 0) {
    auto x5 = (x.dim() == 5 ? x : x.unsqueeze(0)).contiguous();
    forward(x5, weight.contiguous(), packed.contiguous().view({s.K, s.O, s.words}), bias, s, y);
  }
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
  std::vector<int64_t> gs_shape = weight.sizes().vec();  // [K?, O, C/groups, kh, kw]
  if (multi) gs_shape.insert(gs_shape.begin(), s.K);
  if (s.B == 0) {  // empty batch: all gradients are zero
    return {output_mask[0] ? at::zeros_like(x) : at::Tensor(),
            output_mask[1] ? at::zeros(gs_shape, weight.options()) : at::Tensor(),
            output_mask[2] ? at::zeros({s.O}, weight.options()) : at::Tensor()};
  }
  auto go = grad_out.reshape({s.K, s.B, s.O, s.Ho, s.Wo}).contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0] || output_mask[1]) {
    auto x5 = (x.dim() == 5 ? x : x.unsqueeze(0)).contiguous();
    std::tie(gx, gs) = backward(go, x5, weight.contiguous(),
                                packed.contiguous().view({s.K, s.O, s.words}), s, output_mask[0],
                                output_mask[1]);
    if (gx.defined()) gx = gx.view(x.sizes());
    if (gs.defined()) gs = gs.view(gs_shape);
  }
  if (output_mask[2]) gb = go.sum(at::IntArrayRef{0, 1, 3, 4});
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

// ---- ragged_masked_conv2d --------------------------------------------------------------------

// The one host read of a ragged call: offsets (and, with rows, their minimum and maximum) in one
// device-to-host copy, checked on the host (check_ragged_values); returns offsets [K+1].
static std::vector<int64_t> read_ragged(const at::Tensor& x, const at::Tensor& offsets,
                                        const c10::optional<at::Tensor>& rows, int64_t T) {
  const int64_t K = offsets.size(0) - 1;
  const bool range = rows.has_value() && T > 0;
  at::Tensor buf = offsets;
  if (range) {
    const auto [lo, hi] = at::aminmax(*rows);
    buf = at::cat({offsets, lo.view({1}), hi.view({1})});
  }
  const auto host = buf.to(at::kCPU);
  const int64_t* h = host.const_data_ptr<int64_t>();
  if (range) {
    TORCH_CHECK(h[K + 1] >= 0 && h[K + 2] < x.size(0), "modsplit: rows must lie in [0, ",
                x.size(0), ") (the rows of x), got values in [", h[K + 1], ", ", h[K + 2], "]");
  }
  check_ragged_values(x.size(0), host.narrow(0, 0, K + 1), c10::nullopt, T);
  return std::vector<int64_t>(h, h + K + 1);
}

at::Tensor ragged_masked_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, const at::Tensor& offsets,
                                     const c10::optional<at::Tensor>& rows,
                                     const c10::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  check_cuda(weight, "weight");
  int64_t T = 0;
  const ConvGeom s = ragged_conv_geometry(x, weight, packed, offsets, rows, stride, padding,
                                          dilation, groups, T);
  check_bias(bias, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  return ragged_conv_forward(
      x, rows, read_ragged(x, offsets, rows, T), s, T,
      [&](int64_t k, const at::Tensor& xk, at::Tensor& yk) {
        const auto pk = p.narrow(0, k, 1);
        const ConvGeom sk = conv_geometry(xk, w, pk, stride, padding, dilation, groups, true);
        auto y5 = yk.unsqueeze(0);  // [1, n, O, Ho, Wo], contiguous
        forward(xk.unsqueeze(0), w, pk, bias, sk, y5);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, const at::Tensor& offsets, const c10::optional<at::Tensor>& rows,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  check_cuda(weight, "weight");
  int64_t T = 0;
  const ConvGeom s = ragged_conv_geometry(x, weight, packed, offsets, rows, stride, padding,
                                          dilation, groups, T);
  check_ragged_conv_grad_out(grad_out, weight, s, T);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  return ragged_conv_backward(
      grad_out, x, w, rows, s, output_mask, [&] { return read_ragged(x, offsets, rows, T); },
      [&](int64_t k, const at::Tensor& xk, const at::Tensor& gk_out) {
        const auto pk = p.narrow(0, k, 1);
        const ConvGeom sk = conv_geometry(xk, w, pk, stride, padding, dilation, groups, true);
        return backward(gk_out.unsqueeze(0), xk.unsqueeze(0), w, pk, sk, output_mask[0],
                        output_mask[1]);
      });
}

}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("masked_conv2d", &modsplit::cuda::masked_conv2d_cuda);
  m.impl("masked_conv2d_backward", &modsplit::cuda::masked_conv2d_backward_cuda);
  m.impl("multi_masked_conv2d", &modsplit::cuda::multi_masked_conv2d_cuda);
  m.impl("multi_masked_conv2d_backward", &modsplit::cuda::multi_masked_conv2d_backward_cuda);
  m.impl("ragged_masked_conv2d", &modsplit::cuda::ragged_masked_conv2d_cuda);
  m.impl("ragged_masked_conv2d_backward", &modsplit::cuda::ragged_masked_conv2d_backward_cuda);
}
