// cotrain_sgd_step_ on the CPU: the co-training score update of one layer in one pass over its
// score bank, bit for bit the arithmetic of torch.optim.SGD (single-tensor path, dampening 0) on
// the gradient autograd would have accumulated:
//
//   g   = sign_grad ? grad * sgn(S) : grad       (dL_CE/dS, the straight-through gradient;
//                                                 sign_grad: grad is dL/d|S|, as the masked
//                                                 ops' backward gives it before sgn(S))
//   d   = S - A;  g = g + sgn(d) * stem_coef     (stemming term, when an anchor A is given)
//   g   = g + weight_decay * S                   (grad.add(param, alpha=wd): one FMA)
//   buf = init ? g : buf * momentum + g          (buf.mul_(m) rounded, then add_(g))
//   g   = nesterov ? g + momentum * buf : buf    (grad.add(buf, alpha=m): one FMA)
//   S   = S - lr * g                             (param.add_(g, alpha=-lr): one FMA)
//
// ATen's add with alpha is a fused multiply-add on this build's vector paths, hence std::fma;
// every other product and sum is rounded on its own (contraction is off in this file).
// The anchor is [K, ...] or [1, ...] (one anchor shared by the modules).
// The pass also returns, per module, the sum of |S - A| over the old scores (the stemming
// term's value): 8 lanes in the scores' dtype per chunk of 2^14 elements, chunks summed in
// float64, so the result does not depend on the number of threads.
#pragma GCC optimize("fp-contract=off")
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace modsplit {
namespace {

constexpr int64_t kChunk = int64_t{1} << 14;  // elements per task (fixed: deterministic sums)

template <typename T>
T sgn(T v) {
  return static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
}

// One element: returns |S - A| (0 without anchor) and updates s[i], buf[i].
template <typename T, bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
inline T update_one(T* __restrict__ s, T* __restrict__ buf, const T* __restrict__ grad,
                    const T* __restrict__ a, int64_t i, T neg_lr, T mom, T wd, T coef) {
  const T si = s[i];
  T g = kSign ? grad[i] * sgn(si) : grad[i];
  T dist = T(0);
  if (kAnchor) {
    const T d = si - a[i];
    dist = std::abs(d);
    g = g + sgn(d) * coef;
  }
  if (kDecay) g = std::fma(si, wd, g);
  T b;
  if (kInit) {
    b = g;
  } else {
    const T decayed = buf[i] * mom;
    b = decayed + g;
  }
  buf[i] = b;
  g = kNesterov ? std::fma(b, mom, g) : b;
  s[i] = std::fma(g, neg_lr, si);
  return dist;
}

// Elements [i0, i1) (a: the anchor, indexed like s): returns the sum of |S - A|. A plain
// function with restrict pointers (not a lambda's captures), so that the loop vectorises.
template <typename T, bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
double update_range(T* __restrict__ s, T* __restrict__ buf, const T* __restrict__ grad,
                    const T* __restrict__ a, int64_t i0, int64_t i1, T neg_lr, T mom, T wd,
                    T coef) {
  // 8 running sums of |S - A| in T (fixed lanes: vectorisable, and the same result for any
  // thread count), added in float64
  T lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    for (int j = 0; j < 8; ++j) {
      lanes[j] += update_one<T, kAnchor, kInit, kNesterov, kSign, kDecay>(s, buf, grad, a, i + j,
                                                                          neg_lr, mom, wd, coef);
    }
  }
  for (; i < i1; ++i) {
    lanes[0] += update_one<T, kAnchor, kInit, kNesterov, kSign, kDecay>(s, buf, grad, a, i, neg_lr,
                                                                        mom, wd, coef);
  }
  double total = 0.0;
  for (int j = 0; j < 8; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

template <typename T, bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
void update(T* s, T* buf, const T* grad, const T* anchor, int64_t anchor_stride, double* stem,
            int64_t modules, int64_t n, double lr, double momentum, double weight_decay,
            double stem_coef) {
  const T neg_lr = static_cast<T>(-lr), mom = static_cast<T>(momentum);
  const T wd = static_cast<T>(weight_decay), coef = static_cast<T>(stem_coef);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(modules * chunks), 0.0);
  at::parallel_for(0, modules * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / chunks, c = t % chunks;
      const int64_t i0 = c * kChunk, i1 = std::min(n, (c + 1) * kChunk);
      partial[static_cast<size_t>(t)] = update_range<T, kAnchor, kInit, kNesterov, kSign, kDecay>(
          s + m * n, buf + m * n, grad + m * n, kAnchor ? anchor + m * anchor_stride : nullptr,
          i0, i1, neg_lr, mom, wd, coef);
    }
  });
  for (int64_t m = 0; m < modules; ++m) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[static_cast<size_t>(m * chunks + c)];
    stem[m] = total;
  }
}

