// module_batch_norm / module_batch_norm_backward on the CPU: training-mode BatchNorm with one set
// of batch statistics per module group (modsplit.module_norm.ModuleBatchNorm).
//
// x [G*N, C, *] (contiguous after the call's .contiguous()), seen as [G, N, C, S]: group g's rows
// n = 0..N-1, channel c, the S positions of the trailing dims; the statistics of (g, c) reduce
// over N x S, each row a contiguous run of S values. With offsets (int64 [G+1], rising from 0 to
// x's rows: ragged groups, decompose's sampled negatives) group g holds rows offsets[g] ..
// offsets[g+1] - 1 instead; a group without rows gets mean 0 and invstd 1/sqrt(1 + eps) (no
// value to normalise) and adds nothing to the weight and bias gradients. y and grad_x have x's shape. Work items
// are the G*C pairs (at::parallel_for); per pair:
//  forward   one pass of shifted sums (shift: the pair's first value, so the variance
//            E[(x-k)^2] - E[x-k]^2 does not cancel; float32 sums in vector lanes over blocks of
//            1024 values, the blocks' sums in double), then one pass writing
//            y = (x - mean) * scale + bias (then ReLU with relu);
//  backward  one pass of sum(g) and sum(g * (x - mean)) (g = grad_y * weight), then one pass
//            writing grad_x = A * grad_y + B * (x - mean) + C, the BatchNorm gradient with its
//            per-pair constants folded; grad_weight / grad_bias sum the pairs' partial sums over g.
//            With out (the forward's output under a fused ReLU), grad_y is taken as 0 where
//            out <= 0 in both passes (torch's ReLU gradient rule).
// float32 and float64; the statistics (mean, invstd [G, C]) have x's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "masked_linear_kernels.h"

namespace modsplit {
namespace {

constexpr int kChains = 8;  // independent accumulators per sum (latency hiding)

struct NormShape {
  int64_t G, N, C, S;
  const int64_t* off;  // ragged groups (offsets [G+1]), or nullptr: G groups of N rows
  int64_t first(int64_t g) const { return off ? off[g] : g * N; }
  int64_t rows(int64_t g) const { return off ? off[g + 1] - off[g] : N; }
};

// offsets_c: the contiguous offsets the returned shape points into (kept alive by the caller).
NormShape check_norm(const at::Tensor& x, int64_t groups, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& offsets, at::Tensor& offsets_c) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "modsplit: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "modsplit: x must be [G*N, C, *], got shape ", x.sizes());
  if (offsets.has_value()) {
    TORCH_CHECK(groups >= 1 && x.size(0) > 0 && x.numel() > 0, "modsplit: groups=", groups,
                " must be positive and x (shape ", x.sizes(), ") non-empty");
    check_same_device(*offsets, x, "offsets", "x");
    check_ragged_index(x, groups, *offsets, c10::nullopt);
    check_ragged_values(x.size(0), *offsets, c10::nullopt, x.size(0));
    offsets_c = offsets->contiguous();
  } else {
    TORCH_CHECK(groups >= 1 && x.size(0) % groups == 0 && x.size(0) > 0 && x.numel() > 0,
                "modsplit: groups=", groups, " must be positive and divide the rows of x (shape ",
                x.sizes(), ")");
  }
  for (const auto& [t, name] : {std::make_pair(&weight, "weight"), std::make_pair(&bias, "bias")}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == x.size(1), "modsplit: ", name,
                " must be [C=", x.size(1), "], got shape ", (*t)->sizes());
    check_same_dtype(**t, x, name, "x");
    check_same_device(**t, x, name, "x");
  }
  return {groups, x.size(0) / groups, x.size(1), x.numel() / (x.size(0) * x.size(1)),
          offsets_c.defined() ? offsets_c.const_data_ptr<int64_t>() : nullptr};
}

// (sum (a - ca), sum (a - ca) * (b - cb)) over n values of two arrays (b may be a), added to
// (su, sv). float32: two 8-lane vector accumulators per sum over blocks of up to kBlock values,
// each block's lanes then added in double, so the error does not grow with the count; float64:
// kChains scalar accumulators.
constexpr int64_t kBlock = 1024;

