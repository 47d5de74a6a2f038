// The exact top-k select behind topk_mask / multi_topk_mask on the CPU, shared by
// topk_mask_cpu.cpp and the fused co-training step (cotrain_sgd_topk_cpu.cpp): integer keys of
// |x|, a sampled bracket, the counting / gathering scan of 32-score words, the selection among the
// gathered keys and the write pass (topk_pack). See topk_mask_cpu.cpp for the method.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../checks.h"

namespace modsplit {
namespace topk_select {

// KeyOf<T>::get(x): non-negative integer key of |x|, ordered like |x|;
// kInf = key of +inf (keys above it are NaN).
template <typename T>
struct KeyOf;

template <>
struct KeyOf<float> {
  using Key = int32_t;
  static constexpr Key kInf = 0x7f800000;
  static Key get(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return static_cast<Key>(u & 0x7fffffffu);
  }
};

template <>
struct KeyOf<double> {
  using Key = int64_t;
  static constexpr Key kInf = 0x7ff0000000000000LL;
  static Key get(double x) {
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
    return static_cast<Key>(u & 0x7fffffffffffffffULL);
  }
};

template <>
struct KeyOf<c10::Half> {
  using Key = int32_t;
  static constexpr Key kInf = 0x7c00;
  static Key get(c10::Half x) { return static_cast<Key>(x.x & 0x7fffu); }
};

template <>
struct KeyOf<c10::BFloat16> {
  using Key = int32_t;
  static constexpr Key kInf = 0x7f80;
  static Key get(c10::BFloat16 x) { return static_cast<Key>(x.x & 0x7fffu); }
};

constexpr int64_t kSample = 1024;      // keys sampled per module to bracket the threshold
constexpr double kBracketSigmas = 4.0;  // bracket half-width, in sampling standard deviations
constexpr int64_t kMinChunkElems = int64_t{1} << 15;  // below this a task's overhead dominates

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chunks per module: enough tasks to balance the threads, each big enough to pay for itself,
// none empty.
inline int64_t chunks_per_module(int64_t modules, int64_t n, int64_t words) {
  int64_t c = ceil_div(4 * at::get_num_threads(), modules);
  c = std::min(c, std::max<int64_t>(1, n / kMinChunkElems));
  return std::clamp<int64_t>(c, 1, words);
}

// The keep-th largest key of one module lies in [lo, hi] (inclusive) while
// above = #{key > hi} < keep <= above + #{lo <= key <= hi}.
template <typename Key>
struct Bracket {
  Key lo = 0, hi = 0;
  bool holds = false;
  int64_t rank = 0;  // once it holds: the threshold's rank among the gathered keys (1-based)
  Key thr = 0;       // the threshold key: keys > thr are kept, plus quota ties per chunk
};

// The rank-th largest (0-based) of the keys in v (reordered and shrunk on the way): histograms
// of 2048 bins over the keys' remaining range narrow v down to one bin at a time, O(size of v).
template <typename Key>
Key kth_largest(std::vector<Key>& v, int64_t rank) {
  using U = std::make_unsigned_t<Key>;
  constexpr int64_t kBins = 2048;
  std::vector<uint32_t> h(kBins);
  while (v.size() > 1024) {  // below this nth_element is as fast as a histogram round
    const auto [mn_it, mx_it] = std::minmax_element(v.begin(), v.end());
    const Key mn = *mn_it, mx = *mx_it;
    if (mn == mx) return mn;
    const U range = static_cast<U>(mx) - static_cast<U>(mn);
    int shift = 0;
    while ((range >> shift) >= static_cast<U>(kBins)) ++shift;
    std::fill(h.begin(), h.end(), 0u);
    for (const Key k : v) ++h[(static_cast<U>(k) - static_cast<U>(mn)) >> shift];
    auto bin = static_cast<int64_t>(range >> shift);
    int64_t above = 0;
    while (above + h[bin] <= rank) above += h[bin--];
    size_t kept = 0;
    for (const Key k : v) {
      if (static_cast<int64_t>((static_cast<U>(k) - static_cast<U>(mn)) >> shift) == bin) {
        v[kept++] = k;
      }
    }
    v.resize(kept);
    rank -= above;
  }
  std::nth_element(v.begin(), v.begin() + rank, v.end(), std::greater<Key>());
  return v[rank];
}

// Initial bracket of one module from a strided sample of its keys: the sample ranks of the
// threshold +- kBracketSigmas binomial standard deviations. p: the module's keys.
template <typename T>
Bracket<typename KeyOf<T>::Key> sample_bracket(const T* p, int64_t n, int64_t keep) {
  using K = KeyOf<T>;
  using Key = typename K::Key;
  const int64_t ms = std::min(n, kSample), stride = n / ms;
  std::vector<Key> smp(static_cast<size_t>(ms)), work;
  for (int64_t i = 0; i < ms; ++i) smp[i] = K::get(p[i * stride]);
  Bracket<Key> b;
  if (ms == n) {  // the sample is every key: the bracket is the threshold itself
    b.lo = b.hi = kth_largest(smp, keep - 1);
    return b;
  }
  const double q = static_cast<double>(keep) / static_cast<double>(n);
  const double half = kBracketSigmas * std::sqrt(q * (1.0 - q) * ms) + 1.0;
  const auto rank_hi = static_cast<int64_t>(std::floor(q * ms - half));  // 0-based, from the top
  const auto rank_lo = static_cast<int64_t>(std::ceil(q * ms + half));
  b.hi = std::numeric_limits<Key>::max();
  if (rank_hi >= 0) {
    work = smp;
    b.hi = kth_largest(work, rank_hi);
  }
  if (rank_lo < ms) {
    work = smp;
    b.lo = kth_largest(work, rank_lo);
  }
  b.lo = std::min(b.lo, b.hi);
  return b;
}

// One word of up to 32 scores q: up = bits of the keys > hi, inv = bits of NaN keys; the keys in
// [lo, hi] are written to dst[0..) in order (dst has room for 32); returns their count.
template <typename T>
int64_t scan_partial_word(const T* q, int64_t len, typename KeyOf<T>::Key lo,
                          typename KeyOf<T>::Key hi, uint32_t& up, uint32_t& inv,
                          typename KeyOf<T>::Key* dst) {
  using K = KeyOf<T>;
  int64_t got = 0;
  up = inv = 0;
  for (int64_t j = 0; j < len; ++j) {
    const auto k = K::get(q[j]);
    up |= static_cast<uint32_t>(k > hi) << j;
    inv |= static_cast<uint32_t>(k > K::kInf) << j;
    dst[got] = k;  // branch-free: kept only where the count moves on
    got += (k >= lo) & (k <= hi);
  }
  return got;
}

template <typename T>
int64_t scan_word(const T* q, typename KeyOf<T>::Key lo, typename KeyOf<T>::Key hi,
                  uint32_t& up, uint32_t& inv, typename KeyOf<T>::Key* dst) {
  return scan_partial_word<T>(q, 32, lo, hi, up, inv, dst);
}

#if defined(__AVX2__)
// left_pack()[m]: the lane indices of the set bits of m, first (for _mm256_permutevar8x32).
inline const __m256i* left_pack() {
  alignas(32) static const auto table = [] {
    struct { int32_t v[256][8]; } t{};
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l) {
        if ((m >> l) & 1) t.v[m][n++] = l;
      }
    }
    return t;
  }();
  return reinterpret_cast<const __m256i*>(table.v);
}

