// ragged_masked_linear / ragged_masked_linear_backward on CUDA: K modules over one weight W [O, I],
// module k on its own rows t = offsets[k] .. offsets[k+1] - 1 of the output, reading x[rows[t]]
// (or x[t] without rows); out[t] = x[rows[t]] (W*M_k)^T + b (modsplit/ops/schemas.py).
//
// Validation: the argument checks of the other linear ops (device, dtype, shapes; offsets int64
// [K+1] and rows int64 [T] on x's device), then ONE host sync per call: a single-block kernel
// copies offsets into a small device buffer and appends min(rows) and max(rows), and one
// device-to-host copy brings the buffer back. The host then checks offsets[0] == 0,
// offsets[K] == T, offsets nondecreasing and 0 <= rows < R, and keeps the offsets (the routing
// needs the widest module, the expanded path and the backward slice rows per module). Because of
// that read the ops cannot be captured in a CUDA graph.
// Routing (routing.cuh), on the widest module's row count m = max_k (offsets[k+1] - offsets[k]):
//   fused     use_fused(m, dtype) (float/half/bf16, m <= 16 by default): the ragged SIMT kernel
//             below, derived from small_batch_kernel (small_batch_linear_cuda.cu). One warp per
//             (output row o, module k, slice of I); it walks its module's rows in tiles of MT
//             (MT in 1, 2, 4, 8, 16, the smallest >= m, so one tile under the default routing):
//             lane j reads row index rows[t0 + j] (one coalesced load) and the warp shares them by
//             shuffles; then each lane walks the slice with 16-byte vector loads of W (8 half/bf16
//             or 4 float elements, inside one mask word), expands the module's mask bits in
//             registers and multiplies by the MT gathered x rows (16-byte loads) into fp32
//             accumulators acc[MT]; a shuffle reduction per row ends the tile, + bias, into
//             out [T, O]. Warps of one output row o and consecutive modules are neighbours in a
//             block, so the W row is read from DRAM about once and then from L1/L2. Split-K as in
//             small_batch: while O x (modules with rows) is below ~8 warps per SM the reduction is
//             split into slices of >= 1024 columns whose fp32 partial sums [splits, T, O] an ATen
//             reduction folds (plus the bias) into out. Rows not a multiple of the vector width,
//             or unaligned x / W, take the one-element variant (VEC = 1).
//   expanded  otherwise, and always for float64 (fused_max_rows(kDouble) = 0: no fused float64
//             kernel): W*M_k for a chunk of modules (module_chunk: the scratch bound) is written
//             by expand_masked_weight, the chunk's rows of x are gathered with one index_select,
//             and one cuBLAS GEMM per module with rows (at::mm_out / at::addmm_out) writes its
//             slice out[offsets[k] : offsets[k+1]]. Chunks without rows are skipped.
// Backward (no fused kernel):
//   grad_x      per chunk of modules: W*M_k expanded, then at::mm_out(g_k, W*M_k) per module into
//               a [T, I] buffer; with rows, index_add_ into zeros like x (summing the t with
//               rows[t] = r); without rows the buffer is grad_x;
//   grad_scores (g_k^T x_k) * W, no mask: at::mm_out per module into gs[k] (x_k gathered once for
//               all modules with index_select), zeros for modules without rows, then gs.mul_(W);
//   grad_bias   grad_out.sum(0).
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include <cstdint>
#include <sstream>
#include <vector>

#include "common.cuh"
#include "expand_mask.cuh"
#include "routing.cuh"

