"""CompactModel (modsplit.compact): same predictions as bank.compose() for fully connected, VGG-
and ResNet-like nets, on the sparse and the dense paths; its file (round trip, size bound, damaged
and foreign files); hidden-unit and conv-channel pruning; what a compact graph refuses."""
import os

import pytest
import torch
import torch.nn as nn

from modsplit import compact_layers, files, metrics
from modsplit.app.models import get_model
from modsplit.bank import Grafts, ModuleBank
from modsplit.compact import CompactModel
from modsplit.compact_graph import CompactFormatError
from modsplit.convert import convert
from modsplit.errors import BankFileError

ARCHS = {"fc2": dict(in_features=64, num_classes=10),
         "small_vgg": dict(in_channels=1, num_classes=10, width=8),
         "small_resnet": dict(in_channels=1, num_classes=10, width=8)}


def random_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def make_bank(model, k=4, density=0.1, seed=0):
    """A bank of k modules with random top-k masks and random grafts (no training)."""
    torch.manual_seed(seed)
    net = convert(model, k, density, shared_init=False, seed=seed)
    for m in net.masked_layers().values():
        m.freeze_masks()
    grafts = Grafts(torch.randn(k, 10, 2), torch.randn(k, 2))
    return ModuleBank(net, grafts, list(range(k)), 10, density, 1.0, 1.0,
                      files.model_fingerprint(model))


