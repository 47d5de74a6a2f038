"""Property-based tests (hypothesis) of every modsplit op against modsplit.reference.

The ops run through the modsplit.ops wrappers (the default backend), so the same tests check any
kernel behind the op contracts. Masks must match the reference bit for bit and keep exactly
keep_count(density, n) entries per layer per module; float outputs must be allclose.

Score tensors are drawn with many ties (small integers, rounded values, zeros mixed with -0.0,
one magnitude with random signs), since ties (to the lower flat index) and signed zeros are
where a fast selection kernel most easily departs from the reference. Examples are
derandomized (the same ones every run, so CI is reproducible); raise max_examples locally to
search wider.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modsplit import functional, ops
from modsplit import reference as ref

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

SCORE_MODES = ("ints", "rounded", "zeros", "one_magnitude", "continuous")
DTYPES = (torch.float32, torch.float64)
# topk_mask also takes half-precision scores, where ties are frequent.
SCORE_DTYPES = DTYPES + (torch.float16, torch.bfloat16)


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                         "atol": 1e-10}


def make_scores(shape, mode, seed, dtype=torch.float32):
    """Scores of `shape` drawn from generator `seed` in one of SCORE_MODES, with ties; about a
    tenth of the entries are replaced by -0.0 or 0.0."""
    g = torch.Generator().manual_seed(seed)
    if mode == "ints":
        s = torch.randint(-3, 4, shape, generator=g).to(dtype)
    elif mode == "rounded":
        s = (torch.randn(shape, generator=g, dtype=dtype) * 10).round() / 10
    elif mode == "zeros":
        s = torch.randint(-1, 2, shape, generator=g).to(dtype) * (
            torch.rand(shape, generator=g) < 0.2)
    elif mode == "one_magnitude":
        s = torch.where(torch.rand(shape, generator=g) < 0.5, 1.0, -1.0).to(dtype)
    else:
        s = torch.randn(shape, generator=g, dtype=dtype)
    zero = torch.rand(shape, generator=g) < 0.1
    signed_zero = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0).to(dtype)
    return torch.where(zero, signed_zero, s)


def make_tensor(shape, seed, dtype=torch.float32, contiguous=True):
    """randn of `shape`; when contiguous is False, the same values in a non-contiguous layout
    (last two dims swapped in memory)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    if contiguous or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def make_mask(shape, density, seed):
    """bool mask of `shape`, each entry True with probability `density`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def kept_per_module(packed):
    """Set bits of each module of a bank packed [K, O, words], as a list of K ints."""
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.flatten(1).sum(1).tolist()


densities = st.one_of(
    st.floats(min_value=1e-4, max_value=1.0, exclude_min=False),
    st.just(1.0),
    st.floats(min_value=1e-12, max_value=1e-6),
    st.sampled_from([0.5, 0.25, 0.1, 0.05, 1 / 3]),
)


@st.composite
def layer_shapes(draw, max_rest_dims=3):
    """[O, rest...] with O in 1..6 and rest sizes crossing 32-bit word boundaries."""
    o = draw(st.integers(1, 6))
    rest = draw(st.lists(st.integers(1, 40), min_size=1, max_size=max_rest_dims))
    if math.prod(rest) > 300:
        rest = [min(r, 6) for r in rest]
    return (o, *rest)


def _round_half_density(draw, n):
    """A density d with d*n = m + 0.5 up to rounding: the round-half case of keep_count."""
    m = draw(st.integers(0, max(n - 1, 0)))
    return min(1.0, (m + 0.5) / n)


@st.composite
def topk_cases(draw, multi):
    shape = draw(layer_shapes())
    k = draw(st.integers(1, 4)) if multi else None
    n = math.prod(shape)
    density = _round_half_density(draw, n) if draw(st.booleans()) else draw(densities)
    mode = draw(st.sampled_from(SCORE_MODES))
    dtype = draw(st.sampled_from(SCORE_DTYPES))
    full = (k, *shape) if multi else shape
    scores = make_scores(full, mode, draw(st.integers(0, 2**31 - 1)), dtype)
    if not draw(st.booleans()) and scores.dim() >= 2:
        scores = scores.transpose(-1, -2).contiguous().transpose(-1, -2)
    return scores, density


@SETTINGS
@given(topk_cases(multi=False))
def test_topk_mask_matches_reference(case):
    scores, density = case
    got = ops.topk_mask(scores, density)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.topk_mask(scores, density))
    assert kept_per_module(got[None])[0] == ref.keep_count(density, scores.numel())


@SETTINGS
@given(topk_cases(multi=True))
def test_multi_topk_mask_matches_reference(case):
    scores, density = case
    got = ops.multi_topk_mask(scores, density)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.multi_topk_mask(scores, density))
    per_module = ref.keep_count(density, scores[0].numel())
    assert kept_per_module(got) == [per_module] * scores.shape[0]


@pytest.mark.parametrize("n,density,kept", [
    (5, 0.5, 3),     # 2.5 rounds half up
    (1, 0.5, 1),     # 0.5 rounds up to 1
    (3, 0.5, 2),     # 1.5 -> 2
    (8, 0.0625, 1),  # 0.5 -> 1
    (8, 0.1875, 2),  # 1.5 -> 2
    (7, 1.0, 7),
])
def test_round_half_up_keep_count(n, density, kept):
    scores = make_scores((1, n), "ints", n)
    assert ref.keep_count(density, n) == kept
    assert kept_per_module(ops.topk_mask(scores, density)[None])[0] == kept
    bank = make_scores((3, 1, n), "one_magnitude", n)
    assert kept_per_module(ops.multi_topk_mask(bank, density)) == [kept] * 3


@st.composite
def pack_cases(draw):
    batch_dims = draw(st.integers(0, 2))
    lead = draw(st.lists(st.integers(1, 3), min_size=batch_dims + 1, max_size=batch_dims + 1))
    rest = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    if math.prod(rest) > 200:
        rest = [min(r, 5) for r in rest]
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    mask = make_mask((*lead, *rest), density, draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()) and mask.dim() >= 2:
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    return mask, batch_dims


@SETTINGS
@given(pack_cases())
def test_pack_unpack_round_trip(case):
    mask, batch_dims = case
    packed = ops.pack_mask(mask, batch_dims)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, ref.pack_mask(mask, batch_dims))
    back = ops.unpack_mask(packed, mask.shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)
    assert torch.equal(ref.unpack_mask(packed, mask.shape), mask)


@st.composite
def linear_cases(draw, multi):
    o, i = draw(st.integers(1, 6)), draw(st.integers(1, 70))
    k = draw(st.integers(1, 4)) if multi else None
    shared = multi and draw(st.booleans())
    batch = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    x_shape = (*batch, i) if not multi or shared else (k, *batch, i)
    x = make_tensor(x_shape, seed, dtype, contiguous)
    weight = make_tensor((o, i), seed + 1, dtype, contiguous)
    bias = make_tensor((o,), seed + 2, dtype) if draw(st.booleans()) else None
    density = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    mask = make_mask((k, o, i) if multi else (o, i), density, seed + 3)
    packed = ref.pack_mask(mask, 1 if multi else 0)
    return x, weight, packed, bias, shared


@SETTINGS
@given(linear_cases(multi=False))
def test_masked_linear_matches_reference(case):
    x, weight, packed, bias, _ = case
    got = ops.masked_linear(x, weight, packed, bias)
    torch.testing.assert_close(got, ref.masked_linear(x, weight, packed, bias), **_tol(x.dtype))


@SETTINGS
@given(linear_cases(multi=True))
def test_multi_masked_linear_matches_reference(case):
    x, weight, packed, bias, shared = case
    got = ops.multi_masked_linear(x, weight, packed, bias, shared)
    want = ref.multi_masked_linear(x, weight, packed, bias, shared)
    torch.testing.assert_close(got, want, **_tol(x.dtype))


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@SETTINGS
@given(linear_cases(multi=False))
def test_masked_linear_autograd_matches_reference(case):
    """x, weight and bias gradients through the op's autograd vs autograd of the reference."""
    x, weight, packed, bias, _ = case
    out = ref.masked_linear(x, weight, packed, bias)
    grad_out = torch.randn(out.shape, dtype=x.dtype)
    got, want = [_leaf(t) for t in (x, weight, bias)], [_leaf(t) for t in (x, weight, bias)]
    ops.masked_linear(got[0], got[1], packed, got[2]).backward(grad_out)
    ref.masked_linear(want[0], want[1], packed, want[2]).backward(grad_out)
    for g, w in zip(got, want):
        if g is not None:
            torch.testing.assert_close(g.grad, w.grad, **_tol(x.dtype))


