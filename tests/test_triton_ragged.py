"""Triton ragged_masked_linear (K modules, each on its own rows): outputs, the backward op and
every autograd gradient against modsplit.reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (see load_triton), which
is slow: shapes are small, and each case checks the forward and the whole backward at once.
"""
import importlib.util
import itertools

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

SIZES = [(1, 1), (13, 33), (70, 70), (33, 13), (1, 70), (70, 13)]  # (O, I)


def _d(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_close_cpu(got, expected, **tol):
    torch.testing.assert_close(got.cpu(), expected, **(tol or TOL))


def _packed(k, o, i, density):
    """int32 [K, O, words]: density 0 all-zero, 1 every bit set (padding bits past I too)."""
    words = ref.words_for(i)
    if density in (0, 1) or k * o * i == 0:
        return torch.full((k, o, words), -density, dtype=torch.int32)
    return ref.multi_topk_mask(torch.randn(k, o, i), density)


def _offsets(counts):
    return torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)


def _problem(o, i, counts, with_rows=True, r=7, density=0.3, bias=True):
    """(x [R, I], weight, packed, offsets, rows [T] with repeats or None, bias): module k takes
    counts[k] rows."""
    t = sum(counts)
    x = torch.randn(r if with_rows else t, i)
    rows = torch.randint(0, r, (t,)) if with_rows else None
    return (x, torch.randn(o, i), _packed(len(counts), o, i, density), _offsets(counts), rows,
            torch.randn(o) if bias else None)


def _up(v):
    """float16 / bfloat16 -> float32; anything else as it is."""
    return v.float() if v is not None and v.dtype in (torch.float16, torch.bfloat16) else v


def _cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


def _check_all(x, weight, packed, offsets, rows, b, **tol):
    """Forward and the full backward op against the reference, on the CPU (half inputs: in
    float32 from the same half values). The inputs may already be on DEVICE."""
    x_, w_, p_, off_, rows_, b_ = _cpu(x, weight, packed, offsets, rows, b)
    y = T.ragged_masked_linear(*_d(x, weight, packed, offsets, rows, b))
    assert y.dtype == x.dtype and y.shape == (int(offsets[-1]), weight.shape[0])
    _assert_close_cpu(_up(y), ref.ragged_masked_linear(_up(x_), _up(w_), p_, off_, rows_, _up(b_)),
                      **tol)
    g = torch.randn(y.shape).to(x.dtype)
    got = T.ragged_masked_linear_backward(*_d(g, x, weight, packed, offsets, rows),
                                          [True, True, True])
    want = ref.ragged_masked_linear_backward(_up(g), _up(x_), _up(w_), p_, off_, rows_)
    for a, e in zip(got, want):
        assert a.dtype == x.dtype and a.shape == e.shape
        _assert_close_cpu(_up(a), e, **tol)


@pytest.mark.parametrize("o,i", SIZES)
@pytest.mark.parametrize("counts", [[5], [4, 0, 6], [0, 3, 1, 0, 2]], ids=["K1", "K3", "K5"])
@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "no_rows"])
def test_forward_backward(o, i, counts, with_rows):
    bias = (o + len(counts)) % 2 == 0  # with and without bias across the sizes
    _check_all(*_problem(o, i, counts, with_rows, bias=bias))


@pytest.mark.parametrize("density", [0, 0.3, 1])
def test_densities(density):
    _check_all(*_problem(33, 70, [3, 0, 5], density=density))


def test_wide_module_several_row_tiles():
    """A module wider than the row tiles next to narrow and empty ones: programs past a
    module's rows exit, grad_scores loops over several row steps."""
    _check_all(*_problem(13, 33, [1, 70, 0, 2], r=9))
    _check_all(*_problem(13, 33, [1, 70, 0, 2], with_rows=False, bias=False))


def test_noncontiguous_inputs():
    """Strided views made on DEVICE (moving a view to another device may copy it densely)."""
    x = torch.randn(40, 9, device=DEVICE)[::2].t().contiguous().t()  # [20, 9], strides (1, 20)
    weight = torch.randn(9, 13, device=DEVICE).t()  # [13, 9], strides (1, 13)
    packed = _packed(3, 13, 9, 0.3).to(DEVICE)
    offsets = _offsets([6, 0, 5]).to(DEVICE)
    rows = torch.randint(0, 20, (22,), device=DEVICE)[::2]
    b = torch.randn(26, device=DEVICE)[::2]
    x_sliced = torch.randn(11, 18, device=DEVICE)[:, ::2]  # [11, 9], no rows: T = 11
    g = torch.randn(13, 11, device=DEVICE).t()  # grad_out [11, 13], strides (1, 11)
    assert not any(v.is_contiguous() for v in (x, weight, rows, b, x_sliced, g))
    _check_all(x, weight, packed, offsets, rows, b)
    _check_all(x_sliced, weight, packed, offsets, None, b)
    got = T.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows, [True, True, True])
    want = ref.ragged_masked_linear_backward(*_cpu(g, x, weight, packed, offsets, rows))
    for a, e in zip(got, want):
        _assert_close_cpu(a, e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "no_rows"])
