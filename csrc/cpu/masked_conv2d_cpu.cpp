// masked_conv2d / multi_masked_conv2d / ragged_masked_conv2d forward and backward on the CPU.
//
// Notation (all ops reduce to it): x5 [Kx, B, C, H, W] with Kx = 1 (shared input; also the
// single-module ops, K = 1) or Kx = K (one input per module); weight [O, Cg, kh, kw] with
// G groups, Cg = C/G, Og = O/G, R = Cg*kh*kw; packed int32 [K, O, ceil(R/32)];
// output [K, B, O, Ho, Wo], L = Ho*Wo. W⊙M is never formed for the whole layer: tiles of it are
// unpacked for all K modules at once (each 32-column piece of the weight is read once and
// masked K times) into small buffers.
//
// Forward: per tile of output channels, one ATen convolution (oneDNN, AVX-512 on any x86 CPU)
// of the input with the tile's W⊙M rows of all modules sharing that input.
// Backward: the same tiles; per tile, one ATen convolution backward (oneDNN) gives the tile's
// grad_input (summed over the tiles) and grad_weight (the tile's rows of dL/d(W⊙M)).
// At low density the forward and grad_x take the sparse path instead (masked_conv2d_sparse.h:
// work ~ kept weights); grad_weight always comes from oneDNN.
// All ATen calls are made from the calling thread; oneDNN parallelises each of them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include "../checks.h"
#include "../conv_geometry.h"
#include "../ragged_conv.h"
#include "masked_conv2d_sparse.h"

