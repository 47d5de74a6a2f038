import copy

import pytest
import torch

from modsplit.app.data import load_dataset
from modsplit.app.models import FC1, small_vgg
from modsplit.app.train import evaluate, predict_logits, random_crop_flip, train_classifier


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train many times faster on one thread when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fc1_digits(seed, epochs):
    torch.manual_seed(seed)
    return train_classifier(FC1(in_features=64), load_dataset("digits"), epochs=epochs,
                            seed=seed, progress=False)


def test_fc1_digits_accuracy():
    m = _fc1_digits(0, epochs=20)
    acc = evaluate(m, load_dataset("digits", "test"))
    assert acc > 0.90, acc  # measured 0.939 with seeds 0, 1 and 2


def test_determinism_same_seed_same_weights():
    a, b = _fc1_digits(1, epochs=3), _fc1_digits(1, epochs=3)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_dropout_batchnorm_augment_deterministic_and_rng_untouched():
    ds = load_dataset("digits", limit=128)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        model = small_vgg(1, 10, width=4)
        before = torch.get_rng_state()
        models.append(train_classifier(model, ds, epochs=1, seed=5,
                                       progress=False, augment=random_crop_flip,
                                       milestones=[1]))
        assert torch.equal(torch.get_rng_state(), before)
    for p, q in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(p, q)


def test_random_crop_flip_shapes_and_content():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    y = random_crop_flip(x, padding=0)
    assert y.shape == x.shape
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2))
    z = random_crop_flip(x, padding=2)
    assert z.shape == x.shape


def test_predict_logits_and_evaluate_restore_mode():
    m = FC1(in_features=64).train()
    ds = load_dataset("digits", "test", limit=50)
    logits = predict_logits(m, ds, batch_size=16)
    assert logits.shape == (50, 10) and logits.dtype == torch.float32
    acc = evaluate(m, ds)
    assert 0.0 <= acc <= 1.0 and m.training


def _glorot_bound(weight):
    return (6 / (weight.shape[0] + weight.shape[1])) ** 0.5


def test_glorot_init_bounds_zero_bias_and_seeded():
    ds = load_dataset("digits", limit=32)
    models = []
    for torch_seed in (1, 2):  # the init draws from `seed`, not from the caller's RNG state
        torch.manual_seed(torch_seed)
        model = FC1(in_features=64)
        before = torch.get_rng_state()
        models.append(train_classifier(model, ds, epochs=0, seed=7, init="glorot",
                                       progress=False))
        assert torch.equal(torch.get_rng_state(), before)
    a, b = models
    for layer in (a[1], a[3]):
        w, bound = layer.weight, _glorot_bound(layer.weight)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert w.abs().max() <= bound
        # uniform on [-bound, bound]: std bound / sqrt(3); 64x49 and 49x10 draws
        assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    torch.manual_seed(1)
    default = FC1(in_features=64)  # PyTorch's init: bound 1/sqrt(fan_in), nonzero biases
    assert default[1].bias.abs().sum() > 0 and not torch.equal(default[1].weight, a[1].weight)


def test_adam_first_step_closed_form_and_torch_adam():
    """One full-batch step: Adam's first update is p - lr * g / (|g| + eps) (m_hat = g,
    v_hat = g^2), and equals torch.optim.Adam's step on a copy."""
    ds = load_dataset("digits", limit=40)
    torch.manual_seed(3)
    model = FC1(in_features=64)
    start = copy.deepcopy(model)
    x, y = ds.tensors
    loss = torch.nn.functional.cross_entropy(start(x), y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    lr, eps = 1e-3, 1e-7
    train_classifier(model, ds, epochs=1, batch_size=40, optimizer="adam", lr=lr, eps=eps,
                     weight_decay=0.0, seed=0, progress=False)
    ref = copy.deepcopy(start)
    opt = torch.optim.Adam(ref.parameters(), lr=lr, eps=eps)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    opt.step()
    for p, p0, g, r in zip(model.parameters(), start.parameters(), grads, ref.parameters()):
        expected = p0 - lr * g / (g.abs() + eps)
        assert torch.allclose(p, expected, atol=1e-6, rtol=0), (p - expected).abs().max()
        assert torch.allclose(p, r, atol=1e-6, rtol=0)
        assert not torch.equal(p, p0)


def test_unknown_optimizer_or_init():
    ds = load_dataset("digits", limit=8)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(FC1(in_features=64), ds, epochs=1, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="init"):
        train_classifier(FC1(in_features=64), ds, epochs=1, init="he", progress=False)