// The update with its five switches turned into template arguments (no branch per element).
template <typename T>
void update_dispatch(bool anchor, bool init, bool nesterov, bool sign, bool decay, T* s, T* buf,
                     const T* grad, const T* a, int64_t anchor_stride, double* stem,
                     int64_t modules, int64_t n, double lr, double momentum, double weight_decay,
                     double stem_coef) {
  auto call = [&](auto k_anchor, auto k_init, auto k_nesterov, auto k_sign, auto k_decay) {
    update<T, decltype(k_anchor)::value, decltype(k_init)::value, decltype(k_nesterov)::value,
           decltype(k_sign)::value, decltype(k_decay)::value>(
        s, buf, grad, a, anchor_stride, stem, modules, n, lr, momentum, weight_decay, stem_coef);
  };
  using F = std::false_type;
  using Tr = std::true_type;
  auto d5 = [&](auto a1, auto a2, auto a3, auto a4) {
    decay ? call(a1, a2, a3, a4, Tr{}) : call(a1, a2, a3, a4, F{});
  };
  auto d4 = [&](auto a1, auto a2, auto a3) { sign ? d5(a1, a2, a3, Tr{}) : d5(a1, a2, a3, F{}); };
  auto d3 = [&](auto a1, auto a2) { nesterov ? d4(a1, a2, Tr{}) : d4(a1, a2, F{}); };
  auto d2 = [&](auto a1) { init ? d3(a1, Tr{}) : d3(a1, F{}); };
  anchor ? d2(Tr{}) : d2(F{});
}

void check_like(const at::Tensor& t, const at::Tensor& scores, const char* name) {
  check_same_device(t, scores, name, "scores");
  check_same_dtype(t, scores, name, "scores");
  TORCH_CHECK(t.sizes() == scores.sizes(), "modsplit: ", name, " must have the shape of scores ",
              scores.sizes(), ", got ", t.sizes());
}

}  // namespace

at::Tensor cotrain_sgd_step_cpu(at::Tensor& scores, at::Tensor& momentum_buffer,
                                const at::Tensor& grad, const c10::optional<at::Tensor>& anchor,
                                double lr, double momentum, double weight_decay, double stem_coef,
                                bool nesterov, bool init_buffer, bool sign_grad) {
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "modsplit: scores must be float32 or float64 for the CPU kernel, got ", dtype);
  TORCH_CHECK(scores.dim() >= 2 && scores.numel() > 0,
              "modsplit: scores must be a non-empty [K, ...] bank, got shape ", scores.sizes());
  TORCH_CHECK(scores.is_contiguous(), "modsplit: scores must be contiguous (updated in place)");
  TORCH_CHECK(momentum_buffer.is_contiguous(),
              "modsplit: momentum_buffer must be contiguous (updated in place)");
  check_like(momentum_buffer, scores, "momentum_buffer");
  check_like(grad, scores, "grad");
  if (anchor) {
    check_same_device(*anchor, scores, "anchor", "scores");
    check_same_dtype(*anchor, scores, "anchor", "scores");
    TORCH_CHECK(anchor->dim() == scores.dim() && (anchor->size(0) == 1 ||
                                                  anchor->size(0) == scores.size(0)) &&
                    anchor->sizes().slice(1) == scores.sizes().slice(1),
                "modsplit: anchor must have the shape of scores ", scores.sizes(),
                " or a leading dim of 1, got ", anchor->sizes());
  }
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum) && std::isfinite(weight_decay) &&
                  std::isfinite(stem_coef),
              "modsplit: lr, momentum, weight_decay and stem_coef must be finite, got ", lr, ", ",
              momentum, ", ", weight_decay, ", ", stem_coef);
  TORCH_CHECK(!nesterov || momentum > 0, "modsplit: nesterov needs momentum > 0, got ", momentum);
  const int64_t modules = scores.size(0), n = scores.numel() / modules;
  auto stem = at::zeros({modules}, scores.options().dtype(at::kDouble));
  const auto g = grad.contiguous();
  const auto a = anchor ? anchor->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "cotrain_sgd_step_cpu", [&] {
    update_dispatch<scalar_t>(anchor.has_value(), init_buffer, nesterov, sign_grad,
                              weight_decay != 0.0, scores.data_ptr<scalar_t>(),
                              momentum_buffer.data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                              anchor ? a.const_data_ptr<scalar_t>() : nullptr,
                              anchor && a.size(0) == 1 ? 0 : n, stem.data_ptr<double>(), modules,
                              n, lr, momentum, weight_decay, stem_coef);
  });
  return stem;
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) { m.impl("cotrain_sgd_step_", &modsplit::cotrain_sgd_step_cpu); }
