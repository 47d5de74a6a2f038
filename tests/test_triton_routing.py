"""The Triton backend's routing (modsplit.routing) on both sides of the fused-row threshold, with
K up to 10 modules and float16/bfloat16/float32 values checked against the float64 reference.

Below or at the threshold the fused kernels run (bits expanded in registers, 2-D tl.dot per
module); above it the bit-expansion kernel writes W*M_k and torch does the GEMM / grouped conv.
Without a GPU the kernels run under the Triton interpreter.
"""
import importlib.util

import pytest
import torch

from modsplit import backend, routing
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TK = backend.load_triton(interpret=DEVICE == "cpu")
T = torch.ops.modsplit_triton
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
HALF = [torch.float16, torch.bfloat16]


def _assert_matches_ref(got, ref_fn, args):
    """got vs ref_fn(*args) in float64 on the CPU; the bound is twice ref_fn's own error in the
    args' dtype plus a floor (flash-attention's rule); float32 kernels may use TF32 on a GPU."""
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    refs, lows = ref_fn(*up), ref_fn(*args)
    if torch.is_tensor(refs):
        got, refs, lows = (got,), (refs,), (lows,)
    for t, want, low in zip(got, refs, lows):
        assert t.shape == want.shape and t.dtype == low.dtype
        scale = max(1.0, want.abs().max().item())
        err = (t.cpu().double() - want).abs().max().item()
        ref_err = (low.double() - want).abs().max().item()
        floor = FLOOR[t.dtype] * (50 if DEVICE == "cuda" and t.dtype == torch.float32 else 1)
        assert err <= 2 * ref_err + floor * scale, (err, ref_err)


@pytest.fixture
def paths(monkeypatch):
    """Records which path each call took: 'expand' (bit expansion) or a fused kernel's name."""
    seen = []
    real_expand, real_launcher = TK.masked_linear.expand, TK.masked_linear.launcher

    def expand(weight, packed):
        seen.append("expand")
        return real_expand(weight, packed)

    def launcher(kernel):
        seen.append(getattr(kernel, "fn", kernel).__name__ if hasattr(kernel, "fn") else
                    getattr(kernel, "__name__", "kernel"))
        return real_launcher(kernel)

    monkeypatch.setattr(TK.masked_linear, "expand", expand)
    monkeypatch.setattr(TK.masked_linear, "launcher", launcher)
    monkeypatch.setattr(TK.masked_conv2d, "expand", expand)
    return seen


def _linear_problem(o, i, k, rows, shared, dtype):
    weight = torch.randn(o, i).to(dtype)
    packed = ref.multi_topk_mask(torch.randn(k, o, i), 0.4)
    bias = torch.randn(2 * o).to(dtype)[::2]  # non-contiguous: read with its stride
    x = torch.randn(*(() if shared else (k,)), rows, i).to(dtype)
    return x, weight, packed, bias


def _run_linear(x, weight, packed, bias, shared):
    d = [t.to(DEVICE) for t in (x, weight, packed, bias)]
    y = T.multi_masked_linear(d[0], d[1], d[2], d[3], shared)
    g = torch.randn(y.shape).to(x.dtype)
    back = T.multi_masked_linear_backward(g.to(DEVICE), d[0], d[1], d[2], shared, [True] * 3)
    return y, g, back