namespace modsplit {
namespace {

// Unpacked W⊙M tile for the modules of one convolution call, in bytes (larger tiles mean fewer,
// wider convolution calls); the backward's grad_weight tile has the same size.
constexpr int64_t kTileBudgetBytes = int64_t{8} << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output channels per group in a tile of nk modules' W⊙M rows, within kTileBudgetBytes.
// min_two: at least two tiles where possible, so a buffer never holds a whole module's W⊙M.
int64_t tile_rows(const ConvGeom& g, int64_t nk, int64_t elt, bool min_two) {
  const int64_t cap = std::max<int64_t>(1, kTileBudgetBytes / (g.G * nk * g.R * elt));
  const int64_t tiles = std::max(ceil_div(g.Og, cap), min_two ? std::min<int64_t>(g.Og, 2) : 1);
  return ceil_div(g.Og, tiles);
}

// buf[k, i, c] = weight[row0 + i, col0 + c] * bit(packed[k0 + k, row0 + i], col0 + c) for
// k < nk, i < nrows, c < ncols. weight [O, R], packed [K, O, words] and buf [nk, nrows, ncols]
// are contiguous; col0 is a multiple of 32. Each 32-column piece of a weight row is read once
// and masked for every module.
template <typename T>
void unpack_tile(const T* weight, const int32_t* packed, const ConvGeom& g, int64_t k0, int64_t nk,
                 int64_t row0, int64_t nrows, int64_t col0, int64_t ncols, T* buf) {
  for (int64_t i = 0; i < nrows; ++i) {
    const T* wrow = weight + (row0 + i) * g.R + col0;
    for (int64_t c = 0; c < ncols; c += kBitsPerWord) {
      const int64_t n = std::min<int64_t>(kBitsPerWord, ncols - c);
      const int64_t word = (col0 + c) / kBitsPerWord;
      for (int64_t k = 0; k < nk; ++k) {
        const auto m = static_cast<uint32_t>(packed[((k0 + k) * g.O + row0 + i) * g.words + word]);
        T* dst = buf + (k * nrows + i) * ncols + c;
        if (m == 0) {
          std::fill(dst, dst + n, T(0));
        } else if (m == 0xffffffffu) {  // all n columns kept
          std::memcpy(dst, wrow + c, n * sizeof(T));
        } else {
          for (int64_t j = 0; j < n; ++j) dst[j] = ((m >> j) & 1u) ? wrow[c + j] : T(0);
        }
      }
    }
  }
}

// out [K, B, O, Ho, Wo] = conv2d of x5 with W⊙M_k per module k, plus bias. The output channels
// of every group are cut into tiles of `rows`; for a tile, the W⊙M rows of all modules that
// share an input are unpacked into one grouped weight [G*nk*rows, Cg, kh, kw] (group g's
// channels ordered (module, row)) and convolved by ATen (oneDNN) in one call: a shared input is
// read once per tile for all K modules, and W⊙M never exists for the whole layer.
at::Tensor conv_forward(const at::Tensor& x5, const at::Tensor& weight, const at::Tensor& packed3,
                        const c10::optional<at::Tensor>& bias, const ConvGeom& g) {
  const auto w = weight.contiguous();
  const auto p = packed3.contiguous();
  if (use_sparse_conv(p, g, w.scalar_type(), /*grad_x=*/false)) {
    auto out = sparse_masked_conv_forward(x5, w, p, bias, g);
    if (out.defined()) return out;  // else x held a NaN or inf: the dense path below
  }
  auto out = at::empty({g.K, g.B, g.O, g.Ho, g.Wo}, x5.options());
  auto out5 = out.view({g.K, g.B, g.G, g.Og, g.L});
  const int64_t nk = g.shared() ? g.K : 1;  // modules per convolution call
  const int64_t rows = tile_rows(g, nk, w.element_size(), /*min_two=*/true);
  const int64_t tiles = ceil_div(g.Og, rows);
  auto buf = at::empty({g.G * nk * rows, g.Cg, g.kh, g.kw}, w.options());
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t o0 = t * rows, tn = std::min(rows, g.Og - o0);
    for (int64_t k0 = 0; k0 < g.K; k0 += nk) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "masked_conv2d", [&] {
        for (int64_t grp = 0; grp < g.G; ++grp) {
          unpack_tile<scalar_t>(w.const_data_ptr<scalar_t>(), p.const_data_ptr<int32_t>(), g, k0, nk,
                                grp * g.Og + o0, tn, 0, g.R,
                                buf.mutable_data_ptr<scalar_t>() + grp * nk * tn * g.R);
        }
      });
      const auto y = at::conv2d(x5[g.shared() ? 0 : k0], buf.narrow(0, 0, g.G * nk * tn), {},
                                {g.stride[0], g.stride[1]}, {g.padding[0], g.padding[1]},
                                {g.dilation[0], g.dilation[1]}, g.G);  // [B, G*nk*tn, Ho, Wo]
      out5.narrow(0, k0, nk).narrow(3, o0, tn).copy_(y.view({g.B, g.G, nk, tn, g.L}).permute({2, 0, 1, 3, 4}));
    }
  }
  if (bias.has_value()) out5.view({g.K, g.B, g.O, g.L}).add_(bias->view({1, 1, g.O, 1}));
  return out;
}