// float32: 8 keys per compare, bit masks by movemask, the bracket's keys left-packed; the
// first `groups` groups of 8 scores of q (dst: room for 8 * groups keys).
inline int64_t scan_groups(const float* q, int groups, int32_t lo, int32_t hi, uint32_t& up,
                           uint32_t& inv, int32_t* dst) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), vhi = _mm256_set1_epi32(hi);
  const __m256i vlo = _mm256_set1_epi32(lo - 1), vinf = _mm256_set1_epi32(KeyOf<float>::kInf);
  const __m256i* pack = left_pack();
  int64_t got = 0;
  up = inv = 0;
  for (int g = 0; g < groups; ++g) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 8 * g)), abs);
    const __m256i above = _mm256_cmpgt_epi32(k, vhi);
    const __m256i in = _mm256_andnot_si256(above, _mm256_cmpgt_epi32(k, vlo));  // lo <= k <= hi
    up |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(above))) << (8 * g);
    inv |= static_cast<uint32_t>(_mm256_movemask_ps(
               _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, vinf)))) << (8 * g);
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(in));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + got),
                        _mm256_permutevar8x32_epi32(k, pack[m]));
    got += __builtin_popcount(static_cast<unsigned>(m));
  }
  return got;
}

template <>
inline int64_t scan_word<float>(const float* q, int32_t lo, int32_t hi, uint32_t& up, uint32_t& inv,
                         int32_t* dst) {
  return scan_groups(q, 4, lo, hi, up, inv, dst);
}

