// pack_mask / unpack_mask on the CPU, one 32-bit word at a time, parallel over all words.
//
// pack: 8 bools (bytes 0/1) are gathered into one byte by a single multiply: byte i of the
// little-endian uint64 x times 0x0102040810204080 lands at bit 56 + i, with no carries.
// unpack: each mask byte expands to 8 bools through a 256-entry table of uint64 byte patterns.
#include "pack_mask_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>

#include "../checks.h"

namespace modsplit {
namespace {

// bytes b[0..7] (each 0 or 1) -> the byte whose bit i is b[i].
inline uint32_t gather8(const uint8_t* b) {
  uint64_t x;
  std::memcpy(&x, b, sizeof(x));
  return static_cast<uint32_t>(((x & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56);
}

// kSpread[v]: 8 bytes, byte i = bit i of v (little-endian).
constexpr std::array<uint64_t, 256> make_spread() {
  std::array<uint64_t, 256> t{};
  for (int v = 0; v < 256; ++v) {
    for (int i = 0; i < 8; ++i) t[v] |= static_cast<uint64_t>((v >> i) & 1) << (8 * i);
  }
  return t;
}
constexpr std::array<uint64_t, 256> kSpread = make_spread();

}  // namespace

at::Tensor pack_mask_cpu(const at::Tensor& mask, int64_t batch_dims) {
  const PackGeom g = check_pack_args(mask, batch_dims);
  const int64_t rows = g.rows, cols = g.cols, words = g.words;
  auto out = at::empty(g.out_shape, mask.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const auto m = mask.contiguous();
  const uint8_t* src = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, rows * words, at::internal::GRAIN_SIZE / 32, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t w = u % words;
      const uint8_t* b = src + (u / words) * cols + w * 32;
      const int64_t len = std::min<int64_t>(32, cols - w * 32);
      uint32_t bits = 0;
      if (len == 32) {
        bits = gather8(b) | gather8(b + 8) << 8 | gather8(b + 16) << 16 | gather8(b + 24) << 24;
      } else {
        for (int64_t j = 0; j < len; ++j) bits |= static_cast<uint32_t>(b[j] != 0) << j;
      }
      dst[u] = static_cast<int32_t>(bits);
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
              packed.sizes().slice(0, std::max<int64_t>(lead_dims, 0)), " and add at least one");
  for (const int64_t d : shape) {
    TORCH_CHECK(d >= 0, "modsplit: shape ", shape, " has a negative size");
  }
  const int64_t rows = c10::multiply_integers(shape.slice(0, lead_dims));
  const int64_t cols = c10::multiply_integers(shape.slice(lead_dims));
  const int64_t words = packed.size(-1);
  TORCH_CHECK(words == words_for(cols), "modsplit: shape ", shape, " needs ", words_for(cols),
              " words per row but packed has ", words);
  auto out = at::empty(shape, packed.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  const auto p = packed.contiguous();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.const_data_ptr<int32_t>());
  uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  at::parallel_for(0, rows * words, at::internal::GRAIN_SIZE / 32, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t w = u % words;
      uint8_t* b = dst + (u / words) * cols + w * 32;
      const int64_t len = std::min<int64_t>(32, cols - w * 32);
      const uint32_t bits = src[u];
      if (len == 32) {
        for (int i = 0; i < 4; ++i) std::memcpy(b + 8 * i, &kSpread[(bits >> (8 * i)) & 0xff], 8);
      } else {
        for (int64_t j = 0; j < len; ++j) b[j] = (bits >> j) & 1u;
      }
    }
  });
  return out;
}

}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CPU, m) {
  m.impl("pack_mask", &modsplit::pack_mask_cpu);
  m.impl("unpack_mask", &modsplit::unpack_mask_cpu);
}
