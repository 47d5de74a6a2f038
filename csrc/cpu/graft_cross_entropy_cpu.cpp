// graft_cross_entropy / graft_cross_entropy_backward on the CPU: the K grafting layers and the
// class-weighted cross-entropy of co-training (Eq. 1's first term) in one op, instead of a
// batched matmul and some ten small ATen ops (and their backward nodes) per step.
//
// logits [K, R, N] (module k's network output on its R rows), weight [K, N, 2], bias [K, 2]:
//   out[k, r, j] = bias[k, j] + sum_n logits[k, r, n] * weight[k, n, j]      (j = 0: "is c")
//   ce[k] = scale * sum_r row_weight[k, r] * (logsumexp(out[k, r]) - out[k, r, t]),
//   t = 0 where positive[k, r], else 1.
// backward, from grad_ce [K]: with p = softmax(out[k, r]) and
//   dz_j = grad_ce[k] * scale * row_weight[k, r] * (p_j - [j == t]),
//   grad_logits[k, r, n] = sum_j dz_j * weight[k, n, j],
//   grad_weight[k, n, j] = sum_r logits[k, r, n] * dz_j, grad_bias[k, j] = sum_r dz_j.
// Work items are the K modules (at::parallel_for); float32 and float64; sums over n and r run
// in the input dtype, ce's sum over r in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace modsplit {
namespace {

struct GraftShape {
  int64_t K, R, N;
};

GraftShape check_graft(const at::Tensor& logits, const at::Tensor& weight,
                       const at::Tensor& positive, const at::Tensor& row_weight) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "modsplit: logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "modsplit: logits must be [K, R, N], got shape ", logits.sizes());
  const int64_t K = logits.size(0), R = logits.size(1), N = logits.size(2);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({K, N, 2}), "modsplit: weight must be [K=", K,
              ", N=", N, ", 2], got shape ", weight.sizes());
  check_same_dtype(weight, logits, "weight", "logits");
  check_same_device(weight, logits, "weight", "logits");
  TORCH_CHECK(positive.scalar_type() == at::kBool && positive.sizes() == at::IntArrayRef({K, R}),
              "modsplit: positive must be bool [K=", K, ", R=", R, "], got ",
              positive.scalar_type(), " ", positive.sizes());
  TORCH_CHECK(row_weight.sizes() == at::IntArrayRef({K, R}), "modsplit: row_weight must be [K=",
              K, ", R=", R, "], got shape ", row_weight.sizes());
  check_same_dtype(row_weight, logits, "row_weight", "logits");
  check_same_device(positive, logits, "positive", "logits");
  check_same_device(row_weight, logits, "row_weight", "logits");
  return {K, R, N};
}

// log(exp(z0) + exp(z1)), shifted by the larger as log_softmax does.
template <typename T>
inline T logsumexp2(T z0, T z1) {
  const T m = z0 > z1 ? z0 : z1;
  return m + std::log(std::exp(z0 - m) + std::exp(z1 - m));
}

// (p_0, p_1) = softmax(z0, z1), shifted by the larger.
template <typename T>
inline void softmax2(T z0, T z1, T& p0, T& p1) {
  const T m = z0 > z1 ? z0 : z1;
  const T e0 = std::exp(z0 - m), e1 = std::exp(z1 - m);
  p0 = e0 / (e0 + e1);
  p1 = e1 / (e0 + e1);
}

