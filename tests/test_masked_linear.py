"""masked_linear / multi_masked_linear (and their *_backward ops) against modsplit.reference.

Kernel results are compared with the float64 reference; the allowed error is twice the error of
the reference run in the kernel's own dtype plus a small floor (flash-attention's rule), so that
bf16 gets a loose bound and float64 a tight one. float32 batches of up to 16 rows or sparse masks
take the bit-walk kernel, denser masks with more rows take the tiled BLAS path: the grid covers
both (batch [3, 7] = 21 rows and [70] at density 0.5/1.0).
"""
import itertools

import pytest
import torch

import modsplit.functional as MF
from modsplit import ops
from modsplit import reference as R

from precision import assert_matches_ref

_ops = torch.ops.modsplit

# The CPU kernels run banks of at most 2**16 weights (all modules together) as one batched BLAS
# call; (129, 520) and the K = 10 / K = 4 banks of (67, 257) take the bit-walk, GEMV and tile paths.
SHAPES = [(1, 1), (13, 31), (32, 32), (33, 67), (67, 257), (257, 13), (129, 520)]
BATCHES = [(), (1,), (5,), (3, 7), (70,)]
DENSITIES = ["tiny", 0.1, 0.5, 1.0]


def make_mask(lead, o, i, density, device):
    """bool [*lead, o, i]: one kept entry per layer for 'tiny' (via topk_mask), else random."""
    if density == "tiny":
        scores = torch.randn(*lead, o, i)
        packed = torch.stack([R.topk_mask(s, 1e-9) for s in scores.reshape(-1, o, i)])
        return R.unpack_mask(packed.reshape(*lead, o, -1), (*lead, o, i)).to(device)
    return (torch.rand(*lead, o, i) < density).to(device)


def make_layer(o, i, density, dtype, device, k=None):
    """weight [o, i], packed int32 [o, words] (or [k, o, words]), bias [o]."""
    lead = () if k is None else (k,)
    mask = make_mask(lead, o, i, density, device)
    weight = torch.randn(o, i, dtype=dtype, device=device)
    bias = torch.randn(o, dtype=dtype, device=device)
    return weight, R.pack_mask(mask, batch_dims=len(lead)), bias


def assert_single_matches_ref(device, o, i, batch, density, dtype):
    weight, packed, bias = make_layer(o, i, density, dtype, device)
    x = torch.randn(*batch, i, dtype=dtype, device=device)
    b = bias if (o + i + len(batch)) % 2 == 0 else None
    assert_matches_ref(ops.masked_linear(x, weight, packed, b),
                      lambda x, w, b: R.masked_linear(x, w, packed, b), (x, weight, b))
    g = torch.randn(*batch, o, dtype=dtype, device=device)
    assert_matches_ref(_ops.masked_linear_backward(g, x, weight, packed, [True, True, True]),
                      lambda g, x, w: R.masked_linear_backward(g, x, w, packed), (g, x, weight))


