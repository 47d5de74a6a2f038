// topk_mask / multi_topk_mask on CUDA: exact radix select, batched over layers (modules).
//
// For each layer l (one per module; a single layer for topk_mask) of n = O*R scores:
//   key(s) = bits of |s| (the sign bit cleared), an unsigned integer ordered like |s|:
//            uint32 of the fp32 bits, uint32 of the raw 16 bits for fp16/bf16, uint64 for fp64.
//   1. radix passes, 8-bit digits from the most significant: a multi-block histogram (grid
//      chunks x layers) of the digit among keys matching the prefix found so far, then one thread
//      per layer picks the digit holding the `remaining`-th largest key. After all passes the
//      prefix is the threshold key t (the n_keep-th largest) and `remaining` the number of keys
//      equal to t that are kept.
//   2. count keys == t per chunk of 256 output words, exclusive scan over chunks (at::cumsum).
//   3. write the packed words: warp-wide ballots keep key > t, and key == t while the rank of the
//      equal key in flat order is < remaining (ties go to the lower flat index).
// Bits equal the CPU kernel's (stable sort of |s|, descending).
// NaN scores: the histogram passes set a persistent per-device flag. No host sync by default
// (MODSPLIT_NAN_CHECK=lazy): after its kernels a call queues a copy of the flag into pinned host
// memory and records an event; a later call on the device raises once that event has completed
// and the copy shows a NaN (nothing is copied while the stream is being captured into a CUDA
// graph: the replays set the flag and the next eager call reports it). MODSPLIT_NAN_CHECK=sync
// reads the flag in the call (one host sync; not capturable).
// Not yet run on a GPU (written and compiled on a GPU-less machine).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "common.cuh"

namespace modsplit {
namespace cuda {

// raw_t: the stored bits; key_t: the ordered key; kBits: significant key bits; kInf: key of +inf
// (keys above it are NaN).
template <typename scalar_t>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using raw_t = uint32_t;
  using key_t = uint32_t;
  static constexpr int kBits = 32;
  static constexpr key_t kInf = 0x7f800000u;
  __device__ static key_t key(raw_t r) { return r & 0x7fffffffu; }
};

template <>
struct KeyTraits<double> {
  using raw_t = uint64_t;
  using key_t = uint64_t;
  static constexpr int kBits = 64;
  static constexpr key_t kInf = 0x7ff0000000000000ull;
  __device__ static key_t key(raw_t r) { return r & 0x7fffffffffffffffull; }
};

template <>
struct KeyTraits<at::Half> {
  using raw_t = uint16_t;
  using key_t = uint32_t;
  static constexpr int kBits = 16;
  static constexpr key_t kInf = 0x7c00u;
  __device__ static key_t key(raw_t r) { return r & 0x7fffu; }
};

template <>
struct KeyTraits<at::BFloat16> {
  using raw_t = uint16_t;
  using key_t = uint32_t;
  static constexpr int kBits = 16;
  static constexpr key_t kInf = 0x7f80u;
  __device__ static key_t key(raw_t r) { return r & 0x7fffu; }
};

constexpr int kDigitBits = 8;
constexpr int kDigits = 1 << kDigitBits;
constexpr int kHistThreads = 256;
constexpr int kWarps = 8;                        // write/count kernels: 8 warps per block,
constexpr int kChunkWords = kWarps * 32;         // each warp owns 32 consecutive output words

// Histogram of digit (key >> shift) & 255 over keys whose bits above shift + 8 equal prefix[l].
// raw [L, n]; grid (chunks, L); block b of layer l reads elements [b*chunk, (b+1)*chunk).
// prefix [L] (key bits chosen so far), hist [L, 256] accumulated with atomics; nan_flag [1].
template <typename Tr>
__global__ void __launch_bounds__(kHistThreads)
radix_hist_kernel(const typename Tr::raw_t* __restrict__ raw, int64_t n, int64_t chunk, int shift,
                  const unsigned long long* __restrict__ prefix, unsigned long long* hist,
                  int* nan_flag) {
  using key_t = typename Tr::key_t;
  __shared__ unsigned int local[kDigits];
  for (int i = threadIdx.x; i < kDigits; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const int64_t layer = blockIdx.y;
  const int high = shift + kDigitBits;  // bits >= high must match the prefix
  const key_t high_mask = high >= Tr::kBits ? key_t(0) : static_cast<key_t>(~key_t(0) << high);
  const key_t want = static_cast<key_t>(prefix[layer]) & high_mask;
  const typename Tr::raw_t* src = raw + layer * n;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  bool nan = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const key_t k = Tr::key(src[i]);
    nan |= k > Tr::kInf;
    if ((k & high_mask) == want) atomicAdd(&local[(k >> shift) & (kDigits - 1)], 1u);
  }
  if (nan) *nan_flag = 1;
  __syncthreads();
  for (int i = threadIdx.x; i < kDigits; i += blockDim.x) {
    if (local[i]) atomicAdd(&hist[layer * kDigits + i], static_cast<unsigned long long>(local[i]));
  }
}

// One thread per layer: walk the histogram hist [L, 256] from the top digit and pick the digit d
// holding the remaining-th largest key; prefix |= d << shift, remaining -= keys above d.
// Invariant: 1 <= remaining <= (keys matching the prefix), so the walk stops at d >= 0.
__global__ void radix_pick_kernel(const unsigned long long* __restrict__ hist, int shift,
                                  unsigned long long* prefix, long long* remaining, int64_t layers) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= layers) return;
  const unsigned long long* h = hist + l * kDigits;
  long long rem = remaining[l];
  int d = kDigits - 1;
  for (; d > 0; --d) {
    const long long c = static_cast<long long>(h[d]);
    if (rem <= c) break;
    rem -= c;
  }
  prefix[l] |= static_cast<unsigned long long>(d) << shift;
  remaining[l] = rem;
}

