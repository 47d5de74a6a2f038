// ragged_masked_conv2d's module loops, shared by the CPU and CUDA kernels: module k takes rows
// off[k] .. off[k+1] - 1 of the output, reading x[rows[t]] (x's own rows without rows), and each
// module with rows is a one-module problem of the backend's own conv drivers (the callbacks).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "conv_geometry.h"

namespace modsplit {

// The rows the modules read, [T, C, H, W] contiguous.
inline at::Tensor ragged_source_rows(const at::Tensor& x, const c10::optional<at::Tensor>& rows) {
  return rows.has_value() ? x.index_select(0, *rows) : x.contiguous();
}

// out [T, O, Ho, Wo]; module_out(k, xk [n, C, H, W], yk [n, O, Ho, Wo] contiguous, to write) for
// every module k with n > 0 rows (every output row is some module's).
template <typename ModuleOut>
at::Tensor ragged_conv_forward(const at::Tensor& x, const c10::optional<at::Tensor>& rows,
                               const std::vector<int64_t>& off, const ConvGeom& g, int64_t T,
                               ModuleOut module_out) {
  auto out = at::empty({T, g.O, g.Ho, g.Wo}, x.options());
  const auto xs = ragged_source_rows(x, rows);
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t n = off[k + 1] - off[k];
    if (n == 0) continue;
    auto yk = out.narrow(0, off[k], n);
    module_out(k, xs.narrow(0, off[k], n), yk);
  }
  return out;
}

// (grad_x like x (with rows: summed over the t with rows[t] = r), grad_scores
// [K, *weight.shape] (0 * W for a module without rows), grad_bias [O]); undefined where
// output_mask is false. read_offsets() -> off [K+1] is called only when a module loop runs;
// module_grads(k, xk [n, C, H, W], gk [n, O, Ho, Wo]) -> (grad_x of xk, grad_scores of module
// k), each undefined where not requested.
template <typename ReadOffsets, typename ModuleGrads>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& rows, const ConvGeom& g, std::array<bool, 3> output_mask,
    ReadOffsets read_offsets, ModuleGrads module_grads) {
  const bool need_gx = output_mask[0], need_gs = output_mask[1];
  at::Tensor gx, gs, gb;
  if (output_mask[2]) gb = grad_out.sum(at::IntArrayRef{0, 2, 3});
  if (!need_gx && !need_gs) return {gx, gs, gb};
  const std::vector<int64_t> off = read_offsets();
  const auto xs = ragged_source_rows(x, rows);
  const auto go = grad_out.contiguous();
  at::Tensor gx_rows = need_gx ? at::empty_like(xs) : at::Tensor();  // every row is a module's
  if (need_gs) gs = at::empty({g.K, g.O, g.Cg, g.kh, g.kw}, weight.options());
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t n = off[k + 1] - off[k];
    if (n == 0) {  // the empty sum times W
      if (need_gs) gs.select(0, k).copy_(weight).mul_(0);
      continue;
    }
    const auto xk = xs.narrow(0, off[k], n);
    const auto [dx, ds] = module_grads(k, xk, go.narrow(0, off[k], n));
    if (need_gx) gx_rows.narrow(0, off[k], n).copy_(dx.view(xk.sizes()));
    if (need_gs) gs.select(0, k).copy_(ds.view(weight.sizes()));
  }
  if (need_gx) gx = rows.has_value() ? at::zeros_like(x).index_add_(0, *rows, gx_rows) : gx_rows;
  return {gx, gs, gb};
}

}  // namespace modsplit
