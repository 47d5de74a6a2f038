"""MaskedLinear / MaskedConv2d: dense equivalence at density 1, masks, caching, score gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import MaskedConv2d, MaskedLinear, ops


def _fold(x, k):
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (5, 3)])
def test_linear_density_one_is_dense(bias, lead):
    dense = nn.Linear(7, 4, bias=bias)
    layer = MaskedLinear.from_dense(dense, n_modules=3, density=1.0)
    x = torch.randn(*lead, 7)
    y = layer(_fold(x, 3)).reshape(3, *lead, 4)
    for k in range(3):
        torch.testing.assert_close(y[k], dense(x))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=(3, 1), padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
def test_conv_density_one_is_dense(kwargs):
    dense = nn.Conv2d(4, 6, **kwargs)
    layer = MaskedConv2d.from_dense(dense, n_modules=2, density=1.0)
    x = torch.randn(3, 4, 9, 8)
    y = layer(_fold(x, 2)).reshape(2, 3, *dense(x).shape[1:])
    for k in range(2):
        torch.testing.assert_close(y[k], dense(x), atol=1e-5, rtol=1e-5)


def test_depthwise_conv_density_one_is_dense():
    dense = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    layer = MaskedConv2d.from_dense(dense, n_modules=2, density=1.0)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(layer(_fold(x, 2))[:2], dense(x), atol=1e-5, rtol=1e-5)


def test_frozen_weights_and_score_shape():
    layer = MaskedConv2d(3, 5, 3, n_modules=4, density=0.2)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scores.shape == (4, 5, 3, 3, 3) and layer.scores.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scores"]
    assert set(layer.state_dict()) >= {"weight", "bias", "scores"}


def test_shared_and_independent_init():
    shared = MaskedLinear(20, 10, n_modules=3, density=0.3)
    assert torch.equal(shared.scores[0], shared.scores[2])
    own = MaskedLinear(20, 10, n_modules=3, density=0.3, shared_init=False)
    assert not torch.equal(own.scores[0], own.scores[1])
    # Kaiming normal, ReLU gain: std sqrt(2 / fan_in)
    assert abs(own.scores.std().item() - (2 / 20) ** 0.5) < 0.05
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = MaskedLinear(20, 10, n_modules=2, density=0.3, generator=g1)
    b = MaskedLinear(20, 10, n_modules=2, density=0.3, generator=g2)
    assert torch.equal(a.scores, b.scores)


def test_masks_follow_topk_and_are_cached():
    layer = MaskedLinear(40, 8, n_modules=2, density=0.25, shared_init=False)
    packed = layer.masks()
    assert packed.dtype == torch.int32 and packed.shape == (2, 8, 2)
    assert torch.equal(packed, ops.multi_topk_mask(layer.scores.detach(), 0.25))
    assert layer.masks() is packed  # unchanged scores: cached
    with torch.no_grad():
        layer.scores.mul_(-1).add_(torch.randn_like(layer.scores))
    assert layer.masks() is not packed
    assert torch.equal(layer.masks(), ops.multi_topk_mask(layer.scores.detach(), 0.25))


def test_straight_through_score_gradient():
    layer = MaskedLinear(12, 5, n_modules=3, density=0.4, shared_init=False)
    x, g = torch.randn(3 * 4, 12), torch.randn(3 * 4, 5)
    (layer(x) * g).sum().backward()
    m = ops.unpack_mask(layer.masks(), (3, 5, 12)).float()
    w_eff = (layer.weight * m).requires_grad_(True)
    y = torch.einsum("kbi,koi->kbo", x.view(3, 4, 12), w_eff) + layer.bias
    (y * g.view(3, 4, 5)).sum().backward()
    expected = w_eff.grad * layer.weight * layer.scores.detach().sign()
    torch.testing.assert_close(layer.scores.grad, expected)


def test_conv_score_gradient_matches_masked_dense():
    layer = MaskedConv2d(3, 4, 3, padding=1, n_modules=2, density=0.5, shared_init=False)
    x = torch.randn(2 * 2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2 * 2, 4, 5, 5)
    (layer(x) * g).sum().backward()
    m = ops.unpack_mask(layer.masks(), (2, 4, 3, 3, 3)).float()
    w_eff = (layer.weight * m).requires_grad_(True)
    y = torch.cat([F.conv2d(x[2 * k:2 * k + 2], w_eff[k], layer.bias, padding=1) for k in range(2)])
    (y * g).sum().backward()
    torch.testing.assert_close(layer.scores.grad, w_eff.grad * layer.weight *
                               layer.scores.detach().sign(), atol=1e-5, rtol=1e-4)


def test_active_subset_runs_only_those_modules():
    layer = MaskedLinear(16, 6, n_modules=4, density=0.3, shared_init=False)
    x = torch.randn(5, 16)
    full = layer(_fold(x, 4)).view(4, 5, 6)
    layer.active = [3, 1]
    sub = layer(_fold(x, 2)).view(2, 5, 6)
    torch.testing.assert_close(sub, full[[3, 1]])
    with pytest.raises(ValueError, match="folded module copies"):
        layer(torch.randn(5, 16))


def test_freeze_masks_keeps_outputs_and_drops_scores():
    layer = MaskedConv2d(3, 4, 3, n_modules=2, density=0.3, shared_init=False)
    x = torch.randn(4, 3, 6, 6)
    before, packed = layer(x).detach(), layer.masks().clone()
    layer.freeze_masks()
    assert layer.scores is None and torch.equal(layer.fixed_masks, packed)
    assert not any(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer(x), before)
    with pytest.raises(ValueError, match="int32"):
        layer.freeze_masks(packed[:1])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="density"):
        MaskedLinear(4, 4, n_modules=2, density=0.0)
    with pytest.raises(ValueError, match="n_modules"):
        MaskedLinear(4, 4, n_modules=0, density=0.5)