def test_half_precision(dtype, with_rows):
    x, weight, packed, offsets, rows, b = _problem(33, 70, [4, 0, 7], with_rows)
    _check_all(x.to(dtype), weight.to(dtype), packed, offsets, rows, b.to(dtype),
               rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("counts", [[3, 0, 4], []], ids=["K3", "K0"])
def test_float64_takes_the_torch_path(counts):
    x, weight, packed, offsets, rows, b = _problem(13, 33, counts)
    x, weight, b = x.double(), weight.double(), b.double()
    _check_all(x, weight, packed, offsets, rows, b, rtol=1e-10, atol=1e-10)
    g = torch.randn(sum(counts), 13, dtype=torch.float64)
    gw = T.ragged_masked_linear_weight_grad(*_d(g, x, weight, packed, offsets, rows))
    wl = weight.clone().requires_grad_()
    y = ref.ragged_masked_linear(x, wl, packed, offsets, rows)
    want = torch.autograd.grad(y, wl, g)[0] if y.requires_grad else torch.zeros_like(weight)
    _assert_close_cpu(gw, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)),
                         ids=lambda m: "".join("xsb"[j] if v else "-" for j, v in enumerate(m)))
def test_backward_output_mask(mask):
    x, weight, packed, offsets, rows, _ = _problem(13, 33, [2, 0, 3])
    g = torch.randn(5, 13)
    got = T.ragged_masked_linear_backward(*_d(g, x, weight, packed, offsets, rows), list(mask))
    want = ref.ragged_masked_linear_backward(g, x, weight, packed, offsets, rows)
    for needed, a, e in zip(mask, got, want):
        if needed:
            _assert_close_cpu(a, e)
        else:
            assert a is None


@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "no_rows"])
@pytest.mark.parametrize("density", [0.3, 1])
def test_autograd(with_rows, density):
    """grad of x, weight (exact: sum_k (g_k^T x_k) * M_k) and bias through the op."""
    x, weight, packed, offsets, rows, b = _problem(33, 70, [4, 0, 6], with_rows, density=density)
    g = torch.randn(10, 33)
    leaves = [v.clone().requires_grad_() for v in (x, weight, b)]
    want = torch.autograd.grad(ref.ragged_masked_linear(leaves[0], leaves[1], packed, offsets,
                                                        rows, leaves[2]), leaves, g)
    dev = [v.detach().to(DEVICE).requires_grad_() for v in (x, weight, b)]
    y = T.ragged_masked_linear(dev[0], dev[1], *_d(packed, offsets, rows), dev[2])
    for a, e in zip(torch.autograd.grad(y, dev, g.to(DEVICE)), want):
        _assert_close_cpu(a, e)
    (gx,) = torch.autograd.grad(T.ragged_masked_linear(dev[0], *_d(weight, packed, offsets, rows)),
                                dev[0], g.to(DEVICE))  # bias omitted, weight frozen
    _assert_close_cpu(gx, want[0])


@pytest.mark.parametrize("counts", [[0, 0, 0], [], [0, 4]], ids=["T0", "K0", "first_empty"])
@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "no_rows"])
def test_empty_cases(counts, with_rows):
    x, weight, packed, offsets, rows, b = _problem(5, 40, counts, with_rows)
    _check_all(x, weight, packed, offsets, rows, b)
    g = torch.randn(sum(counts), 5)
    wl = weight.clone().requires_grad_()
    y = ref.ragged_masked_linear(x, wl, packed, offsets, rows)
    want = torch.autograd.grad(y, wl, g)[0] if y.requires_grad else torch.zeros_like(weight)
    _assert_close_cpu(T.ragged_masked_linear_weight_grad(*_d(g, x, weight, packed, offsets, rows)),
                      want)


