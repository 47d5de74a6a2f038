// masked_linear / multi_masked_linear forward and backward on the CPU. W*M is never formed whole.
//
// Every op is brought to one problem: K modules (masks packed int32 [K, O, words]) over one
// weight [O, I], sources x3 [S, N, I] with S = 1 (shared input, or the single-module op) or K,
// output [K, N, O]. Two strategies:
//  * bit walk (float32 only, masked_linear_kernels.h): per weight row, loop over the set bits of
//    every module's mask row and axpy W[o, j] with a batch-transposed row of x (forward) or into
//    a batch-transposed row of grad_x (backward). Cost ~ kept weights x batch; W is read once per
//    row for all K modules. Used for small batches and sparse masks.
//  * tiles (every dtype): unpack a tile of W*M rows (forward) or columns (grad_x) into a
//    thread-local buffer and hand it to at::mm / at::addmm writing into the output slice.
// grad_scores = (g^T x) * W is dense by contract: tiles of g^T x via at::mm, multiplied by the
// matching W tile while it is still in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../checks.h"
#include "finite.h"
#include "masked_linear_impl.h"
#include "masked_linear_kernels.h"
#include "masked_linear_small.h"

namespace modsplit {
namespace {

using cpu::v8f;

constexpr int64_t kTileBytes = int64_t(2) << 20;  // unpacked W*M tile per thread (~L2)
constexpr int64_t kScoreTileBytes = int64_t(256) << 10;  // grad_scores rows tile per thread
// float32 batches of at most kGemvRows rows per module take the lane-mask GEMV.
constexpr int64_t kGemvRows = 4;
// Bit walk vs tiles + BLAS, float32: the bit walk wins for any density at batches up to
// kWalkAlwaysRows, and at larger batches while the (sampled) mask density is at most kWalkDensity.
constexpr int64_t kWalkAlwaysRows = 16;
constexpr double kWalkDensity = 0.5;

// Banks of at most kSmallElems weights over all modules (small layers, e.g. a classifier head)
// unpack W*M for every module at once and run one batched BLAS call per product: fewer calls
// than tiles, and no walk set-up.
constexpr int64_t kSmallElems = int64_t(1) << 16;
// ... unless float32 masks keep at most this share of the weights (sparse_small).
constexpr double kSmallWalkDensity = 0.25;

// Multiply-adds below which a loop runs on one thread (OpenMP start-up and barriers cost more).
constexpr int64_t kParallelWork = int64_t(1) << 18;

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for grain: enough items that a task does at least kParallelWork multiply-adds.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(work_per_item, 1));
}


// x [K, *, I] when not shared: checks the module dim.
void check_module_dim(const at::Tensor& x, int64_t K, bool shared_input) {
  TORCH_CHECK(shared_input || (x.dim() >= 2 && x.size(0) == K), "modsplit: x must be [K=", K,
              ", ..., in_features] when shared_input=False, got shape ", x.sizes());
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weight,
                    at::IntArrayRef expected) {
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.sizes() == expected, "modsplit: grad_out must have shape ", expected,
              " (the forward output's), got ", grad_out.sizes());
}

// Output shape [lead..., batch..., O] with batch = x's dims between `skip` leading dims and I.
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t skip, c10::optional<int64_t> lead,
                               int64_t O) {
  std::vector<int64_t> shape;
  if (lead) shape.push_back(*lead);
  shape.insert(shape.end(), x.sizes().begin() + skip, x.sizes().end() - 1);
  shape.push_back(O);
  return shape;
}

uint32_t last_word_mask(int64_t I) {
  return I % 32 == 0 ? ~0u : (1u << (I % 32)) - 1u;
}

// Fraction of kept weights over up to 256 evenly spaced rows of p3 int32 [K, O, words].
double sampled_density(const at::Tensor& p3, int64_t I) {
  const int64_t rows = p3.size(0) * p3.size(1), words = p3.size(2);
  if (rows == 0 || I == 0) return 0.0;
  const int64_t step = std::max<int64_t>(1, rows / 256);
  const auto* p = reinterpret_cast<const uint32_t*>(p3.data_ptr<int32_t>());
  const uint32_t last = last_word_mask(I);
  int64_t bits = 0, seen = 0;
  for (int64_t r = 0; r < rows; r += step, ++seen) {
    for (int64_t w = 0; w < words; ++w) {
      bits += __builtin_popcount(w + 1 == words ? p[r * words + w] & last : p[r * words + w]);
    }
  }
  return static_cast<double>(bits) / static_cast<double>(seen * I);
}

