import pytest
import torch

from modsplit.baselines import PanRajanModules, decompose_pan_rajan, value_set_jaccard
from modsplit.baselines.pan_rajan import (channel, concern_identification, linear_layers,
                                          remove_irrelevant_edges, tangling_identification)
from modsplit.data import load_dataset
from modsplit.models import FC1, small_vgg
from modsplit.train import evaluate, train_classifier

# A 3 -> 2 -> 2 net for hand-checked CI / TI.
W1 = torch.tensor([[2.0, -1.0, 0.5], [1.0, 1.0, -1.0]])
B1 = torch.tensor([0.0, -1.0])
W2 = torch.tensor([[1.0, -2.0], [-1.0, 3.0]])
B2 = torch.tensor([0.5, -0.5])


def test_ci_min_max_rule_by_hand():
    # x1: z = [2, 0] -> unit 0 active (copied, first example), unit 1 inactive (z <= 0).
    # x2: z = [3, -2] -> unit 0 active: positive edges min(D, W) = W, negative edge
    #     max(-1, -1) = -1 clamped to 0; unit 1 inactive again. Output layer stays W2.
    pos = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    D, d = concern_identification([W1, W2], [B1, B2], pos, reseed_min_nonzero=1)
    assert torch.equal(D[0], torch.tensor([[2.0, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    assert torch.equal(d[0], torch.tensor([0.0, 0.0]))
    assert torch.equal(D[1], W2) and torch.equal(d[1], B2)
    # Re-seeding on every example: x2 is "first" again, so its negative edge survives.
    D, _ = concern_identification([W1, W2], [B1, B2], pos, reseed_min_nonzero=100)
    assert torch.equal(D[0], torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]]))


def test_ci_zeroes_outgoing_edges_of_inactive_units():
    # 1 -> 2 -> 2 -> 2: hidden unit 1 of layer 1 is off for x = -1 and on for x = 1.
    w = [torch.tensor([[1.0], [-1.0]]), torch.ones(2, 2), torch.ones(2, 2)]
    b = [torch.zeros(2), torch.zeros(2), torch.zeros(2)]
    D, _ = concern_identification(w, b, torch.tensor([[1.0], [1.0]]), reseed_min_nonzero=0)
    assert torch.equal(D[1], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(D[0], torch.tensor([[1.0], [0.0]]))


def test_ti_restores_rows_used_by_negatives():
    D = [torch.zeros_like(W1), W2.clone()]
    d = [torch.zeros_like(B1), B2.clone()]
    # z = [-2, 1]: unit 1 active -> its row and bias come back; output softmax [0.02, 0.98].
    tangling_identification([W1, W2], [B1, B2], D, d, torch.tensor([[0.0, 2.0, 0.0]]))
    assert torch.equal(D[0], torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]))
    assert torch.equal(d[0], torch.tensor([0.0, -1.0]))


def test_rie_and_channeling_by_hand():
    out = torch.tensor([[0.0, 1.0, 0.01],    # class c = 0: units 0 and 2 are irrelevant
                        [2.0, 3.0, 0.0],     # negative node n = 1
                        [4.0, 5.0, -6.0]])
    prev = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 5.0]])
    D, d = [prev, out], [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.3, 0.6, 0.9])]
    R = remove_irrelevant_edges(D, d, 0)
    assert R == [0, 2]
    # unit 0 -> mean(2, 4) = 3, unit 2 -> mean(-6) = -6; merged into unit 0: mean(3, -6)
    assert torch.allclose(out[:, 0], torch.tensor([0.0, -1.5, 0.0]))
    assert torch.equal(out[:, 2], torch.zeros(3))
    assert torch.equal(prev, torch.tensor([[2.0, 3.0], [2.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(d[0], torch.tensor([2.0, 2.0, 0.0]))
    channel(D, d, 0, skip=R)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 0.0], [-1.5, 4.0, 0.0],
                                             [0.0, 0.0, 0.0]]))
    assert torch.allclose(d[1], torch.tensor([0.3, 0.75, 0.0]))


def test_voting_one_several_and_no_votes():
    a0 = [[0, 2, 1], [1, 0, 2], [0, 0, 0]]
    a1 = [[0, 0, 0], [5, 0, 1], [0, 1, 2]]
    a2 = [[3, 0, 2.5], [0, 0, 0], [0, 4, 2]]
    m = PanRajanModules(["0"], [torch.tensor([a0, a1, a2])], [torch.zeros(3, 3)], [0, 1, 2],
                        "hand")
    x = torch.eye(3)
    # e0: only module 1 votes; e1: modules 0 and 2 vote, p2 > p0; e2: no votes, p2 largest.
    assert m.predict(x).tolist() == [1, 2, 2]
    assert m.predict(x[1:2], classes=[0, 1]).tolist() == [0]


@pytest.fixture(scope="module")
def digits_fc1():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = train_classifier(FC1(in_features=64), load_dataset("digits"), epochs=20, seed=0,
                             progress=False)
    yield model
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", ["ti-i", "ti-sne", "cm-rie"])
def test_fc1_digits_decomposition(digits_fc1, method):
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    before = {k: v.clone() for k, v in digits_fc1.state_dict().items()}
    mods = decompose_pan_rajan(digits_fc1, train, method, num_classes=10)
    assert all(torch.equal(v, digits_fc1.state_dict()[k]) for k, v in before.items())
    masks = mods.masks()
    assert list(masks) == ["1", "3"]
    assert masks["1"].shape == (10, 49, 64) and masks["3"].shape == (10, 10, 49)
    assert masks["1"].dtype == torch.bool
    base = evaluate(digits_fc1, test)  # measured 0.939
    acc = mods.accuracy(test)  # measured 0.939 (TI-I, TI-SNE), 0.942 (CM-RIE)
    assert acc >= base - 0.02, (acc, base)
    assert mods.module_accuracy(test).shape == (10,)
    ji = value_set_jaccard(mods)  # measured 0.78 / 0.91 / 0.42
    assert 0.0 <= ji <= 1.0
    if method == "cm-rie":  # only the positive and the negative output keep edges
        rows = masks["3"].any(2)
        assert rows.sum(1).tolist() == [2] * 10
        assert rows[0, 1] and all(rows[c, 0] and rows[c, c] for c in range(1, 10))
    else:
        assert mods.module_accuracy(test).min() > 0.95


def test_rejects_non_fc_models_and_unknown_method(digits_fc1):
    with pytest.raises(TypeError):
        linear_layers(small_vgg(1, 10))
    with pytest.raises(ValueError, match="ti-i"):
        decompose_pan_rajan(digits_fc1, load_dataset("digits", limit=50), "ci")