// Loads the keys of warp-owned words: word w = first + j (j < 32) of the layer, element of lane =
// flat o*R + 32*(w % words) + lane with o = w / words. valid bit j: word and column exist.
template <typename Tr>
__device__ __forceinline__ void load_word_keys(const typename Tr::raw_t* src, int64_t first,
                                               int64_t total_words, int64_t words, int64_t R,
                                               int lane, typename Tr::key_t (&keys)[32],
                                               unsigned int& valid) {
  valid = 0;
  int64_t o = first / words;             // row of word first + j, advanced without dividing
  int64_t word_in_row = first - o * words;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    keys[j] = 0;
    const int64_t col = word_in_row * 32 + lane;
    if (first + j < total_words && col < R) {
      keys[j] = Tr::key(src[o * R + col]);
      valid |= 1u << j;
    }
    if (++word_in_row == words) {
      word_in_row = 0;
      ++o;
    }
  }
}

// counts [L, chunks]: number of keys == threshold[l] in each chunk of kChunkWords words.
// raw [L, O*R]; grid (chunks, L); block kWarps warps.
template <typename Tr>
__global__ void __launch_bounds__(kWarps * 32)
count_equal_kernel(const typename Tr::raw_t* __restrict__ raw, int64_t n, int64_t R, int64_t words,
                   int64_t total_words, const unsigned long long* __restrict__ threshold,
                   long long* __restrict__ counts) {
  using key_t = typename Tr::key_t;
  __shared__ int per_warp[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t layer = blockIdx.y;
  const key_t t = static_cast<key_t>(threshold[layer]);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunkWords + warp * 32;
  key_t keys[32];
  unsigned int valid;
  load_word_keys<Tr>(raw + layer * n, first, total_words, words, R, lane, keys, valid);
  int count = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) count += ((valid >> j) & 1u) && keys[j] == t;
  count = warp_sum(count);
  if (lane == 0) per_warp[warp] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int i = 0; i < kWarps; ++i) total += per_warp[i];
    counts[layer * gridDim.x + blockIdx.x] = total;
  }
}

