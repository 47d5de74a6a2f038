"""graft_cross_entropy / graft_cross_entropy_backward (co-training's grafting layers and
class-weighted cross-entropy in one op) against modsplit.reference (baddbmm + F.cross_entropy).

The CPU kernels take float32 / float64; float16 / bfloat16 run the torch twin."""
import pytest
import torch

from modsplit import reference, torch_backend
from modsplit.ops import graft_cross_entropy
from precision import assert_matches_ref

ops = torch.ops.modsplit
# (K, R, N): one module / row / class, FC heads (N = 10), a 100-class head, odd sizes
SHAPES = [(1, 1, 1), (1, 5, 2), (10, 32, 10), (3, 7, 13), (100, 4, 100), (2, 33, 9)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}


def _inputs(k, r, n, dtype, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(k, r, n, generator=g) * spread).to(dtype)
    weight = torch.randn(k, n, 2, generator=g).to(dtype)
    bias = torch.randn(k, 2, generator=g).to(dtype)
    positive = torch.rand(k, r, generator=g) < 0.3
    row_weight = (torch.rand(k, r, generator=g) * 2).to(dtype)
    row_weight[:, ::4] = 0  # rows that do not count (sampled negatives' padding)
    return logits, weight, bias, positive, row_weight


def _close(got, want, dtype):
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=TOL[dtype],
                               atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("k,r,n", SHAPES, ids=str)
def test_forward_matches_reference(k, r, n, dtype):
    args = _inputs(k, r, n, dtype)
    out, ce = graft_cross_entropy(*args, 1.0 / r)
    assert out.shape == (k, r, 2) and ce.shape == (k,) and out.dtype == ce.dtype == dtype
    assert not out.requires_grad
    assert_matches_ref((out, ce), lambda *a: reference.graft_cross_entropy(*a, 1.0 / r), args)


