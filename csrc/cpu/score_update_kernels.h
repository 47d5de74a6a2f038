// The element arithmetic of the co-training score update (cotrain_sgd_cpu.cpp has the formulas),
// shared by cotrain_sgd_step_ and the fused step with the next top-k (cotrain_sgd_topk_cpu.cpp).
// Bit for bit torch.optim.SGD's arithmetic needs contraction off: every includer starts with
// #pragma GCC optimize("fp-contract=off"), repeated here.
#pragma once
#pragma GCC optimize("fp-contract=off")
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../checks.h"

namespace modsplit {
namespace score_update {

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

#if defined(__AVX2__)
// update_one on 8 float32 lanes at a time, the same operations in the same order (a product
// stays a product and an fma an fma: the same bits). The compiler's own vectorisation of the
// plain loop kept the |S - A| sums in memory and reloaded every constant per step, at twice
// the cost.
struct Update8 {
  __m256 zero, one, minus_one, abs_bits, neg_lr, mom, wd, coef;
  Update8(float neg_lr_, float mom_, float wd_, float coef_)
      : zero(_mm256_setzero_ps()), one(_mm256_set1_ps(1.f)), minus_one(_mm256_set1_ps(-1.f)),
        abs_bits(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
        neg_lr(_mm256_set1_ps(neg_lr_)), mom(_mm256_set1_ps(mom_)), wd(_mm256_set1_ps(wd_)),
        coef(_mm256_set1_ps(coef_)) {}

  // sgn: 1, -1, or +0 (NaN included), as (v > 0) - (v < 0) in float
  inline __m256 sgn(__m256 v) const {
    return _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), one),
                        _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), minus_one));
  }

  // Elements [i, i + 8): updates s and buf, adds |S - A| to `lanes`, returns the new scores.
  template <bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
  inline __m256 step(float* __restrict__ s, float* __restrict__ buf,
                     const float* __restrict__ grad, const float* __restrict__ a, int64_t i,
                     __m256& lanes) const {
    const __m256 si = _mm256_loadu_ps(s + i);
    __m256 g = _mm256_loadu_ps(grad + i);
    if constexpr (kSign) g = _mm256_mul_ps(g, sgn(si));
    if constexpr (kAnchor) {
      const __m256 d = _mm256_sub_ps(si, _mm256_loadu_ps(a + i));
      lanes = _mm256_add_ps(lanes, _mm256_and_ps(d, abs_bits));
      g = _mm256_add_ps(g, _mm256_mul_ps(sgn(d), coef));
    }
    if constexpr (kDecay) g = _mm256_fmadd_ps(si, wd, g);
    __m256 b = g;
    if constexpr (!kInit) b = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + i), mom), g);
    _mm256_storeu_ps(buf + i, b);
    g = kNesterov ? _mm256_fmadd_ps(b, mom, g) : b;
    const __m256 next = _mm256_fmadd_ps(g, neg_lr, si);
    _mm256_storeu_ps(s + i, next);
    return next;
  }
};
#endif

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
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const Update8 u(neg_lr, mom, wd, coef);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= i1; i += 8) {
      u.step<kAnchor, kInit, kNesterov, kSign, kDecay>(s, buf, grad, a, i, acc);
    }
    _mm256_storeu_ps(lanes, acc);
  }
#endif
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

// f(anchor, init, nesterov, sign, decay) with the five switches as std::bool_constant arguments,
// so that the element loop has no branch per element.
template <typename F>
void with_flags(bool anchor, bool init, bool nesterov, bool sign, bool decay, F&& f) {
  using No = std::false_type;
  using Yes = std::true_type;
  auto d5 = [&](auto a1, auto a2, auto a3, auto a4) {
    decay ? f(a1, a2, a3, a4, Yes{}) : f(a1, a2, a3, a4, No{});
  };
  auto d4 = [&](auto a1, auto a2, auto a3) { sign ? d5(a1, a2, a3, Yes{}) : d5(a1, a2, a3, No{}); };
  auto d3 = [&](auto a1, auto a2) { nesterov ? d4(a1, a2, Yes{}) : d4(a1, a2, No{}); };
  auto d2 = [&](auto a1) { init ? d3(a1, Yes{}) : d3(a1, No{}); };
  anchor ? d2(Yes{}) : d2(No{});
}

inline void check_like(const at::Tensor& t, const at::Tensor& scores, const char* name) {
  check_same_device(t, scores, name, "scores");
  check_same_dtype(t, scores, name, "scores");
  TORCH_CHECK(t.sizes() == scores.sizes(), "modsplit: ", name, " must have the shape of scores ",
              scores.sizes(), ", got ", t.sizes());
}

// The argument checks of the score update (each error names the argument).
inline void check_update_args(const at::Tensor& scores, const at::Tensor& momentum_buffer,
                              const at::Tensor& grad, const c10::optional<at::Tensor>& anchor,
                              double lr, double momentum, double weight_decay, double stem_coef,
                              bool nesterov) {
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
}

}  // namespace score_update
}  // namespace modsplit
