// pack_mask / unpack_mask on CUDA. Packing: one warp per output word, __ballot_sync of the 32
// bools; unpacking: one thread per output bool.
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include "common.cuh"

namespace modsplit {
namespace cuda {

// mask uint8 (bool) [rows, cols] contiguous -> out int32 [rows, words]; grid-strided warps.
__global__ void pack_mask_kernel(const uint8_t* __restrict__ mask, int32_t* __restrict__ out,
                                 int64_t cols, int64_t words, int64_t total_words) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t step = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = first; w < total_words; w += step) {  // w is the same for all 32 lanes
    const int64_t row = w / words;
    const int64_t col = (w - row * words) * 32 + lane;
    const bool bit = col < cols && mask[row * cols + col] != 0;
    const unsigned int word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) out[w] = static_cast<int32_t>(word);
  }
}

// packed int32 [rows, words] contiguous -> out uint8 (bool) [rows, cols]; grid-strided threads.
__global__ void unpack_mask_kernel(const int32_t* __restrict__ packed, uint8_t* __restrict__ out,
                                   int64_t cols, int64_t words, int64_t total) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    const uint32_t word = static_cast<uint32_t>(packed[row * words + col / 32]);
    out[i] = static_cast<uint8_t>((word >> (col % 32)) & 1u);
  }
}

at::Tensor pack_mask_cuda(const at::Tensor& mask, int64_t batch_dims) {
  check_cuda(mask, "mask");
  const PackGeom g = check_pack_args(mask, batch_dims);
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t rows = g.rows, cols = g.cols, words = g.words;
  auto out = at::empty(g.out_shape, mask.options().dtype(at::kInt));
  const int64_t total_words = rows * words;
  if (total_words == 0) return out;
  auto m = mask.contiguous();
  constexpr int kThreads = 256;
  pack_mask_kernel<<<blocks_for(total_words * 32, kThreads), kThreads, 0,
                     current_stream()>>>(
      reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), out.data_ptr<int32_t>(), cols, words,
      total_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, at::IntArrayRef shape) {
  check_cuda(packed, "packed");
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
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(shape, packed.options().dtype(at::kBool));
  const int64_t total = rows * cols;
  if (total == 0) return out;
  auto p = packed.contiguous();
  constexpr int kThreads = 256;
  unpack_mask_kernel<<<blocks_for(total, kThreads), kThreads, 0,
                       current_stream()>>>(
      p.data_ptr<int32_t>(), reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), cols, words, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("pack_mask", &modsplit::cuda::pack_mask_cuda);
  m.impl("unpack_mask", &modsplit::cuda::unpack_mask_cuda);
}
