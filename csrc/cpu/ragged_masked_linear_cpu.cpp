// ragged_masked_linear: K modules over one weight, module k on rows offsets[k] .. offsets[k+1]-1
// of the output, reading x[rows[t]] (decompose's sampled negatives: the work is the T rows the
// modules take, not K x the batch). CPU.
//
// The rows are gathered once into xs [T, I] (x itself without rows); module k's rows are then a
// contiguous slice, which the masked linear drivers (masked_linear_impl.h: bit walk, lane-mask
// GEMV, tiles + BLAS, chosen per module by its row count) run as a one-module problem. Modules
// run in parallel when there are enough of them to occupy the threads (each driver then runs on
// one thread: ATen's nested parallel_for is serial), else one after the other, each driver
// parallel inside. grad_x of gathered rows is scattered back with index_add (rows may repeat).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../checks.h"
#include "masked_linear_impl.h"

namespace modsplit {
namespace {

// Checks the arguments (each error names the argument) and returns T, the rows taken.
int64_t check_ragged_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                          const at::Tensor& offsets, const c10::optional<at::Tensor>& rows) {
  check_linear_args(x, weight, packed, 1);
  TORCH_CHECK(x.dim() == 2, "modsplit: x must be [R, in_features], got shape ", x.sizes());
  const int64_t K = packed.size(0);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == K + 1,
              "modsplit: offsets must be int64 [K+1=", K + 1, "], got ", offsets.scalar_type(),
              " ", offsets.sizes());
  check_same_device(offsets, x, "offsets", "x");
  int64_t T = x.size(0);
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1,
                "modsplit: rows must be an int64 vector, got ", rows->scalar_type(), " ",
                rows->sizes());
    check_same_device(*rows, x, "rows", "x");
    T = rows->size(0);
    const auto r = rows->contiguous();
    const int64_t* rp = r.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(rp[t] >= 0 && rp[t] < x.size(0), "modsplit: rows must lie in [0, ", x.size(0),
                  ") (the rows of x), got rows[", t, "] = ", rp[t]);
    }
  }
  const auto o = offsets.contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[K] == T, "modsplit: offsets must rise from 0 to ", T,
              " (the rows the modules take), got offsets[0] = ", op[0], ", offsets[K] = ", op[K]);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(op[k + 1] >= op[k], "modsplit: offsets must not decrease, got offsets[", k,
                "] = ", op[k], " > offsets[", k + 1, "] = ", op[k + 1]);
  }
  return T;
}

// The rows the modules read, [T, I] contiguous.
at::Tensor gathered(const at::Tensor& x, const c10::optional<at::Tensor>& rows) {
  return rows.has_value() ? x.index_select(0, *rows) : x.contiguous();
}

// fn(k, first row, row count) for every module with rows: in parallel over the modules when
// there are at least two per thread, else in order (each call parallel inside).
template <typename Fn>
void for_each_module(const at::Tensor& offsets, Fn fn) {
  const auto o = offsets.contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  const int64_t K = offsets.size(0) - 1;
  const auto body = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (op[k + 1] > op[k]) fn(k, op[k], op[k + 1] - op[k]);
    }
  };
  if (K >= 2 * at::get_num_threads()) {
    at::parallel_for(0, K, 1, body);
  } else {
    body(0, K);
  }
}

// Module k's rows as a one-module problem: x3 [1, n, C] and its mask p3 [1, O, words].
at::Tensor rows_of(const at::Tensor& v, int64_t first, int64_t n) {
  return v.narrow(0, first, n).unsqueeze(0);
}

// gs [K, O, I] <- (g_k^T xs_k) * W (zeros for a module without rows).
void grad_scores_all(const at::Tensor& g, const at::Tensor& xs, const at::Tensor& w,
                     const at::Tensor& p, const at::Tensor& offsets, at::Tensor& gs) {
  const auto o = offsets.contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < p.size(0); ++k) {
    if (op[k + 1] == op[k]) gs.select(0, k).zero_();
  }
  for_each_module(offsets, [&](int64_t k, int64_t first, int64_t n) {
    auto gsk = gs.narrow(0, k, 1);
    linear_impl::grad_scores_into(rows_of(g, first, n), rows_of(xs, first, n), w,
                                  p.narrow(0, k, 1), gsk);
  });
}

at::Tensor ragged_masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor& offsets,
                                    const c10::optional<at::Tensor>& rows,
                                    const c10::optional<at::Tensor>& bias) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_bias(bias, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xs = gathered(x, rows);
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  auto out = at::empty({T, w.size(0)}, w.options());
  for_each_module(offsets, [&](int64_t k, int64_t first, int64_t n) {
    out.narrow(0, first, n)
        .copy_(linear_impl::forward_impl(rows_of(xs, first, n), w, p.narrow(0, k, 1), bias)[0]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, const at::Tensor& offsets, const c10::optional<at::Tensor>& rows,
    std::array<bool, 3> output_mask) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T, weight.size(0)}),
              "modsplit: grad_out must have shape [", T, ", ", weight.size(0),
              "] (the forward output's), got ", grad_out.sizes());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xs = gathered(x, rows);
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  const auto g = grad_out.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    auto gx_rows = at::empty({T, w.size(1)}, w.options());  // every row is some module's
    for_each_module(offsets, [&](int64_t k, int64_t first, int64_t n) {
      auto parts = linear_impl::backward_impl(rows_of(g, first, n), rows_of(xs, first, n), w,
                                              p.narrow(0, k, 1), {true, false, false});
      gx_rows.narrow(0, first, n).copy_(std::get<0>(parts)[0]);
    });
    gx = rows.has_value() ? at::zeros_like(x, at::MemoryFormat::Contiguous)
                                .index_add_(0, *rows, gx_rows)
                          : gx_rows;
  }
  if (output_mask[1]) {
    gs = at::empty({p.size(0), w.size(0), w.size(1)}, w.options());
    grad_scores_all(g, xs, w, p, offsets, gs);
  }
  if (output_mask[2]) gb = g.sum(0);
  return {gx, gs, gb};
}

void ragged_masked_linear_grad_scores_cpu(at::Tensor& out, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& packed, const at::Tensor& offsets,
                                          const c10::optional<at::Tensor>& rows) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T, weight.size(0)}),
              "modsplit: grad_out must have shape [", T, ", ", weight.size(0),
              "] (the forward output's), got ", grad_out.sizes());
  check_same_device(out, weight, "out", "weight");
  check_same_dtype(out, weight, "out", "weight");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({packed.size(0), weight.size(0), weight.size(1)}),
              "modsplit: out must have shape [K, O, I] = ",
              at::IntArrayRef({packed.size(0), weight.size(0), weight.size(1)}), ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "modsplit: out must be contiguous (written in place)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  grad_scores_all(grad_out.contiguous(), gathered(x, rows), weight.contiguous(),
                  packed.contiguous(), offsets, out);
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("ragged_masked_linear", &modsplit::ragged_masked_linear_cpu);
  m.impl("ragged_masked_linear_backward", &modsplit::ragged_masked_linear_backward_cpu);
  m.impl("ragged_masked_linear_grad_scores_", &modsplit::ragged_masked_linear_grad_scores_cpu);
}
