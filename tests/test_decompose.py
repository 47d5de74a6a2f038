"""decompose(): module co-training (Algorithm 1), stemming loss, balance, reproducibility."""
import math
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import modsplit
from modsplit import MaskedLinear, decompose, metrics
from modsplit.app.data import load_dataset
from modsplit.decompose import _balance_weights, _stem_loss
from modsplit.app.models import FC1
from modsplit.app.train import train_classifier


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def small(digits):
    """320 training digits: enough for every class, quick to decompose."""
    return TensorDataset(*(t[:320] for t in digits[0].tensors))


@pytest.fixture(scope="module")
def fc1(digits):
    return train_classifier(FC1(64, 10), digits[0], epochs=5, lr=0.05, batch_size=32, seed=0,
                            progress=False)


def _loader(ds, seed=0, batch=32):
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_history_callbacks_and_stemming_from_epoch_two(fc1, small, capsys):
    seen = []
    bank = decompose(fc1, _loader(small), 10, alpha=2.0, epochs=2, callbacks=[seen.append],
                     progress=True)
    assert [r["epoch"] for r in seen] == [1, 2] and bank.history == seen
    assert set(seen[0]) == {"epoch", "lr", "loss", "ce", "stem", "module_acc", "ji",
                            "rps_pair", "rps_all"}
    assert seen[0]["stem"] == 0.0 and seen[0]["loss"] == pytest.approx(seen[0]["ce"])
    assert seen[1]["stem"] > 0
    assert seen[1]["loss"] == pytest.approx(seen[1]["ce"] + 2.0 * seen[1]["stem"], rel=1e-5)
    assert 0 < seen[1]["ji"] <= 1 and 0.1 <= seen[1]["rps_pair"] <= seen[1]["rps_all"] <= 1
    assert "decompose epoch 2" in capsys.readouterr().out
    decompose(fc1, _loader(small), 10, epochs=1, progress=False)
    assert "decompose" not in capsys.readouterr().out


def test_bank_contents(fc1, small):
    before = {k: v.clone() for k, v in fc1.state_dict().items()}
    bank = decompose(fc1, _loader(small), 10, density=0.2, epochs=1, progress=False)
    assert bank.classes == tuple(range(10)) and bank.density == 0.2
    masks = bank.masks()
    assert list(masks) == ["1", "3"]
    assert masks["1"].shape == (10, 49, 2) and masks["1"].dtype == torch.int32
    assert bank.grafts.weight.shape == (10, 10, 2)
    assert all(m.scores is None for m in bank.net.masked_layers().values())
    assert all(torch.equal(v, before[k]) for k, v in fc1.state_dict().items())
    assert bank.fingerprint == modsplit.files.model_fingerprint(fc1)


def test_reproducible_for_a_seed(fc1, small):
    runs = [decompose(fc1, _loader(small, seed=s), 10, epochs=2, seed=s, progress=False)
            for s in (3, 3, 4)]
    same = [torch.equal(a, b) for a, b in zip(runs[0].masks().values(), runs[1].masks().values())]
    assert all(same) and torch.equal(runs[0].grafts.weight, runs[1].grafts.weight)
    assert not torch.equal(runs[0].masks()["1"], runs[2].masks()["1"])


def test_all_modules_share_one_forward_per_batch(fc1, digits, monkeypatch):
    """Autograd's path (the network's own forward, MaskedChain off)."""
    calls = []
    forward = MaskedLinear.forward

    def counting(self, x):
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(MaskedLinear, "forward", counting)
    monkeypatch.setattr(sys.modules["modsplit.convert"].MaskedChain, "of",
                        classmethod(lambda cls, net: None))
    ds = TensorDataset(*(t[:96] for t in digits[0].tensors))
    decompose(fc1, _loader(ds), 10, epochs=1, progress=False)
    # 3 batches: the first layer reads the batch once for all 10 modules (shared input), the
    # second runs on the 10 modules' folded activations
    assert calls == [32, 10 * 32] * 3


def test_the_direct_step_shares_the_first_layers_input(fc1, digits, monkeypatch):
    """decompose's default for an FC net (modsplit.chain_step): the first layer's op reads the
    batch once for all 10 modules, the second the modules' own activations [10, 32, 49]."""
    from modsplit import chain_step
    calls = []

    class Counting:
        def __getattr__(self, name):
            op = getattr(torch.ops.modsplit, name)
            if name != "multi_masked_linear":
                return op

            def counted(x, weight, packed, bias, shared):
                calls.append((tuple(x.shape), shared))
                return op(x, weight, packed, bias, shared)
            return counted

    monkeypatch.setattr(chain_step, "_ops", Counting())
    ds = TensorDataset(*(t[:96] for t in digits[0].tensors))
    decompose(fc1, _loader(ds), 10, epochs=1, progress=False)
    assert calls == [((32, 64), True), ((10, 32, 49), False)] * 3


def test_graft_learns_at_its_own_rate(fc1, small):
    frozen = decompose(fc1, _loader(small), 10, epochs=1, graft_lr=0.0, weight_decay=0.0,
                       progress=False)
    init = modsplit.Grafts.init_for(range(10), 10)
    torch.testing.assert_close(frozen.grafts.weight, init.weight)
    moved = decompose(fc1, _loader(small), 10, epochs=1, graft_lr=0.05, progress=False)
    assert not torch.allclose(moved.grafts.weight, init.weight)


