"""ModuleBank: compose, export, save / load."""
import os
import struct

import pytest
import torch
import torch.nn as nn

import modsplit
from modsplit import BankFileError, Grafts, MaskedLinear, ModuleBank, convert, files, ops
from modsplit.export import PlainMultiConv2d, PlainMultiLinear
from modsplit.app.models import FC1, small_resnet, small_vgg


def _bank(model, k=4, density=0.2, seed=0, masks=None):
    """A 10-class bank of k modules with random (or given {name: bool [K, *weight.shape]})
    masks and the initial grafts."""
    model.eval()
    net = convert(model, k, density, shared_init=False, seed=seed)
    for name, layer in net.masked_layers().items():
        layer.freeze_masks(None if masks is None else ops.pack_mask(masks[name], 1))
    return ModuleBank(net, Grafts.init_for(range(k), 10), range(k), 10, density, 0.5, 1,
                      files.model_fingerprint(model))


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def fc():
    torch.manual_seed(0)
    return FC1(64, 10).eval()


def test_compose_votes_with_chosen_modules(fc, monkeypatch):
    bank = _bank(fc)
    x = torch.randn(7, 1, 8, 8)
    composed = bank.compose([3, 1])
    conf = composed.confidences(x)
    assert conf.shape == (7, 2)
    torch.testing.assert_close(conf, bank.confidences(x, [3, 1]).T)
    torch.testing.assert_close(conf, bank.confidences(x)[[3, 1]].T)
    expected = torch.tensor([3, 1])[conf.argmax(1)]
    assert torch.equal(composed.predict(x), expected)
    calls = []
    forward = MaskedLinear.forward
    monkeypatch.setattr(MaskedLinear, "forward", lambda self, h: calls.append(h.shape[0])
                        or forward(self, h))
    composed.predict(x)
    # one pass, only the two chosen modules; the first layer reads the input once for both
    assert calls == [7, 2 * 7]
    with pytest.raises(ValueError, match="modules for classes"):
        bank.compose([4])


def test_export_fc_same_predictions_union_weights_and_pruned_units(fc):
    bank = _bank(fc, k=4, density=0.05)
    composed = bank.compose([0, 2])
    exported = composed.export()
    x = torch.randn(64, 1, 8, 8)
    assert torch.equal(exported.predict(x), composed.predict(x))
    torch.testing.assert_close(exported.confidences(x), composed.confidences(x))
    plain = [m for m in exported.modules() if isinstance(m, PlainMultiLinear)]
    assert len(plain) == 2 and not any(isinstance(m, MaskedLinear) for m in exported.modules())
    assert all(m.__module__.startswith(("torch.nn", "modsplit.export", "modsplit.bank"))
               for m in exported.modules())
    union = composed.union_masks()["1"]
    hidden_kept = plain[0].weight.shape[0]
    assert hidden_kept < 49 and plain[1].weight.shape[1] == hidden_kept
    assert plain[0].weight.shape[1] == 64 and plain[1].weight.shape[0] == 10
    assert int((plain[0].weight != 0).sum()) <= modsplit.metrics.popcount(union)
    assert exported.num_parameters() < composed.num_parameters()


def test_export_folds_units_without_incoming_edges(fc):
    """Hidden unit 0 has no incoming edge in either module but feeds the output layer: its
    constant ReLU(bias) must move into the next layer's per-module bias."""
    with torch.no_grad():
        fc[1].bias[0] = 2.0
    m1 = torch.rand(2, 49, 64) < 0.3
    m1[:, 0] = False
    m2 = torch.rand(2, 10, 49) < 0.5
    m2[:, :, 0] = True
    m2[1, :, 0] = torch.arange(10) % 2 == 0
    bank = _bank(fc, k=2, masks={"1": m1, "3": m2})
    composed = bank.compose([0, 1])
    exported = composed.export()
    x = torch.randn(32, 1, 8, 8)
    torch.testing.assert_close(exported.confidences(x), composed.confidences(x))
    first = [m for m in exported.modules() if isinstance(m, PlainMultiLinear)][0]
    assert first.weight.shape[0] == int(m1.any(0).any(1).sum())


