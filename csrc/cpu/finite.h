// all_finite / finite_values: whether a contiguous float32 / float64 tensor (or range) holds no
// NaN or inf. The CPU paths that visit only kept weights (masked_linear's bit walk and lane-mask
// paths, multi_masked_conv2d's sparse path) equal the product with W*M only while their input is
// finite: a NaN/inf input
// times a masked-out zero must still give NaN, as in F.linear / F.conv2d on W*M. One pass, no
// temporaries: a float is finite iff its exponent bits are not all ones.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace modsplit {
namespace cpu {

template <typename Bits, Bits kExponent>
bool exponents_finite(const void* data, int64_t n) {
  const auto* p = static_cast<const Bits*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((p[i] & kExponent) == kExponent);
  return bad == 0;
}

// Whether the n values at p (float or double) are all finite.
template <typename T>
bool finite_values(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return exponents_finite<uint32_t, 0x7f800000u>(p, n);
  } else {
    static_assert(std::is_same_v<T, double>, "float or double");
    return exponents_finite<uint64_t, 0x7ff0000000000000ull>(p, n);
  }
}

inline bool all_finite(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  if (t.scalar_type() == at::kFloat) return finite_values(t.const_data_ptr<float>(), t.numel());
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kDouble);
  return finite_values(t.const_data_ptr<double>(), t.numel());
}

}  // namespace cpu
}  // namespace modsplit
