// ragged_masked_linear: K modules over one weight, module k on rows offsets[k] .. offsets[k+1]-1
// of the output, reading x[rows[t]] (decompose's sampled negatives: the work is the T rows the
// modules take, not K x the batch). CPU.
//
// Each module takes its own path, chosen from its own rows only (so a module's result does not
// depend on the other modules of the call, e.g. on how distributed co-training shards them).
// A module of at most kFewRows rows (the sampled-negatives case: a few to a few tens) runs
// kernels of their own, with no tensor made per module:
//  * forward and grad_x (float32, where the module's source rows are finite and the walk wins
//    at its row count): the bit walk of masked_linear_kernels.h. The source rows of module k
//    (x[rows[t]], or grad_out's) are gathered into its own batch-transposed block [C, NP_k]
//    (NP_k = its rows rounded up to 8 lanes) of one buffer; one task per (module, output row)
//    walks the set bits of its mask row, skipping the columns where the module's rows are all
//    zero (exact for finite x and W). grad_x scatters into the module's transposed block (one
//    task per module), then transposes back.
//  * grad_scores (float32 and float64): one task per (module, output row o): the sum over the
//    module's rows of g[t, o] x[t, :] (rows with g[t, o] = 0 skipped where the module's x rows
//    are finite), times W[o, :].
// Any other module (other dtypes, non-finite sources, many rows) runs as a one-module problem
// of the masked linear drivers (masked_linear_impl.h: bit walk, lane-mask GEMV, tiles + BLAS),
// in parallel over those modules when there are at least two per thread.
// grad_x of gathered rows is scattered back with index_add (rows may repeat).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "finite.h"
#include "masked_linear_impl.h"
#include "masked_linear_kernels.h"

namespace modsplit {
namespace {

// Checks the arguments (each error names the argument), offsets' and rows' values included,
// and returns T, the rows taken.
int64_t check_ragged_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                          const at::Tensor& offsets, const c10::optional<at::Tensor>& rows) {
  const int64_t T = check_ragged_shapes(x, weight, packed, offsets, rows);
  check_ragged_values(x.size(0), offsets, rows, T);
  return T;
}

void check_grad_rows(const at::Tensor& grad_out, const at::Tensor& weight, int64_t T) {
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({T, weight.size(0)}),
              "modsplit: grad_out must have shape [", T, ", ", weight.size(0),
              "] (the forward output's), got ", grad_out.sizes());
}

using cpu::v8f;

// Modules of at most kFewRows rows run the kernels of their own.
constexpr int64_t kFewRows = 64;
constexpr int64_t kFewScoreRows = 16;
constexpr int64_t kBlockRows = cpu::kMaxVecs * cpu::kLanes;  // rows per walk block

int64_t lanes_for(int64_t n) { return (n + cpu::kLanes - 1) / cpu::kLanes * cpu::kLanes; }

// Where each module's rows sit: module k's rows are t in [first(k), first(k) + count(k)), its
// batch-transposed block of a C-column source starts at C * base[k] and is [C, lanes[k]]; own[k]:
// the module runs the kernels of their own (set by the caller).
struct Layout {
  const int64_t* off;
  int64_t K;
  std::vector<int64_t> lanes, base;  // lanes[k] = count rounded up to 8 lanes; base: prefix sums
  std::vector<char> own;

  explicit Layout(const at::Tensor& offsets)
      : off(offsets.const_data_ptr<int64_t>()), K(offsets.size(0) - 1), lanes(K), base(K + 1, 0),
        own(K, 0) {
    for (int64_t k = 0; k < K; ++k) {
      lanes[k] = lanes_for(count(k));
      base[k + 1] = base[k] + lanes[k];
    }
  }
  int64_t first(int64_t k) const { return off[k]; }
  int64_t count(int64_t k) const { return off[k + 1] - off[k]; }
  bool any_own() const { return std::find(own.begin(), own.end(), 1) != own.end(); }
  bool any_other() const {  // a module with rows that the drivers run
    for (int64_t k = 0; k < K; ++k) {
      if (!own[k] && count(k) > 0) return true;
    }
    return false;
  }
};