// pz (the masked variants): the a values are taken as 0 where pz <= 0 (a ReLU's gradient rule
// applied to grad_y, pz the ReLU's output).
template <bool Masked>
inline void run_moments(const float* pa, float ca, const float* pb, float cb, const float* pz,
                        int64_t n, double& su, double& sv) {
  using cpu::v8f;
  using cpu::v8f_u;
  const v8f zero = {};
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    v8f u0{}, u1{}, v0{}, v1{};
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
      v8f a0 = *reinterpret_cast<const v8f_u*>(pa + i) - ca;
      v8f a1 = *reinterpret_cast<const v8f_u*>(pa + i + 8) - ca;
      if constexpr (Masked) {
        a0 = *reinterpret_cast<const v8f_u*>(pz + i) <= zero ? zero : a0;
        a1 = *reinterpret_cast<const v8f_u*>(pz + i + 8) <= zero ? zero : a1;
      }
      u0 += a0;
      u1 += a1;
      v0 += a0 * (*reinterpret_cast<const v8f_u*>(pb + i) - cb);
      v1 += a1 * (*reinterpret_cast<const v8f_u*>(pb + i + 8) - cb);
    }
    const v8f u = u0 + u1, v = v0 + v1;
    for (int e = 0; e < 8; ++e) {
      su += static_cast<double>(u[e]);
      sv += static_cast<double>(v[e]);
    }
    for (; i < i1; ++i) {
      const float da = Masked && pz[i] <= 0.0f ? 0.0f : pa[i] - ca;
      su += static_cast<double>(da);
      sv += static_cast<double>(da) * static_cast<double>(pb[i] - cb);
    }
  }
}

template <bool Masked>
inline void run_moments(const double* pa, double ca, const double* pb, double cb,
                        const double* pz, int64_t n, double& su, double& sv) {
  double u[kChains] = {}, v[kChains] = {};
  int64_t i = 0;
  for (; i + kChains <= n; i += kChains) {
    for (int e = 0; e < kChains; ++e) {
      const double da = Masked && pz[i + e] <= 0.0 ? 0.0 : pa[i + e] - ca;
      u[e] += da;
      v[e] += da * (pb[i + e] - cb);
    }
  }
  for (; i < n; ++i) {
    const double da = Masked && pz[i] <= 0.0 ? 0.0 : pa[i] - ca;
    u[0] += da;
    v[0] += da * (pb[i] - cb);
  }
  for (int e = 0; e < kChains; ++e) {
    su += u[e];
    sv += v[e];
  }
}

// The same over the runs of S values (one per row of group g) of pair (g, c) of two tensors of
// the same layout.
template <bool Masked, typename T>
std::pair<double, double> pair_moments(const T* a, T ca, const T* b, T cb, const T* z,
                                       const NormShape& s, int64_t g, int64_t c) {
  double su = 0, sv = 0;
  for (int64_t r = s.first(g); r < s.first(g) + s.rows(g); ++r) {
    const int64_t off = (r * s.C + c) * s.S;
    run_moments<Masked>(a + off, ca, b + off, cb, Masked ? z + off : nullptr, s.S, su, sv);
  }
  return {su, sv};
}

// out = alpha * a + beta * (b - center) + gamma over the pair's values (b may be a); centring
// before scaling keeps a large mean from cancelling. MaskA: a is taken as 0 where z <= 0;
// Relu: out < 0 becomes 0 (NaN stays).
template <bool MaskA, bool Relu, typename T>
void pair_affine(T* out, const T* a, const T* b, const T* z, const NormShape& s, int64_t g,
                 int64_t c, T alpha, T beta, T center, T gamma) {
  for (int64_t r = s.first(g); r < s.first(g) + s.rows(g); ++r) {
    const int64_t off = (r * s.C + c) * s.S;
    T* __restrict__ po = out + off;
    const T* pa = a + off;
    const T* pb = b + off;
    const T* pz = MaskA ? z + off : nullptr;
    for (int64_t i = 0; i < s.S; ++i) {
      T av = pa[i];
      if constexpr (MaskA) av = pz[i] <= T(0) ? T(0) : av;
      T v = alpha * av + beta * (pb[i] - center) + gamma;
      if constexpr (Relu) v = v < T(0) ? T(0) : v;
      po[i] = v;
    }
  }
}

