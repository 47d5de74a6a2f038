// pack_mask / unpack_mask on the CPU (naive first version).
#include "pack_mask_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace modsplit {

at::Tensor pack_mask_cpu(const at::Tensor& mask, int64_t batch_dims) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "modsplit: mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(batch_dims >= 0 && mask.dim() >= batch_dims + 2,
              "modsplit: mask must have at least batch_dims + 2 = ", batch_dims + 2,
              " dims, got shape ", mask.sizes());
  const auto lead = mask.sizes().slice(0, batch_dims + 1);
  const int64_t rows = c10::multiply_integers(lead);
  const int64_t cols = rows ? mask.numel() / rows : 0;
  const int64_t words = words_for(cols);
  auto m = mask.contiguous().view({rows, cols});
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  out_shape.push_back(words);
  auto out = at::zeros(out_shape, mask.options().dtype(at::kInt));
  const bool* src = m.data_ptr<bool>();
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        if (src[r * cols + c]) {
          dst[r * words + c / 32] |= static_cast<int32_t>(1u << (c % 32));
        }
      }
    }
  });
  return out;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, at::IntArrayRef shape) {
  TORCH_CHECK(packed.scalar_type() == at::kInt, "modsplit: packed must be int32, got ",
              packed.scalar_type());
  const int64_t lead_dims = packed.dim() - 1;
  TORCH_CHECK(lead_dims >= 1 && static_cast<int64_t>(shape.size()) > lead_dims &&
                  shape.slice(0, lead_dims) == packed.sizes().slice(0, lead_dims),
              "modsplit: shape ", shape, " must start with packed's leading dims ",
              packed.sizes().slice(0, std::max<int64_t>(lead_dims, 0)));
  const int64_t rows = c10::multiply_integers(shape.slice(0, lead_dims));
  const int64_t cols = c10::multiply_integers(shape.slice(lead_dims));
  const int64_t words = packed.size(-1);
  TORCH_CHECK(words == words_for(cols), "modsplit: shape ", shape, " needs ", words_for(cols),
              " words per row but packed has ", words);
  auto p = packed.contiguous();
  auto out = at::empty({rows, cols}, packed.options().dtype(at::kBool));
  const int32_t* src = p.data_ptr<int32_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        dst[r * cols + c] = (static_cast<uint32_t>(src[r * words + c / 32]) >> (c % 32)) & 1u;
      }
    }
  });
  return out.view(shape);
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("pack_mask", &modsplit::pack_mask_cpu);
  m.impl("unpack_mask", &modsplit::unpack_mask_cpu);
}