@pytest.mark.parametrize("o,i", [(0, 33), (13, 0)], ids=["O0", "I0"])
@pytest.mark.parametrize("with_rows", [True, False], ids=["rows", "no_rows"])
def test_zero_width(o, i, with_rows):
    """O = 0 or I = 0 (which the reference cannot unpack): y = bias, zero gradients but bias's."""
    x, weight, packed, offsets, rows, b = _problem(o, i, [3, 0, 2], with_rows)
    y = T.ragged_masked_linear(*_d(x, weight, packed, offsets, rows, b))
    _assert_close_cpu(y, b.expand(5, o))
    g = torch.randn(5, o)
    got = T.ragged_masked_linear_backward(*_d(g, x, weight, packed, offsets, rows),
                                          [True, True, True])
    for a, e in zip(got, (torch.zeros_like(x), torch.zeros(3, o, i), g.sum(0))):
        _assert_close_cpu(a, e)
    gw = T.ragged_masked_linear_weight_grad(*_d(g, x, weight, packed, offsets, rows))
    _assert_close_cpu(gw, torch.zeros(o, i))


def _bad_cases():
    x, weight, packed, offsets, rows, b = _problem(13, 33, [2, 0, 3])
    return [
        ("offsets", (x, weight, packed, offsets[:-1], rows, b)),
        ("offsets", (x, weight, packed, offsets.int(), rows, b)),
        ("offsets", (x, weight, packed, _offsets([2, 0, 2]), rows, b)),  # ends at 4, T = 5
        ("offsets", (x, weight, packed, torch.tensor([0, 3, 2, 5]), rows, b)),  # falls
        ("rows", (x, weight, packed, offsets, torch.tensor([0, 1, 7, 2, 3]), b)),  # R = 7
        ("rows", (x, weight, packed, offsets, torch.tensor([0, 1, -1, 2, 3]), b)),
        ("rows", (x, weight, packed, offsets, rows.int(), b)),
        ("x", (x.long(), weight, packed, offsets, rows, b)),
        ("x", (x.double(), weight, packed, offsets, rows, b)),  # weight float32
        ("packed", (x, weight, packed.long(), offsets, rows, b)),
        ("packed", (x, weight, packed[:, :, :0], offsets, rows, b)),
        ("bias", (x, weight, packed, offsets, rows, b[:-1])),
        ("features", (x[:, :32], weight, packed, offsets, rows, b)),
    ]


@pytest.mark.parametrize("name,args", _bad_cases(),
                         ids=[f"{n}{j}" for j, (n, _) in enumerate(_bad_cases())])
def test_bad_inputs(name, args):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        T.ragged_masked_linear(*_d(*args))
    if name == "bias":  # the backward has no bias argument
        return
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        T.ragged_masked_linear_backward(torch.zeros(5, 13, device=DEVICE), *_d(*args[:5]),
                                        [True, True, True])


def test_bad_grad_out():
    x, weight, packed, offsets, rows, _ = _problem(13, 33, [2, 0, 3])
    for g in (torch.zeros(4, 13), torch.zeros(5, 12), torch.zeros(5, 13, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"\bgrad_out\b"):
            T.ragged_masked_linear_backward(*_d(g, x, weight, packed, offsets, rows),
                                            [True, True, True])


def test_opcheck():
    """Schema, fake impl (shapes without reading offsets) and autograd registration."""
    for with_rows in (True, False):
        x, weight, packed, offsets, rows, b = _d(*_problem(13, 33, [2, 0, 3], with_rows))
        args = (x.requires_grad_(), weight.requires_grad_(), packed, offsets, rows, b)
        torch.library.opcheck(T.ragged_masked_linear.default, args)
    torch.library.opcheck(T.ragged_masked_linear.default, args[:4])  # rows, bias omitted


def test_functional_matches_torch_backend():
    """modsplit.functional routed to Triton: the torch backend's values and gradients."""
    x, weight, packed, offsets, rows, b = _problem(13, 33, [2, 0, 3])
    scores = torch.randn(3, 13, 33)
    runs = []
    for name in ("torch", "triton"):
        leaves = [v.detach().to(DEVICE).requires_grad_() for v in (x, scores, b)]
        with backend.use(name):
            y = F_ms.ragged_masked_linear(leaves[0], weight.to(DEVICE), leaves[1],
                                          *_d(packed, offsets, rows), bias=leaves[2])
        y.backward(torch.ones_like(y))
        runs.append([y] + [v.grad for v in leaves])
    for a, e in zip(*runs):
        _assert_close_cpu(a, e.cpu())
