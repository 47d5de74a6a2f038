"""channel_affine / channel_affine_backward (a per-(group, channel) affine map and an optional
ReLU in one pass: BatchNorm in eval mode + ReLU) against modsplit.reference.

x [G*N, C, *] (G groups of N rows), scale / shift [G, C]. The CPU kernels take float32 /
float64 (8-lane vectors plus a scalar tail for float32); float16 / bfloat16 run the torch twin.
"""
import math

import pytest
import torch

from modsplit import reference, torch_backend
from modsplit.ops import channel_affine
from precision import assert_matches_ref

ops = torch.ops.modsplit
# (G, x shape): runs of S positions below, at and above 8 and not multiples of it; BatchNorm1d's
# [R, C] (S = 1) and [R, C, L]; one row; several groups.
SHAPES = [(1, (1, 1, 2)), (1, (4, 3)), (3, (15, 7, 3, 3)), (2, (4, 4, 33)), (10, (30, 2, 8, 8)),
          (4, (4, 5, 8)), (2, (6, 3, 5, 7)), (1, (2, 3, 17))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(groups, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    scale = (torch.randn(groups, shape[1], generator=g) + 0.5).to(dtype)
    shift = torch.randn(groups, shape[1], generator=g).to(dtype)
    return x, scale, shift


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_forward_matches_reference(groups, shape, dtype, relu):
    x, scale, shift = _inputs(groups, shape, dtype)
    y = channel_affine(x, groups, scale, shift, relu)
    assert y.dtype == dtype and y.shape == x.shape
    assert_matches_ref(y, reference.channel_affine, (x, groups, scale, shift, relu))
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_backward_matches_reference(groups, shape, dtype, relu):
    x, scale, shift = _inputs(groups, shape, dtype)
    out = channel_affine(x, groups, scale, shift, relu)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.channel_affine_backward(grad_y, out, groups, scale, relu)
    assert got.dtype == dtype
    assert_matches_ref(got, reference.channel_affine_backward,
                       (grad_y, out, groups, scale, relu))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_matches_reference(dtype, relu):
    """Gradients in x, scale and shift through the wrapper (the kernel's registered autograd for
    float32 / float64, the twin's ATen autograd for float16 / bfloat16) against the
    reference's autograd in float64."""
    x, scale, shift = _inputs(3, (12, 5, 11), dtype)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    grad_y = torch.randn(12, 5, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(channel_affine(leaves[0], 3, *leaves[1:], relu), leaves, grad_y)
    ups = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.channel_affine(ups[0], 3, *ups[1:], relu), ups,
                               grad_y.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}
    for g, w in zip(got, want):
        assert g is not None and g.dtype == dtype
        scale_ = w.abs().max().item() + 1
        torch.testing.assert_close(g.double(), w, rtol=tol[dtype], atol=tol[dtype] * scale_)


def test_gradient_only_in_x_is_what_the_kernel_gives():
    x, scale, shift = _inputs(2, (4, 3, 9), torch.float32)
    xl = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(channel_affine(xl, 2, scale, shift, True).sum(), xl)
    out = channel_affine(x, 2, scale, shift, True)
    torch.testing.assert_close(gx, reference.channel_affine_backward(torch.ones_like(x), out, 2,
                                                                     scale, True))


def test_relu_edges_match_torch():
    """Values that land exactly on 0, NaN and ±inf: torch.relu's forward (NaN stays NaN) and its
    gradient rule (zero where the output is <= 0, a NaN output passes its gradient)."""
    x = torch.tensor([[[0.0, -1.0, 1.0, math.nan, math.inf, -math.inf, -0.0, 2.0, -2.0, 3.0]]])
    scale, shift = torch.ones(1, 1), torch.zeros(1, 1)
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype).requires_grad_()
        y = channel_affine(xd, 1, scale.to(dtype), shift.to(dtype), True)
        xr = x.to(dtype).requires_grad_()
        want = torch.relu(xr * 1 + 0)
        torch.testing.assert_close(y, want, equal_nan=True)
        g = torch.arange(1.0, 11.0, dtype=dtype).view_as(x)
        (gy,) = torch.autograd.grad(y, xd, g)
        (gw,) = torch.autograd.grad(want, xr, g)
        torch.testing.assert_close(gy, gw, equal_nan=True)


def test_non_contiguous_input():
    x, scale, shift = _inputs(2, (6, 4, 5, 7), torch.float32)
    xt = x.transpose(2, 3)  # [6, 4, 7, 5], not contiguous
    y = channel_affine(xt, 2, scale, shift, True)
    torch.testing.assert_close(y, reference.channel_affine(xt.contiguous(), 2, scale, shift, True))
    out = channel_affine(x, 2, scale, shift, True)
    gy = torch.randn(6, 4, 7, 5).transpose(2, 3)
    torch.testing.assert_close(ops.channel_affine_backward(gy, out, 2, scale, True),
                               reference.channel_affine_backward(gy.contiguous(), out, 2, scale,
                                                                 True))


def test_empty_batch():
    x = torch.empty(0, 3, 4)
    y = channel_affine(x, 1, torch.ones(1, 3), torch.zeros(1, 3), True)
    assert y.shape == (0, 3, 4)


def test_opcheck():
    x, scale, shift = _inputs(2, (6, 4, 5), torch.float32)
    torch.library.opcheck(ops.channel_affine, (x.requires_grad_(), 2, scale, shift, True))
    out = channel_affine(x.detach(), 2, scale, shift, True)
    torch.library.opcheck(ops.channel_affine_backward, (torch.randn_like(out), out, 2, scale, True))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case,match", [
    ("x 1-d", r"\bx\b.*\[G\*N, C, \*\]"),
    ("groups 4 for 6 rows", r"\bgroups\b"),
    ("x int", r"\bx\b.*float"),
    ("scale shape", r"\bscale\b"),
    ("shift dtype", r"\bshift\b"),
    ("scale for other channels", r"\bscale\b"),
])
def test_bad_inputs_name_the_argument(impl, case, match):
    x, scale, shift = _inputs(2, (6, 4, 5), torch.float32)
    args = {"x 1-d": (x[0, 0], 1, scale[:1, :5], shift[:1, :5], False),
            "groups 4 for 6 rows": (x, 4, scale, shift, False),
            "x int": (x.int(), 2, scale, shift, False),
            "scale shape": (x, 2, scale[:, :3], shift, False),
            "shift dtype": (x, 2, scale, shift.double(), False),
            "scale for other channels": (x[:, :2], 2, scale, shift, False)}[case]
    fn = ops.channel_affine if impl == "kernel" else torch_backend.channel_affine
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(*args)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_backward_with_relu_needs_out(impl):
    fn = ops.channel_affine_backward if impl == "kernel" else torch_backend.channel_affine_backward
    with pytest.raises((RuntimeError, ValueError), match=r"\bout\b"):
        fn(torch.randn(2, 3, 4), None, 1, torch.ones(1, 3), True)
    with pytest.raises((RuntimeError, ValueError), match=r"\bout\b"):
        fn(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 1, torch.ones(1, 3), True)


def test_work_split_over_threads():
    """A tensor large enough that at::parallel_for splits its runs over two threads."""
    x, scale, shift = _inputs(4, (64, 16, 32, 32), torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = channel_affine(x, 4, scale, shift, True)
        g = torch.randn_like(x)
        gx = ops.channel_affine_backward(g, y, 4, scale, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, reference.channel_affine(x, 4, scale, shift, True))
    torch.testing.assert_close(gx, reference.channel_affine_backward(g, y, 4, scale, True))
