// masked_linear / multi_masked_linear forward and backward on CUDA, routed by routing.cuh:
//   forward, rows per module <= fused_max_rows(dtype): the small-batch kernel (W and the bits
//            read once for all modules, W*M never written; small_batch_linear_cuda.cu);
//   forward otherwise, and grad_x: W*M_k expanded into a bounded scratch buffer, chunk of modules
//            by chunk (expand_mask_cuda.cu), then cuBLAS: one [M, c*O] GEMM per chunk for a shared
//            input (at::addmm / at::mm), one batched GEMM otherwise (at::baddbmm / at::bmm);
//   grad_scores = (g^T x) * W: no mask, one cuBLAS GEMM and one in-place elementwise product;
//   grad_bias: an ATen reduction.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include "common.cuh"
#include "expand_mask.cuh"
#include "routing.cuh"
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

// The reused scratch buffer of the expanded path: W*M for `chunk` modules.
static at::Tensor scratch_for(const at::Tensor& w, int64_t chunk) {
  return at::empty({chunk, w.size(0), w.size(1)}, w.options());
}

static int64_t chunk_for(const at::Tensor& w, int64_t K) {
  return module_chunk(K, w.numel() * static_cast<int64_t>(w.element_size()));
}

// y [K, M, O] = x_k [M, I] (W * M_k)^T + b. x [Kx, M, I] contiguous, Kx = 1 when shared.
static void forward(const at::Tensor& x, bool shared, const at::Tensor& w,
                    const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t K,
                    int64_t M, at::Tensor& y) {
  if (use_fused(M, w.scalar_type())) {
    at::Tensor b;
    launch_small_batch_linear(x, shared ? 0 : M * w.size(1), w, packed, bias_ptr(bias, b), K, M,
                              y);
    return;
  }
  const int64_t O = w.size(0), I = w.size(1), step = chunk_for(w, K);
  auto buf = scratch_for(w, step);
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int64_t c = std::min(step, K - k0);
    expand_masked_weight(w, packed, k0, c, 1, false, buf);
    auto wk = buf.narrow(0, 0, c);  // [c, O, I]
    auto yk = y.narrow(0, k0, c);   // [c, M, O]
    if (shared) {  // one [M, c*O] GEMM
      auto flat = bias.has_value()
                      ? at::addmm(bias->repeat({c}), x[0], wk.view({c * O, I}).t())
                      : at::mm(x[0], wk.view({c * O, I}).t());
      yk.copy_(flat.view({M, c, O}).transpose(0, 1));
    } else if (bias.has_value()) {
      at::baddbmm_out(yk, bias->expand({c, M, O}), x.narrow(0, k0, c), wk.transpose(1, 2));
    } else {
      at::bmm_out(yk, x.narrow(0, k0, c), wk.transpose(1, 2));
    }
  }
}

// gx [K, M, I] = g_k [M, O] (W * M_k), or [M, I] summed over the modules when shared.
static at::Tensor grad_x(const at::Tensor& g, const at::Tensor& w, const at::Tensor& packed,
                         bool shared, int64_t K, int64_t M) {
  const int64_t O = w.size(0), I = w.size(1), step = chunk_for(w, K);
  auto gx = shared ? at::zeros({M, I}, g.options()) : at::empty({K, M, I}, g.options());
  auto buf = scratch_for(w, step);
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int64_t c = std::min(step, K - k0);
    expand_masked_weight(w, packed, k0, c, 1, false, buf);
    auto wk = buf.narrow(0, 0, c);
    if (shared) {  // one [M, c*O] x [c*O, I] GEMM accumulating into gx
      gx.addmm_(g.narrow(0, k0, c).transpose(0, 1).reshape({M, c * O}), wk.view({c * O, I}));
    } else {
      auto out = gx.narrow(0, k0, c);
      at::bmm_out(out, g.narrow(0, k0, c), wk);
    }
  }
  return gx;
}

// gs [K, O, I] = (g_k^T x_k) * W. x [Kx, M, I], Kx = 1 when shared (one [K*O, M] x [M, I] GEMM).
static at::Tensor grad_scores(const at::Tensor& g, const at::Tensor& x, bool shared,
                              const at::Tensor& w, int64_t K, int64_t M) {
  const int64_t O = w.size(0), I = w.size(1);
  at::Tensor gs = shared ? at::mm(g.transpose(0, 1).reshape({M, K * O}).t(), x[0]).view({K, O, I})
                         : at::bmm(g.transpose(1, 2), x);
  return gs.mul_(w);
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
  auto x3 = x.reshape({1, M, I}).contiguous();
  auto y = at::empty({1, M, O}, x.options());
  if (y.numel() > 0) forward(x3, true, weight.contiguous(), packed.contiguous(), bias, 1, M, y);
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
  auto g = grad_out.reshape({1, M, O}).contiguous();
  auto w = weight.contiguous();
  at::Tensor gx, gs, gb;
  if (output_mask[0]) gx = grad_x(g, w, packed.contiguous(), true, 1, M).view(x.sizes());
  if (output_mask[1]) {
    gs = grad_scores(g, x.reshape({1, M, I}).contiguous(), true, w, 1, M).view({O, I});
  }
  if (output_mask[2]) gb = g.sum(at::IntArrayRef{0, 1});
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
  auto y = at::empty({K, M, O}, x.options());
  if (y.numel() > 0) {
    forward(xk, shared_input, weight.contiguous(), packed.contiguous(), bias, K, M, y);
  }
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
  if (output_mask[0]) gx = grad_x(g, w, packed.contiguous(), shared_input, K, M).view(x.sizes());
  if (output_mask[1]) {
    auto xk = x.reshape({shared_input ? 1 : K, M, I}).contiguous();
    gs = grad_scores(g, xk, shared_input, w, K, M);
  }
  if (output_mask[2]) gb = g.sum(at::IntArrayRef{0, 1});
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
