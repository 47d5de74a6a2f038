"""ragged_masked_conv2d (module k on its own rows) and its backward: the C++ CPU kernel (both of
its conv paths) and the torch backend's twin against modsplit.reference over many shapes
(strides, paddings, dilations, groups, sizes off the 32-bit word grid, modules without rows,
repeated rows, densities from one kept weight to 1, non-contiguous inputs, every dtype), the
autograd of the op and of the straight-through layer, opcheck, and errors naming the argument.
(The Triton twin: tests/test_triton_conv.py; CUDA: the `device` fixture where a GPU is.)"""
import pytest
import torch

import modsplit.functional as F_ms
from modsplit import backend, ops
from modsplit import reference as R

_ops = torch.ops.modsplit
_TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (K, C, O, H, W, kh, kw, stride, padding, dilation, groups, counts, R rows of x or None)
SHAPES = [
    (1, 1, 1, 5, 5, 1, 1, 1, 0, 1, 1, [2], None),
    (3, 3, 5, 7, 6, 3, 3, 1, 1, 1, 1, [3, 0, 2], 4),           # a module without rows
    (4, 4, 7, 9, 8, 3, 3, 2, 1, 1, 1, [1, 5, 2, 3], 6),         # stride 2, rows repeat
    (2, 6, 9, 10, 11, 5, 3, 1, 2, 1, 3, [2, 3], None),          # groups 3, non-square kernel
    (3, 8, 8, 9, 9, 3, 3, 1, 2, 2, 8, [4, 1, 2], 5),            # depthwise, dilation 2
    (2, 12, 18, 7, 7, 3, 3, (2, 1), (1, 0), (1, 2), 2, [3, 2], 4),  # per-dim arguments
    (5, 16, 16, 8, 8, 3, 3, 1, 1, 1, 1, [0, 0, 0, 0, 0], 3),    # no rows at all
    (3, 16, 32, 16, 16, 3, 3, 1, 1, 1, 1, [6, 9, 4], 12),       # a small VGG layer
]
DENSITIES = ["tiny", 0.1, 1.0]


@pytest.fixture(params=["dense", "sparse"])
def conv_path(request, monkeypatch):
    """The CPU kernel's two conv paths (tests/test_masked_conv2d.py)."""
    monkeypatch.setenv("MODSPLIT_SPARSE_CONV_MAX_DENSITY", "0" if request.param == "dense" else "1")
    return request.param


def _case(shape, density=0.3, dtype=torch.float32, seed=0, bias=True):
    """(x, weight, packed, offsets, rows, bias, conv args) of a SHAPES entry."""
    k, c, o, h, w, kh, kw, stride, padding, dilation, groups, counts, r = shape
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    weight = torch.randn(o, c // groups, kh, kw, generator=g, dtype=torch.float64).to(dtype)
    cols = c // groups * kh * kw
    if density == "tiny":
        keep = torch.zeros(k, o * cols, dtype=torch.bool)
        keep[:, torch.randint(o * cols, (1,), generator=g)] = True
    else:
        keep = torch.rand(k, o * cols, generator=g) < density
    packed = R.pack_mask(keep.view(k, o, cols), batch_dims=1)
    x = torch.randn(t if r is None else r, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    rows = None if r is None else torch.randint(0, r, (t,), generator=g)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    b = torch.randn(o, generator=g, dtype=torch.float64).to(dtype) if bias else None
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return x, weight, packed, offsets, rows, b, (pair(stride), pair(padding), pair(dilation),
                                                  groups)


def _ref(fn, *args):
    """fn on float64 copies of the float tensors (ints and the rest unchanged)."""
    return fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args])


