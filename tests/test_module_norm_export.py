"""Per-module BatchNorm (modsplit.module_norm) in a composition's forms: the ExportedModel, the
CompactModel (built, saved and loaded), and its .pt2 / ONNX files (loaded in a fresh process
without modsplit) give the composed model's confidences and predictions for VGG- and ResNet-like
nets with BatchNorm2d and an MLP with BatchNorm1d between its Linear layers; per-module
BatchNorms fold into the layer before them, lose the units / channels the pruning removes, and
travel in bank files."""
import pytest
import torch
import torch.nn as nn

from modsplit import compact_layers, files, ops
from modsplit.app.models import small_resnet, small_vgg
from modsplit.bank import Grafts, ModuleBank
from modsplit.compact import CompactModel
from modsplit.convert import convert
from modsplit.export import PlainModuleBatchNorm, PlainMultiLinear
from modsplit.plain_export import export_onnx, export_pt2, plain_module
from test_plain_export import run_without_modsplit

ATOL = 1e-4


def mlp_bn(in_features=48):
    """Linear -> BatchNorm1d -> ReLU, twice, then the classifier Linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def relu_bn_net():
    """Conv -> ReLU -> BatchNorm2d (a BatchNorm that cannot fold into the conv) -> conv."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


ARCHS = {"small_vgg": lambda: small_vgg(3, 10, width=4),
         "small_resnet": lambda: small_resnet(3, 10, width=4),
         "mlp_bn": mlp_bn,
         "relu_bn": relu_bn_net}