@pytest.mark.parametrize("make", [lambda: small_vgg(3, 10, width=4),
                                  lambda: small_resnet(3, 10, width=4)])
def test_export_conv_nets(make):
    torch.manual_seed(0)
    model = _randomize_bn(make())
    bank = _bank(model, k=3, density=0.3)
    composed = bank.compose([2, 0, 1])
    exported = composed.export()
    assert any(isinstance(m, PlainMultiConv2d) for m in exported.modules())
    x = torch.randn(6, 3, 12, 12)
    torch.testing.assert_close(exported.confidences(x), composed.confidences(x), atol=1e-5,
                               rtol=1e-4)
    assert torch.equal(exported.predict(x), composed.predict(x))
    for m in exported.modules():
        if isinstance(m, PlainMultiConv2d):
            assert torch.all(m.weight[~m.masks.any(0)] == 0)


def test_save_load_roundtrip(fc, tmp_path):
    bank = _bank(fc, k=10, density=0.1)
    bank.history = [{"epoch": 1, "ji": 0.5}]
    path = tmp_path / "bank.msb"
    bank.save(path)
    p = sum(w.numel() for w in (fc[1].weight, fc[3].weight))
    graft_bytes = (10 * 10 * 2 + 10 * 2) * 4
    assert os.path.getsize(path) <= 10 * p / 8 + 10 * 49 * 4 + graft_bytes + 4096
    loaded = ModuleBank.load(path, fc)
    assert loaded.classes == bank.classes and loaded.density == 0.1 and loaded.alpha == 0.5
    assert loaded.history == bank.history and loaded.fingerprint == bank.fingerprint
    for a, b in zip(bank.masks().values(), loaded.masks().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(loaded.grafts.weight, bank.grafts.weight)
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(loaded.compose([1, 5]).predict(x), bank.compose([1, 5]).predict(x))


def test_load_rejects_wrong_model(fc, tmp_path):
    path = tmp_path / "bank.msb"
    _bank(fc).save(path)
    other = FC1(64, 10)
    with pytest.raises(ValueError, match="different model"):
        ModuleBank.load(path, other)
    with pytest.raises(ValueError, match="different model"):
        ModuleBank.load(path, FC1(64, 10, hidden=48))


def test_load_rejects_bad_files(fc, tmp_path):
    path = tmp_path / "bank.msb"
    _bank(fc).save(path)
    data = path.read_bytes()
    before = {k: v.clone() for k, v in fc.state_dict().items()}
    cases = {"truncated": data[:-100], "empty": b"", "foreign": b"PK\x03\x04" + data[4:],
             "flipped": data[:200] + bytes([data[200] ^ 1]) + data[201:]}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.msb"
        bad.write_bytes(blob)
        with pytest.raises(BankFileError, match="not a modsplit bank|truncated or corrupt"):
            ModuleBank.load(bad, fc)
    body = bytearray(data[:-32])
    struct.pack_into("<I", body, 8, 99)
    bad = tmp_path / "version.msb"
    bad.write_bytes(bytes(body) + __import__("hashlib").sha256(bytes(body)).digest())
    with pytest.raises(BankFileError, match="version 99"):
        ModuleBank.load(bad, fc)
    assert all(torch.equal(v, before[k]) for k, v in fc.state_dict().items())


def test_file_tensors_roundtrip(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.int32).view(2, 3), "b": torch.randn(4).bfloat16(),
               "c": torch.empty(0, 3), "d": torch.tensor(True)}
    files.write_file(tmp_path / "f", {"x": [1, "y"]}, tensors)
    meta, back = files.read_file(tmp_path / "f")
    assert meta == {"x": [1, "y"]}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_fingerprint_tracks_weights_and_architecture(fc):
    a = files.model_fingerprint(fc)
    assert a == files.model_fingerprint(fc)
    with torch.no_grad():
        fc[3].bias[0] += 1e-6
    assert files.model_fingerprint(fc) != a
