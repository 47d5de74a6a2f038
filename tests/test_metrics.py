"""Mask and accuracy metrics, and the acceptance runs on real data (digits, MNIST, conv nets)."""
import itertools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from modsplit import Grafts, ModuleBank, convert, decompose, files, metrics, ops
from modsplit.app.data import load_dataset
from modsplit.app.models import FC1, small_resnet, small_vgg
from modsplit.app.train import evaluate, train_classifier


def _random_masks(k=3, shapes=((5, 40), (4, 3, 3, 3)), p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand(k, *s, generator=g) < p for i, s in enumerate(shapes)}


def _packed(masks):
    return {n: ops.pack_mask(m, 1) for n, m in masks.items()}


def test_popcount_union_and_intersections_match_brute_force():
    masks = _random_masks()
    packed = _packed(masks)
    assert metrics.popcount(packed["l0"]) == int(masks["l0"].sum())
    assert metrics.union_count(packed["l1"], [0, 2]) == int((masks["l1"][0] | masks["l1"][2]).sum())
    assert torch.equal(metrics.union_mask(packed["l0"]), ops.pack_mask(masks["l0"].any(0)))
    flat = torch.cat([m.flatten(1) for m in masks.values()], 1).float()
    assert torch.equal(metrics.intersections(packed), (flat @ flat.T).long())


def test_jaccard_and_pair_union_ratio():
    masks = _random_masks()
    flat = torch.cat([m.flatten(1) for m in masks.values()], 1)
    pairs = list(itertools.combinations(range(3), 2))
    ji = sum((flat[i] & flat[j]).sum() / (flat[i] | flat[j]).sum() for i, j in pairs) / 3
    assert metrics.mask_jaccard(_packed(masks)) == pytest.approx(ji.item())
    rps = sum((flat[i] | flat[j]).sum().item() for i, j in pairs) / 3 / flat.shape[1]
    assert metrics.mean_pair_union_ratio(_packed(masks), flat.shape[1]) == pytest.approx(rps)
    same = {n: m[:1].expand(2, *m.shape[1:]) for n, m in masks.items()}
    assert metrics.mask_jaccard(_packed(same)) == 1.0


def _hand_bank(masks, model):
    net = convert(model, 2, 0.5)
    for name, layer in net.masked_layers().items():
        layer.freeze_masks(ops.pack_mask(masks[name], 1))
    return ModuleBank(net, Grafts.init_for([0, 1], 3), [0, 1], 3, 0.5, 0.0, 1,
                      files.model_fingerprint(model))


def test_bank_level_ratio_and_jaccard():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    m0 = {"0": torch.zeros(2, 3, 4, dtype=torch.bool), "2": torch.zeros(2, 3, 3, dtype=torch.bool)}
    m0["0"][0, 0, :2] = True   # module 0: 2 + 1 weights
    m0["2"][0, 0, 0] = True
    m0["0"][1, 0, 1:3] = True  # module 1: 2 weights, one shared with module 0
    bank = _hand_bank(m0, model)
    assert metrics.remaining_params_ratio(bank, [0]) == pytest.approx(3 / 21)
    assert metrics.remaining_params_ratio(bank, [0, 1]) == pytest.approx(4 / 21)
    assert metrics.jaccard_index(bank) == pytest.approx(1 / 4)


def test_module_class_matrix_is_balanced_accuracy():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model[1].bias.zero_()
    full = {"1": torch.ones(2, 3, 2, dtype=torch.bool)}
    bank = _hand_bank(full, model)
    # module 0 says "class 0" iff x0 > mean(x1, 0); module 1 iff x1 > mean(x0, 0)
    x = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 4.0], [-1.0, -1.0], [-1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1, 2, 2, 0])
    ds = TensorDataset(x, y)
    mat = metrics.module_class_matrix(bank, ds)
    assert mat.shape == (2, 3)
    # module 0 votes yes on samples 0, 1: class 0 recall 2/3, others all rejected (1.0)
    assert mat[0, 0].item() == pytest.approx(0.5 * (2 / 3 + 1.0))
    assert metrics.module_accuracy(bank, ds, 0) == pytest.approx(mat[0, 0].item())
    # module 1 votes yes on samples 2, 4, 5: class 1 recall 1, negatives 3/5 rejected
    assert metrics.module_accuracy(bank, ds, 1) == pytest.approx(0.5 * (1.0 + 3 / 5))
    assert metrics.recomposed_accuracy(bank, ds, [0, 1]) == pytest.approx(3 / 4)
    scores = metrics.confidence_accuracies(bank.confidences(x), y, [0, 1])
    assert scores["module_acc"] == pytest.approx([metrics.module_accuracy(bank, ds, c)
                                                  for c in (0, 1)])
    assert scores["acc"] == pytest.approx(3 / 4)


