"""Triton masked_linear / multi_masked_linear: outputs and every gradient against the reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (see load_triton).
"""
import importlib.util

import pytest
import torch

import modsplit.functional as F_ms
from modsplit import backend
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
backend.load_triton(interpret=DEVICE == "cpu")
T = torch.ops.modsplit_triton
TOL = dict(rtol=1e-4, atol=1e-4)

SIZES = [(1, 1), (13, 33), (70, 70), (33, 13)]  # (O, I)


def _d(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_close_cpu(got, expected, **tol):
    torch.testing.assert_close(got.cpu(), expected, **(tol or TOL))


def _problem(o, i, k, density=0.5, batch=(2, 3), shared=False, bias=True):
    weight = torch.randn(o, i)
    packed = ref.multi_topk_mask(torch.randn(k, o, i), density)
    x = torch.randn(*(() if shared else (k,)), *batch, i)
    return x, weight, packed, torch.randn(o) if bias else None


@pytest.mark.parametrize("o,i", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear(o, i, bias):
    x, weight, packed, b = _problem(o, i, 1, batch=(5,), shared=True, bias=bias)
    packed = packed[0]
    _assert_close_cpu(T.masked_linear(*_d(x, weight, packed, b)), ref.masked_linear(x, weight, packed, b))
    g = torch.randn(5, o)
    got = T.masked_linear_backward(*_d(g, x, weight, packed), [True, True, True])
    for a, e in zip(got, ref.masked_linear_backward(g, x, weight, packed)):
        _assert_close_cpu(a, e)


@pytest.mark.parametrize("o,i", SIZES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_multi_masked_linear(o, i, k, shared):
    x, weight, packed, b = _problem(o, i, k, shared=shared)
    y = T.multi_masked_linear(*_d(x, weight, packed, b), shared)
    _assert_close_cpu(y, ref.multi_masked_linear(x, weight, packed, b, shared))
    g = torch.randn(y.shape)
    got = T.multi_masked_linear_backward(*_d(g, x, weight, packed), shared, [True, True, True])
    for a, e in zip(got, ref.multi_masked_linear_backward(g, x, weight, packed, shared)):
        _assert_close_cpu(a, e)


def test_backward_output_mask():
    x, weight, packed, _ = _problem(13, 33, 3)
    g = torch.randn(3, 2, 3, 13)
    gx, gs, gb = T.multi_masked_linear_backward(*_d(g, x, weight, packed), False,
                                                [False, True, False])
    assert gx is None and gb is None and gs.shape == (3, 13, 33)


@pytest.mark.parametrize("density", [1e-4, 0.1, 1.0])
@pytest.mark.parametrize("shared", [False, True])
def test_autograd_exact_weight_grad(density, shared):
    x, weight, packed, b = _problem(33, 70, 3, density=density, shared=shared)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    dev = [t.detach().to(DEVICE).requires_grad_() for t in (x, weight, b)]
    g = torch.randn(3, 2, 3, 33)
    ref.multi_masked_linear(leaves[0], leaves[1], packed, leaves[2], shared).backward(g)
    T.multi_masked_linear(dev[0], dev[1], packed.to(DEVICE), dev[2], shared).backward(g.to(DEVICE))
    for a, e in zip(dev, leaves):
        _assert_close_cpu(a.grad, e.grad)
    xs, ws = [t.clone().requires_grad_() for t in (x[0], weight)]
    xd, wd = [t.detach().to(DEVICE).requires_grad_() for t in (x[0], weight)]
    ref.masked_linear(xs, ws, packed[1]).sum().backward()
    T.masked_linear(xd, wd, packed[1].to(DEVICE)).sum().backward()
    _assert_close_cpu(xd.grad, xs.grad)
    _assert_close_cpu(wd.grad, ws.grad)


def test_noncontiguous_inputs():
    weight = torch.randn(33, 13).t()  # [13, 33], strides (1, 13)
    packed = ref.multi_topk_mask(torch.randn(3, 13, 33), 0.3)
    x = torch.randn(33, 4, 3).permute(2, 1, 0)  # [3, 4, 33]
    xs = torch.randn(4, 66)[:, ::2]  # shared [4, 33]
    _assert_close_cpu(T.multi_masked_linear(*_d(x, weight, packed), None, False),
           ref.multi_masked_linear(x, weight, packed))
    _assert_close_cpu(T.multi_masked_linear(*_d(xs, weight, packed), None, True),
           ref.multi_masked_linear(xs, weight, packed, None, True))
    g = torch.randn(3, 4, 13).transpose(0, 1).contiguous().transpose(0, 1)
    got = T.multi_masked_linear_backward(*_d(g, xs, weight, packed), True, [True, True, True])
    for a, e in zip(got, ref.multi_masked_linear_backward(g, xs, weight, packed, True)):
        _assert_close_cpu(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, weight, packed, b = _problem(33, 70, 3)
    y = T.multi_masked_linear(*_d(x.to(dtype), weight.to(dtype), packed, b.to(dtype)), False)
    assert y.dtype == dtype
    expected = ref.multi_masked_linear(x.to(dtype).float(), weight.to(dtype).float(), packed,
                                       b.to(dtype).float())
    _assert_close_cpu(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_functional_straight_through_matches_torch_op():
    """modsplit.functional routed to Triton gives the C++/CUDA op's values and gradients."""
    x, weight, packed, b = _problem(13, 33, 3, shared=True)
    scores = torch.randn(3, 13, 33)
    runs = []
    for name in ("auto", "triton"):
        leaves = [t.detach().to(DEVICE).requires_grad_() for t in (x, scores, b)]
        with backend.use(name):
            y = F_ms.multi_masked_linear(leaves[0], weight.to(DEVICE), leaves[1],
                                         packed.to(DEVICE), leaves[2], shared_input=True)
        y.backward(torch.ones_like(y))  # outside the block: runs on the forward's backend
        runs.append([y] + [t.grad for t in leaves])
    for a, e in zip(*runs):
        _assert_close_cpu(a, e.cpu())
