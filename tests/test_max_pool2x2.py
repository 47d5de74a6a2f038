"""max_pool2x2 / max_pool2x2_backward (nn.MaxPool2d(2) with uint8 window positions) against
modsplit.reference and against ATen's F.max_pool2d itself (values, the position of every
maximum, gradients), over odd and even sizes, ties, NaN and infinities.

The CPU kernels take float32 / float64 (float32 output rows 8 at a time plus a scalar tail);
float16 / bfloat16 run the torch twin (ATen's max_pool2d)."""
import math

import pytest
import torch
import torch.nn.functional as F

from modsplit import reference, torch_backend
from modsplit.ops import max_pool2x2

ops = torch.ops.modsplit
# [N, C, H, W]: widths with 8-output vector blocks and tails (W/2 = 1, 3, 8, 9, 17), odd H / W
# (a last row / column no window reads), the smallest plane.
SHAPES = [(1, 1, 2, 2), (2, 3, 5, 7), (3, 2, 16, 16), (2, 4, 9, 18), (1, 2, 4, 35), (4, 3, 7, 34),
          (2, 1, 33, 2)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _x(shape, dtype, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if ties:  # few distinct values: most windows hold a tie for the maximum
        x = torch.randint(0, 3, shape, generator=g).float()
    return x.to(dtype)


def _aten_positions(x):
    """ATen's flat indices as window positions 2 * dy + dx."""
    _, flat = F.max_pool2d(x, 2, return_indices=True)
    w = x.shape[3]
    oh = torch.arange(flat.shape[2])[:, None]
    ow = torch.arange(flat.shape[3])
    return ((flat // w - 2 * oh) * 2 + (flat % w - 2 * ow)).to(torch.uint8)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference_and_aten(shape, dtype, ties):
    x = _x(shape, dtype, ties=ties)
    y, idx = max_pool2x2(x)
    want_y, want_idx = reference.max_pool2x2(x)
    assert y.dtype == dtype and idx.dtype == torch.uint8
    assert torch.equal(y, want_y) and torch.equal(idx, want_idx)
    assert torch.equal(y, F.max_pool2d(x, 2))
    assert torch.equal(idx, _aten_positions(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_reference_and_aten(shape, dtype):
    x = _x(shape, dtype, ties=True)
    _, idx = max_pool2x2(x)
    n, c, h, w = shape
    g = torch.randn(n, c, h // 2, w // 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.max_pool2x2_backward(g, idx, (h, w))
    assert torch.equal(got, reference.max_pool2x2_backward(g, idx, (h, w)))
    xa = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.max_pool2d(xa, 2), xa, g)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_matches_aten(dtype):
    x = _x((2, 3, 11, 20), dtype, ties=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 3, 5, 10).to(dtype)
    (got,) = torch.autograd.grad(max_pool2x2(xa)[0], xa, g)
    (want,) = torch.autograd.grad(F.max_pool2d(xb, 2), xb, g)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_and_infinities_as_aten(dtype):
    """NaN propagates (its position recorded: the last NaN of a window, as ATen's scan keeps
    replacing), -inf windows keep the first position, +inf wins."""
    vals = [math.nan, -math.inf, math.inf, 1.0, -1.0, 0.0]
    g = torch.Generator().manual_seed(3)
    x = torch.tensor(vals)[torch.randint(0, len(vals), (3, 2, 8, 40), generator=g)].to(dtype)
    y, idx = max_pool2x2(x)
    torch.testing.assert_close(y, F.max_pool2d(x, 2), equal_nan=True)
    assert torch.equal(idx, _aten_positions(x))
    want_y, want_idx = reference.max_pool2x2(x)
    torch.testing.assert_close(y, want_y, equal_nan=True)
    assert torch.equal(idx, want_idx)


def test_non_contiguous_input():
    x = _x((2, 3, 12, 10), torch.float32).transpose(2, 3)  # [2, 3, 10, 12], not contiguous
    y, idx = max_pool2x2(x)
    assert torch.equal(y, F.max_pool2d(x, 2)) and torch.equal(idx, _aten_positions(x))
    g = torch.randn(2, 3, 6, 5).transpose(2, 3)
    assert torch.equal(ops.max_pool2x2_backward(g, idx, (10, 12)),
                       reference.max_pool2x2_backward(g, idx, (10, 12)))


def test_empty_batch():
    y, idx = max_pool2x2(torch.empty(0, 3, 4, 4))
    assert y.shape == idx.shape == (0, 3, 2, 2)


def test_opcheck():
    x = _x((2, 3, 6, 9), torch.float32)
    torch.library.opcheck(ops.max_pool2x2, (x.requires_grad_(),))
    _, idx = max_pool2x2(x.detach())
    torch.library.opcheck(ops.max_pool2x2_backward, (torch.randn(2, 3, 3, 4), idx, (6, 9)))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case,match", [
    ("x 3-d", r"\bx\b.*\[N, C, H, W\]"),
    ("x 1 wide", r"\bx\b"),
    ("x int", r"\bx\b.*float"),
])
def test_bad_inputs_name_the_argument(impl, case, match):
    x = _x((2, 3, 6, 6), torch.float32)
    arg = {"x 3-d": x[0], "x 1 wide": x[..., :1], "x int": x.int()}[case]
    fn = ops.max_pool2x2 if impl == "kernel" else torch_backend.max_pool2x2
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(arg)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case,match", [
    ("input_size", r"\binput_size\b"),
    ("indices dtype", r"\bindices\b"),
    ("indices shape", r"\bindices\b"),
])
def test_bad_backward_inputs_name_the_argument(impl, case, match):
    g = torch.randn(2, 3, 3, 3)
    idx = torch.zeros(2, 3, 3, 3, dtype=torch.uint8)
    args = {"input_size": (g, idx, (8, 6)), "indices dtype": (g, idx.long(), (6, 6)),
            "indices shape": (g, idx[:, :2], (6, 6))}[case]
    fn = ops.max_pool2x2_backward if impl == "kernel" else torch_backend.max_pool2x2_backward
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(*args)


def test_work_split_over_threads():
    """A tensor large enough that at::parallel_for splits its planes over two threads."""
    x = _x((32, 16, 32, 33), torch.float32, ties=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, idx = max_pool2x2(x)
        g = torch.randn_like(y)
        gx = ops.max_pool2x2_backward(g, idx, (32, 33))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, F.max_pool2d(x, 2)) and torch.equal(idx, _aten_positions(x))
    assert torch.equal(gx, reference.max_pool2x2_backward(g, idx, (32, 33)))
