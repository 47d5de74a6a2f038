// sparse_linear / sparse_conv2d on the CPU: K modules' weights held as CSR over their kept
// entries only (a compact composed model, modsplit.compact), so the cost is ~ kept weights x batch
// with no W*M pass and no masked-out weight read.
//
// CSR: row_ptr int64 [K, O+1] holds offsets into the shared col_idx int32 [nnz] / values [nnz]
// (module k's row o is entries row_ptr[k, o] .. row_ptr[k, o+1]-1). Linear columns index the
// input features; conv columns index c*kh*kw + i*kw + j of the [O, C, kh, kw] weight.
// Inputs x [S, B, ...] with S = 1 (every module reads the same input) or S = K.
//  * sparse_linear, batch < kTransposeRows: per (module, row) gathered dot products (4 chains);
//    otherwise x is transposed to [S, I, B] once (16 x 16 tiles) and each kept weight is one
//    axpy over the batch into a row buffer.
//  * sparse_conv2d: direct convolution over kept weights (sparse_conv_kernels.h).
//  * sparse_linear_chain: sparse_linear layer after layer in one call (no Python in between),
//    each followed by nothing, a ReLU or a sigmoid.
// Bias [K, O] and a ReLU are fused. float32 and float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "masked_linear_kernels.h"
#include "sparse_conv_kernels.h"

namespace modsplit {
namespace {

constexpr int64_t kTransposeRows = 8;
using sparse_conv::grain_for;

// Checks shared by both ops; returns (K, O).
std::pair<int64_t, int64_t> check_csr(const at::Tensor& x, const at::Tensor& row_ptr,
                                      const at::Tensor& col_idx, const at::Tensor& values,
                                      const c10::optional<at::Tensor>& bias, int64_t cols) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "modsplit: x must be float32 or float64, got ", x.scalar_type());
  check_same_dtype(values, x, "values", "x");
  check_same_device(values, x, "values", "x");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 2 && row_ptr.size(1) >= 1,
              "modsplit: row_ptr must be int64 [K, O+1], got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  TORCH_CHECK(col_idx.scalar_type() == at::kInt && col_idx.dim() == 1,
              "modsplit: col_idx must be int32 [nnz], got ", col_idx.scalar_type(), " ",
              col_idx.sizes());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col_idx.size(0),
              "modsplit: values must be [nnz=", col_idx.size(0), "], got ", values.sizes());
  const int64_t K = row_ptr.size(0), O = row_ptr.size(1) - 1, nnz = col_idx.size(0);
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == K, "modsplit: x must hold 1 (shared) or K=", K,
              " module inputs in dim 0, got shape ", x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->sizes() == at::IntArrayRef({K, O}), "modsplit: bias must be [K=", K,
                ", O=", O, "], got ", bias->sizes());
    check_same_dtype(*bias, x, "bias", "x");
  }
  auto rp = row_ptr.contiguous();
  const int64_t* r = rp.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t* row = r + k * (O + 1);
    for (int64_t o = 0; o < O; ++o) {
      TORCH_CHECK(row[o] >= 0 && row[o] <= row[o + 1] && row[o + 1] <= nnz,
                  "modsplit: row_ptr must be non-decreasing offsets in [0, nnz=", nnz, "]");
    }
  }
  auto ci = col_idx.contiguous();
  const int32_t* c = ci.data_ptr<int32_t>();
  int32_t lo = 0, hi = 0;
  for (int64_t p = 0; p < nnz; ++p) {  // one pass, vectorised
    lo = std::min(lo, c[p]);
    hi = std::max(hi, c[p]);
  }
  TORCH_CHECK(lo >= 0 && (nnz == 0 || hi < cols), "modsplit: col_idx must lie in [0, ", cols,
              "), got values in [", lo, ", ", hi, "]");
  return {K, O};
}

template <typename T>
void relu_inplace(T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] > T(0) ? y[i] : T(0);
}

