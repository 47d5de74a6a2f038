// Direct sparse convolution over kept weights held as CSR (float32 / float64 on the CPU): the
// kernels of sparse_conv2d (compact inference, sparse_cpu.cpp) and of the sparse path of
// multi_masked_conv2d (training at low density, masked_conv2d_sparse.cpp).
//
// CSR: row_ptr int64 [K, O+1] offsets into col_idx int32 [nnz] / values [nnz]; module k's output
// channel o is entries row_ptr[k, o] .. row_ptr[k, o+1]-1, a column is c*kh*kw + i*kw + j of an
// [O, C, kh, kw] weight. Input x [S, B, C, H, W] with S = 1 (shared by all modules) or S = K;
// output [K, B, O, Ho, Wo]. Every kept (c, i, j, v) adds v times the shifted input plane c to the
// output plane, over the zero-padded input sample split into the stride's phases (fill_sample,
// one sample at a time into a thread-local buffer), so that at any stride a kept tap reads one
// contiguous range (conv_planes: float32 in register blocks of up to 64 outputs that stay in
// registers over all kept weights of the row). Bias [K, O] and a ReLU are fused.
// Work ~ kept weights x B x Ho x Wo; dilation 1, one group.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "finite.h"
#include "masked_linear_kernels.h"

namespace modsplit {
namespace sparse_conv {

// Sparse conv, float32: vectors of 8 outputs per register block.
constexpr int kBlockVecs = 8;
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

// xs [C, ph_h, ph_w, Hq, Wq] <- one input sample x [C, H, W] (contiguous): every element
// written once (zeros outside the input), no separate fill. Returns whether the sample's values
// are all finite (read while the sample passes through the cache anyway).
template <typename T>
bool fill_sample(const T* x, T* xs, const ConvShape& s, const PhaseLayout& L) {
  const int64_t in_plane = s.H * s.W;
  const bool finite = cpu::finite_values(x, s.C * in_plane);
  for (int64_t n = 0; n < s.C; ++n) {
    const T* src = x + n * in_plane;
    for (int64_t pi = 0; pi < L.ph_h; ++pi) {
      for (int64_t pj = 0; pj < L.ph_w; ++pj) {
        T* dst = xs + n * L.chan + (pi * L.ph_w + pj) * L.plane;
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
  return finite;
}

// Output plane (k, b, o) over the phase-split input (row pitch Wq): output (oh, ow) of a kept
// weight reads its phase plane at offs + oh * Wq + ow, so every kept weight adds w times a
// contiguous range per output row.
//  * float32: register blocks of up to kBlockVecs vectors of 8 outputs, made of whole output rows
//    (or 64-column pieces of wider rows): a block stays in registers over all kept weights of the
//    row (one load per multiply-add) and is stored straight into y (a row's last vector stores
//    only its Wo % 8 valid lanes). A row's last vector may read up to 7 floats past its input
//    range, at most past the sample's last plane, which the sample buffer provides (kSlack).
//  * float64: one axpy per kept weight over the span (Ho - 1) * Wq + Wo in a buffer, whose
//    outputs beyond Wo in a row are dropped when written out.
constexpr int64_t kSlack = 8;

// A float32 register block: vector u reads the input at in_off[u] (relative to a kept weight's
// offset) and writes lanes[u] outputs at out_off[u] of the output plane.
struct RowBlock {
  int vecs;
  int64_t in_off[kBlockVecs], out_off[kBlockVecs];
  int lanes[kBlockVecs];
};

// The blocks of an output plane, the same for every (k, b, o).
inline std::vector<RowBlock> row_blocks(const ConvShape& s, const PhaseLayout& L) {
  const int64_t row_vecs = std::min<int64_t>((s.Wo + 7) / 8, kBlockVecs);  // per row piece
  const int64_t rows = std::max<int64_t>(1, kBlockVecs / row_vecs);
  std::vector<RowBlock> blocks;
  for (int64_t c0 = 0; c0 < s.Wo; c0 += 8 * row_vecs) {
    const int64_t width = std::min(8 * row_vecs, s.Wo - c0), nv = (width + 7) / 8;
    for (int64_t oh0 = 0; oh0 < s.Ho; oh0 += rows) {
      RowBlock blk{};
      for (int64_t oh = oh0; oh < std::min(s.Ho, oh0 + rows); ++oh) {
        for (int64_t e = 0; e < nv; ++e) {
          const int u = blk.vecs++;
          blk.in_off[u] = oh * L.Wq + c0 + 8 * e;
          blk.out_off[u] = oh * s.Wo + c0 + 8 * e;
          blk.lanes[u] = static_cast<int>(std::min<int64_t>(8, width - 8 * e));
        }
      }
      blocks.push_back(blk);
    }
  }
  return blocks;
}

template <int V>
inline void conv_block(const float* xb, const int64_t* offs, const float* v, int64_t n, float b0,
                       const RowBlock& blk, float* yp, bool relu) {
  cpu::v8f r[V];
  int64_t in_off[V];
  for (int u = 0; u < V; ++u) {
    r[u] = cpu::v8f{} + b0;
    in_off[u] = blk.in_off[u];
  }
  for (int64_t p = 0; p < n; ++p) {
    const float w = v[p];
    const float* src = xb + offs[p];
    for (int u = 0; u < V; ++u) {
      r[u] += w * *reinterpret_cast<const cpu::v8f_u*>(src + in_off[u]);
    }
  }
  for (int u = 0; u < V; ++u) {
    if (relu) r[u] = reinterpret_cast<cpu::v8f>(reinterpret_cast<cpu::v8i>(r[u]) & (r[u] > 0.f));
    float* out = yp + blk.out_off[u];
    if (blk.lanes[u] == 8) {
      *reinterpret_cast<cpu::v8f_u*>(out) = r[u];
    } else {
      for (int e = 0; e < blk.lanes[u]; ++e) out[e] = r[u][e];
    }
  }
}

// y [K, B, O, Ho, Wo] of x [S, B, C, H, W] (contiguous). Work items are (input sample, part of
// the output planes that read it: all K*O when the input is shared, else the module's O), so a
// sample is phase-split once into a thread-local buffer (L2-sized for small layers) and read by
// all its output planes from there: x is read from memory once and no padded copy of the whole
// batch is written. A sample's planes are split into parts only when samples are fewer than
// 4 x the threads (small inference batches).
template <typename T>
bool conv_planes(const T* x, const int64_t* rp, const int32_t* ci, const T* v, const T* bias,
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
  const auto blocks = row_blocks(s, L);
  const int64_t samples = s.S * s.B, per_sample = (s.S == 1 ? K : 1) * s.O;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = samples >= 4 * threads
                            ? 1
                            : std::min(per_sample, (4 * threads + samples - 1) / samples);
  const int64_t part_rows = (per_sample + parts - 1) / parts;
  std::atomic<bool> finite{true};
  at::parallel_for(0, samples * parts, grain_for(part_rows * span * avg_nnz),
                   [&](int64_t begin, int64_t end) {
    std::vector<T> xs(static_cast<size_t>(s.C * L.chan + kSlack), T(0));  // slack stays 0
    std::vector<T> buf(std::is_same_v<T, float> ? 0 : static_cast<size_t>(span));
    T* __restrict__ acc = buf.data();
    int64_t filled = -1;  // the sample in xs
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sample = item / parts, part = item % parts;
      if (sample != filled) {
        if (!fill_sample(x + sample * s.C * s.H * s.W, xs.data(), s, L)) {
          finite.store(false, std::memory_order_relaxed);
        }
        filled = sample;
      }
      const int64_t b = sample % s.B;
      const int64_t r1 = std::min(per_sample, (part + 1) * part_rows);
      for (int64_t r = part * part_rows; r < r1; ++r) {
        const int64_t k = s.S == 1 ? r / s.O : sample / s.B, o = r % s.O;
        const T b0 = bias ? bias[k * s.O + o] : T(0);
        const int64_t p0 = rp[k * (s.O + 1) + o], p1 = rp[k * (s.O + 1) + o + 1];
        T* yp = y + ((k * s.B + b) * s.O + o) * plane;
        if constexpr (std::is_same_v<T, float>) {
          for (const RowBlock& blk : blocks) {
            cpu::dispatch_vecs(blk.vecs, [&](auto vc) {
              conv_block<decltype(vc)::value>(xs.data(), offs.data() + p0, v + p0, p1 - p0, b0,
                                              blk, yp, relu);
            });
          }
        } else {
          for (int64_t q = 0; q < span; ++q) acc[q] = b0;
          for (int64_t p = p0; p < p1; ++p) {
            const T w = v[p];
            const T* __restrict__ src = xs.data() + offs[p];
            for (int64_t q = 0; q < span; ++q) acc[q] += w * src[q];
          }
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
      }
    }
  });
  return finite.load();
}

// out [K, B, O, Ho, Wo] of x [S, B, C, H, W] and the CSR (checked by the caller); s holds the
// geometry with O, Ho, Wo set; bias [K, O] or undefined. finite (if given) is set to whether x
// held only finite values.
inline at::Tensor run(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& values, const at::Tensor& bias, int64_t K,
                      const ConvShape& s, bool relu, bool* finite = nullptr) {
  auto rp = row_ptr.contiguous();
  auto ci = col_idx.contiguous();
  auto v = values.contiguous();
  auto bc = bias.defined() ? bias.contiguous() : at::Tensor();
  auto out = at::empty({K, s.B, s.O, s.Ho, s.Wo}, x.options());
  if (finite) *finite = true;
  if (out.numel() == 0) return out;
  const PhaseLayout L = phase_layout(s);
  auto xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    const bool all = conv_planes<scalar_t>(xc.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                                           ci.data_ptr<int32_t>(), v.data_ptr<scalar_t>(),
                                           bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
                                           out.data_ptr<scalar_t>(), K, s, L, relu);
    if (finite) *finite = all;
  });
  return out;
}

}  // namespace sparse_conv
}  // namespace modsplit