// out int32 [L, O, words]: packed keep bits. before [L, chunks]: keys == threshold in earlier
// chunks of the layer (exclusive scan of count_equal_kernel's counts). Same grid as the count.
template <typename Tr>
__global__ void __launch_bounds__(kWarps * 32)
write_mask_kernel(const typename Tr::raw_t* __restrict__ raw, int64_t n, int64_t R, int64_t words,
                  int64_t total_words, const unsigned long long* __restrict__ threshold,
                  const long long* __restrict__ remaining, const long long* __restrict__ before,
                  int32_t* __restrict__ out) {
  using key_t = typename Tr::key_t;
  __shared__ int per_warp[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t layer = blockIdx.y;
  const key_t t = static_cast<key_t>(threshold[layer]);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunkWords + warp * 32;
  key_t keys[32];
  unsigned int valid;
  load_word_keys<Tr>(raw + layer * n, first, total_words, words, R, lane, keys, valid);
  int count = 0;
#pragma unroll
  for (int j = 0; j < 32; ++j) count += ((valid >> j) & 1u) && keys[j] == t;
  count = warp_sum(count);
  if (lane == 0) per_warp[warp] = count;
  __syncthreads();
  // rank (in flat order within the layer) of the next key == t seen by this warp
  long long rank = before[layer * gridDim.x + blockIdx.x];
  for (int i = 0; i < warp; ++i) rank += per_warp[i];
  const long long keep_equal = remaining[layer];
  int32_t* dst = out + layer * total_words;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const bool ok = (valid >> j) & 1u;
    const bool equal = ok && keys[j] == t;
    const unsigned int equal_bits = __ballot_sync(0xffffffffu, equal);
    const long long my_rank = rank + __popc(equal_bits & lanes_below(lane));
    const bool keep = (ok && keys[j] > t) || (equal && my_rank < keep_equal);
    const unsigned int word = __ballot_sync(0xffffffffu, keep);
    if (lane == 0 && first + j < total_words) dst[first + j] = static_cast<int32_t>(word);
    rank += __popc(equal_bits);
  }
}

// The NaN flag of one device and the pinned copy a lazy check reads.
struct NanState {
  at::Tensor flag;  // int32 [1] on the device, set by radix_hist_kernel
  at::Tensor host;  // int32 [1] pinned
  cudaEvent_t copied = nullptr;
  bool pending = false;
};

static std::mutex nan_mutex;
static auto& nan_states = *new std::unordered_map<int, NanState>();  // never destroyed: outlives CUDA

static bool nan_check_sync() {
  const char* raw = std::getenv("MODSPLIT_NAN_CHECK");
  if (raw == nullptr || *raw == '\0' || std::strcmp(raw, "lazy") == 0) return false;
  TORCH_CHECK(std::strcmp(raw, "sync") == 0,
              "modsplit: $MODSPLIT_NAN_CHECK must be one of lazy, sync, got '", raw, "'");
  return true;
}

static bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// The device's flag; first raises the NaN an earlier lazy call found, once its copy has landed.
// (The first call on a device, which allocates the flag, must not be inside a capture.)
static at::Tensor nan_flag_for(const at::Tensor& scores) {
  std::lock_guard<std::mutex> lock(nan_mutex);
  NanState& st = nan_states[scores.get_device()];
  if (!st.flag.defined()) {
    st.flag = at::zeros({1}, scores.options().dtype(at::kInt));
    st.host = at::zeros({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));
  }
  if (capturing()) return st.flag;  // no event query inside a capture
  if (st.pending && cudaEventQuery(st.copied) == cudaSuccess) {
    st.pending = false;
    if (st.host.data_ptr<int>()[0] != 0) {
      st.host.data_ptr<int>()[0] = 0;
      st.flag.zero_();
      TORCH_CHECK(false, "modsplit: scores contain NaN (found by an earlier topk_mask "
                        "call on this device; $MODSPLIT_NAN_CHECK=sync reports it in the call "
                        "itself)");
    }
  }
  (void)cudaGetLastError();  // cudaErrorNotReady from the query is not an error
  return st.flag;
}

