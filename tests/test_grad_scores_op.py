"""multi_masked_linear_grad_scores_: multi_masked_linear_backward's score gradient written into
a given tensor (decompose's direct step keeps it between steps). The same values as the
backward's grad_scores bit for bit on the kernels' paths (small banks, tiles, the shared input's
zero-column GEMM), the reference's on every dtype, every element written, clear errors."""
import pytest
import torch

from modsplit import backend, ops
from modsplit import reference as R

_ops = torch.ops.modsplit


def _case(k, o, i, batch, shared, dtype, seed=0, zero_cols=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(o, i, generator=g, dtype=torch.float64).to(dtype)
    packed = R.pack_mask(torch.rand(k, o, i, generator=g) < 0.1, batch_dims=1)
    x = torch.randn(*(() if shared else (k,)), batch, i, generator=g,
                    dtype=torch.float64).to(dtype)
    if zero_cols:
        x[..., : i // 3] = 0
    grad = torch.randn(k, batch, o, generator=g, dtype=torch.float64).to(dtype)
    return grad, x, weight, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("k,o,i,batch,shared,zero_cols", [
    (10, 49, 49, 32, False, False),    # a small bank: direct loops
    (10, 10, 49, 32, False, False),
    (10, 49, 784, 32, True, True),     # shared input with zero columns: the compacted GEMM
    (10, 49, 784, 32, True, False),
    (3, 70, 300, 17, False, False),    # tiles, per module
    (1, 33, 67, 5, True, False),
])
def test_equals_the_backward_score_gradient(k, o, i, batch, shared, zero_cols, dtype):
    grad, x, weight, packed = _case(k, o, i, batch, shared, dtype, zero_cols=zero_cols)
    want = _ops.multi_masked_linear_backward(grad, x, weight, packed, shared,
                                             [False, True, False])[1]
    out = torch.full((k, o, i), float("nan"), dtype=dtype)  # every element must be written
    assert ops.multi_masked_linear_grad_scores_(out, grad, x, weight, packed, shared) is out
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(out, want)  # the same code path as the backward's
    ref = torch.empty((k, o, i), dtype=torch.float64)
    R.multi_masked_linear_grad_scores_(ref, grad.double(), x.double(), weight.double(), packed,
                                       shared)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 5e-2,
           torch.bfloat16: 2e-1}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * max(1, ref.abs().max()))


def test_the_torch_backend_twin_writes_the_same():
    grad, x, weight, packed = _case(4, 20, 90, 8, True, torch.float32, seed=3, zero_cols=True)
    kernel = torch.empty(4, 20, 90)
    ops.multi_masked_linear_grad_scores_(kernel, grad, x, weight, packed, True)
    twin = torch.empty(4, 20, 90)
    with backend.use("torch"):
        ops.multi_masked_linear_grad_scores_(twin, grad, x, weight, packed, True)
    torch.testing.assert_close(twin, kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,needle", [
    (lambda out: out[:, :, :-1], "out must have shape"),
    (lambda out: out.double(), "out"),
    (lambda out: out.transpose(1, 2).contiguous().transpose(1, 2), "contiguous"),
])
def test_bad_out_is_named(bad, needle):
    grad, x, weight, packed = _case(3, 6, 10, 4, False, torch.float32)
    with pytest.raises(RuntimeError, match=needle):
        _ops.multi_masked_linear_grad_scores_(bad(torch.empty(3, 6, 10)), grad, x, weight,
                                              packed, False)


def test_opcheck():
    grad, x, weight, packed = _case(3, 6, 40, 4, True, torch.float32, zero_cols=True)
    torch.library.opcheck(torch.ops.modsplit.multi_masked_linear_grad_scores_.default,
                          (torch.empty(3, 6, 40), grad, x, weight, packed, True))
