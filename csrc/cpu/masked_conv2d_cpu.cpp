// masked_conv2d / multi_masked_conv2d forward and backward on the CPU.
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
// Backward: a masked im2col GEMM. The batch is processed in chunks of Bc rows (bounding the
// im2col buffer); for a chunk, cols = im2col(x) is [Kx*Bc, G*R, L] (group g uses rows
// [g*R, (g+1)*R)), built once for all K modules of a shared input. Parallel work items tile the
// R columns, unpack their W⊙M tile into a thread-local buffer and multiply with ATen's CPU GEMM,
// so every item writes disjoint rows of dcols (grad_x before col2im) and disjoint columns of
// grad_scores.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>

#include "../checks.h"
#include "../conv_geometry.h"

namespace modsplit {
namespace {

// im2col chunk size in bytes: bounds the extra memory of a call (at least one batch row).
constexpr int64_t kColsBudgetBytes = int64_t{8} << 20;
// Unpacked W⊙M tile for all K modules, in bytes: the forward's single buffer (larger tiles mean
// fewer, wider convolution calls) and the backward's per-thread buffers.
constexpr int64_t kForwardTileBudgetBytes = int64_t{8} << 20;
constexpr int64_t kTileBudgetBytes = int64_t{2} << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


// Batch rows per im2col chunk: the chunk's cols [Kx*Bc, G*R, L] stay within kColsBudgetBytes.
int64_t batch_chunk(const ConvGeom& g, int64_t elt) {
  const int64_t per_row = g.Kx * g.G * g.R * g.L * elt;
  return std::clamp<int64_t>(kColsBudgetBytes / std::max<int64_t>(per_row, 1), 1,
                             std::max<int64_t>(g.B, 1));
}

// Enough work items for every thread (twice over, for balance) when the layer allows it.
int64_t wanted_items() { return 2 * at::get_num_threads(); }

// cols [Kx*nb, G*R, L] of batch rows [b0, b0+nb) of x5 (contiguous [Kx, B, C, H, W]).
at::Tensor im2col_chunk(const at::Tensor& x5, const ConvGeom& g, int64_t b0, int64_t nb) {
  auto xs = x5.narrow(1, b0, nb).reshape({g.Kx * nb, g.C, g.H, g.W});
  if (g.pointwise()) return xs.view({g.Kx * nb, g.C, g.H * g.W});
  return at::im2col(xs, {g.kh, g.kw}, {g.dilation[0], g.dilation[1]},
                    {g.padding[0], g.padding[1]}, {g.stride[0], g.stride[1]});
}

// grad w.r.t. x [Kx*nb, C, H, W] from dcols [Kx*nb, G*R, L] (sums overlapping windows).
at::Tensor col2im_chunk(const at::Tensor& dcols, const ConvGeom& g) {
  if (g.pointwise()) return dcols.view({dcols.size(0), g.C, g.H, g.W});
  return at::col2im(dcols, {g.H, g.W}, {g.kh, g.kw}, {g.dilation[0], g.dilation[1]},
                    {g.padding[0], g.padding[1]}, {g.stride[0], g.stride[1]});
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
  auto out = at::empty({g.K, g.B, g.O, g.Ho, g.Wo}, x5.options());
  auto out5 = out.view({g.K, g.B, g.G, g.Og, g.L});
  const int64_t nk = g.shared() ? g.K : 1;  // modules per convolution call
  const int64_t cap = std::max<int64_t>(1, kForwardTileBudgetBytes / (g.G * nk * g.R * w.element_size()));
  // At least two tiles where possible, so a buffer never holds a whole module's W⊙M.
  const int64_t tiles = std::max(ceil_div(g.Og, cap), std::min<int64_t>(g.Og, 2));
  const int64_t rows = ceil_div(g.Og, tiles);
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out5, const at::Tensor& x5, const at::Tensor& weight,
    const at::Tensor& packed3, const ConvGeom& g, std::array<bool, 3> output_mask) {
  const bool need_gx = output_mask[0], need_gs = output_mask[1], need_gb = output_mask[2];
  at::Tensor gx, gs, gb;
  if (need_gb) gb = grad_out5.sum({0, 1, 3, 4});
  if (!need_gx && !need_gs) return {gx, gs, gb};
  const auto x = x5.contiguous();
  const auto w = weight.contiguous();
  const auto p = packed3.contiguous();
  // gp [B, G, K, Og, L]: gp[b][grp] is the [K*Og, L] gradient of group grp's outputs.
  const auto gp = grad_out5.reshape({g.K, g.B, g.G, g.Og, g.L}).permute({1, 2, 0, 3, 4}).contiguous();
  if (need_gx) gx = at::empty({g.Kx, g.B, g.C, g.H, g.W}, x.options());
  if (need_gs) gs = g.B == 0 ? at::zeros({g.K, g.O, g.R}, x.options()) : at::empty({g.K, g.O, g.R}, x.options());
  const int64_t elt = x.element_size();
  // Columns of W⊙M per tile (multiple of 32), within the tile budget, split for parallelism.
  int64_t cols_per_tile = std::max<int64_t>(1, kTileBudgetBytes / (g.K * g.Og * elt * kBitsPerWord));
  cols_per_tile = std::min(cols_per_tile, g.words);
  if (g.G * ceil_div(g.words, cols_per_tile) < wanted_items()) {
    cols_per_tile = std::max<int64_t>(1, ceil_div(g.words, ceil_div(wanted_items(), g.G)));
  }
  const int64_t tr = cols_per_tile * kBitsPerWord;
  const int64_t tiles = ceil_div(g.words, cols_per_tile);
  // One GEMM over all K modules' rows where grad_scores' rows (k, o in group) are one 2-D view.
  const bool stack_gs = g.shared() && (g.G == 1 || g.K == 1);
  const at::ThreadLocalState tls;  // the caller's modes (e.g. inference mode) for the workers
  const int64_t Bc = batch_chunk(g, elt);
  for (int64_t b0 = 0; b0 < g.B; b0 += Bc) {
    const int64_t nb = std::min(Bc, g.B - b0);
    const auto cols = need_gs ? im2col_chunk(x, g, b0, nb) : at::Tensor();  // [Kx*nb, G*R, L]
    auto dcols = need_gx ? at::empty({g.Kx * nb, g.G * g.R, g.L}, x.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_conv2d_backward", [&] {
      at::parallel_for(0, g.G * tiles, 1, [&](int64_t begin, int64_t end) {
        at::ThreadLocalStateGuard tls_guard(tls);
        auto buf = need_gx ? at::empty({g.K * g.Og * tr}, w.options()) : at::Tensor();
        for (int64_t item = begin; item < end; ++item) {
          const int64_t grp = item / tiles, r0 = (item % tiles) * tr;
          const int64_t tc = std::min(tr, g.R - r0), crow = grp * g.R + r0;
          at::Tensor tile;  // [K, Og, tc]
          if (need_gx) {
            unpack_tile<scalar_t>(w.const_data_ptr<scalar_t>(), p.const_data_ptr<int32_t>(), g,
                                  0, g.K, grp * g.Og, g.Og, r0, tc, buf.mutable_data_ptr<scalar_t>());
            tile = buf.narrow(0, 0, g.K * g.Og * tc).view({g.K, g.Og, tc});
          }
          const auto gs_tile =  // [K, Og, tc]
              need_gs ? gs.view({g.K, g.G, g.Og, g.R}).select(1, grp).narrow(2, r0, tc) : at::Tensor();
          for (int64_t b = 0; b < nb; ++b) {
            const auto gb_rows = gp[b0 + b][grp];  // [K, Og, L]
            if (need_gx) {
              if (g.shared()) {  // dcols rows += sum_k (W⊙M_k)^T g_k, as one GEMM
                auto d = dcols[b].narrow(0, crow, tc);
                at::cpu::mm_out(d, tile.view({g.K * g.Og, tc}).t(), gb_rows.view({g.K * g.Og, g.L}));
              } else {
                for (int64_t k = 0; k < g.K; ++k) {
                  auto d = dcols[k * nb + b].narrow(0, crow, tc);
                  at::cpu::mm_out(d, tile.select(0, k).t(), gb_rows.select(0, k));
                }
              }
            }
            if (need_gs) {
              const bool first = b0 + b == 0;
              const int64_t nsplit = stack_gs ? 1 : g.K;  // GEMMs of K/nsplit modules' rows each
              const int64_t km = g.K / nsplit;
              for (int64_t s = 0; s < nsplit; ++s) {
                auto d = gs_tile.narrow(0, s * km, km).view({km * g.Og, tc});
                const auto a = gb_rows.narrow(0, s * km, km).view({km * g.Og, g.L});
                const auto c = cols[(g.shared() ? 0 : s) * nb + b].narrow(0, crow, tc).t();
                if (first) {
                  at::cpu::mm_out(d, a, c);
                } else {
                  at::cpu::addmm_(d, a, c);
                }
              }
            }
          }
        }
      });
    });
    if (need_gx) {
      const auto dx = col2im_chunk(dcols, g).view({g.Kx, nb, g.C, g.H, g.W});
      if (nb == g.B) {
        gx = dx;
      } else {
        gx.narrow(1, b0, nb).copy_(dx);
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

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("masked_conv2d", &modsplit::masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &modsplit::masked_conv2d_backward_cpu);
  m.impl("multi_masked_conv2d", &modsplit::multi_masked_conv2d_cpu);
  m.impl("multi_masked_conv2d_backward", &modsplit::multi_masked_conv2d_backward_cpu);
}
