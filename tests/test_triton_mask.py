"""Triton topk_mask / multi_topk_mask / pack_mask / unpack_mask: bit-exact against the reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter; load_triton sets
TRITON_INTERPRET only while triton_kernels is imported, so other test modules do not see it.
"""
import importlib.util

import pytest
import torch

from modsplit import backend
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
backend.load_triton(interpret=DEVICE == "cpu")
T = torch.ops.modsplit_triton

SHAPES = [(1, 1), (13, 33), (70, 13), (5, 3, 3, 3)]
DENSITIES = [1e-4, 0.1, 0.5, 1.0]


def _check_topk(scores, density):
    got = T.topk_mask(scores.to(DEVICE), density).cpu()
    assert torch.equal(got, ref.topk_mask(scores, density))


def _check_multi(scores, density):
    got = T.multi_topk_mask(scores.to(DEVICE), density).cpu()
    assert torch.equal(got, ref.multi_topk_mask(scores, density))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
def test_topk_mask(shape, density):
    _check_topk(torch.randn(shape), density)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1e-4, 0.5])
@pytest.mark.parametrize("k", [1, 3])
def test_multi_topk_mask(shape, density, k):
    _check_multi(torch.randn(k, *shape), density)


@pytest.mark.parametrize("density", DENSITIES)
def test_topk_ties_to_lower_index(density):
    _check_topk(torch.randint(-2, 3, (13, 33)).float(), density)  # many equal |s|, signs, zeros
    _check_topk(torch.full((7, 9), -0.25), density)  # all equal
    _check_multi(torch.randint(-1, 2, (3, 33, 5)).float(), density)


def test_topk_ties_across_blocks():
    # 70 x 200 keys span several histogram programs and packing blocks: the ties kept at the
    # threshold depend on the tie counts of the earlier blocks.
    for density in (0.3, 0.5, 0.9):
        _check_topk(torch.randint(-3, 4, (70, 200)).float(), density)
    _check_multi(torch.randint(-3, 4, (3, 70, 200)).float(), 0.45)


def test_topk_special_values():
    s = torch.tensor([[0.0, -0.0, 1e-45, -1e-45], [float("inf"), -float("inf"), 3e38, -2.0]])
    for density in (0.25, 0.5, 0.75):
        _check_topk(s, density)


def test_topk_noncontiguous_and_half():
    _check_topk(torch.randn(33, 13).t(), 0.3)
    _check_multi(torch.randn(13, 3, 33).permute(1, 2, 0), 0.3)
    for dtype in (torch.float16, torch.bfloat16):
        s = torch.randn(13, 33).to(dtype)
        assert torch.equal(T.topk_mask(s.to(DEVICE), 0.2).cpu(), ref.topk_mask(s, 0.2))


@pytest.mark.parametrize("shape,batch_dims", [((1, 1), 0), ((13, 33), 0), ((70, 3, 3, 3), 0),
                                              ((3, 13, 70), 1), ((2, 3, 5, 33), 1)])
def test_pack_unpack(shape, batch_dims):
    mask = torch.rand(shape) < 0.4
    packed = T.pack_mask(mask.to(DEVICE), batch_dims).cpu()
    assert torch.equal(packed, ref.pack_mask(mask, batch_dims))
    assert torch.equal(T.unpack_mask(packed.to(DEVICE), list(shape)).cpu(), mask)
    assert torch.equal(T.pack_mask(mask.transpose(-1, -2).to(DEVICE), batch_dims).cpu(),
                       ref.pack_mask(mask.transpose(-1, -2), batch_dims))


def test_unpack_bad_shape():
    with pytest.raises(ValueError, match="lead dims"):
        T.unpack_mask(torch.zeros(3, 2, dtype=torch.int32, device=DEVICE), [4, 64])
