// cotrain_sgd_topk_step_ on the CPU: the co-training score update of one layer (the arithmetic
// of cotrain_sgd_step_, bit for bit) fused with the first pass of the next step's top-k mask.
//
// The next top-k is exact (the mask multi_topk_mask would return for the updated scores) but
// its counting pass rides on the update: each block of 64 words (2,048 scores) is updated, and
// while it is still in L1 its new keys are compared with a bracket [lo, hi] around the previous
// step's threshold. Keys above hi are written as mask bits at once; keys inside the bracket are
// gathered, with the index of their word. The threshold is then selected among the gathered
// keys (a few per thousand: the threshold moves little in one step), and only the words that
// held a bracket key are rewritten. A module whose threshold left its bracket falls back to
// the full top-k (topk_select::topk_pack) on its updated scores, so the mask is exact whatever
// the bracket.
//
// bracket: float64 [K, 2], read and written: per module the threshold |S| of the last mask and
// the half-width of the next bracket (NaN threshold: unknown; the full top-k runs). After the
// call it holds the new threshold and the next half-width (reference.update_topk_bracket_ has
// the rule; the constants are reference.BRACKET_*_HALF_WIDTH).
#pragma GCC optimize("fp-contract=off")
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "score_update_kernels.h"
#include "topk_select.h"

namespace modsplit {
namespace {

using score_update::check_update_args;
using score_update::update_range;
using score_update::with_flags;
using topk_select::KeyOf;

constexpr int64_t kTaskWords = 512;  // mask words per task (fixed: deterministic stem sums)
constexpr int64_t kBlockWords = 64;  // words updated, then scanned, while in L1
constexpr double kMinHalfWidth = 1.0 / 1024;  // of the threshold
constexpr double kFirstHalfWidth = 1.0 / 256;

template <typename T>
T value_of(typename KeyOf<T>::Key key) {
  T v;
  std::memcpy(&v, &key, sizeof(v));
  return v;
}

// Per task: the count of keys above the bracket, the gathered bracket keys, the words they sit
// in, and whether a NaN was seen.
template <typename Key>
struct TaskScan {
  int64_t above = 0;
  std::vector<Key> keys;
  std::vector<int64_t> words;
  bool nan = false;
  double stem = 0.0;
};

// Records the scan of word u: its bits above the bracket into the mask, its count, and its
// gathered bracket keys (already written at out.keys[kept ..]).
template <typename Key>
inline void record_word(TaskScan<Key>& out, int32_t* dm, int64_t u, uint32_t up, uint32_t inv,
                        int64_t got, int64_t& kept) {
  dm[u] = static_cast<int32_t>(up);
  out.above += __builtin_popcount(up);
  out.nan |= inv != 0;
  if (got) {
    kept += got;
    out.words.push_back(u);
  }
}

// Room for one more word's 32 bracket keys at out.keys[kept ..].
template <typename Key>
inline void reserve_word(TaskScan<Key>& out, int64_t kept) {
  if (static_cast<int64_t>(out.keys.size()) < kept + 32) {
    out.keys.resize(std::max<size_t>(64, 2 * out.keys.size()));
  }
}

// One word of 32 updated scores q against the bracket [lo, hi]: up = bits of the keys > hi,
// inv = bits of NaN keys; keys inside the bracket are written to dst (room for 32) in order and
// counted. The fused step's bracket holds about one key in a thousand, so the float32 version
// first tests the whole word for a bracket key and gathers only when there is one.
template <typename T>
int64_t scan_rare(const T* q, typename KeyOf<T>::Key lo, typename KeyOf<T>::Key hi,
                  uint32_t& up, uint32_t& inv, typename KeyOf<T>::Key* dst) {
  return topk_select::scan_word<T>(q, lo, hi, up, inv, dst);
}

#if defined(__AVX2__)
template <>
int64_t scan_rare<float>(const float* q, int32_t lo, int32_t hi, uint32_t& up, uint32_t& inv,
                         int32_t* dst) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi);
  const __m256i vlo = _mm256_set1_epi32(lo - 1), vinf = _mm256_set1_epi32(KeyOf<float>::kInf);
  __m256i in_any = _mm256_setzero_si256(), nan_any = _mm256_setzero_si256();
  up = 0;
  for (int g = 0; g < 4; ++g) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 8 * g)), abs);
    const __m256i above = _mm256_cmpgt_epi32(k, vhi);
    in_any = _mm256_or_si256(in_any, _mm256_andnot_si256(above, _mm256_cmpgt_epi32(k, vlo)));
    nan_any = _mm256_or_si256(nan_any, _mm256_cmpgt_epi32(k, vinf));
    up |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(above))) << (8 * g);
  }
  if (_mm256_testz_si256(in_any, in_any) && _mm256_testz_si256(nan_any, nan_any)) {
    inv = 0;
    return 0;
  }
  return topk_select::scan_word<float>(q, lo, hi, up, inv, dst);
}
#endif