def random_affine(model):
    """The model with random BatchNorm affine parameters and statistics, in eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.5)
            m.bias.data.normal_(0, 0.5)
    return model.eval()


def perturb_statistics(net, same=False):
    """Give every module of the MultiModuleNet's ModuleBatchNorm layers its own random running
    statistics (same=True: one random draw shared by all modules)."""
    with torch.no_grad():
        for norm in net.module_norms().values():
            rows = 1 if same else norm.n_modules
            mean = norm.running_mean[:rows] + torch.randn(rows, norm.num_features) * 0.5
            var = norm.running_var[:rows] * torch.empty(rows, norm.num_features).uniform_(0.5, 2)
            norm.running_mean.copy_(mean.expand_as(norm.running_mean))
            norm.running_var.copy_(var.expand_as(norm.running_var))


def make_bank(model, k=4, density=0.3, seed=0, masks=None, same=False):
    """A 10-class bank of k modules with per-module BatchNorms (random per-module statistics),
    random (or given {name: bool [K, *weight.shape]}) masks and random grafts; no training."""
    torch.manual_seed(seed)
    net = convert(model, k, density, shared_init=False, seed=seed, batchnorm="module")
    perturb_statistics(net, same)
    net.eval()
    for name, layer in net.masked_layers().items():
        layer.freeze_masks(None if masks is None else ops.pack_mask(masks[name], 1))
    grafts = Grafts(torch.randn(k, 10, 2), torch.randn(k, 2))
    return ModuleBank(net, grafts, list(range(k)), 10, density, 1.0, 1.0,
                      files.model_fingerprint(model))


def inputs(arch, b):
    return torch.randn(b, 3, 4, 4) if arch == "mlp_bn" else torch.randn(b, 3, 8, 8)


def bank_for(arch, **kw):
    torch.manual_seed(1)
    return make_bank(random_affine(ARCHS[arch]()), **kw)


def assert_same(want, got, x):
    """got(x) gives want(x)'s confidences and predictions (both ClassVoter-like)."""
    torch.testing.assert_close(got(x), want(x), atol=ATOL, rtol=1e-4)
    assert torch.equal(got.predict(x), want.predict(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("classes", [[2, 0], [1, 3, 0]])
def test_export_and_compact_match_composed(arch, classes, tmp_path):
    bank = bank_for(arch)
    composed = bank.compose(classes)
    exported, compact = composed.export(), composed.compact()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in exported.modules())
    assert sum(isinstance(m, PlainModuleBatchNorm) for m in exported.modules()) == len(
        bank.net.module_norms())
    compact.save(tmp_path / "c.msc")
    loaded = CompactModel.load(tmp_path / "c.msc")
    plain = plain_module(compact)
    for b in (1, 5, 32):
        x = inputs(arch, b)
        for form in (exported, compact, loaded):
            assert_same(composed, form, x)
        conf, pred = plain(x)
        torch.testing.assert_close(conf, composed(x), atol=ATOL, rtol=1e-4)
        assert torch.equal(pred, composed.predict(x))


def test_module_statistics_matter():
    """The modules' own statistics are used: the composition differs from one built with the
    first module's statistics everywhere."""
    bank = bank_for("small_vgg")
    x = inputs("small_vgg", 16)
    before = bank.compose([1, 2]).compact()(x)
    with torch.no_grad():
        for norm in bank.net.module_norms().values():
            norm.running_mean[2] = norm.running_mean[1]
            norm.running_var[2] = norm.running_var[1]
    after = bank.compose([1, 2])
    assert not torch.allclose(before, after(x), atol=1e-3)
    assert_same(after, after.compact(), x)


@pytest.mark.parametrize("arch", ["small_vgg", "small_resnet", "mlp_bn"])
def test_batchnorms_fold_into_compact_layers(arch):
    compact = bank_for(arch).compose([0, 3]).compact()
    assert not any(isinstance(m, PlainModuleBatchNorm) for m in compact.modules())


def test_unfoldable_batchnorm_runs_as_a_graph_module(tmp_path):
    bank = bank_for("relu_bn")
    composed = bank.compose([3, 1, 2])
    compact = composed.compact()
    norms = [m for m in compact.modules() if isinstance(m, PlainModuleBatchNorm)]
    assert len(norms) == 1 and norms[0].n_modules == 3
    compact.save(tmp_path / "c.msc")
    assert_same(composed, CompactModel.load(tmp_path / "c.msc"), inputs("relu_bn", 7))


@pytest.mark.parametrize("arch", ARCHS)
def test_pt2_and_onnx_files_without_modsplit(arch, tmp_path):
    import onnxruntime

    composed = bank_for(arch, k=3).compose([2, 0, 1])
    compact = composed.compact()
    x = inputs(arch, 19)
    want_conf, want = composed(x), composed.predict(x)
    torch.save({"x": x, "want": want}, tmp_path / "data.pt")
    export_pt2(compact, tmp_path / "m.pt2", x[:4])
    export_onnx(compact, tmp_path / "m.onnx", x[:4])
    conf, pred = torch.export.load(tmp_path / "m.pt2").module()(x)
    torch.testing.assert_close(conf, want_conf, atol=ATOL, rtol=1e-4)
    assert torch.equal(pred, want)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    conf, pred = session.run(["confidences", "classes"], {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(conf), want_conf, atol=ATOL, rtol=1e-4)
    assert torch.equal(torch.from_numpy(pred), want)
    for fmt in ("pt2", "onnx"):
        run_without_modsplit(fmt, tmp_path / f"m.{fmt}", tmp_path / "data.pt", tmp_path)


@pytest.mark.parametrize("arch", ["small_resnet", "mlp_bn"])
def test_bank_file_round_trip_gives_identical_compositions(arch, tmp_path):
    torch.manual_seed(1)
    model = random_affine(ARCHS[arch]())
    bank = make_bank(model)
    bank.save(tmp_path / "bank.msb")
    loaded = ModuleBank.load(tmp_path / "bank.msb", model)
    for name, norm in bank.net.module_norms().items():
        again = loaded.net.module_norms()[name]
        assert torch.equal(again.running_mean, norm.running_mean)
        assert torch.equal(again.running_var, norm.running_var)
    x = inputs(arch, 9)
    for classes in ([0, 3], [2, 1, 3]):
        a, b = bank.compose(classes), loaded.compose(classes)
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.export()(x), b.export()(x))
        assert torch.equal(a.compact()(x), b.compact()(x))


def test_hidden_units_pruned_through_module_batchnorm():
    """Hidden units of the MLP's second layer that no module's next layer reads go, with their
    per-module BatchNorm1d rows."""
    model = random_affine(mlp_bn())
    masks = {name: torch.rand(2, *m.weight.shape) < 0.5
             for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    masks["7"][:, :, 10:] = False  # units 10..15 of layer "4" feed nothing
    masks["4"][:, :2] = False  # units 0, 1 of layer "4" have no input: constant, folded
    bank = make_bank(model, k=2, masks=masks)
    composed = bank.compose([0, 1])
    exported = composed.export()
    linears = [m for m in exported.modules() if isinstance(m, PlainMultiLinear)]
    norms = [m for m in exported.modules() if isinstance(m, PlainModuleBatchNorm)]
    kept = int(masks["7"].any(0).any(0).sum()) - 2
    assert linears[1].weight.shape[0] == kept == norms[1].scale.shape[1]
    assert linears[2].weight.shape[1] == kept
    compact = composed.compact()
    shapes = [m.weight_shape for m in compact.modules()
              if isinstance(m, compact_layers.CompactLinear)]
    assert shapes[1][0] == kept
    x = inputs("mlp_bn", 12)
    assert_same(composed, exported, x)
    assert_same(composed, compact, x)


def test_hidden_units_pruned_through_frozen_batchnorm1d():
    """The same for the base model's own (frozen) BatchNorm1d."""
    model = random_affine(mlp_bn())
    masks = {name: torch.rand(2, *m.weight.shape) < 0.5
             for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    masks["7"][:, :, 10:] = False
    net = convert(model, 2, 0.5, shared_init=False, seed=0)
    for name, layer in net.masked_layers().items():
        layer.freeze_masks(ops.pack_mask(masks[name], 1))
    bank = ModuleBank(net, Grafts(torch.randn(2, 10, 2), torch.randn(2, 2)), [0, 1], 10, 0.5,
                      1.0, 1.0, files.model_fingerprint(model))
    composed = bank.compose([1, 0])
    exported = composed.export()
    norms = [m for m in exported.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms[1].num_features == norms[1].running_mean.numel() == int(
        masks["7"].any(0).any(0).sum())
    x = inputs("mlp_bn", 12)
    assert_same(composed, exported, x)
    assert_same(composed, composed.compact(), x)


def test_conv_channels_pruned_with_module_batchnorm():
    """Filters 0..3 of the first conv are dropped by every module; per module, ReLU(BN(0)) is 0
    for channels 0..2 and 1 for channel 3 in one module: channels 0..2 go, channel 3 stays."""
    model = random_affine(small_vgg(3, 10, width=8))
    bank = make_bank(model, k=2)
    with torch.no_grad():
        norm = bank.net.module_norms()["1"]
        norm.weight[:4] = 1.0
        norm.bias[:4] = -1.0
        norm.running_mean[:, :4] = 0.0
        norm.bias[3] = 1.0
        norm.running_mean[1, 3] = 10.0  # module 1 maps channel 3 to 0, module 0 does not
    first = bank.net.masked_layers()["0"]
    masks = first.fixed_masks.clone()
    masks[:, :4] = 0
    first.freeze_masks(masks)
    composed = bank.compose([0, 1])
    compact = composed.compact()
    convs = [m for m in compact.modules() if isinstance(m, compact_layers.CompactConv2d)]
    assert convs[0].weight_shape[0] == 8 - 3 and convs[1].weight_shape[1] == 8 - 3
    assert_same(composed, compact, inputs("small_vgg", 10))


def test_batchnorm_on_the_shared_input():
    """A per-module BatchNorm before any masked layer reads the input once in the composed and
    the compact model, with the first chosen module's statistics; the export (the input repeated
    for every module) agrees where the modules' statistics are the same."""
    model = random_affine(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48), nn.Linear(48, 16),
                                        nn.ReLU(), nn.Linear(16, 10)))
    x = inputs("mlp_bn", 8)
    composed = make_bank(model, k=3).compose([2, 0])
    assert_same(composed, composed.compact(), x)
    composed = make_bank(model, k=3, same=True).compose([2, 0])
    assert_same(composed, composed.export(), x)
    assert_same(composed, composed.compact(), x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_modules"):
        PlainModuleBatchNorm(8, 0)
    net = bank_for("mlp_bn", k=2).compose([0, 1]).compact().net
    linear = next(m for m in net.modules() if isinstance(m, compact_layers.CompactLinear))
    with pytest.raises(ValueError, match="scale"):
        linear.prepare(torch.ones(3, 5), torch.zeros(3, 5))
