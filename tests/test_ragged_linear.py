"""ragged_masked_linear (module k on its own rows) and its backward / in-place score gradient:
the C++ CPU kernel and the torch backend's twin against modsplit.reference over many shapes
(sizes off the 8-lane and 32-bit word grids, modules without rows, repeated rows, densities 0,
sparse and 1, non-contiguous inputs, every dtype), the autograd of the op and of the
straight-through layer, opcheck, parallel module loops, and errors naming the argument.
(The Triton twin: tests/test_triton_ragged.py; CUDA: the `device` fixture where a GPU is.)"""
import pytest
import torch

import modsplit.functional as F_ms
from modsplit import backend, ops
from modsplit import reference as R

_ops = torch.ops.modsplit
_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _case(k, o, i, counts, r=None, density=0.3, dtype=torch.float32, seed=0, bias=True):
    """(x [R, I], weight, packed, offsets, rows or None, bias) with module k taking counts[k]
    rows; r: rows of x to draw from (None: x holds the T rows itself)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    weight = torch.randn(o, i, generator=g, dtype=torch.float64).to(dtype)
    packed = R.pack_mask(torch.rand(k, o, i, generator=g) < density, batch_dims=1)
    x = torch.randn(t if r is None else r, i, generator=g, dtype=torch.float64).to(dtype)
    rows = None if r is None else torch.randint(0, r, (t,), generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    b = torch.randn(o, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, weight, packed, offsets, rows, b


def _ref(fn, *tensors):
    """fn on float64 copies of the float tensors (ints unchanged)."""
    return fn(*[t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in tensors])


def _close(got, want, dtype):
    tol = _TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol,
                               atol=tol * max(1.0, float(want.abs().max()) if want.numel() else 1))


SHAPES = [  # (K, O, I, counts, rows drawn from R rows or None)
    (1, 1, 1, [3], None),
    (3, 13, 33, [4, 0, 7], 9),        # a module without rows; I off the word grid
    (4, 49, 784, [13, 2, 29, 1], 32),  # FC1's first layer, sampled rows of a batch of 32
    (5, 10, 49, [1, 3, 0, 5, 2], None),
    (2, 70, 300, [40, 17], 50),        # per-module batches above the walk's row limits
    (6, 9, 64, [0, 0, 0, 0, 0, 0], 4),  # no rows at all
    (10, 49, 49, [3, 8, 1, 0, 12, 4, 6, 2, 9, 5], 32),
    (2, 30, 100, [150, 90], None),     # many rows per module: the drivers per module
    (3, 17, 65, [70, 0, 69], 80),
]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("k,o,i,counts,r", SHAPES)
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_forward_and_backward_match_the_reference(k, o, i, counts, r, dtype, backend_name):
    x, weight, packed, offsets, rows, bias = _case(k, o, i, counts, r, dtype=dtype)
    with backend.use(backend_name):
        y = ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias)
        assert y.shape == (sum(counts), o) and y.dtype == dtype
        _close(y, _ref(R.ragged_masked_linear, x, weight, packed, offsets, rows, bias), dtype)
        g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
        mod = backend.ops_for(x)
        gx, gs, gb = mod.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows,
                                                       [True, True, True])
    wx, ws, wb = _ref(R.ragged_masked_linear_backward, g, x, weight, packed, offsets, rows)
    assert gx.shape == x.shape and gs.shape == (k, o, i) and gb.shape == (o,)
    _close(gx, wx, dtype)
    _close(gs, ws, dtype)
    _close(gb, wb, dtype)


@pytest.mark.parametrize("k,o,i,counts,r", [SHAPES[2], SHAPES[4], SHAPES[5], SHAPES[7]])
def test_the_device_kernels_match_the_reference(k, o, i, counts, r, device):
    """The compiled kernels of each device (CUDA where a GPU is, the C++ ones on the CPU), the
    "auto" backend, against the reference computed on the CPU."""
    x, weight, packed, offsets, rows, bias = _case(k, o, i, counts, r)
    g = torch.randn(sum(counts), o)
    on = [None if t is None else t.to(device) for t in (x, weight, packed, offsets, rows, bias, g)]
    with backend.use("auto"):
        y = ops.ragged_masked_linear(*on[:6])
        got = backend.ops_for(on[0]).ragged_masked_linear_backward(on[6], *on[:5], [True] * 3)
    assert y.device == on[0].device and all(t.device == on[0].device for t in got)
    _close(y.cpu(), _ref(R.ragged_masked_linear, x, weight, packed, offsets, rows, bias),
           torch.float32)
    for a, b in zip(got, _ref(R.ragged_masked_linear_backward, g, x, weight, packed, offsets,
                              rows)):
        _close(a.cpu(), b, torch.float32)


@pytest.mark.parametrize("density", [0.0, 0.02, 1.0])
def test_extreme_densities(density):
    x, weight, packed, offsets, rows, bias = _case(3, 40, 100, [5, 9, 2], 12, density=density)
    if density == 0.0:
        packed.zero_()
    y = ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias)
    _close(y, _ref(R.ragged_masked_linear, x, weight, packed, offsets, rows, bias), torch.float32)
    if density == 0.0:
        assert torch.equal(y, bias.expand_as(y))


@pytest.mark.parametrize("where", ["x", "weight", "grad"])
@pytest.mark.parametrize("counts", [[3, 0, 9, 5], [30, 0, 20, 40], [90, 70, 0, 80]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_values_propagate_as_in_the_reference(where, counts, dtype):
    """inf and NaN reach the outputs as in the reference (0 * inf = NaN): the kernels skip
    zero columns and rows only where that is exact. (A weight the mask drops takes no part, as
    in multi_masked_linear: the non-finite weights sit where every module keeps them.)"""
    x, weight, packed, offsets, rows, bias = _case(4, 20, 70, counts, 100, dtype=dtype)
    mask = R.unpack_mask(packed, (4, 20, 70))
    mask.view(4, -1)[:, 5] = True
    mask.view(4, -1)[:, -7] = True
    packed = R.pack_mask(mask, batch_dims=1)
    x[rows[0], : 35] = 0  # zero columns of a module's rows
    g = torch.randn(sum(counts), 20, dtype=dtype)
    g[:, 3] = 0
    target = {"x": x, "weight": weight, "grad": g}[where]
    target.view(-1)[5] = float("inf")
    target.view(-1)[-7] = float("nan")
    y = ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias)
    want = R.ragged_masked_linear(x, weight, packed, offsets, rows, bias)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    got = _ops.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows, [True] * 3)
    for a, b in zip(got, R.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_non_contiguous_inputs():
    x, weight, packed, offsets, rows, bias = _case(3, 20, 70, [4, 6, 5], 10)
    xt = x.t().contiguous().t()  # same values, column-major
    wt = weight.t().contiguous().t()
    pt = packed.transpose(0, 1).contiguous().transpose(0, 1)
    rows_view = torch.stack([rows, rows])[1]
    y = ops.ragged_masked_linear(xt, wt, pt, offsets, rows_view, bias)
    assert torch.equal(y, ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias))
    g = torch.randn(y.t().shape).t()
    got = _ops.ragged_masked_linear_backward(g, xt, wt, pt, offsets, rows_view, [True] * 3)
    want = _ops.ragged_masked_linear_backward(g.contiguous(), x, weight, packed, offsets, rows,
                                              [True] * 3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_equals_the_multi_module_op_on_full_rows():
    """Every module on the whole batch: the ragged op is multi_masked_linear (shared input)."""
    k, b, o, i = 4, 11, 30, 90
    x, weight, packed, _, _, bias = _case(k, o, i, [b], b)
    rows = torch.arange(b).repeat(k)
    offsets = torch.arange(0, k * b + 1, b)
    y = ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias)
    want = ops.multi_masked_linear(x, weight, packed, bias, shared_input=True)
    torch.testing.assert_close(y, want.reshape(k * b, o), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_module_loop_threads_give_the_same_bits(threads):
    x, weight, packed, offsets, rows, bias = _case(12, 49, 784, list(range(12)), 32, seed=4)
    g = torch.randn(int(offsets[-1]), 49)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = (ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias),
                *_ops.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows,
                                                    [True] * 3))
        torch.set_num_threads(threads)
        got = (ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias),
               *_ops.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows,
                                                   [True] * 3))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("counts", [[20, 0, 64, 5, 33], [17, 40]])
def test_blank_input_columns(counts, dtype):
    """Image-like x (runs of all-zero columns, as an image's blank border): modules of more than
    a few rows take the score-gradient GEMM over x's nonzero columns only; the values match the
    reference and the zero columns give exact zeros."""
    k = len(counts)
    x, weight, packed, offsets, rows, bias = _case(k, 49, 300, counts, 48, dtype=dtype)
    blank = torch.zeros(300, dtype=torch.bool)
    for a, b in ((0, 40), (97, 130), (200, 203), (260, 300)):
        blank[a:b] = True
    x[:, blank] = 0
    g = torch.randn(int(offsets[-1]), 49, dtype=dtype)
    out = torch.full((k, 49, 300), float("nan"), dtype=dtype)
    ops.ragged_masked_linear_grad_scores_(out, g, x, weight, packed, offsets, rows)
    want = _ref(R.ragged_masked_linear_backward, g, x, weight, packed, offsets, rows)
    _close(out, want[1], dtype)
    assert torch.equal(out[:, :, blank], torch.zeros_like(out[:, :, blank]))
    gx, gs, _ = _ops.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows,
                                                   [True, True, False])
    assert torch.equal(gs, out)
    _close(gx, want[0], dtype)
    _close(ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias),
           _ref(R.ragged_masked_linear, x, weight, packed, offsets, rows, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_grad_scores_in_place_equals_the_backward(dtype, backend_name):
    x, weight, packed, offsets, rows, _ = _case(5, 49, 200, [3, 0, 9, 4, 1], 16, dtype=dtype)
    g = torch.randn(int(offsets[-1]), 49, dtype=dtype)
    out = torch.full((5, 49, 200), float("nan"), dtype=dtype)  # every element is written
    with backend.use(backend_name):
        assert ops.ragged_masked_linear_grad_scores_(out, g, x, weight, packed, offsets,
                                                     rows) is out
        want = backend.ops_for(x).ragged_masked_linear_backward(
            g, x, weight, packed, offsets, rows, [False, True, False])[1]
    if backend_name == "cpu":
        assert torch.equal(out, want)
    _close(out, _ref(R.ragged_masked_linear_backward, g, x, weight, packed, offsets, rows)[1],
           dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the module without rows


@pytest.mark.parametrize("with_rows", [True, False])
def test_autograd_of_the_op(with_rows):
    x, weight, packed, offsets, rows, bias = _case(3, 12, 40, [2, 5, 3], 7 if with_rows else None,
                                                   dtype=torch.float64)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda a, w, b: ops.ragged_masked_linear(a, w, packed, offsets, rows, b),
        (x, weight, bias))


def test_straight_through_layer_matches_the_multi_module_layer():
    """functional.ragged_masked_linear's score gradient (with sgn(S)) equals the multi-module
    layer's when every module takes the whole batch."""
    k, b, o, i = 3, 6, 15, 50
    x, weight, packed, _, _, bias = _case(k, o, i, [b], b, dtype=torch.float64)
    scores = torch.randn(k, o, i, dtype=torch.float64, requires_grad=True)
    rows, offsets = torch.arange(b).repeat(k), torch.arange(0, k * b + 1, b)
    y = F_ms.ragged_masked_linear(x, weight, scores, packed, offsets, rows, bias)
    (gs,) = torch.autograd.grad((y ** 2).sum(), scores)
    y2 = F_ms.multi_masked_linear(x, weight, scores, packed, bias, shared_input=True)
    (want,) = torch.autograd.grad((y2 ** 2).sum(), scores)
    torch.testing.assert_close(gs, want)


def test_opcheck():
    x, weight, packed, offsets, rows, bias = _case(3, 10, 40, [2, 0, 5], 6)
    torch.library.opcheck(_ops.ragged_masked_linear, (x, weight, packed, offsets, rows, bias))
    torch.library.opcheck(_ops.ragged_masked_linear,
                          (torch.randn(7, 40), weight, packed, offsets, None, None))
    g = torch.randn(7, 10)
    torch.library.opcheck(_ops.ragged_masked_linear_backward,
                          (g, x, weight, packed, offsets, rows, [True, True, True]))
    out = torch.empty(3, 10, 40)
    torch.library.opcheck(_ops.ragged_masked_linear_grad_scores_,
                          (out, g, x, weight, packed, offsets, rows))


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(offsets=a["offsets"][:-1]), "offsets"),
    (lambda a: a.update(offsets=a["offsets"].int()), "offsets"),
    (lambda a: a.update(offsets=a["offsets"] + 1), "offsets"),
    (lambda a: a.update(offsets=torch.tensor([0, 5, 2, 7])), "offsets"),
    (lambda a: a.update(rows=a["rows"] + 100), "rows"),
    (lambda a: a.update(rows=a["rows"].int()), "rows"),
    (lambda a: a.update(x=a["x"][None]), "x"),
    (lambda a: a.update(x=a["x"].double()), "x"),
    (lambda a: a.update(packed=a["packed"][:2]), "packed|offsets"),
])
def test_bad_arguments_name_the_argument(change, message, backend_name):
    x, weight, packed, offsets, rows, bias = _case(3, 10, 40, [2, 0, 5], 6)
    args = dict(x=x, weight=weight, packed=packed, offsets=offsets, rows=rows, bias=bias)
    change(args)
    with backend.use(backend_name), pytest.raises((RuntimeError, ValueError), match=message):
        ops.ragged_masked_linear(**args)