// Per module: whether all its source rows (src[rows[t]], or src[t]) are finite. float32 /
// float64 src [*, C]; other dtypes: false.
std::vector<char> finite_modules(const at::Tensor& src, const int64_t* rows, const Layout& L) {
  std::vector<char> out(L.K, 0);
  if (src.scalar_type() != at::kFloat && src.scalar_type() != at::kDouble) return out;
  const int64_t C = src.size(1);
  std::vector<char> row_ok(src.size(0));
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "finite_rows", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < src.size(0); ++r) row_ok[r] = cpu::finite_values(sp + r * C, C);
  });
  for (int64_t k = 0; k < L.K; ++k) {
    bool ok = true;
    for (int64_t t = L.first(k); ok && t < L.first(k) + L.count(k); ++t) {
      ok = row_ok[rows ? rows[t] : t];
    }
    out[k] = ok;
  }
  return out;
}

// own[k] for the bit walk (forward from x, grad_x from grad_out): float32, I > 0, at most
// kFewRows rows, finite source rows, and the walk beats tiles + BLAS at the module's rows.
void choose_walk(Layout& L, const at::Tensor& src, const int64_t* rows, const at::Tensor& w,
                 const at::Tensor& p) {
  if (w.scalar_type() != at::kFloat || w.size(1) == 0 || w.size(0) == 0) return;
  const auto finite = finite_modules(src, rows, L);
  for (int64_t k = 0; k < L.K; ++k) {
    L.own[k] = L.count(k) > 0 && L.count(k) <= kFewRows && finite[k] &&
               linear_impl::walk_wins(w, p, k, L.count(k));
  }
}

// A float buffer of at least n elements, 32-byte aligned, kept by the calling thread between
// calls (slot 0 or 1): a buffer of hundreds of KB taken from malloc on every call would be
// mapped and page-faulted afresh each time (glibc serves it with mmap). Its contents are left
// as they are.
float* scratch(int slot, int64_t n) {
  static thread_local std::vector<v8f> buffers[2];
  auto& b = buffers[slot];
  const auto vecs = static_cast<size_t>((n + cpu::kLanes - 1) / cpu::kLanes);
  if (b.size() < vecs) b.resize(vecs);
  return reinterpret_cast<float*>(b.data());
}

// Blocks of the own modules' rows of src float [*, C] (row t of module k is src[rows[t]], or
// src[t]) in scratch slot `slot`: module k's block [C, lanes[k]] at C * base[k], 32-byte
// aligned, the lanes past its rows zero. keep (if not null): [K, words] bits of the columns
// where some row of the module is not +-0 (a NaN counts). Column by column: the writes are
// contiguous, the module's rows are read in step.
float* module_blocks(const at::Tensor& src, const int64_t* rows, const Layout& L,
                     std::vector<uint32_t>* keep, int slot) {
  const int64_t C = src.size(1), words = (C + 31) / 32;
  float* bp = scratch(slot, C * L.base[L.K]);
  const float* sp = src.const_data_ptr<float>();
  if (keep) keep->assign(L.K * words, 0u);
  at::parallel_for(0, L.K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<const uint32_t*> row;
    for (int64_t k = k0; k < k1; ++k) {
      if (!L.own[k]) continue;
      const int64_t n_k = L.count(k), np = L.lanes[k];
      row.resize(n_k);
      for (int64_t n = 0; n < n_k; ++n) {
        const int64_t t = L.first(k) + n;
        row[n] = reinterpret_cast<const uint32_t*>(sp + (rows ? rows[t] : t) * C);
      }
      auto* blk = reinterpret_cast<uint32_t*>(bp + C * L.base[k]);
      uint32_t* bits = keep ? keep->data() + k * words : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        uint32_t* dst = blk + c * np;
        uint32_t any = 0;
        for (int64_t n = 0; n < n_k; ++n) {
          dst[n] = row[n][c];
          any |= dst[n] & 0x7fffffffu;
        }
        for (int64_t n = n_k; n < np; ++n) dst[n] = 0u;
        if (bits && any) bits[c >> 5] |= 1u << (c & 31);
      }
    }
  });
  return bp;
}

uint32_t last_word_bits(int64_t I) { return (I % 32 == 0) ? ~0u : (1u << (I % 32)) - 1u; }

