"""Triton topk_mask: float64 keys kept exact (8 radix passes), every float dtype bit-exact against
the reference, banks of up to 10 modules, and NaN rejection in both reporting modes
(triton_kernels/nan_report.py). Without a GPU the kernels run under the Triton interpreter."""
import importlib.util

import pytest
import torch

from modsplit import backend
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TK = backend.load_triton(interpret=DEVICE == "cpu")
T = torch.ops.modsplit_triton


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (13, 33), (70, 200)])
@pytest.mark.parametrize("density", [1e-4, 0.3, 1.0])
def test_every_dtype_bit_exact(dtype, shape, density):
    s = torch.randn(shape, dtype=torch.float64).to(dtype)
    assert torch.equal(T.topk_mask(s.to(DEVICE), density).cpu(), ref.topk_mask(s, density))


def test_float64_scores_that_float32_would_tie():
    s = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 + 2e-12, 0.5, -(1.0 + 3e-12), 1e-300, 0.0, 2.0]],
                     dtype=torch.float64)
    assert torch.unique(s.float().abs()).numel() < torch.unique(s.abs()).numel()
    for density in (0.125, 0.25, 0.5, 0.75):
        assert torch.equal(T.topk_mask(s.to(DEVICE), density).cpu(), ref.topk_mask(s, density))


@pytest.mark.parametrize("k", [9, 10])
def test_banks_of_up_to_ten_modules(k):
    s = torch.randint(-3, 4, (k, 17, 45)).double()  # many ties per module
    assert torch.equal(T.multi_topk_mask(s.to(DEVICE), 0.4).cpu(), ref.multi_topk_mask(s, 0.4))


def _nan_scores():
    s = torch.randn(5, 40)
    s[3, 17] = float("nan")
    return s.to(DEVICE)


def test_nan_raises_in_the_call_when_checked(monkeypatch):
    monkeypatch.setenv("MODSPLIT_NAN_CHECK", "sync")
    with pytest.raises(ValueError, match="scores contain NaN"):
        T.topk_mask(_nan_scores(), 0.5)
    assert T.topk_mask(torch.randn(5, 40, device=DEVICE), 0.5).shape == (5, 2)  # flag reset


def test_nan_is_reported_by_a_later_call_when_lazy(monkeypatch):
    monkeypatch.setenv("MODSPLIT_NAN_CHECK", "lazy")
    T.multi_topk_mask(_nan_scores()[None], 0.5)  # no host sync, no error yet
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match="earlier topk_mask call"):
        T.topk_mask(torch.randn(5, 40, device=DEVICE), 0.5)
    assert T.topk_mask(torch.randn(5, 40, device=DEVICE), 0.5).shape == (5, 2)


def test_bad_nan_check_mode(monkeypatch):
    monkeypatch.setenv("MODSPLIT_NAN_CHECK", "later")
    with pytest.raises(ValueError, match="MODSPLIT_NAN_CHECK"):
        T.topk_mask(torch.randn(5, 40, device=DEVICE), 0.5)