std::tuple<at::Tensor, at::Tensor> graft_cross_entropy_cpu(const at::Tensor& logits_in,
                                                           const at::Tensor& weight_in,
                                                           const at::Tensor& bias_in,
                                                           const at::Tensor& positive_in,
                                                           const at::Tensor& row_weight_in,
                                                           double scale) {
  const GraftShape s = check_graft(logits_in, weight_in, positive_in, row_weight_in);
  TORCH_CHECK(bias_in.sizes() == at::IntArrayRef({s.K, 2}), "modsplit: bias must be [K=", s.K,
              ", 2], got shape ", bias_in.sizes());
  check_same_dtype(bias_in, logits_in, "bias", "logits");
  check_same_device(bias_in, logits_in, "bias", "logits");
  const auto logits = logits_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto positive = positive_in.contiguous();
  const auto row_weight = row_weight_in.contiguous();
  auto out = at::empty({s.K, s.R, 2}, logits.options());
  auto ce = at::empty({s.K}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "graft_cross_entropy_cpu", [&] {
    const scalar_t* pl = logits.const_data_ptr<scalar_t>();
    const scalar_t* pw = weight.const_data_ptr<scalar_t>();
    const scalar_t* pb = bias.const_data_ptr<scalar_t>();
    const bool* pp = positive.const_data_ptr<bool>();
    const scalar_t* prw = row_weight.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    scalar_t* pc = ce.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* wk = pw + k * s.N * 2;
        double sum = 0.0;
        for (int64_t r = 0; r < s.R; ++r) {
          const scalar_t* lr = pl + (k * s.R + r) * s.N;
          scalar_t z0 = pb[k * 2], z1 = pb[k * 2 + 1];
          for (int64_t n = 0; n < s.N; ++n) {
            z0 += lr[n] * wk[2 * n];
            z1 += lr[n] * wk[2 * n + 1];
          }
          po[(k * s.R + r) * 2] = z0;
          po[(k * s.R + r) * 2 + 1] = z1;
          const scalar_t loss = logsumexp2(z0, z1) - (pp[k * s.R + r] ? z0 : z1);
          sum += static_cast<double>(prw[k * s.R + r] * loss);
        }
        pc[k] = static_cast<scalar_t>(scale * sum);
      }
    });
  });
  return {out, ce};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graft_cross_entropy_backward_cpu(
    const at::Tensor& grad_ce_in, const at::Tensor& logits_in, const at::Tensor& weight_in,
    const at::Tensor& out_in, const at::Tensor& positive_in, const at::Tensor& row_weight_in,
    double scale, std::array<bool, 3> output_mask) {
  const GraftShape s = check_graft(logits_in, weight_in, positive_in, row_weight_in);
  TORCH_CHECK(grad_ce_in.sizes() == at::IntArrayRef({s.K}), "modsplit: grad_ce must be [K=", s.K,
              "], got shape ", grad_ce_in.sizes());
  check_same_dtype(grad_ce_in, logits_in, "grad_ce", "logits");
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef({s.K, s.R, 2}), "modsplit: out must be [K=", s.K,
              ", R=", s.R, ", 2], got shape ", out_in.sizes());
  check_same_dtype(out_in, logits_in, "out", "logits");
  const auto grad_ce = grad_ce_in.contiguous();
  const auto logits = logits_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto out = out_in.contiguous();
  const auto positive = positive_in.contiguous();
  const auto row_weight = row_weight_in.contiguous();
  at::Tensor gl = output_mask[0] ? at::empty_like(logits) : at::Tensor();
  at::Tensor gw = output_mask[1] ? at::zeros_like(weight) : at::Tensor();
  at::Tensor gb = output_mask[2] ? at::zeros({s.K, 2}, logits.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "graft_cross_entropy_backward_cpu", [&] {
    const scalar_t* pg = grad_ce.const_data_ptr<scalar_t>();
    const scalar_t* pl = logits.const_data_ptr<scalar_t>();
    const scalar_t* pw = weight.const_data_ptr<scalar_t>();
    const scalar_t* po = out.const_data_ptr<scalar_t>();
    const bool* pp = positive.const_data_ptr<bool>();
    const scalar_t* prw = row_weight.const_data_ptr<scalar_t>();
    scalar_t* pgl = output_mask[0] ? gl.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgw = output_mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgb = output_mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, s.K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* wk = pw + k * s.N * 2;
        const scalar_t c = pg[k] * sc;
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t kr = k * s.R + r;
          scalar_t p0, p1;
          softmax2(po[2 * kr], po[2 * kr + 1], p0, p1);
          const bool pos = pp[kr];
          const scalar_t a = c * prw[kr];
          const scalar_t dz0 = a * (p0 - (pos ? scalar_t(1) : scalar_t(0)));
          const scalar_t dz1 = a * (p1 - (pos ? scalar_t(0) : scalar_t(1)));
          const scalar_t* lr = pl + kr * s.N;
          if (pgl) {
            scalar_t* gr = pgl + kr * s.N;
            for (int64_t n = 0; n < s.N; ++n) gr[n] = dz0 * wk[2 * n] + dz1 * wk[2 * n + 1];
          }
          if (pgw) {
            scalar_t* gwk = pgw + k * s.N * 2;
            for (int64_t n = 0; n < s.N; ++n) {
              gwk[2 * n] += lr[n] * dz0;
              gwk[2 * n + 1] += lr[n] * dz1;
            }
          }
          if (pgb) {
            pgb[2 * k] += dz0;
            pgb[2 * k + 1] += dz1;
          }
        }
      }
    });
  });
  return {gl, gw, gb};
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("graft_cross_entropy", &modsplit::graft_cross_entropy_cpu);
  m.impl("graft_cross_entropy_backward", &modsplit::graft_cross_entropy_backward_cpu);
}