template <typename T>
void linear_dots(const T* x, const int64_t* rp, const int32_t* ci, const T* v, const T* bias,
                 T* y, int64_t K, int64_t O, int64_t S, int64_t B, int64_t I, bool relu) {
  at::parallel_for(0, K * O, grain_for(B * 8), [&](int64_t begin, int64_t end) {
    for (int64_t ko = begin; ko < end; ++ko) {
      const int64_t k = ko / O, o = ko % O;
      const int64_t p0 = rp[k * (O + 1) + o], p1 = rp[k * (O + 1) + o + 1];
      const T* xk = x + (S == 1 ? 0 : k) * B * I;
      for (int64_t b = 0; b < B; ++b) {
        const T* xb = xk + b * I;
        T acc[4] = {T(0), T(0), T(0), T(0)};  // 4 chains hide the FMA latency
        int64_t p = p0;
        for (; p + 4 <= p1; p += 4) {
          acc[0] += v[p] * xb[ci[p]];
          acc[1] += v[p + 1] * xb[ci[p + 1]];
          acc[2] += v[p + 2] * xb[ci[p + 2]];
          acc[3] += v[p + 3] * xb[ci[p + 3]];
        }
        for (; p < p1; ++p) acc[0] += v[p] * xb[ci[p]];
        const T sum = (bias ? bias[ko] : T(0)) + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
        y[(k * B + b) * O + o] = relu && sum < T(0) ? T(0) : sum;
      }
    }
  });
}

// xt [S, I, B] <- x [S, B, I] (contiguous), in 16 x 16 tiles.
template <typename T>
void transpose_batch(const T* x, T* xt, int64_t S, int64_t B, int64_t I) {
  constexpr int64_t kTile = 16;
  at::parallel_for(0, S * ((I + kTile - 1) / kTile), 1, [&](int64_t begin, int64_t end) {
    const int64_t tiles = (I + kTile - 1) / kTile;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles, i0 = (t % tiles) * kTile, i1 = std::min(I, i0 + kTile);
      const T* xs = x + s * B * I;
      T* ys = xt + s * I * B;
      for (int64_t b0 = 0; b0 < B; b0 += kTile) {
        const int64_t b1 = std::min(B, b0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t b = b0; b < b1; ++b) ys[i * B + b] = xs[b * I + i];
      }
    }
  });
}

// One axpy over the batch per kept weight, into a row buffer, stored to y [K, B, O].
template <typename T>
void linear_axpys(const T* xt, const int64_t* rp, const int32_t* ci, const T* v, const T* bias,
                  T* y, int64_t K, int64_t O, int64_t S, int64_t B, int64_t I, bool relu) {
  at::parallel_for(0, K * O, grain_for(B * 8), [&](int64_t begin, int64_t end) {
    std::vector<T> row(B);
    T* __restrict__ yr = row.data();
    for (int64_t ko = begin; ko < end; ++ko) {
      const int64_t k = ko / O, o = ko % O;
      const int64_t p0 = rp[k * (O + 1) + o], p1 = rp[k * (O + 1) + o + 1];
      const T* xk = xt + (S == 1 ? 0 : k) * I * B;
      const T b0 = bias ? bias[ko] : T(0);
      for (int64_t b = 0; b < B; ++b) yr[b] = b0;
      for (int64_t p = p0; p < p1; ++p) {
        const T w = v[p];
        const T* __restrict__ xr = xk + int64_t(ci[p]) * B;
        for (int64_t b = 0; b < B; ++b) yr[b] += w * xr[b];
      }
      if (relu) relu_inplace(yr, B);
      T* yk = y + k * B * O + o;
      for (int64_t b = 0; b < B; ++b) yk[b * O] = yr[b];
    }
  });
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, bool relu) {
  TORCH_CHECK(x.dim() == 3, "modsplit: x must be [S, B, in_features] (S = 1 or K), got shape ",
              x.sizes());
  const int64_t S = x.size(0), B = x.size(1), I = x.size(2);
  auto [K, O] = check_csr(x, row_ptr, col_idx, values, bias, I);
  auto rp = row_ptr.contiguous();
  auto ci = col_idx.contiguous();
  auto v = values.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto out = at::empty({K, B, O}, x.options());
  if (B == 0 || O == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_cpu", [&] {
    const scalar_t* bp = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    if (B < kTransposeRows) {
      auto xc = x.contiguous();
      linear_dots<scalar_t>(xc.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                            ci.data_ptr<int32_t>(), v.data_ptr<scalar_t>(), bp,
                            out.data_ptr<scalar_t>(), K, O, S, B, I, relu);
    } else {
      auto xc = x.contiguous();
      auto xt = at::empty({S, I, B}, x.options());
      transpose_batch<scalar_t>(xc.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), S, B, I);
      linear_axpys<scalar_t>(xt.data_ptr<scalar_t>(), rp.data_ptr<int64_t>(),
                             ci.data_ptr<int32_t>(), v.data_ptr<scalar_t>(), bp,
                             out.data_ptr<scalar_t>(), K, O, S, B, I, relu);
    }
  });
  return out;
}

