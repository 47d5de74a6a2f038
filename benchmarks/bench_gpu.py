"""GPU benchmarks of the CUDA kernels (skipped without a CUDA device or a CUDA build of _C).

    python -m pytest benchmarks/bench_gpu.py --benchmark-only --benchmark-group-by=group

Each case runs beside its baseline in the same group; extra_info holds achieved GB/s and the share
of the device's peak DRAM bandwidth where torch reports the memory clock and bus width.
"""
import pytest
import torch
import torch.nn.functional as F

import modsplit  # noqa: F401  (registers the ops)
from modsplit import reference

_ops = torch.ops.modsplit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not torch._C._dispatch_has_kernel_for_dispatch_key("modsplit::masked_linear", "CUDA"),
        reason="modsplit._C was built without CUDA kernels"),
]


def _peak_bytes_per_s():
    """Theoretical DRAM bandwidth in bytes/s (DDR: 2 transfers per clock), or None."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def _run(benchmark, fn, bytes_moved=None):
    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    synced()  # warm-up (compiles nothing; fills caches and the allocator)
    benchmark.pedantic(synced, rounds=50, iterations=1, warmup_rounds=5)
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    if bytes_moved is not None:
        gbps = bytes_moved / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(gbps, 1)
        peak = _peak_bytes_per_s()
        if peak:
            benchmark.extra_info["share_of_peak"] = round(gbps * 1e9 / peak, 3)


# multi_masked_linear, K = 10 modules over one 4096 x 4096 bf16 weight, batch <= 16.
K, O, I = 10, 4096, 4096


@pytest.fixture(scope="module")
def bank():
    torch.manual_seed(0)
    w = torch.randn(O, I, device="cuda", dtype=torch.bfloat16)
    packed = _ops.multi_topk_mask(torch.randn(K, O, I, device="cuda"), 0.3)
    return w, packed


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.benchmark(group="multi_masked_linear_small_batch")
def test_multi_masked_linear_small_batch(benchmark, bank, batch):
    w, packed = bank
    x = torch.randn(batch, I, device="cuda", dtype=torch.bfloat16)
    bytes_moved = w.numel() * w.element_size() + packed.numel() * 4  # W once + K packed masks
    _run(benchmark, lambda: _ops.multi_masked_linear(x, w, packed, None, True), bytes_moved)


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.benchmark(group="multi_masked_linear_small_batch")
def test_loop_of_dense_linear_baseline(benchmark, bank, batch):
    w, packed = bank
    x = torch.randn(batch, I, device="cuda", dtype=torch.bfloat16)
    masks = reference.unpack_mask(packed, (K, O, I)).to(w.dtype)  # unpacked once, outside timing
    _run(benchmark, lambda: torch.stack([F.linear(x, w * masks[k]) for k in range(K)]))


# topk_mask over 10 modules of a 512 x 4608 layer (fp32 scores).
@pytest.mark.benchmark(group="multi_topk_mask")
def test_multi_topk_mask(benchmark):
    scores = torch.randn(10, 512, 4608, device="cuda")
    _run(benchmark, lambda: _ops.multi_topk_mask(scores, 0.1), scores.numel() * 4)


@pytest.mark.benchmark(group="multi_topk_mask")
def test_torch_topk_scatter_baseline(benchmark):
    scores = torch.randn(10, 512, 4608, device="cuda")
    flat = scores.view(10, -1)
    k = reference.keep_count(0.1, flat.shape[1])

    def topk_scatter():
        idx = flat.abs().topk(k, dim=1).indices
        return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)

    _run(benchmark, topk_scatter, scores.numel() * 4)


# masked_linear at batch 4096 (compute bound) against cuBLAS on the dense weight.
@pytest.mark.benchmark(group="masked_linear_batch_4096")
def test_masked_linear_large_batch(benchmark, bank):
    w, packed = bank
    x = torch.randn(4096, I, device="cuda", dtype=torch.bfloat16)
    _run(benchmark, lambda: _ops.masked_linear(x, w, packed[0], None))


@pytest.mark.benchmark(group="masked_linear_batch_4096")
def test_dense_linear_baseline(benchmark, bank):
    w, _ = bank
    x = torch.randn(4096, I, device="cuda", dtype=torch.bfloat16)
    _run(benchmark, lambda: F.linear(x, w))
