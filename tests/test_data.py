import os

import pytest
import torch

from conftest import data_path
from modsplit.app.data import DATASETS, load_dataset, num_classes

MNIST_DIR = data_path("mnist")
CIFAR_DIR = data_path("cifar10")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"

# From the shared data folder's mnist/README.md ("Verified").
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _check(ds, shape, lo=0.0, hi=1.0):
    x, y = ds.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape[1:]) == shape and len(x) == len(y)
    assert x.min() >= lo and x.max() <= hi
    return x, y


def test_digits_split_is_deterministic_and_disjoint():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    x_tr, y_tr = _check(tr, (1, 8, 8))
    x_te, y_te = _check(te, (1, 8, 8))
    assert len(tr) + len(te) == 1797 and len(te) == 360
    assert x_tr.max() == 1.0
    assert set(y_te.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits", "train").tensors[0], x_tr)
    # no test image appears in the training split
    flat_tr = {tuple(r) for r in x_tr.flatten(1).tolist()}
    assert sum(tuple(r) in flat_tr for r in x_te.flatten(1).tolist()) < 5  # rare exact dups


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="shared MNIST not present")
def test_mnist_label_counts_match_readme():
    tr = load_dataset("mnist", "train", data_dir=MNIST_DIR)
    te = load_dataset("mnist", "test")  # default folder search finds the shared copy
    x, y = _check(tr, (1, 28, 28))
    assert torch.bincount(y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(te.tensors[1]).tolist() == MNIST_TEST_COUNTS
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert x.max() == 1.0 and x.min() == 0.0


def test_limit_keeps_first_examples():
    if not os.path.isdir(MNIST_DIR):
        pytest.skip("shared MNIST not present")
    te = load_dataset("mnist", "test", data_dir=MNIST_DIR, limit=10)
    assert te.tensors[1].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert len(load_dataset("digits", "train", limit=7)) == 7


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_fmnist_from_debian_package():
    tr = load_dataset("fmnist", "train", limit=1000)
    te = load_dataset("fmnist", "test")
    _check(tr, (1, 28, 28))
    _, y = _check(te, (1, 28, 28))
    assert len(te) == 10000 and torch.bincount(y).tolist() == [1000] * 10


@pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason="shared CIFAR-10 not present")
def test_cifar10_binary_standardised():
    tr = load_dataset("cifar10", "train", limit=12000)
    x, y = _check(tr, (3, 32, 32), -3.0, 3.0)
    assert len(tr) == 12000  # spans data_batch_1 and data_batch_2
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert torch.bincount(y[:10000]).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001,
                                                  1025, 981]
    # first pixel of image 0 is (59, 62, 63)
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(x[0, :, 0, 0], (torch.tensor([59., 62., 63.]) / 255 - mean) / std)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    with pytest.warns(UserWarning, match="partial test set"):
        te = load_dataset("cifar10", "test")
    assert len(te) == 1000 and te.tensors[1][:5].tolist() == [3, 8, 8, 0, 6]


def test_missing_dir_says_where_and_how(tmp_path):
    for name, hint in (("mnist", "download=True"), ("fmnist", "apt-get install"),
                       ("cifar10", "download=True"), ("cifar100", "download=True"),
                       ("svhn", "download=True")):
        with pytest.raises(FileNotFoundError, match=hint) as e:
            load_dataset(name, "train", data_dir=str(tmp_path))
        assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_unknown_name_or_split():
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError):
        num_classes("imagenet")
    assert "cifar100" in DATASETS and num_classes("cifar100") == 100


def test_imagefolder(tmp_path):
    from PIL import Image
    for c, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (6, 5), color).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    x, y = _check(ds, (3, 5, 6))
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and x[0, 0].min() == 1.0 and x[3, 2].min() == 1.0
    assert num_classes(f"imagefolder:{tmp_path}") == 2
