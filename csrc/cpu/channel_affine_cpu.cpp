// channel_affine / channel_affine_backward on the CPU: a per-(group, channel) affine map,
// optionally followed by ReLU, in one pass (a BatchNorm in eval mode, frozen or per module, and
// the ReLU after it; modsplit.fused_layers.NormReLU).
//
// x [G*N, C, *] (contiguous after the call's .contiguous()), seen as [G, N, C, S]: the rows
// n = 0..N-1 of group g, channel c, the S positions of the trailing dims (a contiguous run);
// scale / shift [G, C]. Work items are the G*N*C runs (at::parallel_for):
//  forward   y = x * scale[g, c] + shift[g, c], then y < 0 ? 0 : y with relu (NaN stays NaN,
//            as in torch.relu);
//  backward  grad_x = grad_y * scale[g, c], zero where out <= 0 with relu (out: the forward's
//            output; torch's threshold_backward rule, so a NaN output passes its gradient).
// float32 and float64; scale / shift have x's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "masked_linear_kernels.h"

namespace modsplit {
namespace {

struct AffineShape {
  int64_t G, N, C, S;
};

AffineShape check_affine(const at::Tensor& x, int64_t groups, const at::Tensor& scale,
                         const char* x_name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "modsplit: ", x_name, " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "modsplit: ", x_name, " must be [G*N, C, *], got shape ", x.sizes());
  TORCH_CHECK(groups >= 1 && x.size(0) % groups == 0,
              "modsplit: groups=", groups, " must be positive and divide the rows of ", x_name,
              " (shape ", x.sizes(), ")");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == groups && scale.size(1) == x.size(1),
              "modsplit: scale must be [G=", groups, ", C=", x.size(1), "], got shape ",
              scale.sizes());
  check_same_dtype(scale, x, "scale", x_name);
  check_same_device(scale, x, "scale", x_name);
  const int64_t rows = x.size(0), c = x.size(1);
  const int64_t s = rows * c == 0 ? 0 : x.numel() / (rows * c);
  return {groups, rows / groups, c, s};
}

int64_t grain(const AffineShape& s) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(s.S, 1));
}

// The (group, channel) pair of run r = (g * N + n) * C + c.
inline int64_t pair_of(const AffineShape& s, int64_t r) {
  return (r / (s.N * s.C)) * s.C + r % s.C;
}

// Values i.. of a run (all of it for float64, the tail after the vectors for float32).
template <typename T>
void affine_tail(T* __restrict__ out, const T* __restrict__ in, int64_t n, T a, T b, bool relu,
                 int64_t i) {
  for (; i < n; ++i) {
    const T v = in[i] * a + b;
    out[i] = relu && v < T(0) ? T(0) : v;
  }
}

template <typename T>
void affine_grad_tail(T* __restrict__ out, const T* __restrict__ g, const T* __restrict__ y,
                      int64_t n, T a, int64_t i) {
  for (; i < n; ++i) {
    const T v = g[i] * a;
    out[i] = y && y[i] <= T(0) ? T(0) : v;
  }
}

template <typename T>
void affine_run(T* out, const T* in, int64_t n, T a, T b, bool relu) {
  affine_tail(out, in, n, a, b, relu, 0);
}

template <typename T>
void affine_grad_run(T* out, const T* g, const T* y, int64_t n, T a) {
  affine_grad_tail(out, g, y, n, a, 0);
}

// float32: 8 values per iteration in vector registers, then the scalar tail.
using cpu::v8f;
using cpu::v8f_u;

template <>
void affine_run<float>(float* out, const float* in, int64_t n, float a, float b, bool relu) {
  const v8f va = a - v8f{}, vb = b - v8f{}, zero = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v = *reinterpret_cast<const v8f_u*>(in + i) * va + vb;
    if (relu) v = v < zero ? zero : v;
    *reinterpret_cast<v8f_u*>(out + i) = v;
  }
  affine_tail(out, in, n, a, b, relu, i);
}

template <>
void affine_grad_run<float>(float* out, const float* g, const float* y, int64_t n, float a) {
  const v8f va = a - v8f{}, zero = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v = *reinterpret_cast<const v8f_u*>(g + i) * va;
    if (y) v = *reinterpret_cast<const v8f_u*>(y + i) <= zero ? zero : v;
    *reinterpret_cast<v8f_u*>(out + i) = v;
  }
  affine_grad_tail(out, g, y, n, a, i);
}

at::Tensor channel_affine_cpu(const at::Tensor& x_in, int64_t groups, const at::Tensor& scale,
                              const at::Tensor& shift, bool relu) {
  const AffineShape s = check_affine(x_in, groups, scale, "x");
  TORCH_CHECK(shift.sizes() == scale.sizes(), "modsplit: shift must be [G=", groups, ", C=",
              s.C, "], got shape ", shift.sizes());
  check_same_dtype(shift, x_in, "shift", "x");
  check_same_device(shift, x_in, "shift", "x");
  const auto x = x_in.contiguous();
  const auto sc = scale.contiguous();
  const auto sh = shift.contiguous();
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_affine_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pa = sc.const_data_ptr<scalar_t>();
    const scalar_t* pb = sh.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.G * s.N * s.C, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = pair_of(s, r);
        affine_run(py + r * s.S, px + r * s.S, s.S, pa[p], pb[p], relu);
      }
    });
  });
  return y;
}

at::Tensor channel_affine_backward_cpu(const at::Tensor& grad_y_in,
                                       const c10::optional<at::Tensor>& out_in, int64_t groups,
                                       const at::Tensor& scale, bool relu) {
  const AffineShape s = check_affine(grad_y_in, groups, scale, "grad_y");
  TORCH_CHECK(!relu || out_in.has_value(),
              "modsplit: channel_affine_backward with relu needs out (the forward's output)");
  at::Tensor out;
  if (relu) {
    TORCH_CHECK(out_in->sizes() == grad_y_in.sizes(), "modsplit: out must have grad_y's shape ",
                grad_y_in.sizes(), ", got ", out_in->sizes());
    check_same_dtype(*out_in, grad_y_in, "out", "grad_y");
    check_same_device(*out_in, grad_y_in, "out", "grad_y");
    out = out_in->contiguous();
  }
  const auto gy = grad_y_in.contiguous();
  const auto sc = scale.contiguous();
  auto gx = at::empty_like(gy);
  if (gy.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "channel_affine_backward_cpu", [&] {
    const scalar_t* pg = gy.const_data_ptr<scalar_t>();
    const scalar_t* po = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pa = sc.const_data_ptr<scalar_t>();
    scalar_t* px = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.G * s.N * s.C, grain(s), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        affine_grad_run(px + r * s.S, pg + r * s.S, po ? po + r * s.S : nullptr, s.S,
                        pa[pair_of(s, r)]);
      }
    });
  });
  return gx;
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("channel_affine", &modsplit::channel_affine_cpu);
  m.impl("channel_affine_backward", &modsplit::channel_affine_backward_cpu);
}