bool use_bit_walk(const at::Tensor& w, const at::Tensor& p3, int64_t rows) {
  if (w.scalar_type() != at::kFloat) return false;
  return rows <= kWalkAlwaysRows || sampled_density(p3, w.size(1)) <= kWalkDensity;
}

// ---- bit walk (float32) ------------------------------------------------------------------

// src [B, N, C] float -> [B, C, NP] float, zero-padded to NP = round_up(N, 8) columns.
at::Tensor batch_transposed(const at::Tensor& src) {
  const int64_t NP = round_up(std::max<int64_t>(src.size(1), 1), cpu::kLanes);
  auto t = at::zeros({src.size(0), src.size(2), NP}, src.options());
  t.narrow(2, 0, src.size(1)).copy_(src.transpose(1, 2));
  return t;
}

// Per source s of xt float [S, I, NP] (batch-transposed x): bit j of word j / 32 is set iff row
// j holds a value other than +-0 (a NaN counts): the columns of x a product with x needs.
// Returns [S * words]; bits at or past I stay clear.
std::vector<uint32_t> nonzero_column_bits(const at::Tensor& xt, int64_t words) {
  const int64_t S = xt.size(0), I = xt.size(1), NP = xt.size(2);
  std::vector<uint32_t> bits(S * words, 0u);
  const auto* xp = reinterpret_cast<const uint32_t*>(xt.const_data_ptr<float>());
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < I; ++j) {
      const uint32_t* row = xp + (s * I + j) * NP;
      uint32_t any = 0;
      for (int64_t n = 0; n < NP; ++n) any |= row[n] & 0x7fffffffu;
      if (any) bits[s * words + (j >> 5)] |= 1u << (j & 31);
    }
  }
  return bits;
}

// out3 [K, N, O] = x3 [S, N, I] (W*M_k)^T + bias; float32, contiguous, small N.
void forward_gemv(const at::Tensor& x3, const at::Tensor& w, const at::Tensor& p3,
                  const c10::optional<at::Tensor>& bias, at::Tensor& out3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1), words = p3.size(2);
  const int64_t N = x3.size(1), pairs = K * N;
  const bool shared = x3.size(0) == 1;
  const float* xp = x3.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const auto* pp = reinterpret_cast<const uint8_t*>(p3.data_ptr<int32_t>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out3.data_ptr<float>();
  at::parallel_for(0, O, grain_for(pairs * I), [&](int64_t o0, int64_t o1) {
    const uint8_t* masks[cpu::kMaxVecs];
    const float* xs[cpu::kMaxVecs];
    float dots[cpu::kMaxVecs];
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t q0 = 0; q0 < pairs; q0 += cpu::kMaxVecs) {  // pair q = (module k, row n)
        const int64_t nq = std::min<int64_t>(pairs - q0, cpu::kMaxVecs);
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t k = (q0 + q) / N, n = (q0 + q) % N;
          masks[q] = pp + (k * O + o) * words * 4;
          xs[q] = xp + ((shared ? 0 : k) * N + n) * I;
        }
        cpu::dispatch_vecs(static_cast<int>(nq), [&](auto pc) {
          cpu::lane_mask_dots<decltype(pc)::value>(wp + o * I, I, masks, xs, dots);
        });
        for (int64_t q = 0; q < nq; ++q) op[(q0 + q) * O + o] = dots[q] + (bp ? bp[o] : 0.f);
      }
    }
  });
}

