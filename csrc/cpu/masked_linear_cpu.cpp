// masked_linear / multi_masked_linear forward and backward on the CPU (naive first version:
// materialises W*M; to be replaced by tile-wise unpacking).
#include <torch/library.h>

#include "../checks.h"
#include "pack_mask_cpu.h"

namespace modsplit {

static void check_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                         int64_t lead_dims) {
  check_float(weight, "weight");
  check_same_dtype(x, weight, "x", "weight");
  check_same_device(x, weight, "x", "weight");
  TORCH_CHECK(weight.dim() == 2, "modsplit: weight must be [out_features, in_features], got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "modsplit: x must end in in_features=",
              weight.size(1), ", got shape ", x.sizes());
  check_packed_for_weight(packed, weight, lead_dims);
}

static at::Tensor effective_weight(const at::Tensor& weight, const at::Tensor& packed) {
  std::vector<int64_t> shape(packed.sizes().begin(), packed.sizes().end() - 1);
  shape.push_back(weight.size(1));
  return weight * unpack_mask_cpu(packed, shape);
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, packed, 0);
  check_bias(bias, weight);
  return at::linear(x, effective_weight(weight, packed), bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, std::array<bool, 3> output_mask) {
  check_linear(x, weight, packed, 0);
  auto g2 = grad_out.reshape({-1, weight.size(0)});
  auto x2 = x.reshape({-1, weight.size(1)});
  at::Tensor gx, gs, gb;
  if (output_mask[0]) gx = at::mm(g2, effective_weight(weight, packed)).view(x.sizes());
  if (output_mask[1]) gs = at::mm(g2.t(), x2).mul_(weight);
  if (output_mask[2]) gb = g2.sum(0);
  return {gx, gs, gb};
}

at::Tensor multi_masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                   bool shared_input) {
  check_linear(x, weight, packed, 1);
  check_bias(bias, weight);
  const int64_t K = packed.size(0);
  TORCH_CHECK(shared_input || (x.dim() >= 2 && x.size(0) == K), "modsplit: x must be [K=", K,
              ", ..., in_features] when shared_input=False, got shape ", x.sizes());
  auto w = effective_weight(weight, packed);  // [K, O, I]
  auto xk = shared_input ? x.reshape({1, -1, weight.size(1)}).expand({K, -1, -1})
                         : x.reshape({K, -1, weight.size(1)});
  auto y = at::bmm(xk, w.transpose(1, 2));
  if (bias.has_value()) y.add_(*bias);
  std::vector<int64_t> shape{K};
  auto xs = shared_input ? x.sizes() : x.sizes().slice(1);
  shape.insert(shape.end(), xs.begin(), xs.end() - 1);
  shape.push_back(weight.size(0));
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, bool shared_input, std::array<bool, 3> output_mask) {
  check_linear(x, weight, packed, 1);
  const int64_t K = packed.size(0);
  auto g = grad_out.reshape({K, -1, weight.size(0)});
  auto xk = shared_input ? x.reshape({1, -1, weight.size(1)}).expand({K, -1, -1})
                         : x.reshape({K, -1, weight.size(1)});
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    gx = at::bmm(g, effective_weight(weight, packed));
    gx = shared_input ? gx.sum(0).view(x.sizes()) : gx.view(x.sizes());
  }
  if (output_mask[1]) gs = at::bmm(g.transpose(1, 2), xk).mul_(weight);
  if (output_mask[2]) gb = g.sum({0, 1});
  return {gx, gs, gb};
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("masked_linear", &modsplit::masked_linear_cpu);
  m.impl("masked_linear_backward", &modsplit::masked_linear_backward_cpu);
  m.impl("multi_masked_linear", &modsplit::multi_masked_linear_cpu);
  m.impl("multi_masked_linear_backward", &modsplit::multi_masked_linear_backward_cpu);
}
