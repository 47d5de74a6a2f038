// topk_mask / multi_topk_mask on the CPU (naive first version: stable sort).
#include <torch/library.h>

#include "../checks.h"
#include "pack_mask_cpu.h"

namespace modsplit {

static at::Tensor topk_rows(const at::Tensor& scores, double density, int64_t lead_dims) {
  check_float(scores, "scores");
  check_density(density);
  TORCH_CHECK(scores.dim() >= lead_dims + 2, "modsplit: scores must have at least ", lead_dims + 2,
              " dims, got shape ", scores.sizes());
  TORCH_CHECK(scores.numel() > 0, "modsplit: scores must not be empty, got shape ",
              scores.sizes());
  TORCH_CHECK(!at::isnan(scores).any().item<bool>(), "modsplit: scores contain NaN");
  const int64_t layers = lead_dims ? scores.size(0) : 1;
  auto flat = scores.reshape({layers, -1}).abs();
  const int64_t n = flat.size(1);
  const int64_t k = keep_count(density, n);
  auto order = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  auto keep = at::zeros({layers, n}, scores.options().dtype(at::kBool));
  keep.scatter_(1, order.narrow(1, 0, k), true);
  return pack_mask_cpu(keep.view(scores.sizes()), lead_dims);
}

at::Tensor topk_mask_cpu(const at::Tensor& scores, double density) {
  return topk_rows(scores, density, 0);
}

at::Tensor multi_topk_mask_cpu(const at::Tensor& scores, double density) {
  return topk_rows(scores, density, 1);
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("topk_mask", &modsplit::topk_mask_cpu);
  m.impl("multi_topk_mask", &modsplit::multi_topk_mask_cpu);
}
