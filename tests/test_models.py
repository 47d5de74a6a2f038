import pytest
import torch
from torch import nn

from modsplit.app.models import FC1, FC2, FC3, FC4, MODELS, fc, get_model


@pytest.mark.parametrize("factory,n", [(FC1, 1), (FC2, 2), (FC3, 3), (FC4, 4)])
def test_fc_layout(factory, n):
    m = factory()
    linears = [name for name, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert linears == [str(2 * i + 1) for i in range(n + 1)]
    assert m[1].weight.shape == (49, 784) and m[-1].weight.shape == (10, 49)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(mod, nn.ReLU) for mod in m) == n


def test_fc_custom_sizes():
    m = fc(2, in_features=64, hidden=20, num_classes=5)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("name,kw,shape", [
    ("small_vgg", dict(in_channels=1, num_classes=10), (1, 8, 8)),
    ("small_vgg", dict(in_channels=3, num_classes=7, width=8), (3, 32, 32)),
    ("small_resnet", dict(in_channels=1, num_classes=10), (1, 28, 28)),
    ("small_resnet", dict(in_channels=3, num_classes=4, width=8), (3, 32, 32)),
    ("vgg16", dict(num_classes=10), (3, 32, 32)),
    ("wide_resnet", dict(depth=10, widen_factor=2, num_classes=100), (3, 32, 32)),
])
def test_conv_output_shapes(name, kw, shape):
    m = get_model(name, **kw).eval()
    assert m(torch.rand(2, *shape)).shape == (2, kw["num_classes"])


def test_resnet50_cifar_stem():
    m = get_model("resnet50", num_classes=10).eval()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_wrn28_10_size():
    m = get_model("wide_resnet28_10", num_classes=100)
    n_params = sum(p.numel() for p in m.parameters())
    assert 36.4e6 < n_params < 36.6e6  # WRN-28-10 on CIFAR-100: 36.5M
    assert len(m.blocks) == 12 and m.fc.in_features == 640


def test_small_resnet_has_skips():
    m = get_model("small_resnet", in_channels=1, num_classes=10)
    assert sum(type(mod).__name__ == "BasicBlock" for mod in m.modules()) == 3


def test_registry():
    assert {"fc1", "fc4", "vgg16", "resnet50", "wide_resnet28_10"} <= set(MODELS)
    assert isinstance(get_model("FC2")[3], nn.Linear)
    with pytest.raises(ValueError, match="fc1"):
        get_model("alexnet")


def test_resnet20_is_he_et_al_cifar_resnet():
    m = get_model("resnet20", num_classes=10).eval()
    n_params = sum(p.numel() for p in m.parameters())
    assert 0.26e6 < n_params < 0.28e6  # He et al. (2016), Table 6: 0.27M
    blocks = [mod for mod in m.modules() if type(mod).__name__ == "BasicBlock"]
    assert len(blocks) == 9 and [b.conv1.out_channels for b in blocks[::3]] == [16, 32, 64]
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_quarter_width_and_decomposable():
    """1/4 width: 16..128 channels and a 128-unit classifier; its ReLUs are not in place after
    Linear layers, so the masked twin (whose layers return views) trains."""
    from modsplit.convert import convert

    m = get_model("vgg16_quarter", num_classes=10).eval()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13 and [c.out_channels for c in convs[::3]] == [16, 32, 64, 128, 128]
    assert m[-1].in_features == 128 and m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    net = convert(m, 2, 0.1)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(s.grad is not None for s in net.score_parameters())