// out rows of the own modules = their rows of x (W*M_k)^T + bias; float32.
void walk_forward(const at::Tensor& x, const int64_t* rows, const at::Tensor& w,
                  const at::Tensor& p, const c10::optional<at::Tensor>& bias, const Layout& L,
                  at::Tensor& out) {
  const int64_t O = w.size(0), I = w.size(1), words = p.size(2);
  const bool skip = cpu::all_finite(w);  // zero columns add exactly +-0 only for a finite W
  std::vector<uint32_t> keep;
  const float* xp = module_blocks(x, rows, L, skip ? &keep : nullptr, 0);
  const float* wp = w.const_data_ptr<float>();
  const auto* pp = reinterpret_cast<const uint32_t*>(p.const_data_ptr<int32_t>());
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const uint32_t last = last_word_bits(I);
  at::parallel_for(0, L.K * O, std::max<int64_t>(1, O / 4), [&](int64_t i0, int64_t i1) {
    v8f acc[cpu::kMaxVecs];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t k = item / O, o = item % O, n_k = L.count(k);
      if (!L.own[k]) continue;
      const cpu::MaskRow row{pp + (k * O + o) * words, words, last,
                             skip ? keep.data() + k * words : nullptr};
      const float* xs = xp + I * L.base[k];
      const float b = bp ? bp[o] : 0.f;
      for (int64_t n0 = 0; n0 < n_k; n0 += kBlockRows) {
        const int64_t nb = std::min<int64_t>(n_k - n0, kBlockRows);
        cpu::dispatch_vecs(static_cast<int>((nb + cpu::kLanes - 1) / cpu::kLanes), [&](auto vc) {
          cpu::gather_axpy<decltype(vc)::value>(wp + o * I, row, xs + n0, L.lanes[k], acc);
        });
        for (int64_t n = 0; n < nb; ++n) {
          op[(L.first(k) + n0 + n) * O + o] = acc[n / cpu::kLanes][n % cpu::kLanes] + b;
        }
      }
    }
  });
}

// gx rows of the own modules = their rows of g (W*M_k); float32, gx [T, I].
void walk_grad_x(const at::Tensor& g, const at::Tensor& w, const at::Tensor& p, const Layout& L,
                 at::Tensor& gx) {
  const int64_t O = w.size(0), I = w.size(1), words = p.size(2);
  const float* gp = module_blocks(g, nullptr, L, nullptr, 0);  // blocks [O, lanes]
  float* gxp = scratch(1, I * L.base[L.K]);                      // blocks [I, lanes]
  float* dst = gx.mutable_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const auto* pp = reinterpret_cast<const uint32_t*>(p.const_data_ptr<int32_t>());
  const uint32_t last = last_word_bits(I);
  at::parallel_for(0, L.K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (!L.own[k]) continue;
      const int64_t n_k = L.count(k), np = L.lanes[k];
      float* blk = gxp + I * L.base[k];
      std::fill(blk, blk + I * np, 0.f);
      for (int64_t o = 0; o < O; ++o) {
        const cpu::MaskRow row{pp + (k * O + o) * words, words, last};
        for (int64_t n0 = 0; n0 < n_k; n0 += kBlockRows) {
          const int64_t nb = std::min<int64_t>(n_k - n0, kBlockRows);
          const auto* gv = reinterpret_cast<const v8f*>(gp + O * L.base[k] + o * np + n0);
          cpu::dispatch_vecs(static_cast<int>((nb + cpu::kLanes - 1) / cpu::kLanes),
                             [&](auto vc) {
            cpu::scatter_axpy<decltype(vc)::value>(wp + o * I, row, 0, words, gv, blk + n0, np);
          });
        }
      }
      for (int64_t n = 0; n < n_k; ++n) {
        float* out_row = dst + (L.first(k) + n) * I;
        for (int64_t i = 0; i < I; ++i) out_row[i] = blk[i * np + n];
      }
    }
  });
}

// One pass over a row of gs: dst = ((kFirst ? 0 : dst) + sum of N coef[r] * src[r]) times W's
// row when kLast. Four rows are summed first and then added; fewer are added one by one (the
// order of the arithmetic is fixed, so results do not depend on the row's path).
template <typename T, int N, bool kFirst, bool kLast>
void score_row_pass(T* dst, const T* const* src, const T* coef, const T* wr, int64_t I) {
  for (int64_t i = 0; i < I; ++i) {
    T v = kFirst ? T(0) : dst[i];
    if constexpr (N == 4) {
      v = v + (coef[0] * src[0][i] + coef[1] * src[1][i] + coef[2] * src[2][i] +
               coef[3] * src[3][i]);
    } else {
      for (int r = 0; r < N; ++r) v += coef[r] * src[r][i];
    }
    if constexpr (kLast) v *= wr[i];
    dst[i] = v;
  }
}

