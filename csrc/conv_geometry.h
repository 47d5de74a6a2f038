// Argument checks and output geometry of the masked conv2d ops, shared by every backend.
#pragma once
#include <ATen/ATen.h>

#include <array>

#include "checks.h"

namespace modsplit {

struct ConvGeom {
  int64_t K, Kx, B, C, H, W, O, G, Cg, Og, kh, kw, R, words, Ho, Wo, L;
  std::array<int64_t, 2> stride, padding, dilation;
  bool shared() const { return Kx == 1; }
  // 1x1 kernel, unit stride, no padding: im2col is the identity (dilation does not matter).
  bool pointwise() const {
    return kh == 1 && kw == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
           padding[1] == 0;
  }
};

inline void check_pair(at::IntArrayRef v, const char* name, bool positive) {
  TORCH_CHECK(v.size() == 2, "modsplit: ", name, " must have 2 values, got ", v);
  for (int64_t e : v) {
    TORCH_CHECK(positive ? e > 0 : e >= 0, "modsplit: ", name, " must be ",
                positive ? "positive" : "non-negative", ", got ", v);
  }
}

// Validates the arguments of every op and returns the geometry. multi: packed is [K, O, words]
// and x is [B, C, H, W] (shared) or [K, B, C, H, W]; otherwise packed [O, words], x [B, C, H, W].
inline ConvGeom conv_geometry(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, bool multi) {
  check_float(weight, "weight");
  check_same_device(x, weight, "x", "weight");
  check_same_dtype(x, weight, "x", "weight");
  TORCH_CHECK(weight.dim() == 4,
              "modsplit: weight must be [out_channels, in_channels/groups, kh, kw], got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() == 4 || (multi && x.dim() == 5), "modsplit: x must be [",
              multi ? "K, " : "", "B, C, H, W]", multi ? " or [B, C, H, W]" : "", ", got shape ",
              x.sizes());
  check_pair(stride, "stride", true);
  check_pair(padding, "padding", false);
  check_pair(dilation, "dilation", true);
  const int64_t C = x.size(-3), O = weight.size(0);
  TORCH_CHECK(groups >= 1 && O % groups == 0, "modsplit: groups=", groups,
              " must be positive and divide out_channels=", O);
  // C == weight.size(1) * groups also makes groups divide in_channels.
  TORCH_CHECK(C == weight.size(1) * groups, "modsplit: x has ", C,
              " channels but weight of shape ", weight.sizes(), " with groups=", groups,
              " expects ", weight.size(1) * groups);
  check_packed_for_weight(packed, weight, multi ? 1 : 0);
  ConvGeom g{};
  g.K = multi ? packed.size(0) : 1;
  TORCH_CHECK(g.K >= 1, "modsplit: packed must hold at least one module, got shape ",
              packed.sizes());
  g.Kx = x.dim() == 5 ? x.size(0) : 1;
  TORCH_CHECK(x.dim() == 4 || g.Kx == g.K, "modsplit: x has ", g.Kx,
              " modules (dim 0) but packed has K=", g.K);
  g.B = x.size(-4);
  g.C = C;
  g.H = x.size(-2);
  g.W = x.size(-1);
  g.O = O;
  g.G = groups;
  g.Cg = C / groups;
  g.Og = O / groups;
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.R = g.Cg * g.kh * g.kw;
  g.words = words_for(g.R);
  for (int d = 0; d < 2; ++d) {
    g.stride[d] = stride[d];
    g.padding[d] = padding[d];
    g.dilation[d] = dilation[d];
  }
  g.Ho = (g.H + 2 * g.padding[0] - g.dilation[0] * (g.kh - 1) - 1) / g.stride[0] + 1;
  g.Wo = (g.W + 2 * g.padding[1] - g.dilation[1] * (g.kw - 1) - 1) / g.stride[1] + 1;
  TORCH_CHECK(g.H + 2 * g.padding[0] >= g.dilation[0] * (g.kh - 1) + 1 &&
                  g.W + 2 * g.padding[1] >= g.dilation[1] * (g.kw - 1) + 1,
              "modsplit: x of spatial size ", g.H, "x", g.W, " (padded ", g.H + 2 * g.padding[0],
              "x", g.W + 2 * g.padding[1], ") is smaller than the dilated kernel ",
              g.dilation[0] * (g.kh - 1) + 1, "x", g.dilation[1] * (g.kw - 1) + 1);
  g.L = g.Ho * g.Wo;
  return g;
}

// ragged_masked_conv2d: x [R, C, H, W] (g.B = R), packed [K, O, words], offsets / rows as
// check_ragged_index (T, the rows the modules take, is returned in T).
inline ConvGeom ragged_conv_geometry(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, const at::Tensor& offsets,
                                     const c10::optional<at::Tensor>& rows, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, int64_t& T) {
  TORCH_CHECK(x.dim() == 4, "modsplit: x must be [R, C, H, W], got shape ", x.sizes());
  const auto g = conv_geometry(x, weight, packed, stride, padding, dilation, groups, true);
  T = check_ragged_index(x, g.K, offsets, rows);
  return g;
}

// ragged_masked_conv2d_backward's grad_out: [T, O, Ho, Wo] on weight's device, weight's dtype.
inline void check_ragged_conv_grad_out(const at::Tensor& grad_out, const at::Tensor& weight,
                                       const ConvGeom& g, int64_t T) {
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T, g.O, g.Ho, g.Wo}),
              "modsplit: grad_out must have shape ", at::IntArrayRef({T, g.O, g.Ho, g.Wo}),
              " (the forward output's), got ", grad_out.sizes());
}

inline void check_conv_grad_out(const at::Tensor& grad_out, const at::Tensor& weight, const ConvGeom& g,
                    bool multi) {
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  const std::vector<int64_t> single{g.B, g.O, g.Ho, g.Wo};
  const std::vector<int64_t> bank{g.K, g.B, g.O, g.Ho, g.Wo};
  const at::IntArrayRef want = multi ? at::IntArrayRef(bank) : at::IntArrayRef(single);
  TORCH_CHECK(grad_out.sizes() == want, "modsplit: grad_out must have shape ", want, ", got ",
              grad_out.sizes());
}

}  // namespace modsplit