namespace modsplit {
namespace cuda {
namespace {

constexpr int kRaggedWarpsPerBlock = 8;
constexpr int kStatsThreads = 512;

// ---- validation ---------------------------------------------------------------------------------

// out [n_off + 2] = offsets [n_off], min(rows), max(rows) (INT64_MAX, INT64_MIN without rows).
// One block: offsets and rows are small (K + 1 and T entries), and the host read that follows
// costs far more than the pass.
__global__ void __launch_bounds__(kStatsThreads)
ragged_stats_kernel(const int64_t* __restrict__ offsets, int64_t n_off,
                    const int64_t* __restrict__ rows, int64_t n_rows, int64_t* __restrict__ out) {
  __shared__ int64_t s_lo[kStatsThreads / 32], s_hi[kStatsThreads / 32];
  for (int64_t i = threadIdx.x; i < n_off; i += blockDim.x) out[i] = offsets[i];
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  if (rows != nullptr) {
    for (int64_t t = threadIdx.x; t < n_rows; t += blockDim.x) {
      const int64_t r = rows[t];
      lo = r < lo ? r : lo;
      hi = r > hi ? r : hi;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t l2 = __shfl_xor_sync(0xffffffffu, lo, off);
    const int64_t h2 = __shfl_xor_sync(0xffffffffu, hi, off);
    lo = l2 < lo ? l2 : lo;
    hi = h2 > hi ? h2 : hi;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
      lo = s_lo[w] < lo ? s_lo[w] : lo;
      hi = s_hi[w] > hi ? s_hi[w] : hi;
    }
    out[n_off] = lo;
    out[n_off + 1] = hi;
  }
}

// What the host knows of a call after the one read: the offsets and the widest module.
struct RaggedPlan {
  int64_t K = 0, T = 0, R = 0;
  std::vector<int64_t> off;  // [K + 1], validated
  int64_t max_count = 0;     // rows of the widest module
  int64_t active = 0;        // modules with at least one row
};

// The checks that need no device values; returns T.
int64_t check_ragged_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                          const at::Tensor& offsets, const c10::optional<at::Tensor>& rows) {
  check_cuda(weight, "weight");
  return check_ragged_shapes(x, weight, packed, offsets, rows);
}

// The one host sync: reads offsets and the range of rows, checks them (call under a guard of the
// device). rows_c: rows made contiguous, or undefined.
RaggedPlan read_offsets(const at::Tensor& offsets_c, const at::Tensor& rows_c, int64_t R,
                        int64_t T) {
  RaggedPlan p;
  p.K = offsets_c.size(0) - 1;
  p.T = T;
  p.R = R;
  const int64_t n_off = p.K + 1;
  auto buf = at::empty({n_off + 2}, offsets_c.options());
  ragged_stats_kernel<<<1, kStatsThreads, 0, current_stream()>>>(
      offsets_c.data_ptr<int64_t>(), n_off, rows_c.defined() ? rows_c.data_ptr<int64_t>() : nullptr,
      rows_c.defined() ? rows_c.numel() : 0, buf.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto host = buf.to(at::kCPU);  // the sync
  const int64_t* h = host.data_ptr<int64_t>();
  p.off.assign(h, h + n_off);
  bool rising = p.off.front() == 0 && p.off.back() == T;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t n = p.off[k + 1] - p.off[k];
    rising = rising && n >= 0;
    p.max_count = std::max(p.max_count, n);
    p.active += n > 0;
  }
  if (!rising) {
    std::ostringstream shown;
    for (int64_t k = 0; k < std::min<int64_t>(n_off, 8); ++k) shown << (k ? ", " : "") << p.off[k];
    TORCH_CHECK(false, "modsplit: offsets must rise from 0 to T=", T,
                " (the rows the modules take), got [", shown.str(), n_off > 8 ? ", ...]" : "]");
  }
  if (rows_c.defined() && T > 0) {
    TORCH_CHECK(h[n_off] >= 0 && h[n_off + 1] < R, "modsplit: rows must lie in [0, ", R,
                ") (the rows of x), got values from ", h[n_off], " to ", h[n_off + 1]);
  }
  return p;
}

// ---- forward, fused -----------------------------------------------------------------------------

// One warp per (o, k, split): gw = (o * K + k) * splits + split. y [T, O] (splits == 1, with
// bias) or ws fp32 [splits, T, O] (partial sums, no bias). x [R, I]; rows [T] or nullptr.
template <typename T, int VEC, int MT>
__global__ void __launch_bounds__(32 * kRaggedWarpsPerBlock)
ragged_small_kernel(const T* __restrict__ x, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ offsets, const T* __restrict__ w,
                    const int32_t* __restrict__ packed, const T* __restrict__ bias,
                    T* __restrict__ y, float* __restrict__ ws, int64_t K, int64_t n_rows,
                    int64_t O, int64_t I, int64_t splits, int64_t slice) {
  static_assert(MT >= 1 && MT <= 32, "a tile's row indices are held one per lane");
  const int lane = threadIdx.x & 31;
  const int64_t gw =
      static_cast<int64_t>(blockIdx.x) * kRaggedWarpsPerBlock + (threadIdx.x >> 5);
  if (gw >= O * K * splits) return;  // whole warps exit together
  const int64_t split = gw % splits;
  const int64_t k = (gw / splits) % K;
  const int64_t o = gw / (splits * K);
  const int64_t begin = offsets[k], end = offsets[k + 1];
  if (begin >= end) return;  // a module without rows (uniform across the warp)
  const int64_t words = (I + 31) / 32;
  const int64_t i_begin = split * slice, i_end = i_begin + slice < I ? i_begin + slice : I;
  const T* wrow = w + o * I;
  const int32_t* prow = packed + (k * O + o) * words;
  const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;

  for (int64_t t0 = begin; t0 < end; t0 += MT) {
    const int64_t n = end - t0 < MT ? end - t0 : MT;  // rows in this tile, uniform
    int64_t mine = 0;
    if (lane < n) mine = rows != nullptr ? rows[t0 + lane] : t0 + lane;
    const T* xp[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) xp[m] = x + __shfl_sync(0xffffffffu, mine, m) * I;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;

    for (int64_t i = i_begin + lane * VEC; i < i_end; i += 32 * VEC) {
      const Pack<T, VEC> wv = *reinterpret_cast<const Pack<T, VEC>*>(wrow + i);
      const uint32_t bits = static_cast<uint32_t>(__ldg(prow + i / 32)) >> (i % 32);
      float wm[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) wm[j] = ((bits >> j) & 1u) ? static_cast<float>(wv.v[j]) : 0.f;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < n) {
          const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(xp[m] + i);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[m] += wm[j] * static_cast<float>(xv.v[j]);
        }
      }
    }

#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < n) {  // uniform: the whole warp takes part in the shuffles
        const float total = warp_sum_float(acc[m]);
        if (lane == m) {
          const int64_t at = (t0 + m) * O + o;
          if (splits == 1) {
            y[at] = static_cast<T>(total + b);
          } else {
            ws[split * n_rows * O + at] = total;
          }
        }
      }
    }
  }
}