template <typename T, int N>
void score_rows(T* dst, const T* const* src, const T* coef, const T* wr, int64_t I, bool first,
                bool last) {
  if (first && last) score_row_pass<T, N, true, true>(dst, src, coef, wr, I);
  else if (first) score_row_pass<T, N, true, false>(dst, src, coef, wr, I);
  else if (last) score_row_pass<T, N, false, true>(dst, src, coef, wr, I);
  else score_row_pass<T, N, false, false>(dst, src, coef, wr, I);
}

// gs[k] = (g_k^T x_k) * W for the own modules (at most kFewRows rows each), every element
// written; float32 / float64. A row of gs is written in one pass per four of the module's rows
// (one pass in all for a module of at most four, the common case of sampled negatives), its
// first pass writing and its last multiplying by W. skip_zero[k]: rows with g[t, o] = 0 are
// left out (only where the module's x rows are finite: 0 * inf must stay NaN).
template <typename T>
void loop_grad_scores(const T* g, const T* x, const int64_t* rows, const T* w, const Layout& L,
                      const std::vector<char>& skip_zero, int64_t O, int64_t I, T* gs) {
  at::parallel_for(0, L.K * O, std::max<int64_t>(1, O / 4), [&](int64_t i0, int64_t i1) {
    const T* src[kFewRows];
    T coef[kFewRows];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t k = item / O, o = item % O;
      if (!L.own[k]) continue;
      T* dst = gs + item * I;
      const T* wr = w + o * I;
      int n = 0;
      for (int64_t t = L.first(k); t < L.first(k) + L.count(k); ++t) {
        const T s = g[t * O + o];
        if (skip_zero[k] && s == T(0)) continue;
        src[n] = x + (rows ? rows[t] : t) * I;
        coef[n++] = s;
      }
      if (n == 0) {  // the empty sum times W
        for (int64_t i = 0; i < I; ++i) dst[i] = T(0) * wr[i];
        continue;
      }
      for (int r0 = 0; r0 < n; r0 += 4) {
        const int m = std::min(4, n - r0);
        const bool first = r0 == 0, last = r0 + m == n;
        switch (m) {
          case 1: score_rows<T, 1>(dst, src + r0, coef + r0, wr, I, first, last); break;
          case 2: score_rows<T, 2>(dst, src + r0, coef + r0, wr, I, first, last); break;
          case 3: score_rows<T, 3>(dst, src + r0, coef + r0, wr, I, first, last); break;
          default: score_rows<T, 4>(dst, src + r0, coef + r0, wr, I, first, last); break;
        }
      }
    }
  });
}

// The rows the modules read, [T, I] contiguous.
at::Tensor gathered(const at::Tensor& x, const c10::optional<at::Tensor>& rows) {
  return rows.has_value() ? x.index_select(0, *rows) : x.contiguous();
}

const int64_t* row_ptr(const c10::optional<at::Tensor>& rows, at::Tensor& keep) {
  if (!rows.has_value()) return nullptr;
  keep = rows->contiguous();
  return keep.const_data_ptr<int64_t>();
}

// fn(k, first row, row count) for every module with rows that L does not own: in parallel over
// them when there are at least two per thread, else in order (each call parallel inside).
template <typename Fn>
void for_other_modules(const Layout& L, Fn fn) {
  std::vector<int64_t> ks;
  for (int64_t k = 0; k < L.K; ++k) {
    if (!L.own[k] && L.count(k) > 0) ks.push_back(k);
  }
  const auto body = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fn(ks[i], L.first(ks[i]), L.count(ks[i]));
  };
  const auto n = static_cast<int64_t>(ks.size());
  if (n >= 2 * at::get_num_threads()) {
    at::parallel_for(0, n, 1, body);
  } else {
    body(0, n);
  }
}

// Module k's rows as a one-module problem of the drivers: [1, n, C].
at::Tensor rows_of(const at::Tensor& v, int64_t first, int64_t n) {
  return v.narrow(0, first, n).unsqueeze(0);
}

