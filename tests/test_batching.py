"""modsplit.TensorBatches (and batches()): slices of a TensorDataset, shuffled with a generator
or torch's global RNG; decompose seeds either per epoch, so its runs repeat."""
import pytest
import torch
from torch.utils.data import TensorDataset

from modsplit import TensorBatches, decompose
from modsplit.batching import batches


def _data(n=23):
    return TensorDataset(torch.arange(n * 3, dtype=torch.float32).view(n, 3), torch.arange(n))


def test_batches_cover_the_dataset_once_with_a_short_last_batch():
    loader = TensorBatches(_data(), 5)
    got = list(loader)
    assert len(loader) == len(got) == 5
    assert [len(y) for _, y in got] == [5, 5, 5, 5, 3]
    ys = torch.cat([y for _, y in got])
    assert sorted(ys.tolist()) == list(range(23))
    for x, y in got:  # x and y stay paired
        assert torch.equal(x, _data().tensors[0][y])


def test_unshuffled_order_and_generator_shuffle():
    assert torch.equal(torch.cat([y for _, y in TensorBatches(_data(), 4, shuffle=False)]),
                       torch.arange(23))
    a = [y for _, y in TensorBatches(_data(), 4, generator=torch.Generator().manual_seed(3))]
    b = [y for _, y in batches(_data(), 4, torch.Generator().manual_seed(3))]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == 6
    assert not torch.equal(torch.cat(a), torch.arange(23))


@pytest.mark.parametrize("bad,message", [
    (dict(dataset=[1, 2, 3]), "TensorDataset"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_name_the_argument(bad, message):
    kwargs = {"dataset": _data(), "batch_size": 4, **bad}
    with pytest.raises((TypeError, ValueError), match=message):
        TensorBatches(**kwargs)


@pytest.mark.parametrize("with_generator", [False, True])
def test_decompose_runs_repeat_with_either_rng(digits_fc1, with_generator):
    """decompose reseeds the global RNG and the loader's own generator every epoch: two runs
    with the same seed give the same bank, whatever state the generator starts in."""
    model, small = digits_fc1

    def run(start):
        torch.manual_seed(start)
        gen = torch.Generator().manual_seed(start) if with_generator else None
        bank = decompose(model, TensorBatches(small, 32, generator=gen), 10, epochs=2, seed=0,
                         progress=False)
        return bank.masks()

    a, b = run(1), run(2)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