struct FusedArgs {
  const at::Tensor& x;     // [R, I] contiguous
  const at::Tensor& rows;  // [T] contiguous, or undefined
  const at::Tensor& offsets;
  const at::Tensor& w;       // [O, I] contiguous
  const at::Tensor& packed;  // [K, O, words] contiguous
  const at::Tensor& bias;    // [O] contiguous, or undefined
  const RaggedPlan& plan;
  at::Tensor& y;  // [T, O]
};

template <typename T, int VEC, int MT>
void launch_ragged_mt(const FusedArgs& a) {
  const int64_t O = a.w.size(0), I = a.w.size(1), K = a.plan.K, T_rows = a.plan.T;
  // Split the reduction while the working warps would be fewer than ~8 per SM, keeping each
  // slice at least 1024 columns (several vector steps per lane), a multiple of 32 * VEC.
  const int64_t target = int64_t{8} * sm_count();
  const int64_t step = 32 * VEC;
  const int64_t busy = std::max<int64_t>(1, O * a.plan.active);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(target / busy, I / 1024));
  const int64_t slice = (I / splits + step - 1) / step * step;
  splits = (I + slice - 1) / slice;
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits, T_rows, O}, a.y.options().dtype(at::kFloat));
  const int64_t warps = O * K * splits;
  const unsigned blocks =
      static_cast<unsigned>((warps + kRaggedWarpsPerBlock - 1) / kRaggedWarpsPerBlock);
  ragged_small_kernel<T, VEC, MT><<<blocks, 32 * kRaggedWarpsPerBlock, 0, current_stream()>>>(
      a.x.data_ptr<T>(), a.rows.defined() ? a.rows.data_ptr<int64_t>() : nullptr,
      a.offsets.data_ptr<int64_t>(), a.w.data_ptr<T>(), a.packed.data_ptr<int32_t>(),
      a.bias.defined() ? a.bias.data_ptr<T>() : nullptr, a.y.data_ptr<T>(),
      splits > 1 ? ws.data_ptr<float>() : nullptr, K, T_rows, O, I, splits, slice);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    auto total = ws.sum(0);  // [T, O] fp32; every entry was written (the modules cover 0 .. T)
    if (a.bias.defined()) total.add_(a.bias.to(at::kFloat));
    a.y.copy_(total);
  }
}

