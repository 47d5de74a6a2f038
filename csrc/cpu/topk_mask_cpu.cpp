// topk_mask / multi_topk_mask on the CPU: exact top-k of |scores| per layer (per module) by an
// O(n) radix select on integer keys, written straight into packed int32 words.
//
// Keys: the bit pattern of |x| (sign bit cleared) orders non-negative floats like their values,
// so selection runs on integers: float32 -> 31-bit key, float64 -> 63-bit key, float16 /
// bfloat16 -> 15-bit key (their own bit pattern, no conversion). +0 and -0 get the same key 0.
// NaN keys are larger than the +inf key; any NaN in scores is an error.
//
// Work is split into tasks = (module m, chunk c); a chunk is a contiguous range of output words
// of one module, hence a contiguous range of its flat elements. Every histogram pass and the
// final write pass run over all tasks in one at::parallel_for, so a single big layer and a bank
// of many modules both keep every thread busy. Histograms are per task, which also gives each
// chunk its count of elements equal to the threshold: chunks then resolve ties (lower flat index
// first) independently, in one write pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"

namespace modsplit {
namespace {

// KeyOf<T>::get(x): non-negative integer key of |x|, ordered like |x|; kBits significant bits;
// kInf = key of +inf (keys above it are NaN).
template <typename T>
struct KeyOf;

template <>
struct KeyOf<float> {
  using Key = int32_t;
  static constexpr int kBits = 31;
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
  static constexpr int kBits = 63;
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
  static constexpr int kBits = 15;
  static constexpr Key kInf = 0x7c00;
  static Key get(c10::Half x) { return static_cast<Key>(x.x & 0x7fffu); }
};

template <>
struct KeyOf<c10::BFloat16> {
  using Key = int32_t;
  static constexpr int kBits = 15;
  static constexpr Key kInf = 0x7f80;
  static Key get(c10::BFloat16 x) { return static_cast<Key>(x.x & 0x7fffu); }
};

constexpr int kDigitBits = 11;  // histogram of 2048 uint32 bins (8 KiB): stays in L1
constexpr int64_t kBins = int64_t{1} << kDigitBits;
constexpr int64_t kMinChunkElems = int64_t{1} << 15;  // below this a chunk's histogram dominates
constexpr int64_t kMaxChunkElems = int64_t{1} << 28;  // bins are uint32

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Chunks per module: enough tasks to balance the threads, each big enough to pay for its
// histogram, none too big for uint32 bins, none empty.
int64_t chunks_per_module(int64_t modules, int64_t n, int64_t words) {
  int64_t c = ceil_div(4 * at::get_num_threads(), modules);
  c = std::min(c, std::max<int64_t>(1, n / kMinChunkElems));
  c = std::max(c, ceil_div(n, kMaxChunkElems));
  return std::clamp<int64_t>(c, 1, words);
}

// Selection state of one module: the keys kept are those > thr, plus, per chunk, the first
// quota[task] keys == thr in flat order.
template <typename Key>
struct Selection {
  Key prefix = 0;     // digits of the threshold fixed so far
  int64_t rem = 0;    // keys still to keep among those matching prefix
  bool settled = false;
  Key thr = 0;
};

// src: contiguous [modules, rows, cols] scores; dst: [modules, rows, words_for(cols)] int32.
// Keeps `keep` (1 <= keep <= rows*cols) entries of largest |score| per module.
template <typename T>
void topk_pack(const T* src, int32_t* dst, int64_t modules, int64_t rows, int64_t cols,
               int64_t keep) {
  using K = KeyOf<T>;
  using Key = typename K::Key;
  const int64_t words = words_for(cols);
  const int64_t uw = rows * words;  // output words per module
  const int64_t n = rows * cols;    // elements per module
  const int64_t chunks = chunks_per_module(modules, n, uw);
  const int64_t tasks = modules * chunks;
  // Element offset (within a module) where output word u starts; u == uw gives n.
  auto elem_at = [&](int64_t u) { return u == uw ? n : (u / words) * cols + (u % words) * 32; };
  auto word_begin = [&](int64_t c) { return c * uw / chunks; };
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(
                                                                             1, n / chunks));

  std::vector<uint32_t> hist(static_cast<size_t>(tasks * kBins));
  std::vector<Key> max_key(static_cast<size_t>(tasks), 0);
  std::vector<Selection<Key>> sel(static_cast<size_t>(modules));
  for (auto& s : sel) s.rem = keep;
  std::vector<int64_t> quota(static_cast<size_t>(tasks), 0);

