"""The pure-PyTorch "torch" backend (modsplit.torch_backend) against modsplit.reference: every op,
odd sizes, ties, extreme densities, K up to 10, float16/bfloat16/float32/float64 values,
non-contiguous inputs, and its module chunking on both sides of the scratch bound
(modsplit.routing.scratch_bytes).

Errors are judged by flash-attention's rule: the backend's error against the float64 reference is
at most twice the error of the reference run in the same low precision, plus a small floor.
"""
import pytest
import torch

from modsplit import reference as R
from modsplit import routing
from modsplit import torch_backend as TB

from precision import assert_matches_ref

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LINEAR_SIZES = [(1, 1), (13, 31), (33, 67), (67, 257)]  # (O, I): below, at and past word edges
DENSITIES = ["tiny", 0.1, 0.5, 1.0]


def _mask(lead, o, r, density):
    """bool [*lead, o, r]: one kept entry per layer for 'tiny', else random."""
    if density == "tiny":
        scores = torch.randn(*lead, o, r).reshape(-1, o, r)
        packed = torch.stack([R.topk_mask(s, 1e-9) for s in scores])
        return R.unpack_mask(packed.reshape(*lead, o, -1), (*lead, o, r))
    return torch.rand(*lead, o, r) < density


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("o,i", LINEAR_SIZES)
def test_masked_linear(o, i, density, dtype):
    weight = torch.randn(o, i, dtype=dtype)
    packed = R.pack_mask(_mask((), o, i, density))
    bias = torch.randn(o, dtype=dtype)
    x = torch.randn(3, 5, i, dtype=dtype)
    assert_matches_ref(TB.masked_linear(x, weight, packed, bias),
                       lambda x, w, b: R.masked_linear(x, w, packed, b), (x, weight, bias))
    g = torch.randn(3, 5, o, dtype=dtype)
    assert_matches_ref(TB.masked_linear_backward(g, x, weight, packed, [True] * 3),
                       lambda g, x, w: R.masked_linear_backward(g, x, w, packed), (g, x, weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 9, 10])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("o,i", [(13, 31), (33, 67)])
def test_multi_masked_linear(o, i, shared, k, dtype):
    weight = torch.randn(o, i, dtype=dtype)
    packed = R.pack_mask(_mask((k,), o, i, 0.3), 1)
    bias = torch.randn(o, dtype=dtype) if k % 2 else None
    x = torch.randn(*(() if shared else (k,)), 2, 7, i, dtype=dtype)
    y = TB.multi_masked_linear(x, weight, packed, bias, shared)
    assert y.shape == (k, 2, 7, o)
    assert_matches_ref(y, lambda x, w, b: R.multi_masked_linear(x, w, packed, b, shared),
                       (x, weight, bias))
    g = torch.randn(k, 2, 7, o, dtype=dtype)
    assert_matches_ref(
        TB.multi_masked_linear_backward(g, x, weight, packed, shared, [True] * 3),
        lambda g, x, w: R.multi_masked_linear_backward(g, x, w, packed, shared), (g, x, weight))