// (group, channel) pairs per task: about 64K values (the mean pair's).
int64_t grain(const at::Tensor& x, int64_t groups) {
  return std::max<int64_t>(1, (int64_t{1} << 16) * groups * x.size(1) /
                                  std::max<int64_t>(x.numel(), 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> module_batch_norm_cpu(
    const at::Tensor& x_in, int64_t groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool relu,
    const c10::optional<at::Tensor>& offsets) {
  at::Tensor offsets_c;
  const NormShape s = check_norm(x_in, groups, weight, bias, offsets, offsets_c);
  TORCH_CHECK(eps >= 0, "modsplit: eps must be >= 0, got ", eps);
  const auto x = x_in.contiguous();
  const auto wc = weight.has_value() ? weight->contiguous() : at::Tensor();
  const auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty_like(x);
  auto mean = at::empty({s.G, s.C}, x.options());
  auto invstd = at::empty({s.G, s.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "module_batch_norm_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* w = wc.defined() ? wc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    scalar_t* pm = mean.mutable_data_ptr<scalar_t>();
    scalar_t* pi = invstd.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.G * s.C, grain(x, s.G), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / s.C, c = item % s.C;
        if (s.rows(g) == 0) {  // a ragged group without rows
          pm[item] = scalar_t(0);
          pi[item] = static_cast<scalar_t>(1.0 / std::sqrt(1.0 + eps));
          continue;
        }
        const double count = static_cast<double>(s.rows(g) * s.S);
        const scalar_t shift = px[(s.first(g) * s.C + c) * s.S];  // the pair's first value
        const double k = static_cast<double>(shift);
        const auto [d, dd] = pair_moments<false>(px, shift, px, shift, px, s, g, c);
        const double m = d / count;
        const double var = std::max(dd / count - m * m, 0.0);
        const double inv = 1.0 / std::sqrt(var + eps);
        pm[item] = static_cast<scalar_t>(k + m);
        pi[item] = static_cast<scalar_t>(inv);
        const double scale = inv * (w ? static_cast<double>(w[c]) : 1.0);
        const auto affine = relu ? pair_affine<false, true, scalar_t>
                                 : pair_affine<false, false, scalar_t>;
        affine(py, px, px, nullptr, s, g, c, scalar_t(0), static_cast<scalar_t>(scale),
               static_cast<scalar_t>(k + m), b ? b[c] : scalar_t(0));
      }
    });
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> module_batch_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, int64_t groups,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    std::array<bool, 3> output_mask, const c10::optional<at::Tensor>& out_in,
    const c10::optional<at::Tensor>& offsets) {
  at::Tensor offsets_c;
  const NormShape s = check_norm(x_in, groups, weight, c10::nullopt, offsets, offsets_c);
  check_same_dtype(grad_y_in, x_in, "grad_y", "x");
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "modsplit: grad_y must have x's shape ",
              x_in.sizes(), ", got ", grad_y_in.sizes());
  const bool masked = out_in.has_value();  // a fused ReLU: grad_y counts where out > 0
  at::Tensor out;
  if (masked) {
    TORCH_CHECK(out_in->sizes() == x_in.sizes(), "modsplit: out must have x's shape ",
                x_in.sizes(), ", got ", out_in->sizes());
    check_same_dtype(*out_in, x_in, "out", "x");
    check_same_device(*out_in, x_in, "out", "x");
    out = out_in->contiguous();
  }
  for (const auto& [t, name] : {std::make_pair(&mean, "mean"), std::make_pair(&invstd, "invstd")}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({s.G, s.C}), "modsplit: ", name, " must be [G=",
                s.G, ", C=", s.C, "], got shape ", t->sizes());
    check_same_dtype(*t, x_in, name, "x");
  }
  const auto x = x_in.contiguous();
  const auto gy = grad_y_in.contiguous();
  const auto mc = mean.contiguous();
  const auto ic = invstd.contiguous();
  const auto wt = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor gx = output_mask[0] ? at::empty_like(x) : at::Tensor();
  auto sum_g = at::empty({s.G, s.C}, x.options().dtype(at::kDouble));   // sum grad_y
  auto sum_gx = at::empty({s.G, s.C}, x.options().dtype(at::kDouble));  // sum grad_y * xhat
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "module_batch_norm_backward_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = gy.const_data_ptr<scalar_t>();
    const scalar_t* w = wt.defined() ? wt.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pm = mc.const_data_ptr<scalar_t>();
    const scalar_t* pi = ic.const_data_ptr<scalar_t>();
    double* sg = sum_g.mutable_data_ptr<double>();
    double* sgx = sum_gx.mutable_data_ptr<double>();
    const scalar_t* pz = masked ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgx = output_mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    const auto moments = masked ? pair_moments<true, scalar_t> : pair_moments<false, scalar_t>;
    const auto affine = masked ? pair_affine<true, false, scalar_t>
                               : pair_affine<false, false, scalar_t>;
    at::parallel_for(0, s.G * s.C, grain(x, s.G), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / s.C, c = item % s.C;
        const double count = static_cast<double>(s.rows(g) * s.S);
        const double inv = static_cast<double>(pi[item]);
        const auto [a, ax] = moments(pg, scalar_t(0), px, pm[item], pz, s, g, c);
        sg[item] = a;
        sgx[item] = ax * inv;  // sum grad_y * xhat
        if (!pgx) continue;
        // grad_x = w*inv * (gy - a/n - xhat * (ax*inv)/n) with xhat = (x - m) * inv
        const double wc = w ? static_cast<double>(w[c]) : 1.0;
        const double alpha = wc * inv, beta = -wc * inv * inv * inv * ax / count;
        affine(pgx, pg, px, pz, s, g, c, static_cast<scalar_t>(alpha),
               static_cast<scalar_t>(beta), pm[item], static_cast<scalar_t>(-wc * inv * a / count));
      }
    });
  });
  at::Tensor gw, gb;
  if (output_mask[1]) gw = sum_gx.sum(0).to(x.scalar_type());
  if (output_mask[2]) gb = sum_g.sum(0).to(x.scalar_type());
  return {gx, gw, gb};
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("module_batch_norm", &modsplit::module_batch_norm_cpu);
  m.impl("module_batch_norm_backward", &modsplit::module_batch_norm_backward_cpu);
}