// out3 [K, N, O] = x3 [S, N, I] (W*M_k)^T + bias; float32, contiguous.
void forward_bit_walk(const at::Tensor& x3, const at::Tensor& w, const at::Tensor& p3,
                      const c10::optional<at::Tensor>& bias, at::Tensor& out3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1), words = p3.size(2);
  const int64_t N = x3.size(1);
  const bool shared = x3.size(0) == 1;
  const auto xt = batch_transposed(x3);  // [S, I, NP]
  const int64_t NP = xt.size(2);
  // Columns where the source is zero add nothing (x is finite here; with W finite too, each
  // such term is exactly +-0): the walk skips them, e.g. an image's blank border.
  const auto keep = cpu::all_finite(w) ? nonzero_column_bits(xt, words) : std::vector<uint32_t>();
  const float* xp = xt.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const auto* pp = reinterpret_cast<const uint32_t*>(p3.data_ptr<int32_t>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out3.data_ptr<float>();
  const uint32_t last = last_word_mask(I);
  at::parallel_for(0, O, grain_for(K * I * NP), [&](int64_t o0, int64_t o1) {
    v8f acc[cpu::kMaxVecs];
    for (int64_t o = o0; o < o1; ++o) {
      const float b = bp ? bp[o] : 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t* kept_cols = keep.empty() ? nullptr : keep.data() + (shared ? 0 : k) * words;
        const cpu::MaskRow row{pp + (k * O + o) * words, words, last, kept_cols};
        const float* xs = xp + (shared ? 0 : k) * I * NP;
        for (int64_t n0 = 0; n0 < N; n0 += cpu::kMaxVecs * cpu::kLanes) {
          const int64_t nb = std::min<int64_t>(N - n0, cpu::kMaxVecs * cpu::kLanes);
          cpu::dispatch_vecs(static_cast<int>(ceil_div(nb, cpu::kLanes)), [&](auto vc) {
            cpu::gather_axpy<decltype(vc)::value>(wp + o * I, row, xs + n0, NP, acc);
          });
          for (int64_t n = 0; n < nb; ++n) {
            op[(k * N + n0 + n) * O + o] = acc[n / cpu::kLanes][n % cpu::kLanes] + b;
          }
        }
      }
    }
  });
}

// gx3 [S, N, I] = sum over modules k feeding source s of g3[k] (W*M_k); float32, contiguous.
void grad_x_bit_walk(const at::Tensor& g3, const at::Tensor& w, const at::Tensor& p3,
                     at::Tensor& gx3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1), words = p3.size(2);
  const int64_t N = g3.size(1), S = gx3.size(0);
  const auto gt = batch_transposed(g3);  // [K, O, NP]
  const int64_t NP = gt.size(2);
  auto gxt = at::zeros({S, I, NP}, w.options());
  const float* gp = gt.data_ptr<float>();
  float* gxp = gxt.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const auto* pp = reinterpret_cast<const uint32_t*>(p3.data_ptr<int32_t>());
  const uint32_t last = last_word_mask(I);
  // Each task owns a range of mask words, i.e. of grad_x columns: no two tasks write a row.
  const int64_t chunk = std::max<int64_t>(1, ceil_div(words, 4 * at::get_num_threads()));
  at::parallel_for(0, ceil_div(words, chunk), grain_for(O * K * chunk * 32 * NP),
                   [&](int64_t c0, int64_t c1) {
    const int64_t w0 = c0 * chunk, w1 = std::min(words, c1 * chunk);
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t k = 0; k < K; ++k) {
        const cpu::MaskRow row{pp + (k * O + o) * words, words, last};
        float* dst = gxp + (S == 1 ? 0 : k) * I * NP;
        for (int64_t n0 = 0; n0 < N; n0 += cpu::kMaxVecs * cpu::kLanes) {
          const int64_t nb = std::min<int64_t>(N - n0, cpu::kMaxVecs * cpu::kLanes);
          const auto* g = reinterpret_cast<const v8f*>(gp + (k * O + o) * NP + n0);
          cpu::dispatch_vecs(static_cast<int>(ceil_div(nb, cpu::kLanes)), [&](auto vc) {
            cpu::scatter_axpy<decltype(vc)::value>(wp + o * I, row, w0, w1, g, dst + n0, NP);
          });
        }
      }
    }
  });
  gx3.copy_(gxt.narrow(2, 0, N).transpose(1, 2));
}

// ---- tiles + BLAS (every floating dtype) ---------------------------------------------------

// buf [r1 - r0, c1 - c0] = (W*M)[r0:r1, c0:c1]; w [O, I], p [O, words] of one module.
template <typename T>
void unpack_tile(const T* w, const uint32_t* p, int64_t I, int64_t words, int64_t r0, int64_t r1,
                 int64_t c0, int64_t c1, T* buf) {
  const int64_t cols = c1 - c0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * I;
    const uint32_t* pr = p + r * words;
    T* br = buf + (r - r0) * cols;
    for (int64_t c = c0; c < c1; ++c) {
      br[c - c0] = ((pr[c >> 5] >> (c & 31)) & 1u) ? wr[c] : T(0);
    }
  }
}

