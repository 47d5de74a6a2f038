"""The validation split (disjoint, covering, deterministic), the selection rule of
`--select-on validation` and the 95% interval of a test accuracy."""
import pytest
import torch
from torch.utils.data import TensorDataset

from modsplit.app.selection import select_candidate, split_validation, wilson_interval


def _dataset(n):
    """TensorDataset of n examples whose image [1, 2, 2] holds its own index."""
    return TensorDataset(torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2),
                         torch.arange(n) % 10)


def test_split_is_disjoint_covering_and_the_last_examples():
    train, val = split_validation(_dataset(100), 30)
    train_ids = set(train.tensors[0][:, 0, 0, 0].long().tolist())
    val_ids = set(val.tensors[0][:, 0, 0, 0].long().tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(100))
    assert val_ids == set(range(70, 100)) and len(train) == 70
    assert torch.equal(val.tensors[1], torch.arange(70, 100) % 10)


def test_split_is_deterministic():
    a, b = split_validation(_dataset(50), 10), split_validation(_dataset(50), 10)
    for x, y in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(x.tensors, y.tensors))


@pytest.mark.parametrize("size", [0, 50, 51, -1])
def test_split_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="validation size"):
        split_validation(_dataset(50), size)


def _cand(ji, acc_loss, pair_loss=0.0):
    return {"ji": ji, "acc_loss": acc_loss, "pair_loss": pair_loss}


def test_select_highest_objective_among_qualified():
    cands = [_cand(0.6, 0.001), _cand(0.8, 0.009), _cand(0.9, 0.02)]
    idx, rule = select_candidate(cands, "ji", {"acc": 0.01})
    assert idx == 1 and "2 of 3" in rule


def test_select_every_tolerance_must_hold():
    cands = [_cand(0.6, 0.0, 0.0), _cand(0.8, 0.0, 0.05)]
    assert select_candidate(cands, "ji", {"acc": 0.01, "pair": 0.01})[0] == 0
    assert select_candidate(cands, "ji", {"acc": 0.01, "pair": 0.1})[0] == 1


def test_select_falls_back_to_the_smallest_excess():
    cands = [_cand(0.9, 0.05), _cand(0.1, 0.03), _cand(0.5, 0.04)]
    idx, rule = select_candidate(cands, "ji", {"acc": 0.01})
    assert idx == 1 and rule.startswith("no candidate")


def test_select_ties_go_to_the_first_and_empty_raises():
    assert select_candidate([_cand(0.5, 0.0), _cand(0.5, 0.0)], "ji", {"acc": 0.01})[0] == 0
    with pytest.raises(ValueError):
        select_candidate([], "ji", {"acc": 0.01})


def test_wilson_interval():
    lo, hi = wilson_interval(800, 1000)
    assert lo == pytest.approx(0.7741, abs=1e-4) and hi == pytest.approx(0.8236, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0 < hi < 0.35