@SETTINGS
@given(linear_cases(multi=True))
def test_multi_masked_linear_autograd_matches_reference(case):
    """x, weight and bias gradients through the op's autograd vs autograd of the reference."""
    x, weight, packed, bias, shared = case
    out = ref.multi_masked_linear(x, weight, packed, bias, shared)
    grad_out = torch.randn(out.shape, dtype=x.dtype)
    got, want = [_leaf(t) for t in (x, weight, bias)], [_leaf(t) for t in (x, weight, bias)]
    ops.multi_masked_linear(got[0], got[1], packed, got[2], shared).backward(grad_out)
    ref.multi_masked_linear(want[0], want[1], packed, want[2], shared).backward(grad_out)
    for g, w in zip(got, want):
        if g is not None:
            torch.testing.assert_close(g.grad, w.grad, **_tol(x.dtype))


@SETTINGS
@given(linear_cases(multi=True))
def test_functional_multi_masked_linear_gradients_match_reference(case):
    """modsplit.functional's x and bias gradients and its straight-through score gradient
    (reference grad_scores * sign(scores)) against the reference backward."""
    x, weight, packed, bias, shared = case
    scores = make_scores((packed.shape[0], *weight.shape), "rounded", 7, x.dtype)
    out = ref.multi_masked_linear(x, weight, packed, bias, shared)
    grad_out = torch.randn(out.shape, dtype=x.dtype)
    xs, s = _leaf(x), _leaf(scores)
    b = _leaf(torch.zeros(weight.shape[0], dtype=x.dtype))
    functional.multi_masked_linear(xs, weight, s, packed, b, shared).backward(grad_out)
    gx, gs, gb = ref.multi_masked_linear_backward(grad_out, x, weight, packed, shared)
    tol = _tol(x.dtype)
    torch.testing.assert_close(xs.grad, gx, **tol)
    torch.testing.assert_close(s.grad, gs * scores.sign(), **tol)
    torch.testing.assert_close(b.grad, gb, **tol)