#if defined(__AVX2__)
// float32 rows of whole 8-lane groups (cols % 8 == 0): the update of words [b0, b1) and their
// bracket scan in one pass. Each group of 8 new scores is compared with the bracket while still
// in a register; a word that holds a bracket key or a NaN is rescanned from memory to gather its
// keys in order (rare). The elements are visited in update_range's order, so the scores, the
// momentum and the |S - A| sum come out the same. Returns that sum; fills dm, out and kept as
// the word scan does.
template <bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
double update_scan_block(float* s, float* buf, const float* grad, const float* a, int64_t b0,
                         int64_t b1, int64_t words, int64_t cols, int32_t lo, int32_t hi,
                         const score_update::Update8& upd, int32_t* dm, TaskScan<int32_t>& out,
                         int64_t& kept) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi);
  const __m256i vlo = _mm256_set1_epi32(lo - 1), vinf = _mm256_set1_epi32(KeyOf<float>::kInf);
  __m256 lanes = _mm256_setzero_ps();
  int64_t row = b0 / words, w = b0 % words;
  for (int64_t u = b0; u < b1; ++u) {
    reserve_word(out, kept);
    const int64_t i0 = row * cols + w * 32;
    const int64_t len = std::min<int64_t>(32, cols - w * 32);
    if (++w == words) {
      w = 0;
      ++row;
    }
    uint32_t up = 0, inv = 0;
    __m256i flagged = _mm256_setzero_si256();  // a bracket key or a NaN
    for (int64_t g = 0; g < len / 8; ++g) {
      const __m256 next =
          upd.step<kAnchor, kInit, kNesterov, kSign, kDecay>(s, buf, grad, a, i0 + 8 * g, lanes);
      const __m256i k = _mm256_and_si256(_mm256_castps_si256(next), abs);
      const __m256i above = _mm256_cmpgt_epi32(k, vhi);
      flagged = _mm256_or_si256(
          flagged, _mm256_or_si256(_mm256_andnot_si256(above, _mm256_cmpgt_epi32(k, vlo)),
                                   _mm256_cmpgt_epi32(k, vinf)));
      up |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(above))) << (8 * g);
    }
    int64_t got = 0;
    if (!_mm256_testz_si256(flagged, flagged)) {
      got = topk_select::scan_partial_word<float>(s + i0, len, lo, hi, up, inv,
                                                  out.keys.data() + kept);
    }
    record_word(out, dm, u, up, inv, got, kept);
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, lanes);
  double total = 0.0;
  for (int j = 0; j < 8; ++j) total += static_cast<double>(sums[j]);
  return total;
}
#endif

