"""module_batch_norm / module_batch_norm_backward (training-mode BatchNorm with per-module-group
statistics, the training path of ModuleBatchNorm) against modsplit.reference.

x [G*N, C, *] (G groups of N rows). The CPU kernels take float32 / float64; float16 / bfloat16
run the torch twin (statistics in float32). Both are checked against the reference run in
float64."""
import itertools

import pytest
import torch

from modsplit import backend, reference, torch_backend
from modsplit.ops import module_batch_norm
from precision import assert_matches_ref

ops = torch.ops.modsplit
# (G, x shape [G*N, C, *]): positions per row S below, at and above the kernel's 8
# accumulator chains and not multiples of 8; BatchNorm1d's [R, C] and [R, C, L]; 2-d maps.
SHAPES = [(1, (1, 1, 2)), (1, (4, 3)), (3, (15, 7, 3, 3)), (2, (4, 4, 33)), (10, (30, 2, 8, 8)),
          (4, (4, 5, 8)), (2, (6, 3, 5, 7))]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _inputs(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = (torch.randn(C, generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(C, generator=g).to(dtype) if affine else None
    return x, w, b


def _close(got, want, dtype):
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


def _ref64(x, groups, w, b):
    up = [None if t is None else t.double() for t in (x, w, b)]
    return reference.module_batch_norm(up[0], groups, *up[1:], 1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_forward_matches_reference(groups, shape, dtype, affine):
    x, w, b = _inputs(shape, dtype, affine)
    y, mean, invstd = module_batch_norm(x, groups, w, b, 1e-5)
    stats = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert y.dtype == dtype and mean.dtype == stats and invstd.dtype == stats
    assert y.shape == x.shape and mean.shape == invstd.shape == (groups, shape[1])
    for got, want in zip((y, mean, invstd), _ref64(x, groups, w, b)):
        _close(got, want, dtype)


@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_backward_matches_reference(groups, shape, dtype, output_mask):
    x, w, _ = _inputs(shape, dtype, True)
    _, mean, invstd = module_batch_norm(x, groups, w, None, 1e-5)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.module_batch_norm_backward(grad_y, x, groups, w, mean, invstd, list(output_mask))
    want = reference.module_batch_norm_backward(grad_y.double(), x.double(), groups,
                                                w.double(), mean.double(), invstd.double())
    for wanted, g, r in zip(output_mask, got, want):
        if wanted:
            assert g.dtype == dtype
            _close(g, r, dtype)
        else:
            assert g is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autograd_matches_reference(dtype):
    """Gradients through the wrapper (the kernel's registered autograd for float32, the twin's
    ATen autograd for float16) against the reference's, in x, weight and bias."""
    x, w, b = _inputs((12, 5, 11), dtype, True)
    grads = []
    for fn in (lambda *a: module_batch_norm(a[0], 3, *a[1:]),
               lambda *a: reference.module_batch_norm(a[0].double(), 3, a[1].double(),
                                                      a[2].double(), a[3])):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, 1e-5)[0]
        (y.double() * torch.linspace(-1, 1, y.numel()).view_as(y).double()).sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(g is not None for side in grads for g in side)  # x, weight and bias get gradients
    for got, want in zip(*grads):
        _close(got, want, dtype)


def test_gradcheck_float64():
    x, w, b = _inputs((6, 2, 5), torch.float64, True)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: module_batch_norm(a[0], 2, *a[1:], 1e-5)[0],
                                    leaves)


def test_large_offset_keeps_the_variance():
    """A mean 1e4 times the standard deviation: the shifted sums keep the variance accurate
    (a one-pass E[x^2] - E[x]^2 in float64 would lose about half of its digits)."""
    x = (torch.randn(16, 3, 50, dtype=torch.float64) + 1e4)
    _, mean, invstd = module_batch_norm(x, 2, None, None, 0.0)
    var, want_mean = torch.var_mean(x.view(2, 8, 3, 50), dim=(1, 3), correction=0)
    torch.testing.assert_close(invstd, var.rsqrt(), rtol=1e-9, atol=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-14, atol=0)


def test_constant_input_gives_the_bias():
    x = torch.full((6, 4, 5), 2.5)
    w, b = torch.randn(4), torch.randn(4)
    y, mean, invstd = module_batch_norm(x, 2, w, b, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(invstd).all()
    torch.testing.assert_close(y, b.view(1, 4, 1).expand_as(y))
    torch.testing.assert_close(mean, torch.full((2, 4), 2.5))


def test_non_contiguous_inputs():
    x, w, b = _inputs((12, 5, 6, 4), torch.float32, True)
    x_nc = x.contiguous(memory_format=torch.channels_last)
    w_nc = torch.stack([w, w], 1)[:, 0]
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    for got, want in zip(module_batch_norm(x_nc, 3, w_nc, b, 1e-5), _ref64(x, 3, w, b)):
        _close(got, want, torch.float32)
    g = torch.randn(5, 12, 4, 6).permute(1, 0, 3, 2)  # [12, 5, 6, 4], non-contiguous
    _, mean, invstd = module_batch_norm(x, 3, w, b, 1e-5)
    got = ops.module_batch_norm_backward(g, x_nc, 3, w, mean, invstd, [True, True, True])
    want = reference.module_batch_norm_backward(g.double(), x.double(), 3, w.double(),
                                                mean.double(), invstd.double())
    for a, r in zip(got, want):
        _close(a, r, torch.float32)


def test_kernel_and_twin_agree():
    x, w, b = _inputs((24, 3, 17), torch.float32, True)
    with backend.use("torch"):
        twin = module_batch_norm(x, 4, w, b, 1e-5)
    for a, t in zip(module_batch_norm(x, 4, w, b, 1e-5), twin):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w, b = _inputs((6, 4, 5), torch.float32, True)
    torch.library.opcheck(ops.module_batch_norm, (x.requires_grad_(), 2, w, b, 1e-5))
    _, mean, invstd = ops.module_batch_norm(x.detach(), 2, w, b, 1e-5)
    torch.library.opcheck(ops.module_batch_norm_backward,
                          (torch.randn_like(x), x.detach(), 2, w, mean, invstd,
                           [True, True, True]))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case,match", [
    ("x 1-d", r"\bx\b.*\[G\*N, C, \*\]"),
    ("groups 4 for 6 rows", r"\bgroups\b"),
    ("x int", r"\bx\b.*float"),
    ("weight shape", r"\bweight\b"),
    ("bias dtype", r"\bbias\b"),
    ("eps negative", r"\beps\b"),
])
def test_bad_inputs_name_the_argument(impl, case, match):
    x, w, b = _inputs((6, 4, 5), torch.float32, True)
    args = {"x 1-d": (x[0, 0], 1, w, b, 1e-5), "groups 4 for 6 rows": (x, 4, w, b, 1e-5),
            "x int": (x.int(), 2, w, b, 1e-5), "weight shape": (x, 2, w[:3], b, 1e-5),
            "bias dtype": (x, 2, w, b.double(), 1e-5), "eps negative": (x, 2, w, b, -1.0)}[case]
    fn = ops.module_batch_norm if impl == "kernel" else torch_backend.module_batch_norm
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_fused_relu_forward_matches_reference(groups, shape, dtype):
    x, w, b = _inputs(shape, dtype, True)
    y, mean, invstd = module_batch_norm(x, groups, w, b, 1e-5, relu=True)
    want = _ref64(x, groups, w, b)
    _close(y, torch.relu(want[0]), dtype)
    _close(mean, want[1], dtype)
    assert (y >= 0).all()


@pytest.mark.parametrize("output_mask", [(True, True, True), (True, False, False),
                                         (False, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("groups,shape", SHAPES, ids=str)
def test_fused_relu_backward_matches_reference(groups, shape, dtype, output_mask):
    """With out (the forward's output under relu), grad_y counts only where out > 0."""
    x, w, b = _inputs(shape, dtype, True)
    out, mean, invstd = module_batch_norm(x, groups, w, b, 1e-5, relu=True)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.module_batch_norm_backward(grad_y, x, groups, w, mean, invstd, list(output_mask),
                                         out)
    masked = torch.where(out.double() <= 0, 0.0, grad_y.double())
    want = reference.module_batch_norm_backward(masked, x.double(), groups, w.double(),
                                                mean.double(), invstd.double())
    for wanted, g, r in zip(output_mask, got, want):
        if wanted:
            _close(g, r, dtype)
        else:
            assert g is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_relu_autograd_matches_unfused(dtype):
    """module_batch_norm(relu=True) has the gradients of torch.relu(module_batch_norm(...)) in
    x, weight and bias."""
    x, w, b = _inputs((12, 5, 11), dtype, True)
    grad_y = torch.randn(12, 5, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = module_batch_norm(leaves[0], 3, leaves[1], leaves[2], 1e-5, relu=fused)[0]
        grads.append(torch.autograd.grad(y if fused else torch.relu(y), leaves, grad_y))
    assert len(grads[0]) == len(grads[1]) == 3
    for a, r in zip(*grads):
        assert a.dtype == r.dtype == dtype and a.shape == r.shape
        _close(a, r.double(), dtype)  # torch.testing.assert_close


def test_fused_relu_opcheck():
    x, w, b = _inputs((6, 4, 5), torch.float32, True)
    torch.library.opcheck(ops.module_batch_norm, (x.requires_grad_(), 2, w, b, 1e-5, True))
    out, mean, invstd = ops.module_batch_norm(x.detach(), 2, w, b, 1e-5, True)
    torch.library.opcheck(ops.module_batch_norm_backward,
                          (torch.randn_like(x), x.detach(), 2, w, mean, invstd,
                           [True, True, True], out))


# ---- ragged groups (offsets): decompose's sampled negatives ------------------------------------

RAGGED = [([0, 3, 3, 8], (8, 4, 5)), ([0, 1], (1, 2, 3, 3)), ([0, 0, 5, 6, 6], (6, 3, 7, 2)),
          ([0, 9, 12], (12, 5, 33))]  # groups without rows, one row, S off the 8-lane grid


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bounds,shape", RAGGED, ids=str)
def test_ragged_groups_match_reference(bounds, shape, dtype, impl, relu):
    """Each ragged group normalised with its own rows' statistics (the reference: one call per
    group); a group without rows: mean 0, invstd 1/sqrt(1 + eps), no gradient."""
    x, w, b = _inputs(shape, dtype, True)
    offsets = torch.tensor(bounds)
    groups = len(bounds) - 1
    fn = ops.module_batch_norm if impl == "kernel" else torch_backend.module_batch_norm
    y, mean, invstd = fn(x, groups, w, b, 1e-5, relu, offsets)
    up = [t.double() for t in (x, w, b)]
    want = reference.module_batch_norm(up[0], groups, *up[1:], 1e-5, relu, offsets)
    for got, ref in zip((y, mean, invstd), want):
        _close(got, ref, dtype)
    for g, (a, c) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a == c:
            assert torch.all(mean[g] == 0)
            torch.testing.assert_close(invstd[g].double(), torch.full_like(
                invstd[g], (1 + 1e-5) ** -0.5, dtype=torch.float64))
        else:  # a one-group call on the group's rows gives the same statistics
            _close(mean[g], reference.module_batch_norm(up[0][a:c], 1, *up[1:], 1e-5)[1][0],
                   dtype)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    back = (ops.module_batch_norm_backward if impl == "kernel"
            else torch_backend.module_batch_norm_backward)
    got = back(grad_y, x, groups, w, mean, invstd, [True, True, True], y if relu else None,
               offsets)
    want = reference.module_batch_norm_backward(grad_y.double(), up[0], groups, up[1],
                                                mean.double(), invstd.double(),
                                                y.double() if relu else None, offsets)
    for g, r in zip(got, want):
        _close(g, r, dtype)


def test_ragged_autograd_and_opcheck():
    x, w, b = _inputs((7, 3, 6), torch.float64, True)
    offsets = torch.tensor([0, 2, 2, 7])
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda *a: module_batch_norm(a[0], 3, *a[1:], 1e-5, True, offsets)[0], leaves)
    torch.library.opcheck(ops.module_batch_norm, (x.clone().requires_grad_(), 3, w, b, 1e-5,
                                                  False, offsets))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("bounds", [[0, 2, 9], [1, 3, 6], [0, 4, 3], [0, 6]])
def test_bad_ragged_offsets_name_the_argument(impl, bounds):
    x, w, b = _inputs((6, 4, 5), torch.float32, True)
    fn = ops.module_batch_norm if impl == "kernel" else torch_backend.module_batch_norm
    with pytest.raises((RuntimeError, ValueError), match=r"\boffsets\b"):
        fn(x, 2, w, b, 1e-5, False, torch.tensor(bounds))