@pytest.mark.parametrize("output_mask", [(True, True, True), (True, False, False),
                                         (False, True, True), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k,r,n", SHAPES, ids=str)
def test_backward_matches_reference(k, r, n, dtype, output_mask):
    logits, weight, bias, positive, row_weight = _inputs(k, r, n, dtype)
    out, _ = graft_cross_entropy(logits, weight, bias, positive, row_weight, 0.5)
    grad_ce = torch.randn(k, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ops.graft_cross_entropy_backward(grad_ce, logits, weight, out, positive, row_weight, 0.5,
                                           list(output_mask))
    leaves = [t.double().requires_grad_() for t in (logits, weight, bias)]
    _, ce = reference.graft_cross_entropy(*leaves, positive, row_weight.double(), 0.5)
    want = torch.autograd.grad(ce, leaves, grad_ce.double())
    for wanted, g, w in zip(output_mask, got, want):
        if wanted:
            assert g.dtype == dtype
            _close(g, w, dtype)
        else:
            assert g is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autograd_matches_reference(dtype):
    args = _inputs(4, 9, 10, dtype)
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    _, ce = graft_cross_entropy(*leaves, *args[3:], 1 / 9)
    grad_ce = torch.randn(4, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(ce, leaves, grad_ce)
    ups = [t.detach().double().requires_grad_() for t in args[:3]]
    _, ce64 = reference.graft_cross_entropy(*ups, args[3], args[4].double(), 1 / 9)
    want = torch.autograd.grad(ce64, ups, grad_ce.double())
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        _close(g, w, dtype)  # torch.testing.assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_logits_stay_finite(dtype):
    """Graft outputs of ±1e4 (the log-sum-exp is shifted by the larger one, as log_softmax
    does): a finite loss and gradient, equal to the reference's."""
    args = _inputs(3, 8, 5, dtype, spread=3e3)
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    out, ce = graft_cross_entropy(*leaves, *args[3:], 1 / 8)
    assert out.abs().max() > 1e3 and torch.isfinite(ce).all()
    got = torch.autograd.grad(ce.sum(), leaves)
    ups = [t.detach().double().requires_grad_() for t in args[:3]]
    _, want = reference.graft_cross_entropy(*ups, args[3], args[4].double(), 1 / 8)
    _close(ce, want, dtype)
    for g, w in zip(got, torch.autograd.grad(want.sum(), ups)):
        assert torch.isfinite(g).all()
        _close(g, w, dtype)


def test_nan_logit_gives_nan_loss_of_its_module_only():
    logits, weight, bias, positive, row_weight = _inputs(3, 4, 5, torch.float32)
    row_weight[1, 2] = 1.0
    logits[1, 2, 3] = float("nan")
    _, ce = graft_cross_entropy(logits, weight, bias, positive, row_weight, 0.25)
    _, want = reference.graft_cross_entropy(logits, weight, bias, positive, row_weight, 0.25)
    assert torch.isnan(ce[1]) and torch.isfinite(ce[[0, 2]]).all()
    torch.testing.assert_close(ce, want, equal_nan=True)


def test_non_contiguous_inputs():
    logits, weight, bias, positive, row_weight = _inputs(3, 6, 7, torch.float32)
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [3, 6, 7], not contiguous
    wt = weight.transpose(1, 2).contiguous().transpose(1, 2)
    got = graft_cross_entropy(lt, wt, bias, positive.t().contiguous().t(), row_weight, 0.2)
    want = reference.graft_cross_entropy(logits, weight, bias, positive, row_weight, 0.2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_opcheck():
    logits, weight, bias, positive, row_weight = _inputs(3, 5, 4, torch.float32)
    torch.library.opcheck(ops.graft_cross_entropy,
                          (logits.requires_grad_(), weight.requires_grad_(),
                           bias.requires_grad_(), positive, row_weight, 0.2))
    out, _ = graft_cross_entropy(logits.detach(), weight.detach(), bias.detach(), positive,
                                 row_weight, 0.2)
    torch.library.opcheck(ops.graft_cross_entropy_backward,
                          (torch.randn(3), logits.detach(), weight.detach(), out, positive,
                           row_weight, 0.2, [True, True, True]))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
@pytest.mark.parametrize("case,match", [
    ("logits 2-d", r"\blogits\b.*\[K, R, N\]"),
    ("logits int", r"\blogits\b.*float"),
    ("weight shape", r"\bweight\b"),
    ("bias shape", r"\bbias\b"),
    ("positive dtype", r"\bpositive\b"),
    ("row_weight dtype", r"\brow_weight\b"),
])
def test_bad_inputs_name_the_argument(impl, case, match):
    logits, weight, bias, positive, row_weight = _inputs(3, 5, 4, torch.float32)
    args = {"logits 2-d": (logits[0], weight, bias, positive, row_weight),
            "logits int": (logits.int(), weight, bias, positive, row_weight),
            "weight shape": (logits, weight[:, :3], bias, positive, row_weight),
            "bias shape": (logits, weight, bias[:2], positive, row_weight),
            "positive dtype": (logits, weight, bias, positive.float(), row_weight),
            "row_weight dtype": (logits, weight, bias, positive, row_weight.double())}[case]
    fn = ops.graft_cross_entropy if impl == "kernel" else torch_backend.graft_cross_entropy
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(*args, 0.2)


def test_work_split_over_threads():
    """Modules split over two threads give what one thread gives."""
    args = _inputs(100, 32, 100, torch.float32)
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, ce = graft_cross_entropy(*leaves, *args[3:], 1 / 32)
        grads = torch.autograd.grad(ce.sum(), leaves)
    finally:
        torch.set_num_threads(before)
    want_out, want_ce = reference.graft_cross_entropy(*args, 1 / 32)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-5)
    ups = [t.detach().requires_grad_() for t in args[:3]]
    want = torch.autograd.grad(reference.graft_cross_entropy(*ups, *args[3:], 1 / 32)[1].sum(),
                               ups)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
