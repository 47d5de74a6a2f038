"""Triton masked_conv2d / multi_masked_conv2d (unfold + masked GEMM) and ragged_masked_conv2d
(per module, through them): outputs and gradients against the reference. Without a GPU the
kernels run under the Triton interpreter."""
import importlib.util

import pytest
import torch

from modsplit import backend
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
backend.load_triton(interpret=DEVICE == "cpu")
T = torch.ops.modsplit_triton
TOL = dict(rtol=1e-4, atol=1e-4)

# (B, C, H, W, O, kh, kw, stride, padding, dilation, groups)
CASES = [
    (2, 3, 7, 6, 5, 3, 3, [1, 1], [1, 1], [1, 1], 1),
    (1, 4, 9, 8, 6, 3, 2, [2, 1], [0, 1], [2, 1], 2),
    (2, 1, 5, 5, 1, 1, 1, [1, 1], [0, 0], [1, 1], 1),
]


def _problem(case, k, multi, shared, density=0.5):
    b, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    weight = torch.randn(o, c // groups, kh, kw)
    scores = torch.randn(k, *weight.shape)
    packed = ref.multi_topk_mask(scores, density) if multi else ref.topk_mask(scores[0], density)
    x = torch.randn(*(() if shared else (k,)), b, c, h, w)
    return x, weight, packed, torch.randn(o), (stride, padding, dilation, groups)


def _assert_close_cpu(got, expected):
    torch.testing.assert_close(got.cpu(), expected, **TOL)


def _d(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_masked_conv2d(case):
    x, weight, packed, bias, args = _problem(CASES[case], 1, False, True)
    y = T.masked_conv2d(*_d(x, weight, packed, bias), *args)
    _assert_close_cpu(y, ref.masked_conv2d(x, weight, packed, bias, *args))
    g = torch.randn(y.shape)
    got = T.masked_conv2d_backward(*_d(g, x, weight, packed), *args, [True, True, True])
    for a, e in zip(got, ref.masked_conv2d_backward(g, x, weight, packed, *args)):
        _assert_close_cpu(a, e)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("k,shared", [(1, False), (3, False), (3, True)])
def test_multi_masked_conv2d(case, k, shared):
    x, weight, packed, bias, args = _problem(CASES[case], k, True, shared)
    y = T.multi_masked_conv2d(*_d(x, weight, packed, bias), *args)
    _assert_close_cpu(y, ref.multi_masked_conv2d(x, weight, packed, bias, *args))
    g = torch.randn(y.shape)
    got = T.multi_masked_conv2d_backward(*_d(g, x, weight, packed), *args, [True, True, True])
    for a, e in zip(got, ref.multi_masked_conv2d_backward(g, x, weight, packed, *args)):
        _assert_close_cpu(a, e)


@pytest.mark.parametrize("shared", [False, True])
def test_autograd_exact_weight_grad(shared):
    x, weight, packed, bias, args = _problem(CASES[1], 3, True, shared, density=0.1)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    dev = [t.detach().to(DEVICE).requires_grad_() for t in (x, weight, bias)]
    y = ref.multi_masked_conv2d(leaves[0], leaves[1], packed, leaves[2], *args)
    g = torch.randn(y.shape)
    y.backward(g)
    T.multi_masked_conv2d(dev[0], dev[1], packed.to(DEVICE), dev[2], *args).backward(g.to(DEVICE))
    for a, e in zip(dev, leaves):
        _assert_close_cpu(a.grad, e.grad)


def test_noncontiguous_input():
    x, weight, packed, bias, args = _problem(CASES[0], 3, True, True)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)
    _assert_close_cpu(T.multi_masked_conv2d(*_d(x, weight, packed, bias), *args),
           ref.multi_masked_conv2d(x, weight, packed, bias, *args))


def _ragged(case, counts, r, density=0.4):
    """(x [R or T, C, H, W], weight, packed [K, O, words], offsets, rows or None, bias, args)."""
    b, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    weight = torch.randn(o, c // groups, kh, kw)
    packed = ref.multi_topk_mask(torch.randn(len(counts), *weight.shape), density)
    t = sum(counts)
    x = torch.randn(t if r is None else r, c, h, w)
    rows = None if r is None else torch.randint(0, r, (t,))
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return x, weight, packed, offsets, rows, torch.randn(o), (stride, padding, dilation, groups)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("counts,r", [([2, 0, 3], 4), ([1, 2], None), ([0, 0], 3)])
def test_ragged_masked_conv2d(case, counts, r):
    x, weight, packed, offsets, rows, bias, args = _ragged(CASES[case], counts, r)
    opt = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    y = T.ragged_masked_conv2d(*_d(x, weight, packed, offsets), opt(rows), opt(bias), *args)
    _assert_close_cpu(y, ref.ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, *args))
    g = torch.randn(y.shape)
    got = T.ragged_masked_conv2d_backward(*_d(g, x, weight, packed, offsets), opt(rows), *args,
                                          [True, True, True])
    want = ref.ragged_masked_conv2d_backward(g, x, weight, packed, offsets, rows, *args)
    for a, e in zip(got, want):
        _assert_close_cpu(a, e)


def test_ragged_autograd_exact_weight_grad():
    x, weight, packed, offsets, rows, bias, args = _ragged(CASES[0], [2, 0, 3], 4, density=0.1)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    dev = [t.detach().to(DEVICE).requires_grad_() for t in (x, weight, bias)]
    y = ref.ragged_masked_conv2d(leaves[0], leaves[1], packed, offsets, rows, leaves[2], *args)
    g = torch.randn(y.shape)
    y.backward(g)
    T.ragged_masked_conv2d(dev[0], dev[1], *_d(packed, offsets, rows), dev[2],
                           *args).backward(g.to(DEVICE))
    for a, e in zip(dev, leaves):
        _assert_close_cpu(a.grad, e.grad)


def test_ragged_bad_offsets_are_named():
    x, weight, packed, offsets, rows, bias, args = _ragged(CASES[0], [2, 1], 4)
    with pytest.raises(ValueError, match="offsets"):
        T.ragged_masked_conv2d(*_d(x, weight, packed, torch.tensor([0, 2, 2]), rows, bias), *args)