def _close(got, want, dtype):
    tol = _TOL[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_forward_and_backward_match_the_reference(shape, density, backend_name, conv_path):
    x, weight, packed, offsets, rows, bias, args = _case(shape, density)
    t = int(offsets[-1])
    with backend.use(backend_name):
        y = ops.ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, *args)
        g = torch.randn_like(y)
        gx, gs, gb = backend.ops_for(x).ragged_masked_conv2d_backward(
            g, x, weight, packed, offsets, rows, *args, [True, True, True])
    assert y.shape[0] == t
    _close(y, _ref(R.ragged_masked_conv2d, x, weight, packed, offsets, rows, bias, *args),
           torch.float32)
    want = _ref(R.ragged_masked_conv2d_backward, g, x, weight, packed, offsets, rows, *args)
    for got, w in zip((gx, gs, gb), want):
        _close(got, w, torch.float32)
    counts = offsets.diff()
    for k in torch.nonzero(counts == 0).flatten().tolist():  # 0 * W for a module without rows
        assert torch.equal(gs[k], torch.zeros_like(gs[k]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_every_dtype(dtype, backend_name):
    shape = SHAPES[2]
    x, weight, packed, offsets, rows, bias, args = _case(shape, 0.4, dtype)
    with backend.use(backend_name):
        y = ops.ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, *args)
        g = torch.randn_like(y)
        gx, gs, gb = backend.ops_for(x).ragged_masked_conv2d_backward(
            g, x, weight, packed, offsets, rows, *args, [True, True, True])
    assert y.dtype == gx.dtype == gs.dtype == gb.dtype == dtype
    _close(y, _ref(R.ragged_masked_conv2d, x, weight, packed, offsets, rows, bias, *args), dtype)
    want = _ref(R.ragged_masked_conv2d_backward, g, x, weight, packed, offsets, rows, *args)
    for got, w in zip((gx, gs, gb), want):
        _close(got, w, dtype)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[7]], ids=["s1", "s7"])
def test_the_device_kernels_match_the_reference(shape, device):
    x, weight, packed, offsets, rows, bias, args = _case(shape, 0.2)
    on = [None if t is None else t.to(device) for t in (x, weight, packed, offsets, rows, bias)]
    y = ops.ragged_masked_conv2d(*on[:6], *args)
    g = torch.randn_like(y)
    grads = backend.ops_for(on[0]).ragged_masked_conv2d_backward(g, *on[:5], *args,
                                                                 [True, True, True])
    assert y.device == on[0].device
    _close(y.cpu(), _ref(R.ragged_masked_conv2d, x, weight, packed, offsets, rows, bias, *args),
           torch.float32)
    want = _ref(R.ragged_masked_conv2d_backward, g.cpu(), x, weight, packed, offsets, rows, *args)
    for got, w in zip(grads, want):
        _close(got.cpu(), w, torch.float32)


def test_non_finite_inputs_propagate_as_in_the_reference(conv_path):
    """NaN in x reaches the same outputs as in the reference (the sparse path falls back to the
    dense one). (A NaN in a pruned weight: the conv kernels drop pruned weights, as
    multi_masked_conv2d does, where the reference's W * M keeps NaN * 0.)"""
    x, weight, packed, offsets, rows, bias, args = _case(SHAPES[7], 0.1)
    x.view(-1)[::997] = float("nan")
    y = ops.ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, *args)
    want = _ref(R.ragged_masked_conv2d, x, weight, packed, offsets, rows, bias, *args)
    assert torch.equal(y.isnan(), want.isnan())
    keep = ~want.isnan()
    _close(y[keep], want[keep], torch.float32)


def test_non_contiguous_inputs():
    x, weight, packed, offsets, rows, bias, args = _case(SHAPES[4], 0.3)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    wt = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous() and not wt.is_contiguous()
    y = ops.ragged_masked_conv2d(xt, wt, packed, offsets, rows, bias, *args)
    g = torch.randn_like(y).transpose(2, 3).contiguous().transpose(2, 3)
    got = _ops.ragged_masked_conv2d_backward(g, xt, wt, packed, offsets, rows, *args,
                                             [True, True, True])
    _close(y, _ref(R.ragged_masked_conv2d, x, weight, packed, offsets, rows, bias, *args),
           torch.float32)
    for a, w in zip(got, _ref(R.ragged_masked_conv2d_backward, g, x, weight, packed, offsets,
                              rows, *args)):
        _close(a, w, torch.float32)


