import pytest
import torch

from modsplit.app.baselines import PanRajanModules, decompose_pan_rajan, value_set_jaccard
from modsplit.app.baselines.pan_rajan import (channel, concern_identification, linear_layers,
                                          pre_activations, remove_irrelevant_edges,
                                          tangling_identification)
from modsplit.app.data import load_dataset
from modsplit.app.models import FC1, small_vgg
from modsplit.app.train import evaluate, train_classifier

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
    # With ReLU between layers (in the ReLU-free pass z2 = 1 - 1 = 0 and nothing is active).
    D, _ = concern_identification(w, b, torch.tensor([[1.0], [1.0]]), reseed_min_nonzero=0,
                                  pre_relu_feed=False)
    assert torch.equal(D[1], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(D[0], torch.tensor([[1.0], [0.0]]))


def test_pre_activations_match_the_model_and_the_relu_free_net():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3),
                                torch.nn.ReLU(), torch.nn.Linear(3, 2))
    linear_free = torch.nn.Sequential(*[m for m in model if isinstance(m, torch.nn.Linear)])
    ws = [m.weight.detach() for m in linear_free]
    bs = [m.bias.detach() for m in linear_free]
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert torch.allclose(pre_activations(ws, bs, x)[1], model[:3](x))
        assert torch.allclose(pre_activations(ws, bs, x)[2], model(x))
        assert torch.allclose(pre_activations(ws, bs, x, pre_relu_feed=True)[1],
                              linear_free[:2](x))
        assert torch.allclose(pre_activations(ws, bs, x, pre_relu_feed=True)[2], linear_free(x))


def test_ci_pre_relu_feed_decides_deeper_activity():
    # 1 -> 1 -> 1 -> 1, x = 1: z1 = -1. With ReLU z2 = -relu(-1) = 0 (inactive); in their
    # ReLU-free pass z2 = -(-1) = 1 (active), so the layer-2 unit keeps its incoming edge.
    w = [torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([[2.0]])]
    b = [torch.zeros(1)] * 3
    x = torch.ones(1, 1)
    D, d = concern_identification(w, b, x, reseed_min_nonzero=0, pre_relu_feed=False)
    assert torch.equal(D[1], torch.zeros(1, 1))
    D, d = concern_identification(w, b, x, reseed_min_nonzero=0, pre_relu_feed=True)
    assert torch.equal(D[1], w[1]) and torch.equal(D[0], torch.zeros(1, 1))
    # TI the same way: a negative x = 1 restores layer 2 only in the ReLU-free pass.
    for feed, restored in ((False, False), (True, True)):
        D = [torch.zeros(1, 1), torch.zeros(1, 1), w[2].clone()]
        d = [torch.zeros(1)] * 3
        tangling_identification(w, b, D, d, x, pre_relu_feed=feed)
        assert torch.equal(D[1], w[1] if restored else torch.zeros(1, 1))


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


def test_positives_come_from_the_first_positive_pool_examples(digits_fc1):
    train = load_dataset("digits")
    x, y = train.tensors
    with torch.no_grad():
        p = torch.softmax(digits_fc1(x), 1)
    # The class whose first confident (p_c > 0.9) example comes last, and that example.
    first = {c: int(torch.nonzero((y == c) & (p[:, c] > 0.9))[0]) for c in range(10)}
    c = max(first, key=first.get)
    # A pool that ends just before it has no positive for class c ...
    with pytest.raises(ValueError, match=f"class {c}"):
        decompose_pan_rajan(digits_fc1, train, "ti-i", positive_pool=first[c])
    # ... one that ends just after it has exactly that positive: CI on one example keeps the
    # incoming rows of the hidden units active on it and nothing else (no negatives, no TI).
    mods = decompose_pan_rajan(digits_fc1, train, "ti-i", positive_pool=first[c] + 1,
                               negatives_per_class=0)
    w1, b1 = digits_fc1[1].weight.detach(), digits_fc1[1].bias.detach()
    active = (x[first[c]].flatten() @ w1.T + b1) > 0
    assert torch.equal(mods.weights[0][c], torch.where(active[:, None], w1, torch.zeros_like(w1)))


def test_value_set_jaccard_of_identical_modules_is_below_one_with_zeros():
    torch.manual_seed(0)
    w = torch.randn(1, 6, 5).repeat(2, 1, 1)  # two identical modules
    w[:, :2] = 0  # 10 of 30 edges per module are zero
    mods = PanRajanModules(["0"], [w], [torch.zeros(2, 6)], [0, 1], "hand")
    # Their formula over plain Python lists: |set(a) & set(b)| / (len(a) + len(b) - that).
    a, b = w[0].flatten().tolist(), w[1].flatten().tolist()
    inter = len(set(a) & set(b))
    assert value_set_jaccard(mods) == pytest.approx(inter / (len(a) + len(b) - inter))
    # 20 distinct nonzero values + one 0: 21 / 39, near f / (2 - f) = 0.5 for f = 2/3.
    assert inter == 21 and value_set_jaccard(mods) < 0.6
