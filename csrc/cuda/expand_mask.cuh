// The bit-expansion kernel of the expanded path: W*M_k in W's dtype for a chunk of modules, the
// operand that cuBLAS / cuDNN then consume (routing.cuh).
#pragma once
#include <ATen/ATen.h>

namespace modsplit {
namespace cuda {

// out [c, O, R] (module-major) or, with group_major, [G, c, O/G, R] (rows of group g of all c
// modules together: the weight of one grouped convolution of a shared input, groups = G) =
// w [O, R] * bits of packed [K, O, ceil(R/32)] for modules k0 .. k0 + c - 1. w, packed and out are
// contiguous; out may be larger than needed (a reused scratch buffer): its first c*O*R elements
// are written.
void expand_masked_weight(const at::Tensor& w, const at::Tensor& packed, int64_t k0, int64_t c,
                          int64_t groups, bool group_major, at::Tensor& out);

}  // namespace cuda
}  // namespace modsplit