void unpack_tile(const at::Tensor& w, const at::Tensor& p3, int64_t k, int64_t r0, int64_t r1,
                 int64_t c0, int64_t c1, at::Tensor& buf) {
  const int64_t O = w.size(0), I = w.size(1), words = p3.size(2);
  const auto* p = reinterpret_cast<const uint32_t*>(p3.data_ptr<int32_t>()) + k * O * words;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "unpack_tile", [&] {
    unpack_tile<scalar_t>(w.data_ptr<scalar_t>(), p, I, words, r0, r1, c0, c1,
                          buf.data_ptr<scalar_t>());
  });
}

// Rows per tile so that a [rows, cols] tile takes about `bytes`, at least 1 tile per thread.
int64_t tile_rows(int64_t rows, int64_t cols, int64_t elem, int64_t bytes, int64_t align) {
  const int64_t by_bytes = std::max<int64_t>(align, bytes / std::max<int64_t>(cols * elem, 1));
  const int64_t per_thread = round_up(ceil_div(rows, at::get_num_threads()), align);
  return std::max<int64_t>(1, std::min({by_bytes / align * align, per_thread, round_up(rows, align)}));
}

// out3 [K, N, O] = x3 [S, N, I] (W*M_k)^T + bias, tiles of W*M rows.
void forward_tiled(const at::Tensor& x3, const at::Tensor& w, const at::Tensor& p3,
                   const c10::optional<at::Tensor>& bias, at::Tensor& out3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1);
  const bool shared = x3.size(0) == 1;
  const int64_t T = tile_rows(O, I, w.element_size(), kTileBytes, 16);
  const int64_t grain = grain_for(K * T * I * x3.size(1));
  at::parallel_for(0, ceil_div(O, T), grain, [&](int64_t t0, int64_t t1) {
    // Worker threads start with grad mode on: keep ATen calls below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto buf = at::empty({T, I}, w.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * T, rows = std::min(T, O - o0);
      auto tile = buf.narrow(0, 0, rows);
      for (int64_t k = 0; k < K; ++k) {
        unpack_tile(w, p3, k, o0, o0 + rows, 0, I, tile);
        auto dst = out3.select(0, k).narrow(1, o0, rows);
        const auto xs = x3.select(0, shared ? 0 : k);
        if (bias) {
          at::addmm_out(dst, bias->narrow(0, o0, rows), xs, tile.t());
        } else {
          at::mm_out(dst, xs, tile.t());
        }
      }
    }
  });
}

// gx3 [S, N, I] = sum over modules k feeding source s of g3[k] (W*M_k), tiles of W*M columns.
void grad_x_tiled(const at::Tensor& g3, const at::Tensor& w, const at::Tensor& p3,
                  at::Tensor& gx3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1);
  const bool shared = gx3.size(0) == 1;
  const int64_t T = tile_rows(I, O, w.element_size(), kTileBytes, 32);
  const int64_t grain = grain_for(K * T * O * g3.size(1));
  at::parallel_for(0, ceil_div(I, T), grain, [&](int64_t t0, int64_t t1) {
    // Worker threads start with grad mode on: keep ATen calls below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto buf = at::empty({O * T}, w.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * T, cols = std::min(T, I - c0);
      auto tile = buf.narrow(0, 0, O * cols).view({O, cols});
      for (int64_t k = 0; k < K; ++k) {
        unpack_tile(w, p3, k, 0, O, c0, c0 + cols, tile);
        auto dst = gx3.select(0, shared ? 0 : k).narrow(1, c0, cols);
        if (shared && k > 0) {
          dst.addmm_(g3.select(0, k), tile);
        } else {
          at::mm_out(dst, g3.select(0, k), tile);
        }
      }
    }
  });
}

// gs [K, O, I] = (g3[k]^T x3[s]) * W, tiles of rows.
// Runs [start, start + length) of the columns of x [N, I] that hold a value other than +-0 (a
// NaN counts); kept = their total width.
template <typename T>
std::vector<std::pair<int64_t, int64_t>> nonzero_column_runs(const T* x, int64_t N, int64_t I,
                                                             int64_t& kept) {
  std::vector<uint8_t> any(I, 0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < I; ++j) any[j] |= static_cast<uint8_t>(x[n * I + j] != T(0));
  }
  std::vector<std::pair<int64_t, int64_t>> runs;
  kept = 0;
  for (int64_t j = 0; j < I;) {
    if (!any[j]) { ++j; continue; }
    const int64_t a = j;
    while (j < I && any[j]) ++j;
    runs.emplace_back(a, j - a);
    kept += j - a;
  }
  return runs;
}

