// The sparse path of multi_masked_conv2d on the CPU (see masked_conv2d_sparse.h): the kept
// weights of every module are gathered from weight [O, R] and the packed bits into CSR (for the
// forward: rows (k, o), columns c*kh*kw + t; for grad_x: rows (k, c), columns o*kh*kw + the
// flipped tap kh*kw-1-t), then run through the direct sparse convolution of
// sparse_conv_kernels.h. Bits past column R of a row's last word are ignored, as in the dense
// path.
#include "masked_conv2d_sparse.h"

#include <ATen/Dispatch.h>

#include <cstdlib>
#include <vector>

#include "sparse_conv_kernels.h"

namespace modsplit {
namespace {

// Word w of a packed row with the bits past column R cleared.
inline uint32_t row_word(const int32_t* row, int64_t w, const ConvGeom& g) {
  auto m = static_cast<uint32_t>(row[w]);
  const int64_t tail = g.R - w * kBitsPerWord;
  if (tail < kBitsPerWord) m &= (uint32_t{1} << tail) - 1u;
  return m;
}

int64_t count_kept(const int32_t* p, const ConvGeom& g) {
  int64_t n = 0;
  for (int64_t r = 0; r < g.K * g.O; ++r) {
    for (int64_t w = 0; w < g.words; ++w) n += __builtin_popcount(row_word(p + r * g.words, w, g));
  }
  return n;
}

// Calls fn(k, o, j) for every kept column j of every row (k, o), in order.
template <typename Fn>
void for_each_kept(const int32_t* p, const ConvGeom& g, Fn&& fn) {
  for (int64_t k = 0; k < g.K; ++k) {
    for (int64_t o = 0; o < g.O; ++o) {
      const int32_t* row = p + (k * g.O + o) * g.words;
      for (int64_t w = 0; w < g.words; ++w) {
        for (uint32_t m = row_word(row, w, g); m != 0; m &= m - 1u) {
          fn(k, o, w * kBitsPerWord + __builtin_ctz(m));
        }
      }
    }
  }
}

struct Csr {
  at::Tensor row_ptr, col_idx, values;
};

// transposed = false: rows (k, o), column j, value weight[o, j].
// transposed = true: rows (k, c), column o*taps + taps-1-t for j = c*taps + t, value weight[o, j].
Csr gather_kept(const at::Tensor& weight, const at::Tensor& packed3, const ConvGeom& g,
                bool transposed) {
  const int64_t rows = transposed ? g.C : g.O, taps = g.kh * g.kw;
  const int32_t* p = packed3.const_data_ptr<int32_t>();
  auto row_ptr = at::zeros({g.K, rows + 1}, packed3.options().dtype(at::kLong));
  int64_t* rp = row_ptr.mutable_data_ptr<int64_t>();
  // Counts in rp[k*(rows+1) + r + 1], then prefix sums over the whole bank (offsets into nnz).
  for_each_kept(p, g, [&](int64_t k, int64_t o, int64_t j) {
    ++rp[k * (rows + 1) + (transposed ? j / taps : o) + 1];
  });
  int64_t total = 0;
  for (int64_t k = 0; k < g.K; ++k) {
    int64_t* r = rp + k * (rows + 1);
    r[0] = total;
    for (int64_t i = 1; i <= rows; ++i) r[i] = (total += r[i]);
  }
  auto col_idx = at::empty({total}, packed3.options());
  auto values = at::empty({total}, weight.options());
  int32_t* ci = col_idx.mutable_data_ptr<int32_t>();
  std::vector<int64_t> cursor(static_cast<size_t>(g.K * rows));
  for (int64_t k = 0; k < g.K; ++k) {
    for (int64_t r = 0; r < rows; ++r) cursor[k * rows + r] = rp[k * (rows + 1) + r];
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "masked_conv2d_sparse", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* v = values.mutable_data_ptr<scalar_t>();
    for_each_kept(p, g, [&](int64_t k, int64_t o, int64_t j) {
      const int64_t c = j / taps, t = j - c * taps;
      const int64_t at = cursor[k * rows + (transposed ? c : o)]++;
      ci[at] = static_cast<int32_t>(transposed ? o * taps + taps - 1 - t : j);
      v[at] = w[o * g.R + j];
    });
  });
  return {row_ptr, col_idx, values};
}

}  // namespace