// A row's last, partial word (len < 32 scores, e.g. 16 of a 784-wide row): its whole groups of
// 8 as above, the rest one by one, in order (dst: room for 32 keys).
template <>
inline int64_t scan_partial_word<float>(const float* q, int64_t len, int32_t lo, int32_t hi,
                                        uint32_t& up, uint32_t& inv, int32_t* dst) {
  using K = KeyOf<float>;
  const int groups = static_cast<int>(len / 8);
  int64_t got = scan_groups(q, groups, lo, hi, up, inv, dst);
  for (int64_t j = 8 * groups; j < len; ++j) {
    const auto k = K::get(q[j]);
    up |= static_cast<uint32_t>(k > hi) << j;
    inv |= static_cast<uint32_t>(k > K::kInf) << j;
    dst[got] = k;
    got += (k >= lo) & (k <= hi);
  }
  return got;
}

// Bits of the 32 float32 scores q whose key is > thr.
inline uint32_t above_bits(const float* q, int32_t thr) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), vt = _mm256_set1_epi32(thr);
  uint32_t bits = 0;
  for (int g = 0; g < 4; ++g) {
    const __m256i k = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 8 * g)), abs);
    bits |= static_cast<uint32_t>(_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, vt)))) << (8 * g);
  }
  return bits;
}
#endif

template <typename T>
uint32_t above_bits(const T* q, typename KeyOf<T>::Key thr) {
  uint32_t bits = 0;
  for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(KeyOf<T>::get(q[j]) > thr) << j;
  return bits;
}

// The mask word of up to 32 scores q (len of them): the keys > thr, plus the first `left` keys
// equal to thr in order (left is decreased by the ties taken).
template <typename T>
uint32_t mask_word(const T* q, int64_t len, typename KeyOf<T>::Key thr, int64_t& left) {
  using Key = typename KeyOf<T>::Key;
  uint32_t bits = 0;
  if (len == 32) {
    bits = above_bits(q, thr);
    if (left > 0) {
      for (uint32_t eq = above_bits(q, static_cast<Key>(thr - 1)) & ~bits; eq && left > 0;
           eq &= eq - 1, --left) {
        bits |= eq & (0u - eq);
      }
    }
    return bits;
  }
  for (int64_t j = 0; j < len; ++j) {
    const Key k = KeyOf<T>::get(q[j]);
    bool kept = k > thr;
    if (k == thr && left > 0) {
      kept = true;
      --left;
    }
    bits |= static_cast<uint32_t>(kept) << j;
  }
  return bits;
}