// Rows [r0, r1) of gs [K*O, I]: the compacted product tmp [K*O, ld] (kept columns used) times
// W back in the columns of `runs`, zero elsewhere. tmp's rows hold 8 readable values past `kept`
// (any values: what they give is overwritten).
// float32 takes whole 8-lane vectors per run. A run's last vector may spill past it; the
// spilled lanes are overwritten by the zeros of the gap after it or by the next run (a row is
// written left to right to its end), and a run whose last vector would pass the row's end ends
// in scalars, so nothing is written (or read from W) past the row.
template <typename T>
void expand_columns(const T* tmp, int64_t ld, const T* w, int64_t O, int64_t I,
                    const std::vector<std::pair<int64_t, int64_t>>& runs, T* gs, int64_t r0,
                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = tmp + r * ld;
    const T* wr = w + (r % O) * I;
    T* dst = gs + r * I;
    int64_t col = 0;
    for (const auto& [a, len] : runs) {
      std::fill(dst + col, dst + a, T(0));
      int64_t t = 0;
      if constexpr (std::is_same_v<T, float>) {
        using cpu::v8f_u;
        const int64_t vec_end =
            a + round_up(len, cpu::kLanes) <= I ? len : len / cpu::kLanes * cpu::kLanes;
        for (; t < vec_end; t += cpu::kLanes) {
          *reinterpret_cast<v8f_u*>(dst + a + t) = *reinterpret_cast<const v8f_u*>(src + t) *
                                                   *reinterpret_cast<const v8f_u*>(wr + a + t);
        }
      }
      for (; t < len; ++t) dst[a + t] = src[t] * wr[a + t];
      src += len;
      col = a + len;
    }
    std::fill(dst + col, dst + I, T(0));
  }
}

// gs [K, O, I] = (gt [K*O, N] x [N, I]) * W when x has columns of zeros (an image's blank
// border): those columns of gs are exactly zero, so the GEMM runs on x's other columns only and
// its rows are expanded with the product by W. Returns false (nothing written) where that does
// not pay (fewer than max(8, I/16) zero columns, or runs of under 4 columns on average) or is
// not exact (a non-finite gt or W: inf * 0 must still give NaN).
bool grad_scores_zero_columns(const at::Tensor& gt, const at::Tensor& x, const at::Tensor& w,
                              at::Tensor& gs) {
  if (gt.scalar_type() != at::kFloat && gt.scalar_type() != at::kDouble) return false;
  const int64_t rows = gt.size(0), N = x.size(0), I = x.size(1), O = w.size(0);
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(gt.scalar_type(), "grad_scores_zero_columns", [&] {
    int64_t kept = 0;
    const auto runs = nonzero_column_runs(x.const_data_ptr<scalar_t>(), N, I, kept);
    if (kept + std::max<int64_t>(8, I / 16) > I || int64_t(runs.size()) * 4 > kept + 3 ||
        !cpu::all_finite(gt) || !cpu::all_finite(w)) {
      return;
    }
    auto xc = at::empty({N, kept}, x.options());
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* src = x.const_data_ptr<scalar_t>() + n * I;
      scalar_t* dst = xc.mutable_data_ptr<scalar_t>() + n * kept;
      for (const auto& [a, len] : runs) dst = std::copy(src + a, src + a + len, dst);
    }
    // rows padded by 8 readable values for expand_columns' whole vectors
    auto tmp_rows = at::empty({rows, kept + cpu::kLanes}, x.options());
    if (kept > 0) {
      auto tmp = tmp_rows.narrow(1, 0, kept);
      at::mm_out(tmp, gt, xc);
    }
    at::parallel_for(0, rows, grain_for(I), [&](int64_t r0, int64_t r1) {
      expand_columns(tmp_rows.const_data_ptr<scalar_t>(), kept + cpu::kLanes,
                     w.const_data_ptr<scalar_t>(), O, I, runs,
                     gs.mutable_data_ptr<scalar_t>(), r0, r1);
    });
    done = true;
  });
  return done;
}

