"""Per-module BatchNorm (modsplit.module_norm) against nn.BatchNorm run module by module, its
plumbing through convert / decompose / checkpoints / bank files, and the magnitude score start."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import modsplit
from modsplit import checkpoint, files, ops
from modsplit.app.models import resnet20, small_vgg
from modsplit.bank import ModuleBank
from modsplit.errors import BankFileError
from modsplit.module_norm import ModuleBatchNorm
from tests.decompose_child import fc1_bn


def _random_bn(cls, c, dtype=torch.float32):
    bn = cls(c, momentum=0.3).to(dtype)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return bn


# (BatchNorm class, shape of one module's input) incl. odd channel counts and 3-d BatchNorm1d input
CASES = [(nn.BatchNorm2d, (5, 3, 7, 9)), (nn.BatchNorm2d, (2, 33, 4, 1)),
         (nn.BatchNorm1d, (6, 17)), (nn.BatchNorm1d, (3, 5, 11))]


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("active", [None, [2, 0], [1]])
def test_matches_one_batchnorm_per_module(cls, shape, dtype, active):
    """Training mode: outputs, input gradients and running statistics equal those of a copy of
    the BatchNorm run in training mode on each module's rows; eval mode: each module's own
    running statistics. Non-contiguous input included."""
    torch.manual_seed(0)
    k_all = 3
    bn = _random_bn(cls, shape[1], dtype)
    mbn = ModuleBatchNorm.from_batchnorm(bn, k_all)
    mods = list(range(k_all)) if active is None else active
    mbn.active = active
    refs = [copy.deepcopy(bn).train() for _ in range(k_all)]
    x = torch.randn(len(mods) * shape[0], *shape[1:], dtype=dtype).transpose(0, -1)
    x = x.contiguous().transpose(0, -1).requires_grad_()  # same values, non-contiguous
    assert not x.is_contiguous() or x.dim() == 2
    mbn.train()
    y = mbn(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xr = x.detach().reshape(len(mods), *shape).clone().requires_grad_()
    yr = torch.stack([refs[m](xr[i]) for i, m in enumerate(mods)])
    (yr * g.reshape(yr.shape)).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y.reshape(yr.shape), yr, **tol)
    torch.testing.assert_close(x.grad.reshape(xr.shape), xr.grad, **tol)
    for m in range(k_all):
        ref = refs[m] if m in mods else bn
        torch.testing.assert_close(mbn.running_mean[m], ref.running_mean, **tol)
        torch.testing.assert_close(mbn.running_var[m], ref.running_var, **tol)
    mbn.eval()
    with torch.no_grad():
        y = mbn(x.detach())
        yr = torch.stack([refs[m].eval()(xr[i].detach()) for i, m in enumerate(mods)])
    torch.testing.assert_close(y.reshape(yr.shape), yr, **tol)
    scale, shift = mbn.module_affine(mods)
    torch.testing.assert_close(xr.detach() * scale.reshape(len(mods), 1, -1, *[1] * (len(shape) - 2))
                               + shift.reshape(len(mods), 1, -1, *[1] * (len(shape) - 2)), yr,
                               **tol)


def test_float16_values():
    torch.manual_seed(1)
    bn = _random_bn(nn.BatchNorm2d, 6)
    mbn32 = ModuleBatchNorm.from_batchnorm(bn, 2).train()
    mbn16 = ModuleBatchNorm.from_batchnorm(copy.deepcopy(bn).half(), 2).train()
    x = torch.randn(8, 6, 5, 5)
    torch.testing.assert_close(mbn16(x.half()).float(), mbn32(x), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(mbn16.running_var.float(), mbn32.running_var, rtol=1e-2,
                               atol=1e-3)


def test_bad_inputs_are_named():
    mbn = ModuleBatchNorm.from_batchnorm(_random_bn(nn.BatchNorm2d, 4), 3)
    with pytest.raises(ValueError, match="4 features"):
        mbn(torch.randn(6, 5, 2, 2))
    with pytest.raises(ValueError, match="input of shape"):
        mbn(torch.randn(6, 4))
    with pytest.raises(ValueError, match="3 folded module copies"):
        mbn(torch.randn(7, 4, 2, 2))
    with pytest.raises(ValueError, match="track_running_stats"):
        ModuleBatchNorm.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False), 2)
    with pytest.raises(TypeError, match="BatchNorm"):
        ModuleBatchNorm.from_batchnorm(nn.LayerNorm(4), 2)
    with pytest.raises(ValueError, match="n_modules"):
        ModuleBatchNorm(4, 0)


def _vgg():
    torch.manual_seed(0)
    model = small_vgg(3, 10, width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn_(m)
    return model.eval()


def _random_bn_(bn):
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)


def test_convert_options_and_errors():
    model = _vgg()
    net = modsplit.convert(model, 3, 0.2, batchnorm="module", seed=0)
    norms = net.module_norms()
    assert list(norms) == [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name, m in norms.items():
        base = model.get_submodule(name)
        assert torch.equal(m.running_mean, base.running_mean.expand(3, -1))
        assert not m.weight.requires_grad
    assert all(p.requires_grad for p in net.score_parameters())
    assert not modsplit.convert(model, 3, 0.2).module_norms()  # "frozen" is convert's default
    with pytest.raises(ValueError, match="batchnorm"):
        modsplit.convert(model, 3, 0.2, batchnorm="per-module")
    with pytest.raises(ValueError, match="score_init"):
        modsplit.convert(model, 3, 0.2, score_init="uniform")
    for bad in ({"batchnorm": "x"}, {"score_init": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            modsplit.DecomposeConfig.build(None, 10, **bad)


def test_frozen_and_module_agree_before_any_training_step():
    """With every module's statistics still the base model's, eval-mode outputs are equal."""
    model = _vgg()
    x = torch.randn(4, 3, 32, 32)
    a = modsplit.convert(model, 3, 0.2, seed=1, batchnorm="frozen").eval()
    b = modsplit.convert(model, 3, 0.2, seed=1, batchnorm="module").eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
        with a.use_modules([2, 0]), b.use_modules([2, 0]):
            torch.testing.assert_close(b(x), a(x))


def test_batchnorm_before_the_first_masked_layer_reads_the_shared_input():
    """A BatchNorm on the raw input (before any masked layer): the shared-input pass equals the
    repeated-input one in training and eval mode, and every module gets the same statistics."""
    torch.manual_seed(2)
    model = nn.Sequential(_random_bn(nn.BatchNorm2d, 3), nn.Conv2d(3, 5, 3), nn.ReLU(),
                          _random_bn(nn.BatchNorm2d, 5), nn.Flatten(), nn.Linear(5 * 36, 4))
    x = torch.randn(6, 3, 8, 8)
    nets = [modsplit.convert(model.eval(), 3, 0.3, seed=0, batchnorm="module",
                             shared_input=s) for s in (True, False)]
    for train in (True, False):
        outs = []
        for net in nets:
            net.eval().train_module_norms(train)
            with torch.set_grad_enabled(train):
                outs.append(net(x))
        torch.testing.assert_close(outs[0], outs[1])
    first = nets[0].module_norms()["0"].running_mean
    assert torch.equal(first, first[:1].expand(3, -1))
    torch.testing.assert_close(nets[0].module_norms()["3"].running_var,
                               nets[1].module_norms()["3"].running_var)


def test_magnitude_start_keeps_the_top_weights():
    model = _vgg()
    net = modsplit.convert(model, 2, 0.1, seed=0, score_init="magnitude")
    for name, layer in net.masked_layers().items():
        w = model.get_submodule(name).weight.detach().abs().flatten()
        top = torch.zeros_like(w, dtype=torch.bool)
        n_keep = round(0.1 * w.numel())
        top[w.topk(n_keep).indices] = True
        bits = ops.unpack_mask(layer.masks(), (2, *layer.weight.shape)).reshape(2, -1)
        assert torch.equal(bits[0], bits[1])  # shared init: one start for all modules
        overlap = (bits[0] & top).sum().item() / n_keep
        assert overlap > 0.9, (name, overlap)
    kaiming = modsplit.convert(model, 2, 0.1, seed=0)
    layer = next(iter(kaiming.masked_layers().values()))
    w = layer.weight.detach().abs().flatten()
    bits = ops.unpack_mask(layer.masks(), (2, *layer.weight.shape)).reshape(2, -1)
    assert (bits[0] & (w >= w.quantile(0.9))).sum() < 0.5 * bits[0].sum()  # a random start


def _loader(ds, batch=16):
    return DataLoader(ds, batch_size=batch, shuffle=True)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    x = torch.randn(96, 3, 32, 32)
    return TensorDataset(x, torch.arange(96) % 10)


def test_decompose_learns_per_module_statistics_and_the_bank_keeps_them(images, tmp_path):
    model = _vgg()
    before = copy.deepcopy(model.state_dict())
    bank = modsplit.decompose(model, _loader(images), 10, epochs=1, progress=False,
                              score_init="magnitude", classes=[1, 4, 7])
    for k, v in model.state_dict().items():  # the base model is untouched
        assert torch.equal(v, before[k]), k
    norms = bank.net.module_norms()
    assert norms and not any(m.training for m in norms.values()) and not bank.net.training
    for name, m in norms.items():  # updated in training, each module its own
        assert m.running_mean.shape == (3, m.num_features)
        assert not torch.allclose(m.running_mean[0], model.get_submodule(name).running_mean)
    assert any(not torch.equal(m.running_mean[0], m.running_mean[1]) for m in norms.values())
    path = tmp_path / "bank.msb"
    bank.save(path)
    loaded = ModuleBank.load(path, model)
    assert bank.config["score_init"] == "magnitude" and bank.config["batchnorm"] == "module"
    assert loaded.config == bank.config  # the bank records the settings that made it
    for name, m in loaded.net.module_norms().items():
        assert torch.equal(m.running_mean, norms[name].running_mean)
        assert torch.equal(m.running_var, norms[name].running_var)
    x = images.tensors[0][:8]
    torch.testing.assert_close(loaded.confidences(x), bank.confidences(x), rtol=0, atol=0)
    comp, lcomp = bank.compose([7, 1]), loaded.compose([7, 1])
    torch.testing.assert_close(lcomp(x), comp(x), rtol=0, atol=0)
    # a composition runs its modules' own statistics: module 7 alone gives its column
    torch.testing.assert_close(bank.confidences(x, [7]), bank.confidences(x)[2:], rtol=1e-5,
                               atol=1e-6)
    meta, tensors = files.read_file(path)
    assert meta["norm_layers"] == list(norms)
    name = f"norm/{next(iter(norms))}/running_var"
    files.write_file(path, meta, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(BankFileError, match="running_var are missing"):
        ModuleBank.load(path, model)


def test_frozen_batchnorm_keeps_the_base_statistics(images):
    model = _vgg()
    bank = modsplit.decompose(model, _loader(images), 10, epochs=1, progress=False,
                              batchnorm="frozen", classes=[0, 1])
    assert not bank.net.module_norms()
    assert torch.equal(bank.net.net[1].running_mean, model[1].running_mean)


def test_resume_restores_the_statistics(tmp_path):
    """Checkpoint after epoch 1, resume for epoch 2: the bank equals a straight 2-epoch run,
    per-module statistics included; a checkpoint whose statistics are missing is refused."""
    torch.manual_seed(0)
    model = fc1_bn()
    torch.manual_seed(4)
    ds = TensorDataset(torch.rand(128, 1, 28, 28), torch.arange(128) % 10)

    def run(**kw):
        return modsplit.decompose(model, DataLoader(ds, batch_size=32, shuffle=True), 10,
                                  progress=False, **kw)

    run(epochs=1, checkpoint_dir=tmp_path)
    resumed, straight = run(epochs=2, checkpoint_dir=tmp_path), run(epochs=2)
    assert resumed.history == straight.history
    for name, m in straight.net.module_norms().items():
        assert torch.equal(resumed.net.module_norms()[name].running_var, m.running_var)
    for name, m in straight.masks().items():
        assert torch.equal(resumed.masks()[name], m)
    path = checkpoint.path_in(tmp_path)
    meta, tensors = files.read_file(path)
    assert "norm/2/running_mean" in tensors
    files.write_file(path, meta, {k: v for k, v in tensors.items() if not k.startswith("norm/")})
    with pytest.raises(modsplit.CheckpointError, match="running_mean are missing"):
        run(epochs=3, checkpoint_dir=tmp_path)
    # restore() checks the statistics before it copies anything
    from modsplit.bank import Grafts
    from modsplit.decompose import make_optimizer
    net = modsplit.convert(model, 10, 0.1, batchnorm="module", seed=9)
    grafts = Grafts.init_for(range(10), 10)
    opt = make_optimizer(net, grafts, modsplit.DecomposeConfig())
    before = [s.detach().clone() for s in net.score_parameters()]
    damaged = {k: v for k, v in tensors.items() if not k.startswith("norm/")}
    with pytest.raises(modsplit.CheckpointError, match="running_mean are missing"):
        checkpoint.restore(path, damaged, net, grafts, opt, range(10), 10, "cpu")
    assert all(torch.equal(a, s) for a, s in zip(before, net.score_parameters()))


def test_resnet_runs_with_per_module_statistics():
    """Skip connections: the per-module BatchNorms of ResNet-20 run on the folded batch and a
    composition's output equals its modules' rows of the full pass."""
    torch.manual_seed(5)
    model = resnet20(10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn_(m)
    net = modsplit.convert(model, 3, 0.2, seed=0, batchnorm="module").eval()
    for m in net.module_norms().values():
        _random_bn_(m)  # a different statistic per module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = net(x)
        with net.use_modules([2, 0]):
            sub = net(x)
    torch.testing.assert_close(sub, full[[2, 0]], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full[0], full[1])