// After the kernels: check now (sync) or queue the flag's copy for a later call (lazy).
static void nan_after_launch(const at::Tensor& scores, const at::Tensor& flag) {
  if (nan_check_sync()) {
    if (flag.item<int>() != 0) {
      flag.zero_();
      TORCH_CHECK(false, "modsplit: scores contain NaN");
    }
    return;
  }
  if (capturing()) return;  // the replays set the flag; the next eager call copies it
  auto stream = current_stream();
  std::lock_guard<std::mutex> lock(nan_mutex);
  NanState& st = nan_states[scores.get_device()];
  C10_CUDA_CHECK(cudaMemcpyAsync(st.host.data_ptr<int>(), flag.data_ptr<int>(), sizeof(int),
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaEventRecord(st.copied, stream));
  st.pending = true;
}

template <typename scalar_t>
static void topk_select(const at::Tensor& scores, int64_t layers, int64_t rows, int64_t R,
                        int64_t n_keep, at::Tensor& out) {
  using Tr = KeyTraits<scalar_t>;
  using raw_t = typename Tr::raw_t;
  const int64_t n = rows * R;
  const int64_t words = words_for(R);
  const int64_t total_words = rows * words;
  const raw_t* raw = reinterpret_cast<const raw_t*>(scores.data_ptr<scalar_t>());
  auto stream = current_stream();
  auto opts = scores.options().dtype(at::kLong);
  constexpr int kPasses = Tr::kBits / kDigitBits;
  auto hist = at::zeros({kPasses, layers, kDigits}, opts);
  auto prefix = at::zeros({layers}, opts);
  auto remaining = at::full({layers}, n_keep, opts);
  auto nan_flag = nan_flag_for(scores);
  auto* prefix_p = reinterpret_cast<unsigned long long*>(prefix.data_ptr<int64_t>());
  auto* remaining_p = reinterpret_cast<long long*>(remaining.data_ptr<int64_t>());

  // ~8 blocks per SM in all, at least 4096 elements per block
  const int64_t target = std::max<int64_t>(1, 8 * sm_count() / layers);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((n + 4095) / 4096, target));
  const int64_t chunk = (n + chunks - 1) / chunks;
  for (int p = 0; p < kPasses; ++p) {
    const int shift = Tr::kBits - kDigitBits * (p + 1);
    auto* h = reinterpret_cast<unsigned long long*>(hist[p].data_ptr<int64_t>());
    radix_hist_kernel<Tr><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(layers)),
                            kHistThreads, 0, stream>>>(raw, n, chunk, shift, prefix_p, h,
                                                       nan_flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_pick_kernel<<<blocks_for(layers, 128), 128, 0, stream>>>(h, shift, prefix_p, remaining_p,
                                                                  layers);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t word_chunks = (total_words + kChunkWords - 1) / kChunkWords;
  const dim3 grid(static_cast<unsigned>(word_chunks), static_cast<unsigned>(layers));
  auto counts = at::empty({layers, word_chunks}, opts);
  count_equal_kernel<Tr><<<grid, kWarps * 32, 0, stream>>>(
      raw, n, R, words, total_words, prefix_p,
      reinterpret_cast<long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto before = (counts.cumsum(1) - counts).contiguous();
  write_mask_kernel<Tr><<<grid, kWarps * 32, 0, stream>>>(
      raw, n, R, words, total_words, prefix_p, remaining_p,
      reinterpret_cast<const long long*>(before.data_ptr<int64_t>()), out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nan_after_launch(scores, nan_flag);
}

// scores [L, O, ...] (lead_dims = 1) or [O, ...] (lead_dims = 0) -> int32 [L?, O, ceil(R/32)].
static at::Tensor topk_rows_cuda(const at::Tensor& scores, double density, int64_t lead_dims) {
  check_cuda(scores, "scores");
  check_float(scores, "scores");
  check_density(density);
  TORCH_CHECK(scores.dim() >= lead_dims + 2, "modsplit: scores must have at least ", lead_dims + 2,
              " dims, got shape ", scores.sizes());
  TORCH_CHECK(scores.numel() > 0, "modsplit: scores must not be empty, got shape ",
              scores.sizes());
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t layers = lead_dims ? scores.size(0) : 1;
  const int64_t rows = scores.size(lead_dims);
  const int64_t R = scores.numel() / (layers * rows);
  TORCH_CHECK(layers <= 65535, "modsplit: at most 65535 modules per call, got ", layers);
  const int64_t n_keep = keep_count(density, rows * R);
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().begin() + lead_dims + 1);
  out_shape.push_back(words_for(R));
  auto out = at::empty(out_shape, scores.options().dtype(at::kInt));
  auto s = scores.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "topk_mask_cuda", [&] {
    topk_select<scalar_t>(s, layers, rows, R, n_keep, out);
  });
  return out;
}

at::Tensor topk_mask_cuda(const at::Tensor& scores, double density) {
  return topk_rows_cuda(scores, density, 0);
}

at::Tensor multi_topk_mask_cuda(const at::Tensor& scores, double density) {
  return topk_rows_cuda(scores, density, 1);
}

}  // namespace cuda
}  // namespace modsplit

TORCH_LIBRARY_IMPL(modsplit, CUDA, m) {
  m.impl("topk_mask", &modsplit::cuda::topk_mask_cuda);
  m.impl("multi_topk_mask", &modsplit::cuda::multi_topk_mask_cuda);
}
