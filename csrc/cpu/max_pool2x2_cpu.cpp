// max_pool2x2 / max_pool2x2_backward on the CPU: 2 x 2 max pooling with stride 2 (floor mode,
// no padding: nn.MaxPool2d(2)), the window positions kept as uint8 instead of int64 flat
// indices (modsplit.fused_layers.MaxPool2x2).
//
// x [N, C, H, W] (contiguous after the call's .contiguous()) -> y [N, C, H/2, W/2] and
// indices uint8 [N, C, H/2, W/2]: the window position k = 2 * dy + dx of each maximum. The
// rule is ATen's: the positions are scanned in the order (0,0), (0,1), (1,0), (1,1) from -inf,
// and a value replaces the maximum when it is larger or NaN; so ties keep the first position
// and NaN propagates. Work items are the N*C planes (at::parallel_for); float32 output rows run
// 8 outputs at a time in vector registers (the even / odd columns of two input rows split by
// shuffles).
// The backward writes every element of grad_x [N, C, H, W] once: the output's gradient at its
// window's recorded position, zero elsewhere (including an odd last row / column, which no
// window reads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "masked_linear_kernels.h"

namespace modsplit {
namespace {

using cpu::v8f;
using cpu::v8i;
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned

int64_t grain(int64_t plane) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(plane, 1));
}

// ATen's update: larger, or NaN.
template <typename T>
inline void take(T v, uint8_t k, T& m, uint8_t& idx) {
  if (v > m || std::isnan(v)) {
    m = v;
    idx = k;
  }
}

template <typename T>
inline void pool_one(const T* r0, const T* r1, int64_t ow, T* y, uint8_t* idx) {
  T m = -std::numeric_limits<T>::infinity();
  uint8_t k = 0;
  take(r0[2 * ow], 0, m, k);
  take(r0[2 * ow + 1], 1, m, k);
  take(r1[2 * ow], 2, m, k);
  take(r1[2 * ow + 1], 3, m, k);
  y[ow] = m;
  idx[ow] = k;
}

template <typename T>
void pool_row(const T* r0, const T* r1, int64_t wo, T* y, uint8_t* idx) {
  for (int64_t ow = 0; ow < wo; ++ow) pool_one(r0, r1, ow, y, idx);
}

// 8 outputs per iteration: the same scan rule on vectors (v != v is the NaN test).
template <>
void pool_row<float>(const float* r0, const float* r1, int64_t wo, float* y, uint8_t* idx) {
  int64_t ow = 0;
  for (; ow + 8 <= wo; ow += 8) {
    const v16f_u a = *reinterpret_cast<const v16f_u*>(r0 + 2 * ow);
    const v16f_u b = *reinterpret_cast<const v16f_u*>(r1 + 2 * ow);
    const v8f cand[4] = {
        __builtin_shufflevector(a, a, 0, 2, 4, 6, 8, 10, 12, 14),
        __builtin_shufflevector(a, a, 1, 3, 5, 7, 9, 11, 13, 15),
        __builtin_shufflevector(b, b, 0, 2, 4, 6, 8, 10, 12, 14),
        __builtin_shufflevector(b, b, 1, 3, 5, 7, 9, 11, 13, 15)};
    v8f m = cand[0];  // the first position always wins against -inf unless it is -inf itself
    v8i k = {};
    for (int j = 1; j < 4; ++j) {
      const v8i upd = (cand[j] > m) | (cand[j] != cand[j]);
      m = upd ? cand[j] : m;
      k = upd ? v8i{j, j, j, j, j, j, j, j} : k;
    }
    __builtin_memcpy(y + ow, &m, sizeof(m));
    for (int e = 0; e < 8; ++e) idx[ow + e] = static_cast<uint8_t>(k[e]);
  }
  for (; ow < wo; ++ow) pool_one(r0, r1, ow, y, idx);
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "modsplit: x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 4, "modsplit: x must be [N, C, H, W], got shape ", x_in.sizes());
  TORCH_CHECK(x_in.size(2) >= 2 && x_in.size(3) >= 2,
              "modsplit: x must be at least 2 x 2 in H, W for a 2 x 2 max pool, got shape ",
              x_in.sizes());
  const auto x = x_in.contiguous();
  const int64_t planes = x.size(0) * x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2;
  auto y = at::empty({x.size(0), x.size(1), ho, wo}, x.options());
  auto idx = at::empty({x.size(0), x.size(1), ho, wo}, x.options().dtype(at::kByte));
  if (planes == 0) return {y, idx};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    uint8_t* pk = idx.mutable_data_ptr<uint8_t>();
    at::parallel_for(0, planes, grain(h * w), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t oh = 0; oh < ho; ++oh) {
          const scalar_t* r0 = px + (p * h + 2 * oh) * w;
          pool_row(r0, r0 + w, wo, py + (p * ho + oh) * wo, pk + (p * ho + oh) * wo);
        }
      }
    });
  });
  return {y, idx};
}

