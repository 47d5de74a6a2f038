import pytest
import torch

from modsplit.data import load_dataset
from modsplit.models import FC1, small_vgg
from modsplit.train import evaluate, predict_logits, random_crop_flip, train_classifier


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