def test_balance_weights_equalise_classes():
    counts = torch.tensor([10, 30, 60])
    pos, neg = _balance_weights(counts, torch.tensor([0, 2]))
    # total weight of positives == total weight of negatives == n / 2
    torch.testing.assert_close(pos * torch.tensor([10., 60.]), torch.tensor([50., 50.]))
    torch.testing.assert_close(neg * torch.tensor([90., 40.]), torch.tensor([50., 50.]))
    with pytest.raises(ValueError, match="positive and negative"):
        _balance_weights(torch.tensor([0, 5]), torch.tensor([0]))
    plain = _balance_weights(counts, torch.tensor([0, 2]), balance=False)
    assert all(torch.equal(w, torch.ones(2)) for w in plain)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_sets_both_rates_per_epoch(fc1, small, schedule, monkeypatch):
    used = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        used.append(tuple(g["lr"] for g in self.param_groups))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    bank = decompose(fc1, _loader(small), 10, epochs=4, lr=0.2, graft_lr=0.02,
                     lr_schedule=schedule, progress=False)
    scale = ([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
             if schedule == "cosine" else [1.0] * 4)
    per_epoch = len(used) // 4
    for e in range(4):
        for lr_s, lr_g in used[e * per_epoch:(e + 1) * per_epoch]:
            assert lr_s == pytest.approx(0.2 * scale[e]) and lr_g == pytest.approx(0.02 * scale[e])
    assert [r["lr"] for r in bank.history] == pytest.approx([0.2 * s for s in scale])
    with pytest.raises(ValueError, match="lr_schedule"):
        decompose(fc1, _loader(small), 10, epochs=1, lr_schedule="step", progress=False)


def test_balanced_loss_finds_rare_class():
    """A 1:19 imbalanced problem: the module of the rare class still detects it."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, 8, generator=g) * 3
    y = torch.cat([torch.zeros(20, dtype=torch.long), torch.randint(1, 20, (380,), generator=g)])
    x = centers[y] + 0.3 * torch.randn(400, 8, generator=g)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 20))
    train_classifier(model, TensorDataset(x, y), epochs=12, lr=0.1, batch_size=32, progress=False)
    bank = decompose(model, _loader(TensorDataset(x, y)), 20, density=0.5, epochs=3,
                     classes=[0], progress=False)
    said = bank.confidences(x)[0] > 0.5
    assert said[y == 0].float().mean() > 0.9 and (~said[y != 0]).float().mean() > 0.9


def test_eval_set_scores_every_epoch_like_the_bank_metrics(fc1, small, digits):
    test = digits[1]
    bank = decompose(fc1, _loader(small), 10, epochs=2, eval_set=test, progress=False)
    assert all(len(r["eval_module_acc"]) == 10 for r in bank.history)
    last = bank.history[-1]  # the live scores' masks of the last epoch == the bank's masks
    assert last["eval_module_acc"] == pytest.approx(
        [metrics.module_accuracy(bank, test, c) for c in range(10)])
    assert last["eval_acc"] == pytest.approx(metrics.recomposed_accuracy(bank, test, range(10)))
    sub = decompose(fc1, _loader(small), 10, epochs=1, classes=[3, 7], eval_set=test,
                    progress=False)
    assert sub.history[0]["eval_acc"] == pytest.approx(
        metrics.recomposed_accuracy(sub, test, [3, 7]))


def test_stem_loss_is_eq1():
    s = [torch.randn(3, 4, 5), torch.randn(3, 6)]
    a = [torch.randn(4, 5), torch.randn(6)]
    per_module = 4 * 5 + 6
    for p in (1, 2):
        expected = torch.stack([((s[0][k] - a[0]).abs() ** p).sum() + ((s[1][k] - a[1]).abs() ** p)
                                .sum() for k in range(3)]) / per_module
        torch.testing.assert_close(_stem_loss(s, a, p, per_module), expected)


def test_batchnorm_model_is_untouched_and_in_eval(digits):
    """batchnorm="frozen": the copy's BatchNorms keep the base statistics (the default,
    per-module statistics, is tested in test_module_norm.py)."""
    model = modsplit.app.models.small_vgg(1, 10, width=4).eval()
    bn_before = model[1].running_mean.clone()
    ds = TensorDataset(*(t[:64] for t in digits[0].tensors))
    bank = decompose(model, _loader(ds), 10, epochs=1, progress=False, batchnorm="frozen")
    assert torch.equal(model[1].running_mean, bn_before)
    assert not bank.net.training
    assert torch.equal(bank.net.net[1].running_mean, bn_before)


def test_class_subset_and_argument_errors(fc1, small):
    bank = decompose(fc1, _loader(small), 10, epochs=1, classes=[3, 5], progress=False)
    assert bank.classes == (3, 5) and bank.masks()["1"].shape[0] == 2
    with pytest.raises(ValueError, match="distinct"):
        decompose(fc1, _loader(small), 10, classes=[3, 3])
    with pytest.raises(ValueError, match="distinct"):
        decompose(fc1, _loader(small), 10, classes=[10])
    with pytest.raises(ValueError, match="epochs"):
        decompose(fc1, _loader(small), 10, epochs=0)
