// Direct sparse convolution over kept weights held as CSR (float32 / float64 on the CPU): the
// kernels of sparse_conv2d (compact inference, sparse_cpu.cpp) and of the sparse path of
// multi_masked_conv2d (training at low density, masked_conv2d_sparse.cpp).
//
// CSR: row_ptr int64 [K, O+1] offsets into col_idx int32 [nnz] / values [nnz]; module k's output
// channel o is entries row_ptr[k, o] .. row_ptr[k, o+1]-1, a column is c*kh*kw + i*kw + j of an
// [O, C, kh, kw] weight. Input x [S, B, C, H, W] with S = 1 (shared by all modules) or S = K;
// output [K, B, O, Ho, Wo]. Every kept (c, i, j, v) adds v times the shifted input plane c to the
// output plane, over the zero-padded input split into the stride's phases (fill_phases), so that
// at any stride a kept tap reads one contiguous range (conv_planes: float32 in register blocks of
// up to 64 outputs that stay in registers over all kept weights of the row). Bias [K, O] and a
// ReLU are fused. Work ~ kept weights x B x Ho x Wo; dilation 1, one group.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "masked_linear_kernels.h"

namespace modsplit {
namespace sparse_conv {

// Sparse conv, float32: outputs per register block (kBlockVecs vectors of 8 floats).
constexpr int kBlockVecs = 8;
constexpr int64_t kBlock = 8 * kBlockVecs;
constexpr int64_t kParallelWork = int64_t(1) << 15;  // multiply-adds per task, at least

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(work_per_item, 1));
}

struct ConvShape {
  int64_t S, B, C, H, W, O, Ho, Wo, kh, kw, sh, sw, ph, pw;
};

// Phase-split, zero-padded input. Output (oh, ow) reads tap (i, j) at padded pixel
// (oh*sh + i, ow*sw + j): phase (i % sh, j % sw) of the padded plane, subsampled by the stride,
// at (oh + i / sh, ow + j / sw). Each input plane becomes ph_h x ph_w phase planes of Hq x Wq
// (only the phases some tap reads: min(stride, kernel) per dim), so that at every stride the
// outputs of a row (k, o) read each kept tap as one contiguous range at a fixed offset. At stride
// 1 this is the zero-padded plane itself.
struct PhaseLayout {
  int64_t ph_h, ph_w, Hq, Wq, plane, chan;  // chan: elements per input channel
};

inline PhaseLayout phase_layout(const ConvShape& s) {
  PhaseLayout L;
  L.ph_h = std::min(s.sh, s.kh);
  L.ph_w = std::min(s.sw, s.kw);
  L.Hq = (s.H + 2 * s.ph + s.sh - 1) / s.sh;
  L.Wq = (s.W + 2 * s.pw + s.sw - 1) / s.sw;
  L.plane = L.Hq * L.Wq;
  L.chan = L.ph_h * L.ph_w * L.plane;
  return L;
}

// xq [S*B*C, ph_h, ph_w, Hq, Wq] <- x [S, B, C, H, W] (contiguous): every element written once
// (zeros outside the input), no separate fill.
template <typename T>
void fill_phases(const T* x, T* xq, const ConvShape& s, const PhaseLayout& L) {
  const int64_t in_plane = s.H * s.W;
  at::parallel_for(0, s.S * s.B * s.C, grain_for(L.chan), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* src = x + n * in_plane;
      for (int64_t pi = 0; pi < L.ph_h; ++pi) {
        for (int64_t pj = 0; pj < L.ph_w; ++pj) {
          T* dst = xq + n * L.chan + (pi * L.ph_w + pj) * L.plane;
          for (int64_t r = 0; r < L.Hq; ++r) {
            T* __restrict__ row = dst + r * L.Wq;
            const int64_t h = r * s.sh + pi - s.ph;
            if (h < 0 || h >= s.H) {
              std::fill(row, row + L.Wq, T(0));
              continue;
            }
            const T* __restrict__ in = src + h * s.W;
            if (s.sw == 1) {  // [pw zeros][W values][zeros]
              const int64_t lead = std::min(s.pw, L.Wq), n_in = std::min(s.W, L.Wq - lead);
              std::fill(row, row + lead, T(0));
              std::copy(in, in + n_in, row + lead);
              std::fill(row + lead + n_in, row + L.Wq, T(0));
            } else {
              for (int64_t c = 0; c < L.Wq; ++c) {
                const int64_t w = c * s.sw + pj - s.pw;
                row[c] = (w >= 0 && w < s.W) ? in[w] : T(0);
              }
            }
          }
        }
      }
    }
  });
}

// Output plane (k, b, o) as one span of (Ho - 1) * Wq + Wo values over the phase-split input (row
// pitch Wq): every kept weight adds w times a contiguous range of one phase plane. float32 runs
// the span in register blocks of up to 64 outputs that stay in registers over all kept weights of
// the row (one load per multiply-add); its last block may read up to 7 floats past a plane, which
// the input's allocation provides (kSlack). Float64 runs one axpy per kept weight. Outputs beyond
// Wo in a row are dropped when written out.
constexpr int64_t kSlack = 8;