template <typename T, int VEC>
void launch_ragged_vec(const FusedArgs& a) {
  const int64_t m = a.plan.max_count;
  if (m <= 1) return launch_ragged_mt<T, VEC, 1>(a);
  if (m <= 2) return launch_ragged_mt<T, VEC, 2>(a);
  if (m <= 4) return launch_ragged_mt<T, VEC, 4>(a);
  if (m <= 8) return launch_ragged_mt<T, VEC, 8>(a);
  return launch_ragged_mt<T, VEC, 16>(a);  // wider modules loop over tiles of 16 rows
}

template <typename T>
void launch_ragged_typed(const FusedArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (a.w.size(1) % kVec == 0 && aligned(a.x.data_ptr()) && aligned(a.w.data_ptr())) {
    launch_ragged_vec<T, kVec>(a);
  } else {
    launch_ragged_vec<T, 1>(a);
  }
}

void launch_ragged_fused(const FusedArgs& a) {
  switch (a.w.scalar_type()) {
    case at::kFloat: launch_ragged_typed<float>(a); break;
    case at::kHalf: launch_ragged_typed<at::Half>(a); break;
    case at::kBFloat16: launch_ragged_typed<at::BFloat16>(a); break;
    default: TORCH_CHECK(false, "modsplit: the fused ragged linear got dtype ", a.w.scalar_type());
  }
}

// ---- expanded path (forward, grad_x) ------------------------------------------------------------

int64_t ragged_chunk(const at::Tensor& w, int64_t K) {
  return module_chunk(K, w.numel() * static_cast<int64_t>(w.element_size()));
}

// Rows offsets[a] .. offsets[b] - 1 of the gathered input: x[rows[t]] (or x[t]).
at::Tensor gathered(const at::Tensor& x, const at::Tensor& rows, int64_t a, int64_t b) {
  return rows.defined() ? x.index_select(0, rows.narrow(0, a, b - a)) : x.narrow(0, a, b - a);
}

// y [T, O]: per chunk of modules, W*M_k expanded, then one GEMM per module with rows.
void forward_expanded(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& w,
                      const at::Tensor& packed, const at::Tensor& bias, const RaggedPlan& p,
                      at::Tensor& y) {
  const auto& off = p.off;
  const int64_t step = ragged_chunk(w, p.K);
  auto buf = at::empty({step, w.size(0), w.size(1)}, w.options());
  for (int64_t k0 = 0; k0 < p.K; k0 += step) {
    const int64_t c = std::min(step, p.K - k0);
    if (off[k0 + c] == off[k0]) continue;  // no rows in this chunk
    expand_masked_weight(w, packed, k0, c, 1, false, buf);
    const auto xc = gathered(x, rows, off[k0], off[k0 + c]);  // the chunk's rows, [n, I]
    for (int64_t k = k0; k < k0 + c; ++k) {
      const int64_t n = off[k + 1] - off[k];
      if (n == 0) continue;
      const auto xk = xc.narrow(0, off[k] - off[k0], n);
      const auto wk = buf[k - k0];  // [O, I]
      auto yk = y.narrow(0, off[k], n);
      if (bias.defined()) {
        at::addmm_out(yk, bias, xk, wk.t());
      } else {
        at::mm_out(yk, xk, wk.t());
      }
    }
  }
}