void grad_scores_tiled(const at::Tensor& g3, const at::Tensor& x3, const at::Tensor& w,
                       at::Tensor& gs) {
  const int64_t K = g3.size(0), O = w.size(0), I = w.size(1);
  const bool shared = x3.size(0) == 1;
  if (shared && K > 1) {
    // One input for all modules: a single GEMM [K*O, N] x [N, I] (BLAS runs a tall product at a
    // better rate than K products of O rows), then W broadcast over the modules.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    linear_impl::grad_scores_gemm(g3.transpose(1, 2).contiguous().view({K * O, g3.size(1)}),
                                  x3.select(0, 0), w, gs);
    return;
  }
  const int64_t T = tile_rows(O, I, w.element_size(), kScoreTileBytes, 1);
  const int64_t grain = grain_for(K * T * I * std::max<int64_t>(g3.size(1), 1));
  at::parallel_for(0, ceil_div(O, T), grain, [&](int64_t t0, int64_t t1) {
    // Worker threads start with grad mode on: keep ATen calls below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * T, rows = std::min(T, O - o0);
      for (int64_t k = 0; k < K; ++k) {
        auto dst = gs.select(0, k).narrow(0, o0, rows);
        at::mm_out(dst, g3.select(0, k).narrow(1, o0, rows).t(), x3.select(0, shared ? 0 : k));
        dst.mul_(w.narrow(0, o0, rows));
      }
    }
  });
}

// ---- small banks: all of W*M at once + batched BLAS (every floating dtype) -------------------

bool is_small(const at::Tensor& w, const at::Tensor& p3) {
  return p3.size(0) * w.numel() <= kSmallElems;
}

// A small float32 bank whose masks are sparse (FC2-FC4's 49 x 49 layers at density 0.1): the
// bit walk over kept weights beats unpacking W*M and the dense loops (the caller checks that
// the walk's source, x or grad_out, is finite).
bool sparse_small(const at::Tensor& w, const at::Tensor& p3, int64_t rows) {
  return w.scalar_type() == at::kFloat && rows > kGemvRows &&
         sampled_density(p3, w.size(1)) <= kSmallWalkDensity;
}

// W*M of every module: [K, O, I] (one pass, no per-module tensor calls: small banks run it on
// every product).
at::Tensor unpack_all(const at::Tensor& w, const at::Tensor& p3) {
  const int64_t K = p3.size(0), O = w.size(0), I = w.size(1), words = p3.size(2);
  auto wm = at::empty({K, O, I}, w.options());
  const auto* p = reinterpret_cast<const uint32_t*>(p3.const_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "unpack_all", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* dst = wm.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      unpack_tile<scalar_t>(wp, p + k * O * words, I, words, 0, O, 0, I, dst + k * O * I);
    }
  });
  return wm;
}

// x3 [S, N, I] broadcast to the K modules: a stride-0 view when shared.
at::Tensor per_module(const at::Tensor& x3, int64_t K) {
  return x3.size(0) == K ? x3 : x3.expand({K, x3.size(1), x3.size(2)});
}

}  // namespace

// ---- shared drivers (masked_linear_impl.h) ------------------------------------------------

namespace linear_impl {

void grad_scores_gemm(const at::Tensor& gt, const at::Tensor& x, const at::Tensor& w,
                      at::Tensor& gs) {
  if (grad_scores_zero_columns(gt, x, w, gs)) return;
  auto flat = gs.view({gt.size(0), x.size(1)});
  at::mm_out(flat, gt, x);
  gs.view({-1, w.size(0), w.size(1)}).mul_(w.unsqueeze(0));
}

// x3 [S, N, I], p3 [K, O, words] -> [K, N, O].
at::Tensor forward_impl(const at::Tensor& x3, const at::Tensor& weight, const at::Tensor& p3,
                        const c10::optional<at::Tensor>& bias) {
  const auto w = weight.contiguous();
  const c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : bias;
  const bool skip_ok = w.scalar_type() == at::kFloat && cpu::all_finite(x3);
  if (is_small(w, p3) && !(skip_ok && sparse_small(w, p3, x3.size(1)))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t K = p3.size(0), N = x3.size(1), O = w.size(0), I = w.size(1);
    if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) {
      auto out3 = at::empty({K, N, O}, w.options());
      const auto wm = unpack_all(w, p3);
      const auto xt = x3.transpose(1, 2).contiguous();  // [S, I, N]
      auto col = at::empty({N}, w.options());
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "small_forward", [&] {
        cpu::small_forward(xt.const_data_ptr<scalar_t>(), x3.size(0),
                           wm.const_data_ptr<scalar_t>(),
                           b ? b->const_data_ptr<scalar_t>() : nullptr, K, N, O, I,
                           out3.mutable_data_ptr<scalar_t>(), col.mutable_data_ptr<scalar_t>());
      });
      return out3;
    }
    auto out3 = at::bmm(per_module(x3, K), unpack_all(w, p3).transpose(1, 2));
    if (b) out3.add_(*b);
    return out3;
  }
  auto out3 = at::empty({p3.size(0), x3.size(1), w.size(0)}, w.options());
  if (skip_ok && x3.size(1) <= kGemvRows) {
    forward_gemv(x3, w, p3, b, out3);
  } else if (skip_ok && use_bit_walk(w, p3, x3.size(1))) {
    forward_bit_walk(x3, w, p3, b, out3);
  } else {
    forward_tiled(x3, w, p3, b, out3);
  }
  return out3;
}