  // Histogram passes, most significant digit first. `hi` = number of low key bits not yet fixed.
  for (int hi = K::kBits; hi > 0;) {
    const int width = std::min(hi, kDigitBits);
    const int shift = hi - width;
    const bool first = hi == K::kBits;
    const Key digit_mask = static_cast<Key>((Key{1} << width) - 1);
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / chunks, c = t % chunks;
        if (sel[m].settled) continue;
        uint32_t* h = hist.data() + t * kBins;
        std::fill(h, h + (int64_t{1} << width), 0u);
        const T* p = src + m * n;
        const int64_t e0 = elem_at(word_begin(c)), e1 = elem_at(word_begin(c + 1));
        if (first) {  // top digit of every key; also the largest key, to detect NaN
          Key mx = 0;
          for (int64_t i = e0; i < e1; ++i) {
            const Key k = K::get(p[i]);
            mx = std::max(mx, k);
            ++h[k >> shift];
          }
          max_key[t] = mx;
        } else {  // next digit of the keys that match the fixed prefix
          const Key pre = sel[m].prefix;
          for (int64_t i = e0; i < e1; ++i) {
            const Key k = K::get(p[i]);
            if ((k >> hi) == pre) ++h[(k >> shift) & digit_mask];
          }
        }
      }
    });
    if (first) {
      TORCH_CHECK(*std::max_element(max_key.begin(), max_key.end()) <= K::kInf,
                  "modsplit: scores contain NaN; top-k of |scores| is undefined");
      if (keep == n) {  // every entry kept: full words, padding bits 0
        at::parallel_for(0, modules * uw, at::internal::GRAIN_SIZE, [&](int64_t u0, int64_t u1) {
          for (int64_t u = u0; u < u1; ++u) {
            const int64_t len = std::min<int64_t>(32, cols - (u % words) * 32);
            dst[u] = static_cast<int32_t>(len == 32 ? 0xffffffffu : (1u << len) - 1u);
          }
        });
        return;
      }
    }
    // Per module: find the digit holding the rem-th largest key among those matching prefix.
    std::vector<int64_t> total(static_cast<size_t>(kBins));
    for (int64_t m = 0; m < modules; ++m) {
      auto& s = sel[m];
      if (s.settled) continue;
      const int64_t bins = int64_t{1} << width;
      std::fill(total.begin(), total.begin() + bins, 0);
      for (int64_t c = 0; c < chunks; ++c) {
        const uint32_t* h = hist.data() + (m * chunks + c) * kBins;
        for (int64_t b = 0; b < bins; ++b) total[b] += h[b];
      }
      int64_t b = bins - 1, above = 0;
      while (above + total[b] < s.rem) above += total[b--];
      s.rem -= above;
      s.prefix = static_cast<Key>((s.prefix << width) | b);
      if (total[b] == s.rem) {  // the whole bucket is kept: keys >= its lowest key, no ties
        // prefix << shift > 0 here, or every key would be kept (keep == n, handled above).
        s.thr = static_cast<Key>((s.prefix << shift) - 1);
        s.settled = true;
      } else if (shift == 0) {  // full key found: keep rem of the keys equal to it, in order
        s.thr = s.prefix;
        s.settled = true;
        int64_t before = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t ties = hist[(m * chunks + c) * kBins + b];
          quota[m * chunks + c] = std::clamp<int64_t>(s.rem - before, 0, ties);
          before += ties;
        }
      }
    }
    hi = shift;
  }

  // Write pass: one 32-bit word at a time.
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / chunks, c = t % chunks;
      const Key thr = sel[m].thr;
      int64_t left = quota[t];  // ties this chunk still keeps
      const T* p = src + m * n;
      int32_t* out = dst + m * uw;
      const int64_t u0 = word_begin(c), u1 = word_begin(c + 1);
      int64_t row = u0 / words, w = u0 % words;
      for (int64_t u = u0; u < u1; ++u) {
        const T* q = p + row * cols + w * 32;
        const int64_t len = std::min<int64_t>(32, cols - w * 32);
        uint32_t bits = 0;
        if (left == 0 && len == 32) {
          for (int j = 0; j < 32; ++j) bits |= static_cast<uint32_t>(K::get(q[j]) > thr) << j;
        } else {
          for (int64_t j = 0; j < len; ++j) {
            const Key k = K::get(q[j]);
            bool kept = k > thr;
            if (k == thr && left > 0) {
              kept = true;
              --left;
            }
            bits |= static_cast<uint32_t>(kept) << j;
          }
        }
        out[u] = static_cast<int32_t>(bits);
        if (++w == words) {
          w = 0;
          ++row;
        }
      }
    }
  });
}

// scores [lead..., O, ...] with lead_dims (0 or 1) leading module dims -> int32 [lead..., O, W].
at::Tensor topk_rows(const at::Tensor& scores, double density, int64_t lead_dims) {
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "modsplit: scores must be float32, float64, float16 or bfloat16, got dtype ", dtype);
  check_density(density);
  TORCH_CHECK(scores.dim() >= lead_dims + 2, "modsplit: scores must have at least ", lead_dims + 2,
              " dims, got shape ", scores.sizes());
  TORCH_CHECK(scores.numel() > 0, "modsplit: scores must not be empty, got shape ",
              scores.sizes());
  const int64_t modules = lead_dims ? scores.size(0) : 1;
  const int64_t rows = scores.size(lead_dims);
  const int64_t n = scores.numel() / modules;
  const int64_t cols = n / rows;
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().begin() + lead_dims + 1);
  out_shape.push_back(words_for(cols));
  auto out = at::empty(out_shape, scores.options().dtype(at::kInt));
  const auto s = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "topk_mask_cpu", [&] {
    topk_pack<scalar_t>(s.const_data_ptr<scalar_t>(), out.data_ptr<int32_t>(), modules, rows,
                        cols, keep_count(density, n));
  });
  return out;
}

}  // namespace

at::Tensor topk_mask_cpu(const at::Tensor& scores, double density) {
  return topk_rows(scores, density, 0);
}

at::Tensor multi_topk_mask_cpu(const at::Tensor& scores, double density) {
  return topk_rows(scores, density, 1);
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("topk_mask", &modsplit::topk_mask_cpu);
  m.impl("multi_topk_mask", &modsplit::multi_topk_mask_cpu);
}
