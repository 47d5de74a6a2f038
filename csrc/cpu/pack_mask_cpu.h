#pragma once
#include <ATen/ATen.h>

namespace modsplit {
// bool [lead..., rest...] -> int32 [lead..., ceil(prod(rest)/32)], lead = batch_dims + 1 dims.
at::Tensor pack_mask_cpu(const at::Tensor& mask, int64_t batch_dims);
// int32 [lead..., words] -> bool `shape`, where shape starts with lead... .
at::Tensor unpack_mask_cpu(const at::Tensor& packed, at::IntArrayRef shape);
}  // namespace modsplit
