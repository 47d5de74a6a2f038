"""The library's public surface: errors, low-precision models end to end, .to() on banks and
compositions, DecomposeConfig and resume keys, torch.compile of a converted torchvision model."""
import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import modsplit
from modsplit import DecomposeConfig, decompose, files
from modsplit.app.models import FC1


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    x[torch.arange(n), 0, y % 8, y // 8 + 2] += 2.0  # a learnable signal per class
    return TensorDataset(x, y)


def _trained_fc1(dtype=torch.float32):
    torch.manual_seed(0)
    model = FC1(64, 10)
    data = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        for x, y in DataLoader(data, batch_size=64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.to(dtype).eval()


def test_public_names_are_the_users():
    assert set(modsplit.__all__) == {
        "__version__", "MaskedLinear", "MaskedConv2d", "MultiModuleNet", "convert", "decompose",
        "DecomposeConfig", "Grafts", "ModuleBank", "ComposedModel", "CompactModel", "metrics",
        "ops", "TensorBatches",
        "get_backend", "set_backend", "ModsplitError", "BankFileError", "CheckpointError",
        "ModsplitMemoryError", "BackendError"}
    assert all(hasattr(modsplit, n) for n in modsplit.__all__)
    assert modsplit.__version__.count(".") == 2


def test_every_error_is_a_modsplit_error():
    for cls in (modsplit.BankFileError, modsplit.CheckpointError, modsplit.ModsplitMemoryError,
                modsplit.BackendError):
        assert issubclass(cls, modsplit.ModsplitError)
    assert issubclass(modsplit.BankFileError, ValueError)  # what callers caught before
    assert issubclass(modsplit.ModsplitMemoryError, MemoryError)
    with pytest.raises(modsplit.ModsplitError, match="not a modsplit file|magic"):
        files.read_file(__file__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_decomposes_composes_and_exports(dtype, tmp_path):
    model = _trained_fc1(dtype)
    data = _data()
    x, y = data.tensors
    x = x.to(dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    bank = decompose(model, loader, 10, density=0.3, epochs=2, progress=False)
    assert bank.grafts.weight.dtype == dtype
    assert all(s.dtype == dtype for s in bank.net.parameters() if s.is_floating_point())
    pair = bank.compose([3, 7])
    conf = pair(x[:50])
    assert conf.dtype == dtype and conf.shape == (50, 2) and torch.isfinite(conf).all()
    picked = (y == 3) | (y == 7)
    accuracy = (pair.predict(x[picked]) == y[picked]).float().mean().item()
    assert accuracy > 0.7  # a real 2-class classifier, not noise
    plain = pair.export()
    assert torch.equal(plain.predict(x[:50]), pair.predict(x[:50]))
    compact = pair.compact()  # the torch backend's sparse twins in this dtype
    compact.save(tmp_path / "c.msc")
    same = modsplit.CompactModel.load(tmp_path / "c.msc")
    assert same(x[:50]).dtype == dtype
    # another summation order in 8 (bf16) / 11 (fp16) mantissa bits: near-ties may flip
    assert (same.predict(x[:50]) == pair.predict(x[:50])).float().mean() >= 0.9
    bank.save(tmp_path / "b.msb")
    again = modsplit.ModuleBank.load(tmp_path / "b.msb", model)
    assert again.grafts.weight.dtype == dtype
    assert torch.equal(again.compose([3, 7]).predict(x[:50]), pair.predict(x[:50]))


def test_to_moves_bank_and_compositions_together():
    model = _trained_fc1()
    bank = decompose(model, DataLoader(_data(), batch_size=32), 10, density=0.3, epochs=1,
                     progress=False)
    pair = bank.compose([3, 7])
    x = _data().tensors[0][:20]
    before = pair.predict(x)
    assert isinstance(bank, torch.nn.Module)
    pair.to(torch.float64)  # moving the composition moves the bank it shares
    assert bank.grafts.weight.dtype == torch.float64
    assert next(bank.net.parameters()).dtype == torch.float64
    assert pair(x.double()).dtype == torch.float64
    bank.to(torch.float32)  # and the other way round
    assert pair.grafts.weight.dtype == torch.float32
    assert torch.equal(pair.predict(x), before)
    # masks are integer buffers: a dtype move leaves them as they are
    assert all(m.masks().dtype == torch.int32 for m in bank.net.masked_layers().values())


def test_decompose_config_is_the_resume_key():
    cfg = DecomposeConfig(density=0.2, alpha=2.0)
    built = DecomposeConfig.build(cfg, 10, epochs=3)
    assert built.classes == tuple(range(10)) and built.epochs == 3 and built.density == 0.2
    key = built.resume_key(10)
    # every field takes part in the resume check, except the ones marked resume=False
    fields = {f.name for f in dataclasses.fields(DecomposeConfig)}
    assert set(key) == (fields - {"epochs"}) | {"num_classes"}
    with pytest.raises(TypeError, match="unknown settings \\['densty'\\]"):
        DecomposeConfig.build(None, 10, densty=0.2)
    with pytest.raises(ValueError, match="density"):
        DecomposeConfig.build(None, 10, density=0)
    with pytest.raises(TypeError, match="DecomposeConfig"):
        DecomposeConfig.build({"density": 0.1}, 10)


def test_decompose_takes_a_config_or_keywords_alike():
    model = _trained_fc1()
    loader = DataLoader(_data(), batch_size=32, shuffle=True)
    a = decompose(model, loader, 10, DecomposeConfig(density=0.3, epochs=1), progress=False)
    b = decompose(model, loader, 10, density=0.3, epochs=1, progress=False)
    for name, m in a.masks().items():
        assert torch.equal(m, b.masks()[name])
    assert torch.equal(a.grafts.weight, b.grafts.weight)


def test_torch_compile_of_a_converted_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    net = modsplit.convert(model, 2, 0.3, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)

    def step(x):
        return net(x).square().mean()

    eager = step(x)
    eager.backward()
    grads = [p.grad.clone() for p in net.score_parameters()]
    for p in net.score_parameters():
        p.grad = None
    compiled = torch.compile(step)(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, net.score_parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