// grad_x rows 2*oh, 2*oh + 1 from one output row: each window gets its gradient at position k.
template <typename T>
inline void unpool_one(const T* g, const uint8_t* k, int64_t ow, T* r0, T* r1) {
  const T v = g[ow];
  const uint8_t kk = k[ow];
  r0[2 * ow] = kk == 0 ? v : T(0);
  r0[2 * ow + 1] = kk == 1 ? v : T(0);
  r1[2 * ow] = kk == 2 ? v : T(0);
  r1[2 * ow + 1] = kk == 3 ? v : T(0);
}

template <typename T>
void unpool_row(const T* g, const uint8_t* k, int64_t wo, T* r0, T* r1) {
  for (int64_t ow = 0; ow < wo; ++ow) unpool_one(g, k, ow, r0, r1);
}

// 8 outputs per iteration: the four position vectors interleaved into two 16-value rows.
template <>
void unpool_row<float>(const float* g, const uint8_t* k, int64_t wo, float* r0, float* r1) {
  int64_t ow = 0;
  const v8f zero = {};
  for (; ow + 8 <= wo; ow += 8) {
    v8f v;
    __builtin_memcpy(&v, g + ow, sizeof(v));
    v8i kk;
    for (int e = 0; e < 8; ++e) kk[e] = k[ow + e];
    const v8f c0 = kk == 0 ? v : zero, c1 = kk == 1 ? v : zero;
    const v8f c2 = kk == 2 ? v : zero, c3 = kk == 3 ? v : zero;
    const v8f a0 = __builtin_shufflevector(c0, c1, 0, 8, 1, 9, 2, 10, 3, 11);
    const v8f a1 = __builtin_shufflevector(c0, c1, 4, 12, 5, 13, 6, 14, 7, 15);
    const v8f b0 = __builtin_shufflevector(c2, c3, 0, 8, 1, 9, 2, 10, 3, 11);
    const v8f b1 = __builtin_shufflevector(c2, c3, 4, 12, 5, 13, 6, 14, 7, 15);
    __builtin_memcpy(r0 + 2 * ow, &a0, sizeof(a0));
    __builtin_memcpy(r0 + 2 * ow + 8, &a1, sizeof(a1));
    __builtin_memcpy(r1 + 2 * ow, &b0, sizeof(b0));
    __builtin_memcpy(r1 + 2 * ow + 8, &b1, sizeof(b1));
  }
  for (; ow < wo; ++ow) unpool_one(g, k, ow, r0, r1);
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& indices_in,
                                    c10::SymIntArrayRef input_size) {
  TORCH_CHECK(grad_y_in.scalar_type() == at::kFloat || grad_y_in.scalar_type() == at::kDouble,
              "modsplit: grad_y must be float32 or float64, got ", grad_y_in.scalar_type());
  TORCH_CHECK(grad_y_in.dim() == 4, "modsplit: grad_y must be [N, C, H/2, W/2], got shape ",
              grad_y_in.sizes());
  TORCH_CHECK(input_size.size() == 2, "modsplit: input_size must be [H, W], got ",
              input_size.size(), " values");
  const int64_t h = input_size[0].expect_int(), w = input_size[1].expect_int();
  TORCH_CHECK(h / 2 == grad_y_in.size(2) && w / 2 == grad_y_in.size(3) && h >= 2 && w >= 2,
              "modsplit: input_size [", h, ", ", w, "] does not pool to grad_y's shape ",
              grad_y_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kByte && indices_in.sizes() == grad_y_in.sizes(),
              "modsplit: indices must be uint8 of grad_y's shape ", grad_y_in.sizes(), ", got ",
              indices_in.scalar_type(), " ", indices_in.sizes());
  check_same_device(indices_in, grad_y_in, "indices", "grad_y");
  const auto gy = grad_y_in.contiguous();
  const auto idx = indices_in.contiguous();
  const int64_t planes = gy.size(0) * gy.size(1), ho = h / 2, wo = w / 2;
  auto gx = at::empty({gy.size(0), gy.size(1), h, w}, gy.options());
  if (planes == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "max_pool2x2_backward_cpu", [&] {
    const scalar_t* pg = gy.const_data_ptr<scalar_t>();
    const uint8_t* pk = idx.const_data_ptr<uint8_t>();
    scalar_t* px = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, grain(h * w), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* plane = px + p * h * w;
        for (int64_t oh = 0; oh < ho; ++oh) {
          scalar_t* r0 = plane + 2 * oh * w;
          scalar_t* r1 = r0 + w;
          unpool_row(pg + (p * ho + oh) * wo, pk + (p * ho + oh) * wo, wo, r0, r1);
          if (w % 2) {
            r0[w - 1] = scalar_t(0);
            r1[w - 1] = scalar_t(0);
          }
        }
        if (h % 2) std::fill(plane + (h - 1) * w, plane + h * w, scalar_t(0));
      }
    });
  });
  return gx;
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("max_pool2x2", &modsplit::max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &modsplit::max_pool2x2_backward_cpu);
}