@pytest.mark.parametrize("scratch_modules", [1, 3, 10])  # chunks of 1, of 3 (9 = 3 + 3 + 3 + 1)
@pytest.mark.parametrize("shared", [False, True])
def test_module_chunks_agree_with_one_chunk(shared, scratch_modules):
    """Both sides of the scratch bound: chunked expansion gives the one-chunk result."""
    o, i, k = 17, 45, 10
    weight = torch.randn(o, i, dtype=torch.float64)
    packed = R.pack_mask(_mask((k,), o, i, 0.5), 1)
    bias = torch.randn(o, dtype=torch.float64)
    x = torch.randn(*(() if shared else (k,)), 6, i, dtype=torch.float64)
    g = torch.randn(k, 6, o, dtype=torch.float64)
    cx, cw = torch.randn(*(() if shared else (k,)), 2, 4, 7, 7, dtype=torch.float64), \
        torch.randn(6, 2, 3, 3, dtype=torch.float64)
    cpacked = R.pack_mask(_mask((k,), 6, 18, 0.5), 1)
    conv = ([1, 2], [1, 0], [1, 1], 2)
    cg = torch.randn(k, 2, 6, 7, 3, dtype=torch.float64)

    def run():
        return (TB.multi_masked_linear(x, weight, packed, bias, shared),
                *TB.multi_masked_linear_backward(g, x, weight, packed, shared, [True] * 3),
                TB.multi_masked_conv2d(cx, cw, cpacked, bias[:6], *conv),
                *TB.multi_masked_conv2d_backward(cg, cx, cw, cpacked, *conv, [True] * 3))

    whole = run()
    calls = []
    real = TB.expand

    def spy(weight, packed):
        calls.append(packed.shape[0])
        return real(weight, packed)

    per_module = o * i * 8
    with routing.override(scratch_bytes=scratch_modules * per_module):
        mp = pytest.MonkeyPatch()
        mp.setattr(TB, "expand", spy)
        try:
            # the *_expanded functions took expand as a default argument: pass the spy explicitly
            chunked = (TB.linear_expanded(TB._module_rows(x, k, shared), weight, packed, bias,
                                          spy).reshape(whole[0].shape),
                       TB.linear_grad_x_expanded(g, weight, packed, shared, spy).reshape(x.shape))
        finally:
            mp.undo()
        assert max(calls) == min(scratch_modules, k) and sum(calls) == 2 * k
        for got, want in zip(chunked, whole[:2]):
            torch.testing.assert_close(got, want)
        for got, want in zip(run(), whole):
            torch.testing.assert_close(got, want)
    assert_matches_ref(whole[0], lambda x, w, b: R.multi_masked_linear(x, w, packed, b, shared),
                       (x, weight, bias))
    assert_matches_ref(whole[5:8], lambda g, x, w: R.multi_masked_conv2d_backward(
        g, x, w, cpacked, *conv), (cg, cx, cw))


def test_module_chunk_bounds():
    with routing.override(scratch_bytes=100):
        assert routing.module_chunk(10, 1000) == 1  # one module always fits
        assert routing.module_chunk(10, 30) == 3
        assert routing.module_chunk(2, 30) == 2