// gx_rows [T, I] = g_k (W*M_k) for each module's rows.
at::Tensor grad_x_rows(const at::Tensor& g, const at::Tensor& w, const at::Tensor& packed,
                       const RaggedPlan& p) {
  const auto& off = p.off;
  const int64_t O = w.size(0), I = w.size(1);
  // Every row belongs to one module (offsets cover 0 .. T), so each is written, unless O == 0.
  auto gx = O == 0 ? at::zeros({p.T, I}, g.options()) : at::empty({p.T, I}, g.options());
  if (O == 0 || I == 0 || p.T == 0) return gx;
  const int64_t step = ragged_chunk(w, p.K);
  auto buf = at::empty({step, O, I}, w.options());
  for (int64_t k0 = 0; k0 < p.K; k0 += step) {
    const int64_t c = std::min(step, p.K - k0);
    if (off[k0 + c] == off[k0]) continue;
    expand_masked_weight(w, packed, k0, c, 1, false, buf);
    for (int64_t k = k0; k < k0 + c; ++k) {
      const int64_t n = off[k + 1] - off[k];
      if (n == 0) continue;
      auto out = gx.narrow(0, off[k], n);
      at::mm_out(out, g.narrow(0, off[k], n), buf[k - k0]);
    }
  }
  return gx;
}

// ---- the ops ------------------------------------------------------------------------------------

at::Tensor ragged_masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, const at::Tensor& offsets,
                                     const c10::optional<at::Tensor>& rows,
                                     const c10::optional<at::Tensor>& bias) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  check_bias(bias, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto rows_c = rows.has_value() ? rows->contiguous() : at::Tensor();
  const auto offsets_c = offsets.contiguous();
  const RaggedPlan plan = read_offsets(offsets_c, rows_c, x.size(0), T);
  const int64_t O = weight.size(0), I = weight.size(1);
  auto y = at::empty({T, O}, x.options());
  if (y.numel() == 0) return y;
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (I == 0) {  // empty reduction: y = bias
    if (b.defined()) {
      y.copy_(b.expand({T, O}));
    } else {
      y.zero_();
    }
    return y;
  }
  const auto xc = x.contiguous(), w = weight.contiguous(), pc = packed.contiguous();
  if (use_fused(plan.max_count, weight.scalar_type())) {
    launch_ragged_fused(FusedArgs{xc, rows_c, offsets_c, w, pc, b, plan, y});
  } else {
    forward_expanded(xc, rows_c, w, pc, b, plan, y);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_masked_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, const at::Tensor& offsets, const c10::optional<at::Tensor>& rows,
    std::array<bool, 3> output_mask) {
  const int64_t T = check_ragged_args(x, weight, packed, offsets, rows);
  const int64_t O = weight.size(0), I = weight.size(1), K = packed.size(0);
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == O,
              "modsplit: grad_out must be [T=", T, ", out_features=", O, "], got shape ",
              grad_out.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto rows_c = rows.has_value() ? rows->contiguous() : at::Tensor();
  const RaggedPlan plan = read_offsets(offsets.contiguous(), rows_c, x.size(0), T);
  const auto g = grad_out.contiguous();
  const auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    auto gx_rows = grad_x_rows(g, w, packed.contiguous(), plan);
    gx = rows_c.defined() ? at::zeros({x.size(0), I}, g.options()).index_add_(0, rows_c, gx_rows)
                          : gx_rows;
  }
  if (output_mask[1]) {
    gs = at::empty({K, O, I}, w.options());
    const auto xs = rows_c.defined() ? x.index_select(0, rows_c) : x;  // [T, I]
    for (int64_t k = 0; k < K; ++k) {
      const int64_t a = plan.off[k], n = plan.off[k + 1] - a;
      auto gk = gs[k];
      if (n == 0) {
        gk.zero_();
      } else {
        at::mm_out(gk, g.narrow(0, a, n).t(), xs.narrow(0, a, n));
      }
    }
    gs.mul_(w);
  }
  if (output_mask[2]) gb = g.sum(0);
  return {gx, gs, gb};
}

}  // namespace
}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("ragged_masked_linear", &modsplit::cuda::ragged_masked_linear_cuda);
  m.impl("ragged_masked_linear_backward", &modsplit::cuda::ragged_masked_linear_backward_cuda);
}
