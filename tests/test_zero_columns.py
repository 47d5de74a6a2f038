"""multi_masked_linear where the input has columns of zeros (an image's blank border, a unit that
no sample activates): the CPU forward's bit walk skips those columns and the shared-input score
gradient runs its GEMM on the other columns only. Checked against modsplit.reference over column
patterns (runs at both edges, short runs that take the dense path, none, all), shapes whose
widths are not multiples of 8 or 32, both float dtypes of the kernels, and non-finite values
(inf * 0 must still give NaN, as in the product with W*M)."""
import pytest
import torch

from modsplit import ops
from modsplit import reference as R

from precision import assert_matches_ref

_ops = torch.ops.modsplit

# I values: 784 (MNIST: 24.5 words), widths that are not multiples of 8 or 32, and 1.
WIDTHS = [1, 13, 67, 257, 784]
PATTERNS = ["border", "scattered", "none", "all", "first", "last", "half-word"]


def zero_columns(pattern: str, i: int) -> torch.Tensor:
    """bool [i]: the columns the input holds zeros in."""
    col = torch.arange(i)
    if pattern == "border":  # a 28-wide image's blank rows and border, or its scaled version
        width = 28 if i >= 28 * 4 else max(i // 4, 1)
        r, c = col // width, col % width
        return (c < width // 6) | (c >= width - width // 5) | (r < 2) | (r % 7 == 3)
    if pattern == "scattered":  # short runs: the GEMM keeps every column
        return col % 3 == 1
    if pattern == "none":
        return torch.zeros(i, dtype=torch.bool)
    if pattern == "all":
        return torch.ones(i, dtype=torch.bool)
    if pattern == "first":  # only the first column holds values
        return col > 0
    if pattern == "last":
        return col < i - 1
    return (col % 32) >= 16  # half of every mask word


def make_input(lead, batch, i, pattern, dtype, generator):
    x = torch.randn(*lead, batch, i, generator=generator, dtype=torch.float64).to(dtype)
    x[..., zero_columns(pattern, i)] = 0.0
    if pattern == "border":
        # a few signed zeros, and rows that are all zero, inside the kept columns
        x[..., 0, :] = -0.0 * x[..., 0, :].sign()
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("i", WIDTHS)
@pytest.mark.parametrize("shared,k", [(True, 10), (True, 3), (False, 3), (True, 1)])
@pytest.mark.parametrize("batch", [5, 32, 70])
def test_zero_columns_match_reference(batch, shared, k, i, pattern, dtype):
    gen = torch.Generator().manual_seed(i * 7 + batch + k)
    o = 49
    weight = torch.randn(o, i, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(k, o, i, generator=gen) < 0.1
    packed = R.pack_mask(mask, batch_dims=1)
    x = make_input(() if shared else (k,), batch, i, pattern, dtype, gen)
    y = ops.multi_masked_linear(x, weight, packed, None, shared)
    assert y.shape == (k, batch, o) and y.dtype == dtype
    assert_matches_ref(y, lambda x, w: R.multi_masked_linear(x, w, packed, None, shared),
                       (x, weight))
    g = torch.randn(k, batch, o, generator=gen, dtype=torch.float64).to(dtype)
    gx, gs, _ = _ops.multi_masked_linear_backward(g, x, weight, packed, shared,
                                                  [True, True, False])
    assert gs.shape == (k, o, i) and gs.dtype == dtype
    assert_matches_ref((gx, gs),
                       lambda g, x, w: R.multi_masked_linear_backward(g, x, w, packed, shared)[:2],
                       (g, x, weight))
    # the columns where every row of x is zero get a score gradient of exactly zero
    zero = (x == 0).reshape(-1, i).all(0)
    assert torch.all(gs[..., zero] == 0)


@pytest.mark.parametrize("where", ["weight", "grad"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_values_in_zero_columns_propagate(where, value):
    """inf or NaN times a zero input is NaN in the product with W*M: a skipped column must not
    hide it (the kernels then take their dense paths)."""
    gen = torch.Generator().manual_seed(3)
    k, o, i, batch = 4, 9, 784, 32
    weight = torch.randn(o, i, generator=gen)
    mask = torch.ones(k, o, i, dtype=torch.bool)  # every weight kept: the walk visits all
    packed = R.pack_mask(mask, batch_dims=1)
    x = make_input((), batch, i, "border", torch.float32, gen)
    zero_col = int(zero_columns("border", i).nonzero()[0])
    g = torch.randn(k, batch, o, generator=gen)
    if where == "weight":
        weight[2, zero_col] = value
    else:
        g[1, 5, 3] = value
    y = ops.multi_masked_linear(x, weight, packed, None, True)
    y_ref = R.multi_masked_linear(x, weight, packed, None, True)
    assert torch.equal(y.isnan(), y_ref.isnan())
    _, gs, _ = _ops.multi_masked_linear_backward(g, x, weight, packed, True, [False, True, False])
    _, gs_ref, _ = R.multi_masked_linear_backward(g, x, weight, packed, True)
    assert torch.equal(gs.isnan(), gs_ref.isnan())
    assert gs.isnan().any()
    finite = ~gs_ref.isnan()
    torch.testing.assert_close(gs[finite], gs_ref[finite].to(gs.dtype), rtol=1e-4, atol=1e-4)


def test_nan_input_column_is_not_skipped():
    """A NaN in x is not a zero: its column stays in the products."""
    gen = torch.Generator().manual_seed(5)
    k, o, i, batch = 3, 7, 100, 32
    weight = torch.randn(o, i, generator=gen)
    packed = R.pack_mask(torch.rand(k, o, i, generator=gen) < 0.5, batch_dims=1)
    x = make_input((), batch, i, "border", torch.float32, gen)
    x[4, int(zero_columns("border", i).nonzero()[0])] = float("nan")
    g = torch.randn(k, batch, o, generator=gen)
    _, gs, _ = _ops.multi_masked_linear_backward(g, x, weight, packed, True, [False, True, False])
    _, gs_ref, _ = R.multi_masked_linear_backward(g, x, weight, packed, True)
    assert torch.equal(gs.isnan(), gs_ref.isnan()) and gs.isnan().any()
    y = ops.multi_masked_linear(x, weight, packed, None, True)
    assert torch.equal(y.isnan(), R.multi_masked_linear(x, weight, packed, None, True).isnan())
