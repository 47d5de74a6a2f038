// Small banks of multi_masked_linear on the CPU (K*O*I at most kSmallElems weights over all
// modules, e.g. a 10-module 49 -> 10 head): W*M of every module, unpacked at once into
// wm [K, O, I] (masked_linear_cpu.cpp's unpack_all), and the products run as direct loops on
// one thread. At these sizes ATen's bmm spends more time
// dispatching its per-matrix products than computing them (about 30 us per call for a
// [10, 32, 49] x [10, 49, 10] product).
//
// Every product is a sum of scaled rows, dst[0..L) = sum_j c_j * row_j[0..L): float32 keeps
// dst in up to kMaxVecs 8-lane registers over the whole sum (rows up to 64 + 7 values; the
// last L % 8 values in scalars), longer rows and float64 add row by row.
//
// x [S, N, I] (S = 1: the input all modules share, or K), g [K, N, O] (grad_out), W [O, I].
#pragma once
#include <cstdint>
#include <cstring>

#include "masked_linear_kernels.h"

namespace modsplit {
namespace cpu {

// dst[0..L) = scale[0..L) * sum_{j < J} coef(j) * row(j)[0..L) (scale may be null).
template <typename T, typename Coef, typename Row>
void combine_rows_plain(T* __restrict__ dst, int64_t L, int64_t J, Coef coef, Row row,
                        const T* scale) {
  std::memset(dst, 0, sizeof(T) * L);
  for (int64_t j = 0; j < J; ++j) {
    const T c = coef(j);
    const T* __restrict__ r = row(j);
    for (int64_t i = 0; i < L; ++i) dst[i] += c * r[i];
  }
  if (scale) {
    for (int64_t i = 0; i < L; ++i) dst[i] *= scale[i];
  }
}

template <int V, typename Coef, typename Row>
void combine_rows_regs(float* dst, int64_t L, int64_t J, Coef coef, Row row, const float* scale) {
  v8f even[V] = {}, odd[V] = {};  // two independent chains per vector: FMA latency is hidden
  int64_t j = 0;
  for (; j + 2 <= J; j += 2) {
    const v8f c0 = coef(j) - v8f{}, c1 = coef(j + 1) - v8f{};
    const float* r0 = row(j);
    const float* r1 = row(j + 1);
    for (int v = 0; v < V; ++v) {
      even[v] += c0 * *reinterpret_cast<const v8f_u*>(r0 + 8 * v);
      odd[v] += c1 * *reinterpret_cast<const v8f_u*>(r1 + 8 * v);
    }
  }
  if (j < J) {
    const v8f c0 = coef(j) - v8f{};
    const float* r0 = row(j);
    for (int v = 0; v < V; ++v) even[v] += c0 * *reinterpret_cast<const v8f_u*>(r0 + 8 * v);
  }
  for (int v = 0; v < V; ++v) {
    v8f out = even[v] + odd[v];
    if (scale) out *= *reinterpret_cast<const v8f_u*>(scale + 8 * v);
    *reinterpret_cast<v8f_u*>(dst + 8 * v) = out;
  }
  for (int64_t i = 8 * V; i < L; ++i) {  // the last L % 8 values, two chains each
    float a = 0.0f, b = 0.0f;
    int64_t t = 0;
    for (; t + 2 <= J; t += 2) {
      a += coef(t) * row(t)[i];
      b += coef(t + 1) * row(t + 1)[i];
    }
    if (t < J) a += coef(t) * row(t)[i];
    dst[i] = scale ? (a + b) * scale[i] : a + b;
  }
}

template <typename T, typename Coef, typename Row>
void combine_rows(T* dst, int64_t L, int64_t J, Coef coef, Row row, const T* scale) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t vecs = L / 8;
    if (vecs >= 1 && vecs <= kMaxVecs) {
      dispatch_vecs(static_cast<int>(vecs), [&](auto v) {
        combine_rows_regs<decltype(v)::value>(dst, L, J, coef, row, scale);
      });
      return;
    }
  }
  combine_rows_plain(dst, L, J, coef, row, scale);
}

// out [K, N, O]: out[k, :, o] = sum_i wm[k, o, i] * xt[s, i, :] + bias[o], over xt [S, I, N] (x
// transposed: the sum runs along the batch, N values per row).
template <typename T>
void small_forward(const T* xt, int64_t S, const T* wm, const T* bias, int64_t K, int64_t N,
                   int64_t O, int64_t I, T* out, T* col) {
  for (int64_t k = 0; k < K; ++k) {
    const T* xs = xt + (S == 1 ? 0 : k * I * N);
    for (int64_t o = 0; o < O; ++o) {
      const T* wr = wm + (k * O + o) * I;
      combine_rows(col, N, I, [&](int64_t i) { return wr[i]; },
                   [&](int64_t i) { return xs + i * N; }, static_cast<const T*>(nullptr));
      const T b = bias ? bias[o] : T(0);
      for (int64_t n = 0; n < N; ++n) out[(k * N + n) * O + o] = col[n] + b;
    }
  }
}

// gx [S, N, I]: row (s, n) = sum over the modules k it feeds and o of g[k, n, o] * wm[k, o, :]
// (coef: room for K*O coefficients, gathered per row).
template <typename T>
void small_grad_x(const T* g, const T* wm, int64_t S, int64_t K, int64_t N, int64_t O, int64_t I,
                  T* gx, T* coef) {
  const int64_t per = S == 1 ? K : 1;  // modules summed into one row
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k0 = S == 1 ? 0 : s;
    const T* rows = wm + k0 * O * I;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < per; ++k) {
        std::memcpy(coef + k * O, g + ((k0 + k) * N + n) * O, sizeof(T) * O);
      }
      combine_rows(gx + (s * N + n) * I, I, per * O, [&](int64_t j) { return coef[j]; },
                   [&](int64_t j) { return rows + j * I; }, static_cast<const T*>(nullptr));
    }
  }
}

// gs [K, O, I]: row (k, o) = W[o, :] * sum_n g[k, n, o] * x[s, n, :], the score gradient before
// the straight-through sgn(S).
template <typename T>
void small_grad_scores(const T* g, const T* x, int64_t S, const T* w, int64_t K, int64_t N,
                       int64_t O, int64_t I, T* gs) {
  for (int64_t k = 0; k < K; ++k) {
    const T* xs = x + (S == 1 ? 0 : k * N * I);
    for (int64_t o = 0; o < O; ++o) {
      combine_rows(gs + (k * O + o) * I, I, N, [&](int64_t n) { return g[(k * N + n) * O + o]; },
                   [&](int64_t n) { return xs + n * I; }, w + o * I);
    }
  }
}

}  // namespace cpu
}  // namespace modsplit