// gs [K, O, I] <- (g_k^T x_k) * W, every element written (0 * W for a module without rows, as
// the product of its empty sums).
void grad_scores_into(const at::Tensor& g, const at::Tensor& x,
                      const c10::optional<at::Tensor>& rows, const at::Tensor& w,
                      const at::Tensor& offs, at::Tensor& gs) {
  Layout L(offs);
  at::Tensor rkeep;
  const int64_t* rp = row_ptr(rows, rkeep);
  for (int64_t k = 0; k < L.K; ++k) {
    L.own[k] = L.count(k) <= kFewScoreRows &&
               (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble);
  }
  if (L.any_own()) {
    const auto skip_zero = finite_modules(x, rp, L);
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "ragged_grad_scores", [&] {
      loop_grad_scores<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rp,
                                 w.const_data_ptr<scalar_t>(), L, skip_zero, w.size(0),
                                 w.size(1), gs.mutable_data_ptr<scalar_t>());
    });
  }
  for (int64_t k = 0; k < L.K; ++k) {
    if (!L.own[k] && L.count(k) == 0) gs.select(0, k).copy_(w).mul_(0);
  }
  if (!L.any_other()) return;
  const auto xs = gathered(x, rows);
  for_other_modules(L, [&](int64_t k, int64_t first, int64_t n) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads start in grad mode
    auto gsk = gs.select(0, k);
    linear_impl::grad_scores_gemm(g.narrow(0, first, n).t().contiguous(), xs.narrow(0, first, n),
                                  w, gsk);
  });
}

at::Tensor ragged_masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor& offsets,
                                    const c10::optional<at::Tensor>& rows,
                                    const c10::optional<at::Tensor>& bias) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_bias(bias, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  const auto offs = offsets.contiguous();
  const c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
  auto out = at::empty({T, w.size(0)}, w.options());
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous();
  at::Tensor rkeep;
  const int64_t* rp = row_ptr(rows, rkeep);
  Layout L(offs);
  choose_walk(L, xc, rp, w, p);
  if (L.any_own()) walk_forward(xc, rp, w, p, b, L, out);
  if (!L.any_other()) return out;
  const auto xs = gathered(xc, rows);
  for_other_modules(L, [&](int64_t k, int64_t first, int64_t n) {
    out.narrow(0, first, n)
        .copy_(linear_impl::forward_impl(rows_of(xs, first, n), w, p.narrow(0, k, 1), b)[0]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, const at::Tensor& offsets, const c10::optional<at::Tensor>& rows,
    std::array<bool, 3> output_mask) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_grad_rows(grad_out, weight, T);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto xc = x.contiguous();
  const auto w = weight.contiguous();
  const auto p = packed.contiguous();
  const auto g = grad_out.contiguous();
  const auto offs = offsets.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    auto gx_rows = at::empty({T, w.size(1)}, w.options());  // every row is some module's
    if (T > 0 && w.size(1) > 0) {
      Layout L(offs);
      choose_walk(L, g, nullptr, w, p);
      if (L.any_own()) walk_grad_x(g, w, p, L, gx_rows);
      const auto xs = L.any_other() ? gathered(xc, rows) : at::Tensor();
      for_other_modules(L, [&](int64_t k, int64_t first, int64_t n) {
        auto parts = linear_impl::backward_impl(rows_of(g, first, n), rows_of(xs, first, n), w,
                                                p.narrow(0, k, 1), {true, false, false});
        gx_rows.narrow(0, first, n).copy_(std::get<0>(parts)[0]);
      });
    }
    gx = rows.has_value() ? at::zeros_like(xc).index_add_(0, *rows, gx_rows) : gx_rows;
  }
  if (output_mask[1]) {
    gs = at::empty({p.size(0), w.size(0), w.size(1)}, w.options());
    grad_scores_into(g, xc, rows, w, offs, gs);
  }
  if (output_mask[2]) gb = g.sum(0);
  return {gx, gs, gb};
}

void ragged_masked_linear_grad_scores_cpu(at::Tensor& out, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& packed, const at::Tensor& offsets,
                                          const c10::optional<at::Tensor>& rows) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_grad_rows(grad_out, weight, T);
  check_same_device(out, weight, "out", "weight");
  check_same_dtype(out, weight, "out", "weight");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({packed.size(0), weight.size(0), weight.size(1)}),
              "modsplit: out must have shape [K, O, I] = ",
              at::IntArrayRef({packed.size(0), weight.size(0), weight.size(1)}), ", got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "modsplit: out must be contiguous (written in place)");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  grad_scores_into(grad_out.contiguous(), x.contiguous(), rows, weight.contiguous(),
                   offsets.contiguous(), out);
}

}  // namespace
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("ragged_masked_linear", &modsplit::ragged_masked_linear_cpu);
  m.impl("ragged_masked_linear_backward", &modsplit::ragged_masked_linear_backward_cpu);
  m.impl("ragged_masked_linear_grad_scores_", &modsplit::ragged_masked_linear_grad_scores_cpu);
}