@pytest.mark.parametrize("rows", [16, 17])  # the default threshold: fused at 16, expanded at 17
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
def test_default_threshold_sides(paths, rows, dtype):
    assert routing.fused_max_rows(dtype) == 16
    x, weight, packed, bias = _linear_problem(13, 45, 3, rows, False, dtype)
    y, g, back = _run_linear(x, weight, packed, bias, False)
    fused = rows <= 16
    assert ("expand" in paths) != fused and ("_forward_kernel" in paths) == fused, paths
    _assert_matches_ref(y, lambda x, w, b: ref.multi_masked_linear(x, w, packed, b), (x, weight,
                                                                                      bias))
    _assert_matches_ref(back, lambda g, x, w: ref.multi_masked_linear_backward(g, x, w, packed),
                        (g, x, weight))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k", [1, 9, 10])  # 9 and 10 cross the old 8-module group
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("o,i,rows", [(1, 1, 1), (31, 33, 5), (33, 67, 17)])
def test_linear_both_paths(paths, fused, k, shared, o, i, rows):
    x, weight, packed, bias = _linear_problem(o, i, k, rows, shared, torch.float32)
    with routing.override(fused_max_rows=10**6 if fused else 0):
        y, g, back = _run_linear(x, weight, packed, bias, shared)
        assert ("expand" in paths) != fused, paths
        _assert_matches_ref(y, lambda x, w, b: ref.multi_masked_linear(x, w, packed, b, shared),
                            (x, weight, bias))
        _assert_matches_ref(back, lambda g, x, w: ref.multi_masked_linear_backward(
            g, x, w, packed, shared), (g, x, weight))
        gw = T.masked_linear_weight_grad(g.to(DEVICE), x.to(DEVICE), weight.to(DEVICE),
                                         packed.to(DEVICE), shared)
        xs = x.expand(k, *x.shape) if shared else x
        want = ((g.transpose(1, 2) @ xs) * ref.unpack_mask(packed, (k, o, i))).sum(0)
        torch.testing.assert_close(gw.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("k", [1, 10])
def test_linear_half_values(fused, dtype, k):
    x, weight, packed, bias = _linear_problem(33, 70, k, 6, False, dtype)
    with routing.override(fused_max_rows=10**6 if fused else 0):
        y, g, back = _run_linear(x, weight, packed, bias, False)
    _assert_matches_ref(y, lambda x, w, b: ref.multi_masked_linear(x, w, packed, b),
                        (x, weight, bias))
    _assert_matches_ref(back, lambda g, x, w: ref.multi_masked_linear_backward(g, x, w, packed),
                        (g, x, weight))


def test_single_module_op_non_contiguous_bias():
    x, weight, packed, bias = _linear_problem(13, 40, 1, 4, True, torch.float32)
    y = T.masked_linear(x.to(DEVICE), weight.to(DEVICE), packed[0].to(DEVICE), bias.to(DEVICE))
    torch.testing.assert_close(y.cpu(), ref.masked_linear(x, weight, packed[0], bias),
                               rtol=1e-4, atol=1e-4)


def test_expand_kernel_matches_reference():
    for o, i, k in [(1, 1, 1), (7, 31, 2), (9, 33, 10), (70, 257, 3)]:
        weight = torch.randn(i, o).t()  # strided
        packed = ref.multi_topk_mask(torch.randn(k, o, i), 0.3)
        got = TK.masked_linear.expand(weight.to(DEVICE), packed.to(DEVICE))
        assert torch.equal(got.cpu(), weight * ref.unpack_mask(packed, (k, o, i)))


def test_autotune_key_buckets_the_batch():
    lin = TK.masked_linear
    assert [lin._bucket(m) for m in (1, 5, 16, 17, 300)] == [16, 16, 16, 32, 512]
    for kernel in (lin._forward_kernel, lin._grad_x_kernel, lin._weight_grad_kernel):
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys, kernel.keys


CONV = [  # (B, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (2, 3, 7, 6, 5, 3, 3, [1, 1], [1, 1], [1, 1], 1),
    (1, 4, 9, 8, 6, 3, 2, [2, 1], [0, 1], [2, 1], 2),
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
@pytest.mark.parametrize("case,k,shared", [(0, 10, True), (1, 10, False), (1, 1, True)])
def test_conv_both_paths(paths, fused, dtype, case, k, shared):
    b, c, h, w, o, kh, kw, *conv = CONV[case]
    weight = torch.randn(o, c // conv[3], kh, kw).to(dtype)
    packed = ref.multi_topk_mask(torch.randn(k, *weight.shape), 0.4)
    bias = torch.randn(o).to(dtype)
    x = torch.randn(*(() if shared else (k,)), b, c, h, w).to(dtype)
    d = [t.to(DEVICE) for t in (x, weight, packed, bias)]
    with routing.override(fused_max_rows=10**6 if fused else 0):
        y = T.multi_masked_conv2d(*d, *conv)
        g = torch.randn(y.shape).to(dtype)
        back = T.multi_masked_conv2d_backward(g.to(DEVICE), d[0], d[1], d[2], *conv, [True] * 3)
        gw = T.masked_conv2d_weight_grad(g.to(DEVICE), d[0], d[1], d[2], *conv)
    assert ("expand" in paths) != fused, paths
    _assert_matches_ref(y, lambda x, w, b: ref.multi_masked_conv2d(x, w, packed, b, *conv),
                        (x, weight, bias))
    _assert_matches_ref(back, lambda g, x, w: ref.multi_masked_conv2d_backward(
        g, x, w, packed, *conv), (g, x, weight))
    masks = ref.unpack_mask(packed, (k, *weight.shape)).double()
    w_eff = (weight.double() * masks).requires_grad_()  # dL/d(W*M_k) by autograd, in float64
    xs = [x.double()] * k if shared else list(x.double())
    y64 = torch.stack([torch.nn.functional.conv2d(xk, wk, None, *conv)
                       for xk, wk in zip(xs, w_eff)])
    (d_eff,) = torch.autograd.grad(y64, w_eff, g.double())
    want = (d_eff * masks).sum(0)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(gw.cpu().double(), want, rtol=tol, atol=tol * want.abs().max())
