// masked_linear / multi_masked_linear forward and backward on CUDA, through the masked GEMM of
// masked_gemm.cuh (W tiles masked in shared memory; W*M is never written to global memory).
//   forward:      y[m, o]  = sum_i x[m, i] * W[o, i] * M[o, i] + b[o]
//   grad_x:       gx[m, i] = sum_o g[m, o] * W[o, i] * M[o, i]
//   grad_scores:  gs[o, i] = (sum_m g[m, o] * x[m, i]) * W[o, i]   (the *W fused in the epilogue)
//   grad_bias:    gb[o]    = sum_m g[m, o]                          (ATen reduction)
// Banks of K modules run as one launch with K on the batch grid dimension. Forward passes of at
// most 16 rows (float/half/bf16) take the small-batch kernel, which reads each W tile once for up
// to 8 modules (small_batch_linear_cuda.cu).
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include "common.cuh"
#include "masked_gemm.cuh"
#include "small_batch_linear.cuh"

namespace modsplit {
namespace cuda {

static void check_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& packed, int64_t lead_dims) {
  check_cuda(weight, "weight");
  check_linear_args(x, weight, packed, lead_dims);
}

static void check_grad_out(const at::Tensor& grad_out, const at::Tensor& weight, int64_t numel) {
  check_same_device(grad_out, weight, "grad_out", "weight");
  check_same_dtype(grad_out, weight, "grad_out", "weight");
  TORCH_CHECK(grad_out.numel() == numel, "modsplit: grad_out has shape ", grad_out.sizes(),
              " but the output has ", numel, " elements");
}

static const void* bias_ptr(const c10::optional<at::Tensor>& bias, at::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  keep = bias->contiguous();
  return keep.data_ptr();
}

// y [K, M, O] = x_k [M, I] (W * M_k)^T + b; x_stride = elements between modules' inputs (0: shared).
static void forward_gemm(const at::Tensor& x, int64_t x_stride, const at::Tensor& w,
                         const at::Tensor& packed, const void* bias, int64_t K, int64_t M,
                         at::Tensor& y) {
  if (M >= 1 && M <= kSmallBatchMaxRows && w.scalar_type() != at::kDouble) {
    launch_small_batch_linear(x, x_stride, w, packed, bias, K, M, y);
    return;
  }
  const int64_t O = w.size(0), I = w.size(1), words = packed.size(-1);
  GemmProblem g;
  g.M = M;
  g.N = O;
  g.R = I;
  g.n0 = K;
  g.a = x.data_ptr();
  g.sa.b0 = x_stride;
  g.sa.row = I;
  g.sa.col = 1;
  g.b = w.data_ptr();  // B[r=i, n=o] = W[o, i]
  g.sb.row = 1;
  g.sb.col = I;
  g.mask = packed.data_ptr<int32_t>();
  g.mode = kMaskRowN;
  g.sp.b0 = O * words;
  g.sp.row = words;
  g.c = y.data_ptr();
  g.sc.b0 = M * O;
  g.sc.row = O;
  g.sc.col = 1;
  g.bias = bias;
  launch_masked_gemm(g, w.scalar_type());
}

// gx [K, M, I] = g_k [M, O] (W * M_k).
static void grad_x_gemm(const at::Tensor& g2, const at::Tensor& w, const at::Tensor& packed,
                        int64_t K, int64_t M, at::Tensor& gx) {
  const int64_t O = w.size(0), I = w.size(1), words = packed.size(-1);
  GemmProblem g;
  g.M = M;
  g.N = I;
  g.R = O;
  g.n0 = K;
  g.a = g2.data_ptr();
  g.sa.b0 = M * O;
  g.sa.row = O;
  g.sa.col = 1;
  g.b = w.data_ptr();  // B[r=o, n=i] = W[o, i]
  g.sb.row = I;
  g.sb.col = 1;
  g.mask = packed.data_ptr<int32_t>();
  g.mode = kMaskRowR;
  g.sp.b0 = O * words;
  g.sp.row = words;
  g.c = gx.data_ptr();
  g.sc.b0 = M * I;
  g.sc.row = I;
  g.sc.col = 1;
  launch_masked_gemm(g, w.scalar_type());
}

// gs [K, O, I] = (g_k^T x_k) * W; x_stride = elements between modules' inputs (0: shared).
static void grad_scores_gemm(const at::Tensor& g2, const at::Tensor& x, int64_t x_stride,
                             const at::Tensor& w, int64_t K, int64_t M, at::Tensor& gs) {
  const int64_t O = w.size(0), I = w.size(1);
  GemmProblem g;
  g.M = O;
  g.N = I;
  g.R = M;
  g.n0 = K;
  g.a = g2.data_ptr();  // A[m=o, r=batch row] = g[row, o]
  g.sa.b0 = M * O;
  g.sa.row = 1;
  g.sa.col = O;
  g.b = x.data_ptr();  // B[r=batch row, n=i] = x[row, i]
  g.sb.b0 = x_stride;
  g.sb.row = I;
  g.sb.col = 1;
  g.e = w.data_ptr();
  g.se.row = I;
  g.se.col = 1;
  g.c = gs.data_ptr();
  g.sc.b0 = O * I;
  g.sc.row = I;
  g.sc.col = 1;
  launch_masked_gemm(g, w.scalar_type());
}

static std::vector<int64_t> out_shape(at::IntArrayRef lead, at::IntArrayRef batch, int64_t last) {
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.insert(shape.end(), batch.begin(), batch.end());
  shape.push_back(last);
  return shape;
}

at::Tensor masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  check_linear_cuda(x, weight, packed, 0);
  check_bias(bias, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t O = weight.size(0), I = weight.size(1);
  const auto batch = x.sizes().slice(0, x.dim() - 1);
  const int64_t M = c10::multiply_integers(batch);
  auto x2 = x.reshape({M, I}).contiguous();
  auto w = weight.contiguous();
  auto p = packed.contiguous();
  at::Tensor b;
  auto y = at::empty({M, O}, x.options());
  forward_gemm(x2, 0, w, p, bias_ptr(bias, b), 1, M, y);
  return y.view(out_shape({}, batch, O));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, std::array<bool, 3> output_mask) {
  check_linear_cuda(x, weight, packed, 0);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t O = weight.size(0), I = weight.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  check_grad_out(grad_out, weight, M * O);
  auto g2 = grad_out.reshape({M, O}).contiguous();
  auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    gx = at::empty({M, I}, x.options());
    grad_x_gemm(g2, w, packed.contiguous(), 1, M, gx);
    gx = gx.view(x.sizes());
  }
  if (output_mask[1]) {
    gs = at::empty({O, I}, weight.options());
    grad_scores_gemm(g2, x.reshape({M, I}).contiguous(), 0, w, 1, M, gs);
  }
  if (output_mask[2]) gb = g2.sum(0);
  return {gx, gs, gb};
}

