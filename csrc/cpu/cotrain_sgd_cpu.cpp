// cotrain_sgd_step_ on the CPU: the co-training score update of one layer in one pass over its
// score bank, bit for bit the arithmetic of torch.optim.SGD (single-tensor path, dampening 0) on
// the gradient autograd would have accumulated:
//
//   g   = sign_grad ? grad * sgn(S) : grad       (dL_CE/dS, the straight-through gradient;
//                                                 sign_grad: grad is dL/d|S|, as the masked
//                                                 ops' backward gives it before sgn(S))
//   d   = S - A;  g = g + sgn(d) * stem_coef     (stemming term, when an anchor A is given)
//   g   = g + weight_decay * S                   (grad.add(param, alpha=wd): one FMA)
//   buf = init ? g : buf * momentum + g          (buf.mul_(m) rounded, then add_(g))
//   g   = nesterov ? g + momentum * buf : buf    (grad.add(buf, alpha=m): one FMA)
//   S   = S - lr * g                             (param.add_(g, alpha=-lr): one FMA)
//
// ATen's add with alpha is a fused multiply-add on this build's vector paths, hence std::fma;
// every other product and sum is rounded on its own (contraction is off in this file).
// The anchor is [K, ...] or [1, ...] (one anchor shared by the modules).
// The pass also returns, per module, the sum of |S - A| over the old scores (the stemming
// term's value): 8 lanes in the scores' dtype per chunk of 2^14 elements, chunks summed in
// float64, so the result does not depend on the number of threads.
#pragma GCC optimize("fp-contract=off")
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "score_update_kernels.h"

namespace modsplit {
namespace {

using score_update::kChunk;
using score_update::check_update_args;
using score_update::update_range;
using score_update::with_flags;

template <typename T, bool kAnchor, bool kInit, bool kNesterov, bool kSign, bool kDecay>
void update(T* s, T* buf, const T* grad, const T* anchor, int64_t anchor_stride, double* stem,
            int64_t modules, int64_t n, double lr, double momentum, double weight_decay,
            double stem_coef) {
  const T neg_lr = static_cast<T>(-lr), mom = static_cast<T>(momentum);
  const T wd = static_cast<T>(weight_decay), coef = static_cast<T>(stem_coef);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(modules * chunks), 0.0);
  at::parallel_for(0, modules * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / chunks, c = t % chunks;
      const int64_t i0 = c * kChunk, i1 = std::min(n, (c + 1) * kChunk);
      partial[static_cast<size_t>(t)] = update_range<T, kAnchor, kInit, kNesterov, kSign, kDecay>(
          s + m * n, buf + m * n, grad + m * n, kAnchor ? anchor + m * anchor_stride : nullptr,
          i0, i1, neg_lr, mom, wd, coef);
    }
  });
  for (int64_t m = 0; m < modules; ++m) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[static_cast<size_t>(m * chunks + c)];
    stem[m] = total;
  }
}

}  // namespace

at::Tensor cotrain_sgd_step_cpu(at::Tensor& scores, at::Tensor& momentum_buffer,
                                const at::Tensor& grad, const c10::optional<at::Tensor>& anchor,
                                double lr, double momentum, double weight_decay, double stem_coef,
                                bool nesterov, bool init_buffer, bool sign_grad) {
  check_update_args(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                    stem_coef, nesterov);
  const auto dtype = scores.scalar_type();
  const int64_t modules = scores.size(0), n = scores.numel() / modules;
  auto stem = at::zeros({modules}, scores.options().dtype(at::kDouble));
  const auto g = grad.contiguous();
  const auto a = anchor ? anchor->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "cotrain_sgd_step_cpu", [&] {
    with_flags(anchor.has_value(), init_buffer, nesterov, sign_grad, weight_decay != 0.0,
               [&](auto k_anchor, auto k_init, auto k_nesterov, auto k_sign, auto k_decay) {
      update<scalar_t, k_anchor.value, k_init.value, k_nesterov.value, k_sign.value,
             k_decay.value>(scores.data_ptr<scalar_t>(), momentum_buffer.data_ptr<scalar_t>(),
                            g.const_data_ptr<scalar_t>(),
                            anchor ? a.const_data_ptr<scalar_t>() : nullptr,
                            anchor && a.size(0) == 1 ? 0 : n, stem.data_ptr<double>(), modules, n,
                            lr, momentum, weight_decay, stem_coef);
    });
  });
  return stem;
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) { m.impl("cotrain_sgd_step_", &modsplit::cotrain_sgd_step_cpu); }