template <int V>
inline void conv_block(const float* xb, const int64_t* offs, const float* v, int64_t n, float b0,
                       float* acc) {
  cpu::v8f r[V];
  for (int u = 0; u < V; ++u) r[u] = cpu::v8f{} + b0;
  for (int64_t p = 0; p < n; ++p) {
    const float w = v[p];
    const float* src = xb + offs[p];
    for (int u = 0; u < V; ++u) r[u] += w * *reinterpret_cast<const cpu::v8f_u*>(src + 8 * u);
  }
  for (int u = 0; u < V; ++u) *reinterpret_cast<cpu::v8f_u*>(acc + 8 * u) = r[u];
}

template <typename T>
void conv_planes(const T* xq, const int64_t* rp, const int32_t* ci, const T* v, const T* bias,
                 T* y, int64_t K, const ConvShape& s, const PhaseLayout& L, bool relu) {
  const int64_t taps = s.kh * s.kw, span = (s.Ho - 1) * L.Wq + s.Wo, plane = s.Ho * s.Wo;
  const int64_t nnz = rp[K * (s.O + 1) - 1];
  const int64_t avg_nnz = std::max<int64_t>(1, nnz / std::max<int64_t>(K * s.O, 1));
  // Offset of every kept (c, i, j) into a phase-split input image, once per call: a table over
  // the C * kh * kw columns (no integer division per kept weight), then one lookup each.
  std::vector<int64_t> col_off(static_cast<size_t>(s.C * taps));
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      const int64_t tap = ((i % s.sh) * L.ph_w + j % s.sw) * L.plane + (i / s.sh) * L.Wq +
                          j / s.sw;
      for (int64_t c = 0; c < s.C; ++c) col_off[c * taps + i * s.kw + j] = c * L.chan + tap;
    }
  }
  std::vector<int64_t> offs(static_cast<size_t>(nnz));
  for (int64_t p = 0; p < nnz; ++p) offs[p] = col_off[ci[p]];
  at::parallel_for(0, K * s.B * s.O, grain_for(span * avg_nnz), [&](int64_t begin, int64_t end) {
    std::vector<T> buf(static_cast<size_t>((span + kSlack - 1) / kSlack * kSlack));
    T* __restrict__ acc = buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item % s.O, b = (item / s.O) % s.B, k = item / (s.O * s.B);
      const T* xb = xq + ((s.S == 1 ? 0 : k) * s.B + b) * s.C * L.chan;
      const T b0 = bias ? bias[k * s.O + o] : T(0);
      const int64_t p0 = rp[k * (s.O + 1) + o], p1 = rp[k * (s.O + 1) + o + 1];
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t q0 = 0; q0 < span; q0 += kBlock) {
          const int vecs = static_cast<int>(std::min<int64_t>(kBlockVecs, (span - q0 + 7) / 8));
          cpu::dispatch_vecs(vecs, [&](auto vc) {
            conv_block<decltype(vc)::value>(xb + q0, offs.data() + p0, v + p0, p1 - p0, b0,
                                            acc + q0);
          });
        }
      } else {
        for (int64_t q = 0; q < span; ++q) acc[q] = b0;
        for (int64_t p = p0; p < p1; ++p) {
          const T w = v[p];
          const T* __restrict__ src = xb + offs[p];
          for (int64_t q = 0; q < span; ++q) acc[q] += w * src[q];
        }
      }
      T* yp = y + item * plane;
      for (int64_t oh = 0; oh < s.Ho; ++oh) {
        const T* row = acc + oh * L.Wq;
        T* out = yp + oh * s.Wo;
        if (relu) {
          for (int64_t ow = 0; ow < s.Wo; ++ow) out[ow] = row[ow] > T(0) ? row[ow] : T(0);
        } else {
          std::copy(row, row + s.Wo, out);
        }
      }
    }
  });
}

// out [K, B, O, Ho, Wo] of x [S, B, C, H, W] and the CSR (checked by the caller); s holds the
// geometry with O, Ho, Wo set; bias [K, O] or undefined.
inline at::Tensor run(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const at::Tensor& bias, int64_t K,
                      const ConvShape& s, bool relu) {
  auto rp = row_ptr.contiguous();
  auto ci = col_idx.contiguous();
  auto v = values.contiguous();
  auto bc = bias.defined() ? bias.contiguous() : at::Tensor();
  auto out = at::empty({K, s.B, s.O, s.Ho, s.Wo}, x.options());
  if (out.numel() == 0) return out;
  const PhaseLayout L = phase_layout(s);
  auto xc = x.contiguous();
  auto store = at::empty({s.S * s.B * s.C * L.chan + kSlack}, x.options());
  store.narrow(0, s.S * s.B * s.C * L.chan, kSlack).zero_();  // read only by dropped outputs
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    fill_phases<scalar_t>(xc.data_ptr<scalar_t>(), store.data_ptr<scalar_t>(), s, L);
    conv_planes<scalar_t>(store.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                          ci.data_ptr<int32_t>(), v.data_ptr<scalar_t>(),
                          bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
                          out.data_ptr<scalar_t>(), K, s, L, relu);
  });
  return out;
}

}  // namespace sparse_conv
}  // namespace modsplit