def assert_multi_matches_ref(device, o, i, shared, k, batch, density, dtype):
    weight, packed, bias = make_layer(o, i, density, dtype, device, k=k)
    x = torch.randn(*(() if shared else (k,)), *batch, i, dtype=dtype, device=device)
    b = bias if k % 2 else None
    y = ops.multi_masked_linear(x, weight, packed, b, shared)
    assert y.shape == (k, *batch, o)
    assert_matches_ref(y, lambda x, w, b: R.multi_masked_linear(x, w, packed, b, shared),
                      (x, weight, b))
    g = torch.randn(k, *batch, o, dtype=dtype, device=device)
    assert_matches_ref(
        _ops.multi_masked_linear_backward(g, x, weight, packed, shared, [True, True, True]),
        lambda g, x, w: R.multi_masked_linear_backward(g, x, w, packed, shared), (g, x, weight))


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("o,i", SHAPES)
def test_masked_linear_float32(device, o, i, batch, density):
    assert_single_matches_ref(device, o, i, batch, density, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("batch", [(5,), (3, 7)], ids=str)
@pytest.mark.parametrize("o,i", [(13, 31), (67, 257), (129, 520)])
def test_masked_linear_dtypes(device, o, i, batch, density, dtype):
    assert_single_matches_ref(device, o, i, batch, density, dtype)


@pytest.mark.parametrize("density", ["tiny", 0.1, 1.0])
@pytest.mark.parametrize("batch", [(), (3, 7), (70,)], ids=str)
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("o,i", [(13, 31), (67, 257)])
def test_multi_masked_linear_float32(device, o, i, shared, k, batch, density):
    assert_multi_matches_ref(device, o, i, shared, k, batch, density, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("o,i", [(33, 67), (67, 257)])
def test_multi_masked_linear_dtypes(device, o, i, shared, density, dtype):
    assert_multi_matches_ref(device, o, i, shared, 4, (3, 7), density, dtype)


@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)), ids=str)
@pytest.mark.parametrize("multi,shared", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("o,i,k", [(33, 67, 3), (67, 257, 4)])
def test_backward_output_mask(device, output_mask, multi, shared, o, i, k):
    weight, packed, _ = make_layer(o, i, 0.5, torch.float32, device, k=k if multi else None)
    if multi:
        x = torch.randn(*(() if shared else (k,)), 5, i, device=device)
        g = torch.randn(k, 5, o, device=device)
        got = _ops.multi_masked_linear_backward(g, x, weight, packed, shared, list(output_mask))
        ref = R.multi_masked_linear_backward(g, x, weight, packed, shared)
    else:
        x = torch.randn(5, i, device=device)
        g = torch.randn(5, o, device=device)
        got = _ops.masked_linear_backward(g, x, weight, packed, list(output_mask))
        ref = R.masked_linear_backward(g, x, weight, packed)
    for want, t, r in zip(output_mask, got, ref):
        if want:
            torch.testing.assert_close(t, r, atol=1e-4, rtol=1e-4)
        else:
            assert t is None


def _strided_inputs(device, batch, i):
    """x layouts the kernels must accept: a column slice, a transpose and an expanded row."""
    wide = torch.randn(*batch, 2 * i, device=device)
    yield wide[..., ::2]
    yield torch.randn(i, *reversed(batch), device=device).permute(
        *reversed(range(1, len(batch) + 1)), 0)
    yield torch.randn(i, device=device).expand(*batch, i)


@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("batch", [(5,), (3, 7)], ids=str)
def test_non_contiguous_inputs(device, batch, density):
    o, i, k = 33, 67, 4
    weight, packed, bias = make_layer(o, i, density, torch.float32, device)
    _, bank, _ = make_layer(o, i, density, torch.float32, device, k=k)
    weight_t = weight.t().contiguous().t()  # same values, column-major
    packed_nc = torch.cat([packed, packed], 1)[:, : packed.shape[1]]
    g = torch.randn(*batch, o, device=device)
    gk = torch.randn(k, *batch, o, device=device).transpose(0, 1).contiguous().transpose(0, 1)
    for x in _strided_inputs(device, batch, i):
        assert not x.is_contiguous()
        torch.testing.assert_close(ops.masked_linear(x, weight_t, packed_nc, bias),
                                   R.masked_linear(x, weight, packed, bias))
        torch.testing.assert_close(ops.multi_masked_linear(x, weight, bank, bias, True),
                                   R.multi_masked_linear(x, weight, bank, bias, True))
        xk = x.unsqueeze(0).expand(k, *x.shape)
        torch.testing.assert_close(ops.multi_masked_linear(xk, weight, bank, None, False),
                                   R.multi_masked_linear(xk, weight, bank, None, False))
        for got, ref in zip(_ops.masked_linear_backward(g.expand_as(g), x, weight_t, packed_nc,
                                                        [True, True, True]),
                            R.masked_linear_backward(g, x, weight, packed)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        for got, ref in zip(
                _ops.multi_masked_linear_backward(gk, xk, weight, bank, False, [True] * 3),
                R.multi_masked_linear_backward(gk, xk, weight, bank, False)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_padding_bits_ignored(device):
    """Set padding bits past in_features must not be read as columns (no out-of-bounds)."""
    o, i = 9, 37
    weight, packed, bias = make_layer(o, i, 0.5, torch.float32, device)
    dirty = packed.clone()
    dirty[:, -1] |= torch.tensor(-1 << (i % 32), dtype=torch.int32)
    x = torch.randn(4, i, device=device)
    torch.testing.assert_close(ops.masked_linear(x, weight, dirty, bias),
                               R.masked_linear(x, weight, packed, bias))
    g = torch.randn(4, o, device=device)
    torch.testing.assert_close(_ops.masked_linear_backward(g, x, weight, dirty, [True] * 3)[0],
                               R.masked_linear_backward(g, x, weight, packed)[0])


@pytest.mark.parametrize("shared", [None, False, True])
def test_gradcheck_ops(device, shared):
    o, i, k = 7, 37, 3
    kw = dict(dtype=torch.float64, device=device)
    if shared is None:
        weight, packed, bias = make_layer(o, i, 0.5, torch.float64, device)
        x = torch.randn(2, 3, i, **kw)
        fn = lambda x, w, b: ops.masked_linear(x, w, packed, b)  # noqa: E731
    else:
        weight, packed, bias = make_layer(o, i, 0.5, torch.float64, device, k=k)
        x = torch.randn(*(() if shared else (k,)), 2, i, **kw)
        fn = lambda x, w, b: ops.multi_masked_linear(x, w, packed, b, shared)  # noqa: E731
    args = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("shared", [False, True])
def test_functional_straight_through(device, shared):
    o, i, k = 6, 37, 3
    kw = dict(dtype=torch.float64, device=device)
    weight = torch.randn(o, i, **kw)
    scores = torch.randn(k, o, i, **kw)
    packed = ops.multi_topk_mask(scores, 0.3)
    bias = torch.randn(o, **kw)
    x = torch.randn(*(() if shared else (k,)), 2, i, **kw)
    assert torch.autograd.gradcheck(
        lambda x, b: MF.multi_masked_linear(x, weight, scores, packed, b, shared),
        [x.clone().requires_grad_(), bias.clone().requires_grad_()])

    s = scores.clone().requires_grad_()
    y = MF.multi_masked_linear(x, weight, s, packed, bias, shared)
    g = torch.randn_like(y)
    y.backward(g)
    xs = x.expand(k, *x.shape) if shared else x
    g3, x3 = g.reshape(k, -1, o), xs.reshape(k, -1, i)
    expected = (g3.transpose(1, 2) @ x3) * weight * scores.sign()
    torch.testing.assert_close(s.grad, expected)


def _opcheck_cases(device):
    o, i, k = 9, 40, 3
    weight, packed, bias = make_layer(o, i, 0.3, torch.float32, device)
    _, bank, _ = make_layer(o, i, 0.3, torch.float32, device, k=k)
    x = torch.randn(2, 5, i, device=device, requires_grad=True)
    xk = torch.randn(k, 5, i, device=device, requires_grad=True)
    return [
        (_ops.masked_linear, (x, weight, packed, bias)),
        (_ops.masked_linear, (x, weight, packed, None)),
        (_ops.masked_linear_backward,
         (torch.randn(2, 5, o, device=device), x.detach(), weight, packed, [True, False, True])),
        (_ops.multi_masked_linear, (xk, weight, bank, bias, False)),
        (_ops.multi_masked_linear, (x, weight, bank, None, True)),
        (_ops.multi_masked_linear_backward,
         (torch.randn(k, 2, 5, o, device=device), x.detach(), weight, bank, True,
          [True, True, False])),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    """Two layers (masked_linear, then a bank of 3 modules on the shared hidden), compiled whole."""
    o, i, o2, k = 9, 40, 6, 3
    w1, p1, b1 = make_layer(o, i, 0.3, torch.float32, device)
    w2, bank, _ = make_layer(o2, o, 0.5, torch.float32, device, k=k)

    def fn(x, w1, b1, w2):
        h = ops.masked_linear(x, w1, p1, b1).relu()
        return ops.multi_masked_linear(h, w2, bank, None, True).tanh().sum(0)

    x = torch.randn(4, i, device=device)
    args = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    cargs = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*cargs), fn(*args))
    fn(*args).square().sum().backward()
    compiled(*cargs).square().sum().backward()
    for a, c in zip(args, cargs):
        torch.testing.assert_close(c.grad, a.grad)


def _bad_cases(device):
    o, i, k = 5, 40, 2
    weight, packed, bias = make_layer(o, i, 0.5, torch.float32, device)
    _, bank, _ = make_layer(o, i, 0.5, torch.float32, device, k=k)
    x = torch.randn(3, i, device=device)
    g = torch.randn(3, o, device=device)
    ml, mml = _ops.masked_linear, _ops.multi_masked_linear
    return [
        ("x", lambda: ml(x.double(), weight, packed, bias)),
        ("x", lambda: ml(x[:, :-1], weight, packed, bias)),
        ("weight", lambda: ml(x.int(), weight.int(), packed, bias)),
        ("weight", lambda: ml(x, weight[0], packed, bias)),
        ("packed", lambda: ml(x, weight, packed[:, :1], bias)),
        ("packed", lambda: ml(x, weight, packed.long(), bias)),
        ("packed", lambda: ml(x, weight, bank, bias)),
        ("bias", lambda: ml(x, weight, packed, bias[:-1])),
        ("bias", lambda: ml(x, weight, packed, bias.double())),
        ("x", lambda: mml(x, weight, bank, bias, False)),
        ("packed", lambda: mml(x, weight, packed, bias, True)),
        ("grad_out", lambda: _ops.masked_linear_backward(g[:, :-1], x, weight, packed, [True] * 3)),
        ("grad_out", lambda: _ops.masked_linear_backward(g.double(), x, weight, packed, [True] * 3)),
        ("grad_out", lambda: _ops.multi_masked_linear_backward(g, x, weight, bank, True, [True] * 3)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_inputs_name_the_argument(device, case):
    name, call = _bad_cases(device)[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        call()