double sparse_conv_max_density(bool* from_env) {
  const char* raw = std::getenv(kEnvSparseConvMaxDensity);
  *from_env = raw != nullptr && *raw != '\0';
  if (!*from_env) return kSparseConvMaxDensity;
  char* end = nullptr;
  const double value = std::strtod(raw, &end);
  TORCH_CHECK(end != raw && *end == '\0' && value >= 0.0, "modsplit: $",
              kEnvSparseConvMaxDensity, " must be a number >= 0, got '", raw, "'");
  return value;
}

bool use_sparse_conv(const at::Tensor& packed3, const ConvGeom& g, at::ScalarType dtype,
                     bool grad_x) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (g.G != 1 || g.dilation[0] != 1 || g.dilation[1] != 1 || g.B == 0) return false;
  if (grad_x && (g.stride[0] != 1 || g.stride[1] != 1 || g.padding[0] >= g.kh ||
                 g.padding[1] >= g.kw)) {
    return false;
  }
  bool from_env = false;
  const double max_density = sparse_conv_max_density(&from_env);
  if (max_density <= 0.0) return false;
  // The built-in rule also keeps planes of fewer than kSparseConvMinPlane outputs dense: a
  // register block of such a plane is mostly idle lanes.
  const int64_t plane = grad_x ? g.H * g.W : g.Ho * g.Wo;
  if (!from_env && plane < kSparseConvMinPlane) return false;
  const double kept = static_cast<double>(count_kept(packed3.const_data_ptr<int32_t>(), g));
  return kept <= max_density * static_cast<double>(g.K * g.O * g.R);
}

at::Tensor sparse_masked_conv_forward(const at::Tensor& x5, const at::Tensor& weight,
                                      const at::Tensor& packed3,
                                      const c10::optional<at::Tensor>& bias, const ConvGeom& g) {
  const auto csr = gather_kept(weight, packed3, g, /*transposed=*/false);
  const sparse_conv::ConvShape s{g.Kx, g.B, g.C, g.H, g.W, g.O, g.Ho, g.Wo, g.kh, g.kw,
                                 g.stride[0], g.stride[1], g.padding[0], g.padding[1]};
  const auto b = bias.has_value() ? bias->view({1, g.O}).expand({g.K, g.O}) : at::Tensor();
  bool finite = true;
  auto out = sparse_conv::run(x5, csr.row_ptr, csr.col_idx, csr.values, b, g.K, s, false,
                              &finite);
  return finite ? out : at::Tensor();
}

at::Tensor sparse_masked_conv_grad_x(const at::Tensor& grad_out5, const at::Tensor& weight,
                                     const at::Tensor& packed3, const ConvGeom& g) {
  const auto csr = gather_kept(weight, packed3, g, /*transposed=*/true);
  // The convolution of grad_out (O channels of Ho x Wo) with the flipped kernels, padded by
  // kernel - 1 - padding, at stride 1: C channels of H x W.
  const sparse_conv::ConvShape s{g.K, g.B, g.O, g.Ho, g.Wo, g.C, g.H, g.W, g.kh, g.kw, 1, 1,
                                 g.kh - 1 - g.padding[0], g.kw - 1 - g.padding[1]};
  bool finite = true;
  auto gx = sparse_conv::run(grad_out5, csr.row_ptr, csr.col_idx, csr.values, at::Tensor(), g.K,
                             s, false, &finite);
  if (!finite) return at::Tensor();
  return g.shared() ? gx.sum(0, /*keepdim=*/true) : gx;
}

}  // namespace modsplit