CONV_CASES = [  # (C, O, kh, kw, H, W, stride, padding, dilation, groups)
    (1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (3, 5, 3, 3, 9, 7, (1, 1), (1, 1), (1, 1), 1),
    (4, 6, 3, 2, 8, 9, (2, 1), (1, 0), (1, 2), 2),
    (6, 9, 5, 5, 11, 11, (1, 2), (2, 2), (1, 1), 3),
]


@pytest.mark.parametrize("dtype,k", [(d, k) for d in DTYPES for k in (None, 3)]
                         + [(torch.float32, 10), (torch.float16, 10)], ids=str)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv(case, k, dtype):
    c, o, kh, kw, h, w, *conv = CONV_CASES[case]
    conv = [list(conv[0]), list(conv[1]), list(conv[2]), conv[3]]
    r = c // conv[3] * kh * kw
    weight = torch.randn(o, c // conv[3], kh, kw, dtype=dtype)
    bias = torch.randn(o, dtype=dtype)
    if k is None:
        packed = R.pack_mask(_mask((), o, r, 0.4).reshape(weight.shape))
        x = torch.randn(2, c, h, w, dtype=dtype)
        y = TB.masked_conv2d(x, weight, packed, bias, *conv)
        assert_matches_ref(y, lambda x, w, b: R.masked_conv2d(x, w, packed, b, *conv),
                           (x, weight, bias))
        g = torch.randn_like(y)
        assert_matches_ref(TB.masked_conv2d_backward(g, x, weight, packed, *conv, [True] * 3),
                           lambda g, x, w: R.masked_conv2d_backward(g, x, w, packed, *conv),
                           (g, x, weight))
        return
    packed = R.pack_mask(_mask((k,), o, r, 0.4), 1)
    for x in (torch.randn(2, c, h, w, dtype=dtype), torch.randn(k, 2, c, h, w, dtype=dtype)):
        y = TB.multi_masked_conv2d(x, weight, packed, bias, *conv)
        assert_matches_ref(y, lambda x, w, b: R.multi_masked_conv2d(x, w, packed, b, *conv),
                           (x, weight, bias))
        g = torch.randn_like(y)
        assert_matches_ref(
            TB.multi_masked_conv2d_backward(g, x, weight, packed, *conv, [True] * 3),
            lambda g, x, w: R.multi_masked_conv2d_backward(g, x, w, packed, *conv),
            (g, x, weight))


def test_non_contiguous_inputs():
    o, i, k = 33, 67, 4
    weight = torch.randn(i, o).t()  # column-major
    packed = R.pack_mask(_mask((), o, i, 0.5))
    bank = R.pack_mask(_mask((k,), o, i, 0.5), 1)
    bias = torch.randn(2 * o)[::2]
    x = torch.randn(5, 2 * i)[:, ::2]
    xk = torch.randn(i, 5, k).permute(2, 1, 0)
    assert not (weight.is_contiguous() or bias.is_contiguous() or x.is_contiguous()
                or xk.is_contiguous())
    torch.testing.assert_close(TB.masked_linear(x, weight, packed, bias),
                               R.masked_linear(x, weight, packed, bias))
    torch.testing.assert_close(TB.multi_masked_linear(x, weight, bank, bias, True),
                               R.multi_masked_linear(x, weight, bank, bias, True))
    torch.testing.assert_close(TB.multi_masked_linear(xk, weight, bank, bias, False),
                               R.multi_masked_linear(xk, weight, bank, bias, False))
    g = torch.randn(o, k, 5).permute(1, 2, 0)
    for got, want in zip(TB.multi_masked_linear_backward(g, xk, weight, bank, False, [True] * 3),
                         R.multi_masked_linear_backward(g, xk, weight, bank, False)):
        torch.testing.assert_close(got, want)
    cx = torch.randn(2, 9, 9, 4).permute(0, 3, 1, 2)
    cw = torch.randn(3, 3, 2, 6).permute(3, 2, 0, 1)
    cbank = R.pack_mask(_mask((k,), 6, 18, 0.5), 1)
    torch.testing.assert_close(TB.multi_masked_conv2d(cx, cw, cbank, None, [1, 1], [1, 1], [1, 1], 2),
                               R.multi_masked_conv2d(cx, cw, cbank, None, [1, 1], [1, 1], [1, 1], 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (5, 3, 3, 3), (4, 64)])
@pytest.mark.parametrize("density", [1e-9, 0.1, 0.5, 1.0])
def test_topk_mask_matches_reference_bits(shape, density, dtype):
    scores = torch.randn(shape).to(dtype)
    assert torch.equal(TB.topk_mask(scores, density), R.topk_mask(scores, density))
    bank = torch.randn(10, *shape).to(dtype)
    assert torch.equal(TB.multi_topk_mask(bank, density), R.multi_topk_mask(bank, density))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_mask_ties_go_to_the_lower_index(dtype):
    scores = torch.tensor([[1.0, -2.0, 2.0, 2.0, -2.0, 0.5, 2.0, 1.0]] * 3, dtype=dtype)
    for density in (0.1, 0.25, 0.3, 0.5, 0.75):
        assert torch.equal(TB.topk_mask(scores, density), R.topk_mask(scores, density)), density
    bank = torch.zeros(10, 5, 7, dtype=dtype)  # all tied: the first keep_count entries
    assert torch.equal(TB.multi_topk_mask(bank, 0.3), R.multi_topk_mask(bank, 0.3))


def test_topk_mask_rejects_nan():
    scores = torch.randn(4, 9)
    scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN"):
        TB.topk_mask(scores, 0.5)


@pytest.mark.parametrize("shape,batch_dims", [((3, 1), 0), ((7, 33), 0), ((10, 5, 3, 3), 1)])
def test_pack_unpack(shape, batch_dims):
    mask = torch.rand(shape) < 0.4
    packed = TB.pack_mask(mask, batch_dims)
    assert torch.equal(packed, R.pack_mask(mask, batch_dims))
    assert torch.equal(TB.unpack_mask(packed, list(shape)), mask)


def test_bad_inputs_name_the_argument():
    weight, x = torch.randn(5, 40), torch.randn(3, 40)
    packed = R.pack_mask(torch.rand(5, 40) < 0.5)
    cases = [("x", lambda: TB.masked_linear(x.double(), weight, packed)),
             ("packed", lambda: TB.masked_linear(x, weight, packed[:, :1])),
             ("packed", lambda: TB.masked_linear(x, weight, packed.long())),
             ("bias", lambda: TB.masked_linear(x, weight, packed, torch.randn(4))),
             ("x", lambda: TB.multi_masked_linear(x, weight, packed[None].expand(2, -1, -1))),
             ("scores", lambda: TB.topk_mask(torch.randn(4, 4).int(), 0.5)),
             ("density", lambda: TB.topk_mask(torch.randn(4, 4), 1.5)),
             ("mask", lambda: TB.pack_mask(torch.ones(3, 3), 0))]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()
