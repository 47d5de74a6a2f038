"""Classifier architectures used in the paper, plus small ones for CPU tests.

All models map float32 images [B, C, H, W] to float32 logits [B, num_classes].

- ``fc`` / ``FC1``..``FC4``: Pan & Rajan (2020)'s fully connected nets, 49 ReLU units per hidden
  layer. An ``nn.Sequential`` of Flatten, [Linear, ReLU] x n, Linear, so the Linear layers are
  named "1", "3", ..., "2n+1".
- ``mnist2_fc``: an FC net for two-digit MNIST (28x56 inputs, 100 classes).
- ``vgg16``: VGG16 with BatchNorm and a dropout classifier, for 32x32 inputs (CIFAR-10);
  ``width`` scales every channel count (``vgg16(width=0.25)``: 16..128 channels, the CPU-scale
  model of the CIFAR-10 Figure 4 runs).
- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016, section 4.2): 3x3 stem of 16 channels,
  three stages of 3 BasicBlocks (16, 32, 64 channels), global average pool, Linear; 0.27M
  parameters.
- ``resnet50``: torchvision's ResNet50 with a 3x3 stride-1 stem and no max-pool (32x32, SVHN).
- ``wide_resnet28_10``: WRN-28-10 (Zagoruyko & Komodakis 2016), pre-activation (CIFAR-100).
- ``small_vgg``, ``small_resnet``: few-channel conv nets (BatchNorm, dropout / skip connections)
  that run fast on a CPU; any input size of at least 4x4.
"""
import torch
from torch import nn


def fc(hidden_layers, in_features=784, hidden=49, num_classes=10):
    """Flatten -> [Linear(., hidden) -> ReLU] x hidden_layers -> Linear(hidden, num_classes)."""
    layers = [nn.Flatten()]
    width = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def FC1(in_features=784, num_classes=10, hidden=49):
    """One hidden layer of 49 units (Pan & Rajan 2020)."""
    return fc(1, in_features, hidden, num_classes)


def FC2(in_features=784, num_classes=10, hidden=49):
    """Two hidden layers of 49 units."""
    return fc(2, in_features, hidden, num_classes)


def FC3(in_features=784, num_classes=10, hidden=49):
    """Three hidden layers of 49 units."""
    return fc(3, in_features, hidden, num_classes)


def FC4(in_features=784, num_classes=10, hidden=49):
    """Four hidden layers of 49 units."""
    return fc(4, in_features, hidden, num_classes)


def mnist2_fc(hidden_layers=1, hidden=128, num_classes=100):
    """FC net for two-digit MNIST (data.two_digit_mnist, [B, 1, 28, 56], 100 classes): Flatten
    -> [Linear(., hidden) -> ReLU] x hidden_layers -> Linear(hidden, 100)."""
    return fc(hidden_layers, 28 * 56, hidden, num_classes)


def _conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")


def vgg16(num_classes=10, batch_norm=True, in_channels=3, dropout=0.5, width=1.0):
    """VGG16 for 32x32 inputs: 13 3x3 convs (+BatchNorm), 5 max-pools down to 1x1xC, then
    Dropout -> Linear(C, C) -> ReLU -> Dropout -> Linear(C, C) -> ReLU -> Linear(C, num_classes),
    with C = 512 * width and every conv's channels scaled by ``width`` (1: the standard net)."""
    layers, cin = [], in_channels
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            v = max(1, round(v * width))
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(v)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            cin = v
    return nn.Sequential(
        nn.Sequential(*layers), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(cin, cin), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(cin, cin), nn.ReLU(),
        nn.Linear(cin, num_classes))


def vgg16_quarter(num_classes=10):
    """VGG16-BN at 1/4 width (16, 32, 64, 128, 128 channels; 0.94M parameters)."""
    return vgg16(num_classes, width=0.25)


def small_vgg(in_channels, num_classes, width=16, dropout=0.25):
    """Two VGG stages ([conv3x3-BN-ReLU] x2, max-pool) of ``width`` and ``2*width`` channels,
    global average pool, Dropout, Linear(2*width, num_classes)."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
        *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(2 * width, num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the input (through a
    1x1 conv + BN when the shape changes), then ReLU. [B, cin, H, W] -> [B, cout, H/s, W/s]."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def small_resnet(in_channels, num_classes, width=16):
    """Stem conv3x3-BN-ReLU (``width``), BasicBlocks width -> width -> 2*width (stride 2) ->
    4*width (stride 2), global average pool, Linear(4*width, num_classes)."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width),
        BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def resnet20(num_classes=10, in_channels=3):
    """CIFAR ResNet-20 (He et al. 2016, 6n+2 layers with n = 3): conv3x3(16)-BN-ReLU, three
    stages of 3 BasicBlocks of 16, 32, 64 channels (stride 1, 2, 2; projection shortcuts, i.e.
    option B, where the shape changes), global average pool, Linear(64, num_classes).
    [B, 3, 32, 32] -> [B, num_classes]."""
    blocks, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    return nn.Sequential(*_conv_bn_relu(in_channels, 16), *blocks, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, num_classes))


def resnet50(num_classes=10):
    """torchvision ResNet50 (random init) adapted to 32x32: conv1 is 3x3 stride 1, no max-pool."""
    from torchvision.models import resnet50 as tv_resnet50

    model = tv_resnet50(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class WideBasic(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3(stride)-BN-ReLU-Dropout-conv3x3, plus the
    input (through a 1x1 conv when the shape changes). [B, cin, H, W] -> [B, cout, H/s, W/s]."""

    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv3x3(16), three groups of (depth-4)/6 WideBasic blocks of 16k, 32k, 64k
    channels (strides 1, 2, 2), BN-ReLU, global average pool, Linear(64k, num_classes)."""

    def __init__(self, depth=28, widen_factor=10, num_classes=100, dropout=0.3, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(WideBasic(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                        stride if i == 0 else 1, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def wide_resnet28_10(num_classes=100, dropout=0.3):
    """WRN-28-10 (36.5M parameters) with dropout 0.3 between the convs of each block."""
    return WideResNet(28, 10, num_classes, dropout)


_REGISTRY = {"fc": fc, "fc1": FC1, "fc2": FC2, "fc3": FC3, "fc4": FC4, "mnist2_fc": mnist2_fc,
             "vgg16": vgg16, "vgg16_quarter": vgg16_quarter, "resnet20": resnet20,
             "small_vgg": small_vgg, "small_resnet": small_resnet, "resnet50": resnet50,
             "wide_resnet": WideResNet, "wide_resnet28_10": wide_resnet28_10}

MODELS = tuple(_REGISTRY)


def factory(name):
    """The factory function of built-in model ``name`` (case-insensitive, one of ``MODELS``)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return _REGISTRY[key]


def get_model(name, **kw):
    """Build model ``name`` (case-insensitive, one of ``MODELS``) with keyword arguments ``kw``."""
    return factory(name)(**kw)
