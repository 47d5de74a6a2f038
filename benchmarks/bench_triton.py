"""GPU benchmarks: Triton kernels vs the torch.ops.modsplit (CUDA) ops.

Run: python -m pytest benchmarks/bench_triton.py --benchmark-only (skips without CUDA).
Each group also times the plain-PyTorch baseline named in it, in the same run.
"""
import pytest
import torch

from modsplit import backend
from modsplit import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    backend.load_triton(interpret=False)

# (K modules, batch rows, O, I): one module group per class of a 10-class model, and a bank of 8
LINEAR = [(10, 64, 4096, 4096), (8, 16, 1024, 4096), (1, 256, 4096, 4096)]
TOPK = [(10, 1024, 1024), (10, 4096, 4096), (1, 4096, 4096)]  # (K, O, I) scores


def _need_cuda_kernel(op, impl):
    if impl == "cuda_op" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"modsplit::{op}", "CUDA"):
        pytest.skip(f"modsplit._C was built without the CUDA kernel of {op}")


def _timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    run()  # compile / autotune outside the timing
    return benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


def _linear_problem(k, m, o, i):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(o, i, device="cuda", dtype=torch.float16, generator=g)
    scores = torch.randn(k, o, i, device="cuda", generator=g)
    packed = ref.multi_topk_mask(scores, 0.3)
    x = torch.randn(m, i, device="cuda", dtype=torch.float16, generator=g)
    return x, w, packed


@pytest.mark.parametrize("shape", LINEAR, ids=lambda s: "K{}-M{}-O{}-I{}".format(*s))
@pytest.mark.parametrize("impl", ["triton", "cuda_op", "dense_materialised"])
def test_multi_masked_linear(benchmark, shape, impl):
    benchmark.group = "multi_masked_linear " + "K{}-M{}-O{}-I{}".format(*shape)
    k, m, o, i = shape
    x, w, packed = _linear_problem(*shape)
    _need_cuda_kernel("multi_masked_linear", impl)
    if impl == "triton":
        fn = lambda: torch.ops.modsplit_triton.multi_masked_linear(  # noqa: E731
            x, w, packed, None, True)
    elif impl == "cuda_op":
        fn = lambda: torch.ops.modsplit.multi_masked_linear(x, w, packed, None, True)  # noqa: E731
    else:  # baseline: W*M materialised per module, then one batched matmul
        fn = lambda: x @ (w * ref.unpack_mask(packed, (k, o, i))).transpose(1, 2)  # noqa: E731
    out = _timed(benchmark, fn)
    expected = ref.multi_masked_linear(x.float(), w.float(), packed, None, True)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-1)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["GB/s (W + bits + x + y)"] = (
        (2 * o * i + k * o * i / 8 + 2 * m * i + 2 * k * m * o) / seconds / 1e9)


@pytest.mark.parametrize("shape", TOPK, ids=lambda s: "K{}-O{}-I{}".format(*s))
@pytest.mark.parametrize("impl", ["triton", "cuda_op", "torch_sort"])
def test_multi_topk_mask(benchmark, shape, impl):
    benchmark.group = "multi_topk_mask " + "K{}-O{}-I{}".format(*shape)
    scores = torch.randn(*shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    _need_cuda_kernel("multi_topk_mask", impl)
    if impl == "triton":
        fn = lambda: torch.ops.modsplit_triton.multi_topk_mask(scores, 0.1)  # noqa: E731
    elif impl == "cuda_op":
        fn = lambda: torch.ops.modsplit.multi_topk_mask(scores, 0.1)  # noqa: E731
    else:  # baseline: the reference's stable sort per module
        fn = lambda: ref.multi_topk_mask(scores, 0.1)  # noqa: E731
    out = _timed(benchmark, fn)
    assert torch.equal(out, ref.multi_topk_mask(scores, 0.1))
    benchmark.extra_info["GB/s (scores read 6x)"] = (
        6 * scores.numel() * 4 / benchmark.stats.stats.mean / 1e9)
