"""multi_masked_linear on small banks (K * O * I at most 2**16 weights, e.g. FC2-FC4's 49 x 49
layers and the 49 -> 10 heads at K = 10): float32 banks with sparse masks take the bit walk
(forward and grad_x), denser ones and float64 the dense direct loops. Both against the
reference, across the density switch, batches on both sides of the GEMV rows, and non-finite
inputs (which must reach the output as in the product with W*M)."""
import pytest
import torch

from modsplit import ops
from modsplit import reference as R

from precision import assert_matches_ref

_ops = torch.ops.modsplit


def _bank(k, o, i, density, dtype, gen):
    weight = torch.randn(o, i, generator=gen, dtype=torch.float64).to(dtype)
    packed = R.pack_mask(torch.rand(k, o, i, generator=gen) < density, batch_dims=1)
    return weight, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.3, 1.0])
@pytest.mark.parametrize("batch", [3, 5, 32, 70])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("k,o,i", [(10, 49, 49), (10, 10, 49), (3, 7, 13), (1, 33, 67)])
def test_small_bank_matches_reference(k, o, i, shared, batch, density, dtype):
    gen = torch.Generator().manual_seed(k * 100 + o + i + batch)
    weight, packed = _bank(k, o, i, density, dtype, gen)
    x = torch.randn(*(() if shared else (k,)), batch, i, generator=gen,
                    dtype=torch.float64).to(dtype).relu()  # ReLU activations: many zeros
    bias = torch.randn(o, generator=gen, dtype=torch.float64).to(dtype)
    y = ops.multi_masked_linear(x, weight, packed, bias, shared)
    assert y.shape == (k, batch, o)
    assert_matches_ref(y, lambda x, w, b: R.multi_masked_linear(x, w, packed, b, shared),
                       (x, weight, bias))
    g = torch.randn(k, batch, o, generator=gen, dtype=torch.float64).to(dtype)
    got = _ops.multi_masked_linear_backward(g, x, weight, packed, shared, [True, True, True])
    assert_matches_ref(got, lambda g, x, w: R.multi_masked_linear_backward(g, x, w, packed,
                                                                           shared),
                       (g, x, weight))


@pytest.mark.parametrize("where", ["x", "grad"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_small_sparse_bank_propagates_non_finite_values(where, value):
    """A NaN or inf times a masked-out weight is NaN in the product with W*M: the walk, which
    visits kept weights only, must not run then."""
    gen = torch.Generator().manual_seed(11)
    k, o, i, batch = 10, 49, 49, 32
    weight, packed = _bank(k, o, i, 0.1, torch.float32, gen)
    x = torch.randn(k, batch, i, generator=gen)
    g = torch.randn(k, batch, o, generator=gen)
    if where == "x":
        x[2, 5, 7] = value
    else:
        g[4, 1, 3] = value
    # where the result is not finite (inf or NaN: BLAS may turn an exact inf into NaN)
    y = ops.multi_masked_linear(x, weight, packed, None, False)
    y_ref = R.multi_masked_linear(x, weight, packed, None, False)
    assert torch.equal(y.isfinite(), y_ref.isfinite())
    gx, gs, _ = _ops.multi_masked_linear_backward(g, x, weight, packed, False,
                                                  [True, True, False])
    gx_ref, gs_ref, _ = R.multi_masked_linear_backward(g, x, weight, packed, False)
    assert torch.equal(gx.isfinite(), gx_ref.isfinite())
    assert torch.equal(gs.isfinite(), gs_ref.isfinite())
    assert not (y.isfinite().all() and gx.isfinite().all() and gs.isfinite().all())