def test_equals_the_multi_module_op_on_full_rows():
    """Every module on all B rows of its own input: the multi-module op's [K, B, ...] result."""
    k, b = 3, 4
    x, weight, packed, _, _, bias, args = _case((k, 6, 8, 7, 7, 3, 3, 1, 1, 1, 1, [b] * k, None))
    offsets = torch.arange(k + 1) * b
    got = ops.ragged_masked_conv2d(x, weight, packed, offsets, None, bias, *args)
    want = ops.multi_masked_conv2d(x.view(k, b, *x.shape[1:]), weight, packed, bias, *args)
    torch.testing.assert_close(got, want.reshape(got.shape))  # other convolution calls


@pytest.mark.parametrize("with_rows", [True, False])
def test_autograd_of_the_op(with_rows):
    shape = SHAPES[1] if with_rows else SHAPES[3]
    x, weight, packed, offsets, rows, bias, args = _case(shape, 0.5, torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    y = ops.ragged_masked_conv2d(leaves[0], leaves[1], packed, offsets, rows, leaves[2], *args)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    xs = ref_leaves[0] if rows is None else ref_leaves[0][rows]
    parts = [torch.nn.functional.conv2d(
        xs[a:b], ref_leaves[1] * R.unpack_mask(packed[k], weight.shape).double(), ref_leaves[2],
        *args) for k, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))]
    want = torch.autograd.grad(torch.cat(parts), ref_leaves, g)
    assert len(got) == 3 and all(a.abs().sum() > 0 for a in got)  # x, weight, bias all reached
    for a, w in zip(got, want):
        _close(a, w, torch.float64)


def test_straight_through_layer_matches_the_multi_module_layer():
    """functional.ragged_masked_conv2d on equal row sets: the multi-module layer's values and
    straight-through score gradients."""
    k, b = 3, 2
    x, weight, packed, _, _, bias, args = _case((k, 4, 6, 6, 6, 3, 3, 1, 1, 1, 1, [b] * k, None))
    scores = torch.randn(k, *weight.shape, requires_grad=True)
    packed = ops.multi_topk_mask(scores.detach(), 0.3)
    offsets = torch.arange(k + 1) * b
    y = F_ms.ragged_masked_conv2d(x, weight, scores, packed, offsets, None, bias, *args)
    (gs,) = torch.autograd.grad(y.square().sum(), scores)
    scores2 = scores.detach().clone().requires_grad_(True)
    y2 = F_ms.multi_masked_conv2d(x.view(k, b, *x.shape[1:]), weight, scores2, packed, bias,
                                  *args)
    (gs2,) = torch.autograd.grad(y2.square().sum(), scores2)
    torch.testing.assert_close(y, y2.reshape(y.shape))
    torch.testing.assert_close(gs, gs2)


def test_opcheck():
    x, weight, packed, offsets, rows, bias, args = _case(SHAPES[1], 0.4, torch.float64)
    torch.library.opcheck(_ops.ragged_masked_conv2d,
                          (x.requires_grad_(True), weight, packed, offsets, rows, bias, *args))
    y = ops.ragged_masked_conv2d(x.detach(), weight, packed, offsets, rows, bias, *args)
    torch.library.opcheck(_ops.ragged_masked_conv2d_backward,
                          (torch.randn_like(y), x.detach(), weight, packed, offsets, rows, *args,
                           [True, True, True]))


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(offsets=a["offsets"].int()), "offsets"),
    (lambda a: a.update(offsets=torch.tensor([0, 2, 1, 7])), "offsets"),
    (lambda a: a.update(offsets=torch.tensor([0, 3, 7])), "offsets"),
    (lambda a: a.update(rows=a["rows"] + 100), "rows"),
    (lambda a: a.update(rows=a["rows"].float()), "rows"),
    (lambda a: a.update(x=a["x"][:, :2]), "channels"),
    (lambda a: a.update(x=a["x"][0]), "x"),
    (lambda a: a.update(packed=a["packed"][:, :3]), "packed"),
])
def test_bad_arguments_name_the_argument(change, message, backend_name):
    x, weight, packed, offsets, rows, bias, args = _case(SHAPES[1])
    a = dict(x=x, weight=weight, packed=packed, offsets=offsets, rows=rows, bias=bias)
    change(a)
    with backend.use(backend_name), pytest.raises((RuntimeError, ValueError), match=message):
        ops.ragged_masked_conv2d(a["x"], a["weight"], a["packed"], a["offsets"], a["rows"],
                                 a["bias"], *args)