// gs [K, O, I] (contiguous, every element written) = (g3[k]^T x3[s]) * W: direct loops for
// small float32 / float64 banks, one batched BLAS call for small banks of other dtypes, tiles
// otherwise.
void grad_scores_into(const at::Tensor& g3, const at::Tensor& x3, const at::Tensor& w,
                      const at::Tensor& p3, at::Tensor& gs) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t K = p3.size(0), S = x3.size(0), N = x3.size(1), O = w.size(0), I = w.size(1);
  if (!is_small(w, p3)) {
    grad_scores_tiled(g3, x3, w, gs);
  } else if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) {
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "small_grad_scores", [&] {
      cpu::small_grad_scores(g3.const_data_ptr<scalar_t>(), x3.const_data_ptr<scalar_t>(), S,
                             w.const_data_ptr<scalar_t>(), K, N, O, I,
                             gs.mutable_data_ptr<scalar_t>());
    });
  } else {
    at::bmm_out(gs, g3.transpose(1, 2), per_module(x3, K)).mul_(w);
  }
}

// g3 [K, N, O], x3 [S, N, I], p3 [K, O, words] -> (gx3 [S, N, I], gs [K, O, I], gb [O]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& g3,
                                                             const at::Tensor& x3,
                                                             const at::Tensor& weight,
                                                             const at::Tensor& p3,
                                                             std::array<bool, 3> output_mask) {
  const auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (is_small(w, p3) && (output_mask[0] || output_mask[1])) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t K = p3.size(0);
    if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) {
      const int64_t S = x3.size(0), N = x3.size(1), O = w.size(0), I = w.size(1);
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "small_backward", [&] {
        const scalar_t* pg = g3.const_data_ptr<scalar_t>();
        if (output_mask[0]) {
          gx = at::empty({S, N, I}, w.options());
          if (sparse_small(w, p3, N) && cpu::all_finite(g3)) {
            grad_x_bit_walk(g3, w, p3, gx);
          } else {
            const auto wm = unpack_all(w, p3);
            auto coef = at::empty({K * O}, w.options());
            cpu::small_grad_x(pg, wm.const_data_ptr<scalar_t>(), S, K, N, O, I,
                              gx.mutable_data_ptr<scalar_t>(),
                              coef.mutable_data_ptr<scalar_t>());
          }
        }
        if (output_mask[1]) {
          gs = at::empty({K, O, I}, w.options());
          grad_scores_into(g3, x3, w, p3, gs);
        }
      });
      if (output_mask[2]) gb = g3.sum(at::IntArrayRef{0, 1});
      return {gx, gs, gb};
    }
    if (output_mask[0]) {
      gx = at::bmm(g3, unpack_all(w, p3));  // [K, N, I]
      if (x3.size(0) != K) gx = gx.sum(0, /*keepdim=*/true);
    }
    if (output_mask[1]) {
      gs = at::empty({K, w.size(0), w.size(1)}, w.options());
      grad_scores_into(g3, x3, w, p3, gs);
    }
    if (output_mask[2]) gb = g3.sum(at::IntArrayRef{0, 1});
    return {gx, gs, gb};
  }
  if (output_mask[0]) {
    gx = at::empty(x3.sizes(), w.options());
    if (use_bit_walk(w, p3, g3.size(1)) && cpu::all_finite(g3)) {
      grad_x_bit_walk(g3, w, p3, gx);
    } else {
      grad_x_tiled(g3, w, p3, gx);
    }
  }
  if (output_mask[1]) {
    gs = at::empty({p3.size(0), w.size(0), w.size(1)}, w.options());
    grad_scores_into(g3, x3, w, p3, gs);
  }
  if (output_mask[2]) gb = g3.sum(at::IntArrayRef{0, 1});
  return {gx, gs, gb};
}

