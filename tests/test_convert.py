"""convert(): every module of a density-1 conversion reproduces the original network."""
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from modsplit import MaskedConv2d, MaskedLinear, MultiModuleNet, convert


class _WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (BN-ReLU-conv, dropout, 1x1 shortcut when needed)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(0.3)
        self.short = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = torch.relu(self.bn1(x))
        out = self.conv2(self.drop(torch.relu(self.bn2(self.conv1(h)))))
        return out + self.short(x)


def _wide_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _WideBlock(8, 16, 1), _WideBlock(16, 32, 2),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def _vgg():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * 4 * 4, 10))


def _fc():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 49), nn.ReLU(), nn.Linear(49, 10))


def _randomize_bn(model):
    """Non-trivial running statistics so that eval-mode BN matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("make,shape", [
    (_fc, (4, 1, 8, 8)),
    (_vgg, (4, 3, 16, 16)),
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 16, 16)),
    (_wide_resnet, (3, 3, 16, 16)),
])
def test_density_one_reproduces_every_module(make, shape):
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        net = convert(model, n_modules=2, density=1.0).eval()
        out = net(x)
    assert out.shape == (2, *expected.shape)
    for k in range(2):
        torch.testing.assert_close(out[k], expected, atol=1e-4, rtol=1e-4)


def test_layers_replaced_and_original_untouched():
    model = _vgg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = convert(model, n_modules=2, density=0.1, seed=0)
    assert isinstance(net, MultiModuleNet)
    assert list(net.masked_layers()) == ["0", "4", "10"]
    assert isinstance(net.net[0], MaskedConv2d) and isinstance(net.net[10], MaskedLinear)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model if hasattr(m, "weight")
               and not isinstance(m, nn.BatchNorm2d))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(net.score_parameters()) == 3
    assert [p for p in net.parameters() if p.requires_grad] == net.score_parameters()


def test_include_exclude_and_seed():
    model = _vgg()
    only_conv = convert(model, 2, 0.1, include=["0", "4"])
    assert list(only_conv.masked_layers()) == ["0", "4"]
    assert type(only_conv.net[10]) is nn.Linear
    no_last = convert(model, 2, 0.1, exclude=["1?"])
    assert list(no_last.masked_layers()) == ["0", "4"]
    a, b = convert(model, 2, 0.1, seed=5), convert(model, 2, 0.1, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.score_parameters(), b.score_parameters()))
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert(model, 2, 0.1, include=["nothing"])
    with pytest.raises(TypeError, match="iterable"):
        convert(model, 2, 0.1, include="0")


def test_single_layer_model_and_3d_inputs():
    net = convert(nn.Linear(6, 3), n_modules=2, density=1.0)
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(net(x)[1], x @ net.net.weight.T + net.net.bias)


def test_use_modules_selects_a_subset():
    model = _fc()
    net = convert(model, n_modules=4, density=0.2, shared_init=False, seed=1)
    x = torch.randn(5, 1, 8, 8)
    full = net(x)
    with net.use_modules([2, 0]):
        sub = net(x)
    torch.testing.assert_close(sub, full[[2, 0]])
    assert net(x).shape[0] == 4  # restored
    with pytest.raises(ValueError, match="module indices"):
        with net.use_modules([4]):
            pass


def test_scores_learn_through_skip_connections():
    net = convert(_randomize_bn(_wide_resnet()), n_modules=2, density=0.3, seed=0).eval()
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    grads = [p.grad for p in net.score_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in net.named_parameters() if not n.endswith("scores"))


class _InputSkip(nn.Module):
    """Adds its input to a masked layer's output: the input meets module activations."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(x) + x


@pytest.mark.parametrize("make,shape", [
    (_fc, (4, 1, 8, 8)),
    (_vgg, (4, 3, 16, 16)),
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 16, 16)),
    (_wide_resnet, (3, 3, 16, 16)),
])
def test_shared_input_matches_repeated_input(make, shape):
    # The first masked layer reads the batch once for all modules (one GEMM / conv over the K
    # masks); outputs and score gradients equal those of K repeated copies of the batch.
    torch.manual_seed(0)
    model = _randomize_bn(make())
    x = torch.randn(shape)
    nets = [convert(model, n_modules=3, density=0.3, shared_init=False, seed=2,
                    shared_input=shared).eval() for shared in (True, False)]
    seen = []
    for net in nets:
        first = next(iter(net.masked_layers().values()))
        handle = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        net(x).square().sum().backward()
        handle.remove()
    assert seen == [shape[0], 3 * shape[0]]  # shared: B rows, repeated: K*B rows
    with torch.no_grad():
        torch.testing.assert_close(nets[0](x), nets[1](x), atol=1e-5, rtol=1e-5)
    for a, b in zip(nets[0].score_parameters(), nets[1].score_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_shared_input_falls_back_where_the_input_meets_module_activations():
    net = convert(_InputSkip(), n_modules=2, density=0.5, shared_init=False, seed=0)
    ref = convert(_InputSkip(), n_modules=2, density=0.5, shared_init=False, seed=0,
                  shared_input=False)
    ref.net.load_state_dict(net.net.state_dict())
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match="shared by the modules"):
        out = net(x)
    assert not net.shared_input
    torch.testing.assert_close(out, ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(net(x), ref(x))  # repeats from now on, silently