// src: contiguous [modules, rows, cols] scores; dst: [modules, rows, words_for(cols)] int32.
// Keeps `keep` (1 <= keep <= rows*cols) entries of largest |score| per module. thr_out: when
// given, [modules] keys of each module's threshold (the keep-th largest key; 0 when keep == n).
// One pass per module counts the keys above a sampled bracket and gathers those inside it (a
// few percent of them, 32 at a time through bit masks); the threshold is selected among the
// gathered keys; one pass writes the words. A bracket the sample got wrong (probability about
// 1e-4 per module) is widened to the side the threshold lies on, and that module's pass rerun.
template <typename T>
void topk_pack(const T* src, int32_t* dst, int64_t modules, int64_t rows, int64_t cols,
               int64_t keep, typename KeyOf<T>::Key* thr_out = nullptr) {
  using K = KeyOf<T>;
  using Key = typename K::Key;
  const int64_t words = words_for(cols);
  const int64_t uw = rows * words;  // output words per module
  const int64_t n = rows * cols;    // elements per module
  const int64_t chunks = chunks_per_module(modules, n, uw);
  const int64_t tasks = modules * chunks;
  auto word_begin = [&](int64_t c) { return c * uw / chunks; };
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(
                                                                             1, n / chunks));
  // f(q, len, u) for every output word u in [u0, u1) of module m; q: its first score.
  auto for_words = [&](int64_t m, int64_t u0, int64_t u1, auto&& f) {
    const T* p = src + m * n;
    int64_t row = u0 / words, w = u0 % words;
    for (int64_t u = u0; u < u1; ++u) {
      f(p + row * cols + w * 32, std::min<int64_t>(32, cols - w * 32), u);
      if (++w == words) {
        w = 0;
        ++row;
      }
    }
  };

  std::vector<Bracket<Key>> br(static_cast<size_t>(modules));
  at::parallel_for(0, modules, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) br[m] = sample_bracket(src + m * n, n, keep);
  });
  if (keep == n) {  // every key kept
    for (auto& b : br) b = Bracket<Key>{0, std::numeric_limits<Key>::max(), true, 0, Key{0}};
  }

  std::vector<int64_t> above(static_cast<size_t>(tasks)), quota(static_cast<size_t>(tasks), 0);
  std::vector<std::vector<Key>> cand(static_cast<size_t>(tasks));
  std::vector<uint8_t> nan(static_cast<size_t>(tasks), 0);
  for (bool first = true;; first = false) {
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / chunks, c = t % chunks;
        if (br[m].holds && !first) continue;
        const Key lo = br[m].lo, hi = br[m].hi;
        const bool gather = !br[m].holds;  // keep == n needs the NaN check only
        int64_t cnt = 0, kept = 0;
        bool bad = false;
        auto& out = cand[t];
        out.resize(64);
        for_words(m, word_begin(c), word_begin(c + 1), [&](const T* q, int64_t len, int64_t) {
          if (static_cast<int64_t>(out.size()) < kept + 32) out.resize(2 * out.size());
          uint32_t up, inv;
          Key* dst = out.data() + kept;
          const int64_t got = len == 32 ? scan_word<T>(q, lo, hi, up, inv, dst)
                                        : scan_partial_word<T>(q, len, lo, hi, up, inv, dst);
          cnt += __builtin_popcount(up);
          bad |= inv != 0;
          kept += gather ? got : 0;
        });
        out.resize(kept);
        above[t] = cnt;
        nan[t] = bad;
      }
    });
    if (first) {
      TORCH_CHECK(std::find(nan.begin(), nan.end(), 1) == nan.end(),
                  "modsplit: scores contain NaN; top-k of |scores| is undefined");
    }
    bool again = false;
    for (int64_t m = 0; m < modules; ++m) {
      auto& b = br[m];
      if (b.holds) continue;
      int64_t up = 0, in = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        up += above[m * chunks + c];
        in += static_cast<int64_t>(cand[m * chunks + c].size());
      }
      if (up >= keep) {  // the threshold is above the bracket
        b.lo = b.hi;
        b.hi = std::numeric_limits<Key>::max();
        again = true;
      } else if (up + in < keep) {  // below it
        b.hi = b.lo;
        b.lo = 0;
        again = true;
      } else {
        b.holds = true;
        b.rank = keep - up;
      }
    }
    if (!again) break;
  }
  if (keep == n) {  // every entry kept: full words, padding bits 0
    if (thr_out) std::fill(thr_out, thr_out + modules, Key{0});
    at::parallel_for(0, modules * uw, at::internal::GRAIN_SIZE, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t len = std::min<int64_t>(32, cols - (u % words) * 32);
        dst[u] = static_cast<int32_t>(len == 32 ? 0xffffffffu : (1u << len) - 1u);
      }
    });
    return;
  }

  // Selection among each module's gathered keys: the rank-th largest is the threshold; keys
  // above it are kept, and the ties it leaves go to the chunks in flat order.
  at::parallel_for(0, modules, 1, [&](int64_t m0, int64_t m1) {
    std::vector<Key> all;
    for (int64_t m = m0; m < m1; ++m) {
      auto& b = br[m];
      const int64_t rank = b.rank;
      all.clear();
      for (int64_t c = 0; c < chunks; ++c) {
        const auto& v = cand[m * chunks + c];
        all.insert(all.end(), v.begin(), v.end());
      }
      b.thr = kth_largest(all, rank - 1);
      if (thr_out) thr_out[m] = b.thr;
      int64_t greater = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const auto& v = cand[m * chunks + c];
        greater += std::count_if(v.begin(), v.end(), [&](Key k) { return k > b.thr; });
      }
      const int64_t ties_kept = rank - greater;
      int64_t before = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const auto& v = cand[m * chunks + c];
        const int64_t ties = std::count(v.begin(), v.end(), b.thr);
        quota[m * chunks + c] = std::clamp<int64_t>(ties_kept - before, 0, ties);
        before += ties;
      }
    }
  });

  // Write pass: one 32-bit word at a time.
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / chunks, c = t % chunks;
      const Key thr = br[m].thr;
      int64_t left = quota[t];  // ties this chunk still keeps
      int32_t* out = dst + m * uw;
      for_words(m, word_begin(c), word_begin(c + 1), [&](const T* q, int64_t len, int64_t u) {
        out[u] = static_cast<int32_t>(mask_word(q, len, thr, left));
      });
    }
  });
}

}  // namespace topk_select
}  // namespace modsplit
