"""modsplit.memory: decomposition memory estimate and the out-of-memory check."""
import math
import re

import pytest
import torch
import torch.nn as nn

from modsplit import memory, ops
from modsplit.convert import convert
from modsplit.memory import ModsplitMemoryError, check_memory, estimate_decompose_memory


def _mlp():
    """Linear 784->100 (bias), ReLU, Linear 100->10 (no bias)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(),
                         nn.Linear(100, 10, bias=False))


def _cnn():
    """Conv 3->8 3x3 pad 1, BatchNorm, ReLU, pool to 1x1, Linear 8->4."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_mlp_estimate_by_hand():
    k = 10
    est = estimate_decompose_memory(_mlp(), k)
    weight_elems = 784 * 100 + 100 * 10
    assert est["weights"] == (weight_elems + 100) * 4
    assert est["scores"] == k * weight_elems * 4
    assert est["gradients"] == est["scores"]
    assert est["optimizer_state"] == est["scores"]  # momentum: one buffer per score
    assert est["packed_masks"] == k * (100 * math.ceil(784 / 32) + 10 * math.ceil(100 / 32)) * 4
    assert est["workspace"] == 3 * k * 784 * 100 * 4
    assert est["activations"] == 0
    parts = ("weights", "scores", "gradients", "optimizer_state", "packed_masks", "workspace",
             "activations")
    assert est["total"] == sum(est[p] for p in parts)
    assert est["per_module"] == (est["total"] - est["weights"]) // k
    assert est["n_modules"] == k and est["device"] == torch.device("cpu")


@pytest.mark.parametrize("optimizer,buffers", [("sgd", 0), ("sgd-momentum", 1), ("adam", 2)])
def test_optimizer_state(optimizer, buffers):
    est = estimate_decompose_memory(_mlp(), 3, optimizer=optimizer)
    assert est["optimizer_state"] == buffers * est["scores"]


def test_scales_linearly_with_modules():
    one, many = (estimate_decompose_memory(_cnn(), k, input_shape=(3, 8, 8), batch_size=4)
                 for k in (1, 7))
    assert many["weights"] == one["weights"]
    for part in ("scores", "gradients", "optimizer_state", "packed_masks", "workspace",
                 "activations"):
        assert many[part] == 7 * one[part]


def test_activation_estimate_counts_leaf_outputs():
    k, b = 3, 5
    model = _cnn()
    model.train()
    est = estimate_decompose_memory(model, k, batch_size=b, input_shape=(3, 8, 8))
    # input 3*8*8, conv/bn/relu outputs 8*8*8 each, pool 8, flatten 8, linear 4
    per_sample = 3 * 64 + 3 * 8 * 64 + 8 + 8 + 4
    assert est["activations"] == k * b * per_sample * 4
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer"):
        estimate_decompose_memory(_mlp(), 2, optimizer="lbfgs")
    with pytest.raises(ValueError, match="n_modules"):
        estimate_decompose_memory(_mlp(), 0)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_decompose_memory(_mlp(), 2, batch_size=0)
    with pytest.raises(ValueError, match="Linear or nn.Conv2d"):
        estimate_decompose_memory(nn.Sequential(nn.BatchNorm1d(4)), 2)


def test_check_memory_passes_under_the_limit():
    est = estimate_decompose_memory(_mlp(), 2)
    assert check_memory(est, limit_bytes=est["total"]) == est["total"]


def test_check_memory_raises_with_needed_available_and_advice():
    est = estimate_decompose_memory(_mlp(), 10)
    limit = est["weights"] + 3 * est["per_module"] + 1
    with pytest.raises(ModsplitMemoryError) as info:
        check_memory(est, limit_bytes=limit)
    err = info.value
    assert isinstance(err, MemoryError)
    assert err.needed == est["total"] and err.available == limit
    msg = str(err)
    assert memory.format_bytes(est["total"]) in msg and memory.format_bytes(limit) in msg
    assert "10 modules" in msg and "at most 3 modules fit" in msg
    assert re.search(r"fewer modules per rank", msg)
    assert "distributed" in msg and "classes=" in msg


def test_check_memory_tiny_limit_fits_no_module():
    est = estimate_decompose_memory(_cnn(), 2)
    with pytest.raises(ModsplitMemoryError, match="at most 0 modules fit"):
        check_memory(est, limit_bytes=16)


def test_check_memory_default_reads_meminfo(monkeypatch):
    est = estimate_decompose_memory(_mlp(), 2)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: est["total"] - 1)
    with pytest.raises(ModsplitMemoryError, match="MemAvailable"):
        check_memory(est)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    assert check_memory(est) is None  # unknown: nothing to check against


def test_meminfo_available_is_positive_on_linux():
    try:
        open("/proc/meminfo").close()
    except OSError:
        assert memory._meminfo_available() is None
    else:
        assert memory._meminfo_available() > 0


def test_check_memory_uses_cuda_free_memory(monkeypatch):
    est = dict(estimate_decompose_memory(_mlp(), 2), device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 2048))
    with pytest.raises(ModsplitMemoryError,
                       match=r"1\.00 KiB is available \(free memory of cuda:0\)"):
        check_memory(est)


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"),
                                    (3 * 2**20 // 2, "1.50 MiB"), (5 * 2**40, "5120.00 GiB")])
def test_format_bytes(n, text):
    assert memory.format_bytes(n) == text


def test_matches_what_convert_allocates():
    """scores and packed masks agree with the tensors modsplit.convert and multi_topk_mask make."""
    k = 4
    model = _cnn()
    est = estimate_decompose_memory(model, k)
    scores = convert(model, k, 0.1).score_parameters()
    assert est["scores"] == sum(s.numel() * s.element_size() for s in scores)
    packed = [ops.multi_topk_mask(s.detach(), 0.1) for s in scores]
    assert est["packed_masks"] == sum(p.numel() * p.element_size() for p in packed)
