// topk_mask / multi_topk_mask on the CPU: exact top-k of |scores| per layer (per module) by an
// O(n) select on integer keys, written straight into packed int32 words: a sample brackets the
// threshold, one pass counts the keys above the bracket and gathers those inside it, the
// threshold is selected among those, one pass writes the words (see topk_pack).
//
// Keys: the bit pattern of |x| (sign bit cleared) orders non-negative floats like their values,
// so selection runs on integers: float32 -> 31-bit key, float64 -> 63-bit key, float16 /
// bfloat16 -> 15-bit key (their own bit pattern, no conversion). +0 and -0 get the same key 0.
// NaN keys are larger than the +inf key; any NaN in scores is an error.
//
// Work is split into tasks = (module m, chunk c); a chunk is a contiguous range of output words
// of one module, hence a contiguous range of its flat elements. Both passes over the scores run
// over all tasks in one at::parallel_for, so a single big layer and a bank
// of many modules both keep every thread busy. Gathered keys are per task, which also gives each
// chunk its count of elements equal to the threshold: chunks then resolve ties (lower flat index
// first) independently, in one write pass.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "topk_select.h"

namespace modsplit {
namespace {

using topk_select::topk_pack;

// scores [lead..., O, ...] with lead_dims (0 or 1) leading module dims -> int32 [lead..., O, W].
at::Tensor topk_rows(const at::Tensor& scores, double density, int64_t lead_dims) {
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "modsplit: scores must be float32, float64, float16 or bfloat16, got dtype ", dtype);
  check_density(density);
  TORCH_CHECK(scores.dim() >= lead_dims + 2, "modsplit: scores must have at least ", lead_dims + 2,
              " dims, got shape ", scores.sizes());
  TORCH_CHECK(scores.numel() > 0, "modsplit: scores must not be empty, got shape ",
              scores.sizes());
  const int64_t modules = lead_dims ? scores.size(0) : 1;
  const int64_t rows = scores.size(lead_dims);
  const int64_t n = scores.numel() / modules;
  const int64_t cols = n / rows;
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().begin() + lead_dims + 1);
  out_shape.push_back(words_for(cols));
  auto out = at::empty(out_shape, scores.options().dtype(at::kInt));
  const auto s = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "topk_mask_cpu", [&] {
    topk_pack<scalar_t>(s.const_data_ptr<scalar_t>(), out.data_ptr<int32_t>(), modules, rows,
                        cols, keep_count(density, n));
  });
  return out;
}

}  // namespace

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