at::Tensor multi_masked_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed,
                                    const c10::optional<at::Tensor>& bias, bool shared_input) {
  check_linear_cuda(x, weight, packed, 1);
  check_bias(bias, weight);
  const int64_t K = packed.size(0);
  TORCH_CHECK(shared_input || (x.dim() >= 2 && x.size(0) == K), "modsplit: x must be [K=", K,
              ", ..., in_features] when shared_input=False, got shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t O = weight.size(0), I = weight.size(1);
  const auto batch = x.sizes().slice(shared_input ? 0 : 1, x.dim() - (shared_input ? 1 : 2));
  const int64_t M = c10::multiply_integers(batch);
  auto xk = x.reshape({shared_input ? 1 : K, M, I}).contiguous();
  auto w = weight.contiguous();
  auto p = packed.contiguous();
  at::Tensor b;
  auto y = at::empty({K, M, O}, x.options());
  forward_gemm(xk, shared_input ? 0 : M * I, w, p, bias_ptr(bias, b), K, M, y);
  return y.view(out_shape({K}, batch, O));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_masked_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& packed, bool shared_input, std::array<bool, 3> output_mask) {
  check_linear_cuda(x, weight, packed, 1);
  const int64_t K = packed.size(0);
  TORCH_CHECK(shared_input || (x.dim() >= 2 && x.size(0) == K), "modsplit: x must be [K=", K,
              ", ..., in_features] when shared_input=False, got shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t O = weight.size(0), I = weight.size(1);
  const int64_t M = c10::multiply_integers(
      x.sizes().slice(shared_input ? 0 : 1, x.dim() - (shared_input ? 1 : 2)));
  check_grad_out(grad_out, weight, K * M * O);
  auto g = grad_out.reshape({K, M, O}).contiguous();
  auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) {
    auto gxk = at::empty({K, M, I}, x.options());
    grad_x_gemm(g, w, packed.contiguous(), K, M, gxk);
    gx = shared_input ? gxk.sum(0).view(x.sizes()) : gxk.view(x.sizes());
  }
  if (output_mask[1]) {
    gs = at::empty({K, O, I}, weight.options());
    auto xk = x.reshape({shared_input ? 1 : K, M, I}).contiguous();
    grad_scores_gemm(g, xk, shared_input ? 0 : M * I, w, K, M, gs);
  }
  if (output_mask[2]) gb = g.sum({0, 1});
  return {gx, gs, gb};
}

}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("masked_linear", &modsplit::cuda::masked_linear_cuda);
  m.impl("masked_linear_backward", &modsplit::cuda::masked_linear_backward_cuda);
  m.impl("multi_masked_linear", &modsplit::cuda::multi_masked_linear_cuda);
  m.impl("multi_masked_linear_backward", &modsplit::cuda::multi_masked_linear_backward_cuda);
}
