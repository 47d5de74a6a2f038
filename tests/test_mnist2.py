"""Two-digit MNIST (dataset "mnist2"): built deterministically from the MNIST files."""
import pytest
import torch

from modsplit.app.data import load_dataset, num_classes, two_digit_mnist
from modsplit.app.models import get_model


def test_pairs_are_real_digits_side_by_side_with_label_10a_plus_b():
    mnist = load_dataset("mnist", "test")
    pairs = load_dataset("mnist2", "test")
    x, y = mnist.tensors
    x2, y2 = pairs.tensors
    assert x2.shape == (len(y), 1, 28, 56) and x2.dtype == torch.float32 and y2.dtype == torch.int64
    assert torch.equal(x2[..., :28], x)  # left: image i
    # right: image pi(i), a permutation: every image used once
    right = x2[..., 28:].reshape(len(y), -1)
    flat = x.reshape(len(y), -1)
    for i in (0, 1, 777, len(y) - 1):
        j = int((flat == right[i]).all(1).nonzero()[0])
        assert y2[i] == 10 * y[i] + y[j]
    assert torch.bincount(y2, minlength=100).min() > 0 and y2.max() < 100
    assert num_classes("mnist2") == 100


def test_deterministic_and_limited():
    a = load_dataset("mnist2", "test", limit=50)
    b = load_dataset("mnist2", "test")
    assert torch.equal(a.tensors[0], b.tensors[0][:50]) and torch.equal(a.tensors[1],
                                                                      b.tensors[1][:50])
    with pytest.raises(ValueError, match="split"):
        two_digit_mnist(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), "val")


def test_matching_fc_model():
    model = get_model("mnist2_fc")
    assert model(torch.zeros(3, 1, 28, 56)).shape == (3, 100)