// Backward of conv_forward: grad_x shaped [Kx, B, C, H, W] (summed over modules when shared),
// grad_scores [K, O, R] = dL/d(W⊙M_k) ⊙ W, grad_bias [O]; undefined where not requested.
// Tiled like the forward: per tile of output channels and block of modules sharing an input,
// the tile's W⊙M rows are unpacked into the grouped weight [G*nk*tn, Cg, kh, kw] and ATen's
// convolution backward (oneDNN) gives the tile's grad_input (summed over the tiles: grad_x sums
// over output channels) and grad_weight (the tile's dL/d(W⊙M) rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out5, const at::Tensor& x5, const at::Tensor& weight,
    const at::Tensor& packed3, const ConvGeom& g, std::array<bool, 3> output_mask) {
  const bool need_gx = output_mask[0], need_gs = output_mask[1], need_gb = output_mask[2];
  at::Tensor gx, gs, gb;
  if (need_gb) gb = grad_out5.sum({0, 1, 3, 4});
  if (!need_gx && !need_gs) return {gx, gs, gb};
  if (g.B == 0) {
    if (need_gx) gx = at::zeros({g.Kx, g.B, g.C, g.H, g.W}, x5.options());
    if (need_gs) gs = at::zeros({g.K, g.O, g.R}, x5.options());
    return {gx, gs, gb};
  }
  const auto x = x5.contiguous();
  const auto w = weight.contiguous();
  const auto p = packed3.contiguous();
  if (need_gx && use_sparse_conv(p, g, w.scalar_type(), /*grad_x=*/true)) {
    gx = sparse_masked_conv_grad_x(grad_out5.contiguous(), w, p, g);  // undefined: non-finite
  }
  const bool dense_gx = need_gx && !gx.defined();
  if (!dense_gx && !need_gs) return {gx, gs, gb};
  const auto go5 = grad_out5.reshape({g.K, g.B, g.G, g.Og, g.L});
  if (dense_gx) gx = at::empty({g.Kx, g.B, g.C, g.H, g.W}, x.options());
  if (need_gs) gs = at::empty({g.K, g.O, g.R}, x.options());
  auto gs4 = need_gs ? gs.view({g.K, g.G, g.Og, g.R}) : at::Tensor();
  const int64_t nk = g.shared() ? g.K : 1;  // modules per convolution call
  const int64_t rows = tile_rows(g, nk, w.element_size(), /*min_two=*/false);
  const int64_t tiles = ceil_div(g.Og, rows);
  auto buf = at::empty({g.G * nk * rows, g.Cg, g.kh, g.kw}, w.options());
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t o0 = t * rows, tn = std::min(rows, g.Og - o0);
    for (int64_t k0 = 0; k0 < g.K; k0 += nk) {
      if (dense_gx) {  // grad_weight needs only the weight's shape
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "masked_conv2d_backward", [&] {
          for (int64_t grp = 0; grp < g.G; ++grp) {
            unpack_tile<scalar_t>(w.const_data_ptr<scalar_t>(), p.const_data_ptr<int32_t>(), g, k0, nk,
                                  grp * g.Og + o0, tn, 0, g.R,
                                  buf.mutable_data_ptr<scalar_t>() + grp * nk * tn * g.R);
          }
        });
      }
      // The tile's gradient [B, G*nk*tn, Ho, Wo], channels ordered (group, module, row).
      const auto go = go5.narrow(0, k0, nk).narrow(3, o0, tn).permute({1, 2, 0, 3, 4})
                          .contiguous().view({g.B, g.G * nk * tn, g.Ho, g.Wo});
      const int64_t kx = g.shared() ? 0 : k0;
      auto [dx, dw, unused] = at::convolution_backward(
          go, x[kx], buf.narrow(0, 0, g.G * nk * tn), c10::nullopt, {g.stride[0], g.stride[1]},
          {g.padding[0], g.padding[1]}, {g.dilation[0], g.dilation[1]}, false, {0, 0}, g.G,
          {dense_gx, need_gs, false});
      if (dense_gx) {
        if (t == 0) {
          gx[kx].copy_(dx);
        } else {
          gx[kx].add_(dx);
        }
      }
      if (need_gs) {
        gs4.narrow(0, k0, nk).narrow(2, o0, tn).copy_(dw.reshape({g.G, nk, tn, g.R}).transpose(0, 1));
      }
    }
  }
  if (need_gs) gs.mul_(w.view({1, g.O, g.R}));
  return {gx, gs, gb};
}

// bf16/half backward runs in float32 (batch and window sums accumulate there), then casts back.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_any(
    const at::Tensor& grad_out5, const at::Tensor& x5, const at::Tensor& weight,
    const at::Tensor& packed3, const ConvGeom& g, std::array<bool, 3> output_mask) {
  const auto dtype = weight.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return conv_backward(grad_out5, x5, weight, packed3, g, output_mask);
  }
  auto [gx, gs, gb] = conv_backward(grad_out5.to(at::kFloat), x5.to(at::kFloat),
                                    weight.to(at::kFloat), packed3, g, output_mask);
  return {gx.defined() ? gx.to(dtype) : gx, gs.defined() ? gs.to(dtype) : gs,
          gb.defined() ? gb.to(dtype) : gb};
}

}  // namespace

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv_geometry(x, weight, packed, stride, padding, dilation, groups, false);
  check_bias(bias, weight);
  return conv_forward(x.unsqueeze(0), weight, packed.unsqueeze(0), bias, g).select(0, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto g = conv_geometry(x, weight, packed, stride, padding, dilation, groups, false);
  check_conv_grad_out(grad_out, weight, g, false);
  auto [gx, gs, gb] = conv_backward_any(grad_out.unsqueeze(0), x.unsqueeze(0), weight,
                                        packed.unsqueeze(0), g, output_mask);
  return {gx.defined() ? gx.view(x.sizes()) : gx, gs.defined() ? gs.view(weight.sizes()) : gs, gb};
}