@st.composite
def conv_cases(draw, multi):
    groups = draw(st.integers(1, 3))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    hw = [max(1, dilation[d] * (k - 1) + 1 - 2 * padding[d]) + draw(st.integers(0, 4))
          for d, k in enumerate((kh, kw))]
    b = draw(st.integers(1, 2))
    k = draw(st.integers(1, 3)) if multi else None
    shared = multi and draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    x_shape = (b, cin_g * groups, *hw)
    x = make_tensor(x_shape if not multi or shared else (k, *x_shape), seed, dtype, contiguous)
    weight = make_tensor((cout_g * groups, cin_g, kh, kw), seed + 1, dtype, contiguous)
    bias = make_tensor((cout_g * groups,), seed + 2, dtype) if draw(st.booleans()) else None
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    mask = make_mask(((k,) if multi else ()) + tuple(weight.shape), density, seed + 3)
    packed = ref.pack_mask(mask, 1 if multi else 0)
    # One spelling of the conv arguments as ints when both dims agree, as pairs otherwise.
    args = [v[0] if v[0] == v[1] and draw(st.booleans()) else v
            for v in (stride, padding, dilation)]
    return x, weight, packed, bias, (*args, groups)


def _pairs(conv_args):
    return [[v, v] if isinstance(v, int) else list(v) for v in conv_args[:3]] + [conv_args[3]]


@SETTINGS
@given(conv_cases(multi=False))
def test_masked_conv2d_matches_reference(case):
    x, weight, packed, bias, conv_args = case
    got = ops.masked_conv2d(x, weight, packed, bias, *conv_args)
    want = ref.masked_conv2d(x, weight, packed, bias, *_pairs(conv_args))
    torch.testing.assert_close(got, want, **_tol(x.dtype))


@SETTINGS
@given(conv_cases(multi=True))
def test_multi_masked_conv2d_matches_reference(case):
    x, weight, packed, bias, conv_args = case
    got = ops.multi_masked_conv2d(x, weight, packed, bias, *conv_args)
    want = ref.multi_masked_conv2d(x, weight, packed, bias, *_pairs(conv_args))
    torch.testing.assert_close(got, want, **_tol(x.dtype))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(conv_cases(multi=True))