template <typename T, bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
void fused_step(T* s, T* buf, const T* grad, const T* anchor, int64_t anchor_stride, double* stem,
                int32_t* dst, double* bracket, int64_t modules, int64_t rows, int64_t cols,
                int64_t keep, double lr, double momentum, double weight_decay, double stem_coef) {
  using Key = typename KeyOf<T>::Key;
  const T neg_lr = static_cast<T>(-lr), mom = static_cast<T>(momentum);
  const T wd = static_cast<T>(weight_decay), coef = static_cast<T>(stem_coef);
  const int64_t words = words_for(cols), uw = rows * words, n = rows * cols;
  const int64_t chunks = topk_select::ceil_div(uw, kTaskWords), tasks = modules * chunks;
  auto elem = [&](int64_t u) { return (u / words) * cols + (u % words) * 32; };
  auto len_of = [&](int64_t u) { return std::min<int64_t>(32, cols - (u % words) * 32); };

  std::vector<uint8_t> has(static_cast<size_t>(modules), 0);
  std::vector<Key> lo(static_cast<size_t>(modules)), hi(static_cast<size_t>(modules));
  for (int64_t m = 0; m < modules; ++m) {
    const double tau = bracket[2 * m], half = bracket[2 * m + 1];
    has[m] = keep < n && std::isfinite(tau) && std::isfinite(half) && tau >= 0 && half >= 0;
    if (has[m]) {
      lo[m] = KeyOf<T>::get(static_cast<T>(std::max(tau - half, 0.0)));
      hi[m] = KeyOf<T>::get(static_cast<T>(tau + half));
    }
  }

  std::vector<TaskScan<Key>> scan(static_cast<size_t>(tasks));
#if defined(__AVX2__)
  const score_update::Update8 upd(static_cast<float>(neg_lr), static_cast<float>(mom),
                                  static_cast<float>(wd), static_cast<float>(coef));
#endif
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / chunks, u0 = (t % chunks) * kTaskWords;
      const int64_t u1 = std::min(uw, u0 + kTaskWords);
      T* sm = s + m * n;
      int32_t* dm = dst + m * uw;
      auto& out = scan[t];
      int64_t kept = 0;
      for (int64_t b0 = u0; b0 < u1; b0 += kBlockWords) {
        const int64_t b1 = std::min(u1, b0 + kBlockWords);
#if defined(__AVX2__)
        if constexpr (std::is_same_v<T, float>) {
          if (has[m] && cols % 8 == 0) {
            out.stem += update_scan_block<kAnchor, kInit, kNesterov, kSign, kDecay>(
                sm, buf + m * n, grad + m * n, kAnchor ? anchor + m * anchor_stride : nullptr,
                b0, b1, words, cols, lo[m], hi[m], upd, dm, out, kept);
            continue;
          }
        }
#endif
        out.stem += update_range<T, kAnchor, kInit, kNesterov, kSign, kDecay>(
            sm, buf + m * n, grad + m * n, kAnchor ? anchor + m * anchor_stride : nullptr,
            elem(b0), elem(b1 - 1) + len_of(b1 - 1), neg_lr, mom, wd, coef);
        if (!has[m]) continue;
        int64_t row = b0 / words, w = b0 % words;  // word u = (row, w), advanced without division
        for (int64_t u = b0; u < b1; ++u) {
          reserve_word(out, kept);
          const T* q = sm + row * cols + w * 32;
          const int64_t len = std::min<int64_t>(32, cols - w * 32);
          if (++w == words) {
            w = 0;
            ++row;
          }
          uint32_t up, inv;
          Key* gathered = out.keys.data() + kept;
          const int64_t got =
              len == 32 ? scan_rare<T>(q, lo[m], hi[m], up, inv, gathered)
                        : topk_select::scan_partial_word<T>(q, len, lo[m], hi[m], up, inv,
                                                            gathered);
          record_word(out, dm, u, up, inv, got, kept);
        }
      }
      out.keys.resize(kept);
    }
  });
  for (int64_t m = 0; m < modules; ++m) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += scan[m * chunks + c].stem;
    stem[m] = total;
  }
  for (const auto& sc : scan) {
    TORCH_CHECK(!sc.nan, "modsplit: scores contain NaN; top-k of |scores| is undefined");
  }

  // Per module: the threshold among the gathered keys and the rewrite of their words, or a miss.
  std::vector<uint8_t> miss(static_cast<size_t>(modules), 0);
  std::vector<Key> thr(static_cast<size_t>(modules), Key{0});
  at::parallel_for(0, modules, 1, [&](int64_t m0, int64_t m1) {
    std::vector<Key> all;
    for (int64_t m = m0; m < m1; ++m) {
      if (!has[m]) {
        miss[m] = 1;
        continue;
      }
      int64_t up = 0, in = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        up += scan[m * chunks + c].above;
        in += static_cast<int64_t>(scan[m * chunks + c].keys.size());
      }
      if (up >= keep || up + in < keep) {
        miss[m] = 1;
        continue;
      }
      const int64_t rank = keep - up;
      all.clear();
      for (int64_t c = 0; c < chunks; ++c) {
        const auto& v = scan[m * chunks + c].keys;
        all.insert(all.end(), v.begin(), v.end());
      }
      const Key th = topk_select::kth_largest(all, rank - 1);
      thr[m] = th;
      int64_t greater = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const auto& v = scan[m * chunks + c].keys;
        greater += std::count_if(v.begin(), v.end(), [&](Key k) { return k > th; });
      }
      int64_t left = rank - greater;  // ties kept, lowest flat index first
      const T* sm = s + m * n;
      int32_t* dm = dst + m * uw;
      for (int64_t c = 0; c < chunks; ++c) {
        for (const int64_t u : scan[m * chunks + c].words) {
          const T* q = sm + elem(u);
          const int64_t len = len_of(u);
          dm[u] = static_cast<int32_t>(topk_select::mask_word(q, len, th, left));
        }
      }
    }
  });
  for (int64_t m = 0; m < modules; ++m) {  // misses: the full top-k of the updated scores
    if (miss[m]) topk_select::topk_pack(s + m * n, dst + m * uw, 1, rows, cols, keep, &thr[m]);
  }

  for (int64_t m = 0; m < modules; ++m) {
    const double tau_old = bracket[2 * m], half_old = bracket[2 * m + 1];
    const double tau = static_cast<double>(value_of<T>(thr[m]));
    double half = has[m] ? std::max(4.0 * std::abs(tau - tau_old), kMinHalfWidth * tau)
                         : kFirstHalfWidth * tau;
    if (has[m] && miss[m]) half = std::max(half, 2.0 * half_old);
    bracket[2 * m] = keep < n ? tau : std::nan("");  // every entry kept: no threshold
    bracket[2 * m + 1] = keep < n ? half : std::nan("");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cotrain_sgd_topk_step_cpu(
    at::Tensor& scores, at::Tensor& momentum_buffer, const at::Tensor& grad,
    const c10::optional<at::Tensor>& anchor, double lr, double momentum, double weight_decay,
    double stem_coef, bool nesterov, bool init_buffer, bool sign_grad, double density,
    at::Tensor& bracket) {
  check_update_args(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay, stem_coef,
                    nesterov);
  check_density(density);
  TORCH_CHECK(scores.dim() >= 3, "modsplit: scores must be a [K, O, ...] bank of at least 3 dims, "
              "got shape ", scores.sizes());
  const int64_t modules = scores.size(0), rows = scores.size(1);
  TORCH_CHECK(bracket.scalar_type() == at::kDouble && bracket.device().is_cpu() &&
                  bracket.is_contiguous() && bracket.dim() == 2 && bracket.size(0) == modules &&
                  bracket.size(1) == 2,
              "modsplit: bracket must be a contiguous float64 CPU tensor of shape [", modules,
              ", 2], got ", bracket.scalar_type(), " ", bracket.sizes());
  const int64_t n = scores.numel() / modules, cols = n / rows;
  auto stem = at::zeros({modules}, scores.options().dtype(at::kDouble));
  std::vector<int64_t> packed_shape{modules, rows, words_for(cols)};
  auto packed = at::empty(packed_shape, scores.options().dtype(at::kInt));
  const auto g = grad.contiguous();
  const auto a = anchor ? anchor->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "cotrain_sgd_topk_step_cpu", [&] {
    with_flags(anchor.has_value(), init_buffer, nesterov, sign_grad, weight_decay != 0.0,
               [&](auto k_anchor, auto k_init, auto k_nesterov, auto k_sign, auto k_decay) {
      fused_step<scalar_t, k_anchor.value, k_init.value, k_nesterov.value, k_sign.value,
                 k_decay.value>(
          scores.data_ptr<scalar_t>(), momentum_buffer.data_ptr<scalar_t>(),
          g.const_data_ptr<scalar_t>(), anchor ? a.const_data_ptr<scalar_t>() : nullptr,
          anchor && a.size(0) == 1 ? 0 : n, stem.data_ptr<double>(), packed.data_ptr<int32_t>(),
          bracket.data_ptr<double>(), modules, rows, cols, keep_count(density, n), lr, momentum,
          weight_decay, stem_coef);
    });
  });
  return {stem, packed};
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("cotrain_sgd_topk_step_", &modsplit::cotrain_sgd_topk_step_cpu);
}
