"""topk_mask / multi_topk_mask against modsplit.reference (bit-exact), the fixed mask-vectors, and
the contract itself (popcount == n_keep, kept >= dropped, ties to the lower flat index)."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modsplit import reference as ref
from modsplit.ops import mask as mops

from conftest import data_path

ops = torch.ops.modsplit

SHAPES = [(1, 1), (1, 13), (13, 1), (31, 33), (32, 32), (33, 31), (67, 431), (4, 3, 3, 3),
          (16, 3, 5, 5), (7, 2, 67)]
DENSITIES = [1e-9, 0.1, 0.5, 1.0]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _popcount_rows(packed):
    """int32 [..., words] -> int64 [...]: number of set bits per row."""
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32, device=packed.device)) & 1
    return bits.sum((-1, -2))


def _scores(shape, kind, dtype, device):
    """float [shape] of a given flavour: randn, rounded (ties), all equal, mostly zeros with
    +0.0 and -0.0 mixed, or all negative."""
    s = torch.randn(shape, dtype=torch.float64)
    if kind == "ties":
        s = (s * 2).round() / 2
    elif kind == "equal":
        s = torch.full(shape, -0.75, dtype=torch.float64)
    elif kind == "zeros":
        s = s * (torch.rand(shape) < 0.2)
        s[torch.rand(shape) < 0.5] *= -1.0  # zeros become -0.0 half of the time
    elif kind == "negative":
        s = -s.abs()
    return s.to(dtype).to(device)


def _check_contract(scores, density, packed):
    """Independent of the reference: shape, popcount, kept >= dropped, ties to the lower index."""
    lead = scores.shape[:1] if packed.dim() == 3 else ()
    flat = scores.detach().reshape(*lead, -1).abs().double().cpu()
    n = flat.shape[-1]
    assert packed.shape[-1] == math.ceil(n / scores.shape[len(lead)] / 32)
    keep = ref.unpack_mask(packed.cpu(), scores.shape).reshape(*lead, -1)
    for f, k in zip(flat.reshape(-1, n), keep.reshape(-1, n)):
        assert int(k.sum()) == ref.keep_count(density, n)
        if bool(k.all()):
            continue
        lo = f[k].min()
        assert lo >= f[~k].max()
        tied = (f == lo).nonzero().flatten()
        kept_tied = k[tied]
        assert bool(kept_tied[: int(kept_tied.sum())].all())  # ties kept = a prefix in flat order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_topk_matches_reference(device, shape, density, dtype):
    s = torch.randn(shape).to(dtype).to(device)
    got = ops.topk_mask(s, density)
    assert got.dtype == torch.int32 and got.device == s.device
    assert torch.equal(got.cpu(), ref.topk_mask(s.cpu(), density))
    assert int(_popcount_rows(got).sum()) == ref.keep_count(density, s.numel())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["ties", "equal", "zeros", "negative"])
def test_topk_ties_and_signs(device, kind, density, dtype):
    s = _scores((33, 67), kind, dtype, device)
    got = ops.topk_mask(s, density)
    assert torch.equal(got.cpu(), ref.topk_mask(s.cpu(), density))
    _check_contract(s, density, got)


def test_topk_signed_zero_is_zero(device):
    # |-0.0| == |+0.0|: with one nonzero and n_keep = 3, the first two zeros in flat order are
    # kept whatever their sign.
    s = torch.tensor([[-0.0, 0.0, -0.0, 0.0], [0.0, 2.0, -0.0, 0.0]], device=device)
    got = ops.topk_mask(s, 3 / 8).cpu()
    assert got.tolist() == [[0b0011], [0b0010]]


def test_topk_infinities(device):
    s = torch.tensor([[1.0, -math.inf, 3.0, math.inf, -2.0]], device=device)
    assert ops.topk_mask(s, 0.4).cpu().tolist() == [[0b01010]]
    assert ops.topk_mask(s, 0.6).cpu().tolist() == [[0b01110]]


def test_topk_float64_keeps_exact_order(device):
    # Distinct in float64, equal once rounded to float32: the float64 order must decide.
    s = (1.0 + 1e-12 * torch.arange(100, dtype=torch.float64)).flip(0).reshape(4, 25)
    s = s[torch.randperm(4)].to(device)
    got = ops.topk_mask(s, 0.17)
    assert torch.equal(got.cpu(), ref.topk_mask(s.cpu(), 0.17))
    _check_contract(s, 0.17, got)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", ["equal", "ties", "randn"])
def test_topk_large_layer_many_chunks(device, kind, threads):
    # Big enough to be split into several chunks, so ties at the threshold span chunks.
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = _scores((3, 100_003), kind, torch.float32, device)
        for density in (0.3, 0.5):
            got = ops.topk_mask(s, density)
            assert torch.equal(got.cpu(), ref.topk_mask(s.cpu(), density))
        m = torch.stack([s, s.flip(1), -s])
        assert torch.equal(ops.multi_topk_mask(m, 0.5).cpu(), ref.multi_topk_mask(m.cpu(), 0.5))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["above", "below"])
def test_topk_sample_misses_the_threshold(device, where, dtype):
    # The CPU kernel brackets the threshold from a strided sample (1,024 keys, stride n / 1024)
    # and widens the bracket when the pass proves it wrong. Large keys placed off the sampled
    # positions put the threshold above the sampled bracket; on them only (and a density above
    # their share), below it.
    n = 4096
    s = torch.rand(3, 8, n // 8, dtype=torch.float64) * 0.01
    flat = s.view(3, n)
    if where == "above":
        flat[:, 1::4] += 100.0  # unsampled: 1,024 large keys, the top 10% among them
        density = 0.1
    else:
        flat[:, 0::4] += 100.0  # sampled: the sample sees large keys only
        density = 0.5
    s = s.to(dtype).to(device)
    got = ops.multi_topk_mask(s, density)
    assert torch.equal(got.cpu(), ref.multi_topk_mask(s.cpu(), density))
    _check_contract(s, density, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("shape", [(1, 1), (13, 33), (5, 2, 3, 3), (3, 431)], ids=str)
def test_multi_matches_reference(device, shape, k, density, dtype):
    s = torch.randn(k, *shape).to(dtype)
    s[0] = (s[0] * 2).round() / 2  # ties in one module
    s = s.to(device)
    got = ops.multi_topk_mask(s, density)
    assert got.shape == (k, shape[0], math.ceil(math.prod(shape[1:]) / 32))
    assert torch.equal(got.cpu(), ref.multi_topk_mask(s.cpu(), density))
    assert _popcount_rows(got.cpu()).sum(-1).tolist() == \
        [ref.keep_count(density, math.prod(shape))] * k


def _noncontiguous_cases(device):
    base = torch.randn(40, 70, device=device)
    yield "transposed", base.t(), False
    yield "strided", base[::3, 1::2], False
    yield "expanded", torch.randn(1, 67, device=device).expand(9, 67), False
    yield "permuted4d", torch.randn(3, 3, 16, 5, device=device).permute(2, 3, 0, 1), False
    yield "multi_transposed", torch.randn(37, 4, 6, device=device).permute(1, 2, 0), True
    yield "multi_expanded", torch.randn(13, 33, device=device).expand(5, 13, 33), True
    yield "multi_strided", torch.randn(6, 20, 70, device=device)[::2, :, ::2], True


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("density", [1e-9, 0.1, 0.5])
def test_noncontiguous_inputs(device, case, density):
    name, s, multi = list(_noncontiguous_cases(device))[case]
    assert not s.is_contiguous(), name
    f, r = (ops.multi_topk_mask, ref.multi_topk_mask) if multi else (ops.topk_mask, ref.topk_mask)
    assert torch.equal(f(s, density).cpu(), r(s.contiguous().cpu(), density)), name


def _vector_cases():
    with open(data_path("mask-vectors", "cases.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("case", _vector_cases(), ids=lambda c: f"case{c['id']}")
def test_mask_vectors(device, case):
    vectors = np.load(data_path("mask-vectors", "vectors.npz"))
    s = torch.from_numpy(vectors[f"scores_{case['id']}"]).to(device)
    want = torch.from_numpy(vectors[f"packed_{case['id']}"])
    multi = case.get("multi", False)
    got = (ops.multi_topk_mask if multi else ops.topk_mask)(s, case["density"])
    assert torch.equal(got.cpu(), want)
    per = _popcount_rows(got.cpu())
    per = per.sum(-1).tolist() if multi else [int(per.sum())]
    assert per == [case["n_keep_per_module" if multi else "n_keep"]] * len(per)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 80), k=st.integers(1, 4),
       density=st.floats(1e-6, 1.0), levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_multi_property(rows, cols, k, density, levels, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-levels, levels + 1, (k, rows, cols), generator=g).float() / levels
    got = ops.multi_topk_mask(s, density)
    assert torch.equal(got, ref.multi_topk_mask(s, density))
    _check_contract(s, density, got)


BAD_DENSITIES = [0.0, 1.5, float("nan"), -0.1, float("inf")]


@pytest.mark.parametrize("density", BAD_DENSITIES)
@pytest.mark.parametrize("op", ["topk_mask", "multi_topk_mask"])
def test_bad_density(device, op, density):
    with pytest.raises(RuntimeError, match="density"):
        getattr(ops, op)(torch.randn(2, 3, 4, device=device), density)


@pytest.mark.parametrize("op", ["topk_mask", "multi_topk_mask"])
@pytest.mark.parametrize("bad", ["int", "bool", "empty", "one_dim", "nan"])
def test_bad_scores(device, op, bad):
    s = torch.randn(2, 3, 4, device=device)
    if bad == "int":
        s = s.to(torch.int32)
    elif bad == "bool":
        s = s > 0
    elif bad == "empty":
        s = s[:, :0]
    elif bad == "one_dim":  # one dim short: [n] for topk_mask, [K, n] for multi_topk_mask
        s = s[0, 0] if op == "topk_mask" else s[0]
    elif bad == "nan":
        s[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="scores"):
        getattr(ops, op)(s, 0.5)


@pytest.mark.parametrize("op,shape", [("topk_mask", (13, 3, 3)), ("multi_topk_mask", (3, 7, 40))])
def test_opcheck(device, op, shape):
    s = torch.randn(shape, device=device)
    torch.library.opcheck(getattr(ops, op).default, (s, 0.3),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_compile_fullgraph():
    # multi_topk_mask inside a compiled graph with shape arithmetic and an unpack after it.
    def kept_per_module(scores):
        packed = mops.multi_topk_mask(scores * 2.0, 0.25)
        return mops.unpack_mask(packed, scores.shape).sum((1, 2))

    compiled = torch.compile(kept_per_module, fullgraph=True)
    s = torch.randn(4, 9, 50)
    assert compiled(s).tolist() == [ref.keep_count(0.25, 450)] * 4
    assert torch.equal(torch.ops.modsplit.multi_topk_mask(s, 0.25),
                       ref.multi_topk_mask(s, 0.25))