def test_multi_masked_conv2d_gradients_match_reference(case):
    """x and bias gradients through the op's autograd, and the straight-through score gradient
    of modsplit.functional, against the reference's backward."""
    x, weight, packed, bias, conv_args = case
    pairs = _pairs(conv_args)
    scores = make_scores((packed.shape[0], *weight.shape), "ints", 3, x.dtype)
    out = ref.multi_masked_conv2d(x, weight, packed, bias, *pairs)
    grad_out = torch.randn(out.shape, dtype=x.dtype)
    xs, s = _leaf(x), _leaf(scores)
    b = _leaf(torch.zeros(weight.shape[0], dtype=x.dtype))
    functional.multi_masked_conv2d(xs, weight, s, packed, b, *conv_args).backward(grad_out)
    gx, gs, gb = ref.multi_masked_conv2d_backward(grad_out, x, weight, packed, *pairs)
    tol = _tol(x.dtype)
    torch.testing.assert_close(xs.grad, gx, **tol)
    torch.testing.assert_close(s.grad, gs * scores.sign(), **tol)
    torch.testing.assert_close(b.grad, gb, **tol)


# ---- Numerics: NaN and inf in scores, tiny densities, NaN/inf in x ----


@pytest.mark.parametrize("multi", [False, True])
def test_nan_scores_raise_naming_scores(multi):
    scores = make_scores((2, 3, 5, 7) if multi else (3, 5, 7), "continuous", 1)
    scores.view(-1)[scores.numel() // 2] = float("nan")
    op = ops.multi_topk_mask if multi else ops.topk_mask
    with pytest.raises(RuntimeError, match=r"scores.*NaN|NaN.*scores"):
        op(scores, 0.5)


@SETTINGS
@given(topk_cases(multi=True), st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_inf_scores_are_kept_first(case, seed, n_inf):
    """|±inf| is the largest score: every infinite entry of a module is kept before any finite
    one (the lowest-index infinities when fewer than them are kept)."""
    scores, density = case
    scores = scores.contiguous()
    g = torch.Generator().manual_seed(seed)
    k, n = scores.shape[0], scores[0].numel()
    flat = scores.view(k, -1)
    for m in range(k):
        idx = torch.randperm(n, generator=g)[:n_inf]
        flat[m, idx] = torch.where(torch.rand(len(idx), generator=g) < 0.5, float("inf"),
                                   float("-inf")).to(scores.dtype)
    got = ops.multi_topk_mask(scores, density)
    assert torch.equal(got, ref.multi_topk_mask(scores, density))
    kept = ref.unpack_mask(got, scores.shape).view(k, -1)
    keep = ref.keep_count(density, n)
    for m in range(k):
        inf_idx = torch.nonzero(flat[m].isinf()).flatten()
        expect = inf_idx[:keep]
        assert kept[m, expect].all()
        if keep >= len(inf_idx):
            assert kept[m].sum().item() == keep
        else:
            assert kept[m].sum().item() == keep and kept[m, inf_idx[keep:]].sum() == 0


@SETTINGS
@given(layer_shapes(), st.integers(1, 4), st.sampled_from(SCORE_MODES),
       st.integers(0, 2**31 - 1), st.floats(min_value=1e-300, max_value=0.49))
def test_tiny_density_keeps_one_per_module(shape, k, mode, seed, fraction):
    """density * n < 0.5 still keeps exactly one entry per layer per module: the largest |score|,
    the lowest flat index among ties."""
    n = math.prod(shape)
    density = fraction / n
    scores = make_scores((k, *shape), mode, seed)
    got = ops.multi_topk_mask(scores, density)
    kept = ref.unpack_mask(got, scores.shape).reshape(k, -1)
    assert kept.sum(1).tolist() == [1] * k
    mags = scores.reshape(k, -1).abs()
    first_max = (mags == mags.max(1, keepdim=True).values).int().argmax(1)
    assert kept.int().argmax(1).tolist() == first_max.tolist()
    assert kept_per_module(ops.topk_mask(scores[0], density)[None])[0] == 1


def _poison_check(got, want):
    assert not want.isfinite().all()  # the case does poison some outputs
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-4)


def _poison_mask(shape):
    """A random bool mask with every third entry cleared, so that the poisoned input column
    meets masked-out weights."""
    mask = make_mask(shape, 0.6, 11)
    mask.view(-1)[::3] = False
    return mask


NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _linear_nonfinite_params():
    params = []
    for op in ("masked_linear", "multi_masked_linear", "multi_shared"):
        for rows in (1, 16):
            for in_features, out_features in ((3, 5), (40, 5), (40, 1700)):
                for bad in NONFINITE:
                    params.append(pytest.param(op, rows, in_features, out_features, bad))
    return params


@pytest.mark.parametrize("op,rows,in_features,out_features,bad", _linear_nonfinite_params())
def test_nonfinite_x_propagates_like_f_linear(op, rows, in_features, out_features, bad):
    """NaN/inf in x reach the outputs exactly as in F.linear on W*M: a masked-out weight
    multiplies its input by 0, so NaN (and inf * 0 = NaN) still propagates through it. rows
    (batch rows per module) and the weight's shape cover the kernels' paths: one batched BLAS
    call for banks of at most 2**16 weights, else the GEMV (few rows) and bit walk, whose
    finite-input guard sends a non-finite x to the tiled BLAS path."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g)
    x[rows // 2, 1] = bad
    multi = op != "masked_linear"
    packed = ref.pack_mask(_poison_mask(((2,) if multi else ()) + tuple(weight.shape)),
                           int(multi))
    bias = torch.randn(out_features, generator=g)
    if op == "masked_linear":
        got, want = (f.masked_linear(x, weight, packed, bias) for f in (ops, ref))
    else:
        shared = op == "multi_shared"
        if not shared:  # module 1 gets a clean input
            x = torch.stack([x, torch.randn(rows, in_features, generator=g)])
        got, want = (f.multi_masked_linear(x, weight, packed, bias, shared) for f in (ops, ref))
    _poison_check(got, want)


@pytest.mark.parametrize("path", ["0", "1"], ids=["dense", "sparse"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("op", ["masked_conv2d", "multi_masked_conv2d"])
def test_nonfinite_x_propagates_like_f_conv2d(monkeypatch, op, batch, bad, groups, path):
    """NaN/inf in x reach the outputs exactly as in F.conv2d on W*M (NaN * 0 = NaN), with the
    CPU's dense and sparse paths forced in turn (the sparse path's finite-input guard sends a
    non-finite x to the dense one)."""
    monkeypatch.setenv("MODSPLIT_SPARSE_CONV_MAX_DENSITY", path)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 6, 6, generator=g)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=g)
    x[0, 0, 2, 3] = bad
    conv = ([1, 1], [1, 1], [1, 1], groups)
    multi = op == "multi_masked_conv2d"
    packed = ref.pack_mask(_poison_mask(((2,) if multi else ()) + tuple(weight.shape)),
                           int(multi))
    bias = torch.randn(6, generator=g)
    got, want = (getattr(f, op)(x, weight, packed, bias, *conv) for f in (ops, ref))
    _poison_check(got, want)


@pytest.mark.parametrize("path", ["0", "1"], ids=["dense", "sparse"])
@pytest.mark.parametrize("bad", NONFINITE)
def test_nonfinite_grad_out_propagates_to_grad_x(monkeypatch, bad, path):
    """The same for grad_x = grad_out (W*M): NaN/inf in grad_out reach grad_x through masked-out
    weights on both CPU paths."""
    monkeypatch.setenv("MODSPLIT_SPARSE_CONV_MAX_DENSITY", path)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, 6, 6, generator=g)
    weight = torch.randn(5, 4, 3, 3, generator=g)
    packed = ref.pack_mask(_poison_mask((3,) + tuple(weight.shape)), 1)
    grad_out = torch.randn(3, 2, 5, 6, 6, generator=g)
    grad_out[1, 0, 2, 3, 3] = bad
    conv = ([1, 1], [1, 1], [1, 1], 1)
    got = torch.ops.modsplit.multi_masked_conv2d_backward(grad_out, x, weight, packed, *conv,
                                                          [True, False, False])[0]
    want = ref.multi_masked_conv2d_backward(grad_out, x, weight, packed, *conv)[0]
    _poison_check(got, want)
