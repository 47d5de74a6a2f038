// Argument checks shared by every backend: each error names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <vector>

namespace modsplit {

constexpr int64_t kBitsPerWord = 32;

inline int64_t words_for(int64_t cols) { return (cols + kBitsPerWord - 1) / kBitsPerWord; }

// Number of entries a layer of n elements keeps: max(1, round-half-up(density * n)).
inline int64_t keep_count(double density, int64_t n) {
  const int64_t k = static_cast<int64_t>(std::floor(density * static_cast<double>(n) + 0.5));
  return std::min<int64_t>(n, std::max<int64_t>(1, k));
}

inline void check_density(double density) {
  TORCH_CHECK(std::isfinite(density) && density > 0.0 && density <= 1.0,
              "modsplit: density must be in (0, 1], got ", density);
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "modsplit: ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "modsplit: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "modsplit: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// packed must be int32 [lead..., O, ceil(R/32)] for a weight [O, ...]; lead = 0 or 1 dims (K).
inline void check_packed_for_weight(const at::Tensor& packed, const at::Tensor& weight,
                                    int64_t lead_dims) {
  TORCH_CHECK(packed.scalar_type() == at::kInt, "modsplit: packed must be an int32 mask, got ",
              packed.scalar_type());
  check_same_device(packed, weight, "packed", "weight");
  TORCH_CHECK(weight.dim() >= 2, "modsplit: weight must have at least 2 dims, got shape ",
              weight.sizes());
  TORCH_CHECK(packed.dim() == 2 + lead_dims, "modsplit: packed must have ", 2 + lead_dims,
              " dims (", lead_dims ? "[K, O, words]" : "[O, words]", "), got shape ",
              packed.sizes());
  TORCH_CHECK(lead_dims == 0 || packed.size(0) >= 1,
              "modsplit: packed must hold at least one module (K >= 1), got shape ", packed.sizes());
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.numel() / std::max<int64_t>(rows, 1);
  TORCH_CHECK(packed.size(lead_dims) == rows && packed.size(lead_dims + 1) == words_for(cols),
              "modsplit: packed has shape ", packed.sizes(), " but weight of shape ",
              weight.sizes(), " needs [", lead_dims ? "K, " : "", rows, ", ", words_for(cols),
              "]");
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "modsplit: bias must have shape [",
              weight.size(0), "], got ", bias->sizes());
  check_same_device(*bias, weight, "bias", "weight");
  check_same_dtype(*bias, weight, "bias", "weight");
}

// Linear ops: weight [O, I], x [..., I], packed [lead..., O, ceil(I/32)].
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& packed, int64_t lead_dims) {
  check_float(weight, "weight");
  check_same_dtype(x, weight, "x", "weight");
  check_same_device(x, weight, "x", "weight");
  TORCH_CHECK(weight.dim() == 2, "modsplit: weight must be [out_features, in_features], got shape ",
              weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "modsplit: x must end in in_features=",
              weight.size(1), ", got shape ", x.sizes());
  check_packed_for_weight(packed, weight, lead_dims);
}

// The ragged ops' row sets for x [R, ...] and K modules: offsets int64 [K+1] and rows int64 [T]
// (or none: T = R) on x's device. Checks shapes, dtypes and devices (not offsets' or rows'
// values, which each backend reads its own way) and returns T.
inline int64_t check_ragged_index(const at::Tensor& x, int64_t K, const at::Tensor& offsets,
                                  const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == K + 1,
              "modsplit: offsets must be int64 [K+1=", K + 1, "], got ", offsets.scalar_type(),
              " ", offsets.sizes());
  check_same_device(offsets, x, "offsets", "x");
  if (!rows.has_value()) return x.size(0);
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1,
              "modsplit: rows must be an int64 vector, got ", rows->scalar_type(), " ",
              rows->sizes());
  check_same_device(*rows, x, "rows", "x");
  return rows->size(0);
}

// The ragged linear ops' shapes: x [R, I], weight [O, I], packed [K, O, words], offsets and rows
// as check_ragged_index; returns T.
inline int64_t check_ragged_shapes(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const at::Tensor& offsets,
                                   const c10::optional<at::Tensor>& rows) {
  check_linear_args(x, weight, packed, 1);
  TORCH_CHECK(x.dim() == 2, "modsplit: x must be [R, in_features], got shape ", x.sizes());
  return check_ragged_index(x, packed.size(0), offsets, rows);
}

// The values of offsets and rows of CPU tensors (checked as check_ragged_index): 0 <= rows < R
// (x's rows), offsets rising from 0 to T.
inline void check_ragged_values(int64_t R, const at::Tensor& offsets,
                                const c10::optional<at::Tensor>& rows, int64_t T) {
  if (rows.has_value()) {
    const auto r = rows->contiguous();
    const int64_t* rp = r.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(rp[t] >= 0 && rp[t] < R, "modsplit: rows must lie in [0, ", R,
                  ") (the rows of x), got rows[", t, "] = ", rp[t]);
    }
  }
  const auto o = offsets.contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  const int64_t K = offsets.size(0) - 1;
  TORCH_CHECK(op[0] == 0 && op[K] == T, "modsplit: offsets must rise from 0 to ", T,
              " (the rows the modules take), got offsets[0] = ", op[0], ", offsets[K] = ", op[K]);
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(op[k + 1] >= op[k], "modsplit: offsets must not decrease, got offsets[", k,
                "] = ", op[k], " > offsets[", k + 1, "] = ", op[k + 1]);
  }
}

// pack_mask: mask bool [lead..., rest...] with lead = batch_dims + 1 dims, viewed as rows x cols.
struct PackGeom {
  int64_t rows, cols, words;
  std::vector<int64_t> out_shape;  // [lead..., words]
};

// Checks pack_mask's arguments and returns its geometry.
inline PackGeom check_pack_args(const at::Tensor& mask, int64_t batch_dims) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "modsplit: mask must be a bool tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(batch_dims >= 0 && mask.dim() >= batch_dims + 2,
              "modsplit: mask must have at least batch_dims + 2 = ", batch_dims + 2,
              " dims, got shape ", mask.sizes(), " (batch_dims = ", batch_dims, ")");
  const auto lead = mask.sizes().slice(0, batch_dims + 1);
  PackGeom g;
  g.rows = c10::multiply_integers(lead);
  g.cols = g.rows ? mask.numel() / g.rows : 0;
  g.words = words_for(g.cols);
  g.out_shape.assign(lead.begin(), lead.end());
  g.out_shape.push_back(g.words);
  return g;
}

}  // namespace modsplit
