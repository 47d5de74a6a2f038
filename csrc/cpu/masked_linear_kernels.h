// float32 inner kernels of masked_linear on the CPU that walk the set bits of a packed mask row.
//
// Two families. Lane-mask GEMV (small batches): stream a W row once, turn each mask byte into an
// 8-lane select mask through a 256-entry table, and FMA with up to 8 (module, batch row) pairs
// of x rows. Bit walk (larger batches): a packed row is uint32 [words]; bit b of word w keeps column 32*w + b. For every kept column j
// the kernels do one axpy between the scalar W[o, j] and a row of a batch-transposed operand
// (x^T or grad_x^T) of NP floats, NP a multiple of 8; batches are processed in blocks of V
// 8-float vectors (V = 1..8, so a block covers up to 64 batch rows). Work is proportional to the
// number of kept weights times the batch, W*M is never formed, and the only memory traffic on
// W is the bytes of the kept columns' cache lines.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

namespace modsplit {
namespace cpu {

// 8 floats in one 256-bit register (GCC/Clang vector extension; AVX2 with -mavx2 -mfma).
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));  // unaligned access
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
constexpr int kMaxVecs = 8;  // batch block of at most 8 vectors = 64 rows

// Calls fn(std::integral_constant<int, V>{}) for a runtime V in 1..kMaxVecs.
template <typename Fn>
inline void dispatch_vecs(int v, Fn&& fn) {
  switch (v) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

// byte_lanes()[b] has lane l all-ones iff bit l of b is set: mask byte -> 8-lane select mask.
inline const v8i* byte_lanes() {
  alignas(32) static const auto table = [] {
    struct { v8i v[256]; } t;
    for (int b = 0; b < 256; ++b) {
      for (int l = 0; l < 8; ++l) t.v[b][l] = ((b >> l) & 1) ? -1 : 0;
    }
    return t;
  }();
  return table.v;
}

// out[p] = sum_j w[j] * bit_j(mask[p]) * x[p][j] for P (module, batch row) pairs.
// w: float [I] (one weight row); mask[p]: the packed row as bytes (byte c = columns 8c..8c+7);
// x[p]: float [I]. The W row is loaded once for all P pairs.
template <int P>
inline void lane_mask_dots(const float* w, int64_t I, const uint8_t* const* mask,
                           const float* const* x, float* out) {
  const v8i* lanes = byte_lanes();
  v8f acc[P];
  for (int p = 0; p < P; ++p) acc[p] = v8f{};
  const int64_t chunks = I / kLanes;
  for (int64_t c = 0; c < chunks; ++c) {
    const v8i wv = reinterpret_cast<v8i>(*reinterpret_cast<const v8f_u*>(w + c * kLanes));
    for (int p = 0; p < P; ++p) {
      const v8f kept = reinterpret_cast<v8f>(wv & lanes[mask[p][c]]);
      acc[p] += kept * *reinterpret_cast<const v8f_u*>(x[p] + c * kLanes);
    }
  }
  for (int p = 0; p < P; ++p) {
    float sum = 0.f;
    for (int l = 0; l < kLanes; ++l) sum += acc[p][l];
    for (int64_t j = chunks * kLanes; j < I; ++j) {
      if ((mask[p][j >> 3] >> (j & 7)) & 1) sum += w[j] * x[p][j];
    }
    out[p] = sum;
  }
}

// Row of a packed mask with its last word clipped to the valid columns, so that padding bits
// set by a caller can never index past the row.
struct MaskRow {
  const uint32_t* words;  // [n_words]
  int64_t n_words;
  uint32_t last;          // valid-bit mask of words[n_words - 1]
  // null, or [n_words] column filter already clipped to the valid columns: only the columns
  // whose bit is set count (the forward skips the columns where its source is zero)
  const uint32_t* keep = nullptr;
  inline uint32_t word(int64_t w) const {
    if (keep) return words[w] & keep[w];
    return w + 1 == n_words ? words[w] & last : words[w];
  }
};

// acc[0..V) = sum over kept j of w[j] * xt[j * ld + 8v .. 8v + 8).
// w: float [I] (one weight row), xt: float [I, ld] (32-byte aligned rows), acc: V vectors.
// With V <= 4 two accumulator sets alternate, hiding the FMA latency of small batches.
template <int V>
inline void gather_axpy(const float* w, const MaskRow& mask, const float* xt, int64_t ld,
                        v8f* acc) {
  constexpr bool kTwo = V <= 4;
  v8f a[V], b[V];
  for (int v = 0; v < V; ++v) a[v] = b[v] = v8f{};
  for (int64_t wd = 0; wd < mask.n_words; ++wd) {
    uint32_t m = mask.word(wd);
    const int64_t base = wd * 32;
    while (m) {
      int64_t j = base + __builtin_ctz(m);
      m &= m - 1;
      const v8f* xr = reinterpret_cast<const v8f*>(xt + j * ld);
      float s = w[j];
      for (int v = 0; v < V; ++v) a[v] += s * xr[v];
      if (kTwo && m) {
        j = base + __builtin_ctz(m);
        m &= m - 1;
        xr = reinterpret_cast<const v8f*>(xt + j * ld);
        s = w[j];
        for (int v = 0; v < V; ++v) b[v] += s * xr[v];
      }
    }
  }
  for (int v = 0; v < V; ++v) acc[v] = kTwo ? a[v] + b[v] : a[v];
}

// For kept j among words [w0, w1) of the row: gt[j * ld + 8v ..] += w[j] * g[v], v < V.
// w: float [I] (one weight row), gt: float [I, ld] (32-byte aligned rows), g: V vectors.
template <int V>
inline void scatter_axpy(const float* w, const MaskRow& mask, int64_t w0, int64_t w1,
                         const v8f* g, float* gt, int64_t ld) {
  v8f gv[V];
  for (int v = 0; v < V; ++v) gv[v] = g[v];
  for (int64_t wd = w0; wd < w1; ++wd) {
    uint32_t m = mask.word(wd);
    const int64_t base = wd * 32;
    while (m) {
      const int64_t j = base + __builtin_ctz(m);
      m &= m - 1;
      v8f* dst = reinterpret_cast<v8f*>(gt + j * ld);
      const float s = w[j];
      for (int v = 0; v < V; ++v) dst[v] += s * gv[v];
    }
  }
}

}  // namespace cpu
}  // namespace modsplit