def test_confidence_accuracies_by_hand():
    conf = torch.tensor([[0.9, 0.6, 0.2, 0.1],    # module of class 2
                         [0.3, 0.7, 0.4, 0.8]])   # module of class 0
    y = torch.tensor([2, 0, 0, 1])
    scores = metrics.confidence_accuracies(conf, y, [2, 0])
    # class 2 says yes on 0, 1: recall 1/1, rejects 2/3 of the rest;
    # class 0 says yes on 1, 3: recall 1/2 (sample 1 of 1, 2), rejects 1/2 (sample 0 of 0, 3)
    assert scores["module_acc"] == pytest.approx([0.5 * (1 + 2 / 3), 0.5 * (1 / 2 + 1 / 2)])
    # votes on the class-{2,0} samples 0..2: 2, 0, 0 -> all right
    assert scores["acc"] == 1.0
    with pytest.raises(ValueError, match="no samples"):
        metrics.confidence_accuracies(conf, torch.tensor([1, 1, 1, 1]), [2, 0])


# --- acceptance runs on real data -------------------------------------------------------------

def _loader(ds, batch=32, seed=0):
    return DataLoader(ds, batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _report(tag, base, bank, test, pairs):
    ten = metrics.recomposed_accuracy(bank, test, range(10))
    two = [metrics.recomposed_accuracy(bank, test, p) for p in pairs]
    ji, rps = metrics.jaccard_index(bank), metrics.remaining_params_ratio(bank, pairs[0])
    print(f"\n{tag}: base {base:.4f} recomposed-10 {ten:.4f} two-class {min(two):.4f}.."
          f"{max(two):.4f} JI {ji:.3f} RPs{pairs[0]} {rps:.3f}")
    return ten, two, ji


_PAIRS = [[0, 1], [3, 8], [4, 9], [5, 6]]


@pytest.mark.slow
def test_acceptance_digits_fc1():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = train_classifier(FC1(64, 10), train, epochs=20, lr=0.05, batch_size=32, seed=0,
                             progress=False)
    base = evaluate(model, test)
    stem = decompose(model, _loader(train), 10, density=0.1, alpha=0.5, epochs=10, seed=0,
                     progress=False)
    ten, two, ji = _report("digits FC1 alpha=0.5", base, stem, test, _PAIRS)
    assert ten >= base - 0.02 and min(two) > 0.9
    plain = decompose(model, _loader(train), 10, density=0.1, alpha=0.0, epochs=10, seed=0,
                      progress=False)
    _, _, ji0 = _report("digits FC1 alpha=0", base, plain, test, _PAIRS)
    assert ji > ji0 + 0.05
    mat = metrics.module_class_matrix(stem, test)
    diag = mat.diag()
    assert diag.min() > 0.85 and (mat.sum() - diag.sum()) / 90 < 0.6


@pytest.mark.slow
def test_acceptance_mnist_fc1():
    train = load_dataset("mnist", "train", limit=5000)
    test = load_dataset("mnist", "test", limit=2000)
    model = train_classifier(FC1(784, 10), train, epochs=10, lr=0.05, batch_size=32, seed=0,
                             progress=False)
    base = evaluate(model, test)
    runs = {}
    for alpha in (1.0, 0.0):
        bank = decompose(model, _loader(train), 10, density=0.1, alpha=alpha, epochs=20, seed=0,
                         progress=False)
        runs[alpha] = _report(f"MNIST[5000] FC1 alpha={alpha}", base, bank, test, _PAIRS)
    for alpha in (1.0, 0.0):  # within 1 point of the base model (seen: +0.75 / +1.1 points)
        ten, two, _ = runs[alpha]
        assert ten >= base - 0.01 and min(two) > 0.9
    assert runs[1.0][2] > runs[0.0][2] + 0.1  # stemming shares far more edges


@pytest.mark.slow
@pytest.mark.parametrize("make", [small_vgg, small_resnet], ids=["vgg_bn", "resnet"])
def test_acceptance_conv_nets_on_digits(make):
    """End to end on conv nets (BatchNorm, skip connections). Two short epochs only: masks over
    frozen BN statistics need far more epochs to approach the base model (the paper runs 100+),
    so this checks learning and recomposition above chance, not final accuracy."""
    train, test = load_dataset("digits", "train", limit=600), load_dataset("digits", "test")
    model = train_classifier(make(1, 10, width=8), train, epochs=8, lr=0.05, batch_size=32,
                             seed=0, progress=False)
    base = evaluate(model, test)
    bank = decompose(model, _loader(train), 10, density=0.5, alpha=0.5, epochs=2, lr=0.5,
                     seed=0, progress=False)
    ten, two, _ = _report(f"digits[600] {make.__name__}", base, bank, test, _PAIRS)
    assert bank.history[1]["loss"] < bank.history[0]["loss"]
    assert ten > 0.15 and sum(two) / len(two) > 0.6
    composed = bank.compose([0, 1])
    x = test.tensors[0][:64]
    assert torch.equal(composed.export().predict(x), composed.predict(x))