bool walk_wins(const at::Tensor& w, const at::Tensor& p3, int64_t module, int64_t rows) {
  if (rows <= kWalkAlwaysRows) return w.scalar_type() == at::kFloat;  // no module view needed
  return use_bit_walk(w, p3.narrow(0, module, 1), rows);
}

}  // namespace linear_impl

using linear_impl::backward_impl;
using linear_impl::forward_impl;
using linear_impl::grad_scores_into;

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, packed, 0);
  check_bias(bias, weight);
  const auto x3 = x.reshape({1, -1, weight.size(1)}).contiguous();
  const auto p3 = packed.contiguous().unsqueeze(0);
  return forward_impl(x3, weight, p3, bias).view(out_shape(x, 0, c10::nullopt, weight.size(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, std::array<bool, 3> output_mask) {
  check_linear_args(x, weight, packed, 0);
  check_grad_out(grad_out, weight, out_shape(x, 0, c10::nullopt, weight.size(0)));
  const auto x3 = x.reshape({1, -1, weight.size(1)}).contiguous();
  const auto g3 = grad_out.reshape({1, -1, weight.size(0)}).contiguous();
  auto [gx, gs, gb] = backward_impl(g3, x3, weight, packed.contiguous().unsqueeze(0), output_mask);
  if (gx.defined()) gx = gx.view(x.sizes());
  if (gs.defined()) gs = gs.squeeze(0);
  return {gx, gs, gb};
}

at::Tensor multi_masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                   bool shared_input) {
  check_linear_args(x, weight, packed, 1);
  check_bias(bias, weight);
  const int64_t K = packed.size(0);
  check_module_dim(x, K, shared_input);
  const auto x3 = x.reshape({shared_input ? 1 : K, -1, weight.size(1)}).contiguous();
  return forward_impl(x3, weight, packed.contiguous(), bias)
      .view(out_shape(x, shared_input ? 0 : 1, K, weight.size(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, bool shared_input, std::array<bool, 3> output_mask) {
  check_linear_args(x, weight, packed, 1);
  const int64_t K = packed.size(0);
  check_module_dim(x, K, shared_input);
  check_grad_out(grad_out, weight, out_shape(x, shared_input ? 0 : 1, K, weight.size(0)));
  const auto x3 = x.reshape({shared_input ? 1 : K, -1, weight.size(1)}).contiguous();
  const auto g3 = grad_out.reshape({K, -1, weight.size(0)}).contiguous();
  auto [gx, gs, gb] = backward_impl(g3, x3, weight, packed.contiguous(), output_mask);
  if (gx.defined()) gx = gx.view(x.sizes());
  return {gx, gs, gb};
}

void multi_masked_linear_grad_scores_cpu(at::Tensor& out, const at::Tensor& grad_out,
                                         const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& packed, bool shared_input) {
  check_linear_args(x, weight, packed, 1);
  const int64_t K = packed.size(0);
  check_module_dim(x, K, shared_input);
  check_grad_out(grad_out, weight, out_shape(x, shared_input ? 0 : 1, K, weight.size(0)));
  check_same_device(out, weight, "out", "weight");
  check_same_dtype(out, weight, "out", "weight");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({K, weight.size(0), weight.size(1)}),
              "modsplit: out must have shape [K, O, I] = ", at::IntArrayRef({K, weight.size(0),
              weight.size(1)}), ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "modsplit: out must be contiguous (written in place)");
  const auto x3 = x.reshape({shared_input ? 1 : K, -1, weight.size(1)}).contiguous();
  const auto g3 = grad_out.reshape({K, -1, weight.size(0)}).contiguous();
  grad_scores_into(g3, x3, weight.contiguous(), packed.contiguous(), out);
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("multi_masked_linear_grad_scores_", &modsplit::multi_masked_linear_grad_scores_cpu);
  m.impl("masked_linear", &modsplit::masked_linear_cpu);
  m.impl("masked_linear_backward", &modsplit::masked_linear_backward_cpu);
  m.impl("multi_masked_linear", &modsplit::multi_masked_linear_cpu);
  m.impl("multi_masked_linear_backward", &modsplit::multi_masked_linear_backward_cpu);
}
