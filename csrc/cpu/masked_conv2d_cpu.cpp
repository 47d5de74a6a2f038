// masked_conv2d / multi_masked_conv2d forward and backward on the CPU (naive first version:
// materialises W*M and calls ATen's convolution; to be replaced by a masked implicit GEMM).
#include <torch/library.h>

#include "../checks.h"
#include "pack_mask_cpu.h"

namespace modsplit {

static void check_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                       int64_t groups, int64_t lead_dims) {
  check_float(weight, "weight");
  check_same_dtype(x, weight, "x", "weight");
  check_same_device(x, weight, "x", "weight");
  TORCH_CHECK(weight.dim() == 4, "modsplit: weight must be [out_channels, in_channels/groups, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "modsplit: groups=", groups,
              " must divide out_channels=", weight.size(0));
  const int64_t xdim = 4 + lead_dims;
  TORCH_CHECK(x.dim() == xdim || (lead_dims && x.dim() == 4), "modsplit: x must be [", lead_dims ? "K, " : "",
              "B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.size(-3) == weight.size(1) * groups, "modsplit: x has ", x.size(-3),
              " channels but weight expects in_channels=", weight.size(1) * groups);
  check_packed_for_weight(packed, weight, lead_dims);
}

static at::Tensor effective_weight(const at::Tensor& weight, const at::Tensor& packed) {
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end() - 1);
  shape.insert(shape.end(), weight.sizes().begin() + 1, weight.sizes().end());
  return weight * unpack_mask_cpu(packed, shape);
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  check_conv(x, weight, packed, groups, 0);
  check_bias(bias, weight);
  return at::conv2d(x, effective_weight(weight, packed), bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  check_conv(x, weight, packed, groups, 0);
  auto w = effective_weight(weight, packed);
  auto [gx, gw, gb] = at::convolution_backward(grad_out, x, w, at::IntArrayRef{weight.size(0)}, stride,
                                               padding, dilation, false, {0, 0}, groups, output_mask);
  if (output_mask[1]) gw.mul_(weight);
  return {gx, gw, gb};
}

at::Tensor multi_masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  check_conv(x, weight, packed, groups, 1);
  check_bias(bias, weight);
  const int64_t K = packed.size(0);
  const bool shared = x.dim() == 4;
  TORCH_CHECK(shared || x.size(0) == K, "modsplit: x has ", x.size(0), " modules but packed has K=", K);
  auto w = effective_weight(weight, packed);
  std::vector<at::Tensor> ys;
  for (int64_t k = 0; k < K; ++k) {
    ys.push_back(at::conv2d(shared ? x : x[k], w[k], bias, stride, padding, dilation, groups));
  }
  return at::stack(ys);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  check_conv(x, weight, packed, groups, 1);
  const int64_t K = packed.size(0);
  const bool shared = x.dim() == 4;
  auto w = effective_weight(weight, packed);
  std::vector<at::Tensor> gxs, gss, gbs;
  for (int64_t k = 0; k < K; ++k) {
    auto [gx, gw, gb] = at::convolution_backward(grad_out[k], shared ? x : x[k], w[k],
                                                 at::IntArrayRef{weight.size(0)}, stride, padding,
                                                 dilation, false, {0, 0}, groups, output_mask);
    if (output_mask[0]) gxs.push_back(gx);
    if (output_mask[1]) gss.push_back(gw.mul_(weight));
    if (output_mask[2]) gbs.push_back(gb);
  }
  at::Tensor gx, gs, gb;
  if (output_mask[0]) gx = shared ? at::stack(gxs).sum(0) : at::stack(gxs);
  if (output_mask[1]) gs = at::stack(gss);
  if (output_mask[2]) gb = at::stack(gbs).sum(0);
  return {gx, gs, gb};
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("masked_conv2d", &modsplit::masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &modsplit::masked_conv2d_backward_cpu);
  m.impl("multi_masked_conv2d", &modsplit::multi_masked_conv2d_cpu);
  m.impl("multi_masked_conv2d_backward", &modsplit::multi_masked_conv2d_backward_cpu);
}