at::Tensor multi_masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv_geometry(x, weight, packed, stride, padding, dilation, groups, true);
  check_bias(bias, weight);
  return conv_forward(x.dim() == 5 ? x : x.unsqueeze(0), weight, packed, bias, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const auto g = conv_geometry(x, weight, packed, stride, padding, dilation, groups, true);
  check_conv_grad_out(grad_out, weight, g, true);
  auto [gx, gs, gb] = conv_backward_any(grad_out, x.dim() == 5 ? x : x.unsqueeze(0), weight,
                                        packed, g, output_mask);
  std::vector<int64_t> gs_shape{g.K};
  gs_shape.insert(gs_shape.end(), weight.sizes().begin(), weight.sizes().end());
  return {gx.defined() ? gx.view(x.sizes()) : gx, gs.defined() ? gs.view(gs_shape) : gs, gb};
}

// ragged_masked_conv2d: module k's rows x[rows[t]] (or x[t]), offsets[k] <= t < offsets[k+1],
// as one single-module problem of conv_forward / conv_backward (its own path choice, dense or
// sparse, from its own mask), the modules in order (each convolution is parallel inside);
// the loops: ragged_conv.h.

static std::vector<int64_t> offsets_of(const at::Tensor& offsets) {
  const auto o = offsets.contiguous();
  return std::vector<int64_t>(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + o.numel());
}

at::Tensor ragged_masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor& offsets,
                                    const c10::optional<at::Tensor>& rows,
                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  int64_t T = 0;
  const auto g = ragged_conv_geometry(x, weight, packed, offsets, rows, stride, padding,
                                      dilation, groups, T);
  check_bias(bias, weight);
  check_ragged_values(x.size(0), offsets, rows, T);
  return ragged_conv_forward(
      x, rows, offsets_of(offsets), g, T, [&](int64_t k, const at::Tensor& xk, at::Tensor& yk) {
        const auto pk = packed.select(0, k);
        const auto gk = conv_geometry(xk, weight, pk, stride, padding, dilation, groups, false);
        yk.copy_(conv_forward(xk.unsqueeze(0), weight, pk.unsqueeze(0), bias, gk)[0]);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, const at::Tensor& offsets, const c10::optional<at::Tensor>& rows,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  int64_t T = 0;
  const auto g = ragged_conv_geometry(x, weight, packed, offsets, rows, stride, padding,
                                      dilation, groups, T);
  check_ragged_values(x.size(0), offsets, rows, T);
  check_ragged_conv_grad_out(grad_out, weight, g, T);
  return ragged_conv_backward(
      grad_out, x, weight, rows, g, output_mask, [&] { return offsets_of(offsets); },
      [&](int64_t k, const at::Tensor& xk, const at::Tensor& gk_out) {
        const auto pk = packed.select(0, k);
        const auto gk = conv_geometry(xk, weight, pk, stride, padding, dilation, groups, false);
        auto [dx, ds, unused] = conv_backward_any(gk_out.unsqueeze(0), xk.unsqueeze(0), weight,
                                                  pk.unsqueeze(0), gk,
                                                  {output_mask[0], output_mask[1], false});
        return std::make_pair(dx, ds);
      });
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("masked_conv2d", &modsplit::masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &modsplit::masked_conv2d_backward_cpu);
  m.impl("multi_masked_conv2d", &modsplit::multi_masked_conv2d_cpu);
  m.impl("multi_masked_conv2d_backward", &modsplit::multi_masked_conv2d_backward_cpu);
  m.impl("ragged_masked_conv2d", &modsplit::ragged_masked_conv2d_cpu);
  m.impl("ragged_masked_conv2d_backward", &modsplit::ragged_masked_conv2d_backward_cpu);
}