def assert_same(composed, compact, x):
    assert torch.equal(composed.predict(x), compact.predict(x))
    torch.testing.assert_close(compact(x), composed(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("classes", [[1, 3], [0, 2, 3]])
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_predictions_match_composed(arch, classes, density):
    bank = make_bank(random_bn(get_model(arch, **ARCHS[arch])), density=density)
    composed = bank.compose(classes)
    compact = composed.compact()
    for b in (1, 7, 64):
        assert_same(composed, compact, torch.randn(b, 1, 8, 8))


def test_residual_adds_run_in_place():
    """small_resnet's residual add + ReLU after a block's last conv become add_into calls (on
    both the sparse and the dense path) and the predictions stay the composed model's."""
    from modsplit.compact_passes import add_into
    composed = make_bank(random_bn(get_model("small_resnet", **ARCHS["small_resnet"]))).compose(
        [0, 3])
    compact = composed.compact()
    fused = [n for n in compact.net.graph.nodes if n.target is add_into]
    assert fused and all(n.args[2] for n in fused)  # each with its ReLU
    assert not any(n.target in ("relu", torch.relu) for n in compact.net.graph.nodes)
    assert_same(composed, compact, torch.randn(5, 1, 8, 8))
    a, b = torch.randn(2, 3), torch.randn(3)
    want = (a + b).relu()
    out = add_into(a, b, True)
    assert out.data_ptr() == a.data_ptr() and torch.equal(out, want)
    small, big = torch.randn(3), torch.randn(2, 3)
    out = add_into(small, big, False)  # the sum has b's shape: a new tensor, a unchanged
    assert out.shape == (2, 3) and torch.equal(out, small + big)


def test_max_pool_2x2_is_max_pool2d():
    from modsplit.compact_passes import max_pool_2x2
    for shape in [(2, 3, 8, 8), (1, 2, 5, 7), (3, 1, 2, 3), (1, 1, 3, 4)]:
        x = torch.randn(*shape)
        x[0, 0, 0, 0] = float("nan")
        want = nn.functional.max_pool2d(x, 2)
        torch.testing.assert_close(max_pool_2x2(x), want, equal_nan=True, rtol=0, atol=0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)[:, ::2]  # non-contiguous, float64
    assert torch.equal(max_pool_2x2(x), nn.functional.max_pool2d(x, 2))
    composed = make_bank(random_bn(get_model("small_vgg", **ARCHS["small_vgg"]))).compose([1, 2])
    compact = composed.compact()
    assert any(n.target is max_pool_2x2 for n in compact.net.graph.nodes)
    assert_same(composed, compact, torch.randn(6, 1, 8, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_and_sparse_paths_agree(arch, monkeypatch):
    bank = make_bank(random_bn(get_model(arch, **ARCHS[arch])), density=0.2)
    composed = bank.compose([2, 1])
    x = torch.randn(9, 1, 8, 8)
    monkeypatch.setattr(compact_layers, "DENSE_MIN_WEIGHTS", 0)
    for threshold in (0.0, 1.0):  # everything dense / everything sparse
        monkeypatch.setattr(compact_layers, "DENSE_ABOVE", {"linear": threshold,
                                                            "conv": threshold})
        compact = composed.compact()
        paths = {m.dense is None for m in compact.net.modules()
                 if isinstance(m, compact_layers._CompactLayer)}
        assert paths == {threshold == 1.0}
        assert_same(composed, compact, x)


def test_float64_and_to():
    bank = make_bank(random_bn(get_model("small_vgg", **ARCHS["small_vgg"])))
    composed = bank.compose([0, 3])
    compact = composed.compact().to(torch.float64)
    bank.to(torch.float64)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    assert compact(x).dtype == torch.float64
    assert_same(composed, compact, x)


@pytest.mark.parametrize("arch", ARCHS)
def test_file_round_trip_and_size(arch, tmp_path):
    bank = make_bank(random_bn(get_model(arch, **ARCHS[arch])), k=3, density=0.1)
    classes = [0, 2]
    compact = bank.compose(classes).compact()
    path = str(tmp_path / "c.msc")
    compact.save(path)
    again = CompactModel.load(path)
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(again.predict(x), compact.predict(x))
    # payload of the masked layers within (RPs + (K+1)/32) * P * 4 bytes plus their biases
    _, tensors = files.read_file(path)
    layer_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items()
                      if n.rsplit("/", 1)[-1] in ("values", "union_mask", "module_masks"))
    p = sum(torch.Size(s).numel() for s in bank.weight_shapes().values())
    rps = metrics.remaining_params_ratio(bank, classes)
    words = sum(-(-torch.Size(s[1:]).numel() // 32) * s[0] for s in bank.weight_shapes().values())
    assert layer_bytes <= (rps + (len(classes) + 1) / 32) * p * 4 + 4 * (words + 2 * 32 * 8)


def test_damaged_and_foreign_files(tmp_path):
    bank = make_bank(get_model("fc2", **ARCHS["fc2"]))
    compact = bank.compose([0, 1]).compact()
    path = str(tmp_path / "c.msc")
    compact.save(path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(BankFileError, match="checksum"):
        CompactModel.load(path)
    bank_path = str(tmp_path / "bank.msb")
    bank.save(bank_path)
    with pytest.raises(BankFileError, match="CompactModel"):
        CompactModel.load(bank_path)
    meta, tensors = files.read_file(os.fspath(bank_path))
    files.write_file(path, {"kind": "modsplit.CompactModel", "compact_version": 99}, tensors)
    with pytest.raises(BankFileError, match="version 99"):
        CompactModel.load(path)
    files.write_file(path, {"kind": "modsplit.CompactModel", "compact_version": 1,
                            "classes": [0, 1], "graph": {"nodes": [{"op": "call_function",
                                                                    "target": "os.system"}],
                                                         "modules": {}}}, tensors)
    with pytest.raises(BankFileError, match="malformed"):
        CompactModel.load(path)


def _fc_bank_with_unused_units():
    model = get_model("fc2", **ARCHS["fc2"])
    bank = make_bank(model, k=2, density=0.3)
    layers = list(bank.net.masked_layers().values())
    masks = [m.fixed_masks.clone() for m in layers]
    masks[1][:, :, :] = 0  # hidden units of layer 2 ...
    masks[1][:, :5, :] = -1  # ... only the first 5 have inputs
    layers[1].freeze_masks(masks[1])
    return bank


def test_hidden_units_removed():
    bank = _fc_bank_with_unused_units()
    composed = bank.compose([0, 1])
    compact = composed.compact()
    shapes = [m.weight_shape for m in compact.net.modules()
              if isinstance(m, compact_layers.CompactLinear)]
    assert shapes[1][0] == 5
    assert_same(composed, compact, torch.randn(10, 1, 8, 8))


def test_conv_channels_removed_with_batchnorm():
    model = random_bn(get_model("small_vgg", **ARCHS["small_vgg"]))
    bn = model[1]
    bn.bias.data[:3] = -5.0  # channels 0..2: a dropped filter gives ReLU(BN(0)) = 0
    bn.bias.data[3] = 1.0  # channel 3: ReLU(BN(0)) = 1
    bn.running_mean.zero_()
    bank = make_bank(model, k=2, density=0.3)
    first = bank.net.masked_layers()["0"]
    masks = first.fixed_masks.clone()
    masks[:, :4] = 0  # every module drops filters 0..3 (channel 3 stays: its constant is not 0)
    first.freeze_masks(masks)
    composed = bank.compose([0, 1])
    compact = composed.compact()
    convs = [m for m in compact.net.modules() if isinstance(m, compact_layers.CompactConv2d)]
    assert convs[0].weight_shape[0] == 8 - 3 and convs[1].weight_shape[1] == 8 - 3
    assert_same(composed, compact, torch.randn(10, 1, 8, 8))


class _Sine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return torch.sin(self.fc(x))


def test_unsupported_function_is_named():
    model = _Sine().eval()
    bank = make_bank(model, k=2, density=0.5)
    with pytest.raises(CompactFormatError, match="sin"):
        bank.compose([0, 1]).compact()