// Layers applied one after the other in one call (a compact model's chain of Linear layers),
// packed into flat tensors so that a call parses six arguments, not lists. Layer l (row l of
// layout int64 [L, 7] = K, O, row_ptr offset, entry offset, nnz, bias offset or -1, activation
// 0 none / 1 ReLU / 2 sigmoid) has
// row_ptr[off : off + K*(O+1)] as [K, O+1] offsets relative to its own entries
// col_idx / values[entry : entry + nnz], bias[boff : boff + K*O] as [K, O]. It reads the previous
// output [K, B, O_{l-1}] (x [S, B, I] for the first).
at::Tensor sparse_linear_chain_cpu(const at::Tensor& x, const at::Tensor& layout,
                                   const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                   const at::Tensor& values, const at::Tensor& bias) {
  TORCH_CHECK(layout.scalar_type() == at::kLong && layout.dim() == 2 && layout.size(1) == 7 &&
                  layout.size(0) >= 1,
              "modsplit: layout must be int64 [L>=1, 7], got ", layout.scalar_type(), " ",
              layout.sizes());
  TORCH_CHECK(row_ptr.dim() == 1 && col_idx.dim() == 1 && values.dim() == 1 && bias.dim() == 1,
              "modsplit: row_ptr, col_idx, values and bias must be 1-d (packed layers)");
  auto lay = layout.contiguous();
  const int64_t* L = lay.data_ptr<int64_t>();
  at::Tensor h = x;
  for (int64_t l = 0; l < layout.size(0); ++l) {
    const int64_t* r = L + 7 * l;
    const int64_t K = r[0], O = r[1], rp_off = r[2], e_off = r[3], nnz = r[4], b_off = r[5];
    TORCH_CHECK(K >= 1 && O >= 1 && rp_off >= 0 && rp_off + K * (O + 1) <= row_ptr.size(0) &&
                    e_off >= 0 && nnz >= 0 && e_off + nnz <= col_idx.size(0) &&
                    b_off + K * O <= bias.size(0) && r[6] >= 0 && r[6] <= 2,
                "modsplit: layout row ", l, " lies outside row_ptr / col_idx / bias");
    c10::optional<at::Tensor> b;
    if (b_off >= 0) b = bias.narrow(0, b_off, K * O).view({K, O});
    h = sparse_linear_cpu(h, row_ptr.narrow(0, rp_off, K * (O + 1)).view({K, O + 1}),
                          col_idx.narrow(0, e_off, nnz), values.narrow(0, e_off, nnz), b,
                          r[6] == 1);
    if (r[6] == 2) h.sigmoid_();
  }
  return h;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, bool relu) {
  TORCH_CHECK(x.dim() == 5, "modsplit: x must be [S, B, C, H, W] (S = 1 or K), got shape ",
              x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1,
              "modsplit: kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "modsplit: stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "modsplit: padding must be two non-negative ints, got ", padding);
  sparse_conv::ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), 0, 0, 0,
              kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  s.Ho = (s.H + 2 * s.ph - s.kh) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - s.kw) / s.sw + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= s.kh && s.W + 2 * s.pw >= s.kw, "modsplit: x of shape ",
              x.sizes(), " is smaller than kernel_size ", kernel_size, " with padding ", padding);
  auto [K, O] = check_csr(x, row_ptr, col_idx, values, bias, s.C * s.kh * s.kw);
  s.O = O;
  return sparse_conv::run(x, row_ptr, col_idx, values,
                         bias.has_value() ? *bias : at::Tensor(), K, s, relu);
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("sparse_linear", &modsplit::sparse_linear_cpu);
  m.impl("sparse_conv2d", &modsplit::sparse_conv2d_cpu);
  m.impl("sparse_linear_chain", &modsplit::sparse_linear_chain_cpu);
}
